"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file jaxmt writes (model-directory configs, summaries, vocabularies, skip
reports, the embedded corpus, converted models) goes through :func:`write_atomic`;
whole directories through :func:`atomic_directory`. Pure standard library, so
``jaxmt.data`` can use it without importing anything above itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator


def write_atomic(path: str | os.PathLike, data: str | bytes | Iterable[str | bytes],
                 mode: int = 0o644) -> Path:
    """Writes ``data`` (text as UTF-8) to a temporary file beside ``path``, then renames it.

    The rename is atomic on POSIX filesystems, so a crash or a kill leaves either the
    previous file or the complete new one. Parent directories are created.

    Args:
      path: the file to write.
      data: its whole content, or an iterable of its pieces (written as they come, so a
        large file need not be held in memory).
      mode: permission bits (``mkstemp`` would leave the file private).

    Returns:
      ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in (data,) if isinstance(data, (str, bytes)) else data:
                f.write(piece.encode("utf-8") if isinstance(piece, str) else piece)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary directory beside ``path`` that becomes ``path`` on success.

    On an exception the temporary directory is removed and ``path`` is untouched.

    Raises:
      FileExistsError: ``path`` exists and is not an empty directory (nothing is written).
    """
    path = Path(path).absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path}: already exists and is not an empty directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if path.exists():
            path.rmdir()  # empty, checked above
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
