#!/bin/bash
# The scale benchmark on a lent device machine (16 cores), the cloud on cores of its own.
#
#   bash benchmarks/device_scale.sh prepare [REF]   # here: wheels into .whl/, Mosquitto into .mq/, REF's tree into .mq/old/
#   device run: bash benchmarks/device_scale.sh run   (carry: .whl .mq)  -> $OUT/log.txt, $OUT/all.json
#
# That machine has Python 3.12 with numpy and safetensors but no pydantic, paho-mqtt or Mosquitto, and
# no network: the wheels (pinned to this checkout's versions) and Debian's mosquitto with its libraries
# travel in ignored folders. With REF (a commit), the run alternates REF's tree and the working tree.
set -u
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || printf '/.whl/\n/.mq/\n' >> .git/info/exclude
  rm -rf .whl
  ver() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
  pkgs=""
  for p in pydantic pydantic_core annotated-types typing-inspection paho-mqtt cryptography cffi pycparser; do pkgs="$pkgs $p==$(ver $p)"; done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pkgs
  mkdir -p .mq/lib .mq/bin && cp /usr/sbin/mosquitto .mq/mosquitto.real
  for l in $(ldd /usr/sbin/mosquitto | awk '/=>/{print $3}'); do
    case $(basename "$l") in libc.so*|libm.so*|libresolv*|ld-linux*) ;; *) cp -L "$l" .mq/lib/ ;; esac
  done
  cat > .mq/bin/mosquitto <<'SH'
#!/bin/sh
# Debian's mosquitto with its own libraries; that machine runs commands as root, so the broker stays root
here=$(dirname "$(readlink -f "$0")")/..
if [ "$1" = "-c" ]; then grep -q '^user ' "$2" || printf "\nuser root\n" >> "$2"; fi
LD_LIBRARY_PATH="$here/lib" exec "$here/mosquitto.real" "$@"
SH
  chmod +x .mq/bin/mosquitto
  rm -rf .mq/old
  if [ -n "${2:-}" ]; then mkdir -p .mq/old && git archive "$2" | tar -x -C .mq/old; fi
  du -sh .whl .mq ;;
run)
  exec > >(tee "$OUT/log.txt") 2>&1
  pip="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
  $pip --target /tmp/deps .whl/*.whl || exit 1
  $pip --no-build-isolation --target /tmp/site-new . || exit 1
  [ -d .mq/old ] && { $pip --no-build-isolation --target /tmp/site-old .mq/old || exit 1; }
  export PATH="$PWD/.mq/bin:$PATH" PYTHONUNBUFFERED=1
  ulimit -n "$(ulimit -Hn)"
  mkdir -p /tmp/j
  R() {  # R old|new TAG scale.py-args...: one command, its table rows in the log, its JSON kept
    local tree=$1 tag=$2 sp=/tmp/site-new sc=benchmarks/scale.py; shift 2
    [ "$tree" = old ] && { sp=/tmp/site-old; sc=.mq/old/benchmarks/scale.py; }
    PYTHONPATH=$sp:/tmp/deps timeout "${T:-60}" python3 $sc --brokers 20000 --round-timeout 200 --fleet shared-link "$@" \
      --json /tmp/j/$tag.json 2>&1 | grep -E "^\| [0-9]|Error|Traceback" | sed "s/^/$tree $tag /" | cut -c1-400
  }
  trees="new"; [ -d .mq/old ] && trees="old new"
  # check threads on the cloud's 1 core (session 11's best) against check processes on cores of
  # their own (serve --check-processes, session 12; they inherit the cloud's CPUs), alternating
  for i in 1 2; do for t in $trees; do
    R $t p1_${t}_$i --devices 1000 --pin-cloud 1
    [ $t = new ] && R new p3c2_new_$i --devices 1000 --pin-cloud 3 --check-processes 2
    [ $t = new ] && R new p5c4_new_$i --devices 1000 --pin-cloud 5 --check-processes 4
  done; done
  T=120 R new p1_new_5000 --devices 5000 --pin-cloud 1 --round-timeout 300 --task-ack-timeout 300
  T=120 R new p5c4_new_5000 --devices 5000 --pin-cloud 5 --check-processes 4 --round-timeout 300 --task-ack-timeout 300
  python3 -c "
import glob, json, os
out = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob('/tmp/j/*.json'))}
json.dump(out, open(os.environ['OUT'] + '/all.json', 'w'), indent=1, default=str)"
  echo ALL DONE ;;
*) echo "usage: $0 prepare [REF] | run" >&2; exit 2 ;;
esac
