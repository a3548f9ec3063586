"""Per-device temporaries of one training step, by simulating its buffers' lifetimes.

A second, structural predictor beside :func:`jaxmt.plan.memory.predict_memory`'s fitted
factors, with no fitted number. ``benchmarks/planner_accuracy.py`` measures both against
XLA in one run; the planner does not use this one yet (a trace costs 1 to 15 seconds,
against the ranking's budget of well under one per candidate).

The step (:meth:`jaxmt.train.trainer.Trainer._train_step`: gradients and the optimizer
update) is traced with ``jax.make_jaxpr`` (no compile) for a proxy model whose every
dimension has its own size, on one device, with the target's kernels. Its equations then
run in program order, nested calls inlined: a stored value is allocated when produced
and freed after its last use, and the peak of live bytes is the prediction of XLA's
temporaries. Each value's shape names its dimensions (as in
:func:`jaxmt.plan.memory.residual_kinds`), so its bytes are computed for the real model
and split as the candidate's mesh splits it. What XLA does, as the simulation models it:

* Fusion. TPU and GPU fuse element-wise chains into their consumers: an element-wise
  result is not stored, and whatever reads it reads the stored values it is computed
  from, which stay live (so the backward pass recomputes element-wise residuals from the
  matmul outputs). XLA's CPU backend stores every element-wise result that more than one
  op, or a non-element-wise op, reads.
* Views (reshapes, sharding constraints, names, same-type casts) are their input.
* FSDP. A sharded parameter a matmul reads is gathered whole over ``fsdp``, and the
  gathered copy lives from its first to its last use (XLA reuses it in the backward
  pass). A weight-shaped matmul output (a gradient) is whole on CPU, which makes no
  reduce-scatter; on TPU it is whole only while the matmul runs, then kept sharded.
* Loops (``lax.scan``). The stacked outputs are allocated for the whole loop, the carries
  are updated in place, and the body's own peak is added while the loop runs. Casts of
  the stacked parameters are hoisted out of the loop: one stacked copy per dtype, shared
  by every scan over the same parameters. Casts and gathers of a loop's constants (the
  parameters, in the microbatch loop) move out of it, as XLA's loop-invariant code
  motion moves them. A value a loop carries, or a kernel reads, is stored even where a
  fusion would otherwise recompute it.
* ``offload``. Inside a scan, what the remat policy sends to host memory takes no device
  memory. Unrolled, XLA keeps it in device memory (measured: 1B on v5p, 85%). Scanned,
  every compile measured kept part of it in device memory (a share from about half to
  three quarters), which this under-predicts (by 40% to 53% of the step).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

from jaxmt.kernels.common import tracing_for
from jaxmt.plan import memory
from jaxmt.plan.workload import Candidate, Workload
from jaxmt.sharding import axes
from jaxmt.sharding.partitioning import Partitioner
from jaxmt.train.trainer import Trainer

# Proxy sizes: all distinct and above any layer or microbatch count (up to 24), so a
# dimension's size names it. Letters as in jaxmt.plan.memory: b batch rows (of one
# microbatch), s/t source/target length, e embed, h heads, d head size, f MLP units,
# v vocabulary, r relative-position buckets.
PROXY = {"b": 37, "s": 40, "t": 56, "e": 44, "h": 31, "d": 26, "f": 52, "v": 136, "r": 33}
_LETTER = {size: letter for letter, size in PROXY.items()}
SMALL = 24  # sizes up to this are layer or microbatch counts, kept as they are

VIEWS = {"name", "sharding_constraint", "reshape", "squeeze", "expand_dims", "copy",
         "copy_p", "optimization_barrier"}
ELEMENTWISE = VIEWS | set("""
    add sub mul div neg exp exp2 log log1p tanh logistic max min select_n
    convert_element_type integer_pow sqrt rsqrt pow abs sign eq ne lt gt le ge and or not
    xor broadcast_in_dim iota stop_gradient erf erf_inv is_finite nextafter rem floor ceil
    round clamp square sin cos atan2 shift_left shift_right_logical
    shift_right_arithmetic random_bits random_wrap random_unwrap random_seed
    threefry2x32 cumsum""".split())
# Ops whose operands must be buffers (no fusion reaches into them).
_STORES_OPERANDS = {"scan", "while", "cond", "pallas_call", "custom_call", "tpu_custom_call",
                    "all_gather", "psum", "reduce_scatter", "sort", "device_put"}
_INLINE = ("pjit", "closed_call", "remat", "checkpoint", "custom_jvp_call",
           "custom_vjp_call", "core_call")


def dimension_letters(shape: tuple[int, ...]) -> tuple[str, ...]:
    """Each dimension of a proxy shape as letters: one (``"e"``), the batch with a count
    (``"b2"``: two microbatches' rows), a product (``"hd"``), or the count itself."""
    out = []
    for n in shape:
        if n in _LETTER:
            out.append(_LETTER[n])
        elif n <= SMALL:
            out.append(str(n))
        elif n % PROXY["b"] == 0 and n // PROXY["b"] <= SMALL:
            out.append("b" + str(n // PROXY["b"]))
        else:
            out.append(_product(n))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _product(n: int) -> str:
    for k in (2, 3):
        for combo in itertools.combinations_with_replacement(PROXY, k):
            if math.prod(PROXY[c] for c in combo) == n:
                return "".join(combo)
    return str(n)  # not the proxy's: counted at its own size


class _Buffer:
    """One value in the simulation: an equation's output (one per call of an inlined
    jaxpr), or a copy the program does not name (gathered or hoisted)."""

    def __init__(self, shape: tuple[int, ...], dtype: Any):
        self.aval = jax.ShapeDtypeStruct(shape, np.dtype(dtype))


@dataclasses.dataclass
class _Op:
    name: str
    reads: list  # buffers
    makes: list  # buffers allocated here
    body: "_Program | None" = None  # a loop's body, whose peak adds while it runs


@dataclasses.dataclass
class _Program:
    ops: list
    keep: set  # buffers that are not temporaries (arguments, results, loop outputs)
    whole: set  # weight-shaped buffers whole over fsdp


# ---------------------------------------------------------------------------------------
# Tracing and flattening.

@functools.lru_cache(maxsize=64)
def _trace(model, train, microbatches: int, platform: str):
    """The proxy's step as a ClosedJaxpr (one device: shapes are global; the mesh is
    applied by :func:`_bytes`)."""
    p = PROXY
    proxy = memory.proxy_model(model, p)
    rows = p["b"] * microbatches
    train = dataclasses.replace(train, batch_size=rows, num_microbatches=microbatches)
    part = Partitioner(devices=jax.devices()[:1])
    with tracing_for(platform):
        trainer = Trainer(proxy, train, part, p["s"], p["t"])
        batch = {k: jax.ShapeDtypeStruct((rows, p["s"] if k.startswith("encoder") else p["t"]),
                                         jnp.int32) for k in trainer._dummy}
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
        with part._scope():
            return jax.make_jaxpr(trainer._train_step)(trainer.abstract_state, batch, rng)


def _weightlike(x) -> bool:
    shape = getattr(getattr(x, "aval", None), "shape", ())
    return len(shape) >= 2 and not any(l.startswith("b") for l in dimension_letters(shape))


class _Flattener:
    """Turns a jaxpr into a :class:`_Program` under the rules of the module docstring."""

    def __init__(self, kind: str, gathers: bool):
        self.fuses = kind != "cpu"  # TPU and GPU fuse element-wise chains
        self.kind, self.gathers = kind, gathers
        self.whole: set = set()
        self.sharded: set = set()  # weight-shaped buffers laid out like the parameters
        self.sources: dict = {}  # a fused element-wise value -> the stored values it reads
        self.host: set = set()
        self.hoisted: dict = {}
        self.scans: list = []  # (body invars, casts of them seen) of the enclosing scans

    def program(self, jaxpr) -> _Program:
        """The step: its arguments and results are not temporaries (the results are
        written into the donated arguments); what a fused result is computed from lives
        to the end."""
        prog, results = self._sub(jaxpr)
        prog.ops.append(_Op("results", self._reads(results), []))
        return prog

    def _reads(self, values) -> list:
        out = []
        for x in values:
            if x is not None:
                out.extend(self.sources.get(x, [x]))
        return out

    def _flatten(self, jaxpr, env: dict, ops: list) -> None:
        get = lambda v: None if isinstance(v, Literal) else env.get(v, v)  # noqa: E731
        for eqn in jaxpr.eqns:
            p = eqn.primitive.name
            ins = [get(v) for v in eqn.invars]
            # Fresh values per equation: an inlined jaxpr may be called from several
            # places (jax caches them), and each call makes its own buffers.
            outs = [_Buffer(v.aval.shape, v.aval.dtype) if hasattr(v.aval, "shape") else v
                    for v in eqn.outvars]
            env.update(zip(eqn.outvars, outs))
            out0 = outs[0] if outs else None
            if p in _INLINE or (p not in ("scan", "while", "cond", "pallas_call")
                                and any(k in eqn.params for k in ("jaxpr", "call_jaxpr"))):
                sub = next(eqn.params[k] for k in ("call_jaxpr", "fun_jaxpr", "jaxpr")
                           if k in eqn.params)
                inner = getattr(sub, "jaxpr", sub)
                inner_env = dict(zip(inner.invars, ins))
                self._flatten(inner, inner_env, ops)
                for ov, iv in zip(eqn.outvars, inner.outvars):
                    env[ov] = None if isinstance(iv, Literal) else inner_env.get(iv, iv)
                continue
            if (p == "convert_element_type" and self.scans and ins[0] in self.scans[-1][0]
                    and _weightlike(ins[0]) and out0.aval.dtype != eqn.invars[0].aval.dtype):
                self.scans[-1][1].append((ins[0], out0.aval.dtype))
            if p == "device_put" and "Host" in str(eqn.params.get("devices")):
                if self.scans or self.kind == "cpu":  # to host memory: no device bytes
                    ops.append(_Op("to_host", self._reads(ins), []))
                    self.host.update(outs)
                else:  # unrolled on TPU/GPU: XLA keeps the copy in device memory
                    env[eqn.outvars[0]] = ins[0]
                continue
            same_type = (p == "convert_element_type"
                         and out0.aval.dtype == eqn.invars[0].aval.dtype)
            if (p in VIEWS or same_type) and ins and ins[0] is not None:
                if p == "sharding_constraint" and ins[0] in self.whole:
                    ops.append(_Op("reshard", self._reads(ins), [out0]))  # whole -> shard
                    self.sharded.add(out0)
                else:
                    env[eqn.outvars[0]] = ins[0]
                continue
            if self.gathers and p in ("dot_general", "gather", "conv_general_dilated"):
                ins = [self._gathered(x, ops) if x in self.sharded else x for x in ins]
            if p in ELEMENTWISE and out0 is not None:
                if any(x in self.whole for x in ins) and _weightlike(out0):
                    self.whole.add(out0)
                elif any(x in self.sharded for x in ins) and _weightlike(out0):
                    self.sharded.add(out0)
                if self.fuses and out0 not in self.whole:
                    self.sources[out0] = list(dict.fromkeys(self._reads(ins)))
                    continue
            if self.fuses and p in _STORES_OPERANDS:
                # A loop's state, a kernel's operands: buffers, so a fused value that
                # reaches one is stored here.
                for x in ins:
                    if x in self.sources:
                        ops.append(_Op("store", self.sources.pop(x), [x]))
            body, makes, extra = None, list(outs), []
            if p == "dot_general" and _weightlike(out0):
                (self.whole if self.kind == "cpu" else self.sharded).add(out0)
            if p == "scan":
                body, makes, extra = self._scan(eqn, ins, outs, env, ops)
            elif p == "while":
                body = self._sub(eqn.params["body_jaxpr"].jaxpr)[0]
                skip = eqn.params["body_nconsts"] + eqn.params["cond_nconsts"]
                for ov, x in zip(eqn.outvars, ins[skip:]):  # carries: in place
                    env[ov] = x
                makes = []
            elif p == "cond":
                bodies = [self._sub(b.jaxpr)[0] for b in eqn.params["branches"]]
                body = _Program([_Op("branches", [], [], b) for b in bodies], set(), self.whole)
            ops.append(_Op(p, extra + self._reads(ins), makes, body))

    def _gathered(self, x, ops: list):
        """The whole-over-fsdp copy of sharded parameter ``x`` (one per parameter)."""
        if x not in self.hoisted:
            g = _Buffer(x.aval.shape, x.aval.dtype)
            self.whole.add(g)
            self.hoisted[x] = g
            ops.append(_Op("all_gather", [x], [g]))
        return self.hoisted[x]

    def _sub(self, jaxpr) -> tuple[_Program, list]:
        """A jaxpr whose inputs and outputs live outside it (a loop body: outputs are
        written into the loop's buffers), and its outputs' values."""
        self.sharded.update(v for v in jaxpr.invars if _weightlike(v) and v not in self.whole)
        ops: list = []
        env: dict = {}
        self._flatten(jaxpr, env, ops)
        results = [None if isinstance(v, Literal) else env.get(v, v) for v in jaxpr.outvars]
        keep = set(jaxpr.invars) | {v for v in results if v is not None}
        return _Program(ops, keep, self.whole), results

    def _scan(self, eqn, ins, outs, env, ops):
        body_jaxpr = eqn.params["jaxpr"].jaxpr
        consts, carries = eqn.params["num_consts"], eqn.params["num_carry"]
        self.scans.append((set(body_jaxpr.invars), []))
        body, results = self._sub(body_jaxpr)
        casts = self.scans.pop()[1]
        for ov, x in zip(eqn.outvars[:carries], ins[consts:consts + carries]):
            env[ov] = x  # carries are updated in place
        ys = results[carries:]
        makes = [o for o, y in zip(outs[carries:], ys) if y not in self.host]
        extra = []
        if self.fuses:  # casts of stacked parameters: hoisted, one copy per dtype
            for bv, dtype in casts:
                j = body_jaxpr.invars.index(bv)
                src = ins[j]
                if j < consts + carries or src is None:
                    continue
                key = (src, np.dtype(dtype).name)
                if key not in self.hoisted:
                    self.hoisted[key] = _Buffer(src.aval.shape, dtype)
                    ops.append(_Op("hoisted_cast", [src], [self.hoisted[key]]))
                extra.append(self.hoisted[key])
            extra += self._hoist_invariant(body, body_jaxpr.invars[:consts], ins[:consts], ops)
        return body, makes, extra

    def _hoist_invariant(self, body: _Program, invars, sources, ops: list) -> list:
        """Moves the body's casts and gathers of loop-invariant inputs (the loop's
        constants: the parameters, in the microbatch loop) out of the loop, as XLA's
        loop-invariant code motion does: they then live for the whole loop."""
        outer = dict(zip(invars, sources))
        moved = []
        for op in list(body.ops):
            if op.name not in ("hoisted_cast", "all_gather") or not op.reads:
                continue
            if not all(outer.get(x) is not None for x in op.reads):
                continue
            src = outer[op.reads[0]]
            (made,) = op.makes
            key = (src, op.name, made.aval.dtype.name)
            if key not in self.hoisted:
                self.hoisted[key] = _Buffer(src.aval.shape, made.aval.dtype)
                if made in self.whole:
                    self.whole.add(self.hoisted[key])
                ops.append(_Op(op.name, [src], [self.hoisted[key]]))
            body.ops.remove(op)  # its readers in the body read a buffer made outside
            body.keep.add(made)
            moved.append(self.hoisted[key])
        return moved


# ---------------------------------------------------------------------------------------
# The simulation.

def _peak(program: _Program, nbytes) -> float:
    """Peak bytes of live temporaries over ``program``, in order; a loop's or branch's
    own peak adds while it runs."""
    last, readers = {}, collections.defaultdict(list)
    for i, op in enumerate(program.ops):
        for x in op.reads:
            last[x] = i
            readers[x].append(op.name)
    frees = collections.defaultdict(list)
    live = peak = 0.0
    for i, op in enumerate(program.ops):
        for x in op.makes:
            if x in program.keep:
                continue
            # An element-wise result that only one element-wise op reads is fused into
            # it (what still reaches here on CPU, or whole-over-fsdp on TPU).
            r = readers.get(x, ())
            if op.name in ELEMENTWISE and len(r) == 1 and r[0] in ELEMENTWISE:
                continue
            size = nbytes(x)
            live += size
            frees[last.get(x, i)].append(size)
        inner = 0.0
        if op.body is not None:
            inner = (max((_peak(o.body, nbytes) for o in op.body.ops), default=0.0)
                     if op.body.ops and op.body.ops[0].name == "branches"
                     else _peak(op.body, nbytes))
        if op.name == "dot_general" and op.makes and nbytes.transient_whole(op.makes[0]):
            inner += nbytes(op.makes[0], whole=True)
        peak = max(peak, live + inner)
        live -= sum(frees.pop(i, ()))
    return peak


class _Sizer:
    """Bytes per device of a proxy value, for the real model under a candidate's mesh."""

    def __init__(self, w: Workload, c: Candidate, kind: str, whole: set):
        s = c.sizes
        self.dims = memory.dimension_sizes(w, c)
        self.batch_split = math.prod(s[a] for a in axes.BATCH_MESH_AXES)
        self.fsdp = s["fsdp"] if c.shard_params else 1
        self.tensor = s["tensor"]
        self.kind, self.whole = kind, whole
        self.cache: dict = {}

    def transient_whole(self, x) -> bool:
        """A weight-shaped matmul output on TPU/GPU: whole while the matmul runs."""
        return self.kind != "cpu" and self.fsdp > 1 and _weightlike(x)

    def __call__(self, x, whole: bool = False) -> float:
        key = (id(x), whole)
        if key not in self.cache:
            self.cache[key] = self._bytes(x, whole or x in self.whole)
        return self.cache[key]

    def _bytes(self, x, whole: bool) -> float:
        aval = x.aval
        if not hasattr(aval, "shape"):
            return 0.0
        letters = dimension_letters(aval.shape)
        n = 1.0
        for group in letters:
            if group.isdigit():
                n *= int(group)
            elif group.startswith("b") and group[1:].isdigit():
                n *= self.dims["b"] * int(group[1:])
            else:
                n *= math.prod(self.dims[c] for c in group)
        flat = "".join(letters)
        split = self.tensor if any(c in flat for c in "hfv") else 1
        if "b" in flat:
            split *= self.batch_split
        elif "e" in flat and not whole:
            split *= self.fsdp
        itemsize = np.dtype(aval.dtype).itemsize
        if self.kind == "cpu":  # XLA's CPU backend upcasts 16-bit work
            itemsize = max(itemsize, 4)
        return n / split * itemsize


@functools.lru_cache(maxsize=256)
def _program(model, train, microbatches: int, kind: str, gathers: bool) -> _Program:
    closed = _trace(model, train, microbatches, kind)  # a kind is a platform
    return _Flattener(kind, gathers).program(closed.jaxpr)


def simulate_temporaries(w: Workload, c: Candidate, kind: str) -> float:
    """Predicted bytes of XLA's temporaries per device for ``w``'s step under ``c`` on a
    ``kind`` ("cpu", "tpu" or "gpu") target: the peak of the simulated step. No compile;
    the trace is cached per model, remat policies, attention, layers and microbatches.
    ``kind`` has no default: it picks the kernels traced and XLA's rules (as
    :func:`jaxmt.plan.memory.residual_kinds`' platform)."""
    wc = c.apply(w)
    gathers = c.sizes["fsdp"] > 1 and c.shard_params
    prog = _program(wc.model, wc.train, c.num_microbatches, kind, gathers)
    return _peak(prog, _Sizer(w, c, kind, prog.whole))
