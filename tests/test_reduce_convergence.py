"""The reduce's token-count convergence table against float64 numpy on exactly the first
n tokens: one panel, two panels, two chains, and a reduce interrupted in its self pass
and its folds (fault injection) that gives the identical table."""
from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from ooc_universal import faults
from ooc_universal.config import ComputeConfig, ReduceConfig, UniversalConfig
from ooc_universal.formats.convergence import convergence_path, read_convergence
from ooc_universal.rundir import read_sidecar
from ooc_universal.steps.reduce import reduce
from tests.reduce_helpers import corr64, planted_triple, rotation64, write_store

D_OTHER = 8
SEEDS = [3, 4]
FIRST = 100          # counts 100, 200, 400, 800 (inside 64-token blocks: cut there), 1000
COUNTS = [100, 200, 400, 800, 1000]
THRESHOLDS = UniversalConfig().thresholds


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    x, y, y2, rng = planted_triple(1000, mix=0.8)
    # a few strong matches so the universal fractions are not all 0
    x = x.astype(np.float64)
    x[:, 0] = y2[:, 2] + 0.3 * rng.standard_normal(1000)
    x[:, 1] = y2[:, 17] + 0.6 * rng.standard_normal(1000)
    x = x.astype(np.float16)
    return root, x, {"oth": y, "oth2": y2}


def _run(root, name, x, others):
    run = root / name
    write_store(run, "ref", x, 2, 16, block_tokens=64)
    for label, y in others.items():
        write_store(run, label, y, 3, D_OTHER, block_tokens=64)
    return run


def _reduce(run, **kw):
    settings = ReduceConfig(convergence_first=FIRST, precision="fp64", baseline_draws=2,
                            seed=3)
    return reduce(run, "ref", ["oth", "oth2"], settings, ComputeConfig(device="cpu"),
                  progress=False, **{"block_tokens": 64, "checkpoint_blocks": 2, **kw})


def _expected(x, y, n):
    """Row max and baseline (draws, rows) of the first n tokens, float64 from the
    definitions (rows: max over the other model's neurons of the signed rho)."""
    x, y = np.asarray(x[:n], np.float64), np.asarray(y[:n], np.float64)
    row = corr64(x, y).max(1)
    base = []
    for s in SEEDS:
        rot = np.concatenate([y[:, l * D_OTHER:(l + 1) * D_OTHER] @ rotation64(s, l, D_OTHER).T
                              for l in range(3)], axis=1)
        base.append(corr64(x, rot).max(1))
    return row, np.array(base)


def _check_row(got, row, base, tau, tol):
    assert abs(got["row_max_mean"] - row.mean()) <= tol
    for q in (5, 25, 50, 75, 95):
        assert abs(got[f"row_max_q{q:02d}"] - np.quantile(row, q / 100)) <= tol
    assert abs(got["baseline_max_mean"] - base[0].mean()) <= tol
    excess = row - base[0]
    assert abs(got["excess_mean"] - excess.mean()) <= tol
    if np.abs(excess - tau).min() > 1e-6:  # no neuron on the threshold's edge
        assert got["n_universal"] == int((excess > tau).sum())
        assert got["pct_universal"] == pytest.approx(100.0 * (excess > tau).mean(), abs=1e-12)
        pct = 100.0 * ((row[None, :] - base) > tau).mean(axis=1)
        assert got["pct_universal_draws_mean"] == pytest.approx(pct.mean(), abs=1e-9)
    assert got["n_neurons"] == row.size and got["n_draws"] == len(SEEDS)


@pytest.mark.parametrize("cut", [{}, {"max_panels": 2}, {"n_workers": 2},
                                 {"block_tokens": 512}],
                         ids=["one-panel", "two-panels", "two-chains", "big-blocks"])
def test_table_matches_float64_prefixes(stores, cut):
    root, x, others = stores
    run = _run(root, "cut-" + "-".join(f"{k}{v}" for k, v in cut.items()), x, others)
    res = _reduce(run, **cut)
    if "max_panels" in cut:
        assert len(res["plan"].panels) == 2
    assert res["plan"].block_tokens == cut.get("block_tokens", 64)
    # two chains of 8 blocks (512 tokens): chain 0 holds only the exact prefixes <= 512
    counts = [c for c in COUNTS if c <= 512 or c == 1000] if "n_workers" in cut else COUNTS
    for label, y in others.items():
        path = convergence_path(run, "ref", label)
        assert read_sidecar(path)["step"] == "reduce"
        df = read_convergence(path)
        assert sorted(df.threshold.unique()) == sorted(THRESHOLDS)
        assert (df.ref_label == "ref").all() and (df.other_label == label).all()
        assert (df.n_tokens_total == 1000).all()
        seen = 0
        for tau in THRESHOLDS:
            sub = df[df.threshold == tau].sort_values("n_tokens")
            assert list(sub.n_tokens) == counts
            for _, got in sub.iterrows():
                row, base = _expected(x, y, int(got.n_tokens))
                _check_row(got, row, base, tau, 1e-9)
                seen += got.n_universal
        assert seen > 0  # the check saw universal neurons
        # last row: the reduce file's own numbers (exact)
        with h5py.File(run / "reduce" / f"ref__{label}.h5", "r") as f:
            row = f["row_max"][()].astype(np.float64)
            base = f["baseline/row_max"][()].astype(np.float64)
        last = df[df.n_tokens == 1000]
        assert (last.row_max_mean == row.mean()).all()
        assert (last.baseline_max_mean == base[0].mean()).all()
        for tau in THRESHOLDS:
            assert int(last[last.threshold == tau].n_universal.iloc[0]) == \
                int(((row - base[0]) > tau).sum())


