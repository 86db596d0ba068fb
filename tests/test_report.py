"""The report on a hand-built run directory: figures, self-contained HTML, numbers = sources."""
from __future__ import annotations

import base64
import csv
import json
import re
import shutil

import numpy as np
import pytest
from ooc_universal.errors import OocError
from click.testing import CliRunner

from ooc_universal.config import UniversalConfig
from ooc_universal.report import report
from ooc_universal.steps.persistence import persistence
from ooc_universal.steps.universal import universal
from tests.test_universal import write_reduced

N_LAYERS, D_MLP = 3, 16
N = N_LAYERS * D_MLP
OTHERS = ("b", "c")
CKPTS = (100, 200, 300)
TAUS = (0.4, 0.5, 0.6)
ABL_TAUS = (0.5, 0.6)          # ablation deliberately for a subset of the thresholds
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ABL_COLUMNS = ["reference", "other", "checkpoint", "threshold", "definition", "mode", "set",
               "layer", "draw", "n_draws", "n_neurons", "n_positions", "kl", "kl_se",
               "kl_ci_low", "kl_ci_high", "delta_loss", "delta_loss_se", "delta_loss_ci_low",
               "delta_loss_ci_high"]


def _arrays(other_i: int, ck_i: int):
    """row_max (N,), baseline (2, N) float32; excess grows with the checkpoint."""
    strength = np.random.default_rng([7, other_i]).uniform(0.0, 0.6, size=N)
    rng = np.random.default_rng([7, other_i, ck_i])
    base = rng.uniform(0.05, 0.4, size=(2, N)).astype(np.float32)
    row = (base[0] + strength + 0.04 * ck_i + rng.normal(0.0, 0.05, size=N)).astype(np.float32)
    row = np.minimum(row, 0.99).astype(np.float32)
    row[5] = base[0, 5] = base[1, 5] = 0.0           # a zero-variance neuron
    if other_i == 1 and ck_i == 0:                   # pair c at 100: layer 0 never universal
        row[:D_MLP] = base[0, :D_MLP] + 0.1
    return row, base


