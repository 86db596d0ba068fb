"""Tables: the views (views.py) as the tables the report shows, text cells plus the
source numbers behind every cell.

Numbers are never recomputed: each cell is a source value rounded as its table states
(Table 1 and percentages: 2 decimals; persistence p_persist, a fraction: 3 decimals;
ablation: 4 significant digits; losses: 4 decimals). A record carries the source row's
own column names (formats/tables.py).
"""
from __future__ import annotations

from ooc_universal.formats.ablation import SUMMARY_COLUMNS
from ooc_universal.formats.tables import MEAN_OVER_PAIRS, SPREAD_COLUMNS
from ooc_universal.report.document import Table
from ooc_universal.report.text import (MISSING, checkpoint_number, ci_text, fixed,
                                       interval_text, sig4, spread_text, step_text, tau_id,
                                       tau_text)
from ooc_universal.report.views import (AblationView, PersistenceView, Table1View,
                                        heldout_loss, row_label, set_rank, zoo_steps,
                                        zoo_units)

EMPTY_SET_NOTE = ("A row with 0 neurons is an empty set (no universal neuron there): nothing "
                  "was ablated, so it has no effect to show: its cells are '–' (the JSON "
                  "keeps the files' zeros) and the figures leave it out.")
ABLATION_FIELDS = tuple(SUMMARY_COLUMNS)   # formats/ablation.py's summary columns
PERSISTENCE_FIELDS = ("definition", "reference", "aggregation", "other", "threshold", "t1",
                      "t2", "scope", "layer", "n_t1", "n_t2", "n_both", "p_persist",
                      "undefined", "n_emerged", "n_pairs")
TABLE1_FIELDS = ("reference", "aggregation", "other", "threshold", "checkpoint", "scope",
                 "layer", "n_universal", "n_neurons", "pct_universal", "n_pairs")
ZOO_RECIPE_KEYS = ("n_layer", "n_embd", "d_mlp", "context", "batch_size", "steps", "lr",
                   "corpus")


# ---------------------------------------------------------------------------- Table 1


def table1_record(row: dict, spread: bool = False) -> dict:
    """The source numbers behind a Table 1 cell (table1.json's row, its names)."""
    fields = TABLE1_FIELDS + (tuple(SPREAD_COLUMNS) if spread else ())
    return {k: row.get(k) for k in fields}


def table1_table(view: Table1View) -> Table:
    """The paper's Table 1: percent universal by threshold (rows) and checkpoint."""
    rows, records = [], []
    for tau in view.thresholds:
        row = [tau_text(tau)]
        for ckpt in view.checkpoints:
            entry = view.entry(tau, ckpt)
            row.append(fixed(entry["pct_universal"], 2) if entry else MISSING)
            if entry:
                records.append(table1_record(entry))
        rows.append(row)
    return Table(
        f"table1{view.suffix}", f"Table 1: % universal neurons of {view.reference} "
        f"({view.summary})", ["threshold"] + [f"step {step_text(c)}" for c in view.checkpoints],
        rows, "universal/table1.json", "2 decimals", records,
        note=f"Percent of the reference's {view.n_neurons} neurons with excess > "
             f"threshold (draw 0), {view.summary} ({view.n_pairs} pair(s)); source column "
             "`pct_universal` of the rows with scope all.")


def _pair_rows(view: Table1View, tau, ckpt) -> list:
    """The summary row and each pair's row of one cell (the pair-averaged summary is
    the only row there is)."""
    found = [view.entry(tau, ckpt)] + [view.row(o, tau, ckpt) for o in view.others]
    return [r for r in found if r is not None]


def table1_pairs_table(view: Table1View) -> Table:
    """Table 1 per model pair, with the spread over baseline draws beside each value."""
    rows, records = [], []
    for tau, ckpt in view.present_keys():
        for r in _pair_rows(view, tau, ckpt):
            rows.append([tau_text(tau), step_text(ckpt), row_label(r),
                         fixed(r["pct_universal"], 2),
                         MISSING if r["n_universal"] is None else str(r["n_universal"]),
                         spread_text(r)])
            records.append(table1_record(r, spread=True))
    return Table(
        f"table1_pairs{view.suffix}", f"Table 1 per model pair, with the spread over "
        f"{view.n_draws} baseline draw(s)",
        ["threshold", "checkpoint", "other model", "% universal (draw 0)",
         "universal neurons (draw 0)", "% over baseline draws: mean ± std [min, max]"],
        rows, "universal/table1.json", "2 decimals (counts exact)", records,
        note="Each baseline draw is a different random rotation of the other model; "
             "draw 0 is the paper's single rotation and defines the universal sets. "
             "The spread column summarises the percent over all draws (std with ddof=1); "
             "one row per draw: universal/table1_draws.csv.")


