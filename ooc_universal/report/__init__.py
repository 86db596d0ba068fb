"""The report: the paper's tables and figures from the step outputs of one run directory.

Reads (each optional; a missing one gives a section that says "not run"):
  RUN/universal/table1.json           Table 1, per pair, per layer, baseline-draw spread
  RUN/universal/neurons.parquet|csv   per-neuron max correlation and baseline (scatter,
                                      histogram); RUN/reduce/*.h5 when the table is absent
  RUN/persistence/persistence.json    P(universal at t2 | universal at t1)
  RUN/ablate/ablation.json            KL and delta loss, universal vs matched control
  zoo.json                            the models' held-out loss (argument, RUN/config.toml
                                      key `zoo_json`, or beside a local model of the reduce)
  RUN/config.toml, RUN/tokens/meta.json   the footer

Writes RUN/report/ (built in RUN/report.tmp-<pid>/, then renamed over the old one):
  index.md          tables as Markdown, figures as fig_*.png beside it
  index.html        one self-contained page: the same content, figures as data: URIs
  report_data.json  every number the tables show, as read from the sources (full
                    precision; the table cells are these rounded as each table states),
                    and the series each figure plots

Numbers in tables are never recomputed: each cell is a source value rounded as stated
(Table 1 and percentages: 2 decimals; persistence P: 3 decimals; ablation: 4 significant
digits; losses: 4 decimals). Figures may aggregate (a mean over pairs); their captions
and report_data.json say which.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ooc_universal import __version__
from ooc_universal.errors import OocError

PAIR_MEAN = "mean over pairs"      # persistence / table1 summary rows
PAIR_POOLED = "pooled over pairs"
DPI = 100
SET_STYLE = {"universal": ("-", "o"), "control": ("--", "s"), "all-non-universal": (":", "^")}
SET_LABEL = {"universal": "universal", "control": "matched control (non-universal)",
             "all-non-universal": "all non-universal"}


# ---------------------------------------------------------------------------- document

@dataclass
class Table:
    """A table as shown (text cells) plus the source numbers behind every cell."""
    id: str
    title: str
    columns: list
    rows: list                  # list of lists of str (what is displayed)
    source: str                 # file the numbers come from, relative to RUN
    rounding: str               # how the source numbers were rounded for display
    records: list = field(default_factory=list)   # source numbers, full precision
    note: str = ""


@dataclass
class Figure:
    id: str
    file: str                   # fig_*.png, beside index.md
    title: str
    caption: str
    source: str
    data: dict = field(default_factory=dict)      # what is plotted


@dataclass
class Section:
    id: str
    title: str
    status: str = "ok"          # ok | not run | not available | unreadable
    blocks: list = field(default_factory=list)   # str (paragraph) | Table | Figure | Code
    message: str = ""


@dataclass
class Code:
    text: str


class _Ctx:
    """State shared by the section builders: where figures go, pair colours, progress."""

    def __init__(self, run_dir: Path, out: Path, progress: bool):
        from tqdm.auto import tqdm
        self.run_dir, self.out = run_dir, out
        self.figures: dict[str, Figure] = {}
        self.tables: dict[str, Table] = {}
        self.colours: dict[str, str] = {}
        self.bar = tqdm(desc="report figures", unit="fig", disable=not progress, leave=False)

    def colour(self, other: str):
        return self.colours.get(other, "0.3")

    def set_colours(self, others):
        import matplotlib
        others = sorted(set(others))
        cmap = matplotlib.colormaps["tab10" if len(others) <= 10 else "tab20"]
        self.colours = {o: matplotlib.colors.to_hex(cmap(i % cmap.N))
                        for i, o in enumerate(others)}

    def table(self, t: Table) -> Table:
        if t.id in self.tables:
            raise ValueError(f"duplicate table id {t.id}")
        self.tables[t.id] = t
        return t

    def save(self, fig, fid: str, title: str, caption: str, source: str, data=None) -> Figure:
        """Render a matplotlib figure to fig_<fid>.png in the report folder."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        if fid in self.figures:
            raise ValueError(f"duplicate figure id {fid}")
        name = f"fig_{fid}.png"
        FigureCanvasAgg(fig)
        fig.savefig(self.out / name, dpi=DPI, format="png")
        f = Figure(fid, name, title, caption, source, data or {})
        self.figures[fid] = f
        self.bar.update(1)
        return f


def _new_figure(w: float, h: float):
    from matplotlib.figure import Figure as MplFigure
    return MplFigure(figsize=(w, h), layout="constrained")


# ---------------------------------------------------------------------------- formatting

def _f(x, nd: int) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _g4(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def _tau(t) -> str:
    return f"{float(t):g}"


def _step(c) -> str:
    """A checkpoint as in tables: the full step, or "no step" for a model without one."""
    return "no step" if c is None or int(c) < 0 else str(int(c))


def _step_short(c) -> str:
    if c is None or int(c) < 0:
        return "no step"
    c = int(c)
    if c >= 1000 and c % 100 == 0:  # 1500 -> 1.5k, 3000 -> 3k, 100000 -> 100k
        return f"{c / 1000:g}k"
    return str(c)


def _slug(text) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in str(text)).strip("-")[:40] or "x"


def _tid(t) -> str:
    return _tau(t).replace(".", "")


def _short(name: str) -> str:
    """A model name short enough for a legend (a path's last parts, a hub id's name)."""
    name = str(name)
    if "/" in name:
        parts = [p for p in name.split("/") if p]
        return parts[-1] if not parts[-1].startswith("checkpoint-") else "/".join(parts[-2:])
    return name


def _spread(s) -> str:
    """mean ± std [min, max] of a table1.json draws record (2 decimals)."""
    if not s:
        return "–"
    if s.get("n_draws", 1) < 2 or s.get("std") is None:
        return f"{_f(s['mean'], 2)} (1 draw, no spread)"
    return f"{_f(s['mean'], 2)} ± {_f(s['std'], 2)} [{_f(s['min'], 2)}, {_f(s['max'], 2)}]"


def _main_tau(taus):
    """The paper's threshold 0.5 when present, else the one closest to it."""
    return min(taus, key=lambda t: (abs(float(t) - 0.5), t)) if taus else None


def _read_json(path: Path):
    """(doc, None) or (None, reason): missing and unreadable files are not errors here."""
    if not path.is_file():
        return None, "missing"
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as exc:
        return None, f"unreadable ({exc})"


def _not_run(sec: Section, what: str, path: str, command: str, reason: str) -> Section:
    sec.status = "not run" if reason == "missing" else "unreadable"
    if reason == "missing":
        sec.message = (f"Not run: {path} is missing, so this run has no {what}. "
                       f"Run `{command}` to produce it.")
    else:
        sec.message = f"Not shown: {path} is {reason}. Run `{command}` again."
    sec.blocks.append(sec.message)
    return sec


def _cat_x(n: int, k: int, i: int, width: float = 0.5) -> np.ndarray:
    """x positions of series i of k at n categories, spread so error bars do not overlap."""
    off = 0.0 if k == 1 else (i / (k - 1) - 0.5) * width * 0.5
    return np.arange(n) + off


# ---------------------------------------------------------------------------- Table 1

