"""Neuron cards: what the top universal neurons of each pair are, beyond the seed paper.

For every (reference, checkpoint) of RUN/universal/neurons.parquet and every pair there,
the top `settings.top_n` neurons by excess (draw 0; zero-variance neurons left out,
ties by flat index) get a card (one card per neuron, listing the pairs that chose it):

  matches   per other model at that checkpoint, the matched neuron and its correlation,
            read from that pair's reduce file (row_argmax, row_max), with the excess and
            whether it is universal at each threshold (from the neurons table)
  vocab     the neuron's logit effect v = W_out[n] . W_U over the vocabulary, read from
            the reference model's weights at that checkpoint (ooc_universal.models; the
            reduce file's attributes name the model):
              v = (c(W_out[n]) * g) @ W_U^T  -  mean_t(...)
            W_out[n] (d_model,) is the neuron's row of the MLP output projection, g the
            final norm's gain and c() the mean-centring a LayerNorm applies (RMSNorm
            families: no centring). That is W_out . W_U of TransformerLens's processed
            weights (fold_ln, center_writing_weights, center_unembed), the vector Gurnee
            et al. (2024) take the moments of; the final shift by its mean over the
            vocabulary changes no logit difference, no ranking and no moment.
            skew = E[z^3], kurtosis = E[z^4] with z = (v - mean v) / std v (population
            moments): plain (Pearson) kurtosis, 3 for a Gaussian, as in Gurnee et al.'s
            code. role: "prediction" when kurtosis > KURTOSIS_CUT and skew > 0,
            "suppression" when kurtosis > KURTOSIS_CUT and skew < 0, else null.
            promoted / suppressed: the n_tokens largest / smallest entries of v, decoded
            with the model's tokenizer (byte models: the byte, escaped).
  contexts  where the neuron fires most: its n_contexts largest activations over the
            correlation tokens (ties: the earlier store row), each with the tokens
            around it (CONTEXT_BEFORE before, CONTEXT_AFTER after, within its window),
            decoded with the model's tokenizer (the extract checked it is the token
            set's). From the reference store's top-k file (RUN/stores/<label>.topk.npz,
            kept during extract or the reduce: no extra pass) when it is there and made
            from this token set; else computed here from the reference's store for the
            card neurons only (one pass over its blocks, reading those columns), and the
            card says so (contexts_source, contexts_note); with neither (the store was
            released), contexts is null and the note says why. Store row i is the token
            set's i-th valid position: (window, position) = np.nonzero(valid)[.][i].

Writes RUN/cards/cards.json through formats/cards.py. Models are loaded on the CPU,
one reference checkpoint at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ooc_universal import __version__
from ooc_universal.config import CardsConfig
from ooc_universal.errors import OocError
from ooc_universal.formats.cards import CardsFile, read_topk, topk_path, write_cards
from ooc_universal.formats.reduced import list_reduced, open_reduced, read_attrs
from ooc_universal.formats.sets import read_sets
from ooc_universal.formats.tables import PAIR, read_neurons, universal_column, universal_paths
from ooc_universal.rundir import config_hash, ensure_writable, recorded_sha256

KURTOSIS_CUT = 10.0   # plain kurtosis (Gaussian: 3) above which a neuron predicts/suppresses
N_CONTEXTS = 8        # contexts per card, unless CardsConfig has n_contexts
CONTEXT_BEFORE, CONTEXT_AFTER = 12, 4   # tokens shown around the neuron's token
TOPK_FILE, FROM_STORE = "topk file", "store"    # contexts_source
DEFINITIONS = {
    "selection": "per (reference, other, checkpoint): the top_n neurons by excess (draw 0), "
                 "zero-variance neurons left out, ties by flat index",
    "match": "the other model's neuron of largest correlation (reduce row_argmax), its "
             "correlation row_max",
    "logit_effect": "v = (c(W_out[n]) * g) @ W_U^T - mean(v): the final norm's gain g "
                    "folded in, c() the LayerNorm's mean-centring (none for RMSNorm), "
                    "as TransformerLens's processed W_out @ W_U",
    "moments": "skew = E[z^3], kurtosis = E[z^4] (plain kurtosis, Gaussian 3), "
               "z = (v - mean v) / std v over the vocabulary",
    "role": f"prediction: kurtosis > {KURTOSIS_CUT:g} and skew > 0; suppression: "
            f"kurtosis > {KURTOSIS_CUT:g} and skew < 0 (Gurnee et al. 2024)",
    "contexts": "the neuron's largest activations over the correlation tokens (ties: the "
                "earlier token), highest first, each with up to "
                f"{CONTEXT_BEFORE} tokens before and {CONTEXT_AFTER} after it in its window"}


# ---------------------------------------------------------------- selection

def top_neurons(neurons, top_n: int) -> dict:
    """{(reference, checkpoint): {flat_index: [(other, rank), ...]}} of the pair rows."""
    pairs = neurons[(neurons["aggregation"] == PAIR) & ~neurons["zero_var"].astype(bool)]
    chosen: dict = {}
    for (ref, ckpt, other), group in pairs.groupby(["reference", "checkpoint", "other"],
                                                   sort=True):
        ranked = group.sort_values(["excess", "flat_index"], ascending=[False, True])
        for rank, flat in enumerate(ranked["flat_index"].head(top_n), start=1):
            chosen.setdefault((str(ref), int(ckpt)), {}).setdefault(int(flat), []).append(
                (str(other), rank))
    return chosen


def _thresholds(neurons) -> list[float]:
    return sorted(float(c[len("is_universal_"):]) for c in neurons.columns
                  if c.startswith("is_universal_"))


# ---------------------------------------------------------------- reduce files

@dataclass
class PairFile:
    """One reduce file of a (reference, checkpoint): what a card needs from it."""
    path: Path
    other: str
    d_other: int
    row_max: np.ndarray      # (Na,)
    row_argmax: np.ndarray   # (Na,) flat index into the other model, -1: none
    attrs: dict


def pair_files(run_dir, reference: str, checkpoint: int) -> list[PairFile]:
    """The reduce files of `reference` at `checkpoint`, sorted by the other model."""
    out = []
    for path in list_reduced(run_dir):
        attrs = read_attrs(path)
        if str(attrs.get("ref_name")) != reference or int(attrs["ref_step"]) != checkpoint:
            continue
        with open_reduced(path) as stats:
            out.append(PairFile(path, str(attrs["other_name"]), int(attrs["d_mlp_other"]),
                                stats.row_max.astype(np.float64),
                                stats.row_argmax.astype(np.int64), attrs))
    if not out:
        raise OocError(f"no reduce file in {str(Path(run_dir) / 'reduce')!r} has reference "
                       f"{reference!r} at checkpoint {checkpoint}, which the universal "
                       "tables name; re-run `ooc-universal reduce` and `universal`")
    return sorted(out, key=lambda p: p.other)


def _match(pair: PairFile, flat: int, row) -> dict:
    """One card's entry for one other model (row: that pair's neurons-table row)."""
    k = int(pair.row_argmax[flat])
    found = k >= 0
    return {"other": pair.other, "excess": float(row["excess"]),
            "max_corr": float(pair.row_max[flat]), "baseline_max": float(row["baseline_max"]),
            "match_layer": k // pair.d_other if found else None,
            "match_neuron": k % pair.d_other if found else None,
            "is_universal": {f"{t:g}": bool(row[universal_column(t)]) for t in row["_taus"]}}


@dataclass
class TopContexts:
    """The top activations of one reference checkpoint's card neurons, and where the
    token rows point (the token set's valid positions)."""
    flats: list              # the card neurons, in column order
    values: np.ndarray       # (k, len(flats)) float32, highest first; None: none found
    rows: np.ndarray         # (k, len(flats)) int64 store rows, -1: fewer than k tokens
    source: str | None       # TOPK_FILE, FROM_STORE or None
    note: str
    input_ids: np.ndarray = None     # (n_windows, window) of the token set
    windows: np.ndarray = None       # (n_tokens,) window of each store row
    positions: np.ndarray = None     # (n_tokens,) position of each store row
    input_file: Path | None = None   # the top-k file or store read (the cards' inputs)


def top_contexts(run_dir, label: str, flats, k: int) -> TopContexts:
    """The top-k activations of `flats` in store `label`: from its top-k file when it
    matches the token set, else from the store itself (card neurons only)."""
    from ooc_universal.formats.tokens import load_token_set
    flats = [int(f) for f in flats]
    try:
        tokens = load_token_set(run_dir)
    except OocError as exc:
        return TopContexts(flats, None, None, None, f"no contexts: {exc}")
    windows, positions = np.nonzero(tokens.valid)       # store row i -> (window, position)
    found = TopContexts(flats, None, None, None, "", tokens.input_ids, windows, positions)
    topk = read_topk(run_dir, label)
    matches = (topk is not None and topk.token_hash == tokens.hash
               and topk.n_tokens == windows.size)
    short = matches and topk.k < min(k, windows.size)      # kept fewer than asked for
    from ooc_universal.formats.store import StorePaths
    store = StorePaths.of(Path(run_dir) / "stores", label).final
    if matches and (not short or not store.is_file()):
        found.values, found.rows = topk.values[:k, flats], topk.rows[:k, flats]
        found.source, found.input_file = TOPK_FILE, topk_path(run_dir, label)
        found.note = (f"the top {min(k, topk.k)} activations over the {windows.size} "
                      f"correlation tokens, from stores/{topk_path(run_dir, label).name} "
                      f"(kept by {topk.made_by or 'an earlier step'})")
        return found
    stale = ("" if topk is None else
             f" (its top-k file keeps only {topk.k} per neuron, so it was not used)" if short
             else " (its top-k file was made from another token set, so it was not used)")
    return _contexts_from_store(run_dir, label, found, k, tokens.hash, stale)


def _contexts_from_store(run_dir, label, found: TopContexts, k, token_hash, stale):
    """The top k of the card neurons' columns of the store, block by block."""
    from ooc_universal.formats.store import StorePaths, open_store
    from ooc_universal.kernels import topk as topk_kernel
    path = StorePaths.of(Path(run_dir) / "stores", label).final
    if not path.is_file():
        found.note = (f"no contexts: neither a top-k file nor the activation store of "
                      f"{label} is in stores/ (released or never extracted){stale}; "
                      f"re-extract {label} to find them")
        return found
    with open_store(path) as store:
        if str(store.attrs.get("token_hash")) != token_hash or store.n_tokens != found.windows.size:
            found.note = (f"no contexts: the store of {label} was made from another token "
                          f"set than RUN/tokens{stale}; re-extract it")
            return found
        best = topk_kernel.empty(k, len(found.flats))
        for start, _, block in store.blocks():
            best = topk_kernel.combine(best, topk_kernel.chunk(block[:, found.flats], start, k))
    found.values, found.rows = best
    found.source, found.input_file = FROM_STORE, path
    found.note = (f"computed by the cards step from stores/{path.name} for the card neurons "
                  f"only (the top {k} over the {found.windows.size} correlation tokens; no "
                  f"top-k file was kept{stale})")
    return found


def contexts_of(found: TopContexts, flat: int, loaded) -> tuple:
    """(contexts, source, note) of one card neuron: its top activations, highest first,
    each with the tokens around it (formats/cards.py has the record)."""
    if found.values is None:
        return None, None, found.note
    col = found.flats.index(int(flat))
    out = []
    for value, row in zip(found.values[:, col], found.rows[:, col]):
        if row < 0:
            break                                  # fewer tokens than k
        window, position = int(found.windows[row]), int(found.positions[row])
        lo = max(0, position - CONTEXT_BEFORE)
        hi = min(found.input_ids.shape[1], position + CONTEXT_AFTER + 1)
        out.append({"activation": float(value), "row": int(row), "window": window,
                    "position": position, "focus": position - lo,
                    "tokens": [token_text(loaded, int(t)) for t in found.input_ids[window, lo:hi]]})
    return out, found.source, found.note


# ---------------------------------------------------------------- the model's weights

def model_spec(attrs: dict, overrides: dict | None = None) -> str:
    """The spec to load the reduce file's reference model from (its label must come back
    the same): an override for the label or "name@step", else rebuilt from ref_model_id,
    ref_revision and ref_step."""
    from ooc_universal.models import parse_model_spec
    label, step = str(attrs["ref_label"]), int(attrs.get("ref_step", -1))
    for key in (label, f"{attrs.get('ref_name')}@{step}"):
        if key in (overrides or {}):
            return str(overrides[key])
    model_id, revision = str(attrs.get("ref_model_id", "")), attrs.get("ref_revision")
    candidates = ([model_id] if Path(model_id).is_dir() else []) + [
        f"{model_id}@{step}" if step >= 0 else model_id]
    if revision and not Path(model_id).is_dir():
        candidates.append(f"{model_id}@{revision}")
    for spec in candidates:
        try:
            if parse_model_spec(spec).label == label:
                return spec
        except (OocError, ValueError):
            continue
    raise OocError(f"cannot rebuild the model spec of {label!r} from model id {model_id!r} "
                   f"(revision {revision}, step {step}); pass model_overrides={{{label!r}: "
                   "SPEC}} to the cards step")


def logit_effects(model, flats, d_mlp: int) -> np.ndarray:
    """(len(flats), vocab) float64: each neuron's W_out row through the final norm's
    gain (LayerNorm: centred first) onto the unembedding, minus its vocabulary mean."""
    import torch
    from ooc_universal.models import final_norm, mlp_out_proj, out_proj_neuron_axis
    axis = out_proj_neuron_axis(model)
    rows = torch.stack([mlp_out_proj(model, f // d_mlp).weight.detach().select(axis, f % d_mlp)
                        for f in flats]).double()                      # (n, d_model)
    norm = final_norm(model)
    if _centres(norm):
        rows = rows - rows.mean(dim=1, keepdim=True)
    gain = getattr(norm, "weight", None)
    if gain is not None:
        rows = rows * gain.detach().double()
    unembed = model.get_output_embeddings().weight.detach().double()    # (vocab, d_model)
    effects = rows @ unembed.T
    return (effects - effects.mean(dim=1, keepdim=True)).numpy()


def _centres(norm) -> bool:
    """Does this final norm subtract the mean (a LayerNorm) or not (an RMSNorm)?"""
    import torch
    name = type(norm).__name__
    return isinstance(norm, torch.nn.LayerNorm) or ("LayerNorm" in name and "RMS" not in name)


def moments(v: np.ndarray) -> tuple[float, float]:
    """(skew, plain kurtosis) of a vector: population moments of its z-scores."""
    z = (v - v.mean()) / v.std()
    return float(np.mean(z ** 3)), float(np.mean(z ** 4))


def role_of(skew: float, kurtosis: float):
    if kurtosis <= KURTOSIS_CUT:
        return None
    return "prediction" if skew > 0 else "suppression"


def token_text(loaded, token_id: int) -> str:
    """A token id as text: the tokenizer's decoding, or for a byte model its byte
    (escaped when not printable; 256 is the BOS/EOS id)."""
    if loaded.tokenizer is not None:
        return loaded.tokenizer.decode([int(token_id)])
    if token_id >= 256:
        return "<bos>"
    return repr(bytes([int(token_id)]))[2:-1]


def vocab_record(loaded, v: np.ndarray, n_tokens: int) -> dict:
    """A card's "vocab": moments, role and the top promoted / suppressed tokens."""
    skew, kurt = moments(v)
    order = np.argsort(-v, kind="stable")
    pick = min(n_tokens, v.size)

    def tokens(ids):
        return [{"token_id": int(i), "token": token_text(loaded, int(i)), "logit": float(v[i])}
                for i in ids]

    return {"kurtosis": kurt, "skew": skew, "role": role_of(skew, kurt),
            "promoted": tokens(order[:pick]), "suppressed": tokens(order[::-1][:pick])}


# ---------------------------------------------------------------- the step

@dataclass
class CardsOutput:
    """What the step wrote and the cards themselves."""
    path: Path
    cards: CardsFile


def cards(run_dir, settings: CardsConfig = CardsConfig(), *, model_overrides=None,
          progress: bool = True) -> CardsOutput:
    """Neuron cards of the top neurons by excess of every pair (module docstring).

    Reads RUN/universal/neurons.parquet (the draw-0 view), RUN/reduce/*.h5 and each
    reference checkpoint's weights; `model_overrides` maps a reference label
    ("a@100000") to a model spec when the model is no longer where the reduce found it.
    """
    from tqdm.auto import tqdm
    run_dir = Path(run_dir)
    table = read_neurons(run_dir)
    neurons = table.frame
    thresholds = _thresholds(neurons)
    chosen = top_neurons(neurons, settings.top_n)
    if not chosen:
        raise OocError(f"{str(table.path)!r} has no per-pair neuron rows to make cards of; "
                       "run `ooc-universal universal` (per-pair rows are always written)")
    all_cards, models, inputs = [], {}, {}
    for (ref, ckpt), flats in tqdm(sorted(chosen.items()), disable=not progress,
                                   desc="cards", unit="checkpoint"):
        made, label, model_info, files = _cards_of(run_dir, neurons, ref, ckpt, flats,
                                                   thresholds, settings, model_overrides)
        all_cards += made
        models[label] = model_info
        inputs.update(files)
    result = CardsFile(all_cards, _config(settings), _source(run_dir, table.path),
                       DEFINITIONS, models, __version__)
    ensure_writable(run_dir / "cards")   # rundir.STEPS does not list "cards" (yet)
    inputs[result.source["neurons"]] = result.source["neurons_sha256"]
    record = {"step": "cards", "token_hash": result.source.get("token_hash"),
              "config_hash": config_hash(result.config), "inputs": inputs}
    return CardsOutput(write_cards(run_dir, result, record), result)


def _cards_of(run_dir, neurons, ref, ckpt, flats, thresholds, settings, overrides):
    """The cards of one reference checkpoint, its model's record and the input files."""
    from ooc_universal.models import load_model
    pairs = pair_files(run_dir, ref, ckpt)
    spec = model_spec(pairs[0].attrs, overrides)
    loaded = load_model(spec, device="cpu", with_tokenizer=True)
    order = sorted(flats)
    effects = logit_effects(loaded.model, order, loaded.d_mlp)
    rows = _pair_rows(neurons, ref, ckpt, thresholds, order)
    found = top_contexts(run_dir, str(pairs[0].attrs["ref_label"]), order,
                         n_contexts(settings))
    made = []
    for flat, v in zip(order, effects):
        contexts, source, note = contexts_of(found, flat, loaded)
        made.append({
            "reference": ref, "checkpoint": ckpt, "layer": flat // loaded.d_mlp,
            "neuron": flat % loaded.d_mlp, "flat_index": flat, "model": loaded.spec.label,
            "selected_by": [{"other": o, "rank": r} for o, r in sorted(flats[flat])],
            "matches": [_match(p, flat, rows[(p.other, flat)]) for p in pairs
                        if (p.other, flat) in rows],
            "vocab": vocab_record(loaded, v, settings.n_tokens),
            "contexts": contexts, "contexts_source": source, "contexts_note": note})
    info = {"model_id": loaded.model_id, "revision": loaded.revision, "commit": loaded.commit,
            "tokenizer": loaded.tokenizer_name, "spec": spec}
    files = {f"reduce/{p.path.name}": recorded_sha256(p.path) for p in pairs}
    if found.input_file is not None:
        files[f"stores/{found.input_file.name}"] = recorded_sha256(found.input_file)
    del loaded
    return made, pairs[0].attrs["ref_label"], info, files


def _pair_rows(neurons, ref, ckpt, thresholds, flats) -> dict:
    """{(other, flat_index): row} of the per-pair neuron rows of `flats` at one
    reference checkpoint."""
    mine = neurons[(neurons["aggregation"] == PAIR) & (neurons["reference"] == ref)
                   & (neurons["checkpoint"] == ckpt) & neurons["flat_index"].isin(flats)]
    out = {}
    for row in mine.to_dict("records"):
        row["_taus"] = thresholds
        out[(str(row["other"]), int(row["flat_index"]))] = row
    return out


def n_contexts(settings: CardsConfig) -> int:
    """Contexts per card: CardsConfig.n_contexts where the config has it."""
    return int(getattr(settings, "n_contexts", N_CONTEXTS))


def _config(settings: CardsConfig) -> dict:
    return {"top_n": settings.top_n, "n_tokens": settings.n_tokens,
            "n_contexts": n_contexts(settings), "context_before": CONTEXT_BEFORE,
            "context_after": CONTEXT_AFTER, "kurtosis_cut": KURTOSIS_CUT}


def _source(run_dir: Path, neurons_path: Path) -> dict:
    """What the cards were made from: the universal step's id and files."""
    try:
        sets = read_sets(run_dir)
        universal_id, token_hash = sets.provenance.universal_id, sets.token_hash
    except OocError:
        universal_id = token_hash = None
    paths = universal_paths(run_dir)
    return {"universal_id": universal_id, "token_hash": token_hash,
            "neurons": f"universal/{neurons_path.name}",
            "neurons_sha256": recorded_sha256(neurons_path),
            "sets_sha256": recorded_sha256(paths["sets"]) if paths["sets"].is_file() else None}
