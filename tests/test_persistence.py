"""Persistence on universal sets chosen by hand."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ooc_universal.errors import OocError
from ooc_universal.steps.persistence import persistence
from tests.test_universal import write_reduced

# reference r, 2 layers x 4 neurons (flat = layer * 4 + neuron), threshold 0.5
HAND = {
    ("b", 100): [0, 1, 5], ("b", 200): [0, 5, 6], ("b", 300): [0, 6],
    ("c", 100): [], ("c", 200): [2], ("c", 300): [2, 7],
}


def write_sets(run_dir, sets=HAND, tau=0.5):
    entries = [{"reference": "r", "other": o, "checkpoint": c, "threshold": tau,
                "definition": "per-pair", "draw": 0, "n_layers": 2, "d_mlp": 4,
                "neurons": n} for (o, c), n in sets.items()]
    (run_dir / "universal").mkdir(parents=True, exist_ok=True)
    (run_dir / "universal" / "sets.json").write_text(json.dumps(
        {"config": {}, "token_hash": "tok", "universal_id": "u1", "sets": entries}))
    from ooc_universal.rundir import seal
    seal(run_dir / "universal" / "sets.json", {"step": "universal"})


def _rows(doc, aggregation="pair"):
    """{(other or aggregation, t1, t2, layer or "all"): row} of one aggregation."""
    return {(r["other"] or r["aggregation"], r["t1"], r["t2"],
             "all" if r["scope"] == "all" else r["layer"]): r
            for r in doc["rows"] if r["aggregation"] == aggregation}


def test_persistence_by_hand(tmp_path):
    write_sets(tmp_path)
    paths = persistence(tmp_path, progress=False).paths
    doc = json.loads(paths["json"].read_text())
    rows = _rows(doc)
    # all ordered checkpoint pairs, adjacent and skipping
    assert sorted({(t1, t2) for _, t1, t2, _ in rows}) == [(100, 200), (100, 300), (200, 300)]

    r = rows[("b", 100, 200, "all")]  # {0,1,5} -> {0,5,6}
    assert (r["n_t1"], r["n_t2"], r["n_both"], r["n_emerged"]) == (3, 3, 2, 1)
    assert r["p_persist"] == pytest.approx(2 / 3) and r["jaccard"] == pytest.approx(2 / 4)
    assert r["undefined"] is False
    r = rows[("b", 100, 200, 0)]  # layer 0: {0,1} -> {0}
    assert (r["n_t1"], r["n_both"], r["p_persist"], r["n_emerged"]) == (2, 1, 0.5, 0)
    r = rows[("b", 100, 200, 1)]  # layer 1: {5} -> {5,6}
    assert (r["n_t1"], r["n_t2"], r["p_persist"], r["n_emerged"], r["jaccard"]) == \
        (1, 2, 1.0, 1, 0.5)
    r = rows[("b", 100, 300, "all")]  # {0,1,5} -> {0,6}
    assert (r["n_both"], r["p_persist"], r["n_emerged"]) == (1, pytest.approx(1 / 3), 1)

    r = rows[("c", 100, 200, "all")]  # empty U(t1): undefined, never 0 or NaN
    assert r["p_persist"] is None and r["undefined"] is True
    assert (r["n_t1"], r["n_t2"], r["n_emerged"], r["jaccard"]) == (0, 1, 1, 0.0)
    r = rows[("c", 100, 200, 1)]  # empty on both sides: jaccard undefined too
    assert r["p_persist"] is None and r["jaccard"] is None and r["undefined"] is True
    r = rows[("c", 200, 300, "all")]  # {2} -> {2,7}
    assert (r["p_persist"], r["n_emerged"]) == (1.0, 1)

    mean = _rows(doc, "mean_over_pairs")
    pooled = _rows(doc, "pooled_over_pairs")
    assert all(r["other"] is None for r in doc["rows"] if r["aggregation"] != "pair")
    m = mean[("mean_over_pairs", 100, 200, "all")]  # only b is defined
    assert m["p_persist"] == pytest.approx(2 / 3) and m["n_pairs"] == 1
    p = pooled[("pooled_over_pairs", 100, 200, "all")]  # (2 + 0) / (3 + 0)
    assert p["p_persist"] == pytest.approx(2 / 3) and (p["n_t1"], p["n_both"]) == (3, 2)
    m = mean[("mean_over_pairs", 200, 300, "all")]  # b: 2/3, c: 1/1
    assert m["p_persist"] == pytest.approx((2 / 3 + 1) / 2) and m["n_pairs"] == 2
    p = pooled[("pooled_over_pairs", 200, 300, "all")]  # (2 + 1) / (3 + 1)
    assert p["p_persist"] == pytest.approx(3 / 4) and p["n_emerged"] == 0 + 1
    m = mean[("mean_over_pairs", 100, 200, 1)]  # layer 1: b 1/1, c undefined
    assert m["p_persist"] == 1.0 and m["n_pairs"] == 1
    # layer 0 at 100 -> 200 for c is empty -> the mean is b's only
    assert mean[("mean_over_pairs", 100, 200, 0)]["p_persist"] == 0.5


def test_all_undefined_average_is_null(tmp_path):
    write_sets(tmp_path, {("b", 1): [], ("b", 2): [4], ("c", 1): [], ("c", 2): []})
    doc = json.loads(persistence(tmp_path, progress=False).paths["json"].read_text())
    assert {r["aggregation"] for r in doc["rows"]} == {"pair", "mean_over_pairs",
                                                       "pooled_over_pairs"}
    for r in doc["rows"]:
        assert r["p_persist"] is None and r["undefined"] is True
    text = (tmp_path / "persistence" / "persistence.json").read_text()
    assert "NaN" not in text


def test_csv_loads_in_pandas(tmp_path):
    write_sets(tmp_path)
    paths = persistence(tmp_path, progress=False).paths
    df = pd.read_csv(paths["csv"])
    for col in ("reference", "other", "threshold", "t1", "t2", "scope", "layer", "n_t1",
                "n_t2", "n_both", "p_persist", "n_emerged", "jaccard"):
        assert col in df.columns
    assert not set(df.columns) & set(dir(pd.DataFrame))  # no column shadows a method
    pair = df[df.aggregation == "pair"]
    assert len(pair) == 2 * 3 * 3  # 2 pairs x 3 intervals x (all + 2 layers)
    row = pair[(pair.other == "b") & (pair.t1 == 100) & (pair.t2 == 200) & (pair.scope == "all")]
    assert row["p_persist"].item() == pytest.approx(2 / 3)
    assert len(pair[pair.layer == 0]) == 2 * 3          # integer layers: no "all" among them
    assert pair[pair.scope == "all"]["layer"].isna().all()
    undefined = pair[(pair.other == "c") & (pair.t1 == 100) & (pair.scope == "all")]
    assert undefined["undefined"].all() and undefined["p_persist"].isna().all()
    assert set(df.other.dropna()) == {"b", "c"}
    assert set(df.aggregation) == {"pair", "mean_over_pairs", "pooled_over_pairs"}
    assert df.p_persist.dropna().between(0, 1).all()      # a fraction, as the name says
    from ooc_universal.formats.tables import read_persistence
    frame = read_persistence(tmp_path).frame()
    assert frame["layer"].dtype == "Int64" and len(frame) == len(df)


def test_needs_sets_and_two_checkpoints(tmp_path):
    with pytest.raises(OocError, match="ooc-universal universal"):
        persistence(tmp_path, progress=False)
    write_sets(tmp_path, {("b", 100): [1]})
    with pytest.raises(OocError, match="two or more checkpoints"):
        persistence(tmp_path, progress=False)


def test_chain_from_reduce_files(tmp_path):
    """universal -> persistence on hand-built reduce files at two checkpoints."""
    from ooc_universal.config import UniversalConfig
    from ooc_universal.steps.universal import universal
    kw = dict(n_layers_ref=2, d_mlp_ref=2, n_layers_other=2, d_mlp_other=2)
    base = [0.125] * 4
    write_reduced(tmp_path, [0.75, 0.875, 0.25, 0.75], base, other="b", step=100, **kw)
    write_reduced(tmp_path, [0.75, 0.25, 0.75, 0.75], base, other="b", step=200, **kw)
    # excess .625 at k=0,1,3 (t=100) and k=0,2,3 (t=200): P = 2/3, layer 1: {3} -> {2,3}
    universal(tmp_path, UniversalConfig(thresholds=[0.5]), progress=False)
    doc = json.loads(persistence(tmp_path, progress=False).paths["json"].read_text())
    rows = {"all" if r["scope"] == "all" else r["layer"]: r for r in doc["rows"]
            if r["aggregation"] == "pair"}
    assert rows["all"]["p_persist"] == pytest.approx(2 / 3)
    assert (rows[1]["n_t1"], rows[1]["n_t2"], rows[1]["p_persist"]) == (1, 2, 1.0)
    assert doc["source"]["token_hash"] == "tok0"
    mean = [r for r in doc["rows"] if r["aggregation"] == "mean_over_pairs"]
    assert np.isclose(mean[0]["p_persist"], 2 / 3)


def test_cli_prints_table_and_errors(tmp_path, capsys):
    from click.testing import CliRunner

    from ooc_universal.cli.main import cli, main
    with pytest.raises(SystemExit) as exc:
        main(["persistence", "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and len(err) == 1 and "ooc-universal universal" in err[0]
    write_sets(tmp_path)
    res = CliRunner().invoke(cli, ["persistence", "--run-dir", str(tmp_path), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "100->200" in res.output and "0.667 (2/3)" in res.output
    assert "undef" in res.output and "pooled over pairs" in res.output


def test_pair_averaged_sets_give_rows_of_their_own(tmp_path):
    entries = [{"reference": "r", "other": "pair-averaged", "checkpoint": c, "threshold": 0.5,
                "definition": "pair-averaged", "draw": 0, "n_layers": 2, "d_mlp": 4,
                "neurons": n, "others": ["b", "c"]}
               for c, n in ((100, [0, 1, 5]), (200, [0, 5, 6]))]
    (tmp_path / "universal").mkdir()
    (tmp_path / "universal" / "sets.json").write_text(json.dumps(
        {"config": {}, "token_hash": "tok", "universal_id": "u1", "sets": entries}))
    from ooc_universal.rundir import seal
    seal(tmp_path / "universal" / "sets.json", {"step": "universal"})
    doc = json.loads(persistence(tmp_path, progress=False).paths["json"].read_text())
    assert {r["aggregation"] for r in doc["rows"]} == {"pair_averaged"}   # no mean/pooled
    top = next(r for r in doc["rows"] if r["scope"] == "all")
    assert (top["other"], top["n_pairs"], top["p_persist"]) == (None, 2, pytest.approx(2 / 3))