def _section_table1(ctx: _Ctx, doc, reason) -> Section:
    sec = Section("table1", "Table 1: universal neurons by threshold and checkpoint")
    if doc is None:
        return _not_run(sec, "universal neurons (Table 1)", "universal/table1.json",
                        "ooc-universal universal --run-dir RUN", reason)
    entries = doc.get("table1", [])
    definition = (doc.get("config") or {}).get("definition", "per-pair")
    sec.blocks.append(
        "A reference neuron is universal with respect to another model when its excess "
        "correlation (its best Pearson correlation with any neuron of the other model, minus "
        "the same maximum against a randomly rotated copy of that model, baseline draw 0) "
        "exceeds the threshold tau. Definition: " + definition + ".")
    refs = sorted({e["reference"] for e in entries})
    for ref in refs:
        sfx = "" if len(refs) == 1 else f"_{_slug(ref)}"
        es = [e for e in entries if e["reference"] == ref]
        ckpts = sorted({int(e["checkpoint"]) for e in es})
        taus = sorted({float(e["threshold"]) for e in es})
        by = {(float(e["threshold"]), int(e["checkpoint"])): e for e in es}
        n_pairs = max(e["n_pairs"] for e in es)
        n_neur = es[0]["n_neurons"]
        summary = PAIR_MEAN if definition == "per-pair" else "pair-averaged"
        sec.blocks.append(f"Reference model: {ref} ({n_neur} MLP neurons, {es[0]['n_layers']} "
                          f"layers x {es[0]['d_mlp']}; {n_pairs} model pair(s)).")
        # the paper's table
        rows, recs = [], []
        for tau in taus:
            row = [_tau(tau)]
            for c in ckpts:
                e = by.get((tau, c))
                row.append(_f(e["percent"], 2) if e else "–")
                if e:
                    recs.append({"reference": ref, "threshold": tau, "checkpoint": c,
                                 "other": summary, "percent": e["percent"]})
            rows.append(row)
        sec.blocks.append(ctx.table(Table(
            f"table1{sfx}", f"Table 1: % universal neurons of {ref} ({summary})",
            ["threshold"] + [f"step {_step(c)}" for c in ckpts], rows,
            "universal/table1.json", "2 decimals", recs,
            note=f"Percent of the reference's {n_neur} neurons with excess > threshold "
                 f"(draw 0), {summary} ({n_pairs} pair(s)); source field `percent`.")))
        # per pair with the spread over baseline draws beside each value
        rows, recs = [], []
        n_draws = max(e["draws"]["n_draws"] for e in es)
        for tau in taus:
            for c in ckpts:
                e = by.get((tau, c))
                if e is None:
                    continue
                items = [(summary, e["percent"], None, e["draws"])]
                items += [(p["other"], p["percent"], p["count"], p["draws"])
                          for p in sorted(e["pairs"], key=lambda p: p["other"])]
                if len(e["pairs"]) == 1 and e["pairs"][0]["other"] == summary:
                    items = items[1:]
                for other, pct, count, draws in items:
                    rows.append([_tau(tau), _step(c), other, _f(pct, 2),
                                 "–" if count is None else str(count), _spread(draws)])
                    recs.append({"reference": ref, "threshold": tau, "checkpoint": c,
                                 "other": other, "percent": pct, "count": count,
                                 "draws": {k: draws.get(k) for k in
                                           ("n_draws", "mean", "std", "min", "max")}})
        sec.blocks.append(ctx.table(Table(
            f"table1_pairs{sfx}", f"Table 1 per model pair, with the spread over "
            f"{n_draws} baseline draw(s)",
            ["threshold", "checkpoint", "other model", "% universal (draw 0)",
             "universal neurons (draw 0)",
             "% over baseline draws: mean ± std [min, max]"], rows,
            "universal/table1.json", "2 decimals (counts exact)", recs,
            note="Each baseline draw is a different random rotation of the other model; "
                 "draw 0 is the paper's single rotation and defines the universal sets. "
                 "The spread column summarises the percent over all draws (std with ddof=1).")))
        # per layer
        cols, recs = ["layer"], []
        keys = [(tau, c) for tau in taus for c in ckpts if (tau, c) in by]
        cols += [f"tau {_tau(t)}, step {_step(c)}" for t, c in keys]
        n_layers = es[0]["n_layers"]
        rows = []
        for layer in range(n_layers):
            row = [str(layer)]
            for t, c in keys:
                v = by[(t, c)]["per_layer_percent"][layer]
                row.append(_f(v, 2))
                recs.append({"reference": ref, "threshold": t, "checkpoint": c,
                             "layer": layer, "other": summary, "percent": v})
            rows.append(row)
        sec.blocks.append(ctx.table(Table(
            f"table1_layers{sfx}", f"% universal neurons per layer of {ref} ({summary})",
            cols, rows, "universal/table1.json", "2 decimals", recs,
            note=f"Percent of each layer's {es[0]['d_mlp']} neurons with excess > threshold "
                 "(draw 0); source field `per_layer_percent`. Per pair: universal/table1.csv.")))
        sec.blocks.append(_fig_percent(ctx, ref, sfx, es, taus, ckpts, by, summary, n_pairs))
    return sec


def _fig_percent(ctx, ref, sfx, es, taus, ckpts, by, summary, n_pairs) -> Figure:
    import matplotlib
    fig = _new_figure(7.5, 4.2)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"]
    x = np.arange(len(ckpts))
    series = []
    for i, tau in enumerate(taus):
        col = cmap(0.15 + 0.7 * i / max(1, len(taus) - 1))
        ys = [by[(tau, c)]["percent"] if (tau, c) in by else np.nan for c in ckpts]
        err = [(by[(tau, c)]["draws"].get("std") or 0.0) if (tau, c) in by else 0.0
               for c in ckpts]
        ax.errorbar(x, ys, yerr=err, color=col, marker="o", lw=2, capsize=4,
                    label=f"tau = {_tau(tau)} ({summary})")
        series.append({"threshold": tau, "other": summary, "x": ckpts, "y": ys,
                       "yerr_std_over_draws": err})
        others = sorted({p["other"] for c in ckpts if (tau, c) in by
                         for p in by[(tau, c)]["pairs"]})
        if len(others) > 1:
            for o in others:
                yo = [next((p["percent"] for p in by[(tau, c)]["pairs"] if p["other"] == o),
                           np.nan) if (tau, c) in by else np.nan for c in ckpts]
                ax.plot(x, yo, color=col, lw=0.8, alpha=0.5)
                series.append({"threshold": tau, "other": o, "x": ckpts, "y": yo})
    if n_pairs > 1:
        ax.plot([], [], color="0.5", lw=0.8, alpha=0.6, label="single model pairs")
    ax.set_xticks(x, [_step_short(c) for c in ckpts])
    ax.set_xlabel("training step (checkpoint)")
    ax.set_ylabel("universal neurons (% of reference neurons)")
    ax.set_title(f"Universal neurons of {_short(ref)} over training")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    cap = (f"Percent of the reference's {es[0]['n_neurons']} neurons whose excess correlation "
           f"exceeds each threshold (draw 0), {summary} over {n_pairs} pair(s) (thick lines; "
           "error bars: std over baseline draws, none with one draw); thin lines: single "
           "pairs. Same numbers as Table 1.")
    return ctx.save(fig, f"universal_percent{sfx}", f"Universal neurons of {ref} over training",
                    cap, "universal/table1.json", {"series": series})


# ---------------------------------------------------------------------------- persistence

def _intervals(rows):
    return sorted({(int(r["t1"]), int(r["t2"])) for r in rows}, key=lambda t: (t[1] - t[0], t))


def _iv(t1t2) -> str:
    return f"{_step_short(t1t2[0])} -> {_step_short(t1t2[1])}"


def _p_cell(r) -> str:
    if r is None:
        return "–"
    if r["p_persist"] is None:
        return ("undefined (U(t1) empty in every pair)" if r.get("kind") == PAIR_MEAN
                else "undefined (U(t1) empty)")
    if r.get("kind") == PAIR_MEAN:
        return f"{_f(r['p_persist'], 3)} (mean of {r['n_pairs']} pair(s))"
    return f"{_f(r['p_persist'], 3)} ({r['n_both']}/{r['n_t1']})"


def _p_record(r) -> dict:
    return {k: r.get(k) for k in ("definition", "reference", "other", "kind", "threshold",
                                   "t1", "t2", "layer", "n_t1", "n_t2", "n_both",
                                   "p_persist", "undefined", "emerged", "n_pairs")}


