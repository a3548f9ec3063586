"""Language-balanced mixtures: caps, explicit weights, the sampled proportions, the CLI table."""

import json
import math
from collections import Counter

import pytest

from jaxmt.config import DataConfig
from jaxmt.data import embedded, mixture

seqio = pytest.importorskip("seqio")
from jaxmt.data import tasks  # noqa: E402  (after the seqio check)

LANGS = ("en", "de", "ru")
TEMPERATURE = 2.0
CAPS = {"ru": 1000}  # ru's two directions count as 1000 examples each
WEIGHTS = {"en-de": 0.4}  # en-de gets 40% of the examples


@pytest.fixture(scope="module")
def mix(spm_path):
    return tasks.register(spm_path, LANGS, pivot="en", temperature=TEMPERATURE,
                          prefix="t_mixture", mixture_caps=CAPS, mixture_weights=WEIGHTS)


def _expected_rates():
    """The closed form for CAPS and WEIGHTS, by direction."""
    n = {d: len(embedded.parallel_pairs(*d, "train")[0])
         for d in [("en", "de"), ("en", "ru"), ("de", "en"), ("ru", "en")]}
    w = {d: min(k, 1000 if "ru" in d else k) ** (1 / TEMPERATURE) for d, k in n.items()
         if d != ("en", "de")}
    rates = {d: 0.6 * x / sum(w.values()) for d, x in w.items()}
    rates[("en", "de")] = 0.4
    return rates


def test_mixture_rates_closed_form():
    sizes = {"a": 10000, "b": 2500, "c": 100}
    # Caps count a key as at most its cap, before the temperature.
    r = tasks.mixture_rates(sizes, 2.0, caps={"a": 400})
    z = 20 + 50 + 10
    assert r == pytest.approx({"a": 20 / z, "b": 50 / z, "c": 10 / z})
    # Explicit weights are fixed shares; the rest is split by temperature.
    r = tasks.mixture_rates(sizes, 1.0, weights={"c": 0.5})
    assert r == pytest.approx({"a": 0.5 * 10000 / 12500, "b": 0.5 * 2500 / 12500, "c": 0.5})
    r = tasks.mixture_rates(sizes, 2.0, caps={"a": 400, "b": None}, weights={"b": 0.25})
    assert r == pytest.approx({"a": 0.75 * 20 / 30, "b": 0.25, "c": 0.75 * 10 / 30})
    # Every key named: relative weights.
    assert tasks.mixture_rates(sizes, 5.0, weights={"a": 2, "b": 1, "c": 1}) == pytest.approx(
        {"a": 0.5, "b": 0.25, "c": 0.25})
    # Defaults are the plain temperature rule.
    assert tasks.mixture_rates(sizes, 3.0) == tasks.mixture_rates(sizes, 3.0, {}, {})
    for bad, match in [({"weights": {"a": 0.6, "b": 0.4}}, "no share"),
                       ({"weights": {"a": -1}}, "positive"),
                       ({"caps": {"a": 0}}, "at least 1"),
                       ({"caps": {"z": 5}}, "unknown keys")]:
        with pytest.raises(ValueError, match=match):
            tasks.mixture_rates(sizes, 1.0, **bad)


def test_resolve_language_and_direction_keys():
    dirs = [("en", "de"), ("en", "ru"), ("de", "en"), ("ru", "en")]
    caps, weights = mixture.resolve(dirs, 5000, {"ru": 1000, "en-ru": 300, "de-en": 9000},
                                    {"ru-en": 0.1})
    assert caps == {("en", "de"): 5000, ("en", "ru"): 300, ("de", "en"): 5000,
                    ("ru", "en"): 1000}
    assert weights == {("ru", "en"): 0.1}
    assert mixture.resolve(dirs) == ({d: None for d in dirs}, {})


def test_data_config_checks_mixture_fields():
    assert DataConfig().mixture_cap == 0 and DataConfig().mixture_caps == {}
    ok = DataConfig(langs=LANGS, mixture_caps=CAPS, mixture_weights=WEIGHTS)
    assert ok.mixture_weights == WEIGHTS
    for kw, match in [({"mixture_cap": -1}, r"DataConfig\.mixture_cap:"),
                      ({"mixture_caps": {"fr": 10}}, r"DataConfig\.mixture_caps: 'fr'"),
                      ({"mixture_caps": {"de": -5}}, r"mixture_caps\['de'\]: must be a pos"),
                      ({"mixture_weights": {"de": 0.5}}, "not languages"),
                      ({"mixture_weights": {"en-fr": 0.5}}, r"'en-fr' is not a direction"),
                      ({"mixture_weights": {"en-de": -0.1}}, r"mixture_weights\['en-de'\]"),
                      ({"mixture_weights": {"en-de": 0.7, "de-en": 0.3}}, "sum to 1")]:
        with pytest.raises(ValueError, match=match):
            DataConfig(langs=LANGS, **kw)


