"""RUN/cards/cards.json: neuron cards of the top universal neurons; the only reader and writer.

  {"cards_version": 1, "config": {...}, "source": {"universal_id", "token_hash", ...},
   "definitions": {...}, "toolkit_version": "...",
   "models": {label: {"model_id", "revision", "commit", "tokenizer"}},
   "cards": [card, ...]}

A card is one neuron of a reference model at one checkpoint:

  reference, checkpoint, layer, neuron, flat_index (= layer * d_mlp + neuron)
  model          the label of the reference model the vocabulary effect was read from
  selected_by    [{"other", "rank"}]: the pairs in whose top N by excess (draw 0) it is
  matches        one per other model at that checkpoint: {"other", "excess",
                 "max_corr", "baseline_max", "match_layer", "match_neuron",
                 "is_universal": {"0.5": bool, ...}}; max_corr and the match are the
                 reduce file's row_max / row_argmax (match null: no match)
  vocab          the neuron's logit effect W_out[n] . W_U over the vocabulary:
                 {"kurtosis", "skew", "role", "promoted": [token...],
                 "suppressed": [token...]}, token = {"token_id", "token", "logit"}
                 (the largest, then the smallest entries); role "prediction",
                 "suppression" or null (steps/cards.py states the rule)
  contexts       null until the reduce records a mergeable top-k per neuron; then the
                 contexts where the neuron fires most, highest first: [{"activation",
                 "row", "window", "position", "tokens": [str], "focus": index of the
                 neuron's token in tokens}]
  contexts_note  why contexts is null ("not recorded by this reduce"), else null

Written atomically with its checksum sidecar; cards.json is the step's only file, so
it is its own completion marker.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ooc_universal.errors import OocError
from ooc_universal.rundir import write_json_atomic

CARDS_VERSION = 1
CARDS_DIR, CARDS_JSON = "cards", "cards.json"
CONTEXTS_NOTE = "not recorded by this reduce"
# cards_frame: one row per (card, other model)
CARD_COLUMNS = ["reference", "checkpoint", "layer", "neuron", "flat_index", "model", "other",
                "rank", "excess", "max_corr", "baseline_max", "match_layer", "match_neuron",
                "vocab_kurtosis", "vocab_skew", "vocab_role", "promoted_tokens",
                "promoted_logits", "suppressed_tokens", "suppressed_logits", "contexts",
                "contexts_note"]


def cards_path(run_dir) -> Path:
    return Path(run_dir) / CARDS_DIR / CARDS_JSON


@dataclass
class CardsFile:
    """cards.json as read or about to be written."""
    cards: list[dict]
    config: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    definitions: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)
    toolkit_version: str = ""

    @property
    def thresholds(self) -> list[float]:
        return sorted({float(t) for c in self.cards for m in c["matches"]
                       for t in m["is_universal"]})

    def to_json(self) -> dict:
        return {"cards_version": CARDS_VERSION, "config": self.config, "source": self.source,
                "definitions": self.definitions, "toolkit_version": self.toolkit_version,
                "models": self.models, "cards": self.cards}


def read_cards(run_dir) -> CardsFile:
    """RUN/cards/cards.json, or one OocError line naming the step that makes it."""
    path = cards_path(run_dir)
    if not path.is_file():
        raise OocError(f"no neuron cards at {str(path)!r}; run `ooc-universal cards` first")
    try:
        doc = json.loads(path.read_text())
        cards = doc["cards"]
        if not isinstance(cards, list):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise OocError(f"{str(path)!r} is not a cards file written by `ooc-universal "
                       "cards`; run that step again") from None
    if doc.get("cards_version") != CARDS_VERSION:
        raise OocError(f"{str(path)!r} has cards_version {doc.get('cards_version')}, this "
                       f"toolkit reads {CARDS_VERSION}; run `ooc-universal cards` again")
    return CardsFile(cards, doc.get("config") or {}, doc.get("source") or {},
                     doc.get("definitions") or {}, doc.get("models") or {},
                     doc.get("toolkit_version", ""))


def write_cards(run_dir, cards: CardsFile, record: dict | None = None) -> Path:
    path = cards_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, cards.to_json(), record)
    return path


def cards_frame(cards: CardsFile):
    """The cards as one tidy DataFrame, one row per (card, other model): the card's own
    columns repeat on each of its rows; rank is <NA> where that pair did not select it;
    is_universal_<tau> per threshold; the tokens as lists (highest first)."""
    from ooc_universal.formats.tables import typed, universal_column
    import pandas as pd
    rows = []
    for card in cards.cards:
        ranks = {s["other"]: s["rank"] for s in card["selected_by"]}
        for m in card["matches"]:
            rows.append({**_card_columns(card), "other": m["other"],
                         "rank": ranks.get(m["other"]), "excess": m["excess"],
                         "max_corr": m["max_corr"], "baseline_max": m["baseline_max"],
                         "match_layer": m["match_layer"], "match_neuron": m["match_neuron"],
                         **{universal_column(t): bool(v)
                            for t, v in m["is_universal"].items()}})
    extra = [universal_column(t) for t in cards.thresholds]
    df = pd.DataFrame(rows, columns=CARD_COLUMNS + extra)
    df["rank"] = pd.array(df["rank"].tolist(), dtype="Int64")
    return typed(df)


def _card_columns(card: dict) -> dict:
    vocab = card["vocab"]
    return {"reference": card["reference"], "checkpoint": card["checkpoint"],
            "layer": card["layer"], "neuron": card["neuron"], "flat_index": card["flat_index"],
            "model": card["model"], "vocab_kurtosis": vocab["kurtosis"],
            "vocab_skew": vocab["skew"], "vocab_role": vocab["role"],
            "promoted_tokens": [t["token"] for t in vocab["promoted"]],
            "promoted_logits": [t["logit"] for t in vocab["promoted"]],
            "suppressed_tokens": [t["token"] for t in vocab["suppressed"]],
            "suppressed_logits": [t["logit"] for t in vocab["suppressed"]],
            "contexts": card["contexts"], "contexts_note": card["contexts_note"]}
