"""Universal step on hand-built reduced statistics with known answers."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest

from ooc_universal.config import UniversalConfig
from ooc_universal.errors import OocError
from ooc_universal.steps.universal import find_reduced, universal


def write_reduced(run_dir, row_max, baseline, *, ref="ref", other="oth", step=100,
                  other_step=None, n_layers_ref=2, d_mlp_ref=4, n_layers_other=2,
                  d_mlp_other=4, row_argmax=None, zero_var=None, seeds=None,
                  token_hash="tok0", n_tokens=1000, cross=None, self_comoment=None,
                  ref_var=None, ref_mean=None, label_suffix=""):
    """A RUN/reduce/<ref_label>__<other_label>.h5 in the contract's format, from arrays."""
    row_max = np.asarray(row_max, np.float32)
    baseline = np.asarray(baseline, np.float32).reshape(-1, row_max.size)
    na, nb = n_layers_ref * d_mlp_ref, n_layers_other * d_mlp_other
    assert row_max.size == na
    other_step = step if other_step is None else other_step
    zero_var = np.zeros(na, bool) if zero_var is None else np.asarray(zero_var, bool)
    if row_argmax is None:
        row_argmax = np.where(zero_var, -1, np.arange(na) % nb)
    seeds = np.arange(baseline.shape[0]) + 1000 if seeds is None else np.asarray(seeds)
    ref_label, other_label = f"{ref}{label_suffix}@{step}", f"{other}@{other_step}"
    path = run_dir / "reduce" / f"{ref_label}__{other_label}.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        attrs = dict(ref_label=ref_label, other_label=other_label, ref_name=ref,
                     other_name=other, ref_step=step, other_step=other_step,
                     ref_model_id=ref, other_model_id=other, token_hash=token_hash,
                     n_tokens=n_tokens, n_layers_ref=n_layers_ref, d_mlp_ref=d_mlp_ref,
                     n_layers_other=n_layers_other, d_mlp_other=d_mlp_other,
                     precision="float64", baseline_seeds=np.asarray(seeds, np.int64),
                     n_zero_var_ref=int(zero_var.sum()), n_zero_var_other=0,
                     config_json=json.dumps({"test": True}), toolkit_version="test",
                     layout_version=1)
        f.attrs.update(attrs)
        var = np.where(zero_var, 0.0, 1.0) if ref_var is None else ref_var
        f["ref/mean"] = np.zeros(na) if ref_mean is None else ref_mean
        f["ref/var"] = np.asarray(var, np.float64)
        f["ref/zero_var"] = zero_var
        f["other/mean"] = np.zeros(nb)
        f["other/var"] = np.ones(nb)
        f["other/zero_var"] = np.zeros(nb, bool)
        f["other/self_comoment"] = (np.broadcast_to(np.eye(d_mlp_other), (n_layers_other,
                                    d_mlp_other, d_mlp_other)) if self_comoment is None
                                    else self_comoment)
        f["row_max"] = row_max
        f["row_argmax"] = np.asarray(row_argmax, np.int64)
        f["col_max"] = np.zeros(nb, np.float32)
        f["col_argmax"] = np.zeros(nb, np.int64)
        f["baseline/row_max"] = baseline
        if cross is not None:
            f["cross_comoment"] = np.asarray(cross, np.float32)
    from ooc_universal.rundir import seal
    seal(path, {"step": "reduce"})
    return path


