"""Train-step speed: jaxmt against Hugging Face `transformers`' PyTorch T5, in one run.

Both sides train the same T5.1.1 encoder-decoder (gated-GELU MLP, relative position
bias, RMSNorm, untied output layer, no dropout) on the same batch of random token ids
(full rows, no padding) with the same optimizer: AdamW (b1 0.9, b2 0.98, eps 1e-9,
weight decay 0.01 on matrices only) after global-norm clipping at 1.0, the same
warm-up/cosine learning rate, and plain cross entropy (label smoothing and z-loss 0
unless set). The torch model is built offline from a `T5Config` and gets jaxmt's initial
weights, so both start from the same function: the first-step losses are printed.

transformers 5.x ties T5's output layer to the embedding even when
`tie_word_embeddings=False` is passed; the torch side unties it by hand, and the script
asserts that both sides have the same number of parameters.

Precision: `bf16` is jaxmt's default policy (`ModelConfig(precision="bf16")`: bf16
matmul operands with f32 accumulation, f32 parameters) against
`torch.autocast("cpu", dtype=torch.bfloat16)` with f32 parameters; `fp32` is jaxmt's
fp32 policy against torch fp32 eager.

jaxmt runs the public train step (`Trainer.step_fn()`) on a 1-device mesh. After a
warm-up (compile and first steps, not timed), the two sides take turns in rounds
(ABBA order, so drift hits both alike), each step timed to completion
(`block_until_ready` for JAX; torch is eager and synchronous). Per-step time is the
median over the timed steps (the best-of ratio is printed too: other processes on the
same cores skew single steps). Tokens per step = source + target positions,
batch x (src_len + tgt_len). torch uses as many threads as there are cores.

`--malloc tuned` (Linux/glibc) keeps freed memory in the process instead of returning
it to the OS, for both sides; see `jaxmt/hostmem.py` (the `jaxmt` command does this).
The default leaves the allocator alone.

Default shape ("notes", as in the stack notes): d_model 512, 6+6 layers, 8 heads x 64,
d_ff 1024, vocabulary 32128 (70.7M parameters); "small" is gin_configs/models/small.gin
(6 heads, 8+8 layers).

`--isa avx2` shows what a user with an AVX2-only CPU gets, on a CPU that has AVX-512.
Set before jax and torch are imported: for jaxmt `XLA_FLAGS=--xla_cpu_max_isa=AVX2`
(merged with any XLA_FLAGS already set); for torch `ATEN_CPU_CAPABILITY=avx2` and
`MKL_ENABLE_INSTRUCTIONS=AVX2`; for both `ONEDNN_MAX_CPU_ISA=AVX2`. The XLA cap binds only
XLA's generated code: jaxlib's matmuls run in YNNPACK, which picks its kernels from the
CPUID-based cpuinfo library inside libjax_common.so. So the script also clears that
copy's AVX-512/AMX fields (checked against /proc/cpuinfo first; `jaxlib_avx512_hidden` in
the JSON says whether it worked): YNNPACK then runs the AVX2 kernels an AVX2-only CPU gets.
Without that, bf16 matmuls stayed native (190 GFLOP/s on one dot here, against 63 with it)
and fp32 ones kept their AVX-512 kernels. (`jaxmt.hardware.AVX2_XLA_FLAGS` instead turns
YNNPACK off; fp32 dots then take another path, Eigen with oneDNN, not what an AVX2 CPU runs:
add `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=` to measure that.)
`native` (the default) leaves everything alone.

`--precision auto` (the default) is fp32 under `--isa avx2` and otherwise what
`ModelConfig(precision="auto")` picks on this CPU (`jaxmt.hardware`): bf16 only with
native bf16 matmuls. On an AVX2-only CPU torch's bf16 matmuls run at about 1 GFLOP/s
(`autocast` Linear about 18) against about 85 in fp32, so a bf16 step there takes minutes.

Timing on a shared machine: with other processes on the same cores, both sides' 2-thread
steps slow down several times, torch's more (its OpenMP threads wait for each other), so
the wall-clock ratio then overstates jaxmt. The script prints a warning when the load
average says so, and reports process CPU time per step (`ratio_vs_torch_cpu`; it also
counts threads spinning while they wait). `--cores 1` runs both sides on one core (one
thread each): the per-core comparison, which contention barely moves.

    python benchmarks/train_step.py [--isa native|avx2] [--cores 0] [--shape notes|small]
        [--precision auto|bf16|fp32] [--batch 16] [--src_len 128] [--tgt_len 128]
        [--rounds 3] [--steps_per_round 1] [--warmup 1] [--malloc default|tuned] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

# jax, torch and jaxmt are imported in main(), after --malloc has had its chance to act:
# glibc's allocator options only reach threads that allocate after they are set.

# What --isa sets before jax and torch are imported: (variable, value) pairs, XLA_FLAGS merged.
ISA_ENV = {
    "native": (),
    "avx2": (("XLA_FLAGS", "--xla_cpu_max_isa=AVX2"), ("ATEN_CPU_CAPABILITY", "avx2"),
             ("ONEDNN_MAX_CPU_ISA", "AVX2"), ("MKL_ENABLE_INSTRUCTIONS", "AVX2")),
}


def apply_isa(isa: str) -> dict:
    """Sets the environment for ``isa`` (before jax/torch import); returns what it set."""
    done = {}
    for var, val in ISA_ENV[isa]:
        if var == "XLA_FLAGS":
            flag = val.split("=")[0]
            kept = [f for f in os.environ.get(var, "").split() if not f.startswith(flag + "=")]
            val = " ".join(kept + [val])
        os.environ[var] = done[var] = val
    return done


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    from jaxmt.hardware import read_cpu_flags  # imports no jax
    return read_cpu_flags() or frozenset()


def auto_precision(isa: str) -> tuple[str, str]:
    """(policy, reason) for ``--precision auto``: fp32 on the emulated AVX2 CPU (jaxmt's
    rule cannot see AVX-512 hidden in-process), else ``precision="auto"``'s own choice."""
    if isa == "avx2":
        return "fp32", "an AVX2-only CPU has no native bf16"
    from jaxmt.hardware import auto_precision as jaxmt_auto
    c = jaxmt_auto()
    return c.policy, c.reason


