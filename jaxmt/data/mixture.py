"""Language-balanced mixture rates and the rate table of ``jaxmt data mixture``.

Pure Python (no seqio/TensorFlow), so :class:`jaxmt.config.DataConfig` can check its
mixture fields with the same code that computes the rates.

A direction's rate (its share of the sampled training examples) is:

1. **Capped size** ``m_i = min(n_i, cap_i)``, where ``n_i`` is its train pairs and
   ``cap_i`` the smallest of ``DataConfig.mixture_cap`` (every direction, 0 = none)
   and the ``DataConfig.mixture_caps`` entries naming the direction (``"en-de"``)
   or either of its languages (``"de"``). As in T5/mT5, a cap stops one huge corpus
   from taking the whole mixture at ``temperature=1``, without dropping any data.
2. **Temperature weight** ``m_i ** (1 / T)``: ``T=1`` samples in proportion to size,
   larger ``T`` moves towards uniform (up-samples the small directions).
3. **Explicit weights** (``DataConfig.mixture_weights``, keyed by direction) are
   fixed shares of the mixture: ``{"en-de": 0.4}`` gives en-de exactly 40% of the
   examples, and the directions not named share the remaining 60% in proportion to
   their temperature weights. The named shares must then sum to less than 1. When
   every direction is named, the weights are relative (normalised to sum to 1).
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Mapping, Sequence

Direction = tuple[str, str]


def directions(langs: Sequence[str], pivot: str) -> list[Direction]:
    """``pivot -> xx`` for every other language, then ``xx -> pivot``."""
    others = [lang for lang in langs if lang != pivot]
    return [(pivot, lang) for lang in others] + [(lang, pivot) for lang in others]


def direction_key(src: str, tgt: str) -> str:
    """The config key of a direction: ``"en-de"`` (``"en-pt-BR"`` for pt-BR)."""
    return f"{src}-{tgt}"


def mixture_rates(sizes: Mapping[Hashable, int], temperature: float,
                  caps: Mapping[Hashable, int | None] | None = None,
                  weights: Mapping[Hashable, float] | None = None) -> dict[Hashable, float]:
    """Sampling rates summing to 1 (see the module docstring for the rule).

    Args:
        sizes: Key (a task or direction) -> train examples.
        temperature: ``rate ∝ min(n, cap) ** (1 / temperature)`` for keys without weight.
        caps: Key -> cap on the size the rate counts (None or absent: no cap).
        weights: Key -> fixed share of the mixture; if every key has one, relative
            weights instead.

    Raises:
        ValueError: Non-positive temperature, no sizes, a negative size, a cap below
            1, a non-positive weight, a cap or weight for an unknown key, named shares
            of 1 or more while some keys have none, or nothing left to sample.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not sizes:
        raise ValueError("mixture_rates needs at least one size")
    if any(n < 0 for n in sizes.values()):
        raise ValueError(f"sizes must be non-negative, got {dict(sizes)}")
    caps = {k: c for k, c in (caps or {}).items() if c is not None}
    weights = dict(weights or {})
    for what, d in (("caps", caps), ("weights", weights)):
        unknown = [k for k in d if k not in sizes]
        if unknown:
            raise ValueError(f"{what} for unknown keys {unknown}; known: {list(sizes)}")
    if any(not c >= 1 for c in caps.values()):
        raise ValueError(f"caps must be at least 1, got {caps}")
    if any(not (w > 0 and math.isfinite(w)) for w in weights.values()):
        raise ValueError(f"weights must be positive and finite, got {weights}")

    temp = {k: float(min(n, caps.get(k, n))) ** (1.0 / temperature)
            for k, n in sizes.items() if k not in weights}
    if not temp:  # every key named: relative weights
        total = sum(weights.values())
        return {k: weights[k] / total for k in sizes}
    named = sum(weights.values())
    if named >= 1:
        raise ValueError(f"explicit weights {weights} sum to {named:g}, leaving no share for "
                         f"{list(temp)}; shares must sum to less than 1 unless every key "
                         "is named")
    total = sum(temp.values())
    if total <= 0:
        raise ValueError(f"all sizes without an explicit weight are zero: {dict(sizes)}")
    rest = 1.0 - named
    return {k: weights[k] if k in weights else rest * temp[k] / total for k in sizes}


