"""Views: the records of each step output indexed the way the report walks them
(one view per reference model, per (definition, reference), per (reference, mode)), and
the names and thresholds the whole report shares. Rows are keyed by their label (the
other model, or the aggregation's name: "mean over pairs", ...) and their layer (None
for the whole model). No formatting, no matplotlib.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ooc_universal.formats.tables import (AGGREGATE_LABELS, MEAN_OVER_PAIRS, PAIR,
                                          PAIR_AVERAGED, POOLED_OVER_PAIRS, SCOPE_ALL,
                                          SCOPE_LAYER, aggregate_label)
from ooc_universal.report.text import main_threshold, slug

SUMMARY_NAMES = set(AGGREGATE_LABELS.values())   # the aggregation rows' labels
PAIR_MEAN = AGGREGATE_LABELS[MEAN_OVER_PAIRS]
SET_ORDER = ("universal", "control", "all-non-universal")   # ablation sets, as shown


def _rows(run) -> list:
    return run.table1.content.rows if run.table1.content else []


def model_names(run) -> set:
    """Every model any source names, the references and the zoo's models included, so
    the palette gives each model one colour in every figure; the aggregations over
    pairs are not models and get none."""
    names = set()
    for row in _rows(run):
        names |= {row["reference"], row["other"]}
    persistence = run.persistence.content
    for row in (persistence.rows if persistence else []):
        names |= {row["reference"], row["other"]}
    ablation = run.ablation.content
    for row in (ablation.rows if ablation else []):
        names |= {row["reference"], row["other"]}
    if run.neurons.table is not None:
        for column in ("reference", "other"):
            names |= set(run.neurons.table[column].dropna().astype(str).unique())
    cards = run.cards.content
    for card in (cards.cards if cards else []):
        names |= {card["reference"]} | {m["other"] for m in card["matches"]}
    names |= {str(m["name"]) for m in (run.zoo.content or {}).get("models", [])}
    convergence = getattr(run, "convergence", None)
    if convergence is not None and convergence.content is not None:
        for column in ("reference", "other"):
            names |= set(convergence.content[column].dropna().astype(str).unique())
    return {str(n) for n in names if n is not None} - SUMMARY_NAMES - {"pair-averaged"}


def report_thresholds(run) -> list[float]:
    """The thresholds of Table 1, else those of RUN/config.toml, else the paper's 0.5."""
    taus = {float(r["threshold"]) for r in _rows(run)}
    if taus:
        return sorted(taus)
    config = run.config or {}
    listed = config.get("thresholds") or (config.get("universal") or {}).get("thresholds")
    return sorted(float(t) for t in (listed or [0.5]))


def row_label(row) -> str:
    """A table row's name in the report: the other model, or its aggregation."""
    return aggregate_label(row["aggregation"], row["other"])


# ---------------------------------------------------------------------------- Table 1


@dataclass
class Table1View:
    """One reference model's rows of universal/table1.json (the draw-0 view)."""
    reference: str
    suffix: str                    # id suffix: "" with one reference, else "_<slug>"
    rows: list
    thresholds: list
    checkpoints: list
    summary: str                   # the label of the summary row (mean over pairs, ...)
    others: list                   # the other models with rows of their own
    n_pairs: int
    n_layers: int
    d_mlp: int
    by_key: dict = field(repr=False)   # (label, threshold, checkpoint, layer|None) -> row

    @property
    def n_neurons(self) -> int:
        return self.n_layers * self.d_mlp

    def row(self, label, threshold, checkpoint, layer=None):
        return self.by_key.get((label, threshold, checkpoint, layer))

    def entry(self, threshold, checkpoint, layer=None):
        """The summary row of one cell (whole model, or one layer)."""
        return self.row(self.summary, threshold, checkpoint, layer)

    def present_keys(self) -> list:
        """(threshold, checkpoint) of every summary row, thresholds first."""
        return [(t, c) for t in self.thresholds for c in self.checkpoints
                if self.entry(t, c) is not None]

    @property
    def n_draws(self) -> int:
        return max((r["n_draws"] for r in self.rows), default=0)


def table1_views(table1) -> list[Table1View]:
    """One view per reference model of a formats.tables.Table1File."""
    references = sorted({r["reference"] for r in table1.rows})
    views = []
    for ref in references:
        mine = [r for r in table1.rows if r["reference"] == ref]
        kinds = {r["aggregation"] for r in mine}
        summary = AGGREGATE_LABELS[PAIR_AVERAGED if PAIR_AVERAGED in kinds else MEAN_OVER_PAIRS]
        top = [r for r in mine if row_label(r) == summary and r["scope"] == SCOPE_ALL]
        views.append(Table1View(
            reference=ref, suffix="" if len(references) == 1 else f"_{slug(ref)}", rows=mine,
            thresholds=sorted({float(r["threshold"]) for r in mine}),
            checkpoints=sorted({int(r["checkpoint"]) for r in mine}), summary=summary,
            others=sorted({r["other"] for r in mine if r["aggregation"] == PAIR}),
            n_pairs=max(r["n_pairs"] for r in top),
            n_layers=len({r["layer"] for r in mine if r["scope"] == SCOPE_LAYER}),
            d_mlp=int(next(r["n_neurons"] for r in mine if r["scope"] == SCOPE_LAYER)),
            by_key={(row_label(r), float(r["threshold"]), int(r["checkpoint"]), r["layer"]): r
                    for r in mine}))
    return views


# ---------------------------------------------------------------------------- persistence


