"""``jaxmt distill translate``: a teacher's outputs for every training source, the data of
sequence-level distillation (Kim & Rush 2016; a student trains on them through
``DataConfig.distilled``, :mod:`jaxmt.data.distilled`).

The work is cut into fixed chunks of ``chunk_size`` sources of one direction, numbered
over all directions in order (:func:`plan_chunks`). Process ``i`` of ``P`` takes chunks
``i, i + P, ...`` (:func:`assigned`) and decodes them on its own devices, the batch split
over them (data parallel). Each finished chunk is its own file, written atomically
(``OUT/parts/<src>-<tgt>/NNNNNN.tsv``, exactly its chunk's lines, in order), so a rerun
after an interruption skips the finished chunks and redoes the rest: no gaps, no
duplicates, and the same bytes as an uninterrupted run.

``OUT/manifest.json``, written before the first chunk, records what the chunks are made
from (the teacher's path, checkpoint step and fingerprint, the decoding, the length limits,
the chunk size, and each direction's source count and hash). A rerun that differs in any
of them is refused rather than mixing two teachers' outputs. When every chunk exists,
process 0 joins each direction's chunks into ``OUT/<src>-<tgt>.train.tsv`` (source TAB
teacher output, in source order, counts checked) and writes ``OUT/distilled.json`` last.

TensorFlow-free, like the rest of the core.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Mapping, Sequence

from jaxmt import config as cfglib
from jaxmt.config import IMPORTED_MAX_LEN, DataConfig, DecodeConfig, MeshConfig
from jaxmt.data import distilled
from jaxmt.data.mixture import direction_key
from jaxmt.fileio import write_atomic

Direction = tuple[str, str]
CHUNK_SIZE = 512  # sources per chunk: the unit of work, of resuming and of sharding
VERSION = 1


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Sources ``[start, stop)`` of one direction: chunk ``index`` of that direction."""

    direction: Direction
    index: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def plan_chunks(counts: Mapping[Direction, int], chunk_size: int = CHUNK_SIZE) -> list[Chunk]:
    """Every direction's sources cut into chunks of ``chunk_size`` (the last may be
    shorter), directions in the given order: the global chunk numbering."""
    if chunk_size < 1:
        raise ValueError(f"chunk size must be positive, got {chunk_size}")
    return [Chunk(d, i, start, min(n, start + chunk_size))
            for d, n in counts.items() for i, start in enumerate(range(0, n, chunk_size))]


def assigned(chunks: Sequence[Chunk], process_index: int, process_count: int) -> list[Chunk]:
    """Process ``process_index``'s chunks: global numbers ``i, i + P, ...`` (every chunk
    exactly once over the ``P`` processes; directions interleave, so each process gets
    a share of every direction)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process {process_index} is not in [0, {process_count})")
    return list(chunks[process_index::process_count])


def part_path(out_dir: str, chunk: Chunk) -> str:
    return os.path.join(out_dir, distilled.PARTS_DIR, direction_key(*chunk.direction),
                        f"{chunk.index:06d}.tsv")


def _digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------- what a run is made of

def teacher_record(teacher: str) -> dict:
    """The teacher's identity, without reading its weights into memory: path, kind,
    checkpoint step (its newest; the one decoded with) and fingerprint
    (:func:`jaxmt.inference.pretrained.fingerprint`, plus its base's for an
    adapter/LoRA directory).

    Raises:
        FileNotFoundError: A jaxmt directory without a committed checkpoint.
    """
    from jaxmt.checkpoint import Checkpointer
    from jaxmt.inference import hf_import, pretrained

    teacher = os.path.abspath(teacher)
    if hf_import.is_hf_checkpoint(teacher):
        kind, step = "hf", None
    else:
        kind = "converted" if "tokenizer" in cfglib.load(teacher) else "jaxmt"
        ckpt = Checkpointer(teacher, async_save=False, read_only=True)
        try:
            steps = ckpt.all_steps()
        finally:
            ckpt.close()
        if not steps:
            raise FileNotFoundError(f"--teacher={teacher}: no checkpoint there; train it first")
        step = steps[0]
    return {"path": teacher, "kind": kind, "step": step,
            "fingerprint": pretrained.fingerprint(teacher, kind, step),
            "base_fingerprint": pretrained.read_record(teacher).get("fingerprint")}


def default_max_len(cfgs: Mapping) -> int:
    """The length limit ``Translator.from_pretrained`` gives a model directory's configs."""
    if "tokenizer" in cfgs:  # imported (converted or a Hugging Face folder)
        return IMPORTED_MAX_LEN
    return cfgs.get("data", DataConfig()).max_eval_len


