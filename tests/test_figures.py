"""The report's figures as matplotlib draws them (the artists, not the PNG): no line
through a set that does not exist, no interval of a non-negative quantity below 0,
legends clear of titles and inside the figure, each model once per legend and in one
colour everywhere, equal values not hidden, one error-bar meaning per caption."""
from __future__ import annotations

import json

import matplotlib.colors as mcolors
import numpy as np
import pytest
from matplotlib.collections import LineCollection
from matplotlib.lines import Line2D

from ooc_universal.config import UniversalConfig
from ooc_universal.formats.convergence import (convergence_path, read_all_convergence,
                                               snapshot_rows, write_convergence)
from ooc_universal.kernels.convergence import snapshot_counts, summarize
from ooc_universal.report import figures, report, sections, views
from ooc_universal.report.data import Source, load_run
from ooc_universal.report.figures import Palette
from ooc_universal.report.text import short_name
from ooc_universal.rundir import seal
from ooc_universal.steps.persistence import persistence
from ooc_universal.steps.universal import universal
from tests.test_report import (CKPTS, D_MLP, N, N_LAYERS, OTHERS, TAUS, _arrays,
                               _write_ablation, _write_cards)
from tests.test_universal import write_reduced


def _write_convergence(run_dir):
    """Snapshots of each pair at each checkpoint; pair c's last checkpoint has one
    snapshot fewer (a shorter line, not a made-up point)."""
    rng = np.random.default_rng(9)
    for oi, other in enumerate(OTHERS):
        for ci, ck in enumerate(CKPTS):
            row, base = _arrays(oi, ci)
            rows = []
            counts = snapshot_counts(4096, 256)
            for n in counts[1:] if (oi, ci) == (1, 2) else counts:
                noise = rng.normal(0, 0.3 * 256 / n, size=row.size).astype(np.float32)
                pair = {"reference": "a", "other": other, "ref_label": f"a@{ck}",
                        "other_label": f"{other}@{ck}", "checkpoint": ck}
                rows += snapshot_rows(pair, n, 4096, summarize(row + noise, base, TAUS))
            write_convergence(convergence_path(run_dir, f"a@{ck}", f"{other}@{ck}"), rows,
                              {"step": "reduce"})


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """{figure id: (matplotlib figure, caption)} of a report of a hand-built run, plus
    the convergence figure, and the palette the report used."""
    rd = tmp_path_factory.mktemp("figs")
    for oi, other in enumerate(OTHERS):
        for ci, ck in enumerate(CKPTS):
            row, base = _arrays(oi, ci)
            red = write_reduced(rd, row, base, ref="a", other=other, step=ck,
                                n_layers_ref=N_LAYERS, d_mlp_ref=D_MLP,
                                n_layers_other=N_LAYERS, d_mlp_other=D_MLP,
                                zero_var=np.arange(N) == 5)
            seal(red, {"step": "reduce"})
    universal(rd, UniversalConfig(thresholds=list(TAUS)), progress=False)
    persistence(rd, progress=False)
    _write_ablation(rd)
    for made in ("ablation.json", "ablation.csv"):      # written by hand: vouch for them
        seal(rd / "ablate" / made, {"step": "ablate"})
    _write_cards(rd)
    seal(rd / "cards" / "cards.json", {"step": "cards"})
    _write_convergence(rd)
    captured = {}
    draw = figures.finish

    def keep(fig, fig_id, title, caption, source, data):
        captured[fig_id] = (fig, caption)
        return draw(fig, fig_id, title, caption, source, data)

    mp = pytest.MonkeyPatch()
    mp.setattr(figures, "finish", keep)
    try:
        data = json.loads(report(rd, progress=False)["data"].read_text())
        palette = Palette(views.model_names(load_run(rd)))
        section = sections.convergence_section(Source(read_all_convergence(rd)),
                                               sections.Context(palette))
    finally:
        mp.undo()
    assert section.status == "ok" and "convergence" in captured
    assert {"ablation_layers_t05", "persistence_layers_t04", "excess_hist"} <= set(captured)
    return captured, palette, data


def _extent(artist, renderer):
    return artist.get_window_extent(renderer)


def _legends(fig):
    return list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]


def _titles(fig):
    found = [ax.title for ax in fig.axes if ax.title.get_text()]
    if fig._suptitle is not None and fig._suptitle.get_text():
        found.append(fig._suptitle)
    return found


def test_legends_clear_of_titles_and_inside_the_figure(drawn):
    captured, _, _ = drawn
    for fid, (fig, _) in captured.items():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        page = fig.bbox
        for legend in _legends(fig):
            box = _extent(legend, renderer)
            assert box.x0 >= page.x0 - 1 and box.x1 <= page.x1 + 1, fid   # not off an edge
            assert box.y0 >= page.y0 - 1 and box.y1 <= page.y1 + 1, fid
            for title in _titles(fig):
                assert not box.overlaps(_extent(title, renderer)), (fid, title.get_text())


def test_each_legend_lists_each_entry_once(drawn):
    captured, _, _ = drawn
    for fid, (fig, _) in captured.items():
        for legend in _legends(fig):
            texts = [t.get_text() for t in legend.get_texts()]
            assert len(texts) == len(set(texts)), (fid, texts)