def _section_persistence(ctx: _Ctx, doc, reason) -> Section:
    sec = Section("persistence", "Persistence of universal neurons across checkpoints")
    if doc is None:
        return _not_run(sec, "persistence analysis", "persistence/persistence.json",
                        "ooc-universal persistence --run-dir RUN", reason)
    rows = doc.get("pairs", []) + doc.get("mean_over_pairs", []) + \
        doc.get("pooled_over_pairs", [])
    sec.blocks.append(
        "P(universal at t2 | universal at t1) = |U(t1) & U(t2)| / |U(t1)|, the share of the "
        "neurons universal at the earlier checkpoint that are still universal at the later "
        "one, per model pair; undefined when U(t1) is empty (never shown as 0). "
        "'mean over pairs' averages the defined per-pair values; 'pooled over pairs' divides "
        "the summed counts.")
    if not rows:
        sec.blocks.append("persistence.json holds no rows (no set at two checkpoints).")
        return sec
    keys = sorted({(r["definition"], r["reference"]) for r in rows})
    for definition, ref in keys:
        rs = [r for r in rows if (r["definition"], r["reference"]) == (definition, ref)]
        sfx = "" if len(keys) == 1 else f"_{_slug(ref)}_{_slug(definition)}"
        taus = sorted({float(r["threshold"]) for r in rs})
        ivs = _intervals(rs)
        pairs = sorted({r["other"] for r in rs if r["kind"] == "pair"})
        idx = {(r["other"], float(r["threshold"]), int(r["t1"]), int(r["t2"]),
                str(r["layer"])): r for r in rs}
        summaries = [k for k in (PAIR_MEAN, PAIR_POOLED) if any(r["other"] == k for r in rs)]
        # overall table
        trows, recs = [], []
        for tau in taus:
            for other in pairs + summaries:
                cells = [idx.get((other, tau, a, b, "all")) for a, b in ivs]
                trows.append([_tau(tau), other] + [_p_cell(r) for r in cells])
                recs += [_p_record(r) for r in cells if r is not None]
        sec.blocks.append(ctx.table(Table(
            f"persistence{sfx}", f"Persistence of universal neurons of {ref} ({definition}), "
            "all layers", ["threshold", "model pair"] + [_iv(i) for i in ivs], trows,
            "persistence/persistence.json", "3 decimals (counts exact)", recs,
            note="Cells: P_persist (|U(t1) & U(t2)| / |U(t1)|); for a pair and the pooled "
                 "row the counts |U(t1) & U(t2)|/|U(t1)| follow in brackets.")))
        for tau in taus:
            sec.blocks.append(_persistence_layer_table(ctx, sfx, ref, definition, tau, ivs,
                                                       idx, summaries, pairs, rs))
        for tau in taus:
            sec.blocks.append(_fig_persist_pairs(ctx, sfx, ref, tau, ivs, idx, pairs,
                                                 summaries))
            sec.blocks.append(_fig_persist_layers(ctx, sfx, ref, tau, ivs, idx, summaries,
                                                  pairs, rs))
            if pairs:
                sec.blocks.append(_fig_persist_layers_by_pair(ctx, sfx, ref, tau, ivs, idx,
                                                              pairs, rs))
    return sec


def _layers_of(rs) -> list[int]:
    return sorted({int(r["layer"]) for r in rs if str(r["layer"]) != "all"})


def _persistence_layer_table(ctx, sfx, ref, definition, tau, ivs, idx, summaries, pairs, rs):
    layers = _layers_of(rs)
    cols, trows, recs = ["layer"], [], []
    which = summaries or pairs[:1]
    for a, b in ivs:
        cols += [f"{_iv((a, b))}: {w}" for w in which]
    for layer in layers:
        row = [str(layer)]
        for a, b in ivs:
            for w in which:
                r = idx.get((w, tau, a, b, str(layer)))
                row.append(_p_cell(r))
                if r is not None:
                    recs.append(_p_record(r))
        trows.append(row)
    return ctx.table(Table(
        f"persistence_layers{sfx}_t{_tid(tau)}",
        f"Persistence by layer of {ref}, threshold {_tau(tau)} ({definition})", cols, trows,
        "persistence/persistence.json", "3 decimals (counts exact)", recs,
        note="Per-pair values by layer: persistence/persistence.csv."))


def _bar_annot(ax, x, h, text, undefined, fontsize=7, rotation=90):
    if undefined:
        ax.text(x, 1.5, "undef.", ha="center", va="bottom", fontsize=fontsize,
                rotation=rotation, color="0.35")
    else:
        ax.text(x, h + 1.0, text, ha="center", va="bottom", fontsize=fontsize,
                rotation=rotation)


def _fig_persist_pairs(ctx, sfx, ref, tau, ivs, idx, pairs, summaries) -> Figure:
    import matplotlib
    groups = pairs + summaries
    fig = _new_figure(max(6.5, 1.3 * len(groups) + 3), 4.4)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["Set2"]
    k = len(ivs)
    width = 0.8 / k
    series = []
    for j, (a, b) in enumerate(ivs):
        xs = np.arange(len(groups)) - 0.4 + width * (j + 0.5)
        ys, ns = [], []
        for g in groups:
            r = idx.get((g, tau, a, b, "all"))
            p = None if r is None else r["p_persist"]
            ys.append(np.nan if p is None else 100.0 * p)
            ns.append(None if r is None else r["n_t1"])
        ax.bar(xs, np.nan_to_num(ys), width * 0.95, color=cmap(j), label=_iv((a, b)))
        for x, y, n in zip(xs, ys, ns):
            _bar_annot(ax, x, y, f"n={n}", np.isnan(y) and n is not None,
                       rotation=0 if len(groups) * k <= 16 else 90)
        series.append({"interval": [a, b], "groups": groups, "p_percent": ys, "n_t1": ns})
    ax.set_xticks(np.arange(len(groups)), [_short(g) for g in groups], fontsize=8)
    ax.set_ylim(0, 118)
    ax.set_ylabel("P(universal at t2 | universal at t1) (%)")
    ax.set_xlabel("model pair (reference vs other)")
    ax.set_title(f"Persistence of universal neurons, all layers (tau = {_tau(tau)})")
    fig.legend(title="checkpoint interval", fontsize=8, loc="outside right upper")
    ax.grid(axis="y", alpha=0.3)
    cap = (f"Share of the neurons of {ref} universal at the earlier checkpoint that are still "
           f"universal at the later one (all layers, threshold {_tau(tau)}), for "
           f"{len(pairs)} model pair(s)" + (" and their averages" if summaries else "")
           + ". n = |U(t1)|, the number of neurons it is computed from (summed over pairs "
           "for the averages); 'undef.' marks an empty U(t1). Paper Figure 3.")
    return ctx.save(fig, f"persistence_pairs{sfx}_t{_tid(tau)}",
                    f"Persistence per model pair, tau = {_tau(tau)}", cap,
                    "persistence/persistence.json", {"series": series})


def _fig_persist_layers(ctx, sfx, ref, tau, ivs, idx, summaries, pairs, rs) -> Figure:
    import matplotlib
    layers = _layers_of(rs)
    who = summaries[0] if summaries else pairs[0]
    fig = _new_figure(max(7.0, 0.55 * len(layers) * len(ivs) + 2), 4.4)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["Set2"]
    width = 0.8 / len(ivs)
    series = []
    for j, (a, b) in enumerate(ivs):
        xs = np.arange(len(layers)) - 0.4 + width * (j + 0.5)
        ys, ns = [], []
        for layer in layers:
            r = idx.get((who, tau, a, b, str(layer)))
            p = None if r is None else r["p_persist"]
            ys.append(np.nan if p is None else 100.0 * p)
            ns.append(None if r is None else r["n_t1"])
        ax.bar(xs, np.nan_to_num(ys), width * 0.95, color=cmap(j), label=_iv((a, b)))
        for x, y, n in zip(xs, ys, ns):
            _bar_annot(ax, x, y, f"{n}", np.isnan(y) and n is not None, fontsize=6,
                       rotation=0 if len(layers) * len(ivs) <= 16 else 90)
        series.append({"interval": [a, b], "layers": layers, "p_percent": ys, "n_t1": ns,
                       "other": who})
    ax.set_xticks(np.arange(len(layers)), [str(l) for l in layers])
    ax.set_ylim(0, 118)
    ax.set_xlabel("layer of the reference model")
    ax.set_ylabel("P(universal at t2 | universal at t1) (%)")
    ax.set_title(f"Persistence of universal neurons by layer ({who}, tau = {_tau(tau)})")
    fig.legend(title="checkpoint interval", fontsize=8, loc="outside right upper")
    ax.grid(axis="y", alpha=0.3)
    cap = (f"Persistence by layer of {ref} at threshold {_tau(tau)}, {who} "
           f"({len(pairs)} pair(s)); one bar per checkpoint interval. The number above a bar "
           "is |U(t1)| in that layer (summed over pairs); 'undef.' marks a layer with no "
           "universal neuron at t1. Paper Figure 1 (its y axis starts at 60%; this one at 0).")
    return ctx.save(fig, f"persistence_layers{sfx}_t{_tid(tau)}",
                    f"Persistence by layer, tau = {_tau(tau)}", cap,
                    "persistence/persistence.json", {"series": series})


