"""Meshes over 8 fake devices, the logical-axis rule table, the sharding of every
parameter under each mesh preset (golden files), the errors raised before compiling,
and a sharded train step that runs unchanged on 1 and on 8 devices.

Golden files: ``tests/golden/sharding/<preset>.txt`` list every parameter's
PartitionSpec (and its AdamW moments') under ``gin_configs/mesh/<preset>.gin``. A change
to the rule table, the presets or the model's parameter names fails
``test_sharding_matches_golden`` with a diff; if the change is intended, regenerate with

    JAXMT_UPDATE_GOLDEN=1 .venv/bin/pytest -q tests/test_partitioning.py -k golden

and commit the new files with the change, so review sees the sharding diff.
"""

import difflib
import math
import os
from pathlib import Path

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxmt.sharding import axes
from jaxmt.config import MeshConfig, ModelConfig, TrainConfig
from jaxmt.gin_files import GIN_DIR, MESH_PRESETS, mesh_preset
from jaxmt.modeling.model import EncoderDecoderModel
from jaxmt.sharding.partitioning import Partitioner, resolve_mesh_shape, resolve_rules
from jaxmt.train.trainer import Trainer

CFG = ModelConfig(vocab_size=256, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                  num_encoder_layers=1, num_decoder_layers=1, precision="fp32")

REPO = Path(__file__).resolve().parent.parent
GOLDEN_DIR = REPO / "tests" / "golden" / "sharding"
UPDATE_GOLDEN = os.environ.get("JAXMT_UPDATE_GOLDEN", "") not in ("", "0")
PRESETS = ("dp", "zero1", "fsdp", "tp", "fsdp_tp")
# A complete T5.1.1 stack (gated GELU MLP, relative position biases, untied logits) whose
# heads, MLP units and vocabulary divide by 8, so `tp` can use all 8 devices.
GOLDEN_MODEL = dict(vocab_size=256, emb_dim=64, num_heads=8, head_dim=8, mlp_dim=128,
                    num_encoder_layers=2, num_decoder_layers=2, precision="fp32")
GOLDEN_TRAIN = dict(optimizer="adamw", batch_size=8)
# name -> (preset, extra ModelConfig fields); each is tests/golden/sharding/<name>.txt.
GOLDENS = {**{p: (p, {}) for p in PRESETS},
           "fsdp_tp_scan_layers": ("fsdp_tp", {"scan_layers": True})}
MESH_SIZES = {"dp": (1, 8, 1, 1), "zero1": (1, 1, 8, 1), "fsdp": (1, 1, 8, 1),
              "tp": (1, 1, 1, 8), "fsdp_tp": (1, 1, 4, 2)}
# What the issue asks of each preset, written out by hand (not derived from the rule
# table): logical axis -> mesh axis, for the parameters and for the optimizer state.
TP = {"heads": "tensor", "mlp": "tensor", "vocab": "tensor"}
EXPECTED = {"dp": ({}, {}),
            "zero1": ({}, {"embed": "fsdp"}),
            "fsdp": ({"embed": "fsdp"}, {"embed": "fsdp"}),
            "tp": (TP, TP),
            "fsdp_tp": ({**TP, "embed": "fsdp"}, {**TP, "embed": "fsdp"})}


def test_eight_fake_devices():
    assert jax.device_count() == 8


def test_mesh_shape_resolution_and_errors():
    assert resolve_mesh_shape(MeshConfig(), 8) == (1, 8, 1, 1)
    assert resolve_mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (1, 2, 2, 2)
    assert resolve_mesh_shape(MeshConfig(replica=2, data=-1), 8) == (2, 4, 1, 1)
    assert resolve_mesh_shape(MeshConfig(replica=-1, data=2), 8) == (4, 2, 1, 1)
    with pytest.raises(ValueError, match="at most one axis"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="integers >= 1 or -1"):
        MeshConfig(data=0)


# ---------------------------------------------------------------------------------------
# The rule table.


