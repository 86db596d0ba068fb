"""Drawing: one function per figure, from series shaped by series.py to a Figure whose
PNG is held in memory (the report writes it beside index.md and embeds it in the HTML).

matplotlib's object API only (no pyplot state), so figures can be drawn in any thread.
"""
from __future__ import annotations

import io

import numpy as np

from ooc_universal.report.document import Figure
from ooc_universal.report.series import ABLATION_METRICS
from ooc_universal.report.text import (interval_text, short_name, step_short, tau_id, tau_text,
                                       tokens_short)

DPI = 100
SET_STYLE = {"universal": ("-", "o"), "control": ("--", "s"), "all-non-universal": (":", "^")}
OTHER_SET_STYLE = ("-.", "d")
SET_LABEL = {"universal": "universal", "control": "matched control (non-universal)",
             "all-non-universal": "all non-universal"}
METRIC_LABEL = {"kl": ("KL(P_original || Q_ablated) (nats / position)", "KL divergence"),
                "delta_loss": ("delta loss = CE ablated - CE original (nats / token)",
                               "loss increase")}
THRESHOLD_LINES = ["--", "-.", ":", (0, (5, 1)), (0, (1, 3))]   # one dash per threshold
UNKNOWN_COLOUR = "0.3"


class Palette:
    """One colour per model, the same in every figure. Keyed by the short name, so a
    model named by its path in one file and by its name in another (the zoo's) matches;
    tab10's grey is skipped because greys mark neutral things (baselines, legends)."""

    def __init__(self, names):
        import matplotlib
        keys = sorted({short_name(n) for n in names})
        colours = [c for i, c in enumerate(matplotlib.colormaps["tab10"].colors) if i != 7]
        if len(keys) > len(colours):
            colours = list(matplotlib.colormaps["tab20"].colors)
        self.colours = {key: matplotlib.colors.to_hex(colours[i % len(colours)])
                        for i, key in enumerate(keys)}

    def __call__(self, name) -> str:
        return self.colours.get(short_name(name), UNKNOWN_COLOUR)


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure as MplFigure
    return MplFigure(figsize=(width, height), layout="constrained")


