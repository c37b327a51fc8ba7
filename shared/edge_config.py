"""The device's training config: what one offline or federated round runs with. Pure pydantic."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EdgeTrainConfig(BaseModel):
    """`fedpft-edge train` options, and what the MQTT agent builds from a cloud Task."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=1, ge=1, description="passes over the local training split")
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=1e-4, gt=0, description="AdamW learning rate")
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps")
    seed: int = Field(default=0, ge=0, description="seed of the per-epoch shuffles (the cloud sends a new one each round)")
    # onnxruntime's dropout draws from one generator per process, seeded from the clock unless set:
    # set, a round trains bit for bit the same from the same inputs (a device process trains one
    # round at a time; sessions training at once in one process share the generator)
    dropout_seed: int | None = Field(default=None, ge=0, description="seed of the dropout masks drawn this round; None = unseeded")
    # Its own seed, fixed for the device's life: were it the round's seed, samples held out in one
    # round would be trained on in the next, and acc_before/acc_after would measure memorisation.
    holdout_seed: int = Field(default=0, ge=0, description="seed of the held-out split; keep it fixed across rounds")
    holdout: float = Field(default=0.1, ge=0, lt=1, description="share of local samples held out for acc_before/acc_after")
    eval_batch_size: int = Field(default=32, ge=1)
    report_stats: bool = Field(default=True, description="sum the per-neuron activation counts of compressed layers")
    threads: int | None = Field(default=None, ge=1, description="ORT intra-op threads; None lets ORT decide")
    # One sample is a sentence or a paragraph: a record far beyond that is a broken or hostile file,
    # and parsing it whole (a 10 MB line took 65 s and 1.7 GB) would cost more than the round.
    max_record_bytes: int = Field(default=256 * 1024, ge=64, description="skip a data record (line, CSV record) larger than this, unparsed")
    max_record_tokens: int = Field(default=8192, ge=1, description="skip a text whose tokens, before truncation to the bundle's max_length, exceed this")
    providers: tuple[str, ...] = Field(default=("cpu",), min_length=1, description="onnxruntime execution providers in order of preference (cpu, cuda, ...)")