def _spec_from_rules(names, sizes, drop=()):
    """Expected spec, computed independently of the Partitioner: the full rule table
    matched first-to-last (a rule takes an unassigned dimension if its mesh axes are still
    free in this array), then mesh axes of size 1 (and those in ``drop``) struck out."""
    used, out = set(), [None] * len(names)
    done = [False] * len(names)
    for name, mesh in axes.RULES:
        if name not in names or done[names.index(name)]:
            continue
        ms = () if mesh is None else (mesh,) if isinstance(mesh, str) else tuple(mesh)
        if used & set(ms):
            continue
        i = names.index(name)
        done[i], used = True, used | set(ms)
        kept = tuple(a for a in ms if sizes[a] > 1 and a not in drop)
        out[i] = None if not kept else kept[0] if len(kept) == 1 else kept
    return P(*out)


def test_rule_table_names_each_axis_once_and_only_mesh_axes():
    names = [n for n, _ in axes.RULES]
    # With one rule per name, dropping size-1 axes before matching (resolve_rules) gives
    # exactly the full table's specs with those axes struck out; with fallback rules for
    # a name it may not (a dropped rule still wins over the fallback).
    assert len(names) == len(set(names)), "a logical axis has two rules"
    for _, mesh in axes.RULES:
        for a in (() if mesh is None else (mesh,) if isinstance(mesh, str) else mesh):
            assert a in axes.MESH_AXES
    assert dict(axes.RULES)[axes.ACT_BATCH] == axes.BATCH_MESH_AXES


def test_resolve_rules_drops_size_one_axes():
    rules = dict(resolve_rules(axes.RULES, dict(replica=1, data=2, fsdp=1, tensor=4)))
    assert rules[axes.ACT_BATCH] == "data"  # (replica, data, fsdp) cut down to one axis
    assert rules[axes.EMBED] is None  # fsdp = 1: the rule stays, replicated
    assert rules[axes.HEADS] == "tensor"
    rules = dict(resolve_rules(axes.RULES, dict(replica=2, data=1, fsdp=2, tensor=1)))
    assert rules[axes.ACT_BATCH] == ("replica", "fsdp")  # partly dropped, still a tuple
    assert rules[axes.EMBED] == "fsdp" and rules[axes.HEADS] is None
    rules = dict(resolve_rules(axes.RULES, dict(replica=2, data=2, fsdp=2, tensor=2)))
    assert rules == dict(axes.RULES)  # nothing of size 1: the table unchanged
    # `drop` (ZeRO-1's parameter rules): fsdp removed even though it has 4 devices.
    rules = dict(resolve_rules(axes.RULES, dict(replica=1, data=2, fsdp=4, tensor=1),
                               drop=("fsdp",)))
    assert rules[axes.EMBED] is None and rules[axes.ACT_BATCH] == "data"
    # Order, names and length are kept: it is still the one ordered table.
    assert [n for n, _ in resolve_rules(axes.RULES, dict.fromkeys(axes.MESH_AXES, 1))] == [
        n for n, _ in axes.RULES]


def test_resolve_rules_first_match():
    table = (("a", "fsdp"), ("b", "fsdp"), ("b", "tensor"), ("c", ("data", "tensor")))
    spec = lambda names, sizes: nn.logical_to_mesh_axes(names, resolve_rules(table, sizes))
    big = dict(replica=1, data=2, fsdp=2, tensor=2)
    assert spec(("a", "b"), big) == P("fsdp", "tensor")  # fsdp taken by `a`: next rule
    # The table's order decides, not the array's: `a`'s rule comes first either way.
    assert spec(("b", "a"), big) == P("tensor", "fsdp")
    assert spec(("b",), big) == P("fsdp")
    assert spec(("c", "b"), big) == P(("data", "tensor"), "fsdp")
    assert spec(("b", "c"), big) == P("fsdp", ("data", "tensor"))
    # A rule whose axes are all size 1 maps its name to None and still wins over later
    # rules for that name (documented in resolve_rules).
    small = dict(replica=1, data=1, fsdp=1, tensor=2)
    assert spec(("b",), small) == P(None)
    assert spec(("c",), small) == P("tensor")  # (data, tensor) cut down to tensor


