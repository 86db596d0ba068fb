"""The run directory: where each step's output lives, atomic writes, and the run lock.

RUN/
  config.toml                the RunConfig actually used
  tokens/                    tokens.npz + meta.json (token set, content hash)
  stores/<label>.h5          activation stores; <label>.h5.partial + .ledger while writing
  reduce/<ref>__<other>.h5   reduced statistics per pair
  universal/ persistence/ ablate/ report/
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import OocError

STEPS = ("tokens", "stores", "reduce", "universal", "persistence", "ablate", "report")


def step_dir(run_dir, step: str, create: bool = True) -> Path:
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; expected one of {STEPS}")
    path = Path(run_dir) / step
    if create:
        ensure_writable(path)
    return path


def ensure_writable(path) -> Path:
    """Create `path` (a directory) or fail with one line that says how to fix it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OocError(
            f"cannot write to run directory {str(path)!r} ({exc.strerror}); "
            "choose a writable --run-dir or fix its permissions") from None
    return path


def check_free_space(path, need_bytes: int, what: str) -> None:
    """Refuse before starting work when the disk under `path` lacks `need_bytes`."""
    free = shutil.disk_usage(existing_parent(path)).free
    if need_bytes > free:
        raise OocError(
            f"not enough disk for {what}: needs {human_bytes(need_bytes)}, "
            f"{human_bytes(free)} free under {str(existing_parent(path))!r}; "
            "free some space or choose another --run-dir")


def existing_parent(path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    return f"{n:.1f} PB"


def write_json_atomic(path, obj) -> None:
    """Write JSON to a temporary name, fsync, rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(obj):
    import numpy as np
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it to `path` only on success."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def run_lock(run_dir):
    """Hold RUN/.lock for the duration; a second process gets the holder's pid."""
    import fcntl
    run_dir = ensure_writable(run_dir)
    lock_path = Path(run_dir) / ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise OocError(
                f"run directory {str(run_dir)!r} is in use by another process (pid {holder}); "
                "wait for it to finish or use another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock
