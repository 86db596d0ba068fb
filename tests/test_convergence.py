"""Token-count convergence: snapshots of prefixes of random activations computed with
float64 numpy (correlation, rotation baseline), summarised by kernels/convergence.py,
written and read back through formats/convergence.py; the universal rule checked against
the universal step's own Table 1 on the same numbers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ooc_universal.config import UniversalConfig
from ooc_universal.errors import OocError
from ooc_universal.formats.convergence import (COLUMNS, convergence_path, list_convergence,
                                               read_all_convergence, read_convergence,
                                               snapshot_rows, write_convergence)
from ooc_universal.formats.tables import read_table1
from ooc_universal.kernels.convergence import (crossed, snapshot_counts, summarize,
                                               universal_mask)
from ooc_universal.rundir import file_sha256, read_sidecar, seal
from ooc_universal.steps.universal import universal
from tests.test_universal import write_reduced

N_LAYERS, D = 2, 6          # both models
N = N_LAYERS * D
N_TOKENS, FIRST = 1000, 60
THRESHOLDS = (0.1, 0.3)
N_DRAWS = 3


def _activations(seed=0):
    """Reference X and other Y with a shared signal in some neurons, so a few are
    universal and the fraction moves with the tokens."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((N_TOKENS, 4))
    x = rng.standard_normal((N_TOKENS, N))
    y = rng.standard_normal((N_TOKENS, N))
    x[:, :4] += 1.5 * shared
    y[:, [1, 7, 3, 10]] += 1.5 * shared
    x[:, 5] = 2.0                                       # a zero-variance reference neuron
    return x, y


def _rotations(draw):
    rng = np.random.default_rng([123 + draw])
    out = []
    for _ in range(N_LAYERS):
        r = rng.standard_normal((D, D))
        out.append(r / np.linalg.norm(r, axis=1, keepdims=True))
    return out


