"""Wiring of `fedpft-cloud serve`: broker, transport, evaluator and aligner around a Federation."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fedpft.cloud.config import ServeConfig, load_prepare_config
from fedpft.modeling.families import resolve_model_id
from fedpft.shared.manifest import BundleManifest, verify_bundle
from fedpft.shared.transport import Transport

from .device import resolve_device
from .state import RunState

log = logging.getLogger("fedpft.serve")


class Cloud:
    """The torch side of a run: the FM with plugged adapters, and the proxy for alignment."""

    def __init__(self, cfg: ServeConfig, manifest: BundleManifest):
        from .evaluate import PluggedFM

        self.cfg, self.manifest = cfg, manifest
        self.pc = pc = load_prepare_config(cfg.bundle, manifest)
        self.device = resolve_device(cfg.device)
        self.fm = PluggedFM(resolve_model_id(pc.model), manifest.labels, pc.lora_rank, pc.lora_alpha, pc.seed, self.device)
        self._eval_batches = None
        self._proxy = None

    # -- evaluation
    def eval_batches(self):
        """The evaluation set, preprocessed once by the devices' own loader (same tokenizer, same labels)."""
        if self._eval_batches is None:
            from fedpft.shared.records import BatchMaker, batches, read_local_data

            data = read_local_data(self.cfg.eval_data, self.manifest)
            records = data.records[: self.cfg.eval_max_samples] if self.cfg.eval_max_samples else data.records
            maker = BatchMaker(self.cfg.bundle, self.manifest)
            self._eval_batches = [(b.inputs, b.labels) for b in batches(records, maker, self.cfg.eval_batch_size, data.skips)]
            if data.skips.total:
                log.warning("evaluation data: %s", data.skips.summary())
        return self._eval_batches

    def evaluate(self, adapters: dict[str, np.ndarray]) -> tuple[float, float]:
        self.fm.plug(adapters)
        return self.fm.evaluate(self.eval_batches())

    # -- alignment
    def align(self, adapters: dict[str, np.ndarray], stats: dict[int, tuple[np.ndarray, float]],
              current_ffn: dict[str, np.ndarray] | None, round_id: int) -> tuple[dict[str, np.ndarray], dict]:
        """(re-aligned FFN tensors under proxy state-dict keys, facts for the round's record)."""
        from .alignment import align
        from .evaluate import evaluate_model
        from .public_data import batch_stream, hold_out, list_public_samples, make_encoder

        if self._proxy is None:
            from .bundle_model import load_proxy

            # the bundle's own proxy + adapters, exactly as devices start from
            proxy, spec = load_proxy(self.cfg.bundle, with_adapters=True)
            self._proxy = proxy.to(self.device), spec
            public = self.cfg.public_data or self.pc.public_data
            if public is None:
                raise ValueError("alignment needs public data: pass --public-data")
            kind = self.manifest.input.kind
            encoder = make_encoder(kind, self.manifest.input, self.cfg.bundle)
            samples, held = hold_out(list_public_samples(Path(public), kind), self.pc.batch_size)
            self._held = [{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in encoder(c).items()} for c in held]
            self._public = (samples, encoder)
        proxy, spec = self._proxy
        samples, encoder = self._public
        # a stream seeded by the round, so a resumed run aligns on exactly the same batches
        stream = batch_stream(samples, encoder, self.pc.batch_size, self.cfg.seed * 7919 + round_id)
        if current_ffn:
            # resume: the proxy must carry the FFN weights of the last alignment
            from .bundle_model import set_ffn_state

            set_ffn_state(proxy, {k: torch.from_numpy(v) for k, v in current_ffn.items()})
        # the proxy's own accuracy with the aggregated adapters, before and after: does alignment
        # make the model the devices train on behave more like the FM they are training for?
        score = (lambda model: evaluate_model(model, self.eval_batches())[0]) if self.cfg.eval_data else None
        res = align(self.fm.model, proxy, spec, adapters, stats, stream, self.cfg.align_fraction, self.cfg.align_steps,
                    self.cfg.align_lr, held_out=self._held, score=score, objective=self.cfg.align_objective)
        return res.ffn, res.summary()  # proxy state-dict keys, as manifest.ffn names them


def serve(cfg: ServeConfig, show_progress: bool = True, transport: Transport | None = None) -> RunState:
    """`transport`: an unconnected transport to run on instead of MQTT to cfg.broker (the virtual
    simulation's in-memory hub); the broker, TLS and credential settings are then unused."""
    from fedpft.shared.mqtt import MqttTransport

    from .broker import EmbeddedBroker
    from .fanout import CLOUD_MAX_INFLIGHT
    from .report import write_report
    from .server import Federation

    manifest = verify_bundle(cfg.bundle)
    cloud = Cloud(cfg, manifest)
    broker = None
    url = cfg.broker
    if url is None and transport is None:
        broker = EmbeddedBroker()
        url = broker.start()
        log.info("embedded MQTT broker listening at %s", url)
        print(f"embedded MQTT broker: {url}", flush=True)
    try:
        if transport is None:
            transport = MqttTransport.from_config(cfg, f"fedpft-cloud-{cfg.run_id}", url=url, max_inflight=CLOUD_MAX_INFLIGHT)
        with transport:
            fed = Federation(cfg, transport, evaluator=cloud.evaluate if cfg.eval_data else None,
                             aligner=cloud.align if cfg.align_every else None, show_progress=show_progress)
            state = fed.run()
    finally:
        if broker is not None:
            broker.stop()
    write_report(cfg.out)
    return state
