"""Views: the records of each step output indexed the way the report walks them
(one view per reference model, per (definition, reference), per (reference, mode)), and
the names and thresholds the whole report shares. No formatting, no matplotlib.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ooc_universal.report.text import main_threshold, slug

PAIR_MEAN = "mean over pairs"      # the summary rows of table1.json and persistence.json
PAIR_POOLED = "pooled over pairs"
SUMMARY_NAMES = {PAIR_MEAN, PAIR_POOLED, "pair-averaged"}
SET_ORDER = ("universal", "control", "all-non-universal")   # ablation sets, as shown


def _entries(run) -> list:
    return run.table1.content.entries if run.table1.content else []


def model_names(run) -> set:
    """Every model any source names, the references and the zoo's models included, so
    the palette gives each model one colour in every figure; the summaries over pairs
    are not models and get none."""
    names = set()
    for entry in _entries(run):
        names |= {entry["reference"]} | {p["other"] for p in entry["pairs"]}
    persistence = run.persistence.content
    for row in (persistence.rows if persistence else []):
        names |= {row["reference"], row["other"]}
    ablation = run.ablation.content
    for row in (ablation.rows if ablation else []):
        names |= {str(row["reference"]), str(row["other"])}
    if run.neurons.table is not None:
        for column in ("reference", "other"):
            names |= set(run.neurons.table[column].astype(str).unique())
    names |= {str(m["name"]) for m in (run.zoo.content or {}).get("models", [])}
    return names - SUMMARY_NAMES


def report_thresholds(run) -> list[float]:
    """The thresholds of Table 1, else those of RUN/config.toml, else the paper's 0.5."""
    taus = {float(e["threshold"]) for e in _entries(run)}
    if taus:
        return sorted(taus)
    config = run.config or {}
    listed = config.get("thresholds") or (config.get("universal") or {}).get("thresholds")
    return sorted(float(t) for t in (listed or [0.5]))


# ---------------------------------------------------------------------------- Table 1


@dataclass

class Table1View:
    """One reference model's entries of universal/table1.json."""
    reference: str
    suffix: str                    # id suffix: "" with one reference, else "_<slug>"
    entries: list
    thresholds: list
    checkpoints: list
    by_key: dict                   # (threshold, checkpoint) -> entry
    summary: str                   # the label of the pair-summary row
    n_pairs: int

    @property
    def first(self) -> dict:
        return self.entries[0]

    def entry(self, threshold, checkpoint):
        return self.by_key.get((threshold, checkpoint))

    def present_keys(self) -> list:
        """(threshold, checkpoint) of every entry, thresholds first."""
        return [(t, c) for t in self.thresholds for c in self.checkpoints
                if (t, c) in self.by_key]


def table1_views(table1) -> list[Table1View]:
    """One view per reference model of a formats.tables.Table1File."""
    entries = table1.entries
    summary = PAIR_MEAN if table1.definition == "per-pair" else "pair-averaged"
    references = sorted({e["reference"] for e in entries})
    views = []
    for ref in references:
        mine = [e for e in entries if e["reference"] == ref]
        views.append(Table1View(
            reference=ref, suffix="" if len(references) == 1 else f"_{slug(ref)}",
            entries=mine, thresholds=sorted({float(e["threshold"]) for e in mine}),
            checkpoints=sorted({int(e["checkpoint"]) for e in mine}),
            by_key={(float(e["threshold"]), int(e["checkpoint"])): e for e in mine},
            summary=summary, n_pairs=max(e["n_pairs"] for e in mine)))
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
    summaries: list                # PAIR_MEAN / PAIR_POOLED where present
    layers: list
    by_key: dict = field(repr=False)   # (other, threshold, t1, t2, layer text) -> row

    def row(self, other, threshold, interval, layer="all"):
        return self.by_key.get((other, threshold, interval[0], interval[1], str(layer)))

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
        views.append(PersistenceView(
            definition=definition, reference=ref,
            suffix="" if len(keys) == 1 else f"_{slug(ref)}_{slug(definition)}", rows=mine,
            thresholds=sorted({float(r["threshold"]) for r in mine}),
            intervals=sorted({(int(r["t1"]), int(r["t2"])) for r in mine},
                             key=lambda t: (t[1] - t[0], t)),
            pairs=sorted({r["other"] for r in mine if r["kind"] == "pair"}),
            summaries=[k for k in (PAIR_MEAN, PAIR_POOLED)
                       if any(r["other"] == k for r in mine)],
            layers=sorted({int(r["layer"]) for r in mine if str(r["layer"]) != "all"}),
            by_key={(r["other"], float(r["threshold"]), int(r["t1"]), int(r["t2"]),
                     str(r["layer"])): r for r in mine}))
    return views


# ---------------------------------------------------------------------------- ablation


def set_rank(name) -> int:
    return SET_ORDER.index(name) if name in SET_ORDER else len(SET_ORDER)


@dataclass

class AblationView:
    """The ablation rows of one (reference, mode)."""
    reference: str
    mode: str
    suffix: str
    rows: list
    thresholds: list

    @property
    def main_threshold(self):
        return main_threshold(self.thresholds)

    def all_layer_rows(self, tau=None) -> list:
        return [r for r in self.rows if str(r["layer"]) == "all"
                and (tau is None or float(r["threshold"]) == tau)]

    def layer_rows(self, tau) -> list:
        return [r for r in self.rows if str(r["layer"]) != "all"
                and float(r["threshold"]) == tau]


def _ablation_key(row) -> tuple:
    return str(row["reference"]), str(row.get("mode", "zero"))


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


# ---------------------------------------------------------------------------- zoo


def zoo_steps(zoo: dict) -> list[int]:
    return sorted({int(s) for m in zoo["models"] for s in m.get("checkpoints", {})})


def zoo_units(zoo: dict) -> str:
    return zoo.get("loss_units", "nats per byte")


def heldout_loss(model: dict, step: int):
    return (model.get("checkpoints", {}).get(str(step)) or {}).get("heldout_loss")