def _row_max(x, y):
    """max over y's columns of the float64 Pearson rho; 0 for a zero-variance column."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    nx, ny = np.sqrt((xc ** 2).sum(0)), np.sqrt((yc ** 2).sum(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = (xc.T @ yc) / np.outer(nx, ny)
    return np.nan_to_num(rho, nan=0.0, posinf=0.0, neginf=0.0).max(axis=1)


def _prefix_stats(x, y, n):
    row = _row_max(x[:n], y[:n])
    base = np.stack([_row_max(x[:n], np.hstack([y[:n, l * D:(l + 1) * D] @ r.T
                                                for l, r in enumerate(_rotations(j))]))
                     for j in range(N_DRAWS)])
    return row, base


def test_snapshot_counts_double_and_end_at_the_total():
    assert snapshot_counts(1000, 60) == [60, 120, 240, 480, 960, 1000]
    assert snapshot_counts(960, 60) == [60, 120, 240, 480, 960]
    assert snapshot_counts(50, 60) == [50]
    assert snapshot_counts(1000, 60, block_tokens=64) == [64, 128, 256, 512, 960, 1000]
    assert snapshot_counts(1000, 100, block_tokens=512) == [512, 1000]
    assert crossed([64, 128, 256], 0, 64) == [64]
    assert crossed([64, 128, 256], 64, 300) == [128, 256]
    assert crossed([64, 128, 256], 256, 320) == []
    with pytest.raises(ValueError, match="first >= 1"):
        snapshot_counts(100, 0)


def test_summary_equals_numpy_on_each_prefix():
    x, y = _activations()
    for n in snapshot_counts(N_TOKENS, FIRST):
        row, base = _prefix_stats(x, y, n)
        s = summarize(row, base, THRESHOLDS)
        assert s["n_neurons"] == N and s["n_draws"] == N_DRAWS
        assert s["row_max_mean"] == pytest.approx(np.mean(row), abs=1e-12)
        assert s["row_max_q50"] == pytest.approx(np.median(row), abs=1e-12)
        assert s["row_max_q95"] == pytest.approx(np.percentile(row, 95), abs=1e-12)
        assert s["baseline_max_mean"] == pytest.approx(np.mean(base[0]), abs=1e-12)
        for tau in THRESHOLDS:
            per_draw = [100.0 * np.sum(row - base[j] > tau) / N for j in range(N_DRAWS)]
            got = s["per_threshold"][tau]
            assert got["pct_universal"] == pytest.approx(per_draw[0], abs=1e-12)
            assert got["n_universal"] == int(np.sum(row - base[0] > tau))
            assert got["pct_universal_draws_mean"] == pytest.approx(np.mean(per_draw))
            assert got["pct_universal_draws_std"] == pytest.approx(np.std(per_draw, ddof=1))
    one = summarize(row, base[0], THRESHOLDS)                   # a (n,) baseline: one draw
    assert one["per_threshold"][0.1]["pct_universal_draws_std"] is None
    with pytest.raises(ValueError, match="baseline_max"):
        summarize(row, base[:, :3], THRESHOLDS)


def test_rule_and_final_snapshot_equal_the_universal_step(tmp_path):
    """The last snapshot is the whole token set: its percentages are Table 1's for a
    reduce file holding the same row max and baseline."""
    x, y = _activations(1)
    row, base = _prefix_stats(x, y, N_TOKENS)
    red = write_reduced(tmp_path, row, base, ref="a", other="b", n_layers_ref=N_LAYERS,
                        d_mlp_ref=D, n_layers_other=N_LAYERS, d_mlp_other=D,
                        zero_var=np.arange(N) == 5, n_tokens=N_TOKENS)
    seal(red, {"step": "reduce"})                   # written by hand: vouch for it
    universal(tmp_path, UniversalConfig(thresholds=list(THRESHOLDS)), progress=False)
    table = read_table1(tmp_path)
    s = summarize(row.astype(np.float32), base.astype(np.float32), THRESHOLDS)
    for tau in THRESHOLDS:
        r = next(r for r in table.rows if r["aggregation"] == "pair" and r["scope"] == "all"
                 and r["threshold"] == tau)
        assert s["per_threshold"][tau]["pct_universal"] == pytest.approx(r["pct_universal"])
        assert s["per_threshold"][tau]["pct_universal_draws_mean"] == \
            pytest.approx(r["pct_universal_draws_mean"])
    neurons = pd.read_parquet(tmp_path / "universal" / "neurons.parquet")
    pair = neurons[neurons.aggregation == "pair"].sort_values("flat_index")
    for tau in THRESHOLDS:
        np.testing.assert_array_equal(universal_mask(row.astype(np.float32),
                                                     base.astype(np.float32), tau),
                                      pair[f"is_universal_{tau:g}"].to_numpy())


def test_file_round_trip(tmp_path):
    x, y = _activations(2)
    pair = {"reference": "a", "other": "b", "ref_label": "a@100", "other_label": "b@100",
            "checkpoint": 100}
    counts = snapshot_counts(N_TOKENS, FIRST)
    rows = []
    for n in counts:
        rows += snapshot_rows(pair, n, N_TOKENS, summarize(*_prefix_stats(x, y, n),
                                                           THRESHOLDS))
    path = write_convergence(convergence_path(tmp_path, "a@100", "b@100"), rows,
                             {"step": "reduce", "token_hash": "tok0"})
    assert path.name == "a@100__b@100.convergence.csv"
    assert list_convergence(tmp_path) == [path]
    assert read_sidecar(path)["sha256"] == file_sha256(path)
    assert not list(path.parent.glob("*.tmp-*"))
    df = read_convergence(path)
    assert list(df.columns) == COLUMNS and len(df) == len(counts) * len(THRESHOLDS)
    assert df["n_tokens"].dtype == np.int64 and df["pct_universal"].dtype == np.float64
    for rec in rows:
        got = df[(df.n_tokens == rec["n_tokens"]) & (df.threshold == rec["threshold"])]
        assert len(got) == 1
        for col in ("pct_universal", "row_max_mean", "baseline_max_mean",
                    "pct_universal_draws_std"):
            assert got[col].iloc[0] == rec[col]            # exact: %.17g round-trips
    assert df.groupby("threshold")["n_tokens"].max().eq(N_TOKENS).all()
    assert len(read_all_convergence(tmp_path)) == len(df)
    assert read_all_convergence(tmp_path / "nothing") is None


def test_bad_files_give_one_line(tmp_path):
    path = convergence_path(tmp_path, "a@1", "b@1")
    with pytest.raises(OocError, match="no convergence table"):
        read_convergence(path)
    path.parent.mkdir(parents=True)
    path.write_text("reference,other\nx,y\n")
    with pytest.raises(OocError, match="lacks the columns") as exc:
        read_convergence(path)
    assert "\n" not in str(exc.value)
    with pytest.raises(OocError, match="no convergence snapshot"):
        write_convergence(path, [])
