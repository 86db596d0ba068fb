"""Model specs -> a GPT-2-family causal LM, its tokenizer, and the hook point.

A model spec is one string:

  a, b, c, d, e                 the five stanford-crfm GPT-2 small runs (a = alias-gpt2-small-x21,
                                b = battlestar-gpt2-small-x49, c = caprica-gpt2-small-x81,
                                d = darkmatter-gpt2-small-x343, e = expanse-gpt2-small-x777)
  a@100000                      ... at revision checkpoint-100000 (an integer N means checkpoint-N)
  alias-gpt2-small-x21@100000   the same run by name (stanford-crfm/alias-... too)
  org/name[@rev]                any hub repo; rev is a branch, tag, commit or checkpoint-N
  path[@N]                      a local save_pretrained directory; @N means path/checkpoint-N

The hook point is the post-GELU MLP activation of every layer, i.e. the INPUT of the MLP
output projection `transformer.h[layer].mlp.c_proj` (forward pre-hooks go there). Flat
neuron index = layer * d_mlp + neuron in every file the toolkit writes.

Hub access goes through transformers / huggingface_hub and their cache, so HF_HOME,
HF_HUB_CACHE and HF_HUB_OFFLINE=1 work as usual.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ooc_universal.errors import OocError

STANFORD_ORG = "stanford-crfm"
STANFORD_RUNS = {
    "a": "alias-gpt2-small-x21",
    "b": "battlestar-gpt2-small-x49",
    "c": "caprica-gpt2-small-x81",
    "d": "darkmatter-gpt2-small-x343",
    "e": "expanse-gpt2-small-x777",
}
_STANFORD_NAMES = set(STANFORD_RUNS.values())
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
BYTE_VOCAB_SIZE = 257  # the toolkit's byte tokenizer: ids 0..255 = bytes, 256 = BOS/EOS


@dataclass(frozen=True)
class ModelSpec:
    name: str              # identity without checkpoint ("alias-gpt2-small-x21", "org/x", abs path)
    repo_id: str | None    # hub repo, None for a local directory
    revision: str | None   # hub revision ("checkpoint-100000", "main", a commit), None = default
    local_dir: str | None  # directory to load from (path/checkpoint-N when @N), None for hub
    step: int | None       # training step, from @N or checkpoint-N
    label: str             # filesystem-safe file stem, e.g. "alias-gpt2-small-x21@100000"

    def __str__(self) -> str:
        return self.label

    @property
    def where(self) -> str:
        """Human-readable source: 'repo, revision rev' or the local directory."""
        if self.local_dir is not None:
            return self.local_dir
        return f"{self.repo_id}, revision {self.revision or 'main'}"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", text)


def _split_at(spec: str) -> tuple[str, str | None]:
    base, sep, rev = spec.rpartition("@")
    if not sep:
        return spec, None
    if not base or not rev:
        raise OocError(f"bad model spec {spec!r}: expected NAME or NAME@REVISION (e.g. a@100000)")
    return base, rev


def _revision_and_step(rev: str | None) -> tuple[str | None, int | None]:
    if rev is None:
        return None, None
    if rev.isdigit():
        return f"checkpoint-{int(rev)}", int(rev)
    m = _CHECKPOINT_RE.match(rev)
    return rev, (int(m.group(1)) if m else None)


def _label(stem: str, revision: str | None, step: int | None) -> str:
    if step is not None:
        return f"{_safe(stem)}@{step}"
    if revision is not None:
        return f"{_safe(stem)}@{_safe(revision)}"
    return _safe(stem)


def parse_model_spec(spec: str) -> ModelSpec:
    """Parse a model spec string (see the module docstring); touches only the local disk."""
    spec = str(spec).strip()
    if not spec:
        raise OocError("empty model spec; expected a letter a..e, a hub id org/name "
                       "or a local directory")
    if Path(spec).expanduser().is_dir():  # a local directory, even with '@' in its name
        return _local_spec(spec, None)
    base, rev = _split_at(spec)
    if Path(base).expanduser().is_dir():
        return _local_spec(base, rev)
    if base in STANFORD_RUNS or base in _STANFORD_NAMES or (
            base.startswith(STANFORD_ORG + "/") and base.split("/", 1)[1] in _STANFORD_NAMES):
        name = STANFORD_RUNS.get(base, base.split("/")[-1])
        revision, step = _revision_and_step(rev)
        return ModelSpec(name=name, repo_id=f"{STANFORD_ORG}/{name}", revision=revision,
                         local_dir=None, step=step, label=_label(name, revision, step))
    if _HUB_ID_RE.match(base) and not base.startswith((".", "~")):
        revision, step = _revision_and_step(rev)
        return ModelSpec(name=base, repo_id=base, revision=revision, local_dir=None, step=step,
                         label=_label(base.replace("/", "--"), revision, step))
    if "/" in base or base.startswith((".", "~")):
        raise OocError(f"model {spec!r}: local directory {base!r} does not exist; "
                       "give a save_pretrained directory, a hub id org/name, or a letter a..e")
    raise OocError(f"unknown model {spec!r}: expected a letter a..e "
                   f"({', '.join(f'{k}={v}' for k, v in STANFORD_RUNS.items())}), "
                   "a stanford-crfm run name, a hub id org/name, or a local directory")


def _local_spec(path: str, rev: str | None) -> ModelSpec:
    root = Path(path).expanduser().absolute()
    step = None
    if rev is None:
        m = _CHECKPOINT_RE.match(root.name)
        if m:  # "dir/checkpoint-500" is the same model as "dir@500"
            return _local_spec(str(root.parent), m.group(1))
        load_dir = root
    else:
        revision, step = _revision_and_step(rev)
        load_dir = root / revision
        if not load_dir.is_dir():
            have = sorted(p.name for p in root.glob("checkpoint-*") if p.is_dir())
            raise OocError(
                f"model {str(root)!r}: revision {rev!r} not found "
                f"(no directory {str(load_dir)!r}); "
                f"available: {', '.join(have) if have else 'none'}")
    revision = load_dir.name if step is not None else None
    # name: the directory's own name (tiny-a), as in the store label; the path is in model_id
    return ModelSpec(name=root.name, repo_id=None, revision=revision, local_dir=str(load_dir),
                     step=step, label=_label(root.name, None, step))


@dataclass
class LoadedModel:
    model: object             # GPT2LMHeadModel, eval(), on device, in dtype
    tokenizer: object | None  # HF tokenizer, or None: the toolkit's byte tokenizer
    spec: ModelSpec
    n_layers: int
    d_mlp: int
    vocab_size: int
    bos_token_id: int
    model_id: str             # hub repo id or local directory
    revision: str | None      # requested revision (None = default branch / local dir)
    commit: str | None = None           # resolved hub commit hash, when known
    tokenizer_name: str | None = None   # "bytes" or where the HF tokenizer came from

    @property
    def n_neurons(self) -> int:
        return self.n_layers * self.d_mlp


def _download_hint(spec: ModelSpec) -> str:
    from huggingface_hub import constants
    rev = spec.revision or "main"
    unset = ", or unset HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else ""
    return (f"pre-download it with `hf download {spec.repo_id} --revision {rev}` "
            "(older huggingface_hub: `huggingface-cli download ...`) where the hub is reachable "
            f"and copy the HF cache here, or give a local save_pretrained directory instead{unset}")


def _cached_revisions(repo_id: str) -> list[str]:
    from huggingface_hub import constants
    refs = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs"
    if not refs.is_dir():
        return []
    return sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file())


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _cached_snapshot(spec: ModelSpec) -> Path | None:
    """The cached snapshot directory of spec's revision when it holds config and weights.

    A cached revision is used as is, without asking the hub (checkpoint-N branches do not
    move); this also keeps an unreachable hub from costing retries on every file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors
    try:
        cfg = Path(hf_hub_download(spec.repo_id, "config.json", revision=spec.revision,
                                   local_files_only=True))
    except (hf_errors.LocalEntryNotFoundError, hf_errors.EntryNotFoundError, OSError, ValueError):
        return None
    return cfg.parent if any((cfg.parent / f).exists() for f in _WEIGHT_FILES) else None