def resolve(directions: Sequence[Direction], mixture_cap: int = 0,
            mixture_caps: Mapping[str, int] | None = None,
            mixture_weights: Mapping[str, float] | None = None,
            owner: str = "DataConfig") -> tuple[dict[Direction, int | None],
                                                 dict[Direction, float]]:
    """Config keys -> per-direction caps and explicit weights, with checked values.

    Args:
        directions: The ``(src, tgt)`` directions of the mixture.
        mixture_cap: Cap for every direction; 0 = none.
        mixture_caps: ``"src-tgt"`` or language -> cap; a language's cap applies to
            every direction with that language on either side. The smallest cap wins.
        mixture_weights: ``"src-tgt"`` -> explicit share (see :func:`mixture_rates`).
        owner: Prefix of the field names in error messages.

    Returns:
        ``(caps, weights)`` keyed by direction; ``caps[d]`` is None when uncapped, and
        only named directions are in ``weights``.

    Raises:
        ValueError: A key that is no direction (or, for caps, language) of the mixture,
            or a bad value; the message names the field.
    """
    p = f"{owner}." if owner else ""
    by_key = {direction_key(*d): tuple(d) for d in directions}
    langs = {lang for d in directions for lang in d}
    if not (isinstance(mixture_cap, int) and not isinstance(mixture_cap, bool)
            and mixture_cap >= 0):
        raise ValueError(f"{p}mixture_cap: must be an integer >= 0 (0 = no cap), "
                         f"got {mixture_cap!r}")
    caps: dict[Direction, int | None] = {d: (mixture_cap or None) for d in by_key.values()}
    for key, cap in dict(mixture_caps or {}).items():
        if not (isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1):
            raise ValueError(f"{p}mixture_caps[{key!r}]: must be a positive integer, got {cap!r}")
        if key in by_key:
            hit = [by_key[key]]
        elif key in langs:
            hit = [d for d in by_key.values() if key in d]
        else:
            raise ValueError(f"{p}mixture_caps: {key!r} is neither a direction "
                             f"({', '.join(by_key)}) nor a language ({', '.join(sorted(langs))})")
        for d in hit:
            caps[d] = cap if caps[d] is None else min(caps[d], cap)
    weights: dict[Direction, float] = {}
    for key, w in dict(mixture_weights or {}).items():
        if key not in by_key:
            hint = " (weights name directions, not languages)" if key in langs else ""
            raise ValueError(f"{p}mixture_weights: {key!r} is not a direction{hint}; "
                             f"directions: {', '.join(by_key)}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (
                w > 0 and math.isfinite(w)):
            raise ValueError(f"{p}mixture_weights[{key!r}]: must be a positive number, got {w!r}")
        weights[by_key[key]] = float(w)
    if weights and len(weights) < len(by_key) and sum(weights.values()) >= 1:
        raise ValueError(f"{p}mixture_weights: the named shares sum to "
                         f"{sum(weights.values()):g}, leaving nothing for "
                         f"{', '.join(k for k, d in by_key.items() if d not in weights)}; "
                         "they must sum to less than 1 unless every direction is named")
    return caps, weights


# ---------------------------------------------------------------- the rate table

