"""Activation store: one chunked HDF5 dataset per model@checkpoint, RUN/stores/<label>.h5.

Layout (layout_version 1): dataset "acts", float16 little-endian, shape
(n_tokens, n_layers * d_mlp), chunks (block_tokens, n_neurons). A chunk holds whole rows,
so in an uncompressed store each block of tokens is ONE contiguous byte range of the file,
and `read_block` hands out a zero-copy `np.memmap` view of it (the page cache, not the
heap, holds what is read). Rows are the valid positions of the token set in order;
column = layer * d_mlp + neuron.

Crash safety (writing): the HDF5 file is created complete, with every chunk allocated
(allocation time EARLY, fill time NEVER) and every attribute written, then closed for
good. Blocks are written with os.pwrite at the chunk's byte offset (O_DIRECT from a
page-aligned whole-chunk buffer where the filesystem allows: no copy into the page
cache; else through it, its pages dropped once synced), fdatasync'ed, then recorded in
an append-only ledger beside the file. HDF5 metadata is never touched after
creation, so a SIGKILL at any moment leaves a valid file plus a ledger that says which
blocks are real. While being written the store is `<label>.h5.partial` + `<label>.ledger`;
the name `<label>.h5` appears (by rename) only when every block is in the ledger.

Checksums: each ledger line carries the sha256 of the block's rows (fp16 bytes, C order),
taken from the buffer as it is written (no re-read). At the end they go to
`<label>.h5.sha256` (rundir's sidecar; kind "blocks"), written before the rename, so
`ooc-universal status --verify` can check every block of the finished store.

Verification on read (open_store(path, verify=True), the default): opening refuses a
store without a readable, consistent sidecar (untrusted) and one whose `label`
attribute is not its file name (a store copied over another); each block is hashed
against its recorded sha256 the first time this process reads it (read_block, and so
every slice), so a flipped byte is never computed on, and a pass that reads a block
again pays nothing (a per-process set of verified blocks, keyed by the file's identity).
The hash runs at memory speed on pages the reader faults in anyway (the cost is
measured by bench_store_verify in tests/test_integrity.py). `verify=False` is for
readers that check the checksums themselves (`status --verify`).
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ooc_universal import __version__, faults
from ooc_universal.errors import OocError, StaleInputError
from ooc_universal.rundir import (config_hash, disk_full, file_identity, file_lock, fsync_dir,
                                  is_disk_full, read_sidecar, untrusted, write_sidecar)

LAYOUT_VERSION = 1
DATASET = "acts"
DTYPE = np.dtype("<f2")
BLOCK_TARGET_BYTES = 32 * 2**20     # about 32 MB per chunk (one token block)
BLOCK_ROW_MULTIPLE = 64
ALIGNMENT = 4096                    # chunk data starts page-aligned (mmap, O_DIRECT)
LEDGER_MAGIC = "ooc-universal activation-store ledger"
REQUIRED_ATTRS = ("model_id", "revision", "label", "name", "step", "n_layers", "d_mlp",
                  "n_tokens", "token_hash", "dtype", "layout_version", "block_tokens",
                  "compression", "toolkit_version")
COMPRESSIONS = ("none", "gzip", "lzf")


# ---------------------------------------------------------------------------- sizes

def default_block_tokens(n_tokens: int, n_neurons: int,
                         target_bytes: int = BLOCK_TARGET_BYTES) -> int:
    """Rows per chunk: about `target_bytes`, a multiple of 64, at least 64, at most n_tokens."""
    if n_tokens < 1 or n_neurons < 1:
        raise ValueError(f"need n_tokens >= 1 and n_neurons >= 1, got {n_tokens}, {n_neurons}")
    rows = target_bytes // (n_neurons * DTYPE.itemsize)
    rows = max(BLOCK_ROW_MULTIPLE, rows // BLOCK_ROW_MULTIPLE * BLOCK_ROW_MULTIPLE)
    return int(min(rows, n_tokens))


def expected_store_bytes(n_tokens: int, n_neurons: int, block_tokens: int | None = None) -> int:
    """Bytes an uncompressed store takes on disk (chunk padding, alignment, metadata)."""
    block_tokens = block_tokens or default_block_tokens(n_tokens, n_neurons)
    n_blocks = math.ceil(n_tokens / block_tokens)
    chunk = block_tokens * n_neurons * DTYPE.itemsize
    dims = n_neurons * 12 + n_tokens * 8 + 8 * ALIGNMENT  # write_dims' coordinates
    return n_blocks * (chunk + ALIGNMENT + 64) + 256 * 1024 + dims


def parse_compression(spec) -> tuple[str, object]:
    """'none' | 'gzip' | 'gzip:N' (N = 0..9) | 'lzf' -> (h5py name or 'none', options)."""
    text = "none" if spec in (None, "", False) else str(spec).strip().lower()
    name, _, level = text.partition(":")
    if name not in COMPRESSIONS or (level and (name != "gzip" or not level.isdigit()
                                               or not 0 <= int(level) <= 9)):
        raise OocError(f"unknown compression {spec!r}; expected none, gzip, gzip:0..9 or lzf")
    return name, (int(level) if level else (4 if name == "gzip" else None))


@dataclass(frozen=True)
class StorePaths:
    final: Path       # <label>.h5, exists only when complete
    partial: Path     # <label>.h5.partial while being written
    ledger: Path      # <label>.ledger, finished blocks of the partial
    lock: Path        # .<label>.lock, one writer per store

    @classmethod
    def of(cls, stores_dir, label: str) -> "StorePaths":
        d = Path(stores_dir)
        return cls(d / f"{label}.h5", d / f"{label}.h5.partial", d / f"{label}.ledger",
                   d / f".{label}.lock")


def remove_stale_temporaries(paths: StorePaths) -> list[Path]:
    """Delete temporaries a killed writer of this store left (ledger, compressed copy,
    checksum sidecar). Call with store_lock held: no live writer owns them then."""
    gone = []
    for name in (paths.ledger.name, paths.final.name, paths.final.name + ".sha256"):
        for p in paths.final.parent.glob(f"{name}.tmp-*"):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


@contextmanager
def store_lock(paths: StorePaths):
    """One writer per store (other stores of the run may be extracted in parallel)."""
    with file_lock(paths.lock, f"activation store {str(paths.final)!r}",
                   busy="is being written by"):
        yield


def identity_mismatch(attrs: dict, expected: dict) -> list[str]:
    """'key: store has X, wanted Y' for every key of `expected` that differs."""
    out = []
    for key, want in expected.items():
        have = attrs.get(key)
        if plain_attr(have) != plain_attr(want):
            out.append(f"{key}: store has {have!r}, wanted {want!r}")
    return out


def plain_attr(v):
    """An HDF5 attribute as a plain Python value (bytes -> str, numpy scalar -> item)."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