def table1_layers_table(view: Table1View) -> Table:
    """Percent universal per layer of the reference, one column per (threshold, step)."""
    keys = view.present_keys()
    columns = ["layer"] + [f"tau {tau_text(t)}, step {step_text(c)}" for t, c in keys]
    rows, records = [], []
    for layer in range(view.n_layers):
        row = [str(layer)]
        for tau, ckpt in keys:
            found = view.entry(tau, ckpt, layer)
            row.append(MISSING if found is None else fixed(found["pct_universal"], 2))
            if found is not None:
                records.append(table1_record(found))
        rows.append(row)
    return Table(
        f"table1_layers{view.suffix}", f"% universal neurons per layer of {view.reference} "
        f"({view.summary})", columns, rows, "universal/table1.json", "2 decimals", records,
        note=f"Percent of each layer's {view.d_mlp} neurons with excess > threshold "
             "(draw 0); source column `pct_universal` of the rows with scope layer. Per "
             "pair: universal/table1.csv.")


# ---------------------------------------------------------------------------- persistence


def persistence_cell(row) -> str:
    """p_persist (a fraction) to 3 decimals with what it is computed from; never 0 for
    undefined."""
    if row is None:
        return MISSING
    if row["p_persist"] is None:
        return ("undefined (U(t1) empty in every pair)"
                if row["aggregation"] == MEAN_OVER_PAIRS else "undefined (U(t1) empty)")
    if row["aggregation"] == MEAN_OVER_PAIRS:
        return f"{fixed(row['p_persist'], 3)} (mean of {row['n_pairs']} pair(s))"
    return f"{fixed(row['p_persist'], 3)} ({row['n_both']}/{row['n_t1']})"


def persistence_record(row) -> dict:
    return {k: row.get(k) for k in PERSISTENCE_FIELDS}


def persistence_table(view: PersistenceView) -> Table:
    """All layers: one row per (threshold, pair or summary), one column per interval."""
    rows, records = [], []
    for tau in view.thresholds:
        for other in view.pairs + view.summaries:
            found = [view.row(other, tau, interval) for interval in view.intervals]
            rows.append([tau_text(tau), other] + [persistence_cell(r) for r in found])
            records += [persistence_record(r) for r in found if r is not None]
    return Table(
        f"persistence{view.suffix}", f"Persistence of universal neurons of {view.reference} "
        f"({view.definition}), all layers",
        ["threshold", "model pair"] + [interval_text(i) for i in view.intervals], rows,
        "persistence/persistence.json", "3 decimals (counts exact)", records,
        note="Cells: p_persist = |U(t1) & U(t2)| / |U(t1)|, a fraction (0 to 1); for a pair "
             "and the pooled row the counts |U(t1) & U(t2)|/|U(t1)| follow in brackets.")


def persistence_layer_table(view: PersistenceView, tau: float) -> Table:
    """By layer at one threshold: one column per (interval, summary)."""
    groups = view.layer_groups
    columns = ["layer"] + [f"{interval_text(i)}: {g}" for i in view.intervals for g in groups]
    rows, records = [], []
    for layer in view.layers:
        row = [str(layer)]
        for interval in view.intervals:
            for group in groups:
                found = view.row(group, tau, interval, layer)
                row.append(persistence_cell(found))
                if found is not None:
                    records.append(persistence_record(found))
        rows.append(row)
    return Table(
        f"persistence_layers{view.suffix}_t{tau_id(tau)}",
        f"Persistence by layer of {view.reference}, threshold {tau_text(tau)} "
        f"({view.definition})", columns, rows, "persistence/persistence.json",
        "3 decimals (counts exact)", records,
        note="p_persist as a fraction. Per-pair values by layer: persistence/persistence.csv.")


# ---------------------------------------------------------------------------- ablation


def ablation_record(row) -> dict:
    return {k: row.get(k) for k in ABLATION_FIELDS}