# jaxlib's CPU matmuls go to YNNPACK, which picks its kernels from the cpuinfo library
# bundled in libjax_common.so (CPUID), not from --xla_cpu_max_isa: under that flag alone the
# dots keep their AVX-512 kernels and bf16 dots stay native. --isa avx2 therefore also clears
# the AVX-512 (and AMX) fields of that cpuinfo copy, before XLA first asks for them. Bytes of
# cpuinfo's `struct cpuinfo_x86_isa` (x86-64 layout of cpuinfo since 2024), each checked
# against /proc/cpuinfo before anything is written.
_CPUINFO_CHECK = {22: "avx", 24: "fma", 27: "f16c", 28: "avx2", 29: "avx512f", 32: "avx512cd",
                  33: "avx512dq", 34: "avx512bw", 35: "avx512vl", 62: "movbe", 66: "popcnt",
                  68: "bmi1", 69: "bmi2", 70: "adx"}
_CPUINFO_CLEAR = range(29, 56)  # avx512f ... avx512_4fmaps, amx_*, avx10/vnni-int/ne-convert
_HIDDEN = False


def _elf_symbols(path: str, names: set[str]) -> dict[str, tuple[int, int]]:
    """(value, size) of the named symbols in an ELF64 file's .symtab (local ones included)."""
    import struct
    with open(path, "rb") as f:
        data = f.read()
    if data[:5] != b"\x7fELF\x02":
        return {}
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    found = {}
    for sec in secs:
        if sec[1] != 2:  # SHT_SYMTAB
            continue
        strtab = secs[sec[6]][4]
        for off in range(sec[4], sec[4] + sec[5], 24):
            name_off, _, _, _, value, size = struct.unpack_from("<IBBHQQ", data, off)
            end = data.index(b"\0", strtab + name_off)
            name = data[strtab + name_off:end].decode(errors="replace")
            if name in names:
                found[name] = (value, size)
    return found