def test_batch_spec_over_every_data_like_axis():
    for mesh, want in [(MeshConfig(), P("data", None)),
                       (MeshConfig(data=1, fsdp=-1), P("fsdp", None)),
                       (MeshConfig(data=1, tensor=-1), P(None, None)),
                       (MeshConfig(replica=2, data=-1), P(("replica", "data"), None)),
                       (MeshConfig(replica=2, data=2, fsdp=2), P(("replica", "data", "fsdp"),
                                                                  None))]:
        p = Partitioner(mesh)
        assert p.batch_spec == want, mesh
        assert p.data_parallel_size == math.prod(p.sizes[a] for a in axes.BATCH_MESH_AXES)


# warmup_steps=1: the first update has learning rate 0, the second the peak, so the
# parameters after two steps show whether the update itself matches.
STEP_TC = TrainConfig(batch_size=8, learning_rate=1e-3, warmup_steps=1, steps=10)


@pytest.fixture(scope="module")
def mesh_222():
    """A data=2, fsdp=2, tensor=2 Trainer and its state, initialised in its shards."""
    p = Partitioner(MeshConfig(data=2, fsdp=2, tensor=2))
    tr = Trainer(CFG, STEP_TC, p, 8, 8)
    state = tr.init_state(0)
    return tr, state, jax.device_get(state)


