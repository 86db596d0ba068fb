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
removed first and the new one written just before the rename (it names the bytes about
to appear), so a kill at any moment never leaves a complete-looking file without its
checksum: at worst a sidecar whose file is not there yet (the step is simply redone).

Verification on read (`verify_file`): every step checks each input against its sidecar
before using it; a file without a readable sidecar is UNTRUSTED (it cannot be told from a
damaged one) and the step refuses with one line naming the file and how to recompute it.
A file verified once is not re-hashed by the same process while its size, mtime and
inode stay the same (a cache keyed by them). `remove_dead_temporaries` clears the
`*.tmp-<pid>` names that killed writers left, at the start of the next writer.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import threading
import time
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


def human_bytes(n: float, up: bool = False) -> str:
    """'1.2 GB'; `up` rounds up, for a minimum ("raise --memory to at least ...") that
    must not print as the value just refused."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            if unit == "B":
                return f"{math.ceil(n) if up else int(n)} B"
            return f"{math.ceil(n * 10) / 10 if up else n:.1f} {unit}"
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


RUN_ID_FILE = "run_id"


def run_of(path) -> Path | None:
    """The run directory a step output lies in (RUN/<step>/<file>), else None."""
    path = Path(path)
    return path.parent.parent if path.parent.name in STEPS else None


def run_id(run_dir, create: bool = True) -> str | None:
    """The run directory's random id (RUN/run_id, made by the first sidecar written in
    it). Every sidecar records it, so an output copied in from another run directory is
    told apart from one made here (a whole run copied keeps its id)."""
    path = Path(run_dir) / RUN_ID_FILE
    try:
        return path.read_text().strip() or None
    except OSError:
        if not create:
            return None
    tmp = path.with_name(f".{RUN_ID_FILE}.tmp-{os.getpid()}")
    tmp.write_text(os.urandom(8).hex() + "\n")
    try:
        os.link(tmp, path)  # the first writer wins; the others read its id
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def write_sidecar(path, record: dict) -> None:
    from ooc_universal import __version__
    path = Path(path)
    run = run_of(path)
    rec = {"file": path.name, "algorithm": "sha256", "toolkit_version": __version__,
           "written_at": time.time(),
           **({"run_id": run_id(run)} if run is not None and run.is_dir() else {}), **record}
    faults.point("sidecar.write")
    write_json_atomic(sidecar_path(path), rec)


def commit_file(tmp, path, record: dict | None = None, fault: str | None = None) -> None:
    """Rename a finished `tmp` to `path`. With `record` (step, token_hash, config_hash,
    inputs...), the sidecar <path>.sha256 gets the file's sha256 and size, written just
    before the rename: a kill in between leaves a sidecar whose file is missing (or,
    replacing a file, the old bytes under a checksum they fail), never a complete-looking
    file without a checksum, nor one that verifies with another file's checksum."""
    tmp, path = Path(tmp), Path(path)
    if record is not None:
        digest, size = file_sha256(tmp), tmp.stat().st_size
        sidecar_path(path).unlink(missing_ok=True)
        write_sidecar(path, {"kind": "file", "sha256": digest, "size": size, **record})
    if fault:
        faults.point(f"{fault}.before_rename")
    os.replace(tmp, path)
    if fault:
        faults.point(f"{fault}.after_rename")


def ensure_sidecar(path, record: dict) -> None:
    """Record the checksum of an existing complete `path` that has none (a kill between
    its rename and its sidecar)."""
    if Path(path).exists() and read_sidecar(path) is None:
        write_sidecar(path, {"kind": "file", "sha256": file_sha256(path),
                             "size": Path(path).stat().st_size, **record})


def seal(path, record: dict) -> dict:
    """Write (or rewrite) the checksum sidecar of an existing `path` from its bytes now:
    whoever calls this vouches for them (a file made by hand, e.g. in a test). Returns
    the record."""
    path = Path(path)
    sidecar_path(path).unlink(missing_ok=True)
    write_sidecar(path, {"kind": "file", "sha256": file_sha256(path),
                         "size": path.stat().st_size, **record})
    return read_sidecar(path)


# ---------------------------------------------------------------------------- verify on read

_VERIFIED: dict = {}          # file identity -> sha256 verified by this process
_VERIFIED_LOCK = threading.Lock()


