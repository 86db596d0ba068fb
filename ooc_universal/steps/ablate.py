"""Ablation: switch off sets of MLP neurons and measure how the predictions move.

Conventions (the README and `ooc-universal ablate --help` repeat them):

- Intervention. Zero-ablation sets a neuron's post-GELU activation (the input of the
  MLP output projection, `models.mlp_out_proj`) to 0, so its row of the projection
  (GPT-2 Conv1D `c_proj.weight[neuron, :]`, layout (d_mlp, d_model)) contributes
  nothing; the projection's bias stays. Mean-ablation (`mode="mean"`) sets it to the
  neuron's mean activation over the correlation tokens (`ref/mean` of the reduced
  statistics) instead. A forward pre-hook on the projection does either.
- Positions. Position t of a window predicts the token at t+1. The evaluated positions
  T are those with `valid[t]` true and a next token inside the window (so the last
  column never counts). `valid` is the token set's mask: BOS/pad and newline positions
  are already False there; the step also drops a position whose next token is the
  trailing padding of a short last window.
- KL = (1/|T|) sum_{t in T} sum_x P_t(x) log(P_t(x) / Q_t(x)), P = original model,
  Q = ablated model (KL(P_original || Q_ablated)), from float64 log_softmax of the
  logits. delta loss = CE(ablated) - CE(original), the mean over T of
  -log Q_t(next token) + log P_t(next token).
- Standard errors are over sequences: each window's mean over its positions in T, then
  std (ddof=1) / sqrt(number of windows with at least one position).
- Controls are drawn (numpy Generator, seeded from `seed` and the set's identity) from
  the neurons that are NOT universal for the same reference, other model, checkpoint
  and threshold, with the universal set's count in every layer. With K draws the
  summary row gives the mean over draws and a 95% t-interval of that mean.

Efficiency: per batch of windows the original model runs once, keeping its float64
log-probabilities at T and the residual stream entering each block that some set
needs. An ablation whose lowest layer is l restarts from block l's cached input and
runs blocks l..L-1, the final layer norm and the LM head (on T's rows only). Identical
neuron sets are evaluated once; empty sets are exactly 0 and cost nothing.
"""
from __future__ import annotations

import csv
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
from ooc_universal.errors import OocError
from ooc_universal.rundir import atomic_path, config_hash, step_dir, write_json_atomic
from ooc_universal.formats.store import plain_attr as _plain

KINDS = ("universal", "control", "all-non-universal")
MODES = ("zero", "mean")

CONVENTIONS = (
    "Zero-ablation sets a neuron's post-GELU MLP activation to 0 (its output-projection row "
    "contributes nothing; the bias stays); mean-ablation sets it to its mean over the "
    "correlation tokens. Position t predicts token t+1; T = positions with valid[t] and a "
    "next token in the window. KL = KL(P_original || Q_ablated) averaged over T, from "
    "float64 log_softmax; delta_loss = CE(ablated) - CE(original) on the true next tokens. "
    "*_se: standard error over sequences (per-window means, std/sqrt(n_windows)). Control "
    "rows: mean over draws of non-universal neurons matched per layer, *_ci_low/high = 95% "
    "t-interval of that mean over draws.")


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


def ablation_sets(sets_json, n_layers=None, d_mlp=None, control_draws=5, seed=0,
                  include_all_non_universal=False, layerwise=True) -> list[AblationSet]:
    """The ablation sets of the universal step's records.

    `sets_json`: a path to sets.json, its parsed dict, a list of its records, or one
    record. Per record: the universal set over all layers; `control_draws` controls
    matched to it per layer; optionally every non-universal neuron; and, with
    `layerwise`, each layer's universal neurons alone with controls from that layer
    (every layer, also those with no universal neuron: their sets are empty).
    `n_layers`/`d_mlp` default to the record's own and must agree with it when given.
    Raises OocError when a layer has fewer non-universal than universal neurons.
    """
    records = _records_of(sets_json)
    if control_draws < 0:
        raise ValueError(f"control_draws must be >= 0, got {control_draws}")
    out = []
    for rec in records:
        out.extend(_sets_of_record(rec, n_layers, d_mlp, int(control_draws), int(seed),
                                   include_all_non_universal, layerwise))
    return out