def run_manifest(teacher: Mapping, decode: DecodeConfig, sources: Mapping[Direction, Sequence[str]],
                 chunk_size: int, max_len: int) -> dict:
    """``OUT/manifest.json``: everything the chunks' contents depend on."""
    return {"version": VERSION, "teacher": dict(teacher), "decode": dataclasses.asdict(decode),
            "max_len": max_len, "chunk_size": chunk_size,
            "directions": {direction_key(*d): {"src": d[0], "tgt": d[1], "sources": len(t),
                                               "sha256": _digest(t)}
                           for d, t in sources.items()}}


def _differences(old: Mapping, new: Mapping) -> list[str]:
    """What differs between two run manifests, in words."""
    out = []
    ot, nt = old.get("teacher", {}), new["teacher"]
    if ot.get("path") != nt["path"]:
        out.append(f"teacher {ot.get('path')} (now {nt['path']})")
    elif ot.get("step") != nt["step"]:
        out.append(f"teacher step {ot.get('step')} (now {nt['step']})")
    elif ot != nt:
        out.append(f"teacher fingerprint {str(ot.get('fingerprint'))[:12]} (now "
                   f"{nt['fingerprint'][:12]}: the teacher changed)")
    od = old.get("decode", {})
    out += [f"{k} {od.get(k)!r} (now {v!r})" for k, v in new["decode"].items() if od.get(k) != v]
    for k in ("max_len", "chunk_size", "version"):
        if old.get(k) != new[k]:
            out.append(f"{k} {old.get(k)!r} (now {new[k]!r})")
    odirs, ndirs = old.get("directions", {}), new["directions"]
    if list(odirs) != list(ndirs):
        out.append(f"directions {', '.join(odirs)} (now {', '.join(ndirs)})")
    else:
        out += [f"{k} sources ({odirs[k].get('sources')} sentences, now {v['sources']})"
                for k, v in ndirs.items() if odirs[k] != v]
    return out


def check_manifest(out_dir: str, manifest: Mapping) -> None:
    """Writes ``OUT/manifest.json``, or checks that the one there is ``manifest``.

    Raises:
        ValueError: ``out_dir`` was made from another teacher, decoding or sources (the
            message says what differs), or holds chunks without a manifest.
    """
    path = os.path.join(out_dir, distilled.RUN_MANIFEST)
    new = json.loads(json.dumps(manifest))  # as it reads back (tuples as lists)
    if not os.path.exists(path):
        if os.path.isdir(os.path.join(out_dir, distilled.PARTS_DIR)):
            raise ValueError(f"--out={out_dir}: holds chunks ({distilled.PARTS_DIR}/) but no "
                             f"{distilled.RUN_MANIFEST}; pass a new --out or delete it")
        write_atomic(path, json.dumps(new, indent=2, ensure_ascii=False) + "\n")
        return
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e}); pass a new --out or delete it") from None
    if old != new:
        diff = _differences(old, new) or ["its manifest"]
        raise ValueError(f"--out={out_dir}: made from another configuration: "
                         f"{'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}. Pass a new "
                         "--out, or delete it to start again")


# ---------------------------------------------------------------- the work