def test_the_gpu_finalize_path_matches_float64_prefixes(stores, monkeypatch):
    """On a GPU the snapshots and the finalize keep C where it is: the torch tile max and
    the baseline's GEMMs run beside it (rotations moved there) and only their results
    reach the host. That path, taken here with C as a CPU tensor, gives the float64
    prefixes and the same reduce file as the numba finalize."""
    import torch

    from ooc_universal.kernels import tilemax
    from ooc_universal.steps import reduce as reduce_mod
    root, x, others = stores
    host_path = _run(root, "host-finalize", x, others)
    _reduce(host_path)
    run = _run(root, "device-finalize", x, others)
    kept, torch_tiles = [], []
    numpy_view = reduce_mod._for_finalize

    def keep_c(record):      # what _for_finalize does with a CUDA tensor
        kept.append(isinstance(record["c"], torch.Tensor))
        return {**numpy_view(record), "c": record["c"]}
    tile_torch = tilemax._tile_max_torch

    def spy(c, *a):
        torch_tiles.append(c.shape)
        return tile_torch(c, *a)
    monkeypatch.setattr(reduce_mod, "_for_finalize", keep_c)
    monkeypatch.setattr(tilemax, "_tile_max_torch", spy)
    _reduce(run)
    # 4 snapshots below 1,000 tokens and the finalize, for each of the two pairs
    assert kept and all(kept) and len(torch_tiles) == len(kept) == 2 * len(COUNTS)
    for label, y in others.items():
        df = read_convergence(convergence_path(run, "ref", label))
        for tau in THRESHOLDS:
            for _, got in df[df.threshold == tau].iterrows():
                row, base = _expected(x, y, int(got.n_tokens))
                _check_row(got, row, base, tau, 1e-9)
        with h5py.File(run / "reduce" / f"ref__{label}.h5", "r") as f, \
                h5py.File(host_path / "reduce" / f"ref__{label}.h5", "r") as g:
            for k in ("row_max", "col_max", "baseline/row_max"):
                assert np.abs(f[k][()] - g[k][()]).max() <= 1e-12, k
            for k in ("row_argmax", "col_argmax"):
                assert np.array_equal(f[k][()], g[k][()]), k
        row, base = _expected(x, y, 1000)
        with h5py.File(run / "reduce" / f"ref__{label}.h5", "r") as f:
            assert np.abs(f["row_max"][()] - row).max() <= 1e-9
            assert np.abs(f["baseline/row_max"][()] - base).max() <= 1e-9


def test_interrupted_reduce_gives_the_same_table(stores, monkeypatch, capsys):
    root, x, others = stores
    whole = _run(root, "whole", x, others)
    _reduce(whole)
    run = _run(root, "interrupted", x, others)
    # the self pass fails at its 5th block (its checkpoint after block 2 holds the
    # 100-token scales), the fold after its 3rd checkpoint (6 blocks: 2 snapshots in it)
    monkeypatch.setenv(faults.FAIL_ENV,
                       "reduce.self.block:5,reduce.checkpoint.after_rename:3")
    res = _reduce(run)
    monkeypatch.delenv(faults.FAIL_ENV)
    err = capsys.readouterr().err
    assert err.count("retrying") == 2, err
    assert res["blocks_folded"] == 16  # resumed from the checkpoint: nothing redone
    for label in others:
        a = read_convergence(convergence_path(whole, "ref", label))
        b = read_convergence(convergence_path(run, "ref", label))
        pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_no_snapshots_no_table(stores):
    root, x, others = stores
    run = _run(root, "off", x, {"oth": others["oth"]})
    reduce(run, "ref", ["oth"], ReduceConfig(convergence_first=0), ComputeConfig(device="cpu"),
           block_tokens=64, progress=False)
    assert (run / "reduce" / "ref__oth.h5").exists()
    assert not convergence_path(run, "ref", "oth").exists()


def test_output_without_sidecar_is_refused_never_blessed(stores):
    """A complete-looking reduce output without its checksum sidecar is untrusted: the
    reduce refuses it with one line and does not write it a sidecar (issue 13)."""
    from ooc_universal.errors import OocError
    from ooc_universal.rundir import sidecar_path
    root, x, others = stores
    run = _run(root, "unsealed", x, {"oth": others["oth"]})
    kw = dict(block_tokens=64, progress=False)
    reduce(run, "ref", ["oth"], ReduceConfig(convergence_first=0), ComputeConfig(device="cpu"),
           **kw)
    out = run / "reduce" / "ref__oth.h5"
    sidecar_path(out).unlink()
    for dry in (False, True):
        with pytest.raises(OocError, match="untrusted") as exc:
            reduce(run, "ref", ["oth"], ReduceConfig(convergence_first=0),
                   ComputeConfig(device="cpu"), dry_run=dry, **kw)
        assert "\n" not in str(exc.value)
        assert not sidecar_path(out).exists()
