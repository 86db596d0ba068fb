"""Tidy tables (formats/ablation.py, formats/tables.py): the ablation files in the layout
of table_version 2, read back with pandas and csv directly; the version-1 ablation.json
still read; no column named after a DataFrame method in any table layout."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pandas as pd
import pytest

import ooc_universal as ou
from ooc_universal.errors import OocError
from ooc_universal.formats import ablation as fa
from ooc_universal.formats import tables as ft
from ooc_universal.formats.sets import UniversalSet
from ooc_universal.steps.ablate import AblationResult, ablation_sets, summarise

N_LAYERS, D_MLP = 2, 4


def method_named(columns) -> list[str]:
    """The columns that pandas would show as a DataFrame attribute instead of the column
    (df.count, df.mode, df.rank, ...)."""
    return sorted(c for c in columns if hasattr(pd.DataFrame, str(c)))


def _results(definition="per-pair"):
    """Ablation results of one universal set, with KL = 0.01 * (draw + 1) + layer code, so
    every row's numbers can be told apart and checked by hand."""
    other = "pair-averaged" if definition == "pair-averaged" else "oth"
    rec = UniversalSet(reference="ref", other=other, checkpoint=100, threshold=0.5,
                       definition=definition, draw=0, n_layers=N_LAYERS, d_mlp=D_MLP,
                       neurons=np.array([1, 5, 6], np.int64))
    sets = ablation_sets([rec], control_draws=2, seed=0)
    out = []
    for s in sets:
        code = 0.0 if s.layer == "all" else 0.1 * (int(s.layer) + 1)
        kl = 0.01 * (s.draw + 1) + code
        out.append(AblationResult(s, kl=kl, kl_se=0.001, delta_loss=2 * kl,
                                  delta_loss_se=0.002, n_positions=10,
                                  n_neurons=s.n_neurons, window_kl=np.full(3, kl),
                                  window_delta_loss=np.full(3, 2 * kl)))
    return out


def _write(run_dir, results, mode="zero"):
    from ooc_universal.steps.ablate import _draw_row   # the step's own per-draw rows
    summary = summarise(results, mode)
    result = fa.AblationFile(config={"mode": mode}, inputs={}, models={}, rows=summary)
    (run_dir / "ablate").mkdir(parents=True, exist_ok=True)
    return fa.write_ablation(run_dir, result, [_draw_row(r, mode) for r in results])


def test_ablation_csvs_are_tidy(tmp_path):
    paths = _write(tmp_path, _results())
    summary = pd.read_csv(paths["csv"])
    draws = pd.read_csv(paths["draws_csv"])
    assert list(summary.columns) == fa.SUMMARY_COLUMNS
    assert list(draws.columns) == fa.DRAW_COLUMNS
    for df in (summary, draws):
        assert method_named(df.columns) == []
        assert set(df["scope"]) == {"all", "layer"}
        assert df.loc[df.scope == "all", "layer"].isna().all()
        assert (df["ablation_mode"] == "zero").all() and (df["aggregation"] == "pair").all()
    layer0 = summary[summary.layer == 0]
    # layer 0 holds neuron 1: its universal set and the control (mean of 2 draws)
    assert sorted(layer0["set"]) == ["control", "universal"]
    uni = layer0[layer0.set == "universal"].iloc[0]
    assert uni["n_neurons"] == 1 and uni["n_draws"] == 1
    assert uni["kl"] == pytest.approx(0.01 + 0.1)
    ctrl = layer0[layer0.set == "control"].iloc[0]
    assert ctrl["n_draws"] == 2 and ctrl["kl"] == pytest.approx((0.01 + 0.02) / 2 + 0.1)
    assert len(draws[(draws.layer == 1) & (draws.set == "control")]) == 2
    assert sorted(draws[(draws.layer == 1) & (draws.set == "control")]["draw"]) == [0, 1]
    # the whole-model universal set: 3 neurons, an empty layer cell in the CSV itself
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    whole = [r for r in rows if r["scope"] == "all" and r["set"] == "universal"]
    assert len(whole) == 1 and whole[0]["layer"] == "" and whole[0]["n_neurons"] == "3"


