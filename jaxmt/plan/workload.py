"""What a plan is for (:class:`Workload`) and one setting it may choose (:class:`Candidate`).

A candidate is the part of a run config the planner varies: the mesh, remat per stack,
microbatches, the attention implementation and scanned or unrolled layers. Everything
else (the model's shape, the optimizer, the batch) is the workload's and stays fixed.
"""

from __future__ import annotations

import dataclasses

from jaxmt.config import MeshConfig, ModelConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model and what one training step feeds it.

    Attributes:
      model: the model (``precision`` concrete: fp32, bf16, bf16_params or fp16).
      train: the optimizer and global batch (``batch_size`` rows, unpacked).
      src_len: source tokens per row.
      tgt_len: target tokens per row.
    """

    model: ModelConfig
    train: TrainConfig
    src_len: int
    tgt_len: int

    @property
    def batch(self) -> int:
        return self.train.batch_size

    @property
    def tokens(self) -> int:
        """Source plus target tokens per step."""
        return self.batch * (self.src_len + self.tgt_len)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One setting of the knobs the planner turns.

    Attributes:
      mesh: ``(replica, data, fsdp, tensor)``, multiplying to the target's devices.
      shard_params: False keeps parameters whole over ``fsdp`` (ZeRO-1).
      encoder_remat, decoder_remat: remat policies (``jaxmt.config.REMAT_POLICIES``).
      num_microbatches: gradient accumulation steps per optimizer step.
      attention: the self-attention implementation of both stacks (xla, dot_product,
        flash, blockwise); cross-attention stays ``xla``.
      scan_layers: ``nn.scan`` over the layers instead of unrolled.
    """

    mesh: tuple[int, int, int, int]
    shard_params: bool = True
    encoder_remat: str = "none"
    decoder_remat: str = "none"
    num_microbatches: int = 1
    attention: str = "xla"
    scan_layers: bool = False

    @property
    def offloads(self) -> bool:
        """Whether a stack's remat policy moves activations to host memory."""
        return "offload" in (self.encoder_remat, self.decoder_remat)

    @property
    def sizes(self) -> dict[str, int]:
        return dict(zip(("replica", "data", "fsdp", "tensor"), self.mesh))

    def mesh_config(self) -> MeshConfig:
        r, d, f, t = self.mesh
        return MeshConfig(replica=r, data=d, fsdp=f, tensor=t, shard_params=self.shard_params)

    def model_config(self, model: ModelConfig) -> ModelConfig:
        att = dataclasses.replace(model.attention, encoder=self.attention,
                                  decoder=self.attention)
        return dataclasses.replace(model, encoder_remat=self.encoder_remat,
                                   decoder_remat=self.decoder_remat,
                                   scan_layers=self.scan_layers, attention=att)

    def train_config(self, train: TrainConfig) -> TrainConfig:
        return dataclasses.replace(train, num_microbatches=self.num_microbatches)

    def apply(self, w: Workload) -> Workload:
        """The workload with this candidate's settings in its configs."""
        return dataclasses.replace(w, model=self.model_config(w.model),
                                   train=self.train_config(w.train))

    def label(self) -> str:
        """Short text for tables: ``r1 d4 f2 t2 remat=full/full mb=2 flash scan``."""
        r, d, f, t = self.mesh
        remat = (self.encoder_remat if self.encoder_remat == self.decoder_remat
                 else f"{self.encoder_remat}/{self.decoder_remat}")
        parts = [f"r{r} d{d} f{f} t{t}" + ("" if self.shard_params or f == 1 else " zero1"),
                 f"remat={remat}", f"mb={self.num_microbatches}", self.attention,
                 "scan" if self.scan_layers else "unrolled"]
        return " ".join(parts)


