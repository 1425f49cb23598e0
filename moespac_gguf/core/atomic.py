"""Writing a file so that no reader ever takes a partial one for a finished one.

Every result a later run trusts (a demo model, a trace, a gate, a calibration profile, a wheel in
the build cache) is written through `atomic_path`: to a temporary name beside the final one, made
durable, then renamed onto the final name (atomic on POSIX). A process killed at any moment, even
with SIGKILL, leaves the old file, no file, or a `.NAME.tmp-PID-XXXX` that nothing looks for; the
next write to the same name removes those of dead processes. Standard library only: the llama.cpp
build script loads it before the package can be imported.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # a directory on a system that cannot sync one
        pass
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_orphans(path: Path) -> None:
    """Temporary files (or directories) of `path` left by processes that no longer run."""
    prefix = f".{path.name}.tmp-"
    for p in path.parent.iterdir():
        pid = p.name[len(prefix) :].split("-")[0] if p.name.startswith(prefix) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            _remove(p)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike, sync: bool = True) -> Iterator[Path]:
    """A fresh path beside `path` (it does not exist yet) for the caller to write a file, or make a
    directory, at; when the block ends without an exception it is synced to disk (`sync`) and
    renamed onto `path`, else removed. Makes the parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        if sync and tmp.is_file():
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    if sync:
        _fsync(path.parent)  # the rename itself


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
