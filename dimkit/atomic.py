"""Files and folders that readers never see half-written.

Every file dimkit writes goes through one of these: it is written under a unique temporary name
beside its target, flushed to disk, given the mode a plain ``open()`` would give it, then renamed
into place. A whole folder (a prepared dataset, a rebuilt sample) is built beside its target and
swapped in, so a crash leaves either the old folder or the new one, never a mixture.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterator

_FILE_MODE: int | None = None


def plain_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file here: 0o666 less the process umask.

    Temporary files are 0o600; renamed into place as they are, one dataset folder would mix private
    and shared files and break a data or cache folder shared by a group.
    """
    global _FILE_MODE
    if _FILE_MODE is None:
        umask = None
        try:  # Linux reports the umask without changing it
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
        except (OSError, ValueError, IndexError):
            pass
        if umask is None:
            umask = os.umask(0o022)
            os.umask(umask)
        _FILE_MODE = 0o666 & ~umask
    return _FILE_MODE


@contextlib.contextmanager
def replacing(target: str | Path, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO]:
    """Write ``target`` through a temporary file: renamed into place only when the block ends well.

    Several processes may write into one folder at once (the temporary names are unique). A symlink is
    written through (the file it points to is replaced, the link stays); a target that exists but is
    not a regular file (``/dev/null``, a FIFO, a folder) is refused: renaming over it would destroy it.
    """
    target = Path(os.path.realpath(target))
    if target.exists() and not target.is_file():
        from .errors import DimkitError

        raise DimkitError(f"{target} is not a regular file (a device, a pipe or a folder): name a file to write")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, plain_file_mode())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(data: bytes, target: str | Path) -> Path:
    """Write a file atomically (see :func:`replacing`)."""
    with replacing(target) as fh:
        fh.write(data)
    return Path(target)


def write_text(text: str, target: str | Path) -> Path:
    """Write a UTF-8 text file atomically."""
    return write_bytes(text.encode("utf-8"), target)


def write_json(data: Any, target: str | Path) -> Path:
    """Write indented JSON atomically (``default=str`` for paths and the like)."""
    return write_text(json.dumps(data, indent=2, default=str) + "\n", target)


def write_parquet(df, target: str | Path) -> Path:
    """Write a DataFrame as parquet atomically (no index)."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return write_bytes(buf.getvalue(), target)


def write_torch(obj: Any, target: str | Path) -> Path:
    """``torch.save`` atomically (checkpoints are loaded back with ``weights_only=True``)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(buf.getvalue(), target)


def swap_in(stage: str | Path, target: str | Path) -> None:
    """Put the finished folder ``stage`` at ``target`` (same parent), replacing any old one whole.

    The old folder is renamed aside first and removed only after the new one is in place, so a
    crash leaves either the old or the new folder at ``target``.
    """
    stage, target = Path(stage), Path(target)
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(target, old)
    try:
        os.rename(stage, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        remove(old)


@contextlib.contextmanager
def building(target: str | Path) -> Iterator[Path]:
    """A fresh folder beside ``target`` to build in; swapped in whole when the block ends well,
    removed if it fails (``target`` then stays as it was)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = target.with_name(f".{target.name}.build-{os.getpid()}-{time.time_ns()}")
    stage.mkdir()
    try:
        yield stage
        swap_in(stage, target)
    except BaseException:
        remove(stage)
        raise


def remove(path: str | Path) -> None:
    """Remove a file, a link (not what it points to) or a folder tree, if it exists."""
    p = Path(path)
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def exclusive(lock_file: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` while the block runs; if another process holds it,
    raise :class:`dimkit.errors.DimkitError` at once naming ``what``. The lock goes with the process
    (a killed run leaves at most an unlocked empty file); a finished block removes the file, and its
    folder when empty."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; the block runs unguarded
        yield
        return

    from .errors import DimkitError

    path = Path(lock_file)
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fh = open(path, "a+")
        except FileNotFoundError:  # the folder was removed by a holder finishing just now
            continue
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise DimkitError(f"{what} is being written by {holder} right now; wait for it to finish "
                              "(then a rerun reads its result back), or choose another name") from None
        try:
            same = os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()  # a finishing holder removed this file after we opened it: lock the new one
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"process {os.getpid()}")
        fh.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: whoever opened it sees it is gone and retries
        fh.close()
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # only when empty