# Reference 2 layers x 4 neurons. Values exactly representable in float32.
#   0 planted universal (0.875 - 0.25 = 0.625)
#   1 correlates equally well with the rotated baseline (excess 0)
#   2 zero variance (row_max 0, baseline 0, argmax -1)
#   3 boundary: 0.75 - 0.25 = 0.5 exactly
#   4 layer 1: 0.9375 - 0.3125 = 0.625
#   5 layer 1: 0.5 - 0.0625 = 0.4375
#   6 layer 1: negative excess
#   7 layer 1: 0.96875 - 0.375 = 0.59375
ROW_MAX = [0.875, 0.6, 0.0, 0.75, 0.9375, 0.5, 0.1, 0.96875]
BASE0 = [0.25, 0.6, 0.0, 0.25, 0.3125, 0.0625, 0.4, 0.375]
BASE1 = [0.125, 0.6, 0.0, 0.375, 0.3125, 0.25, 0.4, 0.25]  # a second draw
ZERO = [False, False, True, False, False, False, False, False]
# excess draw 0: .625 0 0 .5 .625 .4375 -.3 .59375 ; draw 1: .75 0 0 .375 .625 .25 -.3 .71875
EXPECTED = {  # threshold -> (draw-0 set, draw-1 set)
    0.4: ([0, 3, 4, 5, 7], [0, 4, 7]),
    0.5: ([0, 4, 7], [0, 4, 7]),
    0.6: ([0, 4], [0, 4, 7]),
}


@pytest.fixture
def one_pair(tmp_path):
    write_reduced(tmp_path, ROW_MAX, [BASE0, BASE1], zero_var=ZERO,
                  row_argmax=[5, 1, -1, 3, 4, 6, 0, 7], seeds=[11, 12])
    return tmp_path