def translate_chunks(translator, sources: Mapping[Direction, Sequence[str]],
                     chunks: Sequence[Chunk], out_dir: str, *, stop_after: int | None = None,
                     progress: bool = True) -> dict:
    """Decodes the ``chunks`` not yet written, each into its own file (atomically).

    Args:
        translator: A :class:`jaxmt.inference.translator.Translator` (its decoding config).
        sources: Direction -> every source of the direction.
        chunks: This process's chunks.
        out_dir: The output directory.
        stop_after: Stop after this many chunks (to simulate an interruption).
        progress: A tqdm bar over sentences (sentences/s) on stderr.

    Returns:
        ``chunks`` (written now), ``sentences``, ``empty`` (empty outputs), ``seconds``,
        ``already`` (chunks found written) and ``stopped`` (True if ``stop_after`` hit).
    """
    from tqdm import tqdm

    todo = [c for c in chunks if not os.path.exists(part_path(out_dir, c))]
    stats = {"chunks": 0, "sentences": 0, "empty": 0, "seconds": 0.0,
             "already": len(chunks) - len(todo), "stopped": False}
    bar = tqdm(total=sum(c.size for c in todo), desc="distill", unit="sent",
               disable=not progress, dynamic_ncols=True, file=sys.stderr)
    t0 = time.perf_counter()
    for c in todo:
        if stop_after is not None and stats["chunks"] >= stop_after:
            stats["stopped"] = True
            break
        texts = sources[c.direction][c.start:c.stop]
        hyps = translator.translate(texts, *c.direction)
        write_atomic(part_path(out_dir, c), "".join(f"{s}\t{h}\n" for s, h in zip(texts, hyps)))
        stats["chunks"] += 1
        stats["sentences"] += len(texts)
        stats["empty"] += sum(not h for h in hyps)
        bar.update(len(texts))
        bar.set_postfix_str(f"{direction_key(*c.direction)} chunk {c.index}, "
                            f"{stats['chunks']}/{len(todo)} chunks", refresh=False)
    stats["seconds"] = time.perf_counter() - t0
    bar.close()
    return stats


def _chunk_rows(out_dir: str, chunk: Chunk, texts: Sequence[str]) -> list[str]:
    """A written chunk's lines, checked: exactly its chunk's count, each starting with
    its source."""
    path = part_path(out_dir, chunk)
    with open(path, encoding="utf-8", newline="") as f:
        rows = f.read().split("\n")
    if rows[-1] != "" or len(rows) - 1 != chunk.size:
        raise ValueError(f"{path}: {len(rows) - 1} lines, expected {chunk.size}; delete it "
                         "and rerun to translate it again")
    for row, src in zip(rows, texts[chunk.start:chunk.stop]):
        if row.partition("\t")[0] != src:
            raise ValueError(f"{path}: line {row[:60]!r} does not start with its source "
                             f"{src[:60]!r}; delete it and rerun")
    return rows[:-1]


