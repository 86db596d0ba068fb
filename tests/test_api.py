"""The notebook API (ooc_universal.open_run) against the files it reads, read here
independently with h5py, pyarrow and json."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

import ooc_universal as ou
from ooc_universal.errors import OocError
from tests.test_run import demo_run  # noqa: F401  (the module-scoped demo run fixture)


def test_tables_are_the_files(demo_run):  # noqa: F811
    rd, _ = demo_run
    run = ou.open_run(rd)
    neurons = run.neurons()
    raw = pq.read_table(rd / "universal" / "neurons.parquet").to_pandas()
    assert neurons.shape == raw.shape and (neurons["excess"].to_numpy()
                                           == raw["excess"].to_numpy()).all()
    t1 = run.table1()
    doc = json.loads((rd / "universal" / "table1.json").read_text())
    assert len(t1) == len(doc["rows"]) and len(run.table1("all")) == len(doc["draws"])
    assert sorted(t1["threshold"].unique()) == [0.4, 0.5, 0.6]
    assert len(run.neurons(draw="all")) == len(
        pq.read_table(rd / "universal" / "neuron_draws.parquet"))
    abl = run.ablation()
    assert len(abl) == len(json.loads((rd / "ablate" / "ablation.json").read_text())["rows"])
    assert len(run.persistence()) > 0 and len(run.sets()) > 0
    st = run.status()
    assert set(st["state"]) == {"complete"}, st[st["state"] != "complete"]


def test_every_table_of_the_demo_is_tidy(demo_run):  # noqa: F811
    """Every CSV and parquet file of the demo run, the JSON tables' rows and the API's
    frames: no column named after a DataFrame method, and where a `scope` column is,
    an integer layer that `df[df.layer == 0]` finds."""
    import pandas as pd
    rd, _ = demo_run
    run = ou.open_run(rd)
    frames = {str(p): pd.read_csv(p) for p in rd.rglob("*.csv")}
    frames.update({str(p): pd.read_parquet(p) for p in rd.rglob("*.parquet")})
    for name in ("universal/table1.json", "persistence/persistence.json",
                 "ablate/ablation.json"):
        doc = json.loads((rd / name).read_text())
        frames.update({f"{name}:{k}": pd.DataFrame(doc[k]) for k in ("rows", "draws")
                       if doc.get(k)})
    frames.update({"table1()": run.table1(), "table1('all')": run.table1("all"),
                   "neurons()": run.neurons(), "persistence()": run.persistence(),
                   "ablation()": run.ablation(), "ablation(draws=True)":
                   run.ablation(draws=True)})
    assert {"universal/table1.csv", "ablate/ablation.csv", "ablate/ablation_draws.csv",
            "persistence/persistence.csv"} <= {str(Path(k).relative_to(rd)) for k in frames
                                               if Path(k).is_absolute()}
    for name, df in frames.items():
        assert [c for c in df.columns if hasattr(pd.DataFrame, c)] == [], name
        if "scope" in df.columns:
            assert len(df[df.layer == 0]) > 0, name
            assert df.loc[df.scope == "all", "layer"].isna().all(), name
    abl = run.ablation()
    assert abl["layer"].dtype == "Int64" and "ablation_mode" in abl and "mode" not in abl


def test_reduced_is_an_xarray_dataset_with_named_dims(demo_run):  # noqa: F811
    rd, _ = demo_run
    run = ou.open_run(rd)
    ref, other = run.reduced_pairs()[0]
    ds = run.reduced(ref, other)
    with h5py.File(rd / "reduce" / f"{ref}__{other}.h5", "r") as f:
        row_max, base = f["row_max"][:], f["baseline/row_max"][:]
        d = int(f.attrs["d_mlp_ref"])
    assert set(ds.sizes) == {"ref_neuron", "other_neuron", "draw"}
    np.testing.assert_array_equal(ds["row_max"].values, row_max)
    np.testing.assert_array_equal(ds["baseline_row_max"].values, base)
    layer1 = ds["row_max"].where(ds.ref_layer == 1, drop=True)
    np.testing.assert_array_equal(layer1.values, row_max[d:2 * d])
    with pytest.raises(OocError, match="no reduce output"):
        run.reduced(ref, "nope")


def test_store_is_lazy_with_token_coordinates(demo_run):  # noqa: F811
    rd, _ = demo_run
    run = ou.open_run(rd)
    label = sorted(p.stem for p in (rd / "stores").glob("*.h5"))[0]
    arr = run.store(label)
    assert arr.dims == ("token", "neuron") and arr.chunks is not None  # dask-backed
    with h5py.File(rd / "stores" / f"{label}.h5", "r") as f:
        ds = f[list(f.keys())[0]]
        raw = ds[:50]
        d = int(ds.attrs["d_mlp"])
    np.testing.assert_array_equal(arr[:50].values, raw)
    np.testing.assert_array_equal(arr.sel(neuron=arr.layer == 1)[:50].values, raw[:, d:2 * d])
    with np.load(rd / "tokens" / "tokens.npz") as z:
        valid = z["valid"]
    w, p = np.nonzero(valid)
    np.testing.assert_array_equal(arr.window.values, w)
    np.testing.assert_array_equal(arr.position.values, p)


def test_tidy_views_on_a_hand_built_run(tmp_path):
    """table1 / neurons / persistence in their draw-0, per-draw and mean views, against
    the arrays written (no demo run needed)."""
    from ooc_universal.config import UniversalConfig
    from ooc_universal.steps.persistence import persistence
    from ooc_universal.steps.universal import universal
    from tests.test_universal import BASE0, BASE1, ROW_MAX, write_reduced
    from ooc_universal.rundir import ensure_sidecar
    for step in (100, 200):
        write_reduced(tmp_path, ROW_MAX, [BASE0, BASE1], other="b", step=step)
    for path in (tmp_path / "reduce").glob("*.h5"):   # made by hand here: vouch for them
        ensure_sidecar(path, {"step": "reduce"})
    universal(tmp_path, UniversalConfig(thresholds=[0.5]), progress=False)
    persistence(tmp_path, progress=False)
    run = ou.open_run(tmp_path)
    row_max, b0, b1 = (np.float64(np.float32(x)) for x in (ROW_MAX, BASE0, BASE1))
    n0 = run.neurons()
    assert n0["layer"].dtype == "Int64" and len(n0[n0.layer == 0]) == 2 * 4
    d1 = run.neurons(draw=1)
    np.testing.assert_array_equal(d1[d1.checkpoint == 100]["excess"], row_max - b1)
    mean = run.neurons(draw="mean")
    np.testing.assert_allclose(mean[mean.checkpoint == 100]["excess"],
                               row_max - (b0 + b1) / 2, rtol=0, atol=1e-15)
    both = ((row_max - b0) > 0.5).astype(float) + ((row_max - b1) > 0.5)
    np.testing.assert_array_equal(mean[mean.checkpoint == 100]["p_universal_0.5"], both / 2)
    t1 = run.table1()
    cell = t1[(t1.aggregation == "pair") & (t1.scope == "all") & (t1.checkpoint == 100)]
    assert cell["pct_universal"].item() == 100 * ((row_max - b0) > 0.5).mean()
    assert t1[t1.scope == "all"]["layer"].isna().all()
    t1m = run.table1("mean")
    cell = t1m[(t1m.aggregation == "pair") & (t1m.scope == "all") & (t1m.checkpoint == 100)]
    assert cell["pct_universal"].item() == pytest.approx(100 * both.mean() / 2)
    per = run.persistence()
    assert per[(per.aggregation == "pair") & (per.scope == "all")]["p_persist"].item() == 1.0
    with pytest.raises(OocError, match="not a draw"):
        run.neurons(draw=-1)


def test_missing_run_is_one_line(tmp_path):
    with pytest.raises(OocError, match="does not exist"):
        ou.open_run(tmp_path / "nope")


def test_convergence_is_the_reduce_tables_and_ends_at_table1(demo_run):  # noqa: F811
    """run.convergence(): every pair's CSV read back (read here with the csv module), one
    row per (pair, n_tokens, threshold); its last token count gives Table 1's numbers
    (which the universal step computed from the reduce files on its own)."""
    import csv
    rd, _ = demo_run
    run = ou.open_run(rd)
    conv = run.convergence()
    files = sorted((rd / "reduce").glob("*.convergence.csv"))
    assert files and len(files) == len(run.reduced_pairs())
    raw = [r for p in files for r in csv.DictReader(p.open())]
    assert len(conv) == len(raw)
    assert sorted(conv["n_tokens"].unique()) == [1024, 2048, 4096]
    assert conv["n_tokens_total"].eq(4096).all()
    assert sorted(conv["threshold"].unique()) == [0.4, 0.5, 0.6]
    import pandas as pd
    assert [c for c in conv.columns if hasattr(pd.DataFrame, c)] == []
    t1 = run.table1()
    pairs = t1[(t1.aggregation == "pair") & (t1.scope == "all")]
    last = conv[conv.n_tokens == conv.n_tokens_total]
    assert len(last) == len(pairs)
    for _, row in last.iterrows():
        cell = pairs[(pairs.other == row.other) & (pairs.checkpoint == row.checkpoint)
                     & (pairs.threshold == row.threshold) & (pairs.reference == row.reference)]
        assert cell["n_universal"].item() == row.n_universal, row
        assert cell["pct_universal"].item() == pytest.approx(row.pct_universal, abs=1e-9)
    # every token count of one pair: the universal counts of its prefixes, 0..100 %
    assert conv["pct_universal"].between(0, 100).all()


def test_convergence_missing_is_one_line(tmp_path):
    (tmp_path / "reduce").mkdir()
    with pytest.raises(OocError, match="no convergence table"):
        ou.open_run(tmp_path).convergence()