def rate_table(stats: Sequence[Mapping[str, Any]], examples_per_step: float,
               steps: int) -> dict[str, Any]:
    """Examples, tokens, rate and epochs per direction and per language.

    Args:
        stats: One dict per direction (or Task; then an optional ``direction`` names
            its row) with ``src``, ``tgt``, ``examples`` (train
            pairs), ``counted`` (the capped size the rate used), ``explicit`` (bool),
            ``src_tokens``, ``tgt_tokens`` (totals over the train pairs, tag and EOS
            included) and ``rate``.
        examples_per_step: Examples per optimizer step (batch rows x examples per row).
        steps: The step budget.

    Returns:
        ``{"steps", "examples_per_step", "sampled", "directions": [...],
        "languages": [...]}``. A direction row adds ``tokens``, ``sampled``
        (examples drawn in ``steps``), ``epochs`` (sampled / examples) and
        ``token_share`` (expected share of the sampled tokens). A language row counts
        the sentences in that language: ``sentences`` (train pairs with the language on
        either side), ``tokens`` (its side's tokens), ``rate`` (its share of sampled
        sentences; every example has two, so the rates sum to 1), ``sampled``,
        ``epochs`` and ``token_share``.
    """
    sampled_total = examples_per_step * steps
    rows = []
    for s in stats:
        n = s["examples"]
        tokens = s["src_tokens"] + s["tgt_tokens"]
        sampled = s["rate"] * sampled_total
        direction = s.get("direction") or direction_key(s["src"], s["tgt"])
        rows.append(dict(s, direction=direction, tokens=tokens,
                         sampled=sampled, epochs=sampled / n if n else 0.0,
                         _tok=s["rate"] * tokens / n if n else 0.0))
    tok_total = sum(r["_tok"] for r in rows) or 1.0
    for r in rows:
        r["token_share"] = r.pop("_tok") / tok_total
    langs: dict[str, dict[str, float]] = {}
    for r in rows:
        n = r["examples"]
        for side in ("src", "tgt"):
            row = langs.setdefault(r[side], {"sentences": 0, "tokens": 0, "rate": 0.0,
                                             "sampled": 0.0, "token_share": 0.0})
            row["sentences"] += n
            row["tokens"] += r[f"{side}_tokens"]
            row["rate"] += r["rate"] / 2
            row["sampled"] += r["sampled"]
            row["token_share"] += (r["rate"] * r[f"{side}_tokens"] / n / tok_total) if n else 0.0
    lang_rows = [dict(v, lang=k, epochs=v["sampled"] / v["sentences"] if v["sentences"] else 0.0)
                 for k, v in langs.items()]
    keys = ("direction", "src", "tgt", "examples", "counted", "explicit", "src_tokens",
            "tgt_tokens", "tokens", "rate", "sampled", "epochs", "token_share")
    lkeys = ("lang", "sentences", "tokens", "rate", "sampled", "epochs", "token_share")
    return {"steps": steps, "examples_per_step": examples_per_step, "sampled": sampled_total,
            "directions": [{k: r[k] for k in keys} for r in rows],
            "languages": [{k: r[k] for k in lkeys} for r in lang_rows]}


def format_table(table: Mapping[str, Any]) -> str:
    """The human-readable form of :func:`rate_table`'s result."""
    def fmt_rows(header, rows):
        widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
        line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                       for i, (c, w) in enumerate(zip(cells, widths)))
        return [line(header)] + [line(r) for r in rows]

    d_rows = []
    for r in table["directions"]:
        mark = "*" if r["explicit"] else ("^" if r["counted"] < r["examples"] else " ")
        d_rows.append([r["direction"], f"{r['examples']:,}", f"{r['tokens']:,}",
                       f"{r['rate']:.4f}{mark}", f"{r['token_share']:.4f}",
                       f"{r['sampled']:,.0f}", f"{r['epochs']:.2f}"])
    l_rows = [[r["lang"], f"{r['sentences']:,}", f"{r['tokens']:,}", f"{r['rate']:.4f}",
               f"{r['token_share']:.4f}", f"{r['sampled']:,.0f}", f"{r['epochs']:.2f}"]
              for r in table["languages"]]
    out = fmt_rows(["direction", "examples", "tokens", "rate", "tok_share", "sampled", "epochs"],
                   d_rows)
    out += [""] + fmt_rows(["language", "sentences", "tokens", "rate", "tok_share", "sampled",
                            "epochs"], l_rows)
    notes = []
    if any(r["explicit"] for r in table["directions"]):
        notes.append("* explicit weight (DataConfig.mixture_weights)")
    capped = [f"{r['direction']} counted as {r['counted']:,}" for r in table["directions"]
              if not r["explicit"] and r["counted"] < r["examples"]]
    if capped:
        notes.append("^ capped (DataConfig.mixture_cap/mixture_caps): " + ", ".join(capped))
    return "\n".join(out + [""] + notes if notes else out)