def hide_avx512_from_jaxlib() -> str:
    """Makes jaxlib's YNNPACK/XNNPACK see an AVX2 CPU; returns what happened, in words.

    Call after ``import jax`` and before the first computation. Linux x86-64 only; where
    the library, its symbols or the expected layout are not found it changes nothing.
    """
    global _HIDDEN
    if _HIDDEN:
        return "done"
    import ctypes

    import jaxlib
    path = os.path.realpath(os.path.join(os.path.dirname(jaxlib.__file__), "libjax_common.so"))
    base = None
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and os.path.realpath(parts[5]) == path and int(parts[2], 16) == 0:
                base = int(parts[0].split("-")[0], 16)
                break
    if base is None:
        return "not done: libjax_common.so is not loaded"
    guard_name = "_ZGVZN3ynn24get_supported_arch_flagsEvE5flags"
    syms = _elf_symbols(path, {"cpuinfo_isa", "cpuinfo_initialize", guard_name})
    if "cpuinfo_isa" not in syms or "cpuinfo_initialize" not in syms:
        return "not done: cpuinfo symbols not found in libjax_common.so"
    if guard_name in syms and ctypes.c_uint8.from_address(base + syms[guard_name][0]).value:
        return "not done: YNNPACK had already read the CPU features"
    if not ctypes.CFUNCTYPE(ctypes.c_bool)(base + syms["cpuinfo_initialize"][0])():
        return "not done: cpuinfo_initialize failed"
    addr, size = syms["cpuinfo_isa"]
    isa = (ctypes.c_uint8 * size).from_address(base + addr)
    flags = cpu_flags()
    wrong = [n for i, n in _CPUINFO_CHECK.items() if i >= size or isa[i] != (n in flags)]
    if wrong or size < _CPUINFO_CLEAR.stop:
        return f"not done: unexpected cpuinfo layout (mismatch at {wrong})"
    for i in _CPUINFO_CLEAR:
        isa[i] = 0
    _HIDDEN = True
    return "done"


SHAPES = {
    "notes": dict(vocab_size=32128, emb_dim=512, num_heads=8, head_dim=64, mlp_dim=1024,
                  num_encoder_layers=6, num_decoder_layers=6),
    "small": dict(vocab_size=32128, emb_dim=512, num_heads=6, head_dim=64, mlp_dim=1024,
                  num_encoder_layers=8, num_decoder_layers=8),
}


def make_batch(batch: int, src_len: int, tgt_len: int, vocab: int, seed: int = 0):
    """Random full rows: ids in [2, vocab), decoder input = targets shifted right."""
    rng = np.random.default_rng(seed)
    src = rng.integers(2, vocab, (batch, src_len)).astype(np.int32)
    tgt = rng.integers(2, vocab, (batch, tgt_len)).astype(np.int32)
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
    ones_s, ones_t = np.ones_like(src), np.ones_like(tgt)
    b = dict(encoder_input_tokens=src, encoder_segment_ids=ones_s,
             encoder_positions=np.tile(np.arange(src_len, dtype=np.int32), (batch, 1)),
             decoder_input_tokens=dec_in, decoder_target_tokens=tgt, decoder_loss_weights=ones_t,
             decoder_segment_ids=ones_t,
             decoder_positions=np.tile(np.arange(tgt_len, dtype=np.int32), (batch, 1)))
    from jaxmt.data.packing import BATCH_KEYS
    assert set(b) == set(BATCH_KEYS), sorted(set(b) ^ set(BATCH_KEYS))
    return b


# ---------------------------------------------------------------------------- torch side

def build_torch(shape: dict, threads: int):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=shape["vocab_size"], d_model=shape["emb_dim"],
                   d_kv=shape["head_dim"], d_ff=shape["mlp_dim"],
                   num_layers=shape["num_encoder_layers"],
                   num_decoder_layers=shape["num_decoder_layers"], num_heads=shape["num_heads"],
                   relative_attention_num_buckets=32, relative_attention_max_distance=128,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
                   tie_word_embeddings=False, use_cache=False,
                   decoder_start_token_id=0, pad_token_id=0)
    model = T5ForConditionalGeneration(cfg)
    tied = model.lm_head.weight is model.shared.weight
    if tied:  # transformers 5.x ties them regardless of the flag: untie by hand
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    assert model.lm_head.weight is not model.shared.weight
    assert not getattr(model.config, "scale_decoder_outputs", False), \
        "torch T5 would rescale decoder outputs (tied-embedding T5), jaxmt does not"
    model.train()
    return model, tied


def _pick(tree: dict, *names: str):
    """The first of ``names`` present in ``tree`` (jaxmt has renamed sub-modules before)."""
    for n in names:
        if n in tree:
            return tree[n]
    raise KeyError(f"none of {names} in {sorted(tree)}")