def _fig_persist_layers_by_pair(ctx, sfx, ref, tau, ivs, idx, pairs, rs) -> Figure:
    layers = _layers_of(rs)
    fig = _new_figure(max(7.5, 0.35 * len(layers) * len(pairs) + 2), 2.9 * len(ivs) + 0.4)
    axes = fig.subplots(len(ivs), 1, squeeze=False, sharex=True)[:, 0]
    width = 0.8 / len(pairs)
    annotate = len(layers) * len(pairs) <= 80
    series = []
    for ax, (a, b) in zip(axes, ivs):
        for j, other in enumerate(pairs):
            xs = np.arange(len(layers)) - 0.4 + width * (j + 0.5)
            ys, ns = [], []
            for layer in layers:
                r = idx.get((other, tau, a, b, str(layer)))
                p = None if r is None else r["p_persist"]
                ys.append(np.nan if p is None else 100.0 * p)
                ns.append(None if r is None else r["n_t1"])
            ax.bar(xs, np.nan_to_num(ys), width * 0.95, color=ctx.colour(other),
                   label=_short(other))
            undef = [x for x, y, n in zip(xs, ys, ns) if np.isnan(y) and n is not None]
            ax.plot(undef, [2.0] * len(undef), "x", color=ctx.colour(other), ms=4)
            if annotate:
                for x, y, n in zip(xs, ys, ns):
                    if not np.isnan(y):
                        ax.text(x, y + 1.0, str(n), ha="center", va="bottom",
                                fontsize=6 if len(layers) * len(pairs) <= 24 else 5,
                                rotation=0 if len(layers) * len(pairs) <= 24 else 90)
            series.append({"interval": [a, b], "other": other, "layers": layers,
                           "p_percent": ys, "n_t1": ns})
        ax.set_ylim(0, 118)
        ax.set_ylabel("P persist (%)")
        ax.set_title(f"{_iv((a, b))}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(np.arange(len(layers)), [str(l) for l in layers])
    axes[-1].set_xlabel("layer of the reference model")
    axes[0].plot([], [], "x", color="0.3", label="undefined (U(t1) empty)")
    fig.legend(title="other model", fontsize=8, loc="outside right upper")
    fig.suptitle(f"Layer-wise persistence per model pair (tau = {_tau(tau)})")
    cap = (f"Persistence by layer for each of the {len(pairs)} pair(s) of {ref}, one panel "
           f"per checkpoint interval, threshold {_tau(tau)}. "
           + ("The number above a bar is |U(t1)|; " if annotate else "")
           + "a cross on the axis marks a layer whose U(t1) is empty (undefined). "
           "Paper Figures 4-6.")
    return ctx.save(fig, f"persistence_layers_by_pair{sfx}_t{_tid(tau)}",
                    f"Layer-wise persistence per pair, tau = {_tau(tau)}", cap,
                    "persistence/persistence.json", {"series": series})


# ---------------------------------------------------------------------------- ablation

def _ckpt_key(c) -> int:
    try:
        return int(c)
    except (TypeError, ValueError):
        return -1


def _section_ablation(ctx: _Ctx, doc, reason) -> Section:
    sec = Section("ablation", "Ablation: KL divergence and loss increase")
    if doc is None:
        return _not_run(sec, "ablation results", "ablate/ablation.json",
                        "ooc-universal ablate --run-dir RUN", reason)
    rows = list(doc.get("rows", []))
    cfg = doc.get("config") or {}
    inputs = doc.get("inputs") or {}
    sec.blocks.append(
        f"Ablation ({cfg.get('mode', 'zero')}-ablation: each neuron's post-GELU activation "
        "set to " + ("its mean" if cfg.get("mode") == "mean" else "0") + ") on "
        f"{inputs.get('n_eval_positions', '?')} held-out token positions "
        f"({inputs.get('n_eval_windows', '?')} windows). KL = KL(P_original || Q_ablated) "
        "in nats per position; delta loss = CE(ablated) - CE(original) in nats per token. "
        f"Controls: {cfg.get('control_draws', '?')} random draw(s) of non-universal neurons "
        "with the universal set's count in every layer; a control value is the mean over "
        "draws. SE: standard error over windows; CI: 95% t-interval over control draws.")
    if not rows:
        sec.blocks.append("ablation.json holds no rows.")
        return sec
    keys = sorted({(str(r["reference"]), str(r.get("mode", "zero"))) for r in rows})
    for ref, mode in keys:
        rs = [r for r in rows if (str(r["reference"]), str(r.get("mode", "zero"))) == (ref, mode)]
        sfx = "" if len(keys) == 1 else f"_{_slug(ref)}_{mode}"
        taus = sorted({float(r["threshold"]) for r in rs})
        main = _main_tau(taus)
        sec.blocks.append(_ablation_table(ctx, sfx, ref, rs))
        for tau in taus:
            sec.blocks.append(_fig_ablation_ckpts(ctx, sfx, ref, tau, rs))
        for tau in taus:
            lrs = [r for r in rs if str(r["layer"]) != "all" and float(r["threshold"]) == tau]
            if lrs:
                sec.blocks.append(_fig_ablation_layers(ctx, sfx, ref, tau, lrs))
        lrs = [r for r in rs if str(r["layer"]) != "all" and float(r["threshold"]) == main]
        if lrs:
            sec.blocks.append(_ablation_layer_table(ctx, sfx, ref, main, lrs))
        else:
            sec.blocks.append("No layer-by-layer ablation in ablation.json (run ablate with "
                              "--layerwise).")
    return sec


_ABL_FIELDS = ("reference", "other", "checkpoint", "threshold", "definition", "mode", "set",
               "layer", "draw", "n_draws", "n_neurons", "n_positions", "kl", "kl_se",
               "kl_ci_low", "kl_ci_high", "delta_loss", "delta_loss_se", "delta_loss_ci_low",
               "delta_loss_ci_high")


def _ci(lo, hi) -> str:
    if lo is None or hi is None:
        return "–"
    return f"[{_g4(lo)}, {_g4(hi)}]"


def _set_order(s) -> int:
    return {"universal": 0, "control": 1, "all-non-universal": 2}.get(s, 3)


def _ablation_table(ctx, sfx, ref, rs) -> Table:
    sel = [r for r in rs if str(r["layer"]) == "all"]
    sel.sort(key=lambda r: (float(r["threshold"]), _ckpt_key(r["checkpoint"]),
                            str(r["other"]), _set_order(r["set"])))
    rows = [[_tau(r["threshold"]), _step(_ckpt_key(r["checkpoint"])), str(r["other"]),
             r["set"], str(r["n_neurons"]), _g4(r["kl"]), _g4(r["kl_se"]),
             _ci(r.get("kl_ci_low"), r.get("kl_ci_high")), _g4(r["delta_loss"]),
             _g4(r["delta_loss_se"]), _ci(r.get("delta_loss_ci_low"),
                                          r.get("delta_loss_ci_high"))] for r in sel]
    return ctx.table(Table(
        f"ablation{sfx}", f"Ablating all universal neurons of {ref} vs matched controls",
        ["threshold", "checkpoint", "other model", "set", "neurons", "KL (nats)", "KL SE",
         "KL 95% CI (draws)", "delta loss (nats)", "delta loss SE",
         "delta loss 95% CI (draws)"], rows, "ablate/ablation.json",
        "4 significant digits (counts exact)",
        [{k: r.get(k) for k in _ABL_FIELDS} for r in sel],
        note="All layers at once. CI columns are for controls with two or more draws."))


def _ablation_layer_table(ctx, sfx, ref, tau, lrs) -> Table:
    idx = {(_ckpt_key(r["checkpoint"]), int(r["layer"]), str(r["other"]), r["set"]): r
           for r in lrs}
    keys = sorted({(c, l, o) for c, l, o, _ in idx})
    rows, recs = [], []
    for c, l, o in keys:
        u, k = idx.get((c, l, o, "universal")), idx.get((c, l, o, "control"))
        rows.append([_step(c), str(l), o, "–" if u is None else str(u["n_neurons"]),
                     "–" if u is None else _g4(u["kl"]), "–" if k is None else _g4(k["kl"]),
                     "–" if u is None else _g4(u["delta_loss"]),
                     "–" if k is None else _g4(k["delta_loss"])])
        recs += [{f: r.get(f) for f in _ABL_FIELDS} for r in (u, k) if r is not None]
    return ctx.table(Table(
        f"ablation_layers{sfx}_t{_tid(tau)}",
        f"Layer-by-layer ablation of {ref}, threshold {_tau(tau)}",
        ["checkpoint", "layer", "other model", "neurons", "KL universal", "KL control",
         "delta loss universal", "delta loss control"], rows, "ablate/ablation.json",
        "4 significant digits (counts exact)", recs,
        note="Each layer's universal neurons ablated alone vs a control of the same count "
             "from that layer (mean over draws); KL and delta loss in nats. Other thresholds "
             "and the standard errors: ablate/ablation.csv."))


_METRICS = (("kl", "KL(P_original || Q_ablated) (nats / position)", "KL divergence"),
            ("delta_loss", "delta loss = CE ablated - CE original (nats / token)",
             "loss increase"))


def _errs(r, m):
    """(lower, upper) error of one row: control CI over draws when there, else the SE."""
    v = r[m]
    lo, hi = r.get(f"{m}_ci_low"), r.get(f"{m}_ci_high")
    if r["set"] == "control" and lo is not None and hi is not None:
        return v - lo, hi - v, "95% CI over draws"
    se = r.get(f"{m}_se")
    se = 0.0 if se is None else se
    return se, se, "SE over windows"


def _style_legend(ax, sets, others, ctx, loc="best"):
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=ctx.colour(o), lw=2, label=_short(o)) for o in others]
    handles += [Line2D([], [], color="0.2", ls=SET_STYLE[s][0], marker=SET_STYLE[s][1],
                       label=SET_LABEL[s]) for s in sets]
    ax.legend(handles=handles, fontsize=7, loc=loc, handlelength=3.2)