def _records_of(sets_json) -> list[dict]:
    if isinstance(sets_json, (str, Path)):
        sets_json = json.loads(Path(sets_json).read_text())
    if isinstance(sets_json, dict) and "sets" in sets_json:
        return list(sets_json["sets"])
    if isinstance(sets_json, dict):
        return [sets_json]
    return list(sets_json)


def _record_dims(rec, n_layers, d_mlp) -> tuple[int, int]:
    nl = rec.get("n_layers", n_layers)
    dm = rec.get("d_mlp", d_mlp)
    for name, given, own in (("n_layers", n_layers, nl), ("d_mlp", d_mlp, dm)):
        if own is None:
            raise OocError(f"sets.json record {_record_id(rec)} has no {name}; pass {name}=")
        if given is not None and int(given) != int(own):
            raise OocError(f"sets.json record {_record_id(rec)} has {name}={own}, the model "
                           f"has {given}; is --model pointing at the wrong model?")
    return int(nl), int(dm)


def _record_id(rec) -> str:
    return (f"(reference {rec.get('reference')!r}, other {rec.get('other')!r}, checkpoint "
            f"{rec.get('checkpoint')!r}, threshold {rec.get('threshold')!r})")


def _sets_of_record(rec, n_layers, d_mlp, draws, seed, all_non_universal, layerwise):
    nl, dm = _record_dims(rec, n_layers, d_mlp)
    uni = np.unique(np.asarray(rec.get("neurons", []), dtype=np.int64))
    if uni.size and (uni[0] < 0 or uni[-1] >= nl * dm):
        raise OocError(f"sets.json record {_record_id(rec)} has neuron index {int(uni[-1])} "
                       f"outside 0..{nl * dm - 1} (n_layers {nl} x d_mlp {dm}); "
                       "re-run `ooc-universal universal`")
    is_uni = np.zeros(nl * dm, dtype=bool)
    is_uni[uni] = True
    pools = [np.flatnonzero(~is_uni[l * dm:(l + 1) * dm]) + l * dm for l in range(nl)]
    counts = np.bincount(uni // dm, minlength=nl)
    ident = dict(reference=rec.get("reference"), other=rec.get("other"),
                 checkpoint=rec.get("checkpoint"), threshold=rec.get("threshold"),
                 definition=rec.get("definition"))

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
                    f"cannot draw a matched control for {_record_id(rec)}: layer {l} has "
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


class _Runner:
    """Original forward with cached block inputs; ablated forwards restarted from them.

    GPT-2 layout (`model.transformer.h`, `.ln_f`, `model.lm_head`): each block is called
    with the very arguments (mask, position ids) the model passed it in the original
    run, so a restart computes exactly what a full forward computes. Other layouts fall
    back to a full forward for every ablation.
    """

    def __init__(self, model):
        self.model = model
        tr = getattr(model, "transformer", None)
        self.blocks = getattr(tr, "h", None)
        self.ln_f = getattr(tr, "ln_f", None)
        self.lm_head = getattr(model, "lm_head", None)
        self.restartable = None not in (self.blocks, self.ln_f, self.lm_head)

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
            out = self.model.transformer(ids, use_cache=False).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        return out, cache

    def ablated(self, ids, layer, cache):
        """Hidden at the head's input (or logits) with whatever ablation hooks are on."""
        if not self.restartable:
            return self.model(ids, use_cache=False).logits
        h = cache[layer][0]
        for i in range(layer, len(self.blocks)):
            _, args, kwargs = cache[i]
            h = self.blocks[i](h, *args, **kwargs)
            h = h[0] if isinstance(h, tuple) else h
        return self.ln_f(h)

    def head(self, rows_hidden):
        return self.lm_head(rows_hidden) if self.restartable else rows_hidden


def _proj(model, layer):
    from ooc_universal.models import mlp_out_proj
    return mlp_out_proj(model, layer)


def model_dims(model) -> tuple[int, int]:
    """(n_layers, d_mlp) of a GPT-2-family model, read from its modules."""
    cfg = model.config
    n_layers = int(getattr(cfg, "n_layer", None) or cfg.num_hidden_layers)
    proj = _proj(model, 0)
    d_mlp = getattr(proj, "nx", None) or proj.in_features
    return n_layers, int(d_mlp)


@contextmanager
def ablation_hooks(model, neurons, d_mlp, mode="zero", means=None):
    """Forward pre-hooks on each touched layer's output projection, removed on exit.

    `neurons`: flat indices; `means` ((n_layers * d_mlp,) array) is required for
    mode "mean". The hook replaces the chosen columns of the projection's input
    (the post-GELU activations) by 0 or by their means.
    """
    neurons = np.asarray(neurons, dtype=np.int64)
    handles = []
    try:
        for layer in np.unique(neurons // d_mlp):
            cols = neurons[neurons // d_mlp == layer] - layer * d_mlp
            proj = _proj(model, int(layer))
            dev = next(proj.parameters()).device
            idx = torch.as_tensor(cols, device=dev)
            vals = None
            if mode == "mean":
                vals = torch.as_tensor(np.asarray(means, dtype=np.float64)[cols + layer * d_mlp],
                                       device=dev)
            handles.append(proj.register_forward_pre_hook(_column_hook(idx, vals)))
        yield
    finally:
        for h in handles:
            h.remove()


def _column_hook(idx, vals):
    def hook(module, args):
        x = args[0]
        if vals is None:
            x = x.index_fill(-1, idx, 0.0)
        else:
            x = x.clone()
            x[..., idx] = vals.to(x.dtype)
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


def resolve_device(device="auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise OocError(f"--device {device!r} is not a torch device; use auto, cpu, cuda "
                       "or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OocError(f"--device {device!r}: no CUDA GPU is visible; use --device cpu")
    return dev


def auto_batch_size(window, vocab, n_layers, d_model, d_mlp, device) -> int:
    """Windows per batch so the per-batch tensors fit a budget (CPU 1 GB, GPU 1/4 free)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 4
    else:
        budget = 1 << 30
    # float64 log P and float32 logits at every position, the cached residual of every
    # block, one block's MLP activations and attention scores, with room for temporaries.
    per_window = window * (vocab * 12 + (n_layers + 4) * d_model * 4 + 2 * d_mlp * 4)
    per_window += 4 * window * window * 4
    return max(1, int(budget // (2 * per_window)))


def evaluate_ablations(model, sets, input_ids, valid, batch_size=None, mode="zero",
                       means=None, device="auto", progress=False) -> list[AblationResult]:
    """KL(P_original || Q_ablated) and delta loss of each set, over positions T.

    `input_ids`, `valid`: (n_windows, window) arrays (the token set's eval split); T as
    in `target_mask`. `device="auto"` keeps the model where it is; another device moves
    it there. Memory is bounded by `batch_size` windows (default: `auto_batch_size`).
    Results come back in the order of `sets`.
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
        raise ValueError(f"input_ids {input_ids.shape} and valid {tmask.shape} differ in shape")
    n_win, window = input_ids.shape
    if batch_size is None:
        d_model = int(model.config.n_embd if hasattr(model.config, "n_embd")
                      else model.config.hidden_size)
        batch_size = auto_batch_size(window, int(model.config.vocab_size), n_layers,
                                     d_model, d_mlp, dev)

    # Identical neuron sets are evaluated once; empty ones not at all.
    uniq, which = {}, []
    for s in sets:
        key = np.asarray(s.neurons, dtype=np.int64).tobytes()
        which.append(uniq.setdefault(key, len(uniq)))
    uneurons = [np.frombuffer(k, dtype=np.int64) for k in uniq]
    start_layer = [int(n.min() // d_mlp) if n.size else None for n in uneurons]
    cache_layers = sorted({l for l in start_layer if l is not None})

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
            lp = torch.log_softmax(_rows(runner, hid, rows).double(), dim=-1)
            ce_o = (-lp.gather(1, targets[:, None])[:, 0]).cpu().numpy()
            for u, neurons in enumerate(uneurons):
                if start_layer[u] is None:
                    continue
                with ablation_hooks(model, neurons, d_mlp, mode, means):
                    hid_a = runner.ablated(ids, start_layer[u], cache)
                kl_rows, ce_a = _kl_ce(runner, hid_a, rows, lp, targets)
                np.add.at(kl_sum[u], win, kl_rows)
                np.add.at(dl_sum[u], win, ce_a - ce_o)
            del hid, cache, lp

    return [_result(s, kl_sum[u], dl_sum[u], count) for s, u in zip(sets, which, strict=True)]


def _rows(runner, hid, rows):
    return runner.head(hid.reshape(-1, hid.shape[-1])[rows])


def _kl_ce(runner, hid_a, rows, lp, targets, chunk_elems=1 << 24):
    """Per-row KL(P || Q) and CE of Q on the targets, float64, in chunks of rows."""
    step = max(1, chunk_elems // lp.shape[1])
    flat = hid_a.reshape(-1, hid_a.shape[-1])
    kls, ces = [], []
    for a in range(0, rows.numel(), step):
        b = min(a + step, rows.numel())
        lq = torch.log_softmax(runner.head(flat[rows[a:b]]).double(), dim=-1)
        lp_c = lp[a:b]
        p = lp_c.exp()
        kls.append(torch.where(p > 0, p * (lp_c - lq), 0.0).sum(-1))
        ces.append(-lq.gather(1, targets[a:b, None])[:, 0])
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
# The step: RUN/universal/sets.json + RUN/tokens -> RUN/ablate/


SUMMARY_COLUMNS = ["reference", "other", "checkpoint", "threshold", "definition", "mode",
                   "set", "layer", "draw", "n_draws", "n_neurons", "n_positions",
                   "kl", "kl_se", "kl_ci_low", "kl_ci_high",
                   "delta_loss", "delta_loss_se", "delta_loss_ci_low", "delta_loss_ci_high"]
DRAW_COLUMNS = ["reference", "other", "checkpoint", "threshold", "definition", "mode", "set",
                "layer", "draw", "n_neurons", "n_positions", "kl", "kl_se", "delta_loss",
                "delta_loss_se"]


_FILTERS = ("reference", "thresholds")  # choose records; the records themselves are keyed


@dataclass
class AblateOutput:
    csv: Path
    json: Path
    draws_csv: Path
    rows: list[dict]
    n_models: int
    n_resumed: int


def ablate(run_dir, reference=None, thresholds=None, control_draws=5, mode="zero",
           all_non_universal=False, layerwise=True, n_eval_tokens=None, batch_size=None,
           device="auto", model_overrides=None, progress=True, seed=0) -> AblateOutput:
    """Run the ablation step and write RUN/ablate/{ablation.csv, ablation.json,
    ablation_draws.csv}.

    Reads RUN/universal/sets.json (baseline draw 0 records only), the token set's eval
    split (the first `n_eval_tokens` positions of T, default all) and, to find each
    reference model and (mode "mean") its means, RUN/reduce/*.h5. `model_overrides`
    maps "reference@checkpoint" (or "reference", or the model's label) to a model spec.
    Finished models are kept in RUN/ablate/parts/ under a name hashed from everything
    they depend on, so a re-run redoes only what is missing or changed. The caller
    holds the run lock (the CLI does).
    """
    if mode not in MODES:
        raise OocError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if control_draws < 0:
        raise OocError(f"--control-draws must be >= 0, got {control_draws}")
    run_dir = Path(run_dir)
    sets_path = run_dir / "universal" / "sets.json"
    if not sets_path.is_file():
        raise OocError(f"no universal sets at {str(sets_path)!r}: run "
                       "`ooc-universal universal` first")
    sets_bytes = sets_path.read_bytes()
    records = _select(json.loads(sets_bytes), reference, thresholds)
    ids, valid, token_meta = _eval_tokens(run_dir, n_eval_tokens)
    eval_hash = _sha(ids.tobytes(), target_mask(valid).tobytes(), str(ids.shape).encode())
    dev = resolve_device(device)
    overrides = dict(model_overrides or {})
    reduce_index = _reduce_index(run_dir)
    config = dict(mode=mode, control_draws=int(control_draws), seed=int(seed),
                  all_non_universal=bool(all_non_universal), layerwise=bool(layerwise),
                  n_eval_tokens=n_eval_tokens, reference=reference,
                  thresholds=None if thresholds is None else [float(t) for t in thresholds])

    groups = defaultdict(list)
    for rec in records:
        groups[(str(rec["reference"]), json.dumps(rec.get("checkpoint")))].append(rec)
    for recs in groups.values():   # a set that cannot be built fails before any model loads
        _sets_for(recs, config)

    out_dir = step_dir(run_dir, "ablate")
    parts_dir = out_dir / "parts"
    parts_dir.mkdir(exist_ok=True)
    draw_rows, summary_rows, models, n_resumed = [], [], {}, 0
    for (ref, _), recs in groups.items():
        spec, label = _model_spec(recs[0], overrides, reduce_index)
        means, means_src = (None, None)
        if mode == "mean":
            means, means_src = _means(recs[0], reduce_index, token_meta.get("hash"))
        key = _sha(json.dumps(dict(
            config={k: v for k, v in config.items() if k not in _FILTERS},
            label=label, eval_hash=eval_hash,
            means=None if means is None else _sha(means.tobytes()),
            records=[_record_key(r) for r in recs]), sort_keys=True, default=str).encode())
        part = parts_dir / f"{_safe(label)}-{key[:16]}.json"
        models[f"{ref}@{recs[0].get('checkpoint')}"] = dict(spec=spec, label=label,
                                                            part=part.name,
                                                            means=means_src)
        if part.is_file():
            done = json.loads(part.read_text())
            n_resumed += 1
        else:
            done = _run_model(spec, recs, ids, valid, config, means, batch_size, dev,
                              progress)
            done["key"] = key
            write_json_atomic(part, done)
        draw_rows += done["draw_rows"]
        summary_rows += done["summary_rows"]

    inputs = dict(sets_json_sha256=_sha(sets_bytes), token_hash=token_meta.get("hash"),
                  eval_hash=eval_hash, n_eval_windows=int(ids.shape[0]),
                  n_eval_positions=int(target_mask(valid).sum()))
    doc = dict(step="ablate", toolkit_version=__version__, config=config, inputs=inputs,
               models=models, conventions=CONVENTIONS, columns=SUMMARY_COLUMNS,
               rows=[_json_row(r) for r in summary_rows])
    paths = (out_dir / "ablation.csv", out_dir / "ablation.json",
             out_dir / "ablation_draws.csv")
    record = {"step": "ablate", "token_hash": token_meta.get("hash"),
              "config_hash": config_hash(config),
              "inputs": {"universal/sets.json": inputs["sets_json_sha256"]}}
    _write_csv(paths[2], DRAW_COLUMNS, draw_rows, record)
    _write_csv(paths[0], SUMMARY_COLUMNS, summary_rows, record)
    write_json_atomic(paths[1], doc, record)
    return AblateOutput(csv=paths[0], json=paths[1], draws_csv=paths[2], rows=summary_rows,
                        n_models=len(groups), n_resumed=n_resumed)


def _select(doc, reference, thresholds) -> list[dict]:
    recs = [r for r in doc.get("sets", []) if int(r.get("draw", 0) or 0) == 0]
    if not recs:
        raise OocError("sets.json holds no universal sets; re-run `ooc-universal universal`")
    if reference is not None:
        have = sorted({str(r["reference"]) for r in recs})
        recs = [r for r in recs if str(r["reference"]) in _reference_names(reference)]
        if not recs:
            raise OocError(f"--reference {reference!r} is not in sets.json; "
                           f"expected one of {have}")
    if thresholds is not None:
        have = sorted({float(r["threshold"]) for r in recs})
        want = [float(t) for t in thresholds]
        missing = [t for t in want if not any(math.isclose(t, h) for h in have)]
        if missing:
            raise OocError(f"--thresholds {missing} not in sets.json; expected some of {have}")
        recs = [r for r in recs if any(math.isclose(float(r["threshold"]), t) for t in want)]
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
    from ooc_universal.steps.tokens import load_token_set
    ts = load_token_set(run_dir)
    ids, valid = np.asarray(ts.eval_input_ids), np.asarray(ts.eval_valid, dtype=bool)
    meta = dict(getattr(ts, "meta", {}) or {})
    if ids.size and meta.get("bos_token_id") is not None:
        valid = valid & ~_before_padding(ids, int(meta["bos_token_id"]))
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
    window with BOS): such a position has no true next token."""
    real = ids != pad_id
    last_real = ids.shape[1] - 1 - np.argmax(real[:, ::-1], axis=1)   # (n,) last non-pad
    last_real[~real.any(axis=1)] = 0
    cols = np.arange(ids.shape[1])
    return cols[None, :] + 1 > last_real[:, None]


def _reduce_index(run_dir) -> list[tuple[Path, dict]]:
    out = []
    rdir = Path(run_dir) / "reduce"
    if not rdir.is_dir():
        return out
    import h5py
    for path in sorted(rdir.glob("*.h5")):
        try:
            with h5py.File(path, "r") as f:
                attrs = {k: _plain(v) for k, v in f.attrs.items()}
        except OSError:
            continue
        out.append((path, attrs))
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


def _reduce_for(rec, index, need_other=True):
    hits = [(p, a) for p, a in index
            if str(rec["reference"]) in _names(a, "ref")
            and _same_step(rec.get("checkpoint"), a.get("ref_step"))
            and (not need_other or str(rec.get("other")) in _names(a, "other"))]
    return hits


def _model_spec(rec, overrides, index) -> tuple[str, str]:
    from ooc_universal.models import parse_model_spec
    ref, ck = str(rec["reference"]), rec.get("checkpoint")
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


def _means(rec, index, token_hash) -> tuple[np.ndarray, str]:
    """The reference's per-neuron means over the correlation tokens (ref/mean)."""
    hits = _reduce_for(rec, index) or _reduce_for(rec, index, need_other=False)
    if not hits:
        raise OocError(f"--mode mean needs the reference's mean activations from "
                       f"RUN/reduce, but no file there matches {_record_id(rec)}; run "
                       "`ooc-universal reduce` first or use --mode zero")
    import h5py
    path, attrs = hits[0]
    if token_hash is not None and attrs.get("token_hash") not in (None, token_hash):
        raise OocError(f"{path.name} was reduced from token set "
                       f"{str(attrs['token_hash'])[:12]}, RUN/tokens holds {token_hash[:12]}; "
                       "its means are stale: re-run extract and reduce, or use --mode zero")
    with h5py.File(path, "r") as f:
        means = np.asarray(f["ref/mean"][...], dtype=np.float64)
    return means, path.name


def _record_key(rec) -> dict:
    key = {k: v for k, v in rec.items() if k != "neurons"}
    key["neurons_sha256"] = _sha(np.asarray(rec.get("neurons", []), np.int64).tobytes())
    return key


def _sets_for(recs, config, n_layers=None, d_mlp=None) -> list[AblationSet]:
    return ablation_sets(recs, n_layers, d_mlp, control_draws=config["control_draws"],
                         seed=config["seed"],
                         include_all_non_universal=config["all_non_universal"],
                         layerwise=config["layerwise"])


def _run_model(spec, recs, ids, valid, config, means, batch_size, dev, progress) -> dict:
    from ooc_universal.models import load_model
    with _hf_progress(progress):
        loaded = load_model(spec, device=str(dev), dtype=torch.float32)
    model = loaded.model
    n_layers, d_mlp = model_dims(model)
    sets = _sets_for(recs, config, n_layers, d_mlp)
    if progress:
        print(f"ablate: {loaded.spec.label}: {len(sets)} sets over {ids.shape[0]} windows",
              file=sys.stderr)
    results = evaluate_ablations(model, sets, ids, valid, batch_size=batch_size,
                                 mode=config["mode"], means=means, device="auto",
                                 progress=progress)
    del model, loaded
    return dict(draw_rows=[_draw_row(r, config["mode"]) for r in results],
                summary_rows=summarise(results, config["mode"]))


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
                vals = np.array([getattr(r, m) for r in rs])
                win = np.stack([getattr(r, f"window_{m}") for r in rs])
                win = win[:, ~np.isnan(win[0])].mean(axis=0)   # the draws share windows
                mean = float(vals.mean())
                half = (t975(len(vals) - 1) * float(vals.std(ddof=1)) / math.sqrt(len(vals))
                        if len(vals) > 1 else math.nan)
                row.update({m: mean, f"{m}_se": _se(win),
                            f"{m}_ci_low": mean - half, f"{m}_ci_high": mean + half})
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """The summary rows as an aligned text table (for the CLI)."""
    cols = ["reference", "other", "checkpoint", "threshold", "set", "layer", "n_neurons",
            "kl", "kl_se", "delta_loss", "delta_loss_se"]
    cells = [cols] + [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def _json_row(row) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def _write_csv(path, columns, rows, record: dict | None = None) -> None:
    with atomic_path(path, record) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            for r in rows:
                w.writerow(["" if (isinstance(r.get(c), float) and math.isnan(r[c]))
                            or r.get(c) is None else r[c] for c in columns])


def _sha(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in label)