def copy_jaxmt_weights(model, params) -> None:
    """Loads jaxmt's parameters into the torch model (Linear weights are [out, in])."""
    import torch

    def t(x):
        return torch.from_numpy(np.array(x, dtype=np.float32))

    def attn(mod, p):
        e, h, d = p["query"].shape
        for name, key in (("q", "query"), ("k", "key"), ("v", "value")):
            getattr(mod, name).weight.copy_(t(p[key]).reshape(e, h * d).T)
        mod.o.weight.copy_(t(p["out"]).reshape(h * d, e).T)

    def mlp(mod, p):
        mod.wi_0.weight.copy_(t(p["wi_0"]).T)
        mod.wi_1.weight.copy_(t(p["wi_1"]).T)
        mod.wo.weight.copy_(t(p["wo"]).T)

    # (attention names, norm names) per sub-layer; None = the MLP.
    enc_layout = ((("attention",), ("pre_attention_norm", "attention_norm")),
                  (None, ("pre_mlp_norm", "mlp_norm")))
    dec_layout = ((("self_attention",), ("pre_self_attention_norm", "self_attention_norm")),
                  (("encoder_decoder_attention", "cross_attention"),
                   ("pre_cross_attention_norm", "cross_attention_norm")),
                  (None, ("pre_mlp_norm", "mlp_norm")))
    with torch.no_grad():
        model.shared.weight.copy_(t(params["token_embed"]["embedding"]))
        model.lm_head.weight.copy_(t(params["decoder"]["logits_dense"]).T)
        for stack, tp, layout in ((model.encoder, params["encoder"], enc_layout),
                                  (model.decoder, params["decoder"], dec_layout)):
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.copy_(
                t(tp["relpos_bias"]["rel_embedding"]))
            stack.final_layer_norm.weight.copy_(t(tp["final_norm"]["scale"]))
            for i, block in enumerate(stack.block):
                lp = tp[f"layers_{i}"]
                for sub, (att, norm) in zip(block.layer, layout):
                    sub.layer_norm.weight.copy_(t(_pick(lp, *norm)["scale"]))
                    if att is None:
                        mlp(sub.DenseReluDense, lp["mlp"])
                    else:
                        attn(sub.SelfAttention if hasattr(sub, "SelfAttention")
                             else sub.EncDecAttention, _pick(lp, *att))