def assemble(out_dir: str, sources: Mapping[Direction, Sequence[str]], chunk_size: int,
             info: Mapping) -> dict:
    """Joins every direction's chunks into ``OUT/<src>-<tgt>.train.tsv`` and writes
    ``OUT/distilled.json`` (``info`` plus directions and counts) last; returns it.

    Raises:
        ValueError: A chunk is missing, or does not hold exactly its sources' lines (the
            message names it and says how to redo it).
    """
    chunks = plan_chunks({d: len(t) for d, t in sources.items()}, chunk_size)
    missing = [part_path(out_dir, c) for c in chunks if not os.path.exists(part_path(out_dir, c))]
    if missing:
        raise ValueError(f"{len(missing)} of {len(chunks)} chunks are not written yet, e.g. "
                         f"{missing[0]}; rerun the same command to finish them")
    dirs = {}
    for d, texts in sources.items():
        empty = [0]

        def lines(d=d, texts=texts, empty=empty):
            for c in (c for c in chunks if c.direction == d):
                for row in _chunk_rows(out_dir, c, texts):
                    empty[0] += row.endswith("\t")  # an empty teacher output
                    yield row + "\n"

        path = distilled.train_file(out_dir, *d)
        write_atomic(path, lines())
        dirs[direction_key(*d)] = {"src": d[0], "tgt": d[1], "file": os.path.basename(path),
                                   "sentences": len(texts), "empty": empty[0]}
    manifest = {**info, "directions": dirs,
                "sentences": sum(v["sentences"] for v in dirs.values()),
                "empty": sum(v["empty"] for v in dirs.values())}
    write_atomic(os.path.join(out_dir, distilled.MANIFEST),
                 json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def distill_translate(teacher: str, sources: Mapping[Direction, Sequence[str]], out_dir: str,
                      *, decode: DecodeConfig, max_len: int, chunk_size: int = CHUNK_SIZE,
                      mesh: MeshConfig | None = None, batch_tokens: int = 16384,
                      stop_after: int | None = None, progress: bool = True) -> dict:
    """Decodes this process's chunks and, on process 0 once all exist, assembles ``OUT``.

    Every process of a multi-process run (``jax.distributed`` already initialised) calls
    this with the same arguments; they meet at a barrier before process 0 assembles.

    Args:
        teacher: The teacher's model directory (only read).
        sources: Direction -> its training sources, in order.
        out_dir: The output directory (created by the caller).
        decode: The decoding config (``--beam`` applied).
        max_len: Source and output token limit.
        chunk_size: Sources per chunk.
        mesh: The mesh over this process's devices (default: data parallel over all).
        batch_tokens: Source tokens x beams per decoding call.
        stop_after: Stop after this many chunks (simulates an interruption).
        progress: Show a progress bar.

    Returns:
        ``{"run": this process's translate_chunks stats, "process": i, "processes": P}``,
        plus ``"manifest"`` (``distilled.json``) on process 0 when it assembled.

    Raises:
        ValueError: ``out_dir`` holds another run's chunks, or an assembled chunk is bad.
    """
    import jax

    pi, pc = jax.process_index(), jax.process_count()
    if stop_after is not None and pc > 1:  # the others would wait at the barrier forever
        raise ValueError("stop_after (an interruption for tests) needs a single process")
    record = teacher_record(teacher)
    check_manifest(out_dir, run_manifest(record, decode, sources, chunk_size, max_len))
    chunks = plan_chunks({d: len(t) for d, t in sources.items()}, chunk_size)
    mine = assigned(chunks, pi, pc)
    result = {"process": pi, "processes": pc, "run": {
        "chunks": 0, "sentences": 0, "empty": 0, "seconds": 0.0, "already": len(mine),
        "stopped": False}}
    # The same answer on every process (the same files), so all load or none does.
    if not all(os.path.exists(part_path(out_dir, c)) for c in chunks):
        from jaxmt.inference.translator import MIN_BUCKET, Translator

        tr = Translator.from_pretrained(
            teacher, step=record["step"], decode=decode, mesh=mesh or MeshConfig(data=-1),
            max_src_len=max_len, max_decode_len=max_len, max_tokens=batch_tokens,
            batch_size=max(1, batch_tokens // MIN_BUCKET), progress=False)
        result["run"] = translate_chunks(tr, sources, mine, out_dir, stop_after=stop_after,
                                         progress=progress)
        result["notes"] = tr.report()
        if result["run"]["stopped"]:
            return result
    if pc > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("jaxmt:distill_translate")
    if pi == 0:
        run = result["run"]
        info = {"teacher": record, "decode": dataclasses.asdict(decode),
                "beam": decode.beam_size if decode.strategy == "beam" else 1,
                "max_len": max_len, "chunk_size": chunk_size,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "last_run": {"processes": pc, "process0_sentences": run["sentences"],
                             "process0_seconds": round(run["seconds"], 3)}}
        result["manifest"] = assemble(out_dir, sources, chunk_size, info)
    return result
