"""The planner's analytic memory model against XLA's compiled step (CPU, 8 fake devices)."""

import dataclasses

import jax
import pytest

from jaxmt.config import ModelConfig, TrainConfig
from jaxmt.plan import memory
from jaxmt.plan.targets import parse_target
from jaxmt.plan.verify import compile_candidate
from jaxmt.plan.workload import Candidate, Workload

TINY = ModelConfig(vocab_size=512, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128,
                   num_encoder_layers=2, num_decoder_layers=2, precision="fp32")


def workload(batch=16, src=32, tgt=32, optimizer="adafactor", **model) -> Workload:
    return Workload(dataclasses.replace(TINY, **model),
                    TrainConfig(batch_size=batch, optimizer=optimizer), src, tgt)


class Compiles:
    """Counts XLA compiles while in the block."""

    def __init__(self):
        self.count, self.on = 0, False
        jax.monitoring.register_event_duration_secs_listener(self._event)

    def _event(self, name, *_a, **_k):
        if self.on and name == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        self.on = True
        return self

    def __exit__(self, *exc):
        self.on = False


def test_the_analytic_pass_compiles_nothing():
    w = workload()
    with Compiles() as c:
        for cand in (Candidate(mesh=(1, 8, 1, 1)), Candidate(mesh=(1, 1, 4, 2), encoder_remat="full"),
                     Candidate(mesh=(1, 2, 4, 1), num_microbatches=2, scan_layers=True)):
            est = memory.predict_memory(w, cand)
            assert est.total > 0
    assert c.count == 0


@pytest.mark.parametrize("cand", [
    Candidate(mesh=(1, 8, 1, 1)),  # dp: everything replicated
    Candidate(mesh=(1, 1, 8, 1)),  # fsdp
    Candidate(mesh=(1, 1, 8, 1), shard_params=False, num_microbatches=2),  # zero1
    Candidate(mesh=(1, 2, 2, 2), scan_layers=True),  # fsdp x tensor, scanned
], ids=["dp", "fsdp", "zero1", "fsdp_tp_scan"])
def test_arguments_are_predicted_exactly(cand):
    """Parameters, optimizer state, counters and batch: XLA's argument size, less only the
    batch arrays jit drops as unused (the positions, under relative attention)."""
    w = workload(optimizer="adamw")
    est = memory.predict_memory(w, cand)
    compiled = compile_candidate(w, cand, parse_target("cpu:8"))
    over = est.params + est.opt_state + est.other - compiled["argument_bytes"]
    assert 0 <= over <= memory.batch_bytes(w, cand) * 2 / 8  # two of the eight arrays


def test_the_terms_move_the_right_way():
    w = workload(batch=32, src=64, tgt=64)
    dp = memory.predict_memory(w, Candidate(mesh=(1, 8, 1, 1)))
    fsdp = memory.predict_memory(w, Candidate(mesh=(1, 1, 8, 1)))
    assert fsdp.params * 7 < dp.params  # split 8 ways (small vectors stay whole)
    assert fsdp.opt_state < dp.opt_state
    full = memory.predict_memory(w, Candidate(mesh=(1, 8, 1, 1), encoder_remat="full",
                                              decoder_remat="full"))
    assert full.activations < dp.activations / 2
    micro = memory.predict_memory(w, Candidate(mesh=(1, 8, 1, 1), num_microbatches=4))
    assert micro.activations == pytest.approx(dp.activations / 4, rel=1e-6)
    assert micro.logits == pytest.approx(dp.logits / 4, abs=2)
    tp = memory.predict_memory(w, Candidate(mesh=(1, 4, 1, 2)))
    # Splitting the vocabulary over tensor saves what splitting the rows over fsdp does.
    assert tp.logits == memory.predict_memory(w, Candidate(mesh=(1, 4, 2, 1))).logits
    assert tp.logits * 2 == pytest.approx(
        memory.predict_memory(w, Candidate(mesh=(1, 4, 1, 1))).logits, abs=2)


def test_tpu_layouts_pad_small_minor_dimensions():
    assert memory._tiled_bytes((16, 64), 4) == 16 * 128 * 4  # 64 lanes -> 128
    assert memory._tiled_bytes((3, 128), 2) == 16 * 128 * 2  # bf16 tiles are 16 rows
    assert memory._tiled_bytes((256, 256), 4) == 256 * 256 * 4


@pytest.mark.slow
@pytest.mark.parametrize("cand", [
    Candidate(mesh=(1, 8, 1, 1)),
    Candidate(mesh=(1, 1, 4, 2), num_microbatches=2),
], ids=["dp", "fsdp_tp_micro"])
def test_total_is_near_the_compiled_step(cand):
    """The whole prediction (arguments + calibrated temporaries) against XLA's."""
    w = workload(batch=32, src=64, tgt=64)
    est = memory.predict_memory(w, cand)
    compiled = compile_candidate(w, cand, parse_target("cpu:8"))
    assert abs(est.total / compiled["compiled_bytes_per_device"] - 1) < 0.25
