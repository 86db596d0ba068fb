"""The report's sections: for each step output, the explaining text, its tables
(tables.py) and its figures (series.py shapes what figures.py draws), or a line saying
why it is not shown."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ooc_universal.report import figures, series, tables, views
from ooc_universal.report.document import Figure, Section
from ooc_universal.report.figures import Palette
from ooc_universal.report.text import slug


@dataclass
class Context:
    """What every section builder shares: the model colours and a tick per figure."""
    palette: Palette
    on_figure: Callable[[], None] = lambda: None

    def drawn(self, figure: Figure) -> Figure:
        self.on_figure()
        return figure


def _not_run(section: Section, what: str, path: str, command: str, reason: str) -> Section:
    """A section whose source is missing (the step has not run) or unreadable (the
    reason is the format reader's one line: the file, the problem, the fix)."""
    if reason == "missing":
        return section.set_status("not run", f"Not run: {path} is missing, so this run has "
                                             f"no {what}. Run `{command}` to produce it.")
    return section.set_status("unreadable", f"Not shown: {reason}.")


# ---------------------------------------------------------------------------- Table 1

TABLE1_INTRO = (
    "A reference neuron is universal with respect to another model when its excess "
    "correlation (its best Pearson correlation with any neuron of the other model, minus "
    "the same maximum against a randomly rotated copy of that model, baseline draw 0) "
    "exceeds the threshold tau. Definition: ")


def table1_section(source, ctx: Context) -> Section:
    section = Section("table1", "Table 1: universal neurons by threshold and checkpoint")
    if source.content is None:
        return _not_run(section, "universal neurons (Table 1)", "universal/table1.json",
                        "ooc-universal universal --run-dir RUN", source.reason)
    section.blocks.append(TABLE1_INTRO + source.content.definition + ".")
    for view in views.table1_views(source.content):
        section.blocks += [
            f"Reference model: {view.reference} ({view.n_neurons} MLP neurons, "
            f"{view.n_layers} layers x {view.d_mlp}; {view.n_pairs} model "
            "pair(s)).",
            tables.table1_table(view), tables.table1_pairs_table(view),
            tables.table1_layers_table(view),
            ctx.drawn(figures.universal_percent_figure(
                view, series.universal_percent_series(view)))]
    return section


def layer_counts_section(source, ctx: Context) -> Section:
    section = Section("layer_counts",
                      "Beyond the paper: universal neurons per layer over training")
    if source.content is None:
        return _not_run(section, "universal neurons (per-layer counts)",
                        "universal/table1.json", "ooc-universal universal --run-dir RUN",
                        source.reason)
    for view in views.table1_views(source.content):
        section.blocks.append(ctx.drawn(figures.layer_counts_figure(
            view, series.layer_count_series(view))))
    return section


# ---------------------------------------------------------------------------- persistence

PERSISTENCE_INTRO = (
    "p_persist = P(universal at t2 | universal at t1) = |U(t1) & U(t2)| / |U(t1)|, the "
    "fraction (0 to 1, in tables and figures alike) of the neurons universal at the earlier "
    "checkpoint that are still universal at the later one, per model pair; undefined when "
    "U(t1) is empty (never shown as 0). 'mean over pairs' averages the defined per-pair "
    "values; 'pooled over pairs' divides the summed counts.")


def persistence_section(source, ctx: Context) -> Section:
    section = Section("persistence", "Persistence of universal neurons across checkpoints")
    if source.content is None:
        return _not_run(section, "persistence analysis", "persistence/persistence.json",
                        "ooc-universal persistence --run-dir RUN", source.reason)
    section.blocks.append(PERSISTENCE_INTRO)
    by_reference = views.persistence_views(source.content)
    if not by_reference:
        section.blocks.append("persistence.json holds no rows (no set at two checkpoints).")
    for view in by_reference:
        section.blocks.append(tables.persistence_table(view))
        section.blocks += [tables.persistence_layer_table(view, tau)
                           for tau in view.thresholds]
        for tau in view.thresholds:
            section.blocks += _persistence_figures(view, tau, ctx)
    return section


def _persistence_figures(view, tau, ctx: Context) -> list:
    drawn = [figures.persistence_pairs_figure(view, tau,
                                              series.persistence_pair_series(view, tau)),
             figures.persistence_layers_figure(view, tau,
                                               series.persistence_layer_series(view, tau))]
    if view.pairs:
        drawn.append(figures.persistence_layers_by_pair_figure(
            view, tau, series.persistence_layer_pair_series(view, tau), ctx.palette))
    return [ctx.drawn(f) for f in drawn]


# ---------------------------------------------------------------------------- ablation

def _ablation_intro(ablation) -> str:
    config, inputs = ablation.config or {}, ablation.inputs or {}
    mode = config.get("mode", "zero")
    return (f"Ablation ({mode}-ablation: each neuron's post-GELU activation set to "
            + ("its mean" if config.get("mode") == "mean" else "0") + ") on "
            f"{inputs.get('n_eval_positions', '?')} held-out token positions "
            f"({inputs.get('n_eval_windows', '?')} windows). KL = KL(P_original || Q_ablated) "
            "in nats per position; delta loss = CE(ablated) - CE(original) in nats per token. "
            f"Controls: {config.get('control_draws', '?')} random draw(s) of non-universal "
            "neurons with the universal set's count in every layer; a control value is the "
            "mean over draws. SE: standard error over windows; CI: 95% t-interval over "
            "control draws.")


def ablation_section(source, ctx: Context) -> Section:
    section = Section("ablation", "Ablation: KL divergence and loss increase")
    if source.content is None:
        return _not_run(section, "ablation results", "ablate/ablation.json",
                        "ooc-universal ablate --run-dir RUN", source.reason)
    section.blocks.append(_ablation_intro(source.content))
    by_reference = views.ablation_views(source.content)
    if not by_reference:
        section.blocks.append("ablation.json holds no rows.")
    for view in by_reference:
        section.blocks += _ablation_blocks(view, ctx)
    return section


def _ablation_blocks(view, ctx: Context) -> list:
    blocks = [tables.ablation_table(view)]
    blocks += [ctx.drawn(figures.ablation_figure(
        view, tau, series.ablation_checkpoint_lines(view, tau), ctx.palette))
        for tau in view.thresholds]
    for tau in view.thresholds:
        rows = view.layer_rows(tau)
        if rows:
            blocks.append(ctx.drawn(figures.ablation_layers_figure(
                view, tau, series.ablation_layer_lines(rows), ctx.palette)))
    main_rows = view.layer_rows(view.main_threshold)
    if main_rows:
        blocks.append(tables.ablation_layer_table(view, view.main_threshold, main_rows))
    else:
        blocks.append("No layer-by-layer ablation in ablation.json (run ablate with "
                      "--layerwise).")
    return blocks


# ---------------------------------------------------------------------------- neurons

def correlations_section(neurons, thresholds, ctx: Context) -> Section:
    section = Section("correlations",
                      "Beyond the paper: correlation against the rotation baseline")
    if neurons.table is None:
        return section.set_status(
            "not run", "Not run: no per-neuron statistics (universal/neurons.parquet, "
                       "universal/neurons.csv or reduce/*.h5). Run `ooc-universal reduce` "
                       "and `ooc-universal universal`.")
    thresholds = list(thresholds) or [0.5]
    references = views.neuron_references(neurons.table)
    for ref in references:
        suffix = "" if len(references) == 1 else f"_{slug(ref)}"
        mine = views.neurons_of(neurons.table, ref)
        section.blocks += [
            ctx.drawn(figures.scatter_figure(ref, suffix, series.scatter_grid(mine),
                                             neurons.source, thresholds)),
            ctx.drawn(figures.excess_figure(ref, suffix, series.excess_grid(mine),
                                            neurons.source, thresholds, ctx.palette))]
    return section


# ---------------------------------------------------------------------------- cards

def _cards_intro(cards) -> str:
    config = cards.config or {}
    return (f"For each model pair, the top {config.get('top_n', '?')} neurons of the "
            "reference by excess correlation (draw 0) get a card; a neuron chosen by "
            "several pairs has one card. For each other model it shows the matched neuron "
            "(its most correlated neuron, from the reduce file) and the correlation. The "
            "vocabulary columns describe the neuron's direct effect on the logits, "
            "W_out[n]·W_U with the final norm's gain folded in (as TransformerLens's "
            "processed weights, which Gurnee et al. 2024 use): its skew and plain "
            "kurtosis over the vocabulary, and the tokens it promotes and suppresses most. "
            f"Role: prediction (kurtosis > {config.get('kurtosis_cut', 10):g}, skew > 0) or "
            "suppression (kurtosis above the cut, skew < 0), as Gurnee et al. name them.")


def cards_section(source, ctx: Context) -> Section:
    section = Section("cards", "Beyond the paper: neuron cards of the top universal neurons")
    if source.content is None:
        return _not_run(section, "neuron cards", "cards/cards.json",
                        "ooc-universal cards --run-dir RUN", source.reason)
    section.blocks.append(_cards_intro(source.content))
    notes = {c.get("contexts_note") for c in source.content.cards if c.get("contexts_note")}
    if notes:
        section.blocks.append("Contexts (where each neuron fires most): "
                              + "; ".join(sorted(notes)) + ".")
    by_checkpoint = views.cards_views(source.content)
    if not by_checkpoint:
        section.blocks.append("cards.json holds no cards.")
    section.blocks += [tables.cards_table(view) for view in by_checkpoint]
    return section


# ---------------------------------------------------------------------------- zoo

def zoo_section(path, source, ctx: Context) -> Section:
    section = Section("zoo", "Beyond the paper: the models' held-out loss")
    if source.reason == "missing":
        return section.set_status(
            "not available", "Not available: " + (f"{path} does not exist" if path else
                                                  "no zoo.json given")
            + ". Pass --zoo-json PATH (or set zoo_json in RUN/config.toml) to show the "
              "held-out loss of a zoo trained with `ooc-universal zoo train`.")
    if source.content is None:
        return section.set_status("unreadable", f"Not shown: {source.reason}.")
    zoo = source.content
    section.blocks += [
        tables.zoo_summary(zoo, path), tables.zoo_table(zoo, path),
        ctx.drawn(figures.heldout_loss_figure(zoo, path, series.zoo_loss_series(zoo),
                                              views.zoo_units(zoo), ctx.palette))]
    return section


# ---------------------------------------------------------------------------- convergence

CONVERGENCE_INTRO = (
    "Does the token count suffice? The reduce keeps mergeable co-moments, so it can "
    "finalize a snapshot of its running accumulators at doubling token counts in its one "
    "pass: the row max correlation, the rotation baseline and so the universal fraction "
    "of the first n tokens. Where the lines have flattened by the last point, more tokens "
    "would not change the sets much; where they still move, the run's n is too small "
    "for that threshold.")


def convergence_section(source, ctx: Context) -> Section:
    """The universal fraction against the tokens correlated (reduce/*.convergence.csv,
    formats/convergence.py); `source.content` is read_all_convergence()'s DataFrame."""
    section = Section("convergence", "Beyond the paper: universal fraction against tokens")
    if source.content is None:
        if source.reason == "missing":
            return section.set_status(
                "not run", "Not run: no reduce/*.convergence.csv, so this run has no "
                           "token-count convergence. Run `ooc-universal reduce` (it records "
                           "the snapshots) to produce it.")
        return section.set_status("unreadable", f"Not shown: {source.reason}.")
    section.blocks.append(CONVERGENCE_INTRO)
    references = series.convergence_references(source.content)
    for ref in references:
        suffix = "" if len(references) == 1 else f"_{slug(ref)}"
        section.blocks.append(ctx.drawn(figures.convergence_figure(
            series.convergence_series(source.content, ref), suffix, ctx.palette)))
    return section
