"""A tiny zoo: N independently trained byte-level GPT-2 models, offline.

Every model is a stanford-crfm-style GPT-2 (gelu_new, attention scaled by the inverse
layer index, reordered/upcast attention) over bytes (ids 0..255, BOS = EOS = 256,
vocab 257), trained on text that every machine has: by default the source of the
running Python's standard library. Model i takes seed `seed + i` for its initialisation
and its data order, so the zoo differs only where the paper's zoo does.

OUT/
  zoo.json                        recipe, corpus, unigram baseline, held-out loss of
                                  every checkpoint (nats per byte), written at the end
  <model>/checkpoint-<step>/      GPT2LMHeadModel.save_pretrained (safetensors,
                                  float16 when recipe.save_dtype == "float16")
  <model>/train_log.json          per-model progress: held-out loss per checkpoint
  <model>/train_state.pt          fp32 weights + AdamW state + step, for resuming;
                                  deleted when the model is complete (keep_train_state
                                  keeps it); never inside a checkpoint directory

Determinism: the batch of step t is drawn from np.random.default_rng([seed, 2, t]), a
function of (seed, step) alone, and the weights start from torch.manual_seed(seed); so a
resumed training is bitwise the uninterrupted one on the same device and thread count.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ooc_universal import __version__
from ooc_universal.devices import resolve_device
from ooc_universal.errors import OocError, StaleInputError
from ooc_universal.rundir import ensure_writable, write_json_atomic

BOS = 256          # byte tokenizer: ids 0..255 are bytes, 256 is BOS = EOS
VOCAB = 257
NEWLINE = 10
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})


@dataclass(frozen=True)
class ZooRecipe:
    """Everything that determines a zoo's weights (saved in zoo.json)."""
    n_models: int = 5               # independent models; model i uses seed `seed + i`
    n_layer: int = 2                # transformer blocks
    n_embd: int = 128               # d_model (residual width)
    n_head: int = 4                 # attention heads (n_embd % n_head == 0)
    d_mlp: int = 512                # MLP width = neurons per layer (n_inner)
    context: int = 64               # tokens per training window, BOS at column 0
                                    # included; also the model's n_positions
    batch_size: int = 32            # windows per optimizer step
    steps: int = 6000               # length of the LR schedule (100% of training)
    lr: float = 3e-3                # peak learning rate (AdamW)
    warmup_steps: int = 200         # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1       # cosine decays lr to lr * min_lr_ratio at `steps`
    weight_decay: float = 0.1       # AdamW decoupled decay on 2-D weights only
    beta1: float = 0.9              # AdamW betas
    beta2: float = 0.95
    grad_clip: float = 1.0          # global grad-norm clip (0 = none)
    seed: int = 0                   # base seed
    checkpoint_fracs: tuple = (0.25, 0.5, 0.75)   # checkpoints as fractions of `steps`
    checkpoint_steps: tuple = ()    # explicit steps; when set, overrides the fractions
    corpus: str = "stdlib"          # "stdlib" or a local text file / directory
    heldout_fraction: float = 0.05  # share of files (by path hash) or of the file's tail
    eval_bytes: int = 65536         # held-out bytes scored at each checkpoint
    vocab: str = "bytes"            # the only vocabulary: 257 ids, 0..255 + BOS 256
    save_dtype: str = "float16"     # dtype of the saved checkpoints ("float32" too)
    name_prefix: str = "tiny"       # model names: tiny-a, tiny-b, ...

    def __post_init__(self):
        object.__setattr__(self, "checkpoint_fracs", tuple(self.checkpoint_fracs))
        object.__setattr__(self, "checkpoint_steps", tuple(int(s) for s in self.checkpoint_steps))
        checks = [
            (self.n_models >= 1, f"n_models must be >= 1, got {self.n_models}"),
            (self.n_layer >= 1 and self.n_embd >= 1 and self.d_mlp >= 1,
             "n_layer, n_embd and d_mlp must be >= 1"),
            (self.n_head >= 1 and self.n_embd % self.n_head == 0,
             f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})"),
            (self.context >= 2, f"context must be >= 2 (BOS + 1 byte), got {self.context}"),
            (self.batch_size >= 1 and self.steps >= 1, "batch_size and steps must be >= 1"),
            (self.vocab == "bytes", f"vocab must be 'bytes', got {self.vocab!r}"),
            (self.save_dtype in ("float16", "float32"),
             f"save_dtype must be 'float16' or 'float32', got {self.save_dtype!r}"),
            (0.0 < self.heldout_fraction < 1.0,
             f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise OocError(f"bad zoo recipe: {msg}")
        steps = self.checkpoints()
        if not steps or steps[0] < 1 or steps[-1] > self.steps or len(set(steps)) != len(steps):
            raise OocError(
                f"bad zoo recipe: checkpoints {list(steps)} must be distinct steps in "
                f"1..{self.steps}; adjust --steps or the checkpoint fractions")

    def checkpoints(self) -> tuple:
        """The saved steps, ascending; training stops at the last one."""
        if self.checkpoint_steps:
            return tuple(sorted(self.checkpoint_steps))
        return tuple(sorted(int(round(f * self.steps)) for f in self.checkpoint_fracs))

    def model_names(self) -> list:
        letters = "abcdefghijklmnopqrstuvwxyz"
        return [f"{self.name_prefix}-{letters[i]}" if self.n_models <= 26
                else f"{self.name_prefix}-{i}" for i in range(self.n_models)]

    def n_params(self) -> int:
        """Parameters per model (tied input/output embedding counted once)."""
        d, f, L = self.n_embd, self.d_mlp, self.n_layer
        block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        return VOCAB * d + self.context * d + L * block + 2 * d

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def model_hash(self) -> str:
        """What one model's weights depend on: the recipe less n_models (model i of a
        5-model zoo is model i of a 2-model zoo), so a zoo can be grown or assembled."""
        d = self.to_json()
        d.pop("n_models")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# Candidate recipes are measured by bench/zoo_search.py (results in
# bench/results/zoo_search.jsonl); "demo" is the shipped zoo, rebuilt bit for bit by
# `ooc-universal zoo train --preset demo --threads 1` (one thread: the CPU GEMMs'
# summation order depends on the thread count).
PRESETS = {
    "demo": ZooRecipe(),
    "smoke": ZooRecipe(n_models=2, n_layer=1, n_embd=16, n_head=2, d_mlp=64, context=32,
                       batch_size=8, steps=40, warmup_steps=4, eval_bytes=4096),
}


# --------------------------------------------------------------------------- corpus

@dataclass
class Corpus:
    train: np.ndarray               # (n_train,) uint8, files concatenated in order
    heldout: np.ndarray             # (n_heldout,) uint8
    info: dict = field(default_factory=dict)


def stdlib_files(root=None) -> list:
    """Sorted relative POSIX paths of the stdlib's *.py, tests and site-packages excluded."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    rel = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if EXCLUDED_DIRS.intersection(parts[:-1]) or not path.is_file():
            continue
        rel.append("/".join(parts))
    return sorted(rel)


def is_heldout(rel_path: str, fraction: float) -> bool:
    """A file is held out when the first 8 bytes of sha256(path), as a fraction, < `fraction`."""
    h = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], "big")
    return h / 2.0 ** 64 < fraction


def load_corpus(spec: str, heldout_fraction: float) -> Corpus:
    """Bytes of the corpus split into train and held-out parts.

    "stdlib" or a directory: every file (stdlib: *.py under sysconfig's stdlib, tests and
    site-packages excluded) in sorted relative-path order, each file wholly in the
    held-out part when is_heldout(path) else in train. A single file: its last
    `heldout_fraction` of bytes are held out.
    """
    if spec == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = stdlib_files(root)
        kind = f"python{sys.version_info.major}.{sys.version_info.minor} stdlib *.py"
    else:
        root = Path(spec).expanduser()
        if root.is_file():
            data = np.frombuffer(root.read_bytes(), dtype=np.uint8)
            cut = len(data) - int(round(len(data) * heldout_fraction))
            return _corpus(data[:cut], data[cut:], {"kind": "file", "path": str(root.resolve()),
                                                    "split": "tail fraction"})
        if not root.is_dir():
            raise OocError(f"corpus {spec!r} is neither 'stdlib' nor an existing file or "
                           "directory; pass --corpus stdlib or a path to local text")
        files = sorted("/".join(p.relative_to(root).parts) for p in root.rglob("*") if p.is_file())
        kind = "directory"
    train_files = [f for f in files if not is_heldout(f, heldout_fraction)]
    held_files = [f for f in files if is_heldout(f, heldout_fraction)]
    if not train_files or not held_files:
        raise OocError(f"corpus {spec!r} has {len(train_files)} training and {len(held_files)} "
                       f"held-out files; it needs both: add files or change --heldout-fraction")
    read = lambda names: np.frombuffer(b"".join((root / n).read_bytes() for n in names), np.uint8)
    return _corpus(read(train_files), read(held_files), {
        "kind": kind, "path": str(root), "split": "whole files by sha256(relative path)",
        "n_train_files": len(train_files), "n_heldout_files": len(held_files),
        "heldout_files": held_files})


def _corpus(train, heldout, info) -> Corpus:
    info = dict(info, train_bytes=int(len(train)), heldout_bytes=int(len(heldout)),
                train_sha256=hashlib.sha256(train.tobytes()).hexdigest(),
                heldout_sha256=hashlib.sha256(heldout.tobytes()).hexdigest())
    return Corpus(train=train, heldout=heldout, info=info)


def unigram_loss(train: np.ndarray, heldout: np.ndarray) -> float:
    """Cross-entropy (nats/byte) of held-out bytes under add-one train byte frequencies."""
    p = (np.bincount(train, minlength=256) + 1.0) / (len(train) + 256.0)
    return float(-np.log(p[heldout]).mean())


def batch_windows(data: np.ndarray, context: int, batch: int, seed: int, step: int) -> np.ndarray:
    """(batch, context) int64 windows: BOS, then context-1 bytes at random offsets."""
    rng = np.random.default_rng([seed, 2, step])
    starts = rng.integers(0, len(data) - (context - 1) + 1, size=batch)
    out = np.full((batch, context), BOS, dtype=np.int64)
    out[:, 1:] = data[starts[:, None] + np.arange(context - 1)]
    return out


def eval_windows(data: np.ndarray, context: int, n_bytes: int) -> np.ndarray:
    """Consecutive, non-overlapping held-out windows (BOS + context-1 bytes) over n_bytes."""
    w = context - 1
    n = max(1, min(n_bytes, len(data)) // w)
    if n * w > len(data):
        raise OocError(f"held-out part has {len(data)} bytes, fewer than one window of {w}")
    out = np.full((n, context), BOS, dtype=np.int64)
    out[:, 1:] = data[: n * w].reshape(n, w)
    return out


# --------------------------------------------------------------------------- model

def gpt2_config(recipe: ZooRecipe):
    from transformers import GPT2Config
    return GPT2Config(
        vocab_size=VOCAB, n_positions=recipe.context, n_embd=recipe.n_embd,
        n_layer=recipe.n_layer, n_head=recipe.n_head, n_inner=recipe.d_mlp,
        activation_function="gelu_new", scale_attn_by_inverse_layer_idx=True,
        reorder_and_upcast_attn=True, bos_token_id=BOS, eos_token_id=BOS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def lr_at(recipe: ZooRecipe, step: int) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio at `steps` (step 0-based)."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    span = max(1, recipe.steps - recipe.warmup_steps)
    t = min(1.0, (step - recipe.warmup_steps) / span)
    lo = recipe.lr * recipe.min_lr_ratio
    return lo + 0.5 * (recipe.lr - lo) * (1.0 + math.cos(math.pi * t))


def _optimizer(model, recipe):
    import torch
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay},
         {"params": other, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(recipe.beta1, recipe.beta2), eps=1e-8)


def next_byte_loss(logits, ids, reduction="mean"):
    """Cross-entropy of ids[:, 1:] given logits[:, :-1] (every position after BOS is a target)."""
    import torch.nn.functional as F
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction=reduction)


def heldout_loss(model, windows: np.ndarray, device, batch: int = 64) -> float:
    """Mean next-byte cross-entropy (nats) over every target position of the windows."""
    import torch
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            ids = torch.from_numpy(windows[i:i + batch]).to(device)
            total += float(next_byte_loss(model(input_ids=ids).logits, ids, reduction="sum"))
            count += ids[:, 1:].numel()
    return total / count


@contextmanager
def quiet_transformers():
    """Hide transformers' own per-file progress bars while saving and loading."""
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def save_checkpoint(model, recipe: ZooRecipe, path: Path) -> None:
    """save_pretrained to a temporary directory, then rename (never half a checkpoint)."""
    import copy

    import torch
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    dtype = torch.float16 if recipe.save_dtype == "float16" else torch.float32
    with quiet_transformers():
        copy.deepcopy(model).to("cpu", dtype).save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    import torch
    from transformers import GPT2LMHeadModel
    with quiet_transformers():
        return GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).to(device).eval()