def _handle_colour(handle):
    if isinstance(handle, Line2D):
        return mcolors.to_hex(handle.get_color())
    face = handle.get_facecolor()
    if face is not None and mcolors.to_rgba(face)[3] > 0:
        return mcolors.to_hex(face)
    return mcolors.to_hex(handle.get_edgecolor())


def test_a_model_has_one_colour_in_every_figure(drawn):
    captured, palette, _ = drawn
    seen = {}
    for fid, (fig, _) in captured.items():
        for legend in _legends(fig):
            for text, handle in zip(legend.get_texts(), legend.legend_handles):
                name = text.get_text()
                if name in {short_name(o) for o in OTHERS}:
                    seen.setdefault(name, {})[fid] = _handle_colour(handle)
    for other in OTHERS:
        figs = seen[short_name(other)]
        assert len(figs) >= 4, figs       # excess, ablation x2+, by-pair persistence, conv.
        assert set(figs.values()) == {palette(other)}, figs
    assert palette("b") != palette("c")


def _data_lines(ax):
    """The plotted series of an axes: lines with a line style and more than one point."""
    return [line for line in ax.get_lines()
            if line.get_linestyle() not in ("None", "", " ") and len(line.get_xdata()) > 1]


def test_no_line_runs_through_an_empty_set(drawn):
    """Where a cross marks an empty set, no series has a point: the line has a gap."""
    captured, _, data = drawn
    n_crosses = 0
    for fid, (fig, _) in captured.items():
        if not fid.startswith("ablation"):
            continue
        for ax in fig.axes:
            crosses = [x for line in ax.get_lines() if line.get_marker() == "x"
                       for x in line.get_xdata()]
            n_crosses += len(crosses)
            for line in _data_lines(ax):
                x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
                for cx in crosses:
                    hit = np.isclose(x, cx)
                    assert not np.any(np.isfinite(y[hit])), (fid, cx)
    assert n_crosses > 0     # the fixture has empty sets: the test checked something
    series = data["figures"]["ablation_layers_t06"]["data"]["series"]
    assert any(n == 0 for s in series for n in s["n_neurons"])


def _error_bar_lows(ax):
    lows = []
    for coll in ax.collections:
        if isinstance(coll, LineCollection):
            for seg in coll.get_segments():
                if len(seg) and np.ptp(seg[:, 0]) == 0:      # vertical: an error bar
                    lows.append(float(np.min(seg[:, 1])))
    return lows


def test_intervals_of_non_negative_quantities_stay_at_or_above_zero(drawn):
    captured, _, _ = drawn
    checked = 0
    for fid, (fig, caption) in captured.items():
        for ax in fig.axes:
            title = ax.get_title()
            non_negative = (fid.startswith(("universal_percent", "convergence"))
                            or (fid.startswith("ablation") and "KL" in title))
            if not non_negative:
                continue
            lows = _error_bar_lows(ax)
            checked += len(lows)
            assert all(low >= -1e-12 for low in lows), (fid, title, min(lows))
            assert "clipped at 0" in caption, fid
    assert checked > 0


def test_one_error_bar_meaning_per_caption(drawn):
    captured, _, _ = drawn
    for fid, (fig, caption) in captured.items():
        has_bars = any(_error_bar_lows(ax) for ax in fig.axes)
        mentions = caption.lower().count("error bars:")
        assert mentions == (1 if has_bars else mentions), (fid, caption)
        if has_bars:
            assert mentions == 1, fid


def test_equal_values_of_two_models_do_not_hide_each_other(drawn):
    """Series of different models are drawn at different x, so a point of one never sits
    exactly on a point of another."""
    captured, _, _ = drawn
    for fid, (fig, _) in captured.items():
        if not fid.startswith(("ablation", "convergence")):
            continue
        for ax in fig.axes:
            xs = [tuple(np.round(line.get_xdata(), 9)) for line in _data_lines(ax)]
            assert len(xs) == len(set(xs)), fid


def test_persistence_is_a_fraction_in_every_figure(drawn):
    captured, _, _ = drawn
    for fid, (fig, caption) in captured.items():
        if not fid.startswith("persistence"):
            continue
        assert "fraction" in caption and "%" not in caption.replace("60% = 0.6", ""), fid
        for ax in fig.axes:
            if ax.get_ylabel():
                assert "p_persist" in ax.get_ylabel() and "%" not in ax.get_ylabel(), fid
            assert ax.get_ylim()[1] <= 1.2, fid


def test_convergence_figure_plots_the_files(drawn):
    captured, palette, _ = drawn
    fig, caption = captured["convergence"]
    assert "log2" in fig.axes[-1].get_xlabel() and fig.axes[0].get_xscale() == "log"
    lines = [line for ax in fig.axes for line in _data_lines(ax)]
    assert len(lines) == len(CKPTS) * len(TAUS) * len(OTHERS)
    short = [line for line in lines if len(line.get_xdata()) == len(snapshot_counts(4096, 256)) - 1]
    assert len(short) == len(TAUS)                  # pair c at the last checkpoint
    assert {mcolors.to_hex(line.get_color()) for line in short} == {palette("c")}