def _resolve_hub_config(spec: ModelSpec) -> Path:
    """Fetch (or find in the cache) config.json; turn hub errors into one-line OocErrors."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub import errors as hf_errors
    import logging
    what = f"model {spec.label} ({spec.where})"
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # no "Retrying in 4s" lines: the error below is one line
    try:
        return Path(hf_hub_download(spec.repo_id, "config.json", revision=spec.revision))
    except hf_errors.GatedRepoError:
        raise OocError(f"{what}: the repo is gated; log in with `hf auth login` "
                       "and accept its terms on huggingface.co") from None
    except hf_errors.RepositoryNotFoundError:
        raise OocError(f"{what}: repository {spec.repo_id!r} not found on the hub; "
                       "check the name or use a local directory") from None
    except hf_errors.RevisionNotFoundError:
        raise OocError(f"{what}: revision {spec.revision!r} not found in {spec.repo_id}; "
                       "stanford-crfm runs have revisions checkpoint-<step>") from None
    except hf_errors.RemoteEntryNotFoundError:
        raise OocError(f"{what}: the repo has no config.json at revision "
                       f"{spec.revision or 'main'}; is it a transformers model?") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, OSError) as exc:
        offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub is unreachable"
        cached = _cached_revisions(spec.repo_id)
        have = f" (cached revisions: {', '.join(cached)})" if cached else ""
        local = isinstance(exc, hf_errors.LocalEntryNotFoundError)
        detail = "" if local else f" [{type(exc).__name__}]"
        raise OocError(f"{what}: revision {spec.revision or 'main'} is not in the local HF cache "
                       f"and {offline}{have}{detail}; {_download_hint(spec)}") from None
    finally:
        hub_log.setLevel(level)


def _hub_source(spec: ModelSpec) -> tuple[str, dict, str | None]:
    """(path or repo id, from_pretrained kwargs, commit hash) for a hub spec."""
    snap = _cached_snapshot(spec)
    if snap is None:
        snap = _resolve_hub_config(spec).parent  # network; config only
        source, kw = spec.repo_id, {"revision": spec.revision}
    else:
        source, kw = str(snap), {}
    commit = snap.name if re.fullmatch(r"[0-9a-f]{40}", snap.name) else None
    return source, kw, commit


def _check_config(config, spec: ModelSpec) -> int:
    """Refuse a config without the hook; return d_mlp."""
    if getattr(config, "model_type", None) != "gpt2":
        kind = getattr(config, "model_type", "?")
        raise OocError(
            f"model {spec.label} ({spec.where}) is a {kind!r} model; "
            "only GPT-2-family models (model_type 'gpt2', hook transformer.h[i].mlp.c_proj) "
            "are supported")
    return int(config.n_inner or 4 * config.n_embd)


def _resolve_device(device) -> "torch.device":
    import torch
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(spec, device="cpu", dtype=None, *, with_tokenizer: bool = True) -> LoadedModel:
    """Load a GPT-2-family causal LM (eval mode, on `device`, in `dtype`) and its tokenizer.

    dtype defaults to torch.float32 and is always passed explicitly: transformers 5 would
    otherwise keep the dtype the checkpoint was saved in (fp16 runs 30x slower on a CPU).
    tokenizer is None for byte-vocabulary models without tokenizer files.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)
    dtype = torch.float32 if dtype is None else dtype
    commit = None
    if spec.local_dir is not None:
        if not (Path(spec.local_dir) / "config.json").is_file():
            raise OocError(f"model {spec.label}: {spec.local_dir!r} has no config.json; "
                           "give a directory written by save_pretrained")
        source, kw = spec.local_dir, {}
    else:
        source, kw, commit = _hub_source(spec)
    config = AutoConfig.from_pretrained(source, **kw)
    d_mlp = _check_config(config, spec)
    # transformers 5 draws a "Loading weights" bar per model; a run loads dozens of
    # checkpoints, and the step's own bar already says where it is.
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = _download_hint(spec) if spec.repo_id else "re-save it with save_pretrained"
        raise OocError(f"model {spec.label} ({spec.where}): cannot load the weights ({first}); "
                       f"{hint}") from None
    model = model.to(_resolve_device(device)).eval().requires_grad_(False)
    n_layers = int(config.n_layer)
    for layer in range(n_layers):
        proj = mlp_out_proj(model, layer)
        if proj.weight.shape[0] != d_mlp:  # GPT-2 Conv1D weight: (in = d_mlp, out = n_embd)
            raise OocError(f"model {spec.label}: layer {layer} MLP has {proj.weight.shape[0]} "
                           f"neurons, config says {d_mlp}")
    tokenizer, tok_name = (load_tokenizer(spec, config=config, _source=(source, kw))
                           if with_tokenizer else (None, None))
    bos = config.bos_token_id
    if bos is None:
        bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        raise OocError(f"model {spec.label}: config has no bos_token_id; set it in config.json")
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, n_layers=n_layers, d_mlp=d_mlp,
                       vocab_size=int(config.vocab_size), bos_token_id=int(bos),
                       model_id=spec.repo_id or spec.local_dir, revision=spec.revision,
                       commit=commit, tokenizer_name=tok_name)


