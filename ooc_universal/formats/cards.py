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
  contexts       the contexts where the neuron fires most, highest first: [{"activation",
                 "row" (the store row), "window", "position" (of the token set),
                 "tokens": [str], "focus": index of the neuron's token in tokens}];
                 null when they could not be found (contexts_note says why)
  contexts_source  where the contexts came from: "topk file" (RUN/stores/<label>.topk.npz,
                 kept during extract or reduce), "store" (computed by the cards step from
                 the reference's store, for the card neurons only), or null
  contexts_note  a sentence on how the contexts were found, or why there are none

Written atomically with its checksum sidecar; cards.json is the step's only file, so
it is its own completion marker.

RUN/stores/<label>.topk.npz: the top-k activations of every neuron of one store (also
owned here; kernels/topk.py makes and merges them). An npz of three arrays:

  values   (k, n_neurons) float32   each neuron's k largest activations, highest first
  rows     (k, n_neurons) int64     their store rows (ties: the lower row first);
                                    -1 with value -inf: fewer than k rows seen
  meta     0-d str, JSON            {"topk_version": 1, "label", "k", "n_neurons",
                                     "n_tokens" (store rows folded in: all of them),
                                     "token_hash", "made_by" (extract | reduce | cards)}

A store row is a valid position of the token set in order: row i is
(window, position) = np.nonzero(token_set.valid)[.][i] (the store's rows are written in
that order). Written atomically with its checksum sidecar (verified on read).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ooc_universal.errors import OocError
from ooc_universal.rundir import atomic_path, verify_file, write_json_atomic

CARDS_VERSION = 1
CARDS_DIR, CARDS_JSON = "cards", "cards.json"
CONTEXTS_NOTE = "not recorded by this reduce"
TOPK_VERSION = 1
TOPK_SUFFIX = ".topk.npz"
STORES_DIR = "stores"
# cards_frame: one row per (card, other model). No column is named after a DataFrame
# method (issue 16): pair_rank, context_rank, not rank.
CARD_COLUMNS = ["reference", "checkpoint", "layer", "neuron", "flat_index", "model", "other",
                "pair_rank", "excess", "max_corr", "baseline_max", "match_layer", "match_neuron",
                "vocab_kurtosis", "vocab_skew", "vocab_role", "promoted_tokens",
                "promoted_logits", "suppressed_tokens", "suppressed_logits", "contexts",
                "contexts_source", "contexts_note"]


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
    columns repeat on each of its rows; pair_rank (1 = that pair's largest excess, the
    JSON's selected_by rank) is <NA> where that pair did not select it;
    is_universal_<tau> per threshold; the tokens as lists (highest first)."""
    from ooc_universal.formats.tables import typed, universal_column
    import pandas as pd
    rows = []
    for card in cards.cards:
        ranks = {s["other"]: s["rank"] for s in card["selected_by"]}
        for m in card["matches"]:
            rows.append({**_card_columns(card), "other": m["other"],
                         "pair_rank": ranks.get(m["other"]), "excess": m["excess"],
                         "max_corr": m["max_corr"], "baseline_max": m["baseline_max"],
                         "match_layer": m["match_layer"], "match_neuron": m["match_neuron"],
                         **{universal_column(t): bool(v)
                            for t, v in m["is_universal"].items()}})
    extra = [universal_column(t) for t in cards.thresholds]
    df = pd.DataFrame(rows, columns=CARD_COLUMNS + extra)
    df["pair_rank"] = pd.array(df["pair_rank"].tolist(), dtype="Int64")
    return typed(df)


CONTEXT_COLUMNS = ["reference", "checkpoint", "layer", "neuron", "flat_index", "model",
                   "context_rank", "activation", "row", "window", "position", "focus",
                   "text",
                   "tokens", "contexts_source"]


def contexts_frame(cards: CardsFile):
    """The cards' contexts as one tidy DataFrame, one row per (card, context):
    context_rank 1 is the neuron's largest activation; row is the store row, (window,
    position) the token set's; tokens the decoded tokens around it (a list) with the
    neuron's at index focus; text the same joined, the neuron's token in [brackets].
    Cards without contexts have no rows (their contexts_note in cards_frame says why)."""
    import pandas as pd
    rows = []
    for card in cards.cards:
        for rank, ctx in enumerate(card.get("contexts") or [], start=1):
            shown = list(ctx["tokens"])
            shown[ctx["focus"]] = f"[{shown[ctx['focus']]}]"
            rows.append({**{k: card[k] for k in ("reference", "checkpoint", "layer", "neuron",
                                                  "flat_index", "model")},
                         "context_rank": rank, "activation": ctx["activation"],
                         "row": ctx["row"],
                         "window": ctx["window"], "position": ctx["position"],
                         "focus": ctx["focus"], "text": "".join(shown),
                         "tokens": list(ctx["tokens"]),
                         "contexts_source": card.get("contexts_source")})
    df = pd.DataFrame(rows, columns=CONTEXT_COLUMNS)
    for col in ("checkpoint", "layer", "neuron", "flat_index", "context_rank", "row",
                "window", "position", "focus"):
        df[col] = df[col].astype("int64")
    return df


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
            "contexts": card["contexts"], "contexts_source": card.get("contexts_source"),
            "contexts_note": card["contexts_note"]}


# ---------------------------------------------------------------- top-k activations

@dataclass
class TopKFile:
    """RUN/stores/<label>.topk.npz as read or about to be written."""
    values: np.ndarray          # (k, n_neurons) float32, highest first
    rows: np.ndarray            # (k, n_neurons) int64 store rows, -1: padding
    label: str
    token_hash: str
    n_tokens: int
    made_by: str = ""

    @property
    def k(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_neurons(self) -> int:
        return int(self.values.shape[1])

    def meta(self) -> dict:
        return {"topk_version": TOPK_VERSION, "label": self.label, "k": self.k,
                "n_neurons": self.n_neurons, "n_tokens": int(self.n_tokens),
                "token_hash": self.token_hash, "made_by": self.made_by}


def topk_path(run_dir, label: str) -> Path:
    return Path(run_dir) / STORES_DIR / f"{label}{TOPK_SUFFIX}"


def write_topk(run_dir, topk: TopKFile, record: dict | None = None) -> Path:
    """Write the top-k file atomically, with its checksum sidecar (`record`: step,
    token_hash, inputs ... as every step output's)."""
    if topk.values.shape != topk.rows.shape or topk.values.ndim != 2:
        raise ValueError(f"top-k values {topk.values.shape} and rows {topk.rows.shape} must "
                         "be the same (k, n_neurons)")
    path = topk_path(run_dir, topk.label)
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"step": topk.made_by or "topk", "token_hash": topk.token_hash, **(record or {})}
    with atomic_path(path, rec, fault="topk.write") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, values=np.asarray(topk.values, np.float32),
                     rows=np.asarray(topk.rows, np.int64), meta=np.array(json.dumps(topk.meta())))
            f.flush()
            os.fsync(f.fileno())
    return path


def read_topk(run_dir, label: str) -> TopKFile | None:
    """The store's top-k file; None when there is none; one OocError line when it is
    untrusted, damaged or of another layout."""
    path = topk_path(run_dir, label)
    if not path.is_file():
        return None
    fix = "delete it (and its .sha256) and run the step that made it again"
    verify_file(path, "top-k file", fix)
    try:
        with np.load(path, allow_pickle=False) as z:
            values, rows = np.asarray(z["values"]), np.asarray(z["rows"])
            meta = json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError) as exc:
        raise OocError(f"top-k file {str(path)!r} is unreadable ({exc}); {fix}") from None
    if meta.get("topk_version") != TOPK_VERSION or values.shape != rows.shape \
            or values.ndim != 2:
        raise OocError(f"top-k file {str(path)!r} has version {meta.get('topk_version')} and "
                       f"shapes {values.shape}, {rows.shape}; this toolkit reads version "
                       f"{TOPK_VERSION} with equal (k, n_neurons) arrays; {fix}")
    return TopKFile(values, rows, str(meta.get("label", label)), str(meta.get("token_hash")),
                    int(meta.get("n_tokens", -1)), str(meta.get("made_by", "")))
