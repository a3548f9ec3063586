"""write_atomic and atomic_directory: the old content or the new, never half, no leftovers."""

import os

import pytest

from jaxmt.fileio import atomic_directory, write_atomic


def test_write_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "config.json"
    write_atomic(path, "first")
    write_atomic(path, b"second \xff")
    assert path.read_bytes() == b"second \xff"
    assert os.listdir(path.parent) == ["config.json"]  # no temporary file left
    assert path.stat().st_mode & 0o777 == 0o644


def test_write_atomic_failure_keeps_old_file(tmp_path):
    path = tmp_path / "summary.json"
    write_atomic(path, "old")
    with pytest.raises(TypeError):
        write_atomic(path, 12345)  # not str or bytes: fails after the temp file exists
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["summary.json"]


def test_atomic_directory_appears_only_when_complete(tmp_path):
    out = tmp_path / "converted"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "a.txt").write_text("partial")
            raise RuntimeError("killed mid-way")
    assert os.listdir(tmp_path) == []  # neither the directory nor its temporary twin
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("done")
    assert (out / "a.txt").read_text() == "done"
    assert os.listdir(tmp_path) == ["converted"]


def test_atomic_directory_refuses_a_non_empty_target(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        with atomic_directory(out):
            pass
    assert os.listdir(out) == ["keep.txt"] and len(os.listdir(tmp_path)) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty) as tmp:
        (tmp / "x").write_text("1")
    assert (empty / "x").read_text() == "1"