def _fig_ablation_ckpts(ctx, sfx, ref, tau, rs) -> Figure:
    sel = [r for r in rs if str(r["layer"]) == "all" and float(r["threshold"]) == tau]
    ckpts = sorted({_ckpt_key(r["checkpoint"]) for r in sel})
    others = sorted({str(r["other"]) for r in sel})
    sets = sorted({r["set"] for r in sel}, key=_set_order)
    idx = {(_ckpt_key(r["checkpoint"]), str(r["other"]), r["set"]): r for r in sel}
    fig = _new_figure(11, 4.3)
    axes = fig.subplots(1, 2)
    series, err_kinds = [], set()
    n_series = len(others) * len(sets)
    for ax, (m, ylabel, what) in zip(axes, _METRICS):
        i = 0
        for o in others:
            for s in sets:
                pts = [idx.get((c, o, s)) for c in ckpts]
                x = _cat_x(len(ckpts), n_series, i)
                i += 1
                ys = [np.nan if p is None else p[m] for p in pts]
                e = [(0, 0, None) if p is None else _errs(p, m) for p in pts]
                err_kinds |= {k for _, _, k in e if k}
                ls, mk = SET_STYLE.get(s, ("-.", "d"))
                ax.errorbar(x, ys, yerr=[[a for a, _, _ in e], [b for _, b, _ in e]],
                            color=ctx.colour(o), ls=ls, marker=mk, capsize=3, ms=5,
                            mfc="white" if s != "universal" else ctx.colour(o))
                series.append({"metric": m, "other": o, "set": s, "checkpoints": ckpts,
                               "y": ys, "err_low": [a for a, _, _ in e],
                               "err_high": [b for _, b, _ in e],
                               "n_neurons": [None if p is None else p["n_neurons"]
                                             for p in pts]})
        ax.set_xticks(np.arange(len(ckpts)), [_step_short(c) for c in ckpts])
        ax.set_xlabel("training step (checkpoint)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{what}, all layers", fontsize=10)
        ax.grid(alpha=0.3)
        ax.axhline(0, color="0.6", lw=0.6)
    _style_legend(axes[0], sets, others, ctx)
    fig.suptitle(f"Ablating universal neurons of {_short(ref)} (tau = {_tau(tau)}) vs controls")
    n_uni = sorted({r["n_neurons"] for r in sel if r["set"] == "universal"})
    cap = (f"KL divergence (left) and loss increase (right) when all universal neurons of "
           f"{ref} at threshold {_tau(tau)} are ablated (solid) vs matched random "
           f"non-universal controls (dashed), one colour per model pair ({len(others)} "
           f"pair(s)); universal sets of {min(n_uni) if n_uni else 0} to "
           f"{max(n_uni) if n_uni else 0} neurons. Error bars: "
           f"{' / '.join(sorted(err_kinds)) or 'none'} (controls: 95% CI over draws when "
           "there are two or more, else SE). Paper Figures 2, 7-8, 13-20.")
    return ctx.save(fig, f"ablation{sfx}_t{_tid(tau)}",
                    f"Ablation over checkpoints, tau = {_tau(tau)}", cap,
                    "ablate/ablation.json", {"series": series})


def _fig_ablation_layers(ctx, sfx, ref, tau, lrs) -> Figure:
    ckpts = sorted({_ckpt_key(r["checkpoint"]) for r in lrs})
    others = sorted({str(r["other"]) for r in lrs})
    sets = sorted({r["set"] for r in lrs}, key=_set_order)
    layers = sorted({int(r["layer"]) for r in lrs})
    idx = {(_ckpt_key(r["checkpoint"]), int(r["layer"]), str(r["other"]), r["set"]): r
           for r in lrs}
    fig = _new_figure(max(7.0, 3.6 * len(ckpts) + 1), 6.8)
    axes = fig.subplots(2, len(ckpts), squeeze=False, sharex=True)
    series = []
    for row, (m, ylabel, what) in enumerate(_METRICS):
        for col, c in enumerate(ckpts):
            ax = axes[row, col]
            for o in others:
                for s in sets:
                    pts = [idx.get((c, l, o, s)) for l in layers]
                    ys = np.array([np.nan if p is None else p[m] for p in pts], dtype=float)
                    se = [0.0 if p is None or p.get(f"{m}_se") is None else p[f"{m}_se"]
                          for p in pts]
                    ls, mk = SET_STYLE.get(s, ("-.", "d"))
                    ax.errorbar(layers, ys, yerr=se, color=ctx.colour(o), ls=ls, marker=mk,
                                ms=4, capsize=2, lw=1.2)
                    empty = [l for l, p in zip(layers, pts) if p is not None
                             and p["n_neurons"] == 0]
                    if empty:
                        ax.plot(empty, [0.0] * len(empty), mk, ms=7, mfc="white",
                                color=ctx.colour(o), zorder=5)
                    series.append({"metric": m, "checkpoint": c, "other": o, "set": s,
                                   "layers": layers, "y": ys.tolist(), "se": se,
                                   "n_neurons": [None if p is None else p["n_neurons"]
                                                 for p in pts]})
            ax.set_title(f"{what}, step {_step_short(c)}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.axhline(0, color="0.6", lw=0.6)
            if col == 0:
                ax.set_ylabel(ylabel, fontsize=8)
            if row == 1:
                ax.set_xlabel("layer whose universal neurons are ablated")
                ax.set_xticks(layers)
    _style_legend(axes[0, 0], sets, others, ctx)
    fig.suptitle(f"Layer-by-layer ablation of {_short(ref)} (tau = {_tau(tau)})")
    cap = (f"Each layer's universal neurons of {ref} (threshold {_tau(tau)}) ablated alone "
           f"(solid) vs a matched control from the same layer (dashed, mean over draws), "
           f"per checkpoint (columns), {len(others)} model pair(s) (colours). Top: KL "
           "divergence, bottom: loss increase, both in nats; error bars: SE over windows. "
           "A hollow marker at 0 is a layer with no universal neuron (nothing ablated). "
           "Paper Figures 9-12.")
    return ctx.save(fig, f"ablation_layers{sfx}_t{_tid(tau)}",
                    f"Layer-by-layer ablation, tau = {_tau(tau)}", cap,
                    "ablate/ablation.json", {"series": series})


# ---------------------------------------------------------------------------- beyond the paper

_NEURON_COLS = ["reference", "other", "checkpoint", "layer", "max_corr", "baseline_max_0",
                "excess", "zero_var"]


def _load_neurons(run_dir: Path):
    """(DataFrame with _NEURON_COLS, source) from the neurons table or the reduce files."""
    import pandas as pd
    udir = run_dir / "universal"
    for name in ("neurons.parquet", "neurons.csv"):
        path = udir / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".parquet"):
                df = pd.read_parquet(path, columns=_NEURON_COLS)
            else:
                df = pd.read_csv(path, usecols=_NEURON_COLS)
            return df, f"universal/{name}"
        except Exception:  # noqa: BLE001 - unreadable: try the next source
            continue
    files = sorted((run_dir / "reduce").glob("*__*.h5")) if (run_dir / "reduce").is_dir() \
        else []
    frames = []
    if files:
        import h5py
        for path in files:
            try:
                with h5py.File(path, "r") as f:
                    a = f.attrs
                    dm = int(a["d_mlp_ref"])
                    row_max = f["row_max"][...].astype(np.float64)
                    base = f["baseline/row_max"][0].astype(np.float64)
                    zero = f["ref/zero_var"][...].astype(bool)
                    name = lambda k: a[k].decode() if isinstance(a[k], bytes) else str(a[k])  # noqa: E731
                    frames.append(pd.DataFrame({
                        "reference": name("ref_name"), "other": name("other_name"),
                        "checkpoint": int(a["ref_step"]),
                        "layer": np.arange(row_max.size) // dm, "max_corr": row_max,
                        "baseline_max_0": base, "excess": row_max - base, "zero_var": zero}))
            except (OSError, KeyError):
                continue
    if frames:
        return pd.concat(frames, ignore_index=True), "reduce/*.h5 (row_max, baseline/row_max)"
    return None, None


