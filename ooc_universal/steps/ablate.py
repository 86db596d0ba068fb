"""Ablation: switch off sets of MLP neurons and measure how the predictions move.

Conventions (the README and `ooc-universal ablate --help` repeat them):

- Intervention. A neuron is an input of a layer's MLP output projection
  (`models.mlp_out_proj`, the same site in every family of models.FAMILIES: GPT-2's
  post-GELU input of `c_proj`, Pythia's of `dense_4h_to_h`, OLMo's and Llama's
  act(gate) * up input of `down_proj`). Zero-ablation sets it to 0, so its row of the
  projection (GPT-2 Conv1D `c_proj.weight[neuron, :]`; nn.Linear `weight[:, neuron]`)
  contributes nothing; the projection's bias stays. Mean-ablation (`mode="mean"`) sets
  it to the neuron's mean activation over the correlation tokens (`ref/mean` of the
  reduced statistics) instead. A forward pre-hook on the projection does either.
- Positions. Position t of a window predicts the token at t+1. The evaluated positions
  T are those with `valid[t]` true and a next token inside the window (so the last
  column never counts). `valid` is the token set's mask: BOS/pad and newline positions
  are already False there; the step also drops a position whose next token is the
  trailing padding of a short last window.
- KL = (1/|T|) sum_{t in T} sum_x P_t(x) log(P_t(x) / Q_t(x)), P = original model,
  Q = ablated model (KL(P_original || Q_ablated)), in float64 from the logits
  (log Q = logits - logsumexp(logits)). delta loss = CE(ablated) - CE(original), the
  mean over T of -log Q_t(next token) + log P_t(next token).
- Standard errors are over sequences: each window's mean over its positions in T, then
  std (ddof=1) / sqrt(number of windows with at least one position).
- Controls are drawn (numpy Generator, seeded from `seed` and the set's identity) from
  the neurons that are NOT universal for the same reference, other model, checkpoint
  and threshold, with the universal set's count in every layer. With K draws the
  summary row gives the mean over draws and a 95% t-interval of that mean.

Efficiency (the cached prefix): per batch of windows the original model runs once,
keeping its float64 probabilities at T and the residual stream entering each decoder
layer where some set starts. An ablation whose lowest layer is l restarts from layer
l's cached input with the very arguments the model gave that layer, and runs layers
l..L-1, the final norm and the LM head (on T's rows only): every set of the batch reuses
the one original pass. Several sets of one starting layer can run stacked along the
batch dimension (`sets_per_pass`); looping them over the one prefix is the faster on a
CPU (bench/bench_ablate.py). Identical neuron sets are evaluated once; empty sets are
exactly 0 and cost nothing. `ablation_plan` projects the FLOPs and time for the dry run.

Files: the sets through formats/sets.py, the eval windows through formats/tokens.py, the
reference models' identity and means through formats/reduced.py; RUN/ablate/ (results
and the per-model parts) through formats/ablation.py.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ooc_universal import __version__
from ooc_universal.config import AblateConfig, ComputeConfig
from ooc_universal.devices import resolve_device
from ooc_universal.errors import OocError
from ooc_universal.formats.ablation import (AblationFile, AblationPart, part_path, read_part,
                                            write_ablation, write_part)
from ooc_universal.formats.reduced import list_reduced, open_reduced
from ooc_universal.formats.sets import (UniversalSet, as_sets, check_sets_provenance,
                                        read_sets)
from ooc_universal.formats.tokens import load_token_set
from ooc_universal.models import base_model, decoder_layers, mlp_out_proj, mlp_shape
from ooc_universal.models import final_norm as models_final_norm
from ooc_universal.rundir import config_hash, step_dir

KINDS = ("universal", "control", "all-non-universal")
MODES = ("zero", "mean")

CONVENTIONS = (
    "Zero-ablation sets a neuron (an input of the MLP output projection; GPT-2: the "
    "post-GELU activation) to 0 (its output-projection row contributes nothing; the bias "
    "stays); mean-ablation sets it to its mean over the correlation tokens. Position t "
    "predicts token t+1; T = positions with valid[t] and a next token in the window. "
    "KL = KL(P_original || Q_ablated) averaged over T, in float64 from the logits; "
    "delta_loss = CE(ablated) - CE(original) on the true next tokens. *_se: standard error "
    "over sequences (per-window means, std/sqrt(n_windows)). Control rows: mean over draws "
    "of non-universal neurons matched per layer, *_ci_low/high = 95% t-interval of that "
    "mean over draws.")


# ---------------------------------------------------------------------------------------
# Ablation sets


@dataclass(frozen=True, eq=False)
class AblationSet:
    """One set of neurons to switch off together (flat indices layer * d_mlp + neuron)."""
    name: str
    kind: str                 # "universal" | "control" | "all-non-universal"
    layer: object             # "all" or the layer index of a layer-wise set
    draw: int                 # control draw (0 for the other kinds)
    neurons: np.ndarray       # sorted, unique, int64
    reference: str | None = None
    other: str | None = None
    checkpoint: object = None
    threshold: float | None = None
    definition: str | None = None

    @property
    def n_neurons(self) -> int:
        return int(self.neurons.size)


def ablation_sets(sets, n_layers=None, d_mlp=None, control_draws=5, seed=0,
                  include_all_non_universal=False, layerwise=True) -> list[AblationSet]:
    """The ablation sets of the universal step's records.

    `sets`: anything formats.sets.as_sets takes (a SetsFile, a path to sets.json, its
    parsed dict, a list of records, or one record). Per record: the universal set over
    all layers; `control_draws` controls matched to it per layer; optionally every
    non-universal neuron; and, with `layerwise`, each layer's universal neurons alone
    with controls from that layer (every layer, also those with no universal neuron:
    their sets are empty). `n_layers`/`d_mlp` default to the record's own and must agree
    with it when given. Raises OocError when a layer has fewer non-universal than
    universal neurons.
    """
    if control_draws < 0:
        raise ValueError(f"control_draws must be >= 0, got {control_draws}")
    out = []
    for rec in as_sets(sets):
        out.extend(_sets_of_record(rec, n_layers, d_mlp, int(control_draws), int(seed),
                                   include_all_non_universal, layerwise))
    return out


def _record_dims(rec: UniversalSet, n_layers, d_mlp) -> tuple[int, int]:
    nl = n_layers if rec.n_layers is None else rec.n_layers
    dm = d_mlp if rec.d_mlp is None else rec.d_mlp
    for name, given, own in (("n_layers", n_layers, nl), ("d_mlp", d_mlp, dm)):
        if own is None:
            raise OocError(f"sets.json record {rec.describe()} has no {name}; pass {name}=")
        if given is not None and int(given) != int(own):
            raise OocError(f"sets.json record {rec.describe()} has {name}={own}, the model "
                           f"has {given}; is --model pointing at the wrong model?")
    return int(nl), int(dm)


def _sets_of_record(rec: UniversalSet, n_layers, d_mlp, draws, seed, all_non_universal,
                    layerwise):
    nl, dm = _record_dims(rec, n_layers, d_mlp)
    uni = np.unique(rec.neurons)
    if uni.size and (uni[0] < 0 or uni[-1] >= nl * dm):
        raise OocError(f"sets.json record {rec.describe()} has neuron index {int(uni[-1])} "
                       f"outside 0..{nl * dm - 1} (n_layers {nl} x d_mlp {dm}); "
                       "re-run `ooc-universal universal`")
    is_uni = np.zeros(nl * dm, dtype=bool)
    is_uni[uni] = True
    pools = [np.flatnonzero(~is_uni[l * dm:(l + 1) * dm]) + l * dm for l in range(nl)]
    counts = np.bincount(uni // dm, minlength=nl)
    ident = dict(reference=rec.reference, other=rec.other, checkpoint=rec.checkpoint,
                 threshold=rec.threshold, definition=rec.definition)

    def make(kind, layer, draw, neurons):
        name = (f"{ident['reference']}@{ident['checkpoint']} vs {ident['other']} "
                f"t={ident['threshold']} {kind} layer={layer} draw={draw}")
        return AblationSet(name, kind, layer, draw, np.sort(neurons).astype(np.int64), **ident)

    def control(layers, layer_key, draw):
        rng = _rng(seed, ident, layer_key, draw)
        picks = []
        for l in layers:
            need, pool = int(counts[l]), pools[l]
            if need > pool.size:
                raise OocError(
                    f"cannot draw a matched control for {rec.describe()}: layer {l} has "
                    f"{need} universal neurons but only {pool.size} non-universal ones; use "
                    "a higher threshold, or --control-draws 0 to skip controls")
            picks.append(rng.choice(pool, size=need, replace=False) if need else pool[:0])
        return np.concatenate(picks) if picks else uni[:0]

    out = [make("universal", "all", 0, uni)]
    out += [make("control", "all", k, control(range(nl), "all", k)) for k in range(draws)]
    if all_non_universal:
        out.append(make("all-non-universal", "all", 0, np.flatnonzero(~is_uni)))
    if layerwise:
        for l in range(nl):
            out.append(make("universal", l, 0, uni[uni // dm == l]))
            out += [make("control", l, k, control([l], l, k)) for k in range(draws)]
    return out


def _rng(seed, ident, layer_key, draw) -> np.random.Generator:
    """A generator named by content: the same set identity always draws the same control."""
    key = json.dumps([ident["reference"], ident["other"], ident["checkpoint"],
                      ident["threshold"], ident["definition"], layer_key, draw],
                     default=str).encode()
    words = np.frombuffer(hashlib.sha256(key).digest()[:16], dtype=np.uint32)
    return np.random.default_rng([int(seed), *map(int, words)])


# ---------------------------------------------------------------------------------------
# Forward passes: original once per batch, ablations restarted from the cached residual

def final_norm(model):
    """The norm the base model applies after its last layer (models.final_norm); None
    when the model lacks it (then every ablation runs the whole model)."""
    try:
        return models_final_norm(model)
    except OocError:
        return None


class _Runner:
    """Original forward with cached layer inputs; ablated forwards restarted from them.

    Any family of models.FAMILIES: the decoder layers come from `decoder_layers`, and each
    is called with the very arguments (mask, position ids, rotary embeddings) the base
    model passed it in the original run, so a restart computes exactly what a full
    forward computes; then the final norm and the output embeddings (the LM head). A
    restart can carry `copies` stacked copies of the batch (one per ablation set, the
    hooks tell them apart). A model whose final norm is not known falls back to a full
    forward for every ablation.
    """

    def __init__(self, model):
        self.model = model
        self.base = base_model(model)
        self.blocks = decoder_layers(model)
        self.norm = final_norm(model)
        self.lm_head = model.get_output_embeddings()
        self.restartable = self.norm is not None and self.lm_head is not None

    def original(self, ids, cache_layers):
        """(hidden at the head's input (B, W, d) or logits, cache for restarts)."""
        if not self.restartable:
            return self.model(ids, use_cache=False).logits, None
        cache, handles = {}, []
        keep = set(cache_layers)

        def capture(i):
            def hook(module, args, kwargs):
                cache[i] = (args[0] if i in keep else None, args[1:], dict(kwargs))
            return hook

        try:
            for i, block in enumerate(self.blocks):
                handles.append(block.register_forward_pre_hook(capture(i), with_kwargs=True))
            out = self.base(ids, use_cache=False).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        return out, cache

    def ablated(self, ids, layer, cache, copies=1):
        """Hidden at the head's input, (copies * B, W, d) (or logits), with whatever
        ablation hooks are on; rows k * B .. (k + 1) * B - 1 are copy k."""
        if not self.restartable:
            return self.model(ids.repeat(copies, 1), use_cache=False).logits
        batch, tiled = ids.shape[0], {}
        h = _tile(cache[layer][0], batch, copies, tiled)
        for i in range(layer, len(self.blocks)):
            _, args, kwargs = cache[i]
            h = self.blocks[i](h, *_tile(args, batch, copies, tiled),
                               **_tile(kwargs, batch, copies, tiled))
            h = h[0] if isinstance(h, tuple) else h
        return self.norm(h)

    def head(self, rows_hidden):
        return self.lm_head(rows_hidden) if self.restartable else rows_hidden


def _tile(value, batch, copies, memo):
    """`value` (a layer argument) with every tensor of two or more dims and leading size
    `batch` repeated `copies` times along dim 0; the others (broadcast over the batch,
    position ids, rotary tables) stay as they are. `memo` keeps one copy of a tensor
    that several layers share (the mask)."""
    if copies == 1:
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() < 2 or value.shape[0] != batch:
            return value
        if id(value) not in memo:
            memo[id(value)] = value.repeat(copies, *([1] * (value.dim() - 1)))
        return memo[id(value)]
    if isinstance(value, dict):
        return {k: _tile(v, batch, copies, memo) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_tile(v, batch, copies, memo) for v in value)
    return value


def model_dims(model) -> tuple[int, int]:
    """(n_layers, d_mlp) of a model of a known family, from its config."""
    return mlp_shape(model.config)


@contextmanager
def ablation_hooks(model, neurons, d_mlp, mode="zero", means=None):
    """Forward pre-hooks on each touched layer's output projection, removed on exit.

    `neurons`: flat indices; `means` ((n_layers * d_mlp,) array) is required for
    mode "mean". The hook replaces the chosen columns of the projection's input
    (the neurons) by 0 or by their means.
    """
    with stacked_ablation_hooks(model, [neurons], d_mlp, mode, means):
        yield


@contextmanager
def stacked_ablation_hooks(model, neuron_sets, d_mlp, mode="zero", means=None):
    """`ablation_hooks` for len(neuron_sets) sets at once: the projection's input holds
    that many stacked copies of the batch along dim 0, and copy k gets set k's columns
    replaced (a layer that set k does not touch passes through copy k unchanged)."""
    sets = [np.asarray(n, dtype=np.int64) for n in neuron_sets]
    touched = np.unique(np.concatenate(sets) // d_mlp) if sets else np.zeros(0, np.int64)
    handles = []
    try:
        for layer in map(int, touched):
            proj = mlp_out_proj(model, layer)
            dev = next(proj.parameters()).device
            drop = torch.zeros(len(sets), d_mlp, dtype=torch.bool)
            for k, s in enumerate(sets):
                drop[k, torch.as_tensor(s[s // d_mlp == layer] - layer * d_mlp)] = True
            fill = None if mode == "zero" else torch.as_tensor(
                np.asarray(means, dtype=np.float64)[layer * d_mlp:(layer + 1) * d_mlp])
            handles.append(proj.register_forward_pre_hook(
                _column_hook(drop.to(dev), None if fill is None else fill.to(dev))))
        yield
    finally:
        for h in handles:
            h.remove()


def _column_hook(drop, fill):
    """Pre-hook: in copy k of the input, the columns drop[k] become 0 or fill's values."""
    def hook(module, args):
        x = args[0]
        stacked = x.reshape(drop.shape[0], -1, x.shape[-1])
        value = (torch.zeros((), dtype=x.dtype, device=x.device) if fill is None
                 else fill.to(x.dtype))
        x = torch.where(drop[:, None, :], value, stacked).reshape(x.shape)
        return (x,) + tuple(args[1:])
    return hook


# ---------------------------------------------------------------------------------------
# Metrics


@dataclass
class AblationResult:
    """KL and delta loss of one set; window_* are per-window means (NaN: no position)."""
    set: AblationSet
    kl: float
    kl_se: float
    delta_loss: float
    delta_loss_se: float
    n_positions: int
    n_neurons: int
    window_kl: np.ndarray = field(repr=False)
    window_delta_loss: np.ndarray = field(repr=False)

    def as_dict(self) -> dict:
        return dict(kl=self.kl, kl_se=self.kl_se, delta_loss=self.delta_loss,
                    delta_loss_se=self.delta_loss_se, n_positions=self.n_positions,
                    n_neurons=self.n_neurons)


def target_mask(valid) -> np.ndarray:
    """T as a (n_windows, window) bool mask: valid[t] and t + 1 inside the window."""
    valid = np.asarray(valid, dtype=bool)
    mask = np.zeros_like(valid)
    mask[:, :-1] = valid[:, :-1]
    return mask


def auto_batch_size(window, vocab, n_layers, d_model, d_mlp, device, sets_per_pass=1) -> int:
    """Windows per batch so the per-batch tensors fit a budget (CPU 1 GB, GPU 1/4 free)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 4
    else:
        budget = 1 << 30
    # float64 P and float32 logits at every position, the cached residual of every
    # block, and per stacked set its residual, one block's MLP activations and attention
    # scores, with room for temporaries.
    per_set = window * (4 * d_model * 4 + 2 * d_mlp * 4) + 4 * window * window * 4
    per_window = window * (vocab * 12 + n_layers * d_model * 4) + sets_per_pass * per_set
    return max(1, int(budget // (2 * per_window)))


def evaluate_ablations(model, sets, input_ids, valid, batch_size=None, mode="zero",
                       means=None, device="auto", progress=False,
                       sets_per_pass=1) -> list[AblationResult]:
    """KL(P_original || Q_ablated) and delta loss of each set, over positions T.

    `input_ids`, `valid`: (n_windows, window) arrays (the token set's eval split); T as
    in `target_mask`. `device="auto"` keeps the model where it is; another device moves
    it there. Memory is bounded by `batch_size` windows (default: `auto_batch_size`).
    Per batch the original runs once (its float64 probabilities at T and the residual
    entering every layer where some set starts are kept); each set restarts from the residual
    at its lowest ablated layer. `sets_per_pass` sets with the same lowest layer run
    stacked along the batch dimension in one restart (1: one set per restart, the
    faster on a CPU, bench/bench_ablate.py). Results come back in the order of `sets`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    n_layers, d_mlp = model_dims(model)
    if mode == "mean":
        if means is None or np.shape(means) != (n_layers * d_mlp,):
            raise OocError(f"mode 'mean' needs means of shape ({n_layers * d_mlp},), got "
                           f"{None if means is None else np.shape(means)}")
    dev = next(model.parameters()).device
    if device not in (None, "auto") and torch.device(device) != dev:
        model.to(device)
        dev = torch.device(device)
    input_ids = np.asarray(input_ids)
    tmask = target_mask(valid)
    if input_ids.shape != tmask.shape:
        raise ValueError(f"input_ids {input_ids.shape} and valid {tmask.shape} differ in "
                         "shape")
    n_win, window = input_ids.shape
    if batch_size is None:
        batch_size = auto_batch_size(window, int(model.config.vocab_size), n_layers,
                                     int(model.config.hidden_size), d_mlp, dev,
                                     sets_per_pass)

    uneurons, which = _distinct(sets)
    passes = restart_passes(uneurons, d_mlp, sets_per_pass)
    cache_layers = sorted({layer for layer, _ in passes})
    kl_sum = np.zeros((len(uneurons), n_win))
    dl_sum = np.zeros((len(uneurons), n_win))
    count = tmask.sum(axis=1)
    runner = _Runner(model)
    batches = range(0, n_win, int(batch_size))
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="ablate", unit="batch", leave=False)
    with torch.inference_mode():
        for start in batches:
            stop = min(start + int(batch_size), n_win)
            m = tmask[start:stop].reshape(-1)
            if not m.any():
                continue
            ids = torch.as_tensor(input_ids[start:stop], dtype=torch.long, device=dev)
            rows = torch.as_tensor(np.flatnonzero(m), device=dev)
            win = np.flatnonzero(m) // window + start
            targets = ids.reshape(-1)[rows + 1]
            hid, cache = runner.original(ids, cache_layers)
            orig = _original_terms(runner, hid, rows, targets, model.config.vocab_size)
            for layer, us in passes:
                with stacked_ablation_hooks(model, [uneurons[u] for u in us], d_mlp, mode,
                                            means):
                    hid_a = runner.ablated(ids, layer, cache, copies=len(us))
                for u, copy in zip(us, hid_a.reshape(len(us), -1, hid_a.shape[-1])):
                    kl_rows, ce_a = _kl_ce(runner, copy, rows, orig, targets)
                    np.add.at(kl_sum[u], win, kl_rows)
                    np.add.at(dl_sum[u], win, ce_a - orig.ce)
                del hid_a
            del hid, cache, orig

    return [_result(s, kl_sum[u], dl_sum[u], count) for s, u in zip(sets, which, strict=True)]


def _distinct(sets) -> tuple[list[np.ndarray], list[int]]:
    """(the distinct neuron sets, which of them each set is): identical sets run once."""
    uniq, which = {}, []
    for s in sets:
        key = np.asarray(s.neurons, dtype=np.int64).tobytes()
        which.append(uniq.setdefault(key, len(uniq)))
    return [np.frombuffer(k, dtype=np.int64) for k in uniq], which


def restart_passes(neuron_sets, d_mlp, sets_per_pass=1) -> list[tuple[int, list[int]]]:
    """The restarts of one batch: (layer, indices of the sets stacked in it), at most
    `sets_per_pass` sets each, all starting at their lowest ablated layer; empty sets
    are exactly 0 and get none."""
    if sets_per_pass < 1:
        raise ValueError(f"sets_per_pass must be >= 1, got {sets_per_pass}")
    by_layer = defaultdict(list)
    for u, neurons in enumerate(neuron_sets):
        if len(neurons):
            by_layer[int(np.min(neurons)) // d_mlp].append(u)
    return [(layer, us[i:i + sets_per_pass]) for layer, us in sorted(by_layer.items())
            for i in range(0, len(us), sets_per_pass)]


@dataclass
class _Original:
    """The original model's float64 terms on one batch's evaluated rows (row chunks as
    `_row_chunks` cuts them, so an ablation that changes nothing gives exactly 0)."""
    p: torch.Tensor        # (rows, vocab) P
    mass: torch.Tensor     # (rows,) sum_x P(x), 1 up to rounding
    cross: torch.Tensor    # (rows,) sum_x P(x) log P(x)
    ce: np.ndarray         # (rows,) -log P(next token)


def _row_chunks(n_rows, vocab, chunk_elems=1 << 24) -> list[slice]:
    step = max(1, chunk_elems // max(int(vocab), 1))
    return [slice(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]


def _log_terms(logits, p, mass, targets):
    """(sum_x P(x) log Q(x), -log Q(target)) per row, Q = softmax(logits), in float64.

    log Q = logits - logsumexp(logits), so sum_x P log Q = P . logits - logsumexp * mass:
    one log-sum-exp and one dot product per row, no log-softmax written out (the float64
    pass is the dearest part of an ablation on a large vocabulary). Logits are finite."""
    x = logits.double()
    lse = torch.logsumexp(x, dim=-1)
    dot = torch.bmm(p[:, None, :], x[:, :, None])[:, 0, 0]
    return dot - lse * mass, lse - x.gather(1, targets[:, None])[:, 0]


def _original_terms(runner, hid, rows, targets, vocab) -> _Original:
    flat = hid.reshape(-1, hid.shape[-1])
    parts = []
    for c in _row_chunks(rows.numel(), vocab):
        logits = runner.head(flat[rows[c]])
        x = logits.double()
        p = torch.exp(x - torch.logsumexp(x, dim=-1, keepdim=True))
        mass = p.sum(-1)
        parts.append((p, mass, *_log_terms(logits, p, mass, targets[c])))
    p, mass, cross, ce = (torch.cat(t) for t in zip(*parts))
    return _Original(p, mass, cross, ce.cpu().numpy())


def _kl_ce(runner, hid_a, rows, orig: _Original, targets):
    """Per-row KL(P || Q) = sum P log P - sum P log Q and CE of Q on the targets."""
    flat = hid_a.reshape(-1, hid_a.shape[-1])
    kls, ces = [], []
    for c in _row_chunks(rows.numel(), orig.p.shape[1]):
        cross_q, ce = _log_terms(runner.head(flat[rows[c]]), orig.p[c], orig.mass[c],
                                 targets[c])
        kls.append(orig.cross[c] - cross_q)
        ces.append(ce)
    return torch.cat(kls).cpu().numpy(), torch.cat(ces).cpu().numpy()


def _result(s, kl_w, dl_w, count) -> AblationResult:
    n = int(count.sum())
    has = count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        wkl = np.where(has, kl_w / count, np.nan)
        wdl = np.where(has, dl_w / count, np.nan)
    return AblationResult(
        set=s, kl=float(kl_w.sum() / n) if n else math.nan, kl_se=_se(wkl[has]),
        delta_loss=float(dl_w.sum() / n) if n else math.nan, delta_loss_se=_se(wdl[has]),
        n_positions=n, n_neurons=s.n_neurons, window_kl=wkl, window_delta_loss=wdl)


def _se(x) -> float:
    return float(np.std(x, ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan


_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201,
         2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074,
         2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    """Two-sided 95% Student t quantile (table to df 30, Cornish-Fisher beyond)."""
    if df < 1:
        return math.nan
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


# ---------------------------------------------------------------------------------------
# Plan: the ablation's FLOPs and time, for the dry run


def layer_flops_per_token(d_model, d_mlp, window, gated=False) -> float:
    """Forward FLOPs of one decoder layer per token: the four attention projections, the
    MLP (two matrices, three when gated: OLMo, Llama) and the attention scores and
    values over the causal half of the window on average."""
    projections = 2 * 4 * d_model * d_model
    mlp = 2 * (3 if gated else 2) * d_model * d_mlp
    scores = 2 * 2 * (window / 2) * d_model
    return float(projections + mlp + scores)


def planned_first_layers(n_records, n_layers, control_draws, layerwise=True,
                         all_non_universal=False, first_layer=0) -> list[int]:
    """The lowest ablated layer of every set that `ablation_sets` makes from `n_records`
    records, before the records exist: a set over all layers is taken to start at
    `first_layer` (0: the universal neurons reach the first layer), layer l's sets at l.
    (Empty layer-wise sets, which cost nothing, are counted as full ones.)"""
    per_set = 1 + int(control_draws)
    firsts = [first_layer] * per_set + ([first_layer] if all_non_universal else [])
    if layerwise:
        firsts += [layer for layer in range(n_layers) for _ in range(per_set)]
    return firsts * int(n_records)


def ablation_plan(n_layers, d_model, d_mlp, vocab, window, n_eval_tokens,
                  sets_first_layers, rate_flops, *, gated=False,
                  kl_elements_per_s=None) -> dict:
    """Work and time of ablating one model: every set of `sets_first_layers` (each set's
    lowest ablated layer) over `n_eval_tokens` evaluated positions.

    The blocks run over whole windows (ceil(n_eval_tokens / (window - 1)) of them), the
    LM head only on the evaluated rows. The original runs once per batch; a set whose
    lowest layer is l runs layers l..L-1 and the head (the cached prefix). The previous
    way ("naive": a full forward per set, head on every position) is given for
    comparison. `rate_flops`: the forward's FLOP/s on the device (measured, e.g. tokens/s
    of a forward times n_layers * layer_flops_per_token(...) at its window). The float64
    log-softmax, KL and CE are memory-bound, so they are timed apart, at
    `kl_elements_per_s` (measure_kl_rate; None leaves them out of the time).
    """
    n_windows = math.ceil(int(n_eval_tokens) / max(int(window) - 1, 1))
    positions = n_windows * int(window)                 # what the blocks run over
    layer = layer_flops_per_token(d_model, d_mlp, window, gated)
    head = 2.0 * d_model * vocab
    firsts = [int(f) for f in sets_first_layers]
    if any(not 0 <= f < n_layers for f in firsts):
        raise ValueError(f"sets_first_layers must lie in 0..{n_layers - 1}")
    original = positions * n_layers * layer + n_eval_tokens * head
    ablated = positions * layer * sum(n_layers - f for f in firsts) \
        + len(firsts) * n_eval_tokens * head
    naive = (1 + len(firsts)) * positions * (n_layers * layer + head)
    kl_elements = (1 + len(firsts)) * float(n_eval_tokens) * vocab
    seconds_forward = (original + ablated) / float(rate_flops)
    seconds_kl = kl_elements / float(kl_elements_per_s) if kl_elements_per_s else None
    return dict(
        n_sets=len(firsts), n_eval_tokens=int(n_eval_tokens), n_windows=n_windows,
        positions=positions, layer_flops_per_token=layer, head_flops_per_token=head,
        flops_original=original, flops_ablated=ablated, flops=original + ablated,
        flops_naive=naive, speedup_over_naive=naive / (original + ablated),
        kl_elements=kl_elements, rate_flops=float(rate_flops),
        kl_elements_per_s=kl_elements_per_s, seconds_forward=seconds_forward,
        seconds_kl=seconds_kl, seconds=seconds_forward + (seconds_kl or 0.0))


def describe_ablation_plan(plan: dict) -> str:
    """The plan in one line, as the dry run prints it."""
    from ooc_universal.plan import _hms
    kl = (f" + float64 KL {_hms(plan['seconds_kl'])} at {plan['kl_elements_per_s']:.3g} "
          "elements/s" if plan["seconds_kl"] is not None else "")
    return (f"{plan['n_sets']} sets x {plan['n_eval_tokens']:,} tokens: {plan['flops']:.3g} "
            f"FLOP from each set's first ablated layer ({plan['speedup_over_naive']:.2f}x "
            f"fewer than a full forward per set), ~{_hms(plan['seconds_forward'])} at "
            f"{plan['rate_flops'] / 1e12:.3g} TFLOP/s{kl}; ~{_hms(plan['seconds'])} in all")


def measure_kl_rate(device="cpu", vocab=50257, rows=256, seconds=0.3) -> float:
    """Elements (rows x vocab) per second of the per-set float64 work (log-sum-exp of Q,
    KL(P || Q), CE) on `device`, timed through the step's own code on random logits."""
    import time
    dev = resolve_device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(2, rows, vocab, generator=gen).to(dev)
    every_row = torch.arange(rows, device=dev)
    targets = torch.zeros(rows, dtype=torch.long, device=dev)
    head = _Identity()
    orig = _original_terms(head, logits[0], every_row, targets, vocab)
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < seconds:
        _kl_ce(head, logits[1], every_row, orig, targets)   # returns numpy: synchronised
        n += rows * vocab
    return n / (time.perf_counter() - t0)


class _Identity:
    """A runner whose head is the identity: _kl_ce on given logits."""
    @staticmethod
    def head(x):
        return x


# ---------------------------------------------------------------------------------------
# The step: RUN/universal/sets.json + RUN/tokens -> RUN/ablate/


_FILTERS = ("reference", "thresholds")  # choose records; the records themselves are keyed


@dataclass
class AblateOutput:
    csv: Path
    json: Path
    draws_csv: Path
    rows: list[dict]
    n_models: int
    n_resumed: int


@dataclass
class _EvalInputs:
    """What every model of one ablate run is evaluated on, and where its inputs are."""
    run_dir: Path
    settings: AblateConfig
    config: dict              # the settings as recorded in ablation.json
    ids: np.ndarray           # (n_windows, window) held-out windows
    valid: np.ndarray         # (n_windows, window) bool
    eval_hash: str
    token_hash: str | None
    device: torch.device
    overrides: dict
    reduce_index: list
    progress: bool


def ablate(run_dir, settings: AblateConfig = AblateConfig(),
           compute: ComputeConfig = ComputeConfig(), *, reference=None, thresholds=None,
           n_eval_tokens=None, model_overrides=None, universal_id=None,
           progress=True) -> AblateOutput:
    """Run the ablation step and write RUN/ablate/{ablation.csv, ablation.json,
    ablation_draws.csv}.

    Reads RUN/universal/sets.json (baseline draw 0 records only; `reference` and
    `thresholds` choose among them), the token set's eval split (the first
    `n_eval_tokens` positions of T, default all) and, to find each reference model and
    (mode "mean") its means, RUN/reduce/*.h5. `model_overrides` maps
    "reference@checkpoint" (or "reference", or the model's label) to a model spec.
    Finished models are kept in RUN/ablate/parts/ under a name hashed from everything
    they depend on, so a re-run redoes only what is missing or changed. The caller
    holds the run lock (the CLI does).

    Every input is verified before use: sets.json against its sidecar and provenance
    (formats.sets.check_sets_provenance; `universal_id`: the id the calling run's own
    universal step returned, so sets rewritten under a running pipeline are refused),
    each reduce file against its sidecar (rundir.verify_file): one line otherwise.
    """
    run_dir = Path(run_dir)
    sets = read_sets(run_dir)
    records = _select(sets.sets, reference, thresholds)
    ids, valid, token_meta = _eval_tokens(run_dir, n_eval_tokens)
    # this run's sets, as written: sidecar, token set, the reduce files they were made
    # from unchanged, and (given by `run`) the universal_id its own universal step made
    check_sets_provenance(run_dir, sets, token_meta.get("hash"), universal_id)
    inputs = _EvalInputs(
        run_dir, settings, _config_record(settings, n_eval_tokens, reference, thresholds),
        ids, valid, _sha(ids.tobytes(), target_mask(valid).tobytes(), str(ids.shape).encode()),
        token_meta.get("hash"), resolve_device(compute.device), dict(model_overrides or {}),
        _reduce_index(run_dir), progress)
    groups = defaultdict(list)
    for rec in records:
        groups[(str(rec.reference), json.dumps(rec.checkpoint))].append(rec)
    for recs in groups.values():   # a set that cannot be built fails before any model loads
        _sets_for(recs, settings)

    step_dir(run_dir, "ablate")
    draw_rows, summary_rows, models, n_resumed = [], [], {}, 0
    for (ref, _), recs in groups.items():
        part, models[f"{ref}@{recs[0].checkpoint}"], resumed = _model_part(recs, inputs)
        n_resumed += resumed
        draw_rows += part.draw_rows
        summary_rows += part.summary_rows

    result = AblationFile(
        config=inputs.config, inputs=dict(
            sets_json_sha256=sets.sha256, token_hash=inputs.token_hash,
            eval_hash=inputs.eval_hash, n_eval_windows=int(ids.shape[0]),
            n_eval_positions=int(target_mask(valid).sum())),
        models=models, rows=summary_rows, conventions=CONVENTIONS,
        toolkit_version=__version__)
    record = {"step": "ablate", "token_hash": inputs.token_hash,
              "config_hash": config_hash(inputs.config),
              "inputs": {"universal/sets.json": sets.sha256}}
    paths = write_ablation(run_dir, result, draw_rows, record)
    return AblateOutput(csv=paths["csv"], json=paths["json"], draws_csv=paths["draws_csv"],
                        rows=summary_rows, n_models=len(groups), n_resumed=n_resumed)


def _config_record(settings: AblateConfig, n_eval_tokens, reference, thresholds) -> dict:
    """The settings that the results depend on, as ablation.json records them."""
    return dict(mode=settings.mode, control_draws=settings.control_draws, seed=settings.seed,
                all_non_universal=settings.all_non_universal, layerwise=settings.layerwise,
                n_eval_tokens=n_eval_tokens, reference=reference,
                thresholds=None if thresholds is None else [float(t) for t in thresholds])


def _model_part(recs: list[UniversalSet],
                inputs: _EvalInputs) -> tuple[AblationPart, dict, bool]:
    """One reference model's rows: from RUN/ablate/parts when already done, else computed
    and saved there. Returns (part, its ablation.json "models" entry, resumed)."""
    spec, label = _model_spec(recs[0], inputs.overrides, inputs.reduce_index)
    means, means_src = (None, None)
    if inputs.settings.mode == "mean":
        means, means_src = _means(recs[0], inputs.reduce_index, inputs.token_hash)
    key = _sha(json.dumps(dict(
        config={k: v for k, v in inputs.config.items() if k not in _FILTERS},
        label=label, eval_hash=inputs.eval_hash,
        means=None if means is None else _sha(means.tobytes()),
        records=[_record_key(r) for r in recs]), sort_keys=True, default=str).encode())
    path = part_path(inputs.run_dir, label, key)
    entry = dict(spec=spec, label=label, part=path.name, means=means_src)
    part = read_part(path)
    if part is not None:
        return part, entry, True
    part = AblationPart(key, *_run_model(spec, recs, inputs, means))
    write_part(path, part)
    return part, entry, False


def _select(sets: list[UniversalSet], reference, thresholds) -> list[UniversalSet]:
    recs = [r for r in sets if (r.draw or 0) == 0]
    if not recs:
        raise OocError("sets.json holds no universal sets; re-run `ooc-universal universal`")
    if reference is not None:
        have = sorted({str(r.reference) for r in recs})
        recs = [r for r in recs if str(r.reference) in _reference_names(reference)]
        if not recs:
            raise OocError(f"--reference {reference!r} is not in sets.json; "
                           f"expected one of {have}")
    if thresholds is not None:
        have = sorted({float(r.threshold) for r in recs})
        want = [float(t) for t in thresholds]
        missing = [t for t in want if not any(math.isclose(t, h) for h in have)]
        if missing or not want:
            raise OocError(f"--thresholds {missing or want} not in sets.json; expected some "
                           f"of {have}")
        recs = [r for r in recs if any(math.isclose(float(r.threshold), t) for t in want)]
    return recs


def _reference_names(reference) -> set[str]:
    """`reference` as given, and the model name it parses to ("a" -> alias-gpt2-small-x21)."""
    from ooc_universal.models import parse_model_spec
    names = {str(reference)}
    try:
        names.add(parse_model_spec(str(reference)).name)
    except OocError:
        pass
    return names


def _eval_tokens(run_dir, n_eval_tokens):
    ts = load_token_set(run_dir)
    ids, valid = np.asarray(ts.eval_input_ids), np.asarray(ts.eval_valid, dtype=bool)
    meta = dict(getattr(ts, "meta", {}) or {})
    if ids.size and ts.pad_token_id is not None:
        valid = valid & ~_before_padding(ids, int(ts.pad_token_id))
    tm = target_mask(valid)
    have = int(tm.sum())
    if have == 0:
        raise OocError("the token set has no held-out evaluation positions; re-run "
                       "`ooc-universal tokens` with some evaluation tokens")
    if n_eval_tokens is not None:
        n = int(n_eval_tokens)
        if n < 1 or n > have:
            raise OocError(f"--n-eval-tokens {n} is outside 1..{have} (the evaluated "
                           "positions of the token set's eval split); pass a smaller number "
                           "or re-run `ooc-universal tokens` with more evaluation tokens")
        flat = tm.reshape(-1)
        cut = np.flatnonzero(flat)[n - 1]            # the n-th evaluated position
        keep_valid = valid.copy().reshape(-1)
        keep_valid[cut + 1:] = False
        n_rows = cut // valid.shape[1] + 1
        ids, valid = ids[:n_rows], keep_valid.reshape(valid.shape)[:n_rows]
    return ids, valid, meta


def _before_padding(ids, pad_id) -> np.ndarray:
    """True where the NEXT token is trailing padding (the token set pads a short last
    window with its pad id: BOS, else EOS): such a position has no true next token."""
    real = ids != pad_id
    last_real = ids.shape[1] - 1 - np.argmax(real[:, ::-1], axis=1)   # (n,) last non-pad
    last_real[~real.any(axis=1)] = 0
    cols = np.arange(ids.shape[1])
    return cols[None, :] + 1 > last_real[:, None]


def _reduce_index(run_dir) -> list[tuple[Path, dict]]:
    """(path, attributes) of each reduce file: they name the reference models. Each is
    verified against its checksum sidecar first (formats.reduced.verify_reduced: its
    attributes and per-neuron arrays): a damaged, untrusted or foreign one is refused
    with one line, never skipped (a skipped file would let another file name the model,
    or the means come from it)."""
    from ooc_universal.formats.reduced import verify_reduced
    out = []
    for path in list_reduced(run_dir):
        out.append((path, verify_reduced(path)))
    return out


def _names(attrs, side) -> set[str]:
    label, name = str(attrs.get(f"{side}_label", "")), str(attrs.get(f"{side}_name", ""))
    return {label, name, label.split("@")[0], Path(name).name,
            str(attrs.get(f"{side}_model_id", ""))} - {""}


def _same_step(checkpoint, step) -> bool:
    if checkpoint in (None, "", -1):
        return step in (None, -1)
    try:
        return int(checkpoint) == int(step)
    except (TypeError, ValueError):
        return str(checkpoint) == str(step)


def _reduce_for(rec: UniversalSet, index, need_other=True):
    hits = [(p, a) for p, a in index
            if str(rec.reference) in _names(a, "ref")
            and _same_step(rec.checkpoint, a.get("ref_step"))
            and (not need_other or str(rec.other) in _names(a, "other"))]
    return hits


def _model_spec(rec: UniversalSet, overrides, index) -> tuple[str, str]:
    from ooc_universal.models import parse_model_spec
    ref, ck = str(rec.reference), rec.checkpoint
    hits = _reduce_for(rec, index, need_other=False)
    names = {f"{ref}@{ck}", ref} | {str(a.get("ref_label")) for _, a in hits}
    for key, spec in overrides.items():
        if key in names or _spec_names(key, ref, ck):
            return str(spec), parse_model_spec(str(spec)).label
    if not hits:
        raise OocError(f"no reduced statistics in RUN/reduce name reference {ref!r} at "
                       f"checkpoint {ck!r}, so its model is unknown; run `ooc-universal "
                       f"reduce` first or pass --model {ref}@{ck}=SPEC")
    attrs = hits[0][1]
    label = str(attrs["ref_label"])
    for spec in _spec_candidates(str(attrs["ref_model_id"]), attrs.get("ref_step", -1)):
        try:
            if parse_model_spec(spec).label == label:
                return spec, label
        except (OocError, ValueError):
            continue
    raise OocError(f"cannot rebuild the model spec of {label!r} from model id "
                   f"{attrs['ref_model_id']!r} (step {attrs.get('ref_step')}); pass "
                   f"--model {ref}@{ck}=SPEC")


def _spec_names(key, ref, ck) -> bool:
    """Does override key `key` (e.g. "a@100000") parse to reference `ref` at step `ck`?"""
    from ooc_universal.models import parse_model_spec
    try:
        spec = parse_model_spec(key)
    except OocError:
        return False
    return spec.name == ref and _same_step(ck, -1 if spec.step is None else spec.step)


def _spec_candidates(model_id, step) -> list[str]:
    step = -1 if step is None else int(step)
    out = [f"{model_id}@{step}"] if step >= 0 else []
    out.append(model_id)
    p = Path(model_id)
    if step >= 0 and p.name == f"checkpoint-{step}":
        out.append(f"{p.parent}@{step}")
    return out


def _means(rec: UniversalSet, index, token_hash) -> tuple[np.ndarray, str]:
    """The reference's per-neuron means over the correlation tokens (ref/mean)."""
    hits = _reduce_for(rec, index) or _reduce_for(rec, index, need_other=False)
    if not hits:
        raise OocError(f"--mode mean needs the reference's mean activations from "
                       f"RUN/reduce, but no file there matches {rec.describe()}; run "
                       "`ooc-universal reduce` first or use --mode zero")
    path, attrs = hits[0]
    if token_hash is not None and attrs.get("token_hash") not in (None, token_hash):
        raise OocError(f"{path.name} was reduced from token set "
                       f"{str(attrs['token_hash'])[:12]}, RUN/tokens holds {token_hash[:12]}; "
                       "its means are stale: re-run extract and reduce, or use --mode zero")
    with open_reduced(path) as stats:
        means = np.asarray(stats.ref_mean, dtype=np.float64)
    return means, path.name


def _record_key(rec: UniversalSet) -> dict:
    key = rec.to_json()
    del key["neurons"]
    key["neurons_sha256"] = _sha(np.asarray(rec.neurons, np.int64).tobytes())
    return key


def _sets_for(recs, settings: AblateConfig, n_layers=None, d_mlp=None) -> list[AblationSet]:
    return ablation_sets(recs, n_layers, d_mlp, control_draws=settings.control_draws,
                         seed=settings.seed,
                         include_all_non_universal=settings.all_non_universal,
                         layerwise=settings.layerwise)


def _run_model(spec, recs, inputs: _EvalInputs, means) -> tuple[list[dict], list[dict]]:
    """Load the model, evaluate every set of `recs`: (draw rows, summary rows)."""
    from ooc_universal.models import load_model
    with _hf_progress(inputs.progress):
        loaded = load_model(spec, device=str(inputs.device), dtype=torch.float32)
    model = loaded.model
    n_layers, d_mlp = model_dims(model)
    sets = _sets_for(recs, inputs.settings, n_layers, d_mlp)
    if inputs.progress:
        print(f"ablate: {loaded.spec.label}: {len(sets)} sets over {inputs.ids.shape[0]} "
              "windows", file=sys.stderr)
    mode = inputs.settings.mode
    results = evaluate_ablations(model, sets, inputs.ids, inputs.valid,
                                 batch_size=inputs.settings.batch_size or None, mode=mode,
                                 means=means, device="auto", progress=inputs.progress)
    del model, loaded
    return [_draw_row(r, mode) for r in results], summarise(results, mode)


@contextmanager
def _hf_progress(enabled):
    """transformers' weight-loading bar follows our --quiet."""
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def _ident(s: AblationSet, mode) -> dict:
    return dict(reference=s.reference, other=s.other, checkpoint=s.checkpoint,
                threshold=s.threshold, definition=s.definition, mode=mode, set=s.kind,
                layer=s.layer)


def _draw_row(r: AblationResult, mode) -> dict:
    return dict(_ident(r.set, mode), draw=r.set.draw, **r.as_dict())


def summarise(results: list[AblationResult], mode="zero") -> list[dict]:
    """One row per universal / all-non-universal set, one per group of control draws.

    Control rows: kl and delta_loss are the means over draws; *_se the standard error
    over sequences of the draw-averaged per-window values; *_ci_low/high the 95%
    t-interval of the mean over draws (empty with one draw).
    """
    groups = defaultdict(list)
    for r in results:
        s = r.set
        groups[(s.reference, s.other, json.dumps(s.checkpoint), s.threshold, s.definition,
                s.kind, str(s.layer))].append(r)
    rows = []
    for rs in groups.values():
        row = dict(_ident(rs[0].set, mode), n_neurons=rs[0].n_neurons,
                   n_positions=rs[0].n_positions, n_draws=len(rs))
        if rs[0].set.kind != "control":
            row.update(draw=0, **{k: getattr(rs[0], k) for k in
                                  ("kl", "kl_se", "delta_loss", "delta_loss_se")})
            for m in ("kl", "delta_loss"):
                row[f"{m}_ci_low"] = row[f"{m}_ci_high"] = math.nan
        else:
            row["draw"] = "mean"
            for m in ("kl", "delta_loss"):
                row.update(_over_draws(rs, m))
        rows.append(row)
    return rows


def _over_draws(rs: list[AblationResult], m: str) -> dict:
    """Metric `m` of a group of control draws: mean, its se, and the 95% interval."""
    vals = np.array([getattr(r, m) for r in rs])
    win = np.stack([getattr(r, f"window_{m}") for r in rs])
    win = win[:, ~np.isnan(win[0])].mean(axis=0)   # the draws share windows
    mean = float(vals.mean())
    half = (t975(len(vals) - 1) * float(vals.std(ddof=1)) / math.sqrt(len(vals))
            if len(vals) > 1 else math.nan)
    return {m: mean, f"{m}_se": _se(win), f"{m}_ci_low": mean - half,
            f"{m}_ci_high": mean + half}


def _sha(*chunks: bytes) -> str:
    """sha256 (64 hex) of byte strings: the content keys of eval tokens, means and parts.
    (rundir has hashers for files and JSON-able objects, not for raw bytes.)"""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()