def load_tokenizer(spec, config=None, _source=None) -> tuple[object | None, str]:
    """The spec's own tokenizer and its name; (None, "bytes") for a byte-vocabulary model
    without tokenizer files. Does not load the weights.

    (transformers 5 builds an EMPTY tokenizer from a config without tokenizer files, so the
    files are looked for explicitly.)"""
    from transformers import AutoConfig, AutoTokenizer
    spec = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)
    if spec.local_dir is not None:
        source, kw = spec.local_dir, {}
    else:
        source, kw = _source if _source is not None else _hub_source(spec)[:2]
    name = spec.repo_id or spec.local_dir
    tok_dir = source if _has_tokenizer_files(source) else None
    config = config if config is not None else AutoConfig.from_pretrained(source, **kw)
    if tok_dir is None and int(config.vocab_size) == BYTE_VOCAB_SIZE:
        return None, "bytes"
    if tok_dir is None and spec.repo_id is not None:
        tok_dir = _fetch_tokenizer_files(spec)
    if tok_dir is None:
        fix = (f"or they are not cached: {_download_hint(spec)}" if spec.repo_id
               else "add its tokenizer files (tokenizer.save_pretrained)")
        raise OocError(f"model {spec.label} ({spec.where}) has no tokenizer files and a "
                       f"{config.vocab_size}-token vocabulary (not the {BYTE_VOCAB_SIZE}-id byte "
                       f"vocabulary); {fix}")
    return AutoTokenizer.from_pretrained(tok_dir), name