def file_identity(path) -> tuple:
    """What must stay the same for a verified file to need no new hash: its real path,
    device, inode, size and modification time (ns)."""
    st = os.stat(path)
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def untrusted(path, what: str, fix: str) -> OocError:
    """The one line for an input without a readable checksum sidecar."""
    path = Path(path)
    return OocError(f"{what} {str(path)!r} is untrusted: no readable checksum sidecar "
                    f"{path.name}{SIDECAR_SUFFIX}, so it cannot be told from a damaged or "
                    f"foreign file; {fix}")


def verify_file(path, what: str, fix: str) -> dict:
    """Check `path` against its sidecar before it is used; returns the sidecar record.

    `what` names the file kind in messages ("reduce output"), `fix` says how to
    recompute it ("delete it and run `ooc-universal reduce` again"). Missing or
    unreadable sidecar: untrusted; size or sha256 that differ: damaged. One OocError
    line either way. Hashed once per process while file_identity stays the same."""
    path = Path(path)
    rec = read_sidecar(path)
    if rec is None:
        raise untrusted(path, what, fix)
    key = file_identity(path)
    with _VERIFIED_LOCK:
        if _VERIFIED.get(key) == rec["sha256"]:
            return rec
    size = key[3]
    if rec.get("size") is not None and size != rec["size"]:
        raise OocError(f"{what} {str(path)!r} is damaged: {size} bytes, its checksum "
                       f"sidecar records {rec['size']}; {fix}")
    digest = file_sha256(path)
    if digest != rec["sha256"]:
        raise OocError(f"{what} {str(path)!r} is damaged: sha256 {digest[:12]}, its "
                       f"checksum sidecar records {str(rec['sha256'])[:12]}; {fix}")
    with _VERIFIED_LOCK:
        _VERIFIED[key] = digest
    return rec


def forget_verified() -> None:
    """Drop this process's cache of verified files (tests; a long-lived notebook)."""
    with _VERIFIED_LOCK:
        _VERIFIED.clear()


# ---------------------------------------------------------------------------- temporaries

TMP_MARK = ".tmp-"


def writer_pid(name: str) -> int | None:
    """The pid in a temporary's name (<name>.tmp-<pid>[-...][.ext]), or None."""
    if TMP_MARK not in name:
        return None
    tail = name.rsplit(TMP_MARK, 1)[-1]
    pid = tail.split("-", 1)[0].split(".", 1)[0]
    return int(pid) if pid.isdigit() else None


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def writer_alive(name: str) -> bool:
    """Is the process whose pid a temporary's name carries still running?"""
    pid = writer_pid(name)
    return pid is not None and pid_alive(pid)


def remove_dead_temporaries(folder, pattern: str = "*.tmp-*") -> list[Path]:
    """Delete the temporaries (files or folders) matching `pattern` in `folder` whose
    writer is dead: what a SIGKILL left. Live writers' temporaries stay."""
    folder = Path(folder)
    gone = []
    for p in sorted(folder.glob(pattern)) if folder.is_dir() else []:
        if writer_pid(p.name) is None or writer_alive(p.name):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(p)
    return gone


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


def refuse_if_run_in_progress(run_dir, step: str) -> None:
    """One line when another process holds RUN/.lock (a `run`, or a step that takes the
    run lock): a step started by hand then would rewrite outputs under that run. The
    holder itself (this process) passes."""
    import fcntl
    lock = Path(run_dir) / ".lock"
    if not lock.exists():
        return
    fd = os.open(lock, os.O_RDONLY)
    try:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if holder.isdigit() and int(holder) == os.getpid():
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise OocError(f"run directory {str(run_dir)!r} is in use by another process "
                           f"(pid {holder or 'unknown'}); `ooc-universal {step}` now would "
                           "rewrite its outputs under it: wait for it to finish or use "
                           "another --run-dir") from None
    finally:
        os.close(fd)


@contextmanager
def run_lock(run_dir):
    """Hold RUN/.lock for the duration; a second process gets the holder's pid."""
    run_dir = ensure_writable(run_dir)
    with file_lock(Path(run_dir) / ".lock", f"run directory {str(run_dir)!r}",
                   "wait for it to finish or use another --run-dir"):
        yield
