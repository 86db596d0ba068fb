"""Activation store: layout, crash-safe writing, memory-mapped and compressed reads."""
from __future__ import annotations

import mmap
import pickle

import h5py
import numpy as np
import pytest

from ooc_universal.errors import OocError
from ooc_universal.formats.store import (PartialStore, StorePaths, default_block_tokens,
                                 expected_store_bytes, open_store)

N, M, BT = 1000, 96, 128  # 8 blocks, the last one 104 rows


def attrs(**kw):
    a = dict(model_id="/models/tiny", revision="", label="tiny", name="/models/tiny", step=-1,
             n_layers=2, d_mlp=48, token_hash="abc123")
    a.update(kw)
    return a


def random_acts(n=N, m=M, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, m)) * 3).astype(np.float16)


def write_store(tmp_path, data, bt=BT, order=None, compression=None, label="tiny"):
    paths = StorePaths.of(tmp_path, label)
    n, m = data.shape
    ps = PartialStore.create(paths, attrs(label=label, n_layers=2, d_mlp=m // 2), n, m, bt)
    for i in (order if order is not None else range(ps.n_blocks)):
        s, e = ps.block_bounds(i)
        ps.write_block(i, np.ascontiguousarray(data[s:e]))
    return ps.finalize(compression)


def test_round_trip_memmap(tmp_path):
    data = random_acts()
    path = write_store(tmp_path, data, order=[3, 0, 7, 1, 6, 2, 5, 4])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) \
        == ["tiny.h5", "tiny.h5.sha256"]
    # An independent reader (plain h5py) sees the same array and the contract's layout.
    with h5py.File(path, "r") as f:
        ds = f["acts"]
        assert ds.dtype == np.dtype("<f2") and ds.chunks == (BT, M) and ds.compression is None
        np.testing.assert_array_equal(ds[:], data)
        assert ds.attrs["layout_version"] == 1 and ds.attrs["token_hash"] == "abc123"
        offsets = [ds.id.get_chunk_info_by_coord((i * BT, 0)).byte_offset for i in range(8)]
    with open_store(path) as s:
        assert (s.n_tokens, s.n_neurons, s.n_layers, s.d_mlp) == (N, M, 2, 48)
        assert s.block_tokens == BT and s.n_blocks == 8 and s.shape == (N, M)
        assert s.block_bounds(7) == (896, 1000)
        assert s.attrs["compression"] == "none" and s.attrs["step"] == -1
        for i in range(s.n_blocks):
            a, b = s.block_bounds(i)
            blk = s.read_block(i)
            np.testing.assert_array_equal(blk, data[a:b])
            # zero-copy: a memmap view onto the file mapping, not a heap array
            assert isinstance(blk, np.memmap) and not blk.flags.owndata
            assert not blk.flags.writeable
            base = blk
            while isinstance(base, np.ndarray):
                base = base.base
            assert isinstance(base, mmap.mmap)
            # ...of exactly the chunk's bytes in the file
            with open(path, "rb") as fh:
                fh.seek(offsets[i])
                raw = np.frombuffer(fh.read((b - a) * M * 2), "<f2").reshape(b - a, M)
            np.testing.assert_array_equal(raw, data[a:b])
        assert s.read_block(7).shape == (104, M)


def test_read_rows_across_chunks(tmp_path):
    data = random_acts(seed=1)
    with open_store(write_store(tmp_path, data)) as s:
        for a, b in [(0, 0), (0, 1), (127, 129), (100, 1000), (0, 1000), (999, 1000),
                     (256, 384), (130, 777)]:
            got = s.read_rows(a, b)
            assert got.shape == (b - a, M) and got.dtype == np.float16
            np.testing.assert_array_equal(got, data[a:b])
        with pytest.raises(IndexError):
            s.read_rows(10, 1001)
        with pytest.raises(IndexError):
            s.read_block(8)


def test_last_chunk_tail_is_zero(tmp_path):
    """Rows past n_tokens in the last chunk are written as zeros (bit-identical files)."""
    data = random_acts(seed=2)
    path = write_store(tmp_path, data)
    with h5py.File(path, "r") as f:
        info = f["acts"].id.get_chunk_info_by_coord((7 * BT, 0))
    with open(path, "rb") as fh:
        fh.seek(info.byte_offset)
        chunk = np.frombuffer(fh.read(info.size), "<f2").reshape(BT, M)
    np.testing.assert_array_equal(chunk[:104], data[896:])
    assert not chunk[104:].any()


@pytest.mark.parametrize("compression", ["gzip", "gzip:1", "lzf"])
def test_compressed_round_trip(tmp_path, compression):
    data = random_acts(seed=3)
    data[:, ::2] = 0  # compressible
    path = write_store(tmp_path, data, compression=compression)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.h5", "tiny.h5.sha256"]
    raw_size = N * M * 2
    assert path.stat().st_size < raw_size
    with h5py.File(path, "r") as f:
        assert f["acts"].compression == compression.split(":")[0]
        np.testing.assert_array_equal(f["acts"][:], data)
    with open_store(path) as s:
        assert s.compressed and s.attrs["compression"] == compression
        first = s.read_block(0)
        np.testing.assert_array_equal(first, data[:BT])
        second = s.read_block(7)
        np.testing.assert_array_equal(second, data[896:])
        assert np.shares_memory(first, second)  # one reused buffer, as documented
        keep = np.empty((BT, M), np.float16)
        s.read_block(1, out=keep)
        np.testing.assert_array_equal(keep, data[BT:2 * BT])
        np.testing.assert_array_equal(s.read_rows(120, 900), data[120:900])


def test_pickles_by_path(tmp_path):
    data = random_acts(seed=4)
    s = open_store(write_store(tmp_path, data))
    s2 = pickle.loads(pickle.dumps(s))
    np.testing.assert_array_equal(s2.read_block(2), data[256:384])


def test_single_short_block(tmp_path):
    data = random_acts(n=10, m=8, seed=5)
    bt = default_block_tokens(10, 8)
    assert bt == 10
    with open_store(write_store(tmp_path, data, bt=bt)) as s:
        assert s.n_blocks == 1
        np.testing.assert_array_equal(s.read_block(0), data)


def test_default_block_tokens():
    # paper scale: 36,864 neurons -> 448 rows (29 MB), a multiple of 64
    assert default_block_tokens(5_000_000, 36_864) == 448
    assert default_block_tokens(5_000_000, 4 * 512) == (32 * 2**20 // (2048 * 2)) // 64 * 64
    assert default_block_tokens(1000, 96) == 1000          # at most n_tokens
    assert default_block_tokens(10**6, 10**6) == 64        # at least 64
    for n, m in [(5_000_000, 36_864), (10**6, 3072), (10**7, 100)]:
        bt = default_block_tokens(n, m)
        assert bt % 64 == 0 and bt * m * 2 <= 32 * 2**20 or bt == 64


def test_expected_store_bytes_bounds_file(tmp_path):
    for n, m, bt in [(1000, 96, 128), (5000, 512, 64), (70, 40, 64)]:
        d = tmp_path / f"{n}_{m}"
        d.mkdir()
        path = write_store(d, random_acts(n, m), bt=bt)
        size = path.stat().st_size
        est = expected_store_bytes(n, m, bt)
        assert size <= est <= size * 1.2 + 2**20, (n, m, size, est)


def test_resume_reads_ledger_and_ignores_torn_line(tmp_path):
    data = random_acts(seed=6)
    paths = StorePaths.of(tmp_path, "tiny")
    ps = PartialStore.create(paths, attrs(), N, M, BT)
    for i in (0, 1, 5):
        s, e = ps.block_bounds(i)
        ps.write_block(i, np.ascontiguousarray(data[s:e]))
    # block 2 written but not in the ledger; a torn ledger line after it (killed mid-append)
    ps._pad = None
    s, e = ps.block_bounds(2)
    import os
    os.pwrite(ps._fd, np.ascontiguousarray(data[s:e] + 1).tobytes(), ps.offsets[2])
    ps.close()
    with open(paths.ledger, "ab") as fh:
        fh.write(b"done")
    ps = PartialStore.resume(paths)
    assert ps.done == {0, 1, 5} and ps.missing() == [2, 3, 4, 6, 7]
    for i in ps.missing():
        s, e = ps.block_bounds(i)
        ps.write_block(i, np.ascontiguousarray(data[s:e]))
    lines = paths.ledger.read_text().splitlines()
    assert [ln.rsplit(" ", 1)[0] for ln in lines[1:]] == \
        [f"done {i}" for i in (0, 1, 5, 2, 3, 4, 6, 7)]
    assert all(len(ln.rsplit(" ", 1)[1]) == 64 for ln in lines[1:])  # each block's sha256
    with open_store(ps.finalize()) as s:
        np.testing.assert_array_equal(s.read_rows(0, N), data)
    assert not paths.ledger.exists() and not paths.partial.exists()


def test_resume_without_ledger_header_starts_over(tmp_path):
    paths = StorePaths.of(tmp_path, "tiny")
    PartialStore.create(paths, attrs(), N, M, BT).close()
    paths.ledger.write_text('{"magic": "ooc-universal act')  # killed while writing header
    assert PartialStore.resume(paths) is None
    paths.ledger.unlink()
    assert PartialStore.resume(paths) is None


def test_partial_file_is_valid_hdf5_at_every_moment(tmp_path):
    """Metadata is final at creation: h5py opens the partial before any block is written."""
    paths = StorePaths.of(tmp_path, "tiny")
    ps = PartialStore.create(paths, attrs(), N, M, BT)
    with h5py.File(paths.partial, "r") as f:
        assert f["acts"].shape == (N, M) and f["acts"].attrs["n_tokens"] == N
    ps.close()


# ---------------------------------------------------------------------------- bad files

def test_missing_store(tmp_path):
    with pytest.raises(OocError, match="does not exist"):
        open_store(tmp_path / "nope.h5")
    (tmp_path / "half.h5.partial").write_bytes(b"")
    with pytest.raises(OocError, match="incomplete"):
        open_store(tmp_path / "half.h5")


def test_truncated_store(tmp_path):
    path = write_store(tmp_path, random_acts(seed=7))
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(OocError) as exc:
        open_store(path)
    msg = str(exc.value)
    assert str(path) in msg and "delete it" in msg and "\n" not in msg


def test_not_hdf5(tmp_path):
    path = tmp_path / "junk.h5"
    path.write_bytes(b"this is not an HDF5 file" * 100)
    with pytest.raises(OocError, match="not a readable HDF5 file.*delete it"):
        open_store(path)


def test_missing_attrs_and_wrong_layout(tmp_path):
    path = tmp_path / "bare.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("acts", shape=(10, 4), dtype="<f2", chunks=(10, 4))
    with pytest.raises(OocError, match="lacks attributes"):
        open_store(path)
    path = write_store(tmp_path, random_acts(seed=8))
    with h5py.File(path, "r+") as f:
        f["acts"].attrs["layout_version"] = 2
    with pytest.raises(OocError, match="layout_version 2"):
        open_store(path)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("x", data=[1])
    with pytest.raises(OocError, match="no dataset 'acts'"):
        open_store(tmp_path / "other.h5")


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


def test_release_rows_keeps_data_and_drops_resident_pages(tmp_path):
    """After a pass, release_rows unmaps the rows' pages (RSS stays flat over a store);
    the data read again is unchanged."""
    data = random_acts(n=4096, m=4096, seed=3)                  # 32 MB of fp16
    store = open_store(write_store(tmp_path, data, bt=1024))
    before = _rss_file_kb()
    total = sum(float(store.read_block(i).astype(np.float32).sum()) for i in range(4))
    touched = _rss_file_kb()
    store.release_rows(0, 4096)
    released = _rss_file_kb()
    assert touched - before > 24_000 and touched - released > 24_000
    assert total == sum(float(store.read_block(i).astype(np.float32).sum()) for i in range(4))
    assert np.array_equal(store.read_rows(0, 4096), data)
    store.release_rows(100, 101)                                  # under a page: no-op


# ------------------------------------------------------------------ NumPy's vocabulary

@pytest.mark.parametrize("compression", [None, "gzip"])
def test_numpy_vocabulary(tmp_path, compression):
    data = random_acts(seed=6)
    with open_store(write_store(tmp_path, data, compression=compression)) as s:
        assert (s.shape, s.dtype, s.ndim, len(s), s.chunks) == ((N, M), np.float16, 2, N,
                                                                 (BT, M))
        assert s.memory_mapped is (compression is None)
        np.testing.assert_array_equal(s[5], data[5])
        np.testing.assert_array_equal(s[-1], data[-1])
        for key in (slice(0, N), slice(100, 900), slice(120, 130), slice(990, 2000),
                    slice(None, None, 7), slice(900, 100, -3), slice(5, 5)):
            np.testing.assert_array_equal(s[key], data[key])
        np.testing.assert_array_equal(s[100:300, 10:20], data[100:300, 10:20])
        np.testing.assert_array_equal(s[3, [0, 5]], data[3, [0, 5]])
        np.testing.assert_array_equal(np.asarray(s), data)
        assert np.asarray(s, dtype=np.float32).dtype == np.float32
        with pytest.raises(IndexError):
            s[N]
        with pytest.raises(TypeError, match="integer or a slice"):
            s[[1, 2]]


def test_block_checksums_and_offsets(tmp_path):
    from ooc_universal.formats.store import verify_store_blocks
    from ooc_universal.rundir import read_sidecar
    data = random_acts(seed=7)
    path = write_store(tmp_path, data)
    assert verify_store_blocks(path, read_sidecar(path)) == []
    with open_store(path) as s:
        recorded = [s.recorded_block_sha256(i) for i in range(s.n_blocks)]
        assert all(len(d) == 64 for d in recorded)
        assert [s.block_sha256(i) for i in range(s.n_blocks)] == recorded
        offset = s.block_offset(5)
        assert offset % 4096 == 0 and s.block_offset(0) < offset
        with pytest.raises(IndexError):
            s.block_offset(8)
    with open(path, "r+b") as f:  # one flipped byte inside block 5's rows
        f.seek(offset + 100)
        b = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([b[0] ^ 1]))
    with open_store(path, verify=False) as s:
        assert [i for i in range(s.n_blocks)
                if s.block_sha256(i) != s.recorded_block_sha256(i)] == [5]
    assert verify_store_blocks(path, read_sidecar(path)) == \
        ["block(s) 5 of 8 differ from their recorded sha256"]
    with open_store(path) as s:  # verified on read: block 4 is fine, block 5 never used
        s.read_block(4)
        with pytest.raises(OocError, match=r"is damaged: block 5 of 8 .*differs from its "
                           r"recorded sha256; delete it and run `ooc-universal extract`"):
            s.read_block(5)
        with pytest.raises(OocError, match="block 5 of 8"):
            s[600:700]
    (tmp_path / "tiny.h5.sha256").unlink()
    with open_store(path, verify=False) as s:
        assert s.recorded_block_sha256(0) is None
    with pytest.raises(OocError, match=r"is untrusted: no readable checksum sidecar "
                       r"tiny.h5.sha256"):
        open_store(path)


# ----------------------------------------------------- writes that skip the page cache

def _write_aligned(tmp_path, data, bt, label="tiny"):
    """Blocks from aligned buffers, the tail of the last one zeroed (as extract does)."""
    from ooc_universal.formats.store import aligned_block_buffer
    paths = StorePaths.of(tmp_path, label)
    n, m = data.shape
    ps = PartialStore.create(paths, attrs(label=label, n_layers=2, d_mlp=m // 2), n, m, bt)
    buf = aligned_block_buffer(bt, m)
    assert buf.ctypes.data % 4096 == 0 and buf.shape == (bt, m) and buf.dtype == np.float16
    for i in range(ps.n_blocks):
        s, e = ps.block_bounds(i)
        buf[: e - s] = data[s:e]
        buf[e - s:] = 0
        ps.write_block(i, buf)
    return ps.finalize(None)


@pytest.mark.parametrize("mode", ["direct", "no-o-direct", "write-refused"])
def test_aligned_blocks_go_straight_to_disk_or_fall_back(tmp_path, monkeypatch, mode):
    """A whole page-aligned chunk is written with O_DIRECT (no copy into the page cache);
    where the filesystem has no O_DIRECT, or refuses the write, through the page cache:
    the same file either way."""
    import errno
    from ooc_universal.formats import store as store_mod
    direct, calls = [], []
    real_open, real_pwrite = store_mod._open_direct, store_mod._pwrite_all

    def open_direct(path):
        fd = None if mode == "no-o-direct" else real_open(path)
        direct.append(fd)
        return fd

    def pwrite(fd, buf, off):
        calls.append("direct" if fd in direct else "cached")
        if mode == "write-refused" and fd in direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        real_pwrite(fd, buf, off)
    monkeypatch.setattr(store_mod, "_open_direct", open_direct)
    monkeypatch.setattr(store_mod, "_pwrite_all", pwrite)
    data = random_acts(n=1000, m=128)  # chunk 128 x 128 x 2 = 32 KiB: a multiple of 4096
    path = _write_aligned(tmp_path, data, bt=128)
    if mode != "no-o-direct" and direct[0] is None:
        pytest.skip("this filesystem refuses O_DIRECT")
    with open_store(path) as s:
        np.testing.assert_array_equal(np.asarray(s[:]), data)
    want = {"direct": ["direct"] * 16, "no-o-direct": ["cached"] * 16,
            "write-refused": ["direct"] + ["cached"] * 16}[mode]
    assert calls == want  # two halves per block, 8 blocks


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_dimension_scales_and_row_coordinates(tmp_path, compression):
    """acts is (token, neuron): neuron carries layer / index, token carries the window and
    position of each row when the writer gives them (also in a repacked store)."""
    data = random_acts(seed=3)
    n, m = data.shape
    window, position = np.arange(n) // 64, np.arange(n) % 64
    paths = StorePaths.of(tmp_path, "tiny")
    ps = PartialStore.create(paths, attrs(label="tiny", n_layers=2, d_mlp=m // 2), n, m, BT,
                             row_coords={"window": window, "position": position})
    for i in range(ps.n_blocks):
        s, e = ps.block_bounds(i)
        ps.write_block(i, np.ascontiguousarray(data[s:e]))
    path = ps.finalize(compression)
    with h5py.File(path, "r") as f:
        acts = f["acts"]
        assert [acts.dims[i][0].name for i in range(2)] == ["/token", "/neuron"]
        assert acts.attrs["coordinates"] == "layer index window position"
        np.testing.assert_array_equal(f["window"][...], window)
        np.testing.assert_array_equal(f["position"][...], position)
        np.testing.assert_array_equal(f["layer"][...], np.arange(m) // (m // 2))
        assert f["window"].dims[0][0].name == "/token"
    with open_store(path) as s:
        np.testing.assert_array_equal(s[:], data)