def test_registered_rates_match_the_closed_form(mix):
    m = seqio.get_mixture_or_task(mix)
    expected = _expected_rates()
    got = {d: m.get_rate(seqio.get_mixture_or_task(tasks.task_name("t_mixture", *d)))
           for d in expected}
    assert got == pytest.approx(expected, rel=1e-9)
    info = tasks.MIXTURES[mix]
    assert info.explicit == {"t_mixture_en_de"} and info.counted["t_mixture_ru_en"] == 1000


def test_sampled_proportions_match_the_rates(mix):
    # Which direction an example came from: its tagged source is unique to a direction.
    origin = {}
    for d in _expected_rates():
        for s, _ in embedded.parallel_pairs(*d, "train")[0]:
            origin.setdefault(embedded.tag_source(s, d[1]), set()).add(d)
    n = 3000
    ds = seqio.get_mixture_or_task(mix).get_dataset(
        {"inputs": 8, "targets": 8}, split="train", use_cached=False, shuffle=True, seed=123,
        num_epochs=None, copy_pretokenized=True, try_in_mem_cache=False)
    counts, unknown = Counter(), 0
    for ex in ds.take(n).as_numpy_iterator():
        d = origin.get(ex["inputs_pretokenized"].decode(), set())
        if len(d) == 1:
            counts[d.pop()] += 1
        else:
            unknown += 1
    assert unknown < 0.01 * n  # identical verses in two directions are rare
    total = sum(counts.values())
    for d, rate in _expected_rates().items():
        sigma = math.sqrt(rate * (1 - rate) / total)
        assert abs(counts[d] / total - rate) < 4 * sigma, (d, counts[d] / total, rate)


def test_rate_table_arithmetic():
    stats = [{"src": "en", "tgt": "de", "examples": 100, "counted": 100, "explicit": False,
              "src_tokens": 1000, "tgt_tokens": 1200, "rate": 0.75},
             {"src": "de", "tgt": "en", "examples": 50, "counted": 50, "explicit": True,
              "src_tokens": 600, "tgt_tokens": 500, "rate": 0.25}]
    t = mixture.rate_table(stats, examples_per_step=10, steps=30)
    d = {r["direction"]: r for r in t["directions"]}
    assert t["sampled"] == 300 and d["en-de"]["sampled"] == 225 and d["de-en"]["epochs"] == 1.5
    assert d["en-de"]["tokens"] == 2200
    # Expected tokens per sampled example: 0.75 * 22 + 0.25 * 22 -> equal shares of 22.
    assert d["en-de"]["token_share"] == pytest.approx(0.75)
    lang = {r["lang"]: r for r in t["languages"]}
    assert lang["en"]["sentences"] == 150 and lang["en"]["tokens"] == 1500
    assert sum(r["rate"] for r in t["languages"]) == pytest.approx(1.0)
    assert sum(r["token_share"] for r in t["languages"]) == pytest.approx(1.0)
    assert "de-en" in mixture.format_table(t)


def test_cli_json_matches_mixture_rates(spm_path, capsys):
    import gin

    from jaxmt import cli

    try:
        rc = cli.main(["data", "mixture", "--gin_file=runs/demo.gin", f"--vocab={spm_path}",
                       "--gin.LANGS=('en','de','ru')",
                       f"--gin.DataConfig.temperature={TEMPERATURE}",
                       f"--gin.DataConfig.mixture_caps={CAPS}",
                       f"--gin.DataConfig.mixture_weights={WEIGHTS}", "--steps=100",
                       "--batch_size=8", "--examples_per_row=2.5", "--token_sample=500",
                       "--json"])
    finally:
        gin.clear_config()
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {(r["src"], r["tgt"]): r for r in out["directions"]}
    expected = _expected_rates()
    assert {d: r["rate"] for d, r in rows.items()} == pytest.approx(expected, rel=1e-9)
    sizes = {d: len(embedded.parallel_pairs(*d, "train")[0]) for d in expected}
    for d, r in rows.items():
        assert r["examples"] == sizes[d]
        assert r["sampled"] == pytest.approx(100 * 8 * 2.5 * expected[d])
        assert r["epochs"] == pytest.approx(r["sampled"] / sizes[d])
        assert r["counted"] == (1000 if "ru" in d else sizes[d])
        assert r["tokens"] > 2 * sizes[d]
    assert rows[("en", "de")]["explicit"] and out["examples_per_row"] == 2.5
    assert {r["lang"] for r in out["languages"]} == set(LANGS)