def ablation_table(view: AblationView) -> Table:
    """All layers at once: universal vs control per threshold, checkpoint and pair."""
    rows = sorted(view.all_layer_rows(), key=lambda r: (
        float(r["threshold"]), checkpoint_number(r["checkpoint"]), row_label(r),
        set_rank(r["set"])))
    cells = [[tau_text(r["threshold"]), step_text(checkpoint_number(r["checkpoint"])),
              row_label(r), r["set"], str(r["n_neurons"])]
             + ([MISSING] * 6 if _empty(r) else
                [sig4(r["kl"]), sig4(r["kl_se"]),
                 ci_text(r.get("kl_ci_low"), r.get("kl_ci_high")), sig4(r["delta_loss"]),
                 sig4(r["delta_loss_se"]),
                 ci_text(r.get("delta_loss_ci_low"), r.get("delta_loss_ci_high"))])
             for r in rows]
    return Table(
        f"ablation{view.suffix}", f"Ablating all universal neurons of {view.reference} vs "
        "matched controls",
        ["threshold", "checkpoint", "other model", "set", "neurons", "KL (nats)", "KL SE",
         "KL 95% CI (draws)", "delta loss (nats)", "delta loss SE",
         "delta loss 95% CI (draws)"], cells, "ablate/ablation.json",
        "4 significant digits (counts exact)", [ablation_record(r) for r in rows],
        note="All layers at once. CI columns are for controls with two or more draws; a KL "
             "interval reaching below 0 is the t-interval of few draws (KL itself cannot be "
             "negative; the figures clip it at 0). " + EMPTY_SET_NOTE)


def ablation_layer_table(view: AblationView, tau: float, rows: list) -> Table:
    """Layer by layer at one threshold: universal vs control side by side."""
    by_key = {(checkpoint_number(r["checkpoint"]), int(r["layer"]), row_label(r),
               r["set"]): r for r in rows}
    cells, records = [], []
    for ckpt, layer, other in sorted({key[:3] for key in by_key}):
        universal = by_key.get((ckpt, layer, other, "universal"))
        control = by_key.get((ckpt, layer, other, "control"))
        cells.append([step_text(ckpt), str(layer), other,
                      MISSING if universal is None else str(universal["n_neurons"]),
                      _value(universal, "kl"), _value(control, "kl"),
                      _value(universal, "delta_loss"), _value(control, "delta_loss")])
        records += [ablation_record(r) for r in (universal, control) if r is not None]
    return Table(
        f"ablation_layers{view.suffix}_t{tau_id(tau)}",
        f"Layer-by-layer ablation of {view.reference}, threshold {tau_text(tau)}",
        ["checkpoint", "layer", "other model", "neurons", "KL universal", "KL control",
         "delta loss universal", "delta loss control"], cells, "ablate/ablation.json",
        "4 significant digits (counts exact)", records,
        note="Each layer's universal neurons ablated alone vs a control of the same count "
             "from that layer (mean over draws); KL and delta loss in nats. Other thresholds "
             "and the standard errors: ablate/ablation.csv. " + EMPTY_SET_NOTE)


def _value(row, metric) -> str:
    return MISSING if row is None or _empty(row) else sig4(row[metric])


def _empty(row) -> bool:
    """An ablated set of no neurons (nothing ablated: no effect to show)."""
    return int(row["n_neurons"]) == 0


# ---------------------------------------------------------------------------- cards

CARD_TOKENS = 6            # tokens shown per list (cards.json holds n_tokens of them)


def token_shown(text: str) -> str:
    """A token as a table shows it: spaces and line breaks made visible."""
    return str(text).replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t") or "''"


def _tokens_cell(tokens: list) -> str:
    return " · ".join(token_shown(t["token"]) for t in tokens[:CARD_TOKENS])


def _match_cell(match: dict | None, rank, tau) -> str:
    """excess (draw 0), * when universal at tau, #rank in that pair's top N, and the
    matched neuron with its correlation."""
    if match is None:
        return MISSING
    star = "*" if match["is_universal"].get(f"{float(tau):g}") else ""
    where = (MISSING if match["match_layer"] is None
             else f"L{match['match_layer']}.{match['match_neuron']}")
    ranked = f" #{rank}" if rank is not None else ""
    return f"{fixed(match['excess'], 3)}{star}{ranked} → {where} ρ {fixed(match['max_corr'], 2)}"