class TorchStep:
    """One AdamW train step of the torch model, mirroring jaxmt's optimizer chain."""

    def __init__(self, model, batch: dict, lrs: np.ndarray, train_cfg, precision: str):
        import torch

        self.torch, self.model, self.lrs, self.cfg = torch, model, lrs, train_cfg
        self.bf16 = precision == "bf16"
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() > 1],
                   "weight_decay": train_cfg.weight_decay},
                  {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
        self.params = params
        self.opt = torch.optim.AdamW(groups, lr=float(lrs[0]), betas=(0.9, 0.98), eps=1e-9,
                                     foreach=True)
        self.src = torch.from_numpy(batch["encoder_input_tokens"].astype(np.int64))
        self.dec_in = torch.from_numpy(batch["decoder_input_tokens"].astype(np.int64))
        self.tgt = torch.from_numpy(batch["decoder_target_tokens"].astype(np.int64))
        self.step = 0

    def __call__(self) -> float:
        torch, cfg = self.torch, self.cfg
        for g in self.opt.param_groups:
            g["lr"] = float(self.lrs[min(self.step, len(self.lrs) - 1)])
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(input_ids=self.src, decoder_input_ids=self.dec_in).logits
        logits = logits.float()
        flat = logits.view(-1, logits.shape[-1])
        loss = torch.nn.functional.cross_entropy(flat, self.tgt.view(-1),
                                                 label_smoothing=cfg.label_smoothing)
        if cfg.z_loss:
            loss = loss + cfg.z_loss * torch.logsumexp(flat, -1).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        self.step += 1
        return float(loss.detach())


# ---------------------------------------------------------------------------- jaxmt side

class JaxStep:
    def __init__(self, trainer, batch: dict, batch_size: int):
        import jax

        self.jax = jax
        self.trainer = trainer
        self.state = trainer.init_state(0)
        self.batch = trainer.partitioner.shard_batch(batch, batch_size)
        self.fn = trainer.step_fn()
        self.rng = jax.random.PRNGKey(0)

    def __call__(self) -> float:
        self.state, m = self.fn(self.state, self.batch, self.rng)
        self.jax.block_until_ready((self.state, m))
        return float(m["loss"])


def timed(fn) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds, loss) of one call."""
    t, c = time.perf_counter(), time.process_time()
    loss = fn()
    return time.perf_counter() - t, time.process_time() - c, loss


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="notes", choices=sorted(SHAPES))
    ap.add_argument("--isa", default="native", choices=sorted(ISA_ENV),
                    help="avx2: restrict jaxmt (XLA) and torch to AVX2 (see above)")
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                    help="auto: bf16 where the CPU (under --isa) has native bf16, else fp32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--src_len", type=int, default=128)
    ap.add_argument("--tgt_len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--label_smoothing", type=float, default=0.0)
    ap.add_argument("--z_loss", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps_per_round", type=int, default=1)
    ap.add_argument("--cores", type=int, default=0,
                    help="run both sides on this many of the allowed cores (0: all); "
                         "--cores 1 compares single-core speed, robust on a shared machine")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    ap.add_argument("--malloc", default="default", choices=("default", "tuned"),
                    help="tuned: keep freed memory for reuse (glibc, both sides; "
                         "see jaxmt/hostmem.py)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.cores:  # before jax and torch start their thread pools (sized from the affinity)
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:a.cores])
    a.threads = a.threads or len(os.sched_getaffinity(0))
    isa_env = apply_isa(a.isa)  # before jax and torch are imported
    from jaxmt.hostmem import keep_freed_memory  # imports no jax

    malloc_tuned = a.malloc == "tuned" and keep_freed_memory()
    load_start = os.getloadavg()[0]

    import jax
    import torch
    import transformers

    import jaxmt
    from jaxmt.config import MeshConfig, ModelConfig, TrainConfig
    from jaxmt.sharding.partitioning import Partitioner
    from jaxmt.train.trainer import Trainer

    hidden = hide_avx512_from_jaxlib() if a.isa == "avx2" else "not needed"
    precision_reason = "set by --precision"
    if a.precision == "auto":  # initialises the backend: after hide_avx512_from_jaxlib
        a.precision, precision_reason = auto_precision(a.isa)
    if hidden != "done" and a.isa == "avx2":
        print(f"warning: AVX-512 not hidden from jaxlib's YNNPACK ({hidden}): its matmuls may "
              "still use AVX-512 kernels")
    # Should jaxmt tune the allocator itself on import, it does so for torch too.
    malloc_tuned = malloc_tuned or bool(getattr(jaxmt, "MALLOC_TUNED", False))
    shape = SHAPES[a.shape]
    total_steps = a.warmup + a.rounds * a.steps_per_round
    model_cfg = ModelConfig(**shape, dropout_rate=0.0, mlp_activations=("gelu", "linear"),
                            precision=a.precision)
    train_cfg = TrainConfig(optimizer="adamw", batch_size=a.batch, steps=max(total_steps, 1000),
                            learning_rate=a.lr, warmup_steps=100, label_smoothing=a.label_smoothing,
                            z_loss=a.z_loss)
    batch = make_batch(a.batch, a.src_len, a.tgt_len, shape["vocab_size"])

    part = Partitioner(MeshConfig(), devices=jax.devices()[:1])
    trainer = Trainer(model_cfg, train_cfg, part, a.src_len, a.tgt_len)
    jstep = JaxStep(trainer, batch, a.batch)
    n_jax = trainer.num_params()

    model, was_tied = build_torch(shape, a.threads)
    n_torch = sum(p.numel() for p in model.parameters())
    # Untied on both sides, so the counts must agree exactly (no tied difference left).
    print(f"parameters: jaxmt {n_jax:,}  torch {n_torch:,}"
          f"{'  (torch lm_head untied by hand)' if was_tied else ''}")
    assert n_jax == n_torch, f"parameter counts differ: jaxmt {n_jax} vs torch {n_torch}"
    try:  # same starting weights: the first-step losses then check the two models agree
        copy_jaxmt_weights(model, jax.device_get(jstep.state.params))
        weights_copied = True
    except KeyError as e:  # a renamed parameter: time anyway, but say the check is off
        print(f"warning: jaxmt weights not copied into torch ({e}); losses will differ")
        weights_copied = False

    sched = trainer.schedule
    lrs = np.asarray([float(sched(i)) for i in range(total_steps + 1)])
    tstep = TorchStep(model, batch, lrs, train_cfg, a.precision)

    # Warm-up: compile and first steps, not timed. The first step's losses (same weights,
    # same batch) check that both sides compute the same function.
    t0 = time.perf_counter()
    jax_loss0 = jstep()
    compile_s = time.perf_counter() - t0
    torch_loss0 = tstep()
    for _ in range(a.warmup - 1):
        jstep()
        tstep()

    times = {"jaxmt": [], "torch": []}
    cpu = {"jaxmt": [], "torch": []}
    sides = {"jaxmt": jstep, "torch": tstep}
    for r in range(a.rounds):
        order = ("torch", "jaxmt") if r % 2 == 0 else ("jaxmt", "torch")
        for name in order:
            for _ in range(a.steps_per_round):
                dt, dc, loss = timed(sides[name])
                assert np.isfinite(loss), (name, loss)
                times[name].append(dt)
                cpu[name].append(dc)

    tokens = a.batch * (a.src_len + a.tgt_len)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "jaxmt_tokens_per_s": round(tokens / med["jaxmt"], 1),
        "torch_tokens_per_s": round(tokens / med["torch"], 1),
        "ratio_vs_torch": round(med["torch"] / med["jaxmt"], 3),
        "jaxmt_step_s": round(med["jaxmt"], 4), "torch_step_s": round(med["torch"], 4),
        # Best-of figures: less sensitive to other processes sharing the cores.
        "ratio_vs_torch_best": round(min(times["torch"]) / min(times["jaxmt"]), 3),
        "jaxmt_step_s_min": round(min(times["jaxmt"]), 4),
        "torch_step_s_min": round(min(times["torch"]), 4),
        "jaxmt_step_s_all": [round(x, 4) for x in times["jaxmt"]],
        "torch_step_s_all": [round(x, 4) for x in times["torch"]],
        # Process CPU time per step (all threads): less sensitive to other processes than
        # wall time, but it also counts threads spinning while they wait for work.
        "jaxmt_cpu_s": round(statistics.median(cpu["jaxmt"]), 4),
        "torch_cpu_s": round(statistics.median(cpu["torch"]), 4),
        "ratio_vs_torch_cpu": round(statistics.median(cpu["torch"])
                                    / statistics.median(cpu["jaxmt"]), 3),
        "jaxmt_compile_s": round(compile_s, 1),
        "jaxmt_first_loss": round(jax_loss0, 4), "torch_first_loss": round(torch_loss0, 4),
        "same_initial_weights": weights_copied,
        "shape": a.shape, **shape, "params": n_jax, "batch": a.batch, "src_len": a.src_len,
        "tgt_len": a.tgt_len, "tokens_per_step": tokens, "precision": a.precision,
        "precision_reason": precision_reason,
        "isa": a.isa, "isa_env": isa_env, "jaxlib_avx512_hidden": hidden,
        "cpu_avx512": "avx512f" in cpu_flags(), "cores": sorted(os.sched_getaffinity(0)),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "optimizer": "adamw", "lr": a.lr, "malloc_tuned": malloc_tuned,
        "label_smoothing": a.label_smoothing,
        "z_loss": a.z_loss, "timed_steps_per_side": a.rounds * a.steps_per_round,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "jax": jax.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "platform": jax.devices()[0].platform,
        # Other processes on the same cores skew both sides; the ratio is the robust figure.
        "loadavg_1m_start": round(load_start, 2), "loadavg_1m_end": round(os.getloadavg()[0], 2),
    }
    print(f"{a.shape} shape ({n_jax / 1e6:.1f}M parameters), {a.precision}, ISA {a.isa} (torch "
          f"{res['torch_cpu_capability']}"
          f"{', AVX-512 hidden from YNNPACK' if hidden == 'done' else ''}), AdamW, batch "
          f"{a.batch} x ({a.src_len} + {a.tgt_len}) tokens, {res['timed_steps_per_side']} timed "
          f"steps per side, torch {res['torch_threads']} threads, {res['platform']}"
          f"{', malloc tuned' if malloc_tuned else ''}")
    print(f"  precision        : {a.precision} ({precision_reason})")
    print(f"  first-step loss  : jaxmt {jax_loss0:.4f}  torch {torch_loss0:.4f}")
    for k in ("jaxmt", "torch"):
        print(f"  {k:<6} median   : {med[k] * 1e3:7.0f} ms/step  "
              f"{res[f'{k}_tokens_per_s']:>8.1f} tokens/s")
    print(f"  ratio vs torch   : {res['ratio_vs_torch']:.2f}x median, "
          f"{res['ratio_vs_torch_best']:.2f}x best-of, {res['ratio_vs_torch_cpu']:.2f}x in CPU "
          f"time (load average {res['loadavg_1m_end']})")
    # This run alone keeps the load near the core count; well above it, something else ran.
    if res["loadavg_1m_end"] > (os.cpu_count() or 1) + 0.75:
        # torch's OpenMP threads slow down far more than XLA's when a core is taken
        # (seen here: 1.8 s -> 26 s per step against 1.2 s -> 2.2 s), inflating the ratio.
        print("  warning: other processes were using the CPUs; these figures are unreliable")
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