def test_known_answers_sets_and_neuron_table(one_pair):
    paths = universal(one_pair, progress=False).paths
    sets = json.loads(paths["sets"].read_text())
    got = {s["threshold"]: s["neurons"] for s in sets["sets"]}
    assert got == {tau: exp[0] for tau, exp in EXPECTED.items()}
    s0 = sets["sets"][0]
    assert (s0["reference"], s0["other"], s0["checkpoint"], s0["definition"], s0["draw"],
            s0["n_layers"], s0["d_mlp"]) == ("ref", "oth", 100, "per-pair", 0, 2, 4)
    assert sets["token_hash"] == "tok0" and sets["inputs"][0]["toolkit_version"] == "test"
    assert sets["config"]["thresholds"] == [0.4, 0.5, 0.6]

    df = pd.read_csv(paths["neurons_csv"])
    pq = pd.read_parquet(paths["neurons_parquet"])
    draws = pd.read_parquet(paths["neuron_draws"])
    assert len(df) == 8 and list(df.columns) == list(pq.columns)
    np.testing.assert_array_equal(df["excess"].to_numpy(), pq["excess"].to_numpy())
    exc0 = np.float64(np.float32(ROW_MAX)) - np.float64(np.float32(BASE0))
    np.testing.assert_array_equal(df["excess"].to_numpy(), exc0)
    draw = {j: d.sort_values("flat_index") for j, d in draws.groupby("draw")}
    np.testing.assert_array_equal(draw[0]["excess"].to_numpy(), exc0)
    np.testing.assert_array_equal(draw[1]["baseline_max"].to_numpy(),
                                  np.float64(np.float32(BASE1)))
    assert draw[1]["seed"].tolist() == [12] * 8 and len(draws) == 2 * 8
    assert df["excess"][3] == 0.5  # exactly at the boundary
    assert df["layer"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert df["neuron"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert pq["match_layer"].tolist() == [1, 0, pd.NA, 0, 1, 1, 0, 1]
    assert pq["match_neuron"].tolist() == [1, 1, pd.NA, 3, 0, 2, 0, 3]
    assert df["zero_var"].tolist() == ZERO
    for tau, (d0, d1) in EXPECTED.items():
        assert np.flatnonzero(pq[f"is_universal_{tau:g}"]).tolist() == d0
        assert np.flatnonzero(draw[1][f"is_universal_{tau:g}"]).tolist() == d1
    assert set(pq["aggregation"]) == {"pair"} and set(pq["other"]) == {"oth"}
    assert not set(pq.columns) & set(dir(pd.DataFrame))  # no column shadows a method
    import pyarrow.parquet as papq
    meta = json.loads(papq.read_schema(paths["neurons_parquet"]).metadata[b"ooc_universal"])
    assert meta["token_hash"] == "tok0" and meta["table_version"] == 2


def _row(rows, **match):
    """The one row of a table (list of dicts) with the given values."""
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


def test_table1_by_hand(one_pair):
    paths = universal(one_pair, progress=False).paths
    doc = json.loads(paths["table1"].read_text())
    rows, long = doc["rows"], doc["draws"]
    assert doc["table_version"] == 2
    summary = [r for r in rows if r["aggregation"] == "mean_over_pairs" and r["scope"] == "all"]
    assert [r["threshold"] for r in summary] == [0.4, 0.5, 0.6]
    for e in summary:
        tau = e["threshold"]
        d0, d1 = EXPECTED[tau]
        assert e["pct_universal"] == pytest.approx(100 * len(d0) / 8)
        layer = [100 * sum(1 for k in d0 if k // 4 == la) / 4 for la in (0, 1)]
        assert [_row(rows, aggregation="mean_over_pairs", threshold=tau, layer=la)
                ["pct_universal"] for la in (0, 1)] == pytest.approx(layer)
        p = _row(rows, aggregation="pair", threshold=tau, scope="all")
        assert p["n_universal"] == len(d0) and p["n_zero_var"] == 1 and p["other"] == "oth"
        draws = [100 * len(d0) / 8, 100 * len(d1) / 8]
        assert [_row(long, aggregation="mean_over_pairs", threshold=tau, scope="all", draw=j)
                ["pct_universal"] for j in (0, 1)] == pytest.approx(draws)
        assert e["pct_universal_draws_mean"] == pytest.approx(np.mean(draws))
        assert e["pct_universal_draws_std"] == pytest.approx(np.std(draws, ddof=1))
        assert (e["pct_universal_draws_min"], e["pct_universal_draws_max"]) == \
            (min(draws), max(draws))
    # 0.4: 62.5% overall; layer 0 {0, 3} = 50%, layer 1 {4, 5, 7} = 75%
    assert summary[0]["pct_universal"] == 62.5
    assert [_row(rows, aggregation="mean_over_pairs", threshold=0.4, layer=la)["pct_universal"]
            for la in (0, 1)] == [50.0, 75.0]
    csv = pd.read_csv(paths["table1_csv"])
    row = csv[(csv.threshold == 0.5) & (csv.aggregation == "mean_over_pairs") & (csv.layer == 1)]
    assert row["pct_universal"].item() == 50.0
    assert csv[csv.scope == "all"]["layer"].isna().all()
    long_csv = pd.read_csv(paths["table1_draws_csv"])
    assert len(long_csv) == len(long) == 2 * len(rows)  # two draws of every row
    # the API's views of the same file: draw 0, the mean over draws, the long table
    from ooc_universal.formats.tables import read_table1
    t1 = read_table1(one_pair)
    mean = t1.frame("mean")
    cell = mean[(mean.aggregation == "pair") & (mean.threshold == 0.4) & (mean.scope == "all")]
    assert cell["pct_universal"].item() == pytest.approx((62.5 + 37.5) / 2)
    assert t1.frame(0)["layer"].dtype == "Int64" and len(t1.frame("all")) == len(long)


def test_boundary_is_strict(tmp_path):
    write_reduced(tmp_path, [0.75, 0.75 + 2 ** -20, 0.5, 0.25], [0.25, 0.25, 0.0, 0.0],
                  n_layers_ref=1, d_mlp_ref=4, n_layers_other=1)
    sets = json.loads(universal(tmp_path, UniversalConfig(thresholds=[0.5]),
                                progress=False).paths["sets"].read_text())["sets"]
    assert sets[0]["neurons"] == [1]  # 0.5 == tau is not universal; 0.5 + 2^-20 is


def test_pair_averaged_by_hand(tmp_path):
    kw = dict(n_layers_ref=1, d_mlp_ref=2, n_layers_other=1, d_mlp_other=2)
    write_reduced(tmp_path, [0.875, 0.625], [0.25, 0.125], other="b", **kw)
    write_reduced(tmp_path, [0.5, 0.75], [0.125, 0.125], other="c", **kw)
    # per pair: b excess (.625, .5) -> {0}; c excess (.375, .625) -> {1}
    per = json.loads(universal(tmp_path, UniversalConfig(thresholds=[0.5]),
                               progress=False).paths["sets"].read_text())["sets"]
    assert {s["other"]: s["neurons"] for s in per} == {"b": [0], "c": [1]}
    # averaged: max (.6875, .6875) - baseline (.1875, .125) = (.5, .5625) -> {1}
    paths = universal(tmp_path, UniversalConfig(thresholds=[0.5], definition="pair-averaged"),
                      progress=False).paths
    avg = json.loads(paths["sets"].read_text())["sets"]
    assert len(avg) == 1
    assert (avg[0]["other"], avg[0]["definition"], avg[0]["neurons"], avg[0]["others"]) == \
        ("pair-averaged", "pair-averaged", [1], ["b", "c"])
    rows = json.loads(paths["table1"].read_text())["rows"]
    t1 = _row(rows, scope="all")          # one row per scope: the pair average only
    assert (t1["aggregation"], t1["other"]) == ("pair_averaged", None)
    assert t1["pct_universal"] == 50.0 and t1["n_universal"] == 1 and t1["n_pairs"] == 2
    df = pd.read_parquet(paths["neurons_parquet"])
    pa = df[df.aggregation == "pair_averaged"]
    assert pa["excess"].tolist() == [0.5, 0.5625] and pa["other"].isna().all()
    assert pa["match_layer"].tolist() == [pd.NA, pd.NA]


def test_mean_over_pairs_and_checkpoints(tmp_path):
    kw = dict(n_layers_ref=1, d_mlp_ref=4, n_layers_other=1)
    write_reduced(tmp_path, [0.9, 0.9, 0.9, 0.1], [0.1] * 4, other="b", step=100, **kw)
    write_reduced(tmp_path, [0.9, 0.1, 0.1, 0.1], [0.1] * 4, other="c", step=100, **kw)
    write_reduced(tmp_path, [0.9, 0.9, 0.1, 0.1], [0.1] * 4, other="b", step=200, **kw)
    rows = json.loads(universal(tmp_path, UniversalConfig(thresholds=[0.5]),
                                progress=False).paths["table1"]
                      .read_text())["rows"]
    t1 = [r for r in rows if r["aggregation"] == "mean_over_pairs" and r["scope"] == "all"]
    assert [(e["checkpoint"], e["n_pairs"], e["pct_universal"]) for e in t1] == \
        [(100, 2, 50.0), (200, 1, 50.0)]
    assert {p["other"]: p["pct_universal"] for p in rows if p["aggregation"] == "pair"
            and p["checkpoint"] == 100 and p["scope"] == "all"} == {"b": 75.0, "c": 25.0}


def _corr(x, y):
    """Pearson correlation matrix (float64), 0 where either side has zero variance."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    den = np.sqrt(np.outer((xc ** 2).sum(0), (yc ** 2).sum(0)))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = xc.T @ yc / den
    return np.where(den > 0, rho, 0.0)


def _rotation(seed, layer, d):
    """The contract's rotation, written from its formula."""
    r = np.random.default_rng([seed, layer]).standard_normal((d, d))
    return r / np.linalg.norm(r, axis=1, keepdims=True)


def test_extra_draws_from_covariance_equal_explicit_rotation(tmp_path):
    rng = np.random.default_rng(5)
    n, la, da, lb, db = 600, 2, 6, 3, 5
    y = rng.standard_normal((n, lb * db)) ** 2
    y[:, 2 * db:] = 3.0  # a dead layer of the other model: its rotated rho is 0
    x = np.abs(y[:, rng.integers(0, 2 * db, la * da)] + 0.8 * rng.standard_normal((n, la * da)))
    x[:, 4] = 1.5  # a zero-variance reference neuron
    xc, yc = x - x.mean(0), y - y.mean(0)
    cross = xc.T @ yc
    self_c = np.stack([yc[:, l * db:(l + 1) * db].T @ yc[:, l * db:(l + 1) * db]
                       for l in range(lb)])
    var = x.var(0)
    zero = var == 0
    rho = _corr(x, y)

    def explicit_baseline(seed):
        z = np.concatenate([y[:, l * db:(l + 1) * db] @ _rotation(seed, l, db).T
                            for l in range(lb)], axis=1)
        return _corr(x, z).max(1)

    row_max = np.where(zero, 0.0, rho.max(1))
    write_reduced(tmp_path, row_max, [explicit_baseline(3)], seeds=[3],
                  row_argmax=np.where(zero, -1, rho.argmax(1)), zero_var=zero,
                  n_layers_ref=la, d_mlp_ref=da, n_layers_other=lb, d_mlp_other=db,
                  n_tokens=n, cross=cross, self_comoment=self_c, ref_var=var)
    paths = universal(tmp_path, UniversalConfig(extra_baseline_draws=3, seed=2),
                      progress=False).paths
    df = pd.read_parquet(paths["neurons_parquet"])
    draws = pd.read_parquet(paths["neuron_draws"])
    draw = {j: d.sort_values("flat_index").reset_index(drop=True)
            for j, d in draws.groupby("draw")}
    sets = json.loads(paths["sets"].read_text())
    assert sets["inputs"][0]["draw_seeds"] == [3, 2, 4, 5]  # 3 is the reduce's: skipped
    for j, s in enumerate([2, 4, 5], start=1):
        expected = np.where(zero, 0.0, explicit_baseline(s))
        np.testing.assert_allclose(draw[j]["baseline_max"].to_numpy(), expected,
                                   rtol=0, atol=1e-6)
        np.testing.assert_allclose(draw[j]["excess"].to_numpy(), row_max - expected,
                                   rtol=0, atol=2e-6)
        assert set(draw[j]["draw_source"]) == {"cross_comoment"} and set(draw[j]["seed"]) == {s}
    assert draw[1]["baseline_max"][4] == 0.0 and df["excess"][4] == 0.0
    assert (draw[1]["baseline_max"] >= 0).all()  # the dead layer's rho 0 is in every max
    rows = json.loads(paths["table1"].read_text())["rows"]
    assert rows[0]["n_draws"] == 4


def test_kernel_rotation_matches_contract():
    from ooc_universal.kernels.rotation import rotation_matrix
    np.testing.assert_array_equal(rotation_matrix(7, 2, 5), _rotation(7, 2, 5))


def test_extra_draws_need_cross_comoment(one_pair):
    with pytest.raises(OocError, match="keep-covariance"):
        universal(one_pair, UniversalConfig(extra_baseline_draws=1), progress=False)


@pytest.mark.parametrize("bad", [0, 1.2, 1, -0.1, float("nan")])
def test_thresholds_outside_unit_interval(one_pair, bad):
    with pytest.raises(OocError, match=r"threshold .* outside \(0, 1\)"):
        # a settings object built without validation: the step checks the thresholds again
        universal(one_pair, UniversalConfig.model_construct(thresholds=[0.5, bad]),
                  progress=False)
    assert not (one_pair / "universal" / "sets.json").exists()


def test_no_reduce_files(tmp_path):
    with pytest.raises(OocError, match="ooc-universal reduce"):
        find_reduced(tmp_path)
    (tmp_path / "reduce").mkdir()
    (tmp_path / "reduce" / "a@1__b@1.h5.partial").write_bytes(b"")
    with pytest.raises(OocError, match="ooc-universal reduce"):
        universal(tmp_path, progress=False)


def test_refuses_mixed_token_sets(tmp_path):
    write_reduced(tmp_path, ROW_MAX, [BASE0], other="b", token_hash="aaa")
    write_reduced(tmp_path, ROW_MAX, [BASE0], other="c", token_hash="bbb")
    with pytest.raises(OocError, match="different token sets"):
        universal(tmp_path, progress=False)


def test_refuses_token_set_other_than_run(one_pair):
    (one_pair / "tokens").mkdir()
    (one_pair / "tokens" / "meta.json").write_text(json.dumps({"hash": "other"}))
    with pytest.raises(OocError, match="token set"):
        universal(one_pair, progress=False)


def test_refuses_mismatched_steps(tmp_path):
    write_reduced(tmp_path, ROW_MAX, [BASE0], step=100, other_step=200)
    with pytest.raises(OocError, match="same checkpoint"):
        universal(tmp_path, progress=False)


def test_refuses_duplicate_checkpoint(tmp_path):
    write_reduced(tmp_path, ROW_MAX, [BASE0])
    write_reduced(tmp_path, ROW_MAX, [BASE0], label_suffix="-rerun")
    with pytest.raises(OocError, match="two reduce files .* checkpoint 100"):
        universal(tmp_path, progress=False)


def test_reference_selection(tmp_path):
    write_reduced(tmp_path, ROW_MAX, [BASE0], ref="a", other="b")
    write_reduced(tmp_path, ROW_MAX, [BASE1], ref="b", other="a")
    with pytest.raises(OocError, match="--reference NAME or use --all-references"):
        universal(tmp_path, progress=False)
    with pytest.raises(OocError, match="available: a, b"):
        universal(tmp_path, reference="zz", progress=False)
    sets = json.loads(universal(tmp_path, reference="b", progress=False).paths["sets"]
                      .read_text())["sets"]
    assert {s["reference"] for s in sets} == {"b"}
    sets = json.loads(universal(tmp_path, all_references=True, progress=False).paths["sets"]
                      .read_text())["sets"]
    assert {(s["reference"], s["other"]) for s in sets} == {("a", "b"), ("b", "a")}


def _cli(args, capsys):
    from ooc_universal.cli.main import main
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr()


@pytest.mark.parametrize("bad", ["0", "0.4,1.2", "x"])
def test_cli_bad_thresholds_one_line(one_pair, capsys, bad):
    code, out = _cli(["universal", "--run-dir", str(one_pair), "--thresholds", bad], capsys)
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: threshold")


def test_cli_no_reduce_files(tmp_path, capsys):
    code, out = _cli(["universal", "--run-dir", str(tmp_path)], capsys)
    assert code == 1 and "ooc-universal reduce" in out.err
    assert len(out.err.strip().splitlines()) == 1


def test_cli_prints_table1(one_pair):
    from click.testing import CliRunner

    from ooc_universal.cli.main import cli
    res = CliRunner().invoke(cli, ["universal", "--run-dir", str(one_pair), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "Table 1" in res.output and "62.50" in res.output
    assert "spread over 2 baseline draws" in res.output
    assert "wrote" in res.output
    help_text = CliRunner().invoke(cli, ["universal", "--help"]).output
    assert "strict" in help_text and "draw 0" in help_text


def test_files_of_the_old_layout_are_refused_in_one_line(one_pair):
    from ooc_universal.formats.tables import read_neurons, read_table1
    paths = universal(one_pair, progress=False).paths
    doc = json.loads(paths["table1"].read_text())
    doc.pop("table_version")                       # what the old layout wrote
    paths["table1"].write_text(json.dumps(doc))
    with pytest.raises(OocError, match="table_version 1.*ooc-universal universal"):
        read_table1(one_pair)
    old = pd.read_parquet(paths["neurons_parquet"]).drop(columns=["aggregation"])
    paths["neurons_parquet"].unlink()
    old.to_csv(paths["neurons_csv"], index=False)   # an old CSV, no parquet beside it
    with pytest.raises(OocError, match="older ooc-universal"):
        read_neurons(one_pair)