def finish(fig, fig_id: str, title: str, caption: str, source: str, data: dict) -> Figure:
    """Render a matplotlib figure to PNG bytes (fig_<id>.png once written)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    return Figure(fig_id, f"fig_{fig_id}.png", title, caption, source, data,
                  buffer.getvalue())


def _viridis(i: int, n: int, start: float = 0.15, span: float = 0.7):
    import matplotlib
    return matplotlib.colormaps["viridis"](start + span * i / max(1, n - 1))


def _clipped_at_zero(values, spread) -> list:
    """[below, above] error bars of a non-negative quantity: the lower bar stops at 0."""
    below = [min(e, max(v, 0.0)) if not np.isnan(v) else e for v, e in zip(values, spread)]
    return [below, list(spread)]


def _checkpoint_axis(ax, checkpoints) -> None:
    ax.set_xticks(np.arange(len(checkpoints)), [step_short(c) for c in checkpoints])
    ax.set_xlabel("training step (checkpoint)")


# ---------------------------------------------------------------------------- Table 1

def universal_percent_figure(view, series) -> Figure:
    """Percent universal over training: thick lines for the summary (error bars: std
    over baseline draws), thin ones for single pairs."""
    fig = new_figure(7.5, 4.2)
    ax = fig.add_subplot()
    x = np.arange(len(view.checkpoints))
    for line in series:
        colour = _viridis(view.thresholds.index(line["threshold"]), len(view.thresholds))
        if "yerr_std_over_draws" in line:
            ax.errorbar(x, line["y"], yerr=_clipped_at_zero(line["y"],
                                                            line["yerr_std_over_draws"]),
                        color=colour,
                        marker="o", lw=2, capsize=4,
                        label=f"tau = {tau_text(line['threshold'])} ({view.summary})")
        else:
            ax.plot(x, line["y"], color=colour, lw=0.8, alpha=0.5)
    if view.n_pairs > 1:
        ax.plot([], [], color="0.5", lw=0.8, alpha=0.6, label="single model pairs")
    _checkpoint_axis(ax, view.checkpoints)
    ax.set_ylabel("universal neurons (% of reference neurons)")
    ax.set_title(f"Universal neurons of {short_name(view.reference)} over training")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    # below the axes, so it covers neither the title nor the thin single-pair lines
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="outside lower center",
               ncols=min(len(labels), 2))
    caption = (f"Percent of the reference's {view.n_neurons} neurons whose excess "
               f"correlation exceeds each threshold (draw 0), {view.summary} over "
               f"{view.n_pairs} pair(s) (thick lines; error bars: std over baseline draws, "
               "clipped at 0, none with one draw); thin lines: single pairs. Same numbers "
               "as Table 1.")
    return finish(fig, f"universal_percent{view.suffix}",
                  f"Universal neurons of {view.reference} over training", caption,
                  "universal/table1.json", {"series": series})


def layer_counts_figure(view, series) -> Figure:
    """Universal neurons per layer over training, one panel per threshold (viridis
    stops short of its yellow end, which is hard to see on white)."""
    n_layers = view.n_layers
    fig = new_figure(max(7.0, 3.5 * len(view.thresholds) + 1.5), 4.2)
    axes = fig.subplots(1, len(view.thresholds), squeeze=False, sharey=True)[0]
    x = np.arange(len(view.checkpoints))
    panel_of = dict(zip(view.thresholds, axes))
    for line in series:
        panel_of[line["threshold"]].plot(x, line["mean_count"], marker="o",
                                         color=_viridis(line["layer"], n_layers, 0.0, 0.85),
                                         label=f"layer {line['layer']}")
    for ax, tau in zip(axes, view.thresholds):
        _checkpoint_axis(ax, view.checkpoints)
        ax.set_title(f"tau = {tau_text(tau)}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"universal neurons in the layer (of {view.d_mlp}),\n"
                       "mean over pairs")
    axes[-1].legend(fontsize=7, ncols=2 if n_layers > 6 else 1, loc="upper left",
                    bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"Universal neurons per layer of {short_name(view.reference)} over training")
    caption = (f"Number of universal neurons in each layer of {view.reference} (excess > "
               f"threshold, draw 0), mean over {view.n_pairs} model pair(s) of the per-pair "
               "counts (`n_universal` of the rows with scope layer in universal/table1.json), "
               "one panel per threshold.")
    return finish(fig, f"universal_layer_counts{view.suffix}",
                  f"Universal neurons per layer over training, {view.reference}", caption,
                  "universal/table1.json", {"series": series})


# ---------------------------------------------------------------------------- persistence

P_AXIS_TOP = 1.18      # p_persist is a fraction: the axis runs 0..1, room for the labels
P_AXIS_LABEL = "p_persist = P(universal at t2 | universal at t1) (fraction)"


def _bar_label(ax, x, height, text, undefined, fontsize=7, rotation=90) -> None:
    if undefined:
        ax.text(x, 0.015, "undef.", ha="center", va="bottom", fontsize=fontsize,
                rotation=rotation, color="0.35")
    else:
        ax.text(x, height + 0.01, text, ha="center", va="bottom", fontsize=fontsize,
                rotation=rotation)


def _interval_bars(ax, series, n_groups: int, prefix: str, label_size: int) -> None:
    """Grouped bars, one colour per checkpoint interval, |U(t1)| (after `prefix`) or
    'undef.' above each."""
    import matplotlib
    cmap = matplotlib.colormaps["Set2"]
    width = 0.8 / len(series)
    rotation = 0 if n_groups * len(series) <= 16 else 90
    for j, bars in enumerate(series):
        xs = np.arange(n_groups) - 0.4 + width * (j + 0.5)
        ys = np.asarray(bars["p_persist"], dtype=float)
        ax.bar(xs, np.nan_to_num(ys), width * 0.95, color=cmap(j),
               label=interval_text(bars["interval"]))
        for x, y, n in zip(xs, ys, bars["n_t1"]):
            _bar_label(ax, x, y, f"{prefix}{n}", np.isnan(y) and n is not None,
                       fontsize=label_size,
                       rotation=rotation)


def _persistence_axes(fig, ax, title: str, n_intervals: int) -> None:
    ax.set_ylim(0, P_AXIS_TOP)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel(P_AXIS_LABEL, fontsize=8)
    ax.set_title(title)
    # below the axes: at the upper right it covered the end of the title (the tau)
    fig.legend(title="checkpoint interval", fontsize=8, loc="outside lower center",
               ncols=n_intervals)
    ax.grid(axis="y", alpha=0.3)


def persistence_pairs_figure(view, tau, series) -> Figure:
    """All layers: one group of bars per pair and summary, one bar per interval."""
    groups = view.pairs + view.summaries
    fig = new_figure(max(6.5, 1.3 * len(groups) + 3), 4.4)
    ax = fig.add_subplot()
    _interval_bars(ax, series, len(groups), prefix="n=", label_size=7)
    ax.set_xticks(np.arange(len(groups)), [short_name(g) for g in groups], fontsize=8)
    ax.set_xlabel("model pair (reference vs other)")
    _persistence_axes(fig, ax, "Persistence of universal neurons, all layers "
                               f"(tau = {tau_text(tau)})", len(view.intervals))
    caption = (f"p_persist, the fraction (0 to 1) of the neurons of {view.reference} "
               "universal at the earlier checkpoint that are still universal at the later "
               "one (all layers, threshold "
               f"{tau_text(tau)}), for {len(view.pairs)} model pair(s)"
               + (" and their averages" if view.summaries else "")
               + ". n = |U(t1)|, the number of neurons it is computed from (summed over pairs "
               "for the averages); 'undef.' marks an empty U(t1). Paper Figure 3.")
    return finish(fig, f"persistence_pairs{view.suffix}_t{tau_id(tau)}",
                  f"Persistence per model pair, tau = {tau_text(tau)}", caption,
                  "persistence/persistence.json", {"series": series})


def persistence_layers_figure(view, tau, series) -> Figure:
    """By layer for the first summary (else the only pair), one bar per interval."""
    layers, group = view.layers, view.layer_groups[0]
    fig = new_figure(max(7.0, 0.55 * len(layers) * len(view.intervals) + 2), 4.4)
    ax = fig.add_subplot()
    _interval_bars(ax, series, len(layers), prefix="", label_size=6)
    ax.set_xticks(np.arange(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("layer of the reference model")
    _persistence_axes(fig, ax, "Persistence of universal neurons by layer "
                               f"({group}, tau = {tau_text(tau)})", len(view.intervals))
    caption = (f"Persistence by layer of {view.reference} at threshold {tau_text(tau)} "
               f"(p_persist, a fraction), {group} ({len(view.pairs)} pair(s)); one bar per "
               "checkpoint interval. The "
               "number above a bar is |U(t1)| in that layer (summed over pairs); 'undef.' "
               "marks a layer with no universal neuron at t1. Paper Figure 1 (its y axis "
               "starts at 60% = 0.6; this one at 0).")
    return finish(fig, f"persistence_layers{view.suffix}_t{tau_id(tau)}",
                  f"Persistence by layer, tau = {tau_text(tau)}", caption,
                  "persistence/persistence.json", {"series": series})


def _pair_bars(ax, bars, j, n_pairs, palette, annotate, small) -> None:
    """One pair's bars in one interval panel; a cross on the axis where undefined."""
    layers = bars["layers"]
    width = 0.8 / n_pairs
    xs = np.arange(len(layers)) - 0.4 + width * (j + 0.5)
    ys = np.asarray(bars["p_persist"], dtype=float)
    colour = palette(bars["other"])
    ax.bar(xs, np.nan_to_num(ys), width * 0.95, color=colour)
    undefined = [x for x, y, n in zip(xs, ys, bars["n_t1"]) if np.isnan(y) and n is not None]
    ax.plot(undefined, [0.02] * len(undefined), "x", color=colour, ms=4)
    if annotate:
        for x, y, n in zip(xs, ys, bars["n_t1"]):
            if not np.isnan(y):
                ax.text(x, y + 0.01, str(n), ha="center", va="bottom",
                        fontsize=6 if small else 5, rotation=0 if small else 90)