def test_ablation_json_and_api_frames(tmp_path):
    paths = _write(tmp_path, _results(), mode="mean")
    doc = json.loads(paths["json"].read_text())
    assert doc["table_version"] == 2 and doc["columns"] == fa.SUMMARY_COLUMNS
    assert all(r["layer"] is None for r in doc["rows"] if r["scope"] == "all")
    assert all(isinstance(r["layer"], int) for r in doc["rows"] if r["scope"] == "layer")
    assert all("mode" not in r and "draw" not in r for r in doc["rows"])
    run = ou.open_run(tmp_path)
    abl = run.ablation()
    assert abl["layer"].dtype == "Int64" and len(abl[abl.layer == 0]) == 2
    assert set(abl["ablation_mode"]) == {"mean"}
    assert abl.loc[abl.scope == "all", "layer"].isna().all()
    draws = run.ablation(draws=True)
    assert draws["layer"].dtype == "Int64" and draws["draw"].dtype == "int64"
    # 1 universal + 2 controls, over all layers and for each of the 2 layers
    assert len(draws) == 3 * (1 + N_LAYERS)
    assert method_named(abl.columns) == [] and method_named(draws.columns) == []


def test_pair_averaged_sets_are_aggregation_rows(tmp_path):
    _write(tmp_path, _results("pair-averaged"))
    abl = ou.open_run(tmp_path).ablation()
    assert set(abl["aggregation"]) == {"pair_averaged"}
    assert abl["other"].isna().all()


def test_version_1_ablation_json_still_reads(tmp_path):
    """An ablation.json as the toolkit wrote it before: text layer "all", `mode`, a draw
    "mean" on control rows, no table_version."""
    old = [dict(reference="ref", other="oth", checkpoint=100, threshold=0.5,
                definition="per-pair", mode="zero", set="universal", layer="all", draw=0,
                n_draws=1, n_neurons=3, n_positions=10, kl=0.5, kl_se=0.1, kl_ci_low=None,
                kl_ci_high=None, delta_loss=1.0, delta_loss_se=0.2, delta_loss_ci_low=None,
                delta_loss_ci_high=None),
           dict(reference="ref", other="oth", checkpoint=100, threshold=0.5,
                definition="per-pair", mode="zero", set="control", layer=1, draw="mean",
                n_draws=2, n_neurons=1, n_positions=10, kl=0.25, kl_se=0.1, kl_ci_low=0.1,
                kl_ci_high=0.4, delta_loss=0.5, delta_loss_se=0.2, delta_loss_ci_low=0.3,
                delta_loss_ci_high=0.7)]
    (tmp_path / "ablate").mkdir()
    (tmp_path / "ablate" / "ablation.json").write_text(json.dumps(dict(
        step="ablate", config={"mode": "zero"}, inputs={}, models={}, rows=old,
        columns=list(old[0]))))
    result = fa.read_ablation(tmp_path)
    assert [(r["scope"], r["layer"]) for r in result.rows] == [("all", None), ("layer", 1)]
    assert all(r["ablation_mode"] == "zero" and "mode" not in r and "draw" not in r
               for r in result.rows)
    assert result.columns == fa.SUMMARY_COLUMNS
    frame = result.frame()
    assert frame.loc[frame.layer == 1, "kl"].item() == 0.25
    text = fa.format_ablation(result.rows).splitlines()
    assert len(text) == 3 and text[1].split()[5] == "all" and text[2].split()[5] == "1"


def test_other_table_versions_are_refused(tmp_path):
    (tmp_path / "ablate").mkdir()
    (tmp_path / "ablate" / "ablation.json").write_text(json.dumps(dict(
        table_version=9, config={}, inputs={}, models={}, rows=[])))
    with pytest.raises(OocError, match="table_version 9.*run `ooc-universal ablate` again"):
        fa.read_ablation(tmp_path)


def test_tidy_row_is_idempotent():
    row = dict(reference="r", other="o", definition="per-pair", mode="mean", set="universal",
               layer="all", draw=0, kl=math.nan)
    once = fa.tidy_row(row)
    assert fa.tidy_row(once) == once and once["ablation_mode"] == "mean"
    assert list(once)[:len(fa.SUMMARY_COLUMNS)] == fa.SUMMARY_COLUMNS


def test_no_layout_names_a_column_after_a_dataframe_method():
    """Every column list the toolkit writes or returns, and the per-threshold columns."""
    layouts = {
        "neurons": ft.NEURON_COLUMNS, "neuron_draws": ft.NEURON_DRAW_COLUMNS,
        "table1": ft.TABLE1_COLUMNS, "table1_draws": ft.TABLE1_DRAW_COLUMNS,
        "persistence": ft.PERSISTENCE_COLUMNS, "ablation": fa.SUMMARY_COLUMNS,
        "ablation_draws": fa.DRAW_COLUMNS,
        "per threshold": [ft.universal_column(0.5), ft.share_column(0.5)]}
    bad = {name: method_named(cols) for name, cols in layouts.items() if method_named(cols)}
    assert bad == {}
    # sanity of the check itself: these would shadow methods
    assert method_named(["count", "mode", "rank", "size", "T", "layer"]) == \
        ["T", "count", "mode", "rank", "size"]