def _has_tokenizer_files(folder) -> bool:
    folder = Path(folder)
    return folder.is_dir() and ((folder / "tokenizer.json").is_file()
                                or (folder / "vocab.json").is_file())


def _fetch_tokenizer_files(spec: ModelSpec) -> str | None:
    """Download spec's tokenizer files into the HF cache; their snapshot dir, or None."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors
    folder = None
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
              "special_tokens_map.json"):
        try:
            folder = Path(hf_hub_download(spec.repo_id, f, revision=spec.revision)).parent
        except (hf_errors.EntryNotFoundError, hf_errors.LocalEntryNotFoundError, OSError):
            continue
    return str(folder) if folder is not None and _has_tokenizer_files(folder) else None


def mlp_out_proj(model, layer: int):
    """The module whose INPUT is the post-GELU activation of `layer`
    (GPT-2: transformer.h[layer].mlp.c_proj). Capture and ablation are forward PRE-hooks on it."""
    transformer = getattr(model, "transformer", model)
    blocks = getattr(transformer, "h", None)
    proj = None
    if blocks is not None and -len(blocks) <= layer < len(blocks):
        proj = getattr(getattr(blocks[layer], "mlp", None), "c_proj", None)
    elif blocks is not None:
        raise ValueError(f"layer {layer} out of range: the model has {len(blocks)} layers")
    if proj is None:
        raise OocError(f"{type(model).__name__} is not a GPT-2-family model: "
                       "no transformer.h[i].mlp.c_proj to hook")
    return proj
