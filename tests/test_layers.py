"""The import directions of docs/architecture.md, checked on the source (AST, every import
statement, function-level ones included):

    shared  <-  modeling (torch model layer)  <-  export  <-  cloud
    shared  <-  edge

and no torch, transformers, peft or optimum under edge/ or shared/.
"""

import ast
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PKG = "fedpft"
# what each layer may import of ours (the root package `fedpft` itself holds only the version)
ALLOWED = {
    "shared": {"shared"},
    "modeling": {"shared", "modeling"},
    "export": {"shared", "modeling", "export"},
    "cloud": {"shared", "modeling", "export", "cloud"},
    "edge": {"shared", "edge"},
    # the simulation layer sits above both sides: it hosts the devices' own code in the cloud's process
    "sim": {"shared", "modeling", "export", "cloud", "edge", "sim"},
}
HEAVY = {"torch", "transformers", "peft", "optimum"}
TORCH_FREE = {"shared", "edge"}
# Known edges against the order, each with its reason; an entry here is a debt, not a rule.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def _package_dirs() -> dict[str, Path]:
    """`fedpft.<layer>` -> its folder, as pyproject installs them."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name.split(".", 1)[1]: ROOT / folder for name, folder in conf.items() if name.startswith(f"{PKG}.")}


def _modules():
    for layer, folder in sorted(_package_dirs().items()):
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            is_pkg = path.name == "__init__.py"
            yield layer, ".".join([PKG, layer, *parts]), is_pkg, path


def _imports(module: str, is_pkg: bool, tree: ast.AST):
    """(line, absolute name) of every import in the tree, relative ones resolved."""
    package = module if is_pkg else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if node.module is not None and mod != PKG:
                yield node.lineno, mod
                continue
            # `from fedpft import edge` / `from .. import edge` name the package they import
            for alias in node.names:
                yield node.lineno, f"{mod}.{alias.name}"


def _violations() -> list[str]:
    layers = set(_package_dirs())
    out = []
    for layer, module, is_pkg, path in _modules():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for line, name in _imports(module, is_pkg, tree):
            parts = name.split(".")
            where = f"{path.relative_to(ROOT)}:{line}"
            if parts[0] in HEAVY and layer in TORCH_FREE:
                out.append(f"{where}: {module} imports {name} ({layer} never imports {parts[0]})")
            if parts[0] != PKG or len(parts) < 2 or parts[1] not in layers:
                continue
            target = parts[1]
            if target not in ALLOWED[layer] and (module, target) not in EXCEPTIONS:
                out.append(f"{where}: {module} imports {name} ({layer} may import only {sorted(ALLOWED[layer])})")
    return sorted(set(out))


def test_every_layer_is_known():
    assert set(_package_dirs()) == set(ALLOWED), "a new package needs its place in ALLOWED (and in docs/architecture.md)"


def test_imports_follow_the_layer_order():
    bad = _violations()
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_exceptions_are_still_needed():
    """An exception that no import uses any more is dropped, so the debt list stays true."""
    used = set()
    for layer, module, is_pkg, path in _modules():
        for _, name in _imports(module, is_pkg, ast.parse(path.read_text(encoding="utf-8"))):
            parts = name.split(".")
            if parts[0] == PKG and len(parts) > 1 and (module, parts[1]) in EXCEPTIONS:
                used.add((module, parts[1]))
    assert used == set(EXCEPTIONS), f"unused exceptions: {sorted(set(EXCEPTIONS) - used)}"


@pytest.mark.parametrize("source,layer,expect", [
    ("import torch", "shared", "never imports torch"),
    ("def f():\n    from transformers import AutoConfig", "edge", "never imports transformers"),
    ("from fedpft.cloud.state import RunState", "export", "export may import only"),
    ("from ..edge import data", "cloud", "cloud may import only"),
    ("from fedpft import cloud", "modeling", "modeling may import only"),
])
def test_the_walk_sees_every_kind_of_import(tmp_path, monkeypatch, source, layer, expect):
    """The checker itself: top-level, function-level, relative and `from fedpft import x` imports."""
    dirs = {name: tmp_path / name for name in ALLOWED}
    for folder in dirs.values():
        folder.mkdir()
    (dirs[layer] / "probe.py").write_text(source + "\n")
    monkeypatch.setattr(__import__(__name__), "_package_dirs", lambda: dirs)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert any(expect in v for v in _violations())