def _section_correlations(ctx: _Ctx, df, source, taus) -> Section:
    sec = Section("correlations", "Beyond the paper: correlation against the rotation baseline")
    if df is None:
        sec.status = "not run"
        sec.message = ("Not run: no per-neuron statistics (universal/neurons.parquet, "
                       "universal/neurons.csv or reduce/*.h5). Run `ooc-universal reduce` "
                       "and `ooc-universal universal`.")
        sec.blocks.append(sec.message)
        return sec
    taus = list(taus) or [0.5]
    refs = sorted(df["reference"].astype(str).unique())
    for ref in refs:
        sfx = "" if len(refs) == 1 else f"_{_slug(ref)}"
        d = df[df["reference"].astype(str) == ref]
        sec.blocks.append(_fig_scatter(ctx, sfx, ref, d, source, taus))
        sec.blocks.append(_fig_excess_hist(ctx, sfx, ref, d, source, taus))
    return sec


def _fig_scatter(ctx, sfx, ref, d, source, taus) -> Figure:
    import matplotlib
    from matplotlib.colors import BoundaryNorm
    from matplotlib.lines import Line2D
    ckpts = sorted(int(c) for c in d["checkpoint"].unique())
    others = sorted(d["other"].astype(str).unique())
    n_layers = int(d["layer"].max()) + 1
    cmap = matplotlib.colormaps["viridis"]
    norm = BoundaryNorm(np.arange(n_layers + 1) - 0.5, cmap.N)
    fig = _new_figure(2.9 * len(others) + 1.2, 2.7 * len(ckpts) + 0.6)
    axes = fig.subplots(len(ckpts), len(others), squeeze=False, sharex=True, sharey=True)
    lo = float(min(0.0, np.nanmin(d["baseline_max_0"]), np.nanmin(d["max_corr"])))
    grid = np.linspace(lo, 1.0, 2)
    styles = ["--", "-.", ":", (0, (5, 1)), (0, (1, 3))]
    counts, sc, n_zero = [], None, 0
    rng = np.random.default_rng(0)
    for i, c in enumerate(ckpts):
        for j, o in enumerate(others):
            ax = axes[i, j]
            g = d[(d["checkpoint"] == c) & (d["other"].astype(str) == o)]
            live = g[~g["zero_var"].astype(bool)]
            n_zero += int(len(g) - len(live))
            order = rng.permutation(len(live))
            size = float(np.clip(2000.0 / max(1, len(live)), 1.0, 14.0))
            sc = ax.scatter(live["baseline_max_0"].to_numpy()[order],
                            live["max_corr"].to_numpy()[order],
                            c=live["layer"].to_numpy()[order], cmap=cmap, norm=norm, s=size,
                            linewidths=0, alpha=0.7, rasterized=True)
            ax.plot(grid, grid, color="0.5", lw=0.8)
            for t, ls in zip(taus, styles):
                ax.plot(grid, grid + t, color="crimson", lw=1, ls=ls)
            ax.set_xlim(lo, 1.0)
            ax.set_ylim(lo, 1.0)
            ax.set_title(f"vs {_short(o)}, step {_step_short(c)}", fontsize=9)
            if i == len(ckpts) - 1:
                ax.set_xlabel("max rho vs rotated model (draw 0)", fontsize=8)
            if j == 0:
                ax.set_ylabel("max rho vs other model", fontsize=8)
            counts.append({"checkpoint": c, "other": o, "n_points": int(len(live)),
                           "n_zero_var_left_out": int(len(g) - len(live))})
    if sc is not None:
        cb = fig.colorbar(sc, ax=axes, shrink=0.8, ticks=np.arange(n_layers))
        cb.set_label("layer of the reference neuron")
    handles = [Line2D([], [], color="0.5", lw=0.8, label="y = x (no excess)")]
    handles += [Line2D([], [], color="crimson", ls=ls, label=f"y = x + {_tau(t)}")
                for t, ls in zip(taus, styles)]
    axes[0, 0].legend(handles=handles, fontsize=7, loc="lower right")
    fig.suptitle(f"Best correlation vs its rotation baseline, neurons of {_short(ref)}")
    n_per = counts[0]["n_points"] + counts[0]["n_zero_var_left_out"] if counts else 0
    cap = (f"One point per neuron of {ref} ({n_per} per panel; {len(others)} pair(s) x "
           f"{len(ckpts)} checkpoint(s)): x = its best correlation with the randomly rotated "
           "other model (baseline draw 0), y = its best correlation with the other model. "
           "Points above a red line have excess correlation above that threshold "
           f"(universal). {n_zero} zero-variance neuron(s) left out (their rho is 0). "
           f"Source: {source}.")
    return ctx.save(fig, f"corr_vs_baseline{sfx}", f"Max correlation vs rotation baseline, {ref}",
                    cap, source, {"panels": counts, "thresholds": taus})