def _ablation_rows(sets_doc, rng) -> list[dict]:
    rows = []
    for s in sets_doc["sets"]:
        if s["threshold"] not in ABL_TAUS:
            continue
        uni = np.asarray(s["neurons"], int)
        for layer in ["all"] + list(range(N_LAYERS)):
            n = len(uni) if layer == "all" else int((uni // D_MLP == layer).sum())
            for kind in ("universal", "control"):
                kl = 0.0 if n == 0 else float(rng.uniform(0.01, 0.3)) * (
                    1.0 if kind == "universal" else 0.1)
                dl = 0.0 if n == 0 else kl * float(rng.uniform(0.5, 1.2))
                row = dict(reference=s["reference"], other=s["other"],
                           checkpoint=s["checkpoint"], threshold=s["threshold"],
                           definition="per-pair", mode="zero", set=kind, layer=layer,
                           n_neurons=n, n_positions=500, kl=kl, kl_se=kl * 0.07,
                           delta_loss=dl, delta_loss_se=abs(dl) * 0.09)
                if kind == "universal":
                    row.update(draw=0, n_draws=1, kl_ci_low=None, kl_ci_high=None,
                               delta_loss_ci_low=None, delta_loss_ci_high=None)
                else:
                    row.update(draw="mean", n_draws=3, kl_ci_low=kl * 0.8,
                               kl_ci_high=kl * 1.2, delta_loss_ci_low=dl - 0.01,
                               delta_loss_ci_high=dl + 0.01)
                rows.append(row)
    return rows


def _write_ablation(run_dir):
    sets_doc = json.loads((run_dir / "universal" / "sets.json").read_text())
    rows = _ablation_rows(sets_doc, np.random.default_rng(3))
    out = run_dir / "ablate"
    out.mkdir()
    doc = dict(step="ablate", toolkit_version="test", columns=ABL_COLUMNS, rows=rows,
               models={}, config=dict(mode="zero", control_draws=3, seed=0),
               inputs=dict(token_hash="tok0", n_eval_windows=10, n_eval_positions=500))
    (out / "ablation.json").write_text(json.dumps(doc))
    with open(out / "ablation.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(ABL_COLUMNS)
        for r in rows:
            w.writerow(["" if r[c] is None else repr(r[c]) if isinstance(r[c], float)
                        else r[c] for c in ABL_COLUMNS])
    from ooc_universal.rundir import seal
    for name in ("ablation.json", "ablation.csv"):
        seal(out / name, {"step": "ablate"})


def _write_cards(run_dir):
    """A hand-built cards.json (the cards step needs model weights; tests/test_cards.py
    runs it on real ones): two cards of reference a at step 300."""
    from ooc_universal.formats.cards import CONTEXTS_NOTE, CardsFile, write_cards

    def token(i, logit):
        return {"token_id": i, "token": " x" if i == 0 else chr(97 + i), "logit": logit}

    def card(flat, rank, role):
        matches = [{"other": o, "excess": 0.61 - 0.2 * k, "max_corr": 0.9 - 0.1 * k,
                    "baseline_max": 0.29, "match_layer": 1, "match_neuron": flat % D_MLP,
                    "is_universal": {f"{t:g}": 0.61 - 0.2 * k > t for t in TAUS}}
                   for k, o in enumerate(OTHERS)]
        return {"reference": "a", "checkpoint": 300, "layer": flat // D_MLP,
                "neuron": flat % D_MLP, "flat_index": flat, "model": "a@300",
                "selected_by": [{"other": "b", "rank": rank}], "matches": matches,
                "vocab": {"kurtosis": 12.5, "skew": -2.0 if role == "suppression" else 1.5,
                          "role": role, "promoted": [token(i, 1.0 - 0.1 * i) for i in range(8)],
                          "suppressed": [token(i + 8, -1.0 + 0.1 * i) for i in range(8)]},
                "contexts": None, "contexts_note": CONTEXTS_NOTE}

    write_cards(run_dir, CardsFile([card(20, 1, "prediction"), card(7, 2, "suppression")],
                                   {"top_n": 8, "n_tokens": 8, "kurtosis_cut": 10.0},
                                   toolkit_version="test"))


def _write_zoo(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    models = [{"name": f"tiny-{x}", "seed": i, "dir": f"tiny-{x}", "checkpoints": {
        str(s): {"heldout_loss": 2.5 - 0.3 * j - 0.01 * i, "train_loss_ema": 2.6 - 0.3 * j}
        for j, s in enumerate(CKPTS)}} for i, x in enumerate("abc")]
    path.write_text(json.dumps({"recipe": {"n_layer": N_LAYERS, "d_mlp": D_MLP},
                                "recipe_hash": "r0", "n_params_per_model": 1234,
                                "checkpoint_steps": list(CKPTS), "loss_units": "nats per byte",
                                "unigram_heldout_loss": 3.1234567, "eval_bytes": 4096,
                                "models": models}))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A run with reduce, universal, persistence, ablation, tokens meta, config, zoo."""
    rd = tmp_path_factory.mktemp("run")
    for oi, other in enumerate(OTHERS):
        for ci, ck in enumerate(CKPTS):
            row, base = _arrays(oi, ci)
            write_reduced(rd, row, base, ref="a", other=other, step=ck, n_layers_ref=N_LAYERS,
                          d_mlp_ref=D_MLP, n_layers_other=N_LAYERS, d_mlp_other=D_MLP,
                          zero_var=np.arange(N) == 5)
    universal(rd, UniversalConfig(thresholds=list(TAUS)), progress=False)
    persistence(rd, progress=False)
    _write_ablation(rd)
    _write_cards(rd)
    from ooc_universal.rundir import seal
    seal(rd / "cards" / "cards.json", {"step": "cards"})
    (rd / "tokens").mkdir()
    (rd / "tokens" / "meta.json").write_text(json.dumps({"hash": "tok0",
                                                         "toolkit_version": "0.1.0"}))
    zoo = rd.parent / f"{rd.name}-zoo" / "zoo.json"
    _write_zoo(zoo)
    (rd / "config.toml").write_text(f'models = ["a", "b", "c"]\nthresholds = [0.4, 0.5, 0.6]\n'
                                    f'zoo_json = "{zoo}"\n')
    return rd


@pytest.fixture(scope="module")
def full(base_run):
    paths = report(base_run, progress=False)
    return base_run, paths, json.loads(paths["data"].read_text())


EXPECTED_FIGURES = (
    ["universal_percent", "corr_vs_baseline", "excess_hist", "universal_layer_counts",
     "heldout_loss"]
    + [f"{k}_t{t}" for t in ("04", "05", "06") for k in
       ("persistence_pairs", "persistence_layers", "persistence_layers_by_pair")]
    + [f"{k}_t{t}" for t in ("05", "06") for k in ("ablation", "ablation_layers")])


def test_figures_exist_and_are_png(full):
    rd, paths, data = full
    assert sorted(data["figures"]) == sorted(EXPECTED_FIGURES)
    md = paths["md"].read_text()
    for fid, fig in data["figures"].items():
        png = (paths["dir"] / fig["file"]).read_bytes()
        assert png.startswith(PNG_MAGIC), fid
        width, height = np.frombuffer(png[16:24], ">u4")   # IHDR
        assert width > 300 and height > 200, fid
        assert fig["title"] and len(fig["caption"]) > 60, fid
        assert f"]({fig['file']})" in md                    # linked beside index.md
    import matplotlib.image as mpimg
    img = mpimg.imread(paths["dir"] / "fig_ablation_t05.png")
    assert img.ndim == 3 and img.shape[0] > 200
    assert not list(rd.glob("report.tmp-*")) and not list(rd.glob("report.old-*"))


def test_html_is_self_contained(full):
    rd, paths, data = full
    page = paths["html"].read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == len(data["figures"])
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(href|src)="(?!#|data:)', page)  # only in-page anchors
    assert "<link" not in page and "<script" not in page
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
    files = {(paths["dir"] / f["file"]).read_bytes() for f in data["figures"].values()}
    assert embedded == files
    assert page.count("<table") == md_tables(paths["md"].read_text())


def md_tables(md: str) -> int:
    return len(re.findall(r"^\|---", md, flags=re.M))


def _md_rows(md: str) -> set[str]:
    return {line for line in md.splitlines() if line.startswith("| ")}


def _md_row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _summary(rows, layer=None):
    """{(threshold, checkpoint): row} of the mean-over-pairs rows of one scope."""
    return {(r["threshold"], r["checkpoint"]): r for r in rows
            if r["aggregation"] == "mean_over_pairs" and r["layer"] == layer}


def test_table1_numbers_equal_sources(full):
    rd, paths, data = full
    src = json.loads((rd / "universal" / "table1.json").read_text())["rows"]
    by = _summary(src)
    md_rows = _md_rows(paths["md"].read_text())
    t = data["tables"]["table1"]
    assert t["rounding"] == "2 decimals"
    assert len(t["records"]) == len(TAUS) * len(CKPTS)
    for rec in t["records"]:
        assert rec["pct_universal"] == by[(rec["threshold"], rec["checkpoint"])]["pct_universal"]
    for i, tau in enumerate(TAUS):
        row = [f"{tau:g}"] + [f"{by[(tau, c)]['pct_universal']:.2f}" for c in CKPTS]
        assert t["rows"][i] == row and _md_row(row) in md_rows
    # independently: 100 * count(excess_0 > tau) / N from the arrays written, mean of pairs
    for tau in TAUS:
        for ci, ck in enumerate(CKPTS):
            pct = []
            for oi in range(len(OTHERS)):
                row, base = _arrays(oi, ci)
                excess = row.astype(np.float64) - base[0].astype(np.float64)
                pct.append(100.0 * np.sum(excess > tau) / N)
            assert float(t["rows"][TAUS.index(tau)][1 + ci]) == pytest.approx(
                np.mean(pct), abs=0.00501)      # shown to 2 decimals
    # per pair + spread over the 2 baseline draws
    cells = {(r["aggregation"], r["other"], r["threshold"], r["checkpoint"]): r
             for r in src if r["scope"] == "all"}
    pairs = data["tables"]["table1_pairs"]
    for rec, row in zip(pairs["records"], pairs["rows"]):
        s = cells[(rec["aggregation"], rec["other"], rec["threshold"], rec["checkpoint"])]
        assert rec["pct_universal"] == s["pct_universal"]
        assert rec["pct_universal_draws_std"] == s["pct_universal_draws_std"]
        assert rec["n_draws"] == 2
        assert row[3] == f"{s['pct_universal']:.2f}"
        assert row[5] == (f"{s['pct_universal_draws_mean']:.2f} ± "
                          f"{s['pct_universal_draws_std']:.2f} "
                          f"[{s['pct_universal_draws_min']:.2f}, "
                          f"{s['pct_universal_draws_max']:.2f}]")
        assert row[4] == ("–" if s["aggregation"] != "pair" else str(s["n_universal"]))
        assert _md_row(row) in md_rows
    assert {r[2] for r in pairs["rows"]} == {"mean over pairs", *OTHERS}
    # per layer, against table1.csv (an independent file)
    import pandas as pd
    t1csv = pd.read_csv(rd / "universal" / "table1.csv")
    layers = data["tables"]["table1_layers"]
    for rec in layers["records"]:
        m = t1csv[(t1csv.threshold == rec["threshold"]) & (t1csv.checkpoint == rec["checkpoint"])
                  & (t1csv.aggregation == "mean_over_pairs") & (t1csv.layer == rec["layer"])]
        assert len(m) == 1
        assert rec["pct_universal"] == pytest.approx(m.pct_universal.iloc[0], rel=1e-12)
    col = layers["columns"].index("tau 0.5, step 200")
    for layer in range(N_LAYERS):
        assert layers["rows"][layer][col] == \
            f"{_summary(src, layer)[(0.5, 200)]['pct_universal']:.2f}"


def _label(row) -> str:
    return row["other"] or row["aggregation"].replace("_", " ")


def test_persistence_numbers_equal_sources(full):
    rd, paths, data = full
    doc = json.loads((rd / "persistence" / "persistence.json").read_text())
    src = {(_label(r), r["threshold"], r["t1"], r["t2"], r["layer"]): r for r in doc["rows"]}
    md_rows = _md_rows(paths["md"].read_text())
    t = data["tables"]["persistence"]
    assert t["columns"] == ["threshold", "model pair", "100 -> 200", "200 -> 300", "100 -> 300"]
    n_undefined = 0
    for rec in t["records"]:
        s = src[(_label(rec), rec["threshold"], rec["t1"], rec["t2"], rec["layer"])]
        assert rec["p_persist"] == s["p_persist"] and rec["n_t1"] == s["n_t1"]
        assert rec["n_both"] == s["n_both"]
    for row in t["rows"]:
        assert _md_row(row) in md_rows
        tau, other = float(row[0]), row[1]
        for cell, (a, b) in zip(row[2:], [(100, 200), (200, 300), (100, 300)]):
            s = src[(other, tau, a, b, None)]
            if s["p_persist"] is None:
                assert cell.startswith("undefined")
            elif other == "mean over pairs":
                assert cell == f"{s['p_persist']:.3f} (mean of {s['n_pairs']} pair(s))"
            else:
                assert cell == f"{s['p_persist']:.3f} ({s['n_both']}/{s['n_t1']})"
    # layer tables: pair c at 100 has no universal neuron in layer 0 -> undefined there
    lt = data["tables"]["persistence_layers_t05"]
    for rec in lt["records"]:
        s = src[(_label(rec), rec["threshold"], rec["t1"], rec["t2"], rec["layer"])]
        assert rec["p_persist"] == s["p_persist"]
        n_undefined += rec["p_persist"] is None
    pair_rows = [r for r in doc["rows"] if r["other"] == "c" and r["t1"] == 100
                 and r["layer"] == 0]
    assert pair_rows and all(r["p_persist"] is None for r in pair_rows)
    fig = data["figures"]["persistence_layers_by_pair_t05"]["data"]["series"]
    c100 = [s for s in fig if s["other"] == "c" and s["interval"][0] == 100]
    assert all(s["p_persist"][0] is None and s["n_t1"][0] == 0 for s in c100)
    # one convention: p_persist is a fraction in the tables, the series and the figures
    for fid, figure in data["figures"].items():
        if fid.startswith("persistence"):
            values = [v for s in figure["data"]["series"] for v in s["p_persist"]
                      if v is not None]
            assert values and all(0.0 <= v <= 1.0 for v in values), fid
            assert "fraction" in figure["caption"], fid


def test_ablation_numbers_equal_sources(full):
    rd, paths, data = full
    with open(rd / "ablate" / "ablation.csv") as f:
        src = {(r["other"], int(r["checkpoint"]), float(r["threshold"]), r["set"],
                r["layer"]): r for r in csv.DictReader(f)}
    md_rows = _md_rows(paths["md"].read_text())

    def same(value, text):
        return (value is None and text == "") or value == float(text)

    t = data["tables"]["ablation"]
    assert len(t["records"]) == len(OTHERS) * len(CKPTS) * len(ABL_TAUS) * 2
    empty_rows = []
    for rec, row in zip(t["records"], t["rows"]):
        s = src[(rec["other"], rec["checkpoint"], rec["threshold"], rec["set"], "all")]
        for k in ("kl", "kl_se", "delta_loss", "delta_loss_se", "kl_ci_low",
                  "delta_loss_ci_high"):
            assert same(rec[k], s[k]), k
        if int(s["n_neurons"]) == 0:  # an empty set: nothing ablated, no effect shown
            assert row[5:] == ["–"] * 6, row
            empty_rows.append(row)
        else:
            assert row[5] == f"{float(s['kl']):.4g}"
            assert row[8] == f"{float(s['delta_loss']):.4g}"
        assert row[4] == s["n_neurons"]
        assert _md_row(row) in md_rows
    assert empty_rows  # the fixture has empty sets: their cells are checked above
    lt = data["tables"]["ablation_layers_t05"]
    for rec in lt["records"]:
        s = src[(rec["other"], rec["checkpoint"], rec["threshold"], rec["set"],
                 str(rec["layer"]))]
        assert same(rec["kl"], s["kl"]) and same(rec["delta_loss"], s["delta_loss"])
    # figure series carry the plotted values: universal solid, control with its CI
    series = data["figures"]["ablation_t06"]["data"]["series"]
    ctrl = next(s for s in series if s["set"] == "control" and s["metric"] == "kl"
                and s["other"] == "b")
    s = src[("b", 200, 0.6, "control", "all")]
    assert ctrl["y"][1] == float(s["kl"])
    assert ctrl["err_low"][1] == pytest.approx(float(s["kl"]) - float(s["kl_ci_low"]))


def test_cards_table_equals_cards_json(full):
    rd, paths, data = full
    doc = json.loads((rd / "cards" / "cards.json").read_text())
    t = data["tables"]["cards_a_300"]
    md_rows = _md_rows(paths["md"].read_text())
    assert t["columns"][:3] == ["neuron (layer.index)", "vs b", "vs c"]
    assert [r[0] for r in t["rows"]] == ["L1.4", "L0.7"]        # rank 1 first
    by_flat = {c["flat_index"]: c for c in doc["cards"]}
    for rec, row in zip(t["records"], t["rows"]):
        card = by_flat[rec["flat_index"]]
        assert rec == card and _md_row(row) in md_rows
        b = card["matches"][0]
        rank = card["selected_by"][0]["rank"]
        assert row[1] == (f"{b['excess']:.3f}* #{rank} → L1.{b['match_neuron']} "
                          f"ρ {b['max_corr']:.2f}")
        assert row[2].startswith(f"{card['matches'][1]['excess']:.3f} → ")  # 0.41: not > 0.5
        assert row[3:6] == [f"{card['vocab']['kurtosis']:.2f}", f"{card['vocab']['skew']:.2f}",
                            card["vocab"]["role"]]
        assert row[6].split(" · ")[:2] == ["␣x", "b"]            # a space made visible
        assert len(row[6].split(" · ")) == 6
    section = data["sections"]["cards"]
    assert section["status"] == "ok"
    assert "not recorded by this reduce" in paths["md"].read_text()


def test_zoo_and_footer(full):
    rd, paths, data = full
    zoo = json.loads(open(data["zoo_json"]).read())
    t = data["tables"]["zoo_loss"]
    for rec in t["records"]:
        if rec["model"] == "unigram baseline":
            assert rec["heldout_loss"] == zoo["unigram_heldout_loss"]
        else:
            m = next(m for m in zoo["models"] if m["name"] == rec["model"])
            assert rec["heldout_loss"] == m["checkpoints"][str(rec["step"])]["heldout_loss"]
    assert t["rows"][-1][2] == "3.1235"
    # the hand-built run has no reduce convergence tables: that section says so
    assert data["sections"]["convergence"]["status"] == "not run"
    assert all(s["status"] == "ok" for k, s in data["sections"].items() if k != "convergence")
    md = paths["md"].read_text()
    assert "tok0" in md and "ooc-universal 0.1.0" in md and "zoo_json = " in md
    assert data["token_hash"] == "tok0" and data["config_toml"].startswith("models =")


def test_missing_steps_give_not_run_sections(base_run, tmp_path):
    rd = tmp_path / "run"
    shutil.copytree(base_run, rd, ignore=shutil.ignore_patterns("ablate", "report"))
    (rd / "config.toml").unlink()
    (rd / "report").mkdir()
    (rd / "report" / "stale.txt").write_text("old")       # replaced as a whole
    paths = report(rd, progress=False)
    data = json.loads(paths["data"].read_text())
    assert data["sections"]["ablation"]["status"] == "not run"
    assert data["sections"]["zoo"]["status"] == "not available"
    assert data["sections"]["table1"]["status"] == "ok"
    md, page = paths["md"].read_text(), paths["html"].read_text()
    assert "Not run: ablate/ablation.json is missing" in md
    assert "Not run: ablate/ablation.json is missing" in page
    assert not any(f.startswith("ablation") for f in data["figures"])
    assert not (rd / "report" / "stale.txt").exists()

    empty = tmp_path / "empty"                             # nothing at all: still a report
    empty.mkdir()
    data = json.loads(report(empty, progress=False)["data"].read_text())
    assert data["figures"] == {}
    assert {s["status"] for k, s in data["sections"].items()
            if k not in ("overview", "footer")} <= {"not run", "not available"}


def test_scatter_falls_back_to_reduce_files(base_run, tmp_path):
    rd = tmp_path / "run"
    shutil.copytree(base_run / "reduce", rd / "reduce")
    data = json.loads(report(rd, progress=False)["data"].read_text())
    assert data["sections"]["correlations"]["status"] == "ok"
    panels = data["figures"]["corr_vs_baseline"]["data"]["panels"]
    assert len(panels) == len(OTHERS) * len(CKPTS)
    assert all(p["n_points"] == N - 1 and p["n_zero_var_left_out"] == 1 for p in panels)
    assert data["sections"]["table1"]["status"] == "not run"


def test_cli(base_run, tmp_path):
    from ooc_universal.cli.main import cli, main
    rd = tmp_path / "run"
    shutil.copytree(base_run, rd, ignore=shutil.ignore_patterns("report", "ablate",
                                                                "persistence"))
    zoo = json.loads((base_run / "report" / "report_data.json").read_text())["zoo_json"] \
        if (base_run / "report").exists() else None
    args = ["report", str(rd), "--no-progress"] + (["--zoo-json", zoo] if zoo else [])
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines == [f"wrote {rd / 'report' / 'index.html'}", f"wrote {rd / 'report' / 'index.md'}"]
    res = CliRunner().invoke(cli, ["report", "--run-dir", str(rd), "--no-progress"])
    assert res.exit_code == 0, res.output
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "nope"), "--no-progress"])
    assert exc.value.code == 1


def test_ablation_figures_leave_out_empty_sets_and_keep_kl_above_zero(full):
    rd, paths, data = full
    for fid in ("ablation_t06", "ablation_layers_t05", "ablation_layers_t06"):
        series = data["figures"][fid]["data"]["series"]
        empties = [(s, i) for s in series for i, n in enumerate(s["n_neurons"]) if n == 0]
        assert empties, fid                  # the fixture has empty sets in each of these
        assert all(s["y"][i] is None for s, i in empties), fid     # a gap, never KL 0
        for s in series:
            if s["metric"] == "kl":
                assert all(y is None or low <= y + 1e-15
                           for y, low in zip(s["y"], s["err_low"])), fid
    caption = data["figures"]["ablation_t06"]["caption"]
    assert "95% t-interval over control draws" in caption and "clipped at 0" in caption
    assert "SE over windows" not in caption                 # one error-bar meaning
    universal = [s for s in data["figures"]["ablation_t06"]["data"]["series"]
                 if s["set"] == "universal"]
    assert all(e == 0.0 for s in universal for e in s["err_low"] + s["err_high"])


def test_one_colour_per_model_whatever_it_is_called():
    from ooc_universal.report.figures import Palette
    palette = Palette(["/zoo/tiny-b", "tiny-a", "tiny-b", "tiny-c"])
    assert palette("tiny-b") == palette("/zoo/tiny-b") == palette("/elsewhere/tiny-b")
    assert len({palette(m) for m in ("tiny-a", "tiny-b", "tiny-c")}) == 3
    assert palette("mean over pairs") == "0.3"           # a summary is not a model


def test_unreadable_outputs_give_one_line_each(tmp_path):
    rd = tmp_path / "run"
    (rd / "universal").mkdir(parents=True)
    (rd / "universal" / "table1.json").write_text("{not json")
    # without a checksum sidecar the file cannot be told from a damaged one: refused
    with pytest.raises(OocError, match=r"table1\.json.*untrusted"):
        report(rd, progress=False)


# ---------------------------------------------------------------------------- convergence

def _convergence_run(base_run, tmp_path):
    """base_run's reduce files and universal outputs, and a convergence table per pair
    written through formats/convergence.py from known row max and baseline arrays."""
    from ooc_universal.formats.convergence import (convergence_path, snapshot_rows,
                                                   write_convergence)
    from ooc_universal.kernels.convergence import summarize
    rd = tmp_path / "run"
    shutil.copytree(base_run, rd, ignore=shutil.ignore_patterns("report"))
    made = {}
    for oi, other in enumerate(OTHERS):
        for ci, ck in enumerate(CKPTS):
            row, base = _arrays(oi, ci)
            rows = []
            for n in (256, 512, 1024):
                shrink = np.float32(1024 / n)  # fewer tokens: noisier, higher maxima
                rows += snapshot_rows({"reference": "a", "other": other, "ref_label": f"a@{ck}",
                                       "other_label": f"{other}@{ck}", "checkpoint": ck},
                                      n, 1024, summarize(np.minimum(row * shrink, 1.0), base,
                                                         TAUS))
            path = convergence_path(rd, f"a@{ck}", f"{other}@{ck}")
            write_convergence(path, rows, {"step": "reduce"})
            made[path] = rows
    return rd, made


def test_convergence_source_is_the_tables_and_a_verified_input(base_run, tmp_path):
    from ooc_universal.report import sections
    from ooc_universal.report.data import load_run
    from ooc_universal.report.figures import Palette
    from ooc_universal.report.views import model_names
    rd, made = _convergence_run(base_run, tmp_path)
    run = load_run(rd)
    frame = run.convergence.content
    assert frame is not None and len(frame) == sum(len(r) for r in made.values())
    for path, rows in made.items():
        mine = frame[frame.ref_label + "__" + frame.other_label + ".convergence.csv"
                     == path.name]
        want = {(r["n_tokens"], r["threshold"]): r["pct_universal"] for r in rows}
        got = dict(zip(zip(mine.n_tokens, mine.threshold), mine.pct_universal))
        assert got == want
    listed = {r[0] for r in run.provenance.input_files}
    assert {f"reduce/{p.name}" for p in made} <= listed       # the footer's inputs
    assert {"a", "b", "c"} <= model_names(run)                # in the palette
    section = sections.convergence_section(run.convergence,
                                           sections.Context(Palette(model_names(run))))
    assert section.status == "ok"
    # a table whose bytes no longer match its sidecar is not shown, with the reason
    victim = next(iter(made))
    victim.write_text(victim.read_text().replace("256,", "257,", 1))
    run = load_run(rd)
    assert run.convergence.content is None and "damaged" in run.convergence.reason
    section = sections.convergence_section(run.convergence, sections.Context(Palette([])))
    assert section.status == "unreadable" and victim.name in section.message
    # none at all: "not run"
    for path in made:
        path.unlink()
    assert load_run(rd).convergence.reason == "missing"


def test_ablation_series_name_pair_averaged_rows():
    """series.py names a row as the report's tables do (views.row_label): a
    pair-averaged row (other empty) is "pair-averaged", not "None"."""
    from ooc_universal.report import series
    rows = [{"checkpoint": 100, "layer": layer, "other": other, "aggregation": agg,
             "set": "universal", "n_neurons": 3, "kl": 0.1, "kl_se": 0.01,
             "delta_loss": 0.2, "delta_loss_se": 0.01}
            for layer in (0, 1) for other, agg in (("b", "pair"), (None, "pair_averaged"))]
    lines = series.ablation_layer_lines(rows)
    assert lines.others == ["b", "pair-averaged"]
    assert {s["other"] for s in lines.series} == {"b", "pair-averaged"}
    assert all(not np.isnan(y) for s in lines.series for y in s["y"])