def _pair_legend(fig, pairs, palette) -> None:
    """Each pair once (fig.legend of every panel listed each pair once per panel),
    below the panels and wrapped into rows, so it cannot run off the right edge."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    handles = [Patch(color=palette(p), label=short_name(p)) for p in pairs]
    handles.append(Line2D([], [], marker="x", ls="none", color="0.3",
                          label="undefined (U(t1) empty)"))
    fig.legend(handles=handles, title="other model", fontsize=8, loc="outside lower center",
               ncols=min(len(handles), 5))


def persistence_layers_by_pair_figure(view, tau, series, palette) -> Figure:
    """By layer for every pair, one panel per checkpoint interval."""
    layers, pairs = view.layers, view.pairs
    n_bars = len(layers) * len(pairs)
    fig = new_figure(max(7.5, 0.35 * n_bars + 2), 2.9 * len(view.intervals) + 0.4)
    axes = fig.subplots(len(view.intervals), 1, squeeze=False, sharex=True)[:, 0]
    annotate = n_bars <= 80
    panel_of = {tuple(i): ax for i, ax in zip(view.intervals, axes)}
    for bars in series:
        _pair_bars(panel_of[tuple(bars["interval"])], bars, pairs.index(bars["other"]),
                   len(pairs), palette, annotate, small=n_bars <= 24)
    for ax, interval in zip(axes, view.intervals):
        ax.set_ylim(0, P_AXIS_TOP)
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_ylabel("p_persist (fraction)")
        ax.set_title(f"{interval_text(interval)}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(np.arange(len(layers)), [str(layer) for layer in layers])
    axes[-1].set_xlabel("layer of the reference model")
    _pair_legend(fig, pairs, palette)
    fig.suptitle(f"Layer-wise persistence per model pair (tau = {tau_text(tau)})")
    caption = (f"Persistence by layer (p_persist, a fraction) for each of the "
               f"{len(pairs)} pair(s) of {view.reference}, one panel per checkpoint "
               "interval, threshold "
               f"{tau_text(tau)}. " + ("The number above a bar is |U(t1)|; " if annotate else "")
               + "a cross on the axis marks a layer whose U(t1) is empty (undefined). "
               "Paper Figures 4-6.")
    return finish(fig, f"persistence_layers_by_pair{view.suffix}_t{tau_id(tau)}",
                  f"Layer-wise persistence per pair, tau = {tau_text(tau)}", caption,
                  "persistence/persistence.json", {"series": series})


# ---------------------------------------------------------------------------- ablation

EMPTY_MARK = "x"            # on the axis: a set with no neurons (nothing ablated)
EMPTY_LABEL = "no universal neurons (nothing ablated)"


def _category_x(n: int, k: int, i: int, width: float = 0.5) -> np.ndarray:
    """x positions of series i of k at n categories, spread so error bars do not overlap
    and equal values of two series do not hide each other."""
    offset = 0.0 if k == 1 else (i / (k - 1) - 0.5) * width * 0.5
    return np.arange(n) + offset


def _ablation_legend(fig, lines, palette) -> None:
    """Below the panels: one entry per model (colour) and per set (line style)."""
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=palette(o), lw=2, label=short_name(o))
               for o in lines.others]
    handles += [Line2D([], [], color="0.2", ls=SET_STYLE[s][0], marker=SET_STYLE[s][1],
                       label=SET_LABEL[s]) for s in lines.sets]
    if lines.has_empty:
        handles.append(Line2D([], [], color="0.2", ls="none", marker=EMPTY_MARK,
                              label=EMPTY_LABEL))
    fig.legend(handles=handles, fontsize=7, loc="outside lower center", handlelength=3.2,
               ncols=min(len(handles), 4))


def _metric_panel(ax, title: str, fontsize: int) -> None:
    ax.set_title(title, fontsize=fontsize)
    ax.grid(alpha=0.3)
    ax.axhline(0, color="0.6", lw=0.6)


def _ablation_line(ax, x, line, palette) -> None:
    """One (other, set) series: NaN gaps where a set is empty or absent (never a line
    through 0), and a cross on the axis where the universal set is empty."""
    colour = palette(line["other"])
    style, marker = SET_STYLE.get(line["set"], OTHER_SET_STYLE)
    ax.errorbar(x, np.asarray(line["y"], dtype=float),
                yerr=[line["err_low"], line["err_high"]], color=colour, ls=style,
                marker=marker, capsize=3, ms=5, lw=1.2,
                mfc="white" if line["set"] != "universal" else colour)
    # one cross per model: the control matched to an empty universal set is empty too
    empty = [xi for xi, n in zip(x, line["n_neurons"]) if n == 0]
    if empty and line["set"] == "universal":   # y in axes units: on the axis, not a value
        ax.plot(empty, [0.03] * len(empty), EMPTY_MARK, color=colour, ms=6,
                transform=ax.get_xaxis_transform(), clip_on=False, zorder=5)


def _spread_lines(lines, series) -> list:
    """(x, series) with the series of each panel spread around its category."""
    n_series = len(lines.others) * len(lines.sets)
    return [(_category_x(len(lines.x), n_series, i), s) for i, s in enumerate(series)]


def ablation_figure(view, tau, lines, palette) -> Figure:
    """All layers over checkpoints: KL (left) and loss increase (right), universal
    (solid) vs matched controls (dashed), one colour per model."""
    fig = new_figure(11, 4.8)
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ABLATION_METRICS):
        for x, line in _spread_lines(lines, [s for s in lines.series if s["metric"] == metric]):
            _ablation_line(ax, x, line, palette)
        _checkpoint_axis(ax, lines.x)
        ax.set_ylabel(METRIC_LABEL[metric][0])
        _metric_panel(ax, f"{METRIC_LABEL[metric][1]}, all layers", fontsize=10)
    _ablation_legend(fig, lines, palette)
    fig.suptitle(f"Ablating universal neurons of {short_name(view.reference)} "
                 f"(tau = {tau_text(tau)}) vs controls")
    sizes = lines.universal_sizes
    caption = (f"KL divergence (left) and loss increase (right) when all universal neurons of "
               f"{view.reference} at threshold {tau_text(tau)} are ablated (solid) vs matched "
               f"random non-universal controls (dashed, mean over draws), one colour per "
               f"model ({len(lines.others)} pair(s)); universal sets of "
               f"{min(sizes) if sizes else 0} to {max(sizes) if sizes else 0} neurons. "
               "Error bars: the controls' 95% t-interval over control draws (none with one "
               "draw; the universal set is one fixed set, so it has none), KL's clipped at 0 "
               "since KL cannot be negative; the standard errors over windows are in the "
               "table. Points of different models are shifted sideways so equal values stay "
               f"visible; a cross on the axis marks an empty set ({EMPTY_LABEL}, no point). "
               "Paper Figures 2, 7-8, 13-20.")
    return finish(fig, f"ablation{view.suffix}_t{tau_id(tau)}",
                  f"Ablation over checkpoints, tau = {tau_text(tau)}", caption,
                  "ablate/ablation.json", {"series": lines.series})


def ablation_layers_figure(view, tau, lines, palette) -> Figure:
    """Layer by layer: a column per checkpoint, KL (top) and loss increase (bottom)."""
    ckpts, layers = lines.checkpoints, lines.x
    fig = new_figure(max(7.0, 3.6 * len(ckpts) + 1), 7.3)
    axes = fig.subplots(2, len(ckpts), squeeze=False, sharex=True)
    for row, metric in enumerate(ABLATION_METRICS):
        for col, ckpt in enumerate(ckpts):
            ax = axes[row, col]
            mine = [s for s in lines.series
                    if s["metric"] == metric and s["checkpoint"] == ckpt]
            for x, line in _spread_lines(lines, mine):
                _ablation_line(ax, x, line, palette)
            _metric_panel(ax, f"{METRIC_LABEL[metric][1]}, step {step_short(ckpt)}",
                          fontsize=9)
            if col == 0:
                ax.set_ylabel(METRIC_LABEL[metric][0], fontsize=8)
            if row == 1:
                ax.set_xlabel("layer whose universal neurons are ablated")
                ax.set_xticks(np.arange(len(layers)), [str(layer) for layer in layers])
    _ablation_legend(fig, lines, palette)
    fig.suptitle(f"Layer-by-layer ablation of {short_name(view.reference)} "
                 f"(tau = {tau_text(tau)})")
    caption = (f"Each layer's universal neurons of {view.reference} (threshold {tau_text(tau)}) "
               "ablated alone (solid) vs a matched control from the same layer (dashed, mean "
               f"over draws), per checkpoint (columns), {len(lines.others)} model pair(s) "
               "(colours). Top: KL divergence, bottom: loss increase, both in nats. Error "
               "bars: standard error over windows, for both sets; KL's clipped at 0 since KL "
               "cannot be negative. Points of different models are shifted sideways so equal "
               "values stay visible; a cross on the axis marks a layer with no universal "
               "neuron (nothing ablated, no point, no line through it). Paper Figures 9-12.")
    return finish(fig, f"ablation_layers{view.suffix}_t{tau_id(tau)}",
                  f"Layer-by-layer ablation, tau = {tau_text(tau)}", caption,
                  "ablate/ablation.json", {"series": lines.series})


# ---------------------------------------------------------------------------- neurons

def _scatter_panel(ax, panel, grid, colours, rng):
    """Neurons as points coloured by layer, in a random order so no layer hides another."""
    order = rng.permutation(len(panel.max_corr))
    size = float(np.clip(2000.0 / max(1, len(panel.max_corr)), 1.0, 14.0))
    points = ax.scatter(panel.baseline[order], panel.max_corr[order], c=panel.layer[order],
                        s=size, linewidths=0, alpha=0.7, rasterized=True, **colours)
    ax.set_xlim(grid.lowest, 1.0)
    ax.set_ylim(grid.lowest, 1.0)
    ax.set_title(f"vs {short_name(panel.other)}, step {step_short(panel.checkpoint)}",
                 fontsize=9)
    return points


def _threshold_lines(ax, lowest, thresholds) -> None:
    diagonal = np.linspace(lowest, 1.0, 2)
    ax.plot(diagonal, diagonal, color="0.5", lw=0.8)
    for tau, style in zip(thresholds, THRESHOLD_LINES):
        ax.plot(diagonal, diagonal + tau, color="crimson", lw=1, ls=style)


def scatter_figure(reference, suffix, grid, source, thresholds) -> Figure:
    """Best correlation (y) against its rotation baseline (x), a panel per (checkpoint,
    other model); points above a red line are universal at that threshold."""
    import matplotlib
    from matplotlib.colors import BoundaryNorm
    from matplotlib.lines import Line2D
    cmap = matplotlib.colormaps["viridis"]
    colours = {"cmap": cmap, "norm": BoundaryNorm(np.arange(grid.n_layers + 1) - 0.5, cmap.N)}
    n_rows, n_cols = len(grid.checkpoints), len(grid.others)
    fig = new_figure(2.9 * n_cols + 1.2, 2.7 * n_rows + 0.6)
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharex=True, sharey=True)
    rng = np.random.default_rng(0)
    points = None
    for k, panel in enumerate(grid.panels):
        i, j = divmod(k, n_cols)
        ax = axes[i, j]
        points = _scatter_panel(ax, panel, grid, colours, rng)
        _threshold_lines(ax, grid.lowest, thresholds)
        if i == n_rows - 1:
            ax.set_xlabel("max rho vs rotated model (draw 0)", fontsize=8)
        if j == 0:
            ax.set_ylabel("max rho vs other model", fontsize=8)
    if points is not None:
        bar = fig.colorbar(points, ax=axes, shrink=0.8, ticks=np.arange(grid.n_layers))
        bar.set_label("layer of the reference neuron")
    handles = [Line2D([], [], color="0.5", lw=0.8, label="y = x (no excess)")]
    handles += [Line2D([], [], color="crimson", ls=style, label=f"y = x + {tau_text(t)}")
                for t, style in zip(thresholds, THRESHOLD_LINES)]
    axes[0, 0].legend(handles=handles, fontsize=7, loc="lower right")
    fig.suptitle(f"Best correlation vs its rotation baseline, neurons of {short_name(reference)}")
    counts = [p.record() for p in grid.panels]
    n_per = counts[0]["n_points"] + counts[0]["n_zero_var_left_out"] if counts else 0
    n_zero = sum(p.n_zero_var for p in grid.panels)
    caption = (f"One point per neuron of {reference} ({n_per} per panel; {n_cols} pair(s) x "
               f"{n_rows} checkpoint(s)): x = its best correlation with the randomly rotated "
               "other model (baseline draw 0), y = its best correlation with the other model. "
               "Points above a red line have excess correlation above that threshold "
               f"(universal). {n_zero} zero-variance neuron(s) left out (their rho is 0). "
               f"Source: {source}.")
    return finish(fig, f"corr_vs_baseline{suffix}",
                  f"Max correlation vs rotation baseline, {reference}", caption, source,
                  {"panels": counts, "thresholds": thresholds})


def excess_figure(reference, suffix, grid, source, thresholds, palette) -> Figure:
    """Histograms of the excess correlation, a panel per checkpoint, a line per pair."""
    fig = new_figure(max(7.0, 3.6 * len(grid.checkpoints)), 4.0)
    axes = fig.subplots(1, len(grid.checkpoints), squeeze=False, sharey=True)[0]
    edges = grid.bin_edges
    panel_of = dict(zip(grid.checkpoints, axes))
    for counts in grid.histograms:
        panel_of[counts["checkpoint"]].stairs(counts["counts"], edges,
                                              color=palette(counts["other"]), lw=1.3,
                                              label=short_name(counts["other"]))
    for ax, ckpt in zip(axes, grid.checkpoints):
        for tau, style in zip(thresholds, THRESHOLD_LINES):
            ax.axvline(tau, color="crimson", ls=style, lw=1, label=f"threshold {tau_text(tau)}")
        ax.set_yscale("log")
        ax.set_title(f"step {step_short(ckpt)}", fontsize=10)
        ax.set_xlabel("excess correlation (draw 0)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("neurons per bin (log scale)")
    axes[0].legend(fontsize=7, title="other model")
    fig.suptitle(f"Distribution of excess correlation, neurons of {short_name(reference)}")
    n = grid.histograms[0]["n_neurons"] if grid.histograms else 0
    caption = (f"Histogram (60 bins of width {edges[1] - edges[0]:.3f}) of the excess "
               f"correlation (draw 0) of the {n} neurons of {reference}, one line per model "
               f"pair ({len(grid.others)}), one panel per checkpoint ({len(grid.checkpoints)}); "
               "zero-variance neurons sit at 0. Neurons right of a red line are universal at "
               f"that threshold. Source: {source}.")
    return finish(fig, f"excess_hist{suffix}", f"Excess correlation distribution, {reference}",
                  caption, source, {"bin_edges": edges.tolist(), "series": grid.histograms})


# ---------------------------------------------------------------------------- zoo

def heldout_loss_figure(zoo: dict, path, series, units: str, palette) -> Figure:
    """Held-out loss of each model at each saved checkpoint vs the unigram baseline."""
    fig = new_figure(7.5, 4.2)
    ax = fig.add_subplot()
    unigram = zoo.get("unigram_heldout_loss")
    for line in series:
        ax.plot(line["steps"], [np.nan if y is None else y for y in line["heldout_loss"]],
                marker="o", color=palette(line["model"]), label=str(line["model"]))
    if unigram is not None:
        ax.axhline(unigram, color="0.3", ls="--", label="unigram baseline")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"held-out loss ({units})")
    ax.set_title("Held-out loss of the zoo's models vs a unigram baseline")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    n_steps = len(series[0]["steps"]) if series else 0
    caption = (f"Cross-entropy on held-out text of each of the {len(zoo['models'])} models at "
               f"each saved checkpoint ({n_steps}), against the unigram baseline (dashed); "
               "lower is better.")
    return finish(fig, "heldout_loss", "Held-out loss of the models", caption, str(path),
                  {"series": series, "unigram": unigram})


# ---------------------------------------------------------------------------- convergence

def _log2_offsets(n_lines: int, spread: float = 0.12) -> list[float]:
    """Factors that shift each line's points sideways on a log2 axis (2^-0.06 .. 2^0.06),
    so equal values of two pairs stay visible."""
    if n_lines <= 1:
        return [1.0]
    return [2.0 ** ((i / (n_lines - 1) - 0.5) * spread) for i in range(n_lines)]


def convergence_figure(series: dict, suffix: str, palette) -> Figure:
    """% universal against the tokens correlated (log2 axis), a panel per (checkpoint,
    threshold), a line per model pair in the model's colour."""
    from matplotlib.lines import Line2D
    ckpts, taus, others = series["checkpoints"], series["thresholds"], series["others"]
    fig = new_figure(max(7.0, 3.6 * len(taus) + 1), 2.9 * len(ckpts) + 1.2)
    axes = fig.subplots(len(ckpts), len(taus), squeeze=False, sharex=True)
    offsets = dict(zip(others, _log2_offsets(len(others))))
    counts = sorted({n for line in series["lines"] for n in line["n_tokens"]})
    for line in series["lines"]:
        ax = axes[ckpts.index(line["checkpoint"]), taus.index(line["threshold"])]
        x = np.asarray(line["n_tokens"], float) * offsets[line["other"]]
        y = np.asarray(line["pct_universal"], float)
        spread = [0.0 if s is None else s for s in line["pct_std_over_draws"]]
        ax.errorbar(x, y, yerr=_clipped_at_zero(y, spread), color=palette(line["other"]),
                    marker="o", ms=4, lw=1.3, capsize=3)
    for i, ckpt in enumerate(ckpts):
        for j, tau in enumerate(taus):
            ax = axes[i, j]
            ax.set_xscale("log", base=2)
            ax.set_xticks(counts, [tokens_short(n) for n in counts], fontsize=7,
                          rotation=45 if len(counts) > 6 else 0)
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.set_title(f"tau = {tau_text(tau)}, step {step_short(ckpt)}", fontsize=9)
            if j == 0:
                ax.set_ylabel("universal neurons (%)", fontsize=8)
            if i == len(ckpts) - 1:
                ax.set_xlabel("tokens correlated (log2 scale)", fontsize=8)
    handles = [Line2D([], [], color=palette(o), marker="o", lw=1.3, label=short_name(o))
               for o in others]
    fig.legend(handles=handles, title="other model", fontsize=8, loc="outside lower center",
               ncols=min(len(handles), 5))
    reference = series["reference"]
    fig.suptitle(f"Universal neurons of {short_name(reference)} against the tokens correlated")
    n_total = max((line["n_tokens_total"] for line in series["lines"]), default=0)
    caption = (f"Percent of the neurons of {reference} universal (excess correlation above "
               "the threshold, baseline draw 0) when the correlations and the rotation "
               "baseline are computed on the first n tokens only, at doubling n up to all "
               f"{n_total} tokens (the last point: the run's own result); one line per "
               "model pair, one panel per threshold and checkpoint. A line that is still "
               "moving at the right edge says more tokens would change the answer. Error "
               "bars: std over baseline draws (none with one draw), clipped at 0. Points "
               "of different pairs are shifted sideways (by at most 2^0.06) so equal values "
               "stay visible. Beyond the paper: Gurnee et al. ran 100k .. 100M tokens as "
               "separate runs. Source: reduce/*.convergence.csv.")
    return finish(fig, f"convergence{suffix}",
                  f"Universal fraction against tokens, {reference}", caption,
                  "reduce/*.convergence.csv", series)