@pytest.mark.slow
def test_param_shardings_follow_rules(mesh_222):
    tr, state, _ = mesh_222
    p = tr.partitioner
    boxed = p.eval_shape(tr._init_boxed, jax.random.PRNGKey(0)).params
    flat_boxed = jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    flat_real = dict(jax.tree_util.tree_leaves_with_path(state.params))
    assert len(flat_boxed) == len(flat_real)
    for path, box in flat_boxed:
        arr = flat_real[path]
        assert arr.sharding.spec == _spec_from_rules(box.names, p.sizes), (path, box.names)
    emb = state.params["token_embed"]["embedding"]
    assert emb.sharding.spec == P("tensor", "fsdp")
    # A (vocab, embed) table split 2 x 2 and replicated over data: each shard is 1/4.
    assert emb.addressable_shards[0].data.shape == (256 // 2, 32 // 2)


# ---------------------------------------------------------------------------------------
# Golden sharding files, one per mesh preset.


def _preset_mesh(preset: str) -> MeshConfig:
    """The preset loaded the way a run loads it: gin parses the real file."""
    gin.clear_config()
    try:
        gin.parse_config_file(str(GIN_DIR / "mesh" / f"{preset}.gin"))
        return MeshConfig()
    finally:
        gin.clear_config()


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _fmt_spec(spec: P, ndim: int) -> str:
    entries = list(spec) + [None] * (ndim - len(spec))
    fmt = lambda e: "None" if e is None else e if isinstance(e, str) else f"({', '.join(e)})"
    return f"P({', '.join(fmt(e) for e in entries)})"


def _under_attr(tree, attr: str) -> dict:
    """Leaves of ``tree`` below a ``.attr`` node (e.g. AdamW's ``mu``), keyed by the path
    after it (the parameter's path)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [getattr(k, "name", None) for k in path]
        if attr in names:
            out[path[names.index(attr) + 1:]] = leaf
    return out


def _sharding_table(mesh_cfg: MeshConfig, model_kw: dict) -> dict:
    """Everything the golden file shows and the property tests check, from the Trainer's
    own shardings (``state_shardings``, ``grad_shardings``); no array is initialised."""
    p = Partitioner(mesh_cfg)
    tr = Trainer(ModelConfig(**model_kw), TrainConfig(**GOLDEN_TRAIN), p, 8, 8)
    boxed = p.eval_shape(tr._init_boxed, jax.random.PRNGKey(0)).params
    params = dict(jax.tree_util.tree_flatten_with_path(tr.state_shardings.params)[0])
    grads = dict(jax.tree_util.tree_flatten_with_path(tr.grad_shardings)[0])
    mu = _under_attr(tr.state_shardings.opt_state, "mu")
    nu = _under_attr(tr.state_shardings.opt_state, "nu")
    opt_paths = {path for path, _ in jax.tree_util.tree_flatten_with_path(
        tr.state_shardings.opt_state)[0]}
    rows = []
    for path, box in jax.tree_util.tree_leaves_with_path(
            boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
        assert isinstance(box, nn.LogicallyPartitioned), f"{_path_str(path)} has no axis names"
        rows.append(dict(path=_path_str(path), shape=tuple(box.value.shape),
                         names=tuple(box.names), param=params[path], grad=grads[path],
                         mu=mu[path], nu=nu[path]))
    assert len(rows) == len(params) == len(mu) == len(nu)
    # Optimizer leaves that are not a moment of a parameter (the step count): replicated.
    moments = {k for k in opt_paths if any(getattr(x, "name", None) in ("mu", "nu") for x in k)}
    others = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
        tr.state_shardings.opt_state)[0] if path not in moments]
    return dict(partitioner=p, trainer=tr, rows=rows, other_opt=others)


def _golden_text(name: str) -> str:
    preset, extra = GOLDENS[name]
    mesh_cfg = _preset_mesh(preset)
    model_kw = {**GOLDEN_MODEL, **extra}
    t = _sharding_table(mesh_cfg, model_kw)
    p, rows = t["partitioner"], t["rows"]
    kw = lambda d: ", ".join(f"{k}={v!r}" for k, v in d.items())
    n_total = sum(math.prod(r["shape"]) for r in rows)
    per_device = lambda key: sum(math.prod(r[key].shard_shape(r["shape"])) for r in rows)
    header = [
        f"# Sharding of every parameter under the `{preset}` mesh preset "
        f"(gin_configs/mesh/{preset}.gin), {jax.device_count()} devices.",
        "# Regenerate: JAXMT_UPDATE_GOLDEN=1 .venv/bin/pytest -q tests/test_partitioning.py "
        "-k golden",
        f"# mesh: {', '.join(f'{a}={n}' for a, n in p.sizes.items())}; "
        f"shard_params={mesh_cfg.shard_params}",
        f"# model: ModelConfig({kw(model_kw)})",
        f"# train: TrainConfig({kw(GOLDEN_TRAIN)}); opt state = AdamW mu (nu is the same)",
        f"# batch: {_fmt_spec(p.batch_spec, 2)}",
        f"# elements per device: params {per_device('param')} of {n_total}, "
        f"mu {per_device('mu')} of {n_total}",
        "# rules (first match wins; size-1 mesh axes dropped)"
        + (", params without fsdp:" if p.param_rules != p.rules else ":"),
    ]
    fmt_axes = lambda m: "None" if m is None else m if isinstance(m, str) else f"({', '.join(m)})"
    for (name_, mesh), (_, pmesh) in zip(p.rules, p.param_rules):
        # (param_rules also differ on activation names, which parameters never carry.)
        differs = pmesh != mesh and not name_.startswith("act_")
        extra_col = f"   params: {fmt_axes(pmesh)}" if differs else ""
        header.append(f"#   {name_:<16}{fmt_axes(mesh)}{extra_col}")
    table = [("# path", "shape", "logical axes", "params", "opt state")]
    for r in rows:
        nd = len(r["shape"])
        table.append((r["path"], f"({', '.join(map(str, r['shape']))})",
                      f"({', '.join(r['names'])})", _fmt_spec(r["param"].spec, nd),
                      _fmt_spec(r["mu"].spec, nd)))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    body = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1]
            for row in table]
    return "\n".join(header + body) + "\n"


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_sharding_matches_golden(name):
    path = GOLDEN_DIR / f"{name}.txt"
    got = _golden_text(name)
    if UPDATE_GOLDEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        old = path.read_text() if path.exists() else None
        path.write_text(got)
        print(f"JAXMT_UPDATE_GOLDEN: {'unchanged' if old == got else 'wrote'} {path}")
        return
    assert path.exists(), (f"{path} is missing; create it with JAXMT_UPDATE_GOLDEN=1 "
                           f".venv/bin/pytest -q tests/test_partitioning.py -k golden")
    want = path.read_text()
    if got != want:
        diff = "".join(difflib.unified_diff(
            want.splitlines(keepends=True), got.splitlines(keepends=True),
            fromfile=f"{path.relative_to(REPO)} (golden)", tofile="now"))
        pytest.fail(f"sharding under `{name}` changed:\n{diff}\nIf intended, regenerate with "
                    f"JAXMT_UPDATE_GOLDEN=1 .venv/bin/pytest -q tests/test_partitioning.py "
                    f"-k golden and commit the diff.", pytrace=False)


def test_every_preset_has_a_golden_and_no_strays():
    """A new preset file needs a golden here; every golden file is one this test writes."""
    assert sorted(f.stem for f in (GIN_DIR / "mesh").glob("*.gin")) == sorted(PRESETS)
    assert tuple(MESH_PRESETS) == PRESETS
    assert sorted(f.stem for f in GOLDEN_DIR.glob("*.txt")) == sorted(GOLDENS)


def _axes_named(spec: P) -> list[str]:
    return [a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_sharding_properties(preset):
    """What each preset promises, checked directly (the goldens only show a diff)."""
    mesh_cfg = _preset_mesh(preset)
    assert mesh_cfg == mesh_preset(preset)  # the gin-free reader agrees with gin
    assert mesh_cfg.shard_params == (preset != "zero1")
    t = _sharding_table(mesh_cfg, GOLDEN_MODEL)
    p, rows = t["partitioner"], t["rows"]
    assert p.shape == MESH_SIZES[preset]
    size1 = {a for a, n in p.sizes.items() if n == 1}
    param_map, opt_map = EXPECTED[preset]
    seen = set()
    for r in rows:
        where = f"{preset}: {r['path']} {r['names']}"
        seen |= set(r["names"])
        # No spec ever names a mesh axis of size 1.
        for key in ("param", "grad", "mu", "nu"):
            assert not size1 & set(_axes_named(r[key].spec)), (where, key, r[key].spec)
        want_param = P(*(param_map.get(n) for n in r["names"]))
        want_opt = P(*(opt_map.get(n) for n in r["names"]))
        assert r["param"].spec == want_param, where
        assert r["mu"].spec == want_opt and r["nu"].spec == want_opt, where
        # Gradients are laid out like the optimizer state (ZeRO-1 reduce-scatters them).
        assert r["grad"].spec == r["mu"].spec, where
        # Dropping size-1 axes before matching gives what the full table gives, stripped.
        assert r["param"].spec == _spec_from_rules(
            r["names"], p.sizes, drop=() if mesh_cfg.shard_params else ("fsdp",)), where
        assert r["mu"].spec == _spec_from_rules(r["names"], p.sizes), where
        # Every split dimension divides evenly (shard_shape raises otherwise).
        for key in ("param", "mu"):
            r[key].shard_shape(r["shape"])
    # The model has every parameter axis, so each rule above was exercised.
    assert seen == {"vocab", "embed", "mlp", "heads", "kv", "relpos_buckets"}
    for leaf in t["other_opt"]:
        assert leaf.spec == P() or not _axes_named(leaf.spec)
    assert not size1 & set(_axes_named(p.batch_spec))
    # Per preset, in words.
    specs = [_axes_named(r[k].spec) for r in rows for k in ("param", "mu")]
    if preset == "dp":
        assert not any(specs) and p.batch_spec == P("data", None)
    if preset == "zero1":
        assert not any(_axes_named(r["param"].spec) for r in rows)
        assert all(("fsdp" in _axes_named(r["mu"].spec)) == ("embed" in r["names"])
                   for r in rows)
    if preset in ("fsdp", "fsdp_tp"):
        assert all(("fsdp" in _axes_named(r[k].spec)) == ("embed" in r["names"])
                   for r in rows for k in ("param", "mu"))
    if preset in ("tp", "fsdp_tp"):
        assert all(("tensor" in _axes_named(r["param"].spec))
                   == bool({"heads", "mlp", "vocab"} & set(r["names"])) for r in rows)
    if preset in ("zero1", "fsdp", "fsdp_tp"):
        assert p.batch_spec == P("fsdp", None)
    if preset == "tp":
        assert p.batch_spec == P(None, None)


def test_scanned_layers_stay_unsplit():
    """With scan_layers the stacked `layers` axis is replicated; the rest as unscanned."""
    t = _sharding_table(_preset_mesh("fsdp_tp"), {**GOLDEN_MODEL, "scan_layers": True})
    stacked = [r for r in t["rows"] if r["names"][0] == "layers"]
    assert stacked and all(r["shape"][0] == 2 for r in stacked)
    param_map = EXPECTED["fsdp_tp"][0]
    for r in t["rows"]:
        assert r["param"].spec == P(*(param_map.get(n) for n in r["names"])), r["path"]


# ---------------------------------------------------------------------------------------
# Errors before compiling: each names the field and says what to change.


def _raises(fragments, fn, *args):
    with pytest.raises(ValueError) as e:
        fn(*args)
    for f in fragments:
        assert f in str(e.value), f"{f!r} not in: {e.value}"
    return str(e.value)


def test_mesh_that_does_not_match_the_device_count():
    _raises(["MeshConfig(replica=1, data=2, fsdp=2, tensor=1)", "needs 4 devices but 8",
             "set one axis to -1 or make the product 8"],
            Partitioner, MeshConfig(data=2, fsdp=2, tensor=1))
    _raises(["MeshConfig(replica=2, data=2, fsdp=2, tensor=2)", "needs 16 devices but 8"],
            Partitioner, MeshConfig(replica=2, data=2, fsdp=2, tensor=2))
    # -1 with fixed axes whose product does not divide the device count.
    _raises(["MeshConfig(replica=1, data=-1, fsdp=3, tensor=1)",
             "the fixed axes' product 3 does not divide the 8 devices",
             "make it a divisor of 8"], Partitioner, MeshConfig(data=-1, fsdp=3))
    # Fewer devices than the preset wants (a 4-device host running `fsdp_tp` tensor=8).
    _raises(["needs 8 devices but 4"], Partitioner, MeshConfig(data=1, fsdp=1, tensor=8),
            jax.devices()[:4])


@pytest.mark.parametrize("field,value,mesh,fragments", [
    ("num_heads", 12, MeshConfig(data=1, tensor=8),
     ["ModelConfig.num_heads=12", "`tensor` mesh axis (MeshConfig.tensor=8)",
      "make num_heads a multiple of 8", "or set MeshConfig.tensor=4"]),
    ("mlp_dim", 100, MeshConfig(data=1, tensor=8),
     ["ModelConfig.mlp_dim=100", "(MeshConfig.tensor=8)", "make mlp_dim a multiple of 8",
      "or set MeshConfig.tensor=4"]),
    ("vocab_size", 250, MeshConfig(data=1, fsdp=2, tensor=4),
     ["ModelConfig.vocab_size=250", "(MeshConfig.tensor=4)", "make vocab_size a multiple of 4",
      "or set MeshConfig.tensor=2"]),
    ("emb_dim", 36, MeshConfig(data=1, fsdp=8),
     ["ModelConfig.emb_dim=36", "`fsdp` mesh axis (MeshConfig.fsdp=8)",
      "make emb_dim a multiple of 8", "or set MeshConfig.fsdp=4"]),
    # ZeRO-1 keeps parameters whole but still splits the optimizer state over fsdp.
    ("emb_dim", 36, MeshConfig(data=1, fsdp=8, shard_params=False),
     ["ModelConfig.emb_dim=36", "(MeshConfig.fsdp=8)"]),
])
def test_model_not_divisible_by_the_mesh(field, value, mesh, fragments):
    base = dict(vocab_size=256, emb_dim=32, num_heads=8, head_dim=4, mlp_dim=64,
                num_encoder_layers=1, num_decoder_layers=1, precision="fp32")
    cfg = ModelConfig(**{**base, field: value})
    _raises(fragments, Trainer, cfg, TrainConfig(batch_size=8), Partitioner(mesh), 8, 8)


def test_batch_not_divisible_is_a_clear_error():
    p = Partitioner(MeshConfig(data=4, fsdp=2, tensor=1))
    _raises(["TrainConfig.batch_size=12", "not divisible by replica x data x fsdp = 8",
             "pick a multiple of 8"], Trainer, CFG, TrainConfig(batch_size=12), p, 8, 8)
    p = Partitioner(MeshConfig(replica=2, data=-1))
    _raises(["TrainConfig.batch_size=4", "replica x data x fsdp = 8"],
            Trainer, CFG, TrainConfig(batch_size=4), p, 8, 8)
    # tensor does not split the batch: 2 rows over data=2 x tensor=4 is fine.
    Trainer(CFG, TrainConfig(batch_size=2), Partitioner(MeshConfig(data=2, tensor=4)), 8, 8)


def test_microbatch_not_divisible_is_a_clear_error():
    p = Partitioner(MeshConfig(data=4, fsdp=2, tensor=1))
    _raises(["TrainConfig.batch_size=24",
             "replica x data x fsdp x num_microbatches = 8 x 2", "pick a multiple of 16",
             "or change TrainConfig.num_microbatches"],
            Trainer, CFG, TrainConfig(batch_size=24, num_microbatches=2), p, 8, 8)
    Trainer(CFG, TrainConfig(batch_size=32, num_microbatches=2), p, 8, 8)
    # Not divisible even on one device: the TrainConfig itself refuses.
    _raises(["TrainConfig.num_microbatches", "batch_size=10 is not divisible by "
             "num_microbatches=4", "make batch_size a multiple of 4"], lambda: TrainConfig(batch_size=10, num_microbatches=4))


# ---------------------------------------------------------------------------------------
# One sharded step, the same on one device and on meshes of 8.


def _batch(b, length, seed=0):
    return EncoderDecoderModel(CFG).random_batch(b, length, length, seed)


def _two_steps(p: Partitioner, host_state):
    tr = Trainer(CFG, STEP_TC, p, 8, 8)
    # The initial state from `mesh_222` (on the host), placed in this mesh's shards: the
    # same start everywhere, and init compiles once.
    state = jax.device_put(host_state, tr.state_shardings)
    step, batch, losses = tr.step_fn(), _batch(8, 8), []
    for _ in range(2):
        state, m = step(state, p.shard_batch(batch, 8), jax.random.PRNGKey(0))
        losses.append(float(m["loss"]))
    return tr, losses, state


@pytest.fixture(scope="module")
def one_device(mesh_222):
    init = mesh_222[2]
    _, losses, state = _two_steps(Partitioner(MeshConfig(data=1), devices=jax.devices()[:1]),
                                  init)
    return init, losses, jax.device_get(state.params)


@pytest.mark.parametrize("mesh,batch_spec", [
    (MeshConfig(data=2, fsdp=2, tensor=2), P(("data", "fsdp"), None)),
    # `replica` is an outer data-parallel axis: the batch splits over (replica, data).
    (MeshConfig(replica=2, data=-1), P(("replica", "data"), None)),
], ids=["data2_fsdp2_tensor2", "replica2_data4"])
def test_same_step_on_one_and_eight_devices(one_device, mesh, batch_spec):
    init, want_losses, want_params = one_device
    p = Partitioner(mesh)
    assert p.batch_spec == batch_spec
    tr, losses, state = _two_steps(p, init)
    assert state.params["token_embed"]["embedding"].sharding.mesh.shape == p.sizes
    np.testing.assert_allclose(losses, want_losses, rtol=1e-4)
    logits_w = lambda params: params["decoder"]["logits_dense"]
    # The update moved the weights, so the comparison below is not of the initial state.
    assert np.abs(logits_w(want_params) - logits_w(init.params)).max() > 1e-5
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(state.params)),
                            jax.tree.leaves(want_params)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6, err_msg=_path_str(path))