def _role_text(role) -> str:
    return role if role else "–"


def cards_table(view) -> Table:
    """One row per card of a (reference, checkpoint): the neuron, its excess and match in
    each other model, its vocabulary moments and the tokens it promotes and suppresses."""
    tau = view.main_threshold
    rows = []
    for card in view.cards:
        ranks = {s["other"]: s["rank"] for s in card["selected_by"]}
        by_other = {m["other"]: m for m in card["matches"]}
        vocab = card["vocab"]
        rows.append([f"L{card['layer']}.{card['neuron']}"]
                    + [_match_cell(by_other.get(o), ranks.get(o), tau) for o in view.others]
                    + [fixed(vocab["kurtosis"], 2), fixed(vocab["skew"], 2),
                       _role_text(vocab["role"]), _tokens_cell(vocab["promoted"]),
                       _tokens_cell(vocab["suppressed"])]
                    + ([_contexts_cell(card)] if _has_contexts(view) else []))
    columns = (["neuron (layer.index)"] + [f"vs {o}" for o in view.others]
               + ["kurtosis", "skew", "role", "promotes most", "suppresses most"]
               + (["top contexts"] if _has_contexts(view) else []))
    return Table(
        f"cards{view.suffix}", f"Neuron cards of {view.reference} at step "
        f"{step_text(view.checkpoint)} ({len(view.cards)} neurons)", columns, rows,
        "cards/cards.json", "excess 3 decimals, ρ and moments 2", view.cards,
        note=f"A 'vs' cell: the neuron's excess correlation with that model (draw 0), * when "
             f"universal at tau {tau_text(tau)}, #k its rank in that pair's top neurons by "
             "excess, then the other model's neuron it correlates with most (layer.index) "
             "and that correlation ρ. Kurtosis and skew: the moments of the neuron's logit "
             "effect W_out·W_U over the vocabulary (plain kurtosis, 3 for a Gaussian); the "
             "tokens "
             f"are its {CARD_TOKENS} largest and smallest entries (␣ is a space).")


def _has_contexts(view) -> bool:
    return any(card.get("contexts") for card in view.cards)


def _contexts_cell(card: dict) -> str:
    """The top two contexts, the neuron's token in brackets, with its activation."""
    shown = []
    for ctx in (card.get("contexts") or [])[:2]:
        tokens = [token_shown(t) for t in ctx["tokens"]]
        focus = ctx.get("focus")
        if focus is not None and 0 <= focus < len(tokens):
            tokens[focus] = f"[{tokens[focus]}]"
        shown.append(f"{''.join(tokens)} ({fixed(ctx['activation'], 2)})")
    return " / ".join(shown) or MISSING


# ---------------------------------------------------------------------------- zoo


def zoo_summary(zoo: dict, path) -> str:
    recipe = zoo.get("recipe") or {}
    shown = ", ".join(f"{k}={v}" for k, v in recipe.items() if k in ZOO_RECIPE_KEYS)
    return (f"Zoo: {len(zoo['models'])} model(s), {zoo.get('n_params_per_model', '?')} "
            f"parameters each, recipe {zoo.get('recipe_hash', '?')} ({shown}); held-out "
            f"loss over {zoo.get('eval_bytes', '?')} held-out bytes, in {zoo_units(zoo)}. "
            f"Source: {path}.")


def zoo_table(zoo: dict, path) -> Table:
    steps, unigram = zoo_steps(zoo), zoo.get("unigram_heldout_loss")
    rows, records = [], []
    for model in zoo["models"]:
        row = [str(model["name"]), str(model.get("seed", MISSING))]
        for step in steps:
            loss = heldout_loss(model, step)
            row.append(fixed(loss, 4))
            records.append({"model": model["name"], "step": step, "heldout_loss": loss})
        rows.append(row)
    if unigram is not None:
        rows.append(["unigram baseline", MISSING] + [fixed(unigram, 4)] * len(steps))
        records.append({"model": "unigram baseline", "heldout_loss": unigram})
    return Table(
        "zoo_loss", f"Held-out loss per checkpoint ({zoo_units(zoo)})",
        ["model", "seed"] + [f"step {s}" for s in steps], rows, str(path), "4 decimals",
        records, note="The unigram baseline predicts every byte with its training-set "
                      "frequency.")