# ---------------------------------------------------------------------------- writing

class PartialStore:
    """A store being written: <label>.h5.partial (HDF5, metadata final) + <label>.ledger.

    Ledger: line 1 is a JSON header (attrs, shape, each chunk's byte offset); every
    further line is `done <block> <sha256 of its rows>`. Only complete lines count.
    """

    def __init__(self, paths: StorePaths, header: dict, done: set, digests: dict | None = None):
        self.paths = paths
        self.header = header
        self.attrs = header["attrs"]
        self.n_tokens = int(header["n_tokens"])
        self.n_neurons = int(header["n_neurons"])
        self.block_tokens = int(header["block_tokens"])
        self.offsets = [int(o) for o in header["chunk_offsets"]]
        self.chunk_nbytes = self.block_tokens * self.n_neurons * DTYPE.itemsize
        self.done = set(done)
        self.digests = dict(digests or {})
        self._fd = os.open(paths.partial, os.O_RDWR)
        self._direct_fd = _open_direct(paths.partial)  # None where O_DIRECT is refused
        self._ledger_fd = os.open(paths.ledger, os.O_WRONLY | os.O_APPEND)
        self._pad = None

    @property
    def n_blocks(self) -> int:
        return len(self.offsets)

    def block_bounds(self, i: int) -> tuple[int, int]:
        return i * self.block_tokens, min(self.n_tokens, (i + 1) * self.block_tokens)

    def missing(self) -> list[int]:
        return [i for i in range(self.n_blocks) if i not in self.done]

    # -- creation / resume
    @classmethod
    def create(cls, paths: StorePaths, attrs: dict, n_tokens: int, n_neurons: int,
               block_tokens: int | None = None,
               row_coords: dict | None = None) -> "PartialStore":
        """Make the partial file with all chunks allocated and all attrs final, then the
        ledger. `row_coords` ({"window": (n_tokens,), "position": (n_tokens,)} ints): where
        each row comes from in the token set, stored as coordinates of the token axis."""
        block_tokens = block_tokens or default_block_tokens(n_tokens, n_neurons)
        if not 1 <= block_tokens <= n_tokens:
            raise ValueError(f"block_tokens must be in 1..{n_tokens}, got {block_tokens}")
        for p in (paths.partial, paths.ledger):
            p.unlink(missing_ok=True)
        attrs = dict(attrs, n_tokens=int(n_tokens), dtype="float16",
                     layout_version=LAYOUT_VERSION, block_tokens=int(block_tokens),
                     compression="none", toolkit_version=__version__)
        missing = [k for k in REQUIRED_ATTRS if k not in attrs]
        if missing:
            raise ValueError(f"store attrs lack {missing}")
        if int(attrs["n_layers"]) * int(attrs["d_mlp"]) != n_neurons:
            raise ValueError(f"n_layers * d_mlp = {attrs['n_layers']} * {attrs['d_mlp']} "
                             f"!= n_neurons {n_neurons}")
        with h5py.File(paths.partial, "w", alignment_threshold=1,
                       alignment_interval=ALIGNMENT) as f:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_chunk((block_tokens, n_neurons))
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            dcpl.set_obj_track_times(False)  # no timestamps: same inputs, same bytes
            space = h5py.h5s.create_simple((n_tokens, n_neurons), (n_tokens, n_neurons))
            dsid = h5py.h5d.create(f.id, DATASET.encode(), h5py.h5t.IEEE_F16LE, space,
                                   dcpl=dcpl)
            ds = h5py.Dataset(dsid)
            faults.point("store.create.h5")  # the HDF5 file is open for writing here
            for k, v in attrs.items():
                ds.attrs[k] = v
            write_dims(f, ds, int(attrs["n_layers"]), int(attrs["d_mlp"]), row_coords)
            offsets = _chunk_offsets(ds, block_tokens)
        fd = os.open(paths.partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        header = {"magic": LEDGER_MAGIC, "layout_version": LAYOUT_VERSION,
                  "attrs": {k: plain_attr(v) for k, v in attrs.items()},
                  "n_tokens": int(n_tokens), "n_neurons": int(n_neurons),
                  "block_tokens": int(block_tokens), "chunk_offsets": offsets}
        tmp = paths.ledger.with_name(paths.ledger.name + f".tmp-{os.getpid()}")
        with open(tmp, "w") as fh:
            fh.write(json.dumps(header, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        faults.point("store.create.before_ledger")
        os.replace(tmp, paths.ledger)
        fsync_dir(paths.ledger.parent)
        return cls(paths, header, set())

    @classmethod
    def resume(cls, paths: StorePaths) -> "PartialStore | None":
        """The partial store with its finished blocks, or None when there is nothing usable
        (no partial, no ledger, or a kill before the ledger header was complete)."""
        if not (paths.partial.exists() and paths.ledger.exists()):
            return None
        with open(paths.ledger, "rb") as fh:
            raw = fh.read()
        complete = raw[: raw.rfind(b"\n") + 1]  # drop a line torn by a kill
        lines = complete.decode(errors="replace").splitlines()
        try:
            header = json.loads(lines[0])
            if header.get("magic") != LEDGER_MAGIC:
                return None
        except (IndexError, ValueError):
            return None
        if len(complete) != len(raw):
            with open(paths.ledger, "r+b") as fh:
                fh.truncate(len(complete))
                os.fsync(fh.fileno())
        n_blocks = len(header["chunk_offsets"])
        done, digests = set(), {}
        for line in lines[1:]:
            word, num, digest = (line.split(" ") + ["", ""])[:3]
            if word == "done" and num.isdigit() and int(num) < n_blocks:
                done.add(int(num))
                if len(digest) == 64:
                    digests[int(num)] = digest
        # The partial must be the file this ledger describes (same chunk offsets).
        try:
            with h5py.File(paths.partial, "r") as f:
                offsets = _chunk_offsets(f[DATASET], int(header["block_tokens"]))
        except (OSError, KeyError, OocError):
            return None
        if offsets != header["chunk_offsets"]:
            return None
        return cls(paths, header, done, digests)

    # -- blocks
    def write_block(self, i: int, block: np.ndarray) -> None:
        """Write block i (rows block_bounds(i), float16, C order) and record it as done.

        `block` may have block_tokens rows (rows past n_tokens must be zero) or exactly
        the block's rows; the chunk's tail past n_tokens is written as zeros either way.
        """
        start, stop = self.block_bounds(i)
        rows = stop - start
        if block.dtype != DTYPE or block.ndim != 2 or block.shape[1] != self.n_neurons \
                or block.shape[0] not in (rows, self.block_tokens) or not block.flags.c_contiguous:
            raise ValueError(f"block {i} must be C-contiguous float16 ({rows} or "
                             f"{self.block_tokens}, {self.n_neurons}), got {block.dtype} "
                             f"{block.shape}")
        offset = self.offsets[i]
        digest = rows_sha256(block[:rows])  # from the buffer as written: no re-read
        line = f"done {i} {digest}\n".encode()
        try:
            faults.point("store.block.write")
            self._write_chunk(block, offset)
            os.fdatasync(self._fd)
            _drop_cached(self._fd, offset, self.chunk_nbytes)
            faults.point("store.block.before_ledger")
            faults.point("store.ledger.mid_append", torn=lambda: (
                os.write(self._ledger_fd, line[: len(line) // 2]), os.fsync(self._ledger_fd)))
            faults.point("store.ledger.write")
            os.write(self._ledger_fd, line)
            os.fsync(self._ledger_fd)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full(exc, f"block {i} of {str(self.paths.partial)!r}") from None
            raise
        self.done.add(i)
        self.digests[i] = digest
        faults.point("store.block.after_ledger")

    def finalize(self, compression=None) -> Path:
        """All blocks done: rename (or repack compressed) to <label>.h5; drop the ledger."""
        if len(self.done) != self.n_blocks:
            raise RuntimeError(f"finalize with {self.n_blocks - len(self.done)} blocks missing")
        name, opts = parse_compression(compression)
        os.fsync(self._fd)
        digests = self.block_digests()
        self.close()
        final = self.paths.final
        try:
            if name == "none":
                self._write_sidecar(digests, self.paths.partial, "none")
                faults.point("store.finalize.before_rename")
                os.replace(self.paths.partial, final)
            else:
                tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
                label = "none" if compression is None else str(compression).lower()
                try:
                    _repack(self.paths.partial, tmp, self.header, name, opts, label)
                    self._write_sidecar(digests, tmp, label)
                    faults.point("store.finalize.before_rename")
                    os.replace(tmp, final)
                finally:
                    tmp.unlink(missing_ok=True)
                self.paths.partial.unlink()
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full(exc, f"activation store {str(final)!r}") from None
            raise
        fsync_dir(final.parent)
        faults.point("store.finalize.after_rename")
        self.paths.ledger.unlink(missing_ok=True)
        fsync_dir(final.parent)
        return final

    def _write_chunk(self, block: np.ndarray, offset: int) -> None:
        """block's bytes at `offset`, zeros to the chunk's end; in two halves (a fault
        point between them). Straight from the buffer to the disk (O_DIRECT) when the
        buffer is a whole, page-aligned chunk (aligned_block_buffer), else through the
        page cache."""
        data = memoryview(block).cast("B")
        fd, unit = self._fd, 1
        if self._direct_fd is not None and _direct_ok(block, self.chunk_nbytes):
            fd, unit = self._direct_fd, ALIGNMENT
        half = len(data) // 2 // unit * unit
        try:
            _pwrite_all(fd, data[:half], offset)
            faults.point("store.block.mid_write")  # half a block on disk, not ledgered
            _pwrite_all(fd, data[half:], offset + half)
        except OSError as exc:
            if fd == self._fd or exc.errno != errno.EINVAL:
                raise
            self._stop_direct()  # the filesystem took the open but not the write
            return self._write_chunk(block, offset)
        tail = self.chunk_nbytes - block.nbytes
        if tail:
            if self._pad is None or len(self._pad) < tail:
                self._pad = bytes(tail)
            _pwrite_all(self._fd, memoryview(self._pad)[:tail], offset + block.nbytes)

    def _stop_direct(self) -> None:
        os.close(self._direct_fd)
        self._direct_fd = None

    def block_digests(self) -> list[str]:
        """sha256 of each block's rows: from the ledger, or read back from the partial
        file for blocks ledgered without one."""
        out = []
        for i in range(self.n_blocks):
            d = self.digests.get(i)
            if d is None:
                start, stop = self.block_bounds(i)
                n = (stop - start) * self.n_neurons * DTYPE.itemsize
                d = hashlib.sha256(os.pread(self._fd, n, self.offsets[i])).hexdigest()
            out.append(d)
        return out

    def _write_sidecar(self, digests: list, data_file: Path, compression: str) -> None:
        """<label>.h5.sha256 for the finished store (before its rename: see module doc)."""
        attrs = dict(self.attrs, compression=compression)
        write_sidecar(self.paths.final, {
            "kind": "blocks", "step": "extract", "sha256": blocks_sha256(digests),
            "block_sha256": digests, "block_tokens": self.block_tokens,
            "n_tokens": self.n_tokens, "n_neurons": self.n_neurons,
            "size": Path(data_file).stat().st_size,
            "token_hash": str(attrs.get("token_hash", "")),
            "config_hash": config_hash({k: v for k, v in attrs.items()
                                        if k != "toolkit_version"}),
            "inputs": {"tokens": str(attrs.get("token_hash", ""))}})

    def close(self) -> None:
        for attr in ("_fd", "_direct_fd", "_ledger_fd"):
            fd = getattr(self, attr, None)
            if fd is not None:
                os.close(fd)
                setattr(self, attr, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def aligned_block_buffer(rows: int, n_neurons: int) -> np.ndarray:
    """An empty (rows, n_neurons) float16 buffer starting on an ALIGNMENT boundary, so
    that write_block can hand it to the disk without a copy (O_DIRECT)."""
    nbytes = rows * n_neurons * DTYPE.itemsize
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start: start + nbytes].view(DTYPE).reshape(rows, n_neurons)


def _open_direct(path) -> int | None:
    """A write descriptor that bypasses the page cache, or None (no O_DIRECT here, or
    the filesystem refuses it: tmpfs)."""
    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None


def _direct_ok(block: np.ndarray, chunk_nbytes: int) -> bool:
    """O_DIRECT needs an aligned address, offset and length: a whole chunk (the store
    aligns chunk offsets to ALIGNMENT) of a size that is a multiple of it."""
    return (block.nbytes == chunk_nbytes and chunk_nbytes % ALIGNMENT == 0
            and block.ctypes.data % ALIGNMENT == 0)


def _drop_cached(fd: int, offset: int, nbytes: int) -> None:
    """Let the kernel drop a block's pages from the page cache once they are on disk.

    Why: a store is written once and read much later (a pass per reduce), so keeping it
    cached only evicts everything else; and the next block's pwrite then reuses freed
    pages instead of taking fresh ones, which cost the writer thread (competing with
    the forward pass's threads) about 1 CPU-s per 430 MB here (measured). Advisory:
    where fadvise does not exist, nothing happens."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def rows_sha256(rows) -> str:
    """sha256 of a block's rows as stored (fp16 bytes, C order): a ledger line's digest."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(rows)).cast("B")).hexdigest()


def blocks_sha256(digests) -> str:
    """A store's content checksum: sha256 of its blocks' sha256 digests, in order."""
    return hashlib.sha256(b"".join(bytes.fromhex(d) for d in digests)).hexdigest()


def verify_store_blocks(path, record: dict) -> list[str]:
    """Problems found re-hashing every block of the store at `path` against `record`
    (its sidecar); [] when every block matches."""
    digests = record.get("block_sha256") or []
    with open_store(path, verify=False) as st:
        if st.n_blocks != len(digests) or st.block_tokens != record.get("block_tokens"):
            return [f"has {st.n_blocks} blocks of {st.block_tokens} rows, the checksum "
                    f"record {len(digests)} of {record.get('block_tokens')}"]
        bad = [i for i in range(st.n_blocks) if st.block_sha256(i) != digests[i]]
    if bad:
        return [f"block(s) {', '.join(map(str, bad[:10]))}{' ...' if len(bad) > 10 else ''}"
                f" of {len(digests)} differ from their recorded sha256"]
    if blocks_sha256(digests) != record.get("sha256"):
        return ["the block checksums do not add up to the recorded store checksum"]
    return []


def _chunk_offsets(ds, block_tokens: int) -> list[int]:
    """Byte offset of each chunk in token order (every chunk must be allocated)."""
    n_blocks = math.ceil(ds.shape[0] / block_tokens)
    offsets = []
    for i in range(n_blocks):
        info = ds.id.get_chunk_info_by_coord((i * block_tokens, 0))
        if info.byte_offset is None or info.size == 0:
            raise OocError(f"chunk {i} of {ds.file.filename!r} is not allocated")
        offsets.append(int(info.byte_offset))
    return offsets


# HDF5 dimension scales (h5py's dims API; netCDF-4 conventions, so xarray's h5netcdf
# engine names the axes): acts is (token, neuron); neuron carries the coordinates layer
# and index (flat = layer * d_mlp + index); token carries window and position (where the
# row is in the token set) when the writer gives them. `token` is a dimension-only scale
# that is never written, so it takes no space. Readers that know only "acts" are
# unaffected (layout_version stays 1: the datasets are additive).
DIM_ATTRS = ("DIMENSION_LIST", "REFERENCE_LIST", "CLASS", "NAME", "_Netcdf4Dimid",
             "_Netcdf4Coordinates", "coordinates", "_nc3_strict")
NETCDF_DIM_ONLY = "This is a netCDF dimension but not a netCDF variable."


def write_dims(f, acts, n_layers: int, d_mlp: int, row_coords: dict | None = None) -> None:
    """Dimension scales and coordinates of the store's axes (see above)."""
    n_tokens, n_neurons = acts.shape
    token = f.create_dataset("token", (n_tokens,), "i4")  # never written: no storage
    token.make_scale(f"{NETCDF_DIM_ONLY}{n_tokens:>10}")
    flat = np.arange(n_neurons, dtype=np.int64)
    neuron = f.create_dataset("neuron", data=flat.astype(np.int32))
    neuron.make_scale("neuron")
    acts.dims[0].attach_scale(token)
    acts.dims[1].attach_scale(neuron)
    coords = ["layer", "index"]
    for name, values in (("layer", flat // d_mlp), ("index", flat % d_mlp)):
        f.create_dataset(name, data=values.astype(np.int32)).dims[0].attach_scale(neuron)
    for name in ("window", "position"):
        if row_coords is not None and row_coords.get(name) is not None:
            values = np.asarray(row_coords[name], np.int32)
            if values.shape != (n_tokens,):
                raise ValueError(f"row_coords[{name!r}] has shape {values.shape}, the store "
                                 f"has {n_tokens} rows")
            f.create_dataset(name, data=values).dims[0].attach_scale(token)
            coords.append(name)
    acts.attrs["coordinates"] = " ".join(coords)


def _repack(src: Path, dst: Path, header: dict, name: str, opts, label: str) -> None:
    """Copy the uncompressed partial into a compressed store, one chunk at a time."""
    bt, n, m = header["block_tokens"], header["n_tokens"], header["n_neurons"]
    raw = np.memmap(src, dtype=np.uint8, mode="r")
    try:
        with h5py.File(dst, "w") as f:
            ds = f.create_dataset(DATASET, shape=(n, m), dtype=DTYPE, chunks=(bt, m),
                                  compression=name, compression_opts=opts,
                                  shuffle=True)
            for k, v in header["attrs"].items():
                ds.attrs[k] = v
            ds.attrs["compression"] = label
            _copy_dims(src, f, ds, header)
            chunk = bt * m * DTYPE.itemsize
            for i, off in enumerate(header["chunk_offsets"]):
                start, stop = i * bt, min(n, (i + 1) * bt)
                view = raw[off: off + chunk].view(DTYPE).reshape(bt, m)
                ds[start:stop] = view[: stop - start]
                faults.point("store.repack.chunk")  # the compressed HDF5 file is open here
        with open(dst, "rb") as fh:
            os.fsync(fh.fileno())
    finally:
        del raw


def _copy_dims(src: Path, f, ds, header: dict) -> None:
    """The partial's row coordinates (window, position) and dims, into the repacked file."""
    rows = {}
    with h5py.File(src, "r") as g:
        for name in ("window", "position"):
            if name in g:
                rows[name] = g[name][...]
    attrs = header["attrs"]
    write_dims(f, ds, int(attrs["n_layers"]), int(attrs["d_mlp"]), rows or None)


# ---------------------------------------------------------------------------- reading

def open_store(path, verify: bool = True) -> "ActivationStore":
    """Open a complete activation store for reading (validated; see ActivationStore).
    verify=True (the default): its checksum sidecar must be there and each block is
    checked against it when first read (see the module doc)."""
    return ActivationStore(path, verify=verify)


_VERIFIED_BLOCKS: set = set()     # (file identity, block) hashed and found right
_VERIFIED_LOCK = threading.Lock()


class ActivationStore:
    """A complete store, read-only, in NumPy's vocabulary: rows are token positions
    (the token set's valid positions in order), columns are neurons (layer * d_mlp + i).

      store.shape, store.dtype, store.ndim, len(store)    (n_tokens, n_neurons), float16
      store.chunks                                        (block_tokens, n_neurons)
      store[i], store[i:j], store[i:j, cols]              a new array (as h5py slices)
      np.asarray(store)                                   the whole store, in memory
      store.read_block(i)                                 token block i (a chunk): zero-copy
      store.block_sha256(i), store.recorded_block_sha256(i)   its checksum, now / recorded
      store.release_rows(start, stop)                     unmap rows read (RSS stays flat)

    Uncompressed stores (memory_mapped) never go through HDF5 after opening: blocks are
    views of one read-only np.memmap of the file, so reads are thread-safe and free of
    HDF5's lock, and the object pickles as its path. Compressed stores read through h5py.
    """

    def __init__(self, path, verify: bool = True):
        self.path = Path(path)
        self.verify = verify
        self._mm = None
        self._h5 = None
        self._buf = None
        self._sidecar = None
        self._digests = None
        self._identity = None
        self._open()
        if verify:
            try:
                self._check_sidecar()
            except BaseException:
                self.close()
                raise

    def _fail(self, why: str) -> OocError:
        return OocError(f"activation store {str(self.path)!r} {why}; delete it and run "
                        "`ooc-universal extract` again")

    # -- opening
    def _open(self) -> None:
        self._check_exists()
        try:
            f = h5py.File(self.path, "r")
        except OSError as exc:
            raise self._fail(f"is not a readable HDF5 file (truncated or corrupt: {exc})") \
                from None
        try:
            self._read_layout(f)
        except BaseException:
            f.close()
            raise
        if self.compressed:
            self._h5 = f
            return
        f.close()
        self._map_file()

    def _check_sidecar(self) -> None:
        """The sidecar must be readable and describe this store block by block, and the
        store must be the one its file name says (label attribute)."""
        fix = "delete it and run `ooc-universal extract` again"
        rec = read_sidecar(self.path)
        if rec is None:
            raise untrusted(self.path, "activation store", fix)
        digests = rec.get("block_sha256")
        if rec.get("kind") != "blocks" or not isinstance(digests, list) \
                or len(digests) != self.n_blocks or rec.get("block_tokens") != self.block_tokens \
                or blocks_sha256(digests) != rec.get("sha256"):
            raise self._fail(f"does not match its checksum sidecar {self.path.name}.sha256 "
                             f"({len(digests or [])} block checksums of "
                             f"{rec.get('block_tokens')} rows recorded, the store has "
                             f"{self.n_blocks} blocks of {self.block_tokens})")
        stem = self.path.name[:-3] if self.path.name.endswith(".h5") else None
        if self.path.parent.name == "stores" and stem and str(self.attrs["label"]) != stem:
            raise self._fail(f"holds the activation store of {self.attrs['label']!r}, not "
                             f"of {stem!r} (a store copied over another?)")
        self._sidecar, self._digests = rec, digests
        self._identity = file_identity(self.path)

    def _check_block(self, i: int, rows: np.ndarray) -> None:
        """Block i's rows against their recorded sha256, once per process."""
        key = (self._identity, i)
        if key in _VERIFIED_BLOCKS:
            return
        if rows_sha256(rows) != self._digests[i]:
            raise self._fail(f"is damaged: block {i} of {self.n_blocks} (rows "
                             f"{i * self.block_tokens}..) differs from its recorded sha256")
        with _VERIFIED_LOCK:
            _VERIFIED_BLOCKS.add(key)

    def _check_exists(self) -> None:
        p = self.path
        if p.exists():
            return
        partial = p.with_name(p.name + ".partial")
        if partial.exists():
            raise OocError(f"activation store {str(p)!r} is incomplete ({partial.name} "
                           "exists); run the same `ooc-universal extract` again to finish it")
        raise OocError(f"activation store {str(p)!r} does not exist; "
                       "run `ooc-universal extract` first")

    def _read_layout(self, f) -> None:
        """Attributes, shape and chunking of the dataset, checked against each other."""
        if DATASET not in f:
            raise self._fail(f"has no dataset {DATASET!r}")
        ds = f[DATASET]
        attrs = self._checked_attrs(ds)
        n_tokens, n_layers, d_mlp = (int(attrs[k]) for k in ("n_tokens", "n_layers", "d_mlp"))
        bt, n_neurons = int(attrs["block_tokens"]), n_layers * d_mlp
        if ds.shape != (n_tokens, n_neurons) or ds.dtype != DTYPE \
                or ds.chunks != (bt, n_neurons):
            raise self._fail(f"has dataset shape {ds.shape} {ds.dtype} chunks {ds.chunks}, "
                             f"attrs say ({n_tokens}, {n_neurons}) float16 chunks "
                             f"({bt}, {n_neurons})")
        self.attrs = attrs
        self.n_tokens, self.n_layers, self.d_mlp = n_tokens, n_layers, d_mlp
        self.n_neurons = n_neurons
        self.block_tokens = bt
        self.compressed = ds.id.get_create_plist().get_nfilters() > 0
        if not self.compressed:
            try:
                self._offsets = _chunk_offsets(ds, bt)
            except (OocError, RuntimeError, ValueError) as exc:
                raise self._fail(f"has unallocated chunks ({exc})") from None

    def _checked_attrs(self, ds) -> dict:
        attrs = {k: plain_attr(v) for k, v in ds.attrs.items() if k not in DIM_ATTRS}
        missing = [k for k in REQUIRED_ATTRS if k not in attrs]
        if missing:
            raise self._fail(f"lacks attributes {missing}")
        if attrs["layout_version"] != LAYOUT_VERSION:
            raise OocError(f"activation store {str(self.path)!r} has layout_version "
                           f"{attrs['layout_version']}, this toolkit reads "
                           f"{LAYOUT_VERSION}; re-extract it with this version")
        return attrs

    def _map_file(self) -> None:
        need = max(self._offsets) + self._chunk_nbytes
        size = self.path.stat().st_size
        if size < need:
            raise self._fail(f"is truncated ({size} bytes, needs {need})")
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")

    @property
    def _chunk_nbytes(self) -> int:
        return self.block_tokens * self.n_neurons * DTYPE.itemsize

    # -- NumPy's vocabulary
    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_tokens, self.n_neurons)

    @property
    def dtype(self) -> np.dtype:
        return DTYPE

    @property
    def ndim(self) -> int:
        return 2

    @property
    def chunks(self) -> tuple[int, int]:
        """(rows, columns) of one chunk: a token block holds whole rows."""
        return (self.block_tokens, self.n_neurons)

    def __len__(self) -> int:
        return self.n_tokens

    def __getitem__(self, key) -> np.ndarray:
        """store[i] (one row), store[i:j(:k)] (rows), store[rows, cols]: a new array."""
        rows, cols = (key if isinstance(key, tuple) and len(key) == 2 else (key, None))
        if isinstance(rows, (int, np.integer)):
            out = self.read_rows(*self._row_range(int(rows)))[0]
        elif isinstance(rows, slice):
            out = self._read_slice(rows)
        else:
            raise TypeError(f"activation store rows take an integer or a slice, not "
                            f"{type(rows).__name__}; read rows first, then index them")
        return out if cols is None else out[..., cols]

    def _row_range(self, i: int) -> tuple[int, int]:
        j = i + self.n_tokens if i < 0 else i
        if not 0 <= j < self.n_tokens:
            raise IndexError(f"row {i} out of range for {self.n_tokens} rows")
        return j, j + 1

    def _read_slice(self, rows: slice) -> np.ndarray:
        r = range(*rows.indices(self.n_tokens))
        if len(r) == 0:
            return np.empty((0, self.n_neurons), DTYPE)
        if r.step == 1:
            return self.read_rows(r.start, r.stop)
        lo, hi = min(r), max(r) + 1
        return self.read_rows(lo, hi)[np.asarray(r) - lo]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.read_rows(0, self.n_tokens)
        return out if dtype is None else out.astype(dtype, copy=False)

    # -- token blocks (the chunks)
    @property
    def n_blocks(self) -> int:
        return math.ceil(self.n_tokens / self.block_tokens)

    @property
    def memory_mapped(self) -> bool:
        """True when read_block hands out zero-copy views of the file (uncompressed)."""
        return self._mm is not None

    def block_bounds(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.n_blocks:
            raise IndexError(f"block {i} out of range 0..{self.n_blocks - 1}")
        return i * self.block_tokens, min(self.n_tokens, (i + 1) * self.block_tokens)

    def block_offset(self, i: int) -> int | None:
        """Byte offset of block i's first row in the file; None in a compressed store."""
        self.block_bounds(i)
        return None if self.compressed else self._offsets[i]

    def read_block(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows block_bounds(i) as float16 (rows, n_neurons).

        Uncompressed: a read-only zero-copy np.memmap view of the chunk (no heap copy).
        Compressed: decoded into a buffer that the NEXT read_block call overwrites; pass
        `out` (shape (rows, n_neurons), float16) to keep the result.
        """
        out = self._read_block_raw(i, out)
        if self._digests is not None:
            self._check_block(i, out)
        return out

    def _read_block_raw(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """read_block without the checksum check."""
        start, stop = self.block_bounds(i)
        rows = stop - start
        if self._mm is not None:
            view = self._block_view(i, rows)
            if out is None:
                return view
            out[...] = view
            return out
        if out is None:
            if self._buf is None:
                self._buf = np.empty((self.block_tokens, self.n_neurons), DTYPE)
            out = self._buf[:rows]
        self._h5[DATASET].read_direct(out, np.s_[start:stop], np.s_[0:rows])
        return out

    def _block_view(self, i: int, rows: int) -> np.ndarray:
        off = self._offsets[i]
        view = self._mm[off: off + rows * self.n_neurons * DTYPE.itemsize]
        return view.view(DTYPE).reshape(rows, self.n_neurons)

    def block_sha256(self, i: int) -> str:
        """sha256 of block i's rows as they are in the file now (reads the block)."""
        return rows_sha256(self._read_block_raw(i))

    def recorded_block_sha256(self, i: int) -> str | None:
        """The sha256 recorded for block i when the store was written (its .sha256
        sidecar); None when the store has no block checksums."""
        self.block_bounds(i)
        if self._sidecar is None:
            self._sidecar = read_sidecar(self.path) or {}
        digests = self._sidecar.get("block_sha256") or []
        return digests[i] if len(digests) == self.n_blocks else None

    def release_rows(self, start: int, stop: int) -> None:
        """Drop rows [start, stop) from this process's resident set (uncompressed stores).

        Mapped file pages count in RSS until unmapped, so a pass over a store would grow
        RSS with the tokens read although the kernel may reclaim them; MADV_DONTNEED on a
        read-only file mapping only unmaps (the page cache keeps the data, a later read
        faults it back in), so RSS stays flat. Whole pages inside the range only."""
        mm = getattr(self._mm, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise") or stop <= start:
            return
        import mmap
        page, row_bytes, bt = mmap.PAGESIZE, self.n_neurons * DTYPE.itemsize, self.block_tokens
        for i in range(start // bt, (stop - 1) // bt + 1):
            c0, c1 = self.block_bounds(i)
            lo = self._offsets[i] + (max(start, c0) - c0) * row_bytes
            hi = self._offsets[i] + (min(stop, c1) - c0) * row_bytes
            lo, hi = -(-lo // page) * page, hi // page * page
            if hi > lo:
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a new float16 array (any range, across chunk bounds)."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"rows [{start}, {stop}) out of range 0..{self.n_tokens}")
        if self._h5 is not None:
            if self._digests is not None:  # compressed: check the blocks read first
                bt = self.block_tokens
                for i in range(start // bt, (stop - 1) // bt + 1 if stop > start else 0):
                    if (self._identity, i) not in _VERIFIED_BLOCKS:
                        self._check_block(i, self._read_block_raw(i))
            return self._h5[DATASET][start:stop]
        out = np.empty((stop - start, self.n_neurons), DTYPE)
        bt = self.block_tokens
        for i in range(start // bt, (stop - 1) // bt + 1 if stop > start else start // bt):
            b0, b1 = self.block_bounds(i)
            lo, hi = max(start, b0), min(stop, b1)
            out[lo - start: hi - start] = self.read_block(i)[lo - b0: hi - b0]
        return out

    def blocks(self):
        """Yield (start, stop, block) over the whole store in order."""
        for i in range(self.n_blocks):
            start, stop = self.block_bounds(i)
            yield start, stop, self.read_block(i)

    # -- lifetime
    def close(self) -> None:
        self._mm = None  # views handed out keep the mapping alive until they go
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __reduce__(self):
        return (open_store, (str(self.path), self.verify))

    def __repr__(self):
        kind = "compressed" if self.compressed else "memory-mapped"
        return (f"<ActivationStore {self.path.name}: {self.n_tokens} x {self.n_neurons} "
                f"float16, {self.n_blocks} blocks of {self.block_tokens} rows, {kind}>")


def check_store_matches(path, expected: dict) -> None:
    """Raise StaleInputError unless the store at `path` has the `expected` attrs."""
    with open_store(path) as s:
        bad = identity_mismatch(s.attrs, expected)
    if bad:
        same_label = any(b.startswith("model_id:") for b in bad)
        hint = ("; if two models share this label (folders of the same name), give them in "
                "one command or run: their labels are then derived from their paths"
                if same_label else "")
        raise StaleInputError(
            f"activation store {str(path)!r} was made from other inputs ({'; '.join(bad)}); "
            f"it is never appended to: delete it or use another --run-dir{hint}")


def ledger_progress(ledger) -> tuple[int | None, int | None, dict]:
    """(blocks done, blocks in all, header) of a partial store's ledger, read only (for
    `status`; a torn last line is ignored, as resume ignores it)."""
    try:
        raw = Path(ledger).read_bytes()
    except OSError:
        return None, None, {}
    lines = raw[: raw.rfind(b"\n") + 1].decode(errors="replace").splitlines()
    try:
        header = json.loads(lines[0])
    except (IndexError, ValueError):
        return 0, None, {}
    n = len(header.get("chunk_offsets", []))
    done = {int(w[1]) for w in (ln.split(" ") for ln in lines[1:])
            if len(w) >= 2 and w[0] == "done" and w[1].isdigit() and int(w[1]) < n}
    return len(done), n, header
