"""The run directory: where each step's output lives, atomic writes, and the run lock.

RUN/
  config.toml                the RunConfig actually used
  tokens/                    tokens.npz + meta.json (token set, content hash)
  stores/<label>.h5          activation stores; <label>.h5.partial + .ledger while writing
  reduce/<ref>__<other>.h5   reduced statistics per pair
  universal/ persistence/ ablate/ report/

Integrity: a step that commits a result file also writes `<file>.sha256` beside it (JSON:
the file's sha256 and size, or for an activation store one sha256 per block, and what
produced it: step, token hash, config hash, toolkit version, the checksums of its inputs).
`ooc-universal status --verify` recomputes them. The sidecar of a replaced file is
removed before the rename and written after it, so it never describes another file.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from ooc_universal import faults
from ooc_universal.errors import OocError

STEPS = ("tokens", "stores", "reduce", "universal", "cards", "persistence", "ablate", "report")


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


def read_json_document(path, step: str) -> dict:
    """A JSON object that step `step` wrote at `path`, or one OocError line saying to
    run (or re-run) that step."""
    path = Path(path)
    if not path.is_file():
        raise OocError(f"no {path.name} at {str(path)!r}; run `ooc-universal {step}` first")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise OocError(f"{str(path)!r} is unreadable ({exc}); run `ooc-universal {step}` "
                       "again") from None
    if not isinstance(doc, dict):
        raise OocError(f"{str(path)!r} is not a file written by `ooc-universal {step}`; "
                       "run that step again")
    return doc


def fsync_dir(path) -> None:
    """fsync a directory, so that a rename inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path, obj, record: dict | None = None) -> None:
    """Write JSON to a temporary name, fsync, rename: readers never see half a file.
    With `record` (provenance), also write the checksum sidecar (see commit_file)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        commit_file(tmp, path, record)
    finally:
        if tmp.exists():
            tmp.unlink()


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
def atomic_path(path, record: dict | None = None, fault: str | None = None):
    """Yield a temporary path beside `path`; rename it to `path` only on success.
    With `record` (provenance), also write the checksum sidecar (see commit_file)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        yield tmp
        commit_file(tmp, path, record, fault)
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------------------- checksums

SIDECAR_SUFFIX = ".sha256"


def sidecar_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def file_sha256(path, bufsize: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            buf = f.read(bufsize)
            if not buf:
                return h.hexdigest()
            h.update(buf)


def read_sidecar(path) -> dict | None:
    """The checksum record of `path` (None when there is none or it is unreadable)."""
    try:
        rec = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and "sha256" in rec else None


def recorded_sha256(path) -> str | None:
    rec = read_sidecar(path)
    return None if rec is None else rec["sha256"]


def write_sidecar(path, record: dict) -> None:
    from ooc_universal import __version__
    path = Path(path)
    rec = {"file": path.name, "algorithm": "sha256", "toolkit_version": __version__,
           **record}
    faults.point("sidecar.write")
    write_json_atomic(sidecar_path(path), rec)


def commit_file(tmp, path, record: dict | None = None, fault: str | None = None) -> None:
    """Rename a finished `tmp` to `path`. With `record` (step, token_hash, config_hash,
    inputs...), the sidecar <path>.sha256 gets the file's sha256 and size: the old sidecar
    goes before the rename, the new one comes after it (a kill in between leaves a file
    without a checksum, never one with another file's checksum)."""
    tmp, path = Path(tmp), Path(path)
    if record is not None:
        digest, size = file_sha256(tmp), tmp.stat().st_size
        sidecar_path(path).unlink(missing_ok=True)
    if fault:
        faults.point(f"{fault}.before_rename")
    os.replace(tmp, path)
    if fault:
        faults.point(f"{fault}.after_rename")
    if record is not None:
        write_sidecar(path, {"kind": "file", "sha256": digest, "size": size, **record})


def ensure_sidecar(path, record: dict) -> None:
    """Record the checksum of an existing complete `path` that has none (a kill between
    its rename and its sidecar)."""
    if Path(path).exists() and read_sidecar(path) is None:
        write_sidecar(path, {"kind": "file", "sha256": file_sha256(path),
                             "size": Path(path).stat().st_size, **record})


def config_hash(obj) -> str:
    """sha256 (16 hex) of a JSON-able description of the settings a result depends on."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default)
                          .encode()).hexdigest()[:16]


def disk_full(exc: OSError, what: str) -> OocError:
    """The one-line error for ENOSPC / EDQUOT while writing `what`."""
    return OocError(f"disk full while writing {what} ({exc.strerror or exc}); free some "
                    "space and run the same command again (finished work is kept)")


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, also from h5py, which may report it in the message only."""
    return isinstance(exc, OSError) and (exc.errno in (errno.ENOSPC, errno.EDQUOT)
                                         or "No space left on device" in str(exc)
                                         or "Disk quota exceeded" in str(exc))


@contextmanager
def file_lock(lock_path, what: str, fix: str = "wait for it to finish",
              busy: str = "is in use by"):
    """Hold an exclusive flock on `lock_path`; a second process gets one line with the
    holder's pid (`what` names what is locked, `busy` says what the holder does)."""
    import fcntl
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise OocError(f"{what} {busy} another process (pid {holder}); {fix}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


@contextmanager
def run_lock(run_dir):
    """Hold RUN/.lock for the duration; a second process gets the holder's pid."""
    run_dir = ensure_writable(run_dir)
    with file_lock(Path(run_dir) / ".lock", f"run directory {str(run_dir)!r}",
                   "wait for it to finish or use another --run-dir"):
        yield
