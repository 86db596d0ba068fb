"""extract keeps the per-neuron top-k (RUN/stores/<label>.topk.npz) while it writes the
store: against a float64 stable sort of the whole store, after an interrupted and resumed
extract too; topk = 0 keeps none; the cards step's contexts from it equal those it
computes from the store; the store maps each row to (window, position)."""
from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch

from ooc_universal import faults
from ooc_universal.config import ComputeConfig, ExtractConfig
from ooc_universal.formats.cards import read_topk, topk_path
from ooc_universal.formats.store import DATASET, open_store
from ooc_universal.formats.tokens import load_token_set
from ooc_universal.rundir import sidecar_path
from ooc_universal.steps.cards import contexts_of, top_contexts
from ooc_universal.steps.extract import extract
from tests.test_extract import make_tokens
from tests.tiny import save_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
CPU = ComputeConfig(device="cpu")
LABEL = "tiny0"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("models") / LABEL, seed=0)


def reference_topk(store_path, k: int):
    """Per neuron, a stable argsort of -float64 over every store row (equal values: the
    lower row first), first k; padded with (-inf, -1) past the rows."""
    with open_store(store_path) as s:
        data = s.read_rows(0, s.n_tokens).astype(np.float64)
    order = np.argsort(-data, axis=0, kind="stable")[:k]
    values = np.take_along_axis(data, order, axis=0).astype(np.float32)
    rows = order.astype(np.int64)
    if k > data.shape[0]:
        pad = k - data.shape[0]
        values = np.vstack([values, np.full((pad, data.shape[1]), -np.inf, np.float32)])
        rows = np.vstack([rows, np.full((pad, data.shape[1]), -1, np.int64)])
    return values, rows, data


def assert_topk_is_the_reference(run, path, k):
    got = read_topk(run, LABEL)
    values, rows, data = reference_topk(path, k)
    assert got is not None and got.k == k and got.n_neurons == data.shape[1]
    assert got.made_by == "extract" and got.n_tokens == data.shape[0]
    assert got.token_hash == load_token_set(run).hash
    np.testing.assert_array_equal(got.rows, rows)
    np.testing.assert_array_equal(got.values, values)
    # the test can fail: the activations have ties (fp16) and vary by neuron
    assert len(np.unique(data[:, 0])) < data.shape[0] and data.std() > 0.1
    return got


def test_topk_file_equals_a_sort_of_the_whole_store(tmp_path, model_dir):
    run = tmp_path / "run"
    make_tokens(run, seed=4)
    stats = {}
    # 256-row blocks, 3-window batches: batches straddle blocks, the last block is short
    path = extract(run, str(model_dir), ExtractConfig(batch_size=3), CPU, block_tokens=256,
                   progress=False, stats=stats)
    assert stats["topk"] == 20 and stats["blocks_read_back"] == 0
    assert_topk_is_the_reference(run, path, 20)
    # the store maps row i to the token set's i-th valid position (issue 13)
    window, position = np.nonzero(load_token_set(run).valid)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["window"][()], window)
        np.testing.assert_array_equal(f["position"][()], position)
        assert "window" in str(f[DATASET].attrs["coordinates"]).split()


def test_resumed_extract_folds_the_blocks_written_before(tmp_path, model_dir, monkeypatch):
    """A failure at the 4th block leaves 3 ledgered; the resumed run reads them back and
    folds them, so its top-k equals the reference (and an uninterrupted run's file)."""
    run, clean = tmp_path / "run", tmp_path / "clean"
    make_tokens(run, seed=5)
    make_tokens(clean, seed=5)
    k = 7
    cfg = ExtractConfig(batch_size=2, topk=k)
    monkeypatch.setenv(faults.FAIL_ENV, "store.block.before_ledger:4")
    with pytest.raises(faults.InjectedFailure):
        extract(run, str(model_dir), cfg, CPU, block_tokens=64, progress=False)
    monkeypatch.delenv(faults.FAIL_ENV)
    assert not topk_path(run, LABEL).exists()
    stats = {}
    path = extract(run, str(model_dir), cfg, CPU, block_tokens=64, progress=False,
                   stats=stats)
    assert stats["status"] == "resumed" and stats["blocks_done_before"] == 3
    assert stats["blocks_read_back"] == 3
    assert stats["blocks_written"] == stats["blocks_total"] - 3
    got = assert_topk_is_the_reference(run, path, k)
    # rows from the blocks read back are among the winners (the fold is not a no-op)
    assert (got.rows[(got.rows >= 0) & (got.rows < 3 * 64)]).size > 0
    extract(clean, str(model_dir), cfg, CPU, block_tokens=64, progress=False)
    want = read_topk(clean, LABEL)
    np.testing.assert_array_equal(got.values, want.values)
    np.testing.assert_array_equal(got.rows, want.rows)


def test_topk_zero_keeps_no_file_and_drops_a_stale_one(tmp_path, model_dir):
    run = tmp_path / "run"
    make_tokens(run, seed=6, n_windows=12)
    path = extract(run, str(model_dir), ExtractConfig(topk=3), CPU, progress=False)
    assert topk_path(run, LABEL).is_file()
    path.unlink()
    sidecar_path(path).unlink()
    stats = {}
    extract(run, str(model_dir), ExtractConfig(topk=0), CPU, progress=False, stats=stats)
    assert not topk_path(run, LABEL).exists()
    assert not sidecar_path(topk_path(run, LABEL)).exists()
    assert stats["cpu_seconds_topk"] == 0.0
    assert sorted(p.name for p in (run / "stores").iterdir() if p.name[0] != ".") == [
        "tiny0.h5", "tiny0.h5.sha256"]


def test_cards_contexts_from_the_file_equal_those_from_the_store(tmp_path, model_dir):
    run = tmp_path / "run"
    make_tokens(run, seed=7)
    extract(run, str(model_dir), ExtractConfig(topk=9), CPU, block_tokens=200,
            progress=False)
    flats = [0, 5, 127, 128, 200, 255]
    loaded = type("Loaded", (), {"tokenizer": None})()
    for k in (9, 4):
        from_file = top_contexts(run, LABEL, flats, k)
        assert from_file.source == "topk file" and "kept by extract" in from_file.note
        hidden = topk_path(run, LABEL).rename(tmp_path / "hidden.npz")
        try:
            from_store = top_contexts(run, LABEL, flats, k)
        finally:
            hidden.rename(topk_path(run, LABEL))
        assert from_store.source == "store"
        np.testing.assert_array_equal(from_file.values, from_store.values)
        np.testing.assert_array_equal(from_file.rows, from_store.rows)
        for flat in flats:
            got, want = contexts_of(from_file, flat, loaded), contexts_of(from_store, flat,
                                                                          loaded)
            assert len(got[0]) == k and got[0] == want[0]
    # asking for more than the file keeps: the store is read instead, and the note says so
    more = top_contexts(run, LABEL, flats, 12)
    assert more.source == "store" and "keeps only 9" in more.note