# --------------------------------------------------------------------------- training

def train_zoo(recipe: ZooRecipe, out_dir, device: str = "auto", progress: bool = True,
              model_indices=None, keep_train_state: bool = False) -> list:
    """Train (or resume) every model of the zoo; returns the model directories.

    model_indices: train only these models (e.g. [0, 2, 4] in one process and [1, 3] in
    another); zoo.json is (re)written by whichever process finds all models complete.
    """
    out_dir = ensure_writable(out_dir)
    device = str(resolve_device(device))
    corpus = load_corpus(recipe.corpus, recipe.heldout_fraction)
    names = recipe.model_names()
    indices = range(recipe.n_models) if model_indices is None else sorted(set(model_indices))
    for i in indices:
        if not 0 <= i < recipe.n_models:
            raise OocError(f"model index {i} out of range 0..{recipe.n_models - 1}")
        train_model(recipe, i, out_dir / names[i], corpus, device, progress, keep_train_state)
    write_zoo_json(recipe, out_dir, corpus)
    return [out_dir / n for n in names]


def train_model(recipe, index, model_dir: Path, corpus: Corpus, device, progress=True,
                keep_train_state=False) -> dict:
    import torch
    from tqdm.auto import tqdm
    from transformers import GPT2LMHeadModel

    seed = recipe.seed + index
    model_dir.mkdir(parents=True, exist_ok=True)
    log_path, state_path = model_dir / "train_log.json", model_dir / "train_state.pt"
    log = _read_log(log_path, recipe, seed, model_dir)
    ckpts = recipe.checkpoints()
    if all(str(s) in log["checkpoints"] and (model_dir / f"checkpoint-{s}").is_dir() for s in ckpts):
        return log                                              # complete: nothing to do

    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(gpt2_config(recipe)).to(device)
        opt = _optimizer(model, recipe)
        start = 0
        if state_path.exists():
            state = torch.load(state_path, map_location=device, weights_only=False)
            if state.get("recipe_hash") != recipe.model_hash():
                raise StaleInputError(f"{state_path} was written by another recipe; delete "
                                      f"{model_dir} or use another --out")
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start = state["step"]
        evals = eval_windows(corpus.heldout, recipe.context, recipe.eval_bytes)
        model.train()
        bar = tqdm(range(start, ckpts[-1]), initial=start, total=ckpts[-1], disable=not progress,
                   desc=model_dir.name, unit="step", dynamic_ncols=True)
        ema = None
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(recipe, step)
            ids = torch.from_numpy(batch_windows(corpus.train, recipe.context, recipe.batch_size,
                                                 seed, step)).to(device)
            loss = next_byte_loss(model(input_ids=ids).logits, ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            val = float(loss.detach())
            ema = val if ema is None else 0.98 * ema + 0.02 * val
            if step % 10 == 0:
                bar.set_postfix(loss=f"{ema:.3f}")
            done = step + 1
            if done in ckpts:
                _checkpoint(model, opt, recipe, done, model_dir, evals, device, log, ema)
                model.train()
        bar.close()
    finally:
        torch.use_deterministic_algorithms(prev_det)
    if not keep_train_state and state_path.exists():
        state_path.unlink()
    return log


def _checkpoint(model, opt, recipe, step, model_dir, evals, device, log, train_loss):
    """Save weights (shipped format), held-out loss of the saved weights, resume state."""
    import torch
    path = model_dir / f"checkpoint-{step}"
    save_checkpoint(model, recipe, path)
    saved = load_checkpoint(path, device)                     # score what ships (fp16)
    log["checkpoints"][str(step)] = {"heldout_loss": heldout_loss(saved, evals, device),
                                     "train_loss_ema": train_loss}
    del saved
    state_path = model_dir / "train_state.pt"
    tmp = state_path.with_name(state_path.name + f".tmp-{os.getpid()}")
    torch.save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "recipe_hash": recipe.model_hash()}, tmp)
    os.replace(tmp, state_path)
    write_json_atomic(model_dir / "train_log.json", log)