def _fig_excess_hist(ctx, sfx, ref, d, source, taus) -> Figure:
    ckpts = sorted(int(c) for c in d["checkpoint"].unique())
    others = sorted(d["other"].astype(str).unique())
    fig = _new_figure(max(7.0, 3.6 * len(ckpts)), 4.0)
    axes = fig.subplots(1, len(ckpts), squeeze=False, sharey=True)[0]
    ex = d["excess"].to_numpy(dtype=float)
    bins = np.linspace(min(-0.2, np.nanmin(ex)), max(1.0, np.nanmax(ex)), 61)
    styles = ["--", "-.", ":", (0, (5, 1)), (0, (1, 3))]
    data = []
    for ax, c in zip(axes, ckpts):
        for o in others:
            v = d[(d["checkpoint"] == c) & (d["other"].astype(str) == o)]["excess"]
            h, _ = np.histogram(v.to_numpy(dtype=float), bins=bins)
            ax.stairs(h, bins, color=ctx.colour(o), lw=1.3, label=_short(o))
            data.append({"checkpoint": c, "other": o, "n_neurons": int(len(v)),
                         "counts": h.tolist()})
        for t, ls in zip(taus, styles):
            ax.axvline(t, color="crimson", ls=ls, lw=1, label=f"threshold {_tau(t)}")
        ax.set_yscale("log")
        ax.set_title(f"step {_step_short(c)}", fontsize=10)
        ax.set_xlabel("excess correlation (draw 0)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("neurons per bin (log scale)")
    axes[0].legend(fontsize=7, title="other model")
    fig.suptitle(f"Distribution of excess correlation, neurons of {_short(ref)}")
    n = data[0]["n_neurons"] if data else 0
    cap = (f"Histogram (60 bins of width {bins[1] - bins[0]:.3f}) of the excess correlation "
           f"(draw 0) of the {n} neurons of {ref}, one line per model pair ({len(others)}), "
           f"one panel per checkpoint ({len(ckpts)}); zero-variance neurons sit at 0. "
           "Neurons right of a red line are universal at that threshold. Source: "
           f"{source}.")
    return ctx.save(fig, f"excess_hist{sfx}", f"Excess correlation distribution, {ref}", cap,
                    source, {"bin_edges": bins.tolist(), "series": data})


def _section_layer_counts(ctx: _Ctx, doc, reason) -> Section:
    sec = Section("layer_counts", "Beyond the paper: universal neurons per layer over training")
    if doc is None:
        return _not_run(sec, "universal neurons (per-layer counts)", "universal/table1.json",
                        "ooc-universal universal --run-dir RUN", reason)
    entries = doc.get("table1", [])
    import matplotlib
    for ref in sorted({e["reference"] for e in entries}):
        es = [e for e in entries if e["reference"] == ref]
        sfx = "" if len({e["reference"] for e in entries}) == 1 else f"_{_slug(ref)}"
        taus = sorted({float(e["threshold"]) for e in es})
        ckpts = sorted({int(e["checkpoint"]) for e in es})
        by = {(float(e["threshold"]), int(e["checkpoint"])): e for e in es}
        n_layers = es[0]["n_layers"]
        n_pairs = max(e["n_pairs"] for e in es)
        cmap = matplotlib.colormaps["viridis"]
        fig = _new_figure(max(7.0, 3.5 * len(taus) + 1.5), 4.2)
        axes = fig.subplots(1, len(taus), squeeze=False, sharey=True)[0]
        series = []
        x = np.arange(len(ckpts))
        for ax, tau in zip(axes, taus):
            for layer in range(n_layers):
                ys = []
                for c in ckpts:
                    e = by.get((tau, c))
                    ys.append(float(np.mean([p["per_layer_count"][layer] for p in e["pairs"]]))
                              if e else np.nan)
                ax.plot(x, ys, marker="o", color=cmap(layer / max(1, n_layers - 1)),
                        label=f"layer {layer}")
                series.append({"threshold": tau, "layer": layer, "checkpoints": ckpts,
                               "mean_count": ys})
            ax.set_xticks(x, [_step_short(c) for c in ckpts])
            ax.set_xlabel("training step (checkpoint)")
            ax.set_title(f"tau = {_tau(tau)}", fontsize=10)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(f"universal neurons in the layer (of {es[0]['d_mlp']}),\n"
                           "mean over pairs")
        axes[-1].legend(fontsize=7, ncols=2 if n_layers > 6 else 1, loc="upper left",
                        bbox_to_anchor=(1.01, 1.0))
        fig.suptitle(f"Universal neurons per layer of {_short(ref)} over training")
        cap = (f"Number of universal neurons in each layer of {ref} (excess > threshold, "
               f"draw 0), mean over {n_pairs} model pair(s) of the per-pair counts "
               "(`per_layer_count` in universal/table1.json), one panel per threshold.")
        sec.blocks.append(ctx.save(fig, f"universal_layer_counts{sfx}",
                                   f"Universal neurons per layer over training, {ref}", cap,
                                   "universal/table1.json", {"series": series}))
    return sec


# ---------------------------------------------------------------------------- zoo loss

def _toml(run_dir: Path):
    path = run_dir / "config.toml"
    if not path.is_file():
        return None, None
    import tomllib
    text = path.read_text()
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return text, None


def _find_key(d, key):
    if isinstance(d, dict):
        if key in d and d[key]:
            return d[key]
        for v in d.values():
            found = _find_key(v, key)
            if found:
                return found
    return None


def find_zoo_json(run_dir, zoo_json=None, config=None) -> Path | None:
    """The zoo.json to report: the argument, RUN/config.toml's `zoo_json`, or the one
    beside a local model named by the reduce files (its dir, parent or grandparent)."""
    run_dir = Path(run_dir)
    if zoo_json:
        return Path(zoo_json).expanduser()       # shown as "not available" when missing
    if config is not None:
        value = _find_key(config, "zoo_json")
        if value:
            p = Path(str(value)).expanduser()
            if not p.is_absolute() and (run_dir / p).exists():
                p = run_dir / p                 # relative to the run directory when there
            return p
    rdir = run_dir / "reduce"
    if rdir.is_dir():
        import h5py
        for path in sorted(rdir.glob("*__*.h5")):
            try:
                with h5py.File(path, "r") as f:
                    ids = [f.attrs.get(k) for k in ("ref_model_id", "other_model_id")]
            except OSError:
                continue
            for mid in ids:
                mid = mid.decode() if isinstance(mid, bytes) else str(mid or "")
                p = Path(mid)
                if mid and p.is_absolute() and p.exists():
                    for q in (p, p.parent, p.parent.parent):
                        if (q / "zoo.json").is_file():
                            return q / "zoo.json"
    return None


def _section_zoo(ctx: _Ctx, path: Path | None) -> Section:
    sec = Section("zoo", "Beyond the paper: the models' held-out loss")
    if path is None or not Path(path).is_file():
        sec.status = "not available"
        sec.message = ("Not available: " + (f"{path} does not exist" if path else
                       "no zoo.json given") + ". Pass --zoo-json PATH (or set zoo_json in "
                       "RUN/config.toml) to show the held-out loss of a zoo trained with "
                       "`ooc-universal zoo train`.")
        sec.blocks.append(sec.message)
        return sec
    doc, reason = _read_json(Path(path))
    if doc is None or "models" not in doc:
        sec.status = "unreadable"
        sec.message = f"Not shown: {path} is {reason or 'not a zoo.json (no models)'}."
        sec.blocks.append(sec.message)
        return sec
    units = doc.get("loss_units", "nats per byte")
    uni = doc.get("unigram_heldout_loss")
    rec = doc.get("recipe") or {}
    sec.blocks.append(
        f"Zoo: {len(doc['models'])} model(s), {doc.get('n_params_per_model', '?')} parameters "
        f"each, recipe {doc.get('recipe_hash', '?')} ({', '.join(f'{k}={v}' for k, v in rec.items() if k in ('n_layer', 'n_embd', 'd_mlp', 'context', 'batch_size', 'steps', 'lr', 'corpus'))}); "
        f"held-out loss over {doc.get('eval_bytes', '?')} held-out bytes, in {units}. "
        f"Source: {path}.")
    rows, recs = [], []
    steps = sorted({int(s) for m in doc["models"] for s in m.get("checkpoints", {})})
    for m in doc["models"]:
        row = [str(m["name"]), str(m.get("seed", "–"))]
        for s in steps:
            ck = m.get("checkpoints", {}).get(str(s))
            v = None if ck is None else ck.get("heldout_loss")
            row.append(_f(v, 4))
            recs.append({"model": m["name"], "step": s, "heldout_loss": v})
        rows.append(row)
    if uni is not None:
        rows.append(["unigram baseline", "–"] + [_f(uni, 4)] * len(steps))
        recs.append({"model": "unigram baseline", "heldout_loss": uni})
    sec.blocks.append(ctx.table(Table(
        "zoo_loss", f"Held-out loss per checkpoint ({units})",
        ["model", "seed"] + [f"step {s}" for s in steps], rows, str(path), "4 decimals",
        recs, note="The unigram baseline predicts every byte with its training-set frequency.")))
    fig = _new_figure(7.5, 4.2)
    ax = fig.add_subplot()
    series = []
    for m in doc["models"]:
        ys = [(m.get("checkpoints", {}).get(str(s)) or {}).get("heldout_loss") for s in steps]
        ax.plot(steps, [np.nan if y is None else y for y in ys], marker="o",
                label=str(m["name"]))
        series.append({"model": m["name"], "steps": steps, "heldout_loss": ys})
    if uni is not None:
        ax.axhline(uni, color="0.3", ls="--", label="unigram baseline")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"held-out loss ({units})")
    ax.set_title("Held-out loss of the zoo's models vs a unigram baseline")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    cap = (f"Cross-entropy on held-out text of each of the {len(doc['models'])} models at "
           f"each saved checkpoint ({len(steps)}), against the unigram baseline (dashed); "
           "lower is better.")
    sec.blocks.append(ctx.save(fig, "heldout_loss", "Held-out loss of the models", cap,
                               str(path), {"series": series, "unigram": uni}))
    return sec


# ---------------------------------------------------------------------------- footer

