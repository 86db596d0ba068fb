"""Series: what each figure plots, shaped from the views (views.py); figures.py only
draws them, and report_data.json stores them as the figure's data.

Series may aggregate (a mean over pairs), and their captions say so. A value that does
not exist (an undefined persistence, an empty set) is NaN, a gap, never 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ooc_universal.report.text import checkpoint_number
from ooc_universal.report.views import (AblationView, PersistenceView, Table1View, heldout_loss,
                                        row_label, set_rank, zoo_steps)

ABLATION_METRICS = ("kl", "delta_loss")
NON_NEGATIVE = {"kl"}     # delta loss may fall below 0 (ablating can help), KL cannot


# ---------------------------------------------------------------------------- Table 1


def universal_percent_series(view: Table1View) -> list[dict]:
    """Per threshold: the summary over pairs (with the std over baseline draws), then
    each single pair when there are several. NaN where a checkpoint has no row."""
    series = []
    for tau in view.thresholds:
        rows = [view.entry(tau, c) for c in view.checkpoints]
        series.append({
            "threshold": tau, "other": view.summary, "x": view.checkpoints,
            "y": [r["pct_universal"] if r else np.nan for r in rows],
            "yerr_std_over_draws": [(r["pct_universal_draws_std"] or 0.0) if r else 0.0
                                    for r in rows]})
        if len(view.others) > 1:
            series += [{"threshold": tau, "other": other, "x": view.checkpoints,
                        "y": [_pct(view.row(other, tau, c)) for c in view.checkpoints]}
                       for other in view.others]
    return series


def _pct(row):
    return np.nan if row is None else row["pct_universal"]


def layer_count_series(view: Table1View) -> list[dict]:
    """Per threshold and layer: the universal neurons in that layer, mean over the pairs
    (the pair-averaged set's own count under that definition)."""
    names = view.others or [view.summary]
    series = []
    for tau in view.thresholds:
        for layer in range(view.n_layers):
            counts = []
            for ckpt in view.checkpoints:
                found = [view.row(n, tau, ckpt, layer) for n in names]
                found = [r["n_universal"] for r in found if r is not None]
                counts.append(float(np.mean(found)) if found else np.nan)
            series.append({"threshold": tau, "layer": layer, "checkpoints": view.checkpoints,
                           "mean_count": counts})
    return series


# ---------------------------------------------------------------------------- persistence


def _persistence_bars(view, other, tau, interval, layers) -> tuple[list, list]:
    """(p_persist as a fraction, NaN when undefined or absent; |U(t1)|, None when
    absent)."""
    values, n_t1 = [], []
    for layer in layers:
        row = view.row(other, tau, interval, layer)
        p = None if row is None else row["p_persist"]
        values.append(np.nan if p is None else float(p))
        n_t1.append(None if row is None else row["n_t1"])
    return values, n_t1


def persistence_pair_series(view: PersistenceView, tau: float) -> list[dict]:
    """All layers, per interval: one bar per pair and summary."""
    groups = view.pairs + view.summaries
    series = []
    for interval in view.intervals:
        values, n_t1 = [], []
        for group in groups:
            p, n = _persistence_bars(view, group, tau, interval, [None])
            values += p
            n_t1 += n
        series.append({"interval": list(interval), "groups": groups, "p_persist": values,
                       "n_t1": n_t1})
    return series


def persistence_layer_series(view: PersistenceView, tau: float) -> list[dict]:
    """By layer, per interval, for the first summary (else the only pair)."""
    group = view.layer_groups[0]
    series = []
    for interval in view.intervals:
        values, n_t1 = _persistence_bars(view, group, tau, interval, view.layers)
        series.append({"interval": list(interval), "layers": view.layers,
                       "p_persist": values, "n_t1": n_t1, "other": group})
    return series


def persistence_layer_pair_series(view: PersistenceView, tau: float) -> list[dict]:
    """By layer, per interval and pair."""
    series = []
    for interval in view.intervals:
        for other in view.pairs:
            values, n_t1 = _persistence_bars(view, other, tau, interval, view.layers)
            series.append({"interval": list(interval), "other": other,
                           "layers": view.layers, "p_persist": values, "n_t1": n_t1})
    return series


# ---------------------------------------------------------------------------- ablation


def _empty(row) -> bool:
    """A set with no neurons: nothing was ablated, so its 0 is not an effect."""
    return row is not None and row["n_neurons"] == 0


def _plotted(row, metric) -> float:
    """The value drawn for one point: NaN (a gap, never 0) where the row is absent or
    its set is empty."""
    if row is None or _empty(row) or row[metric] is None:
        return np.nan
    return float(row[metric])


def _clip_below(value: float, below: float, metric: str) -> float:
    """An error bar of a non-negative quantity stops at 0 (its t-interval may not)."""
    if metric in NON_NEGATIVE and not np.isnan(value):
        return min(below, max(value, 0.0))
    return below


def control_ci_errors(row, metric) -> tuple[float, float]:
    """(below, above) of a control's 95% CI over draws; (0, 0) for a universal set (one
    fixed set, no draws) and for a control with fewer than two draws."""
    value = _plotted(row, metric)
    low = None if row is None else row.get(f"{metric}_ci_low")
    high = None if row is None else row.get(f"{metric}_ci_high")
    if row is None or row["set"] != "control" or low is None or high is None \
            or np.isnan(value):
        return 0.0, 0.0
    return _clip_below(value, value - low, metric), high - value


def se_errors(row, metric) -> tuple[float, float]:
    """(below, above) of the SE over windows; (0, 0) where there is no point."""
    value = _plotted(row, metric)
    se = None if row is None else row.get(f"{metric}_se")
    if se is None or np.isnan(value):
        return 0.0, 0.0
    return _clip_below(value, se, metric), se


@dataclass

class AblationLines:
    """What an ablation figure plots: one series per (metric, [checkpoint,] other, set).
    A series' y is NaN where its set is empty (n_neurons 0) or absent."""
    x: list                        # checkpoints (over training) or layers (layer by layer)
    checkpoints: list
    others: list
    sets: list
    series: list
    universal_sizes: list = field(default_factory=list)

    @property
    def has_empty(self) -> bool:
        return any(n == 0 for s in self.series if s["set"] == "universal"
                   for n in s["n_neurons"])


def _ablation_axes(rows) -> tuple:
    return (sorted({checkpoint_number(r["checkpoint"]) for r in rows}),
            sorted({row_label(r) for r in rows}),
            sorted({r["set"] for r in rows}, key=set_rank))


def _points_series(points, metric, errors) -> dict:
    bars = [errors(p, metric) for p in points]
    return {"y": [_plotted(p, metric) for p in points], "err_low": [b[0] for b in bars],
            "err_high": [b[1] for b in bars],
            "n_neurons": [None if p is None else p["n_neurons"] for p in points]}


def ablation_checkpoint_lines(view: AblationView, tau: float) -> AblationLines:
    """All layers, over checkpoints; error bars: the controls' 95% CI over draws."""
    rows = view.all_layer_rows(tau)
    ckpts, others, sets = _ablation_axes(rows)
    by_key = {(checkpoint_number(r["checkpoint"]), row_label(r), r["set"]): r
              for r in rows}
    lines = AblationLines(ckpts, ckpts, others, sets, [])
    for metric in ABLATION_METRICS:
        for other in others:
            for name in sets:
                points = [by_key.get((c, other, name)) for c in ckpts]
                lines.series.append({"metric": metric, "other": other, "set": name,
                                     "checkpoints": ckpts,
                                     **_points_series(points, metric, control_ci_errors)})
    lines.universal_sizes = sorted({r["n_neurons"] for r in rows if r["set"] == "universal"})
    return lines


def ablation_layer_lines(rows: list) -> AblationLines:
    """Layer by layer, per checkpoint; error bars: the SE over windows."""
    ckpts, others, sets = _ablation_axes(rows)
    layers = sorted({int(r["layer"]) for r in rows})
    by_key = {(checkpoint_number(r["checkpoint"]), int(r["layer"]), row_label(r),
               r["set"]): r for r in rows}
    lines = AblationLines(layers, ckpts, others, sets, [])
    for metric in ABLATION_METRICS:
        for ckpt in ckpts:
            for other in others:
                for name in sets:
                    points = [by_key.get((ckpt, layer, other, name)) for layer in layers]
                    lines.series.append({"metric": metric, "checkpoint": ckpt,
                                         "other": other, "set": name, "layers": layers,
                                         **_points_series(points, metric, se_errors)})
    return lines


# ---------------------------------------------------------------------------- neurons


@dataclass

class ScatterPanel:
    checkpoint: int
    other: str
    baseline: np.ndarray           # x: max rho vs the rotated model (draw 0)
    max_corr: np.ndarray           # y: max rho vs the other model
    layer: np.ndarray
    n_zero_var: int                # neurons left out (their rho is 0 by definition)

    def record(self) -> dict:
        return {"checkpoint": self.checkpoint, "other": self.other,
                "n_points": int(len(self.max_corr)), "n_zero_var_left_out": self.n_zero_var}


@dataclass

class NeuronGrid:
    """Per-neuron series of one reference on a (checkpoint x other model) grid."""
    checkpoints: list
    others: list
    n_layers: int
    panels: list = field(default_factory=list)     # ScatterPanel, checkpoints as rows
    lowest: float = 0.0            # the smallest correlation shown (axes start there)
    bin_edges: np.ndarray = None   # excess histogram: shared by every panel
    histograms: list = field(default_factory=list)


def _neuron_grid(neurons) -> NeuronGrid:
    return NeuronGrid(sorted(int(c) for c in neurons["checkpoint"].unique()),
                      sorted(neurons["other"].astype(str).unique()),
                      int(neurons["layer"].max()) + 1)


def _cell(neurons, checkpoint, other):
    return neurons[(neurons["checkpoint"] == checkpoint)
                   & (neurons["other"].astype(str) == other)]


def scatter_grid(neurons) -> NeuronGrid:
    """One panel per (checkpoint, other model); zero-variance neurons left out."""
    grid = _neuron_grid(neurons)
    grid.lowest = float(min(0.0, np.nanmin(neurons["baseline_max"]),
                            np.nanmin(neurons["max_corr"])))
    for ckpt in grid.checkpoints:
        for other in grid.others:
            group = _cell(neurons, ckpt, other)
            live = group[~group["zero_var"].astype(bool)]
            grid.panels.append(ScatterPanel(
                ckpt, other, live["baseline_max"].to_numpy(), live["max_corr"].to_numpy(),
                live["layer"].to_numpy(), int(len(group) - len(live))))
    return grid


def excess_grid(neurons) -> NeuronGrid:
    """Excess-correlation histograms, one per (checkpoint, other): 60 bins spanning at
    least [-0.2, 1], the same for every panel so they compare."""
    grid = _neuron_grid(neurons)
    excess = neurons["excess"].to_numpy(dtype=float)
    grid.bin_edges = np.linspace(min(-0.2, np.nanmin(excess)), max(1.0, np.nanmax(excess)),
                                 61)
    for ckpt in grid.checkpoints:
        for other in grid.others:
            values = _cell(neurons, ckpt, other)["excess"]
            counts, _ = np.histogram(values.to_numpy(dtype=float), bins=grid.bin_edges)
            grid.histograms.append({"checkpoint": ckpt, "other": other,
                                    "n_neurons": int(len(values)), "counts": counts.tolist()})
    return grid


# ---------------------------------------------------------------------------- zoo


def zoo_loss_series(zoo: dict) -> list[dict]:
    steps = zoo_steps(zoo)
    return [{"model": m["name"], "steps": steps,
             "heldout_loss": [heldout_loss(m, s) for s in steps]} for m in zoo["models"]]


# ---------------------------------------------------------------------------- convergence


def convergence_references(frame) -> list[str]:
    """The references of the convergence tables (formats/convergence.py), sorted."""
    return sorted(frame["reference"].astype(str).unique())


def convergence_series(frame, reference: str) -> dict:
    """What the convergence figure of one reference plots: per (checkpoint, threshold)
    panel, one line per other model of pct_universal (draw 0) against n_tokens, with
    the std over baseline draws (NaN with one draw). Only the snapshots that exist are
    points: a pair with fewer snapshots has a shorter line, never a made-up point."""
    mine = frame[frame["reference"].astype(str) == reference]
    checkpoints = sorted(int(c) for c in mine["checkpoint"].unique())
    thresholds = sorted(float(t) for t in mine["threshold"].unique())
    others = sorted(mine["other"].astype(str).unique())
    lines = []
    for ckpt in checkpoints:
        for tau in thresholds:
            for other in others:
                rows = mine[(mine["checkpoint"] == ckpt) & (mine["threshold"] == tau)
                            & (mine["other"].astype(str) == other)].sort_values("n_tokens")
                if rows.empty:
                    continue
                std = rows["pct_universal_draws_std"].astype(float)
                lines.append({"checkpoint": ckpt, "threshold": tau, "other": other,
                              "n_tokens": rows["n_tokens"].astype(int).tolist(),
                              "pct_universal": rows["pct_universal"].astype(float).tolist(),
                              "pct_std_over_draws": [None if np.isnan(v) else float(v)
                                                     for v in std],
                              "n_tokens_total": int(rows["n_tokens_total"].max()),
                              "n_neurons": int(rows["n_neurons"].iloc[0])})
    return {"reference": reference, "checkpoints": checkpoints, "thresholds": thresholds,
            "others": others, "lines": lines}