def _read_log(log_path: Path, recipe, seed, model_dir) -> dict:
    fresh = {"recipe_hash": recipe.model_hash(), "seed": seed, "name": model_dir.name,
             "checkpoints": {}}
    if not log_path.exists():
        return fresh
    log = json.loads(log_path.read_text())
    if log.get("recipe_hash") != recipe.model_hash():
        raise StaleInputError(f"{model_dir} holds a model of another recipe "
                              f"({log.get('recipe_hash')} != {recipe.model_hash()}); delete it or "
                              "use another --out")
    return log


def write_zoo_json(recipe: ZooRecipe, out_dir: Path, corpus: Corpus) -> dict | None:
    """Summarise the zoo when every model is complete; returns the summary or None."""
    models = []
    for i, name in enumerate(recipe.model_names()):
        path = out_dir / name / "train_log.json"
        if not path.exists():
            return None
        log = json.loads(path.read_text())
        if any(str(s) not in log["checkpoints"] for s in recipe.checkpoints()):
            return None
        models.append({"name": name, "seed": recipe.seed + i, "dir": name,
                       "checkpoints": log["checkpoints"]})
    info = {k: v for k, v in corpus.info.items() if k != "heldout_files"}
    summary = {
        "recipe": recipe.to_json(), "recipe_hash": recipe.hash(),
        "n_params_per_model": recipe.n_params(),
        "checkpoint_steps": list(recipe.checkpoints()),
        "corpus": info, "heldout_files": corpus.info.get("heldout_files", []),
        "loss_units": "nats per byte",
        "unigram_heldout_loss": unigram_loss(          # over the same bytes as the models
            corpus.train, eval_windows(corpus.heldout, recipe.context, recipe.eval_bytes)[:, 1:].ravel()),
        "eval_bytes": int(min(recipe.eval_bytes, len(corpus.heldout))),
        "models": models, "python": sys.version.split()[0], "toolkit_version": __version__,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(out_dir / "zoo.json", summary)
    return summary


def heldout_losses(out_dir, model_dirs) -> dict:
    """{"unigram": loss or None, "models": {dir name: {step: held-out loss}}} from the
    zoo's training logs (what `zoo train` prints at the end)."""
    out_dir = Path(out_dir)
    zoo_json = out_dir / "zoo.json"
    models = {}
    for d in map(Path, model_dirs):
        log = d / "train_log.json"
        if log.exists():
            ck = json.loads(log.read_text())["checkpoints"]
            models[d.name] = {int(s): v["heldout_loss"] for s, v in ck.items()}
    uni = json.loads(zoo_json.read_text())["unigram_heldout_loss"] if zoo_json.exists() else None
    return {"unigram": uni, "models": models, "complete": zoo_json.exists()}


def heldout_ids(zoo_json) -> np.ndarray:
    """The held-out bytes of the zoo described by `zoo_json` (its recipe's corpus), as
    int64 ids: text the zoo's models never saw in training."""
    if not zoo_json or not Path(zoo_json).exists():
        raise OocError("source 'zoo-heldout' needs zoo_json pointing at a zoo's zoo.json; "
                       "set [report] zoo_json in the config or use another source")
    info = json.loads(Path(zoo_json).read_text())
    recipe = ZooRecipe(**dict(info["recipe"]))
    return np.asarray(load_corpus(recipe.corpus, recipe.heldout_fraction).heldout,
                      dtype=np.int64)


def read_zoo_json(path) -> dict:
    """A zoo's zoo.json (written by write_zoo_json), or one OocError line."""
    try:
        zoo = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise OocError(f"{str(path)!r} is unreadable ({exc}); rebuild it with "
                       "`ooc-universal zoo train`") from None
    if not isinstance(zoo, dict) or "models" not in zoo:
        raise OocError(f"{str(path)!r} is not a zoo.json (no models)")
    return zoo