def _sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _footer(run_dir: Path, config_text, token_hash, versions, zoo_path, generated) -> Section:
    sec = Section("footer", "Provenance")
    sources = []
    for rel in ("universal/table1.json", "universal/table1.csv", "universal/sets.json",
                "persistence/persistence.json", "persistence/persistence.csv",
                "ablate/ablation.json", "ablate/ablation.csv", "ablate/ablation_draws.csv",
                "tokens/meta.json"):
        p = run_dir / rel
        if p.is_file():
            sources.append([rel, str(p.stat().st_size), _sha_file(p)])
    nreduce = len(list((run_dir / "reduce").glob("*__*.h5"))) if (run_dir / "reduce").is_dir() \
        else 0
    lines = [f"Generated {generated} by ooc-universal {__version__} from {run_dir}.",
             f"Token set hash: {token_hash or 'unknown (no tokens/meta.json)'}.",
             "Toolkit versions recorded by the inputs: "
             + (", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or "none") + ".",
             f"Reduce files: {nreduce}. Zoo: {zoo_path or 'none'}."]
    sec.blocks += lines
    if sources:
        sec.blocks.append(Table("sources", "Input files", ["file", "bytes", "sha256 (16 hex)"],
                                sources, "", "exact"))
    sec.blocks.append("Run config (RUN/config.toml):" if config_text else
                      "Run config: no RUN/config.toml in this run directory (steps run one by "
                      "one; each output carries its own config).")
    if config_text:
        sec.blocks.append(Code(config_text.rstrip("\n")))
    return sec


# ---------------------------------------------------------------------------- rendering

def _md_cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> list[str]:
    out = [f"**{t.title}**", ""]
    out.append("| " + " | ".join(_md_cell(c) for c in t.columns) + " |")
    out.append("|" + "|".join("---" for _ in t.columns) + "|")
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    note = " ".join(x for x in (t.note, f"Rounding: {t.rounding}." if t.rounding else "",
                                f"Source: {t.source}." if t.source else "") if x)
    if note:
        out += ["", f"*{note}*"]
    return out + [""]


def render_markdown(sections: list[Section], title: str) -> str:
    out = [f"# {title}", ""]
    out += ["Contents: " + " · ".join(f"[{s.title}](#{s.id})" for s in sections), ""]
    for s in sections:
        out += [f'<a id="{s.id}"></a>', "", f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Table):
                out += _md_table(b)
            elif isinstance(b, Figure):
                out += [f"![{b.title}]({b.file})", "", f"*Figure: {b.caption}*", ""]
            elif isinstance(b, Code):
                out += ["```toml", b.text, "```", ""]
            else:
                out += [str(b), ""]
    return "\n".join(out).rstrip() + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1150px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.3em;border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:2em}table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right;vertical-align:top}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
.note,figcaption{font-size:.85em;color:#555}figure{margin:1.2em 0}
figure img{max-width:100%;height:auto;border:1px solid #eee}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.8em}
.status{background:#fff6e0;border-left:4px solid #e0a000;padding:.5em .8em}
nav a{margin-right:.8em}
"""


def _html_table(t: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(c))}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>"
                   for row in t.rows)
    note = " ".join(x for x in (t.note, f"Rounding: {t.rounding}." if t.rounding else "",
                                f"Source: {t.source}." if t.source else "") if x)
    return (f'<table id="t-{e(t.id)}"><caption>{e(t.title)}</caption><thead><tr>{head}'
            f"</tr></thead><tbody>{body}</tbody></table>"
            + (f'<p class="note">{e(note)}</p>' if note else ""))


def render_html(sections: list[Section], title: str, fig_dir: Path) -> str:
    """One self-contained page: figures as base64 data: URIs, no external assets."""
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{e(title)}</h1>",
             "<nav>" + "".join(f'<a href="#{s.id}">{e(s.title)}</a>' for s in sections)
             + "</nav>"]
    for s in sections:
        parts.append(f'<section id="{s.id}"><h2>{e(s.title)}</h2>')
        for b in s.blocks:
            if isinstance(b, Table):
                parts.append(_html_table(b))
            elif isinstance(b, Figure):
                data = base64.b64encode((fig_dir / b.file).read_bytes()).decode("ascii")
                parts.append(f'<figure id="f-{e(b.id)}"><img alt="{e(b.title)}" '
                             f'src="data:image/png;base64,{data}"><figcaption><b>'
                             f"{e(b.title)}.</b> {e(b.caption)}</figcaption></figure>")
            elif isinstance(b, Code):
                parts.append(f"<pre>{e(b.text)}</pre>")
            elif s.message and b == s.message:
                parts.append(f'<p class="status">{e(str(b))}</p>')
            else:
                parts.append(f"<p>{e(str(b))}</p>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return None if math.isnan(v) else v
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ---------------------------------------------------------------------------- the step

def report(run_dir, zoo_json=None, progress: bool = True) -> dict[str, Path]:
    """Write RUN/report/ (index.md + fig_*.png, index.html, report_data.json).

    Every step output is optional: a missing one gives its section a "not run" line.
    The folder is built under RUN/report.tmp-<pid>/ and renamed over RUN/report/, so a
    reader never sees half a report. Returns {"html", "md", "data", "dir"}.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise OocError(f"run directory {str(run_dir)!r} does not exist; give the --run-dir "
                       "of a run (it holds universal/, persistence/, ablate/ ...)")
    from ooc_universal.rundir import ensure_writable
    ensure_writable(run_dir)
    tmp = run_dir / f"report.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        data = _build(run_dir, tmp, zoo_json, progress)
        final = run_dir / "report"
        old = None
        if final.exists():
            old = run_dir / f"report.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = run_dir / "report"
    del data
    return {"html": final / "index.html", "md": final / "index.md",
            "data": final / "report_data.json", "dir": final}


def _build(run_dir: Path, out: Path, zoo_json, progress: bool) -> dict:
    import warnings
    generated = time.strftime("%Y-%m-%d %H:%M:%S %z")
    ctx = _Ctx(run_dir, out, progress)
    t1, t1_reason = _read_json(run_dir / "universal" / "table1.json")
    pers, pers_reason = _read_json(run_dir / "persistence" / "persistence.json")
    abl, abl_reason = _read_json(run_dir / "ablate" / "ablation.json")
    meta, _ = _read_json(run_dir / "tokens" / "meta.json")
    config_text, config = _toml(run_dir)
    zoo_path = find_zoo_json(run_dir, zoo_json, config)
    neurons, neurons_src = _load_neurons(run_dir)

    others = set()
    for e in (t1 or {}).get("table1", []):
        others |= {p["other"] for p in e["pairs"]}
    for key in ("pairs", "mean_over_pairs", "pooled_over_pairs"):
        others |= {r["other"] for r in (pers or {}).get(key, [])}
    others |= {str(r["other"]) for r in (abl or {}).get("rows", [])}
    if neurons is not None:
        others |= set(neurons["other"].astype(str).unique())
    ctx.set_colours(others)
    taus = sorted({float(e["threshold"]) for e in (t1 or {}).get("table1", [])}) or \
        sorted(float(t) for t in (config or {}).get("thresholds", [0.5]))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # matplotlib layout hints
        sections = [_section_table1(ctx, t1, t1_reason),
                    _section_persistence(ctx, pers, pers_reason),
                    _section_ablation(ctx, abl, abl_reason),
                    _section_correlations(ctx, neurons, neurons_src, taus),
                    _section_layer_counts(ctx, t1, t1_reason),
                    _section_zoo(ctx, zoo_path)]
    ctx.bar.close()
    versions = {}
    for name, doc in (("universal", t1), ("persistence", pers), ("ablate", abl),
                      ("tokens", meta)):
        if doc and doc.get("toolkit_version"):
            versions[name] = doc["toolkit_version"]
    token_hash = (meta or {}).get("hash") or (t1 or {}).get("token_hash") or \
        (pers or {}).get("token_hash") or ((abl or {}).get("inputs") or {}).get("token_hash")
    footer = _footer(run_dir, config_text, token_hash, versions, zoo_path, generated)
    overview = Section("overview", "Overview")
    overview.blocks.append(Table(
        "steps", "What this report found in the run directory",
        ["section", "status"], [[s.title, s.status] for s in sections], "", ""))
    sections = [overview] + sections + [footer]
    title = f"Universal neurons: report for {run_dir.name}"
    (out / "index.md").write_text(render_markdown(sections, title))
    (out / "index.html").write_text(render_html(sections, title, out))
    data = {
        "generated": generated, "toolkit_version": __version__, "run_dir": str(run_dir),
        "token_hash": token_hash, "input_toolkit_versions": versions,
        "zoo_json": None if zoo_path is None else str(zoo_path),
        "config_toml": config_text,
        "sections": {s.id: {"title": s.title, "status": s.status, "message": s.message}
                     for s in sections},
        "tables": {t.id: {"title": t.title, "source": t.source, "rounding": t.rounding,
                          "columns": t.columns, "rows": t.rows, "records": t.records,
                          "note": t.note} for t in ctx.tables.values()},
        "figures": {f.id: {"file": f.file, "title": f.title, "caption": f.caption,
                           "source": f.source, "data": f.data}
                    for f in ctx.figures.values()},
    }
    with open(out / "report_data.json", "w") as f:
        json.dump(_jsonable(data), f, indent=1, sort_keys=True)
        f.write("\n")
    return data