@dataclass
class PersistenceView:
    """The persistence rows of one (definition, reference)."""
    definition: str
    reference: str
    suffix: str
    rows: list
    thresholds: list
    intervals: list                # (t1, t2), shortest first
    pairs: list                    # other models with per-pair rows
    summaries: list                # labels of the aggregation rows present
    layers: list
    by_key: dict = field(repr=False)   # (label, threshold, t1, t2, layer|None) -> row

    def row(self, label, threshold, interval, layer=None):
        return self.by_key.get((label, threshold, interval[0], interval[1], layer))

    @property
    def layer_groups(self) -> list:
        """Whose rows the by-layer table and figure show: the summaries, else one pair."""
        return self.summaries or self.pairs[:1]


def persistence_views(persistence) -> list[PersistenceView]:
    """One view per (definition, reference) of a formats.tables.PersistenceFile."""
    rows = persistence.rows
    keys = sorted({(r["definition"], r["reference"]) for r in rows})
    views = []
    for definition, ref in keys:
        mine = [r for r in rows if (r["definition"], r["reference"]) == (definition, ref)]
        kinds = {r["aggregation"] for r in mine}
        views.append(PersistenceView(
            definition=definition, reference=ref,
            suffix="" if len(keys) == 1 else f"_{slug(ref)}_{slug(definition)}", rows=mine,
            thresholds=sorted({float(r["threshold"]) for r in mine}),
            intervals=sorted({(int(r["t1"]), int(r["t2"])) for r in mine},
                             key=lambda t: (t[1] - t[0], t)),
            pairs=sorted({r["other"] for r in mine if r["aggregation"] == PAIR}),
            summaries=[AGGREGATE_LABELS[k] for k in (PAIR_AVERAGED, MEAN_OVER_PAIRS,
                                                     POOLED_OVER_PAIRS) if k in kinds],
            layers=sorted({int(r["layer"]) for r in mine if r["scope"] == SCOPE_LAYER}),
            by_key={(row_label(r), float(r["threshold"]), int(r["t1"]), int(r["t2"]),
                     r["layer"]): r for r in mine}))
    return views


# ---------------------------------------------------------------------------- ablation


def set_rank(name) -> int:
    return SET_ORDER.index(name) if name in SET_ORDER else len(SET_ORDER)


@dataclass
class AblationView:
    """The ablation rows of one (reference, ablation_mode); rows in the layout of
    formats/ablation.py (scope, integer layer, aggregation)."""
    reference: str
    mode: str                      # the rows' ablation_mode: zero | mean
    suffix: str
    rows: list
    thresholds: list

    @property
    def main_threshold(self):
        return main_threshold(self.thresholds)

    def all_layer_rows(self, tau=None) -> list:
        """The sets over every layer at once (scope "all")."""
        return [r for r in self.rows if r["scope"] == SCOPE_ALL
                and (tau is None or float(r["threshold"]) == tau)]

    def layer_rows(self, tau) -> list:
        """Each layer's sets alone (scope "layer", an integer layer) at one threshold."""
        return [r for r in self.rows if r["scope"] == SCOPE_LAYER
                and float(r["threshold"]) == tau]


def _ablation_key(row) -> tuple:
    return str(row["reference"]), str(row["ablation_mode"])


def ablation_views(ablation) -> list[AblationView]:
    """One view per (reference, mode) of a formats.ablation.AblationFile."""
    rows = list(ablation.rows)
    keys = sorted({_ablation_key(r) for r in rows})
    views = []
    for ref, mode in keys:
        mine = [r for r in rows if _ablation_key(r) == (ref, mode)]
        views.append(AblationView(ref, mode, "" if len(keys) == 1 else f"_{slug(ref)}_{mode}",
                                  mine, sorted({float(r["threshold"]) for r in mine})))
    return views


# ---------------------------------------------------------------------------- neurons


def neuron_references(table) -> list:
    return sorted(table["reference"].astype(str).unique())


def neurons_of(table, reference: str):
    return table[table["reference"].astype(str) == reference]


# ---------------------------------------------------------------------------- cards


@dataclass
class CardsView:
    """The cards of one (reference, checkpoint), best first."""
    reference: str
    checkpoint: int
    suffix: str
    cards: list
    others: list                   # the other models the cards have matches in
    thresholds: list

    @property
    def main_threshold(self):
        return main_threshold(self.thresholds)


def _card_order(card) -> tuple:
    """Best rank over the pairs that chose it, then the larger mean excess."""
    best = min(s["rank"] for s in card["selected_by"])
    mean = sum(m["excess"] for m in card["matches"]) / max(1, len(card["matches"]))
    return best, -mean, card["flat_index"]


def cards_views(cards) -> list[CardsView]:
    """One view per (reference, checkpoint) of a formats.cards.CardsFile, the latest
    checkpoint first (the trained model is what a reader looks at first)."""
    keys = sorted({(c["reference"], int(c["checkpoint"])) for c in cards.cards},
                  key=lambda k: (k[0], -k[1]))
    views = []
    for ref, ckpt in keys:
        mine = sorted((c for c in cards.cards
                       if (c["reference"], int(c["checkpoint"])) == (ref, ckpt)), key=_card_order)
        views.append(CardsView(ref, ckpt, f"_{slug(ref)}_{ckpt}", mine,
                               sorted({m["other"] for c in mine for m in c["matches"]}),
                               cards.thresholds))
    return views


# ---------------------------------------------------------------------------- zoo


def zoo_steps(zoo: dict) -> list[int]:
    return sorted({int(s) for m in zoo["models"] for s in m.get("checkpoints", {})})


def zoo_units(zoo: dict) -> str:
    return zoo.get("loss_units", "nats per byte")


def heldout_loss(model: dict, step: int):
    return (model.get("checkpoints", {}).get(str(step)) or {}).get("heldout_loss")
