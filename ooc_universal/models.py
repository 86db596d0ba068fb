"""Model specs -> a causal LM of a known family, its tokenizer, and the hook point.

A model spec is one string:

  a, b, c, d, e                 the five stanford-crfm GPT-2 small runs (a = alias-gpt2-small-x21,
                                b = battlestar-gpt2-small-x49, c = caprica-gpt2-small-x81,
                                d = darkmatter-gpt2-small-x343, e = expanse-gpt2-small-x777)
  a@100000                      ... at revision checkpoint-100000 (an integer N means checkpoint-N)
  alias-gpt2-small-x21@100000   the same run by name (stanford-crfm/alias-... too)
  org/name[@rev]                any hub repo; rev is a branch, tag, commit or a step N, which
                                maps to the family's revision name (FAMILIES; checkpoint-N
                                for repos of no known family)
  path[@N]                      a local save_pretrained directory; @N means its checkpoint
                                folder of step N: checkpoint-N, ckpt-N, step-N or stepN
  path/ckpt_{step}@N            a folder pattern of the user's own: {step} marks the step,
                                here path/ckpt_N (also a parse_model_spec argument)

The hook point is the input of every layer's MLP output projection (GPT-2:
`transformer.h[layer].mlp.c_proj`, the post-GELU activation; FAMILIES lists the others);
forward pre-hooks go there. A neuron is always that input, so correlation and
zero-ablation mean the same in every family. Flat neuron index = layer * d_mlp + neuron
in every file the toolkit writes.

Hub access goes through transformers / huggingface_hub and their cache, so HF_HOME,
HF_HUB_CACHE and HF_HUB_OFFLINE=1 work as usual.

The helpers other steps use to walk a model of any family (names kept stable):
  family_of_config(config)   the Family entry (FAMILIES) of a loaded model's config
  base_model(model)          the decoder stack without the LM head
  decoder_layers(model)      its list of decoder layers
  final_norm(model)          the norm between the last layer and the LM head
  mlp_out_proj(model, layer) the module whose input is the layer's neurons (pre-hooks)
  out_proj_neuron_axis(model) the axis of mlp_out_proj(...).weight that indexes neurons
Offline facts about a spec, without loading weights: read_config, family_of_spec,
model_shape, context_of; for a run's list of specs: unique_labels, check_same_family.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ooc_universal.devices import resolve_device
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
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
BYTE_VOCAB_SIZE = 257  # the toolkit's byte tokenizer: ids 0..255 = bytes, 256 = BOS/EOS
# byte-vocabulary models without tokenizer files: vocab size -> the tokenizer's name
# (256 ids: plain bytes, no BOS or EOS id, as many byte-level models are trained)
BYTE_TOKENIZERS = {257: "bytes", 256: "bytes256"}
STEP_FIELD = "{step}"  # marks the step in a user's checkpoint folder pattern


# ---------------------------------------------------------------------------- families

@dataclass(frozen=True)
class Family:
    """How to find a family's MLP neurons and how its checkpoints are named on the hub."""
    name: str
    model_types: tuple[str, ...]   # config.model_type values of the family
    layers: str                    # the decoder layers, an attribute of the base model
    out_proj: str                  # the MLP output projection, from one layer
    site: str                      # what a neuron is, in words
    n_layers: Callable             # config -> number of layers
    d_mlp: Callable                # config -> neurons per layer
    context: str                   # the config field holding the context length
    hub_repos: tuple[str, ...]     # hub id prefixes whose @N follows `revision`
    revision: str | None           # hub revision of training step N ("checkpoint-{step}"),
                                   # None: looked up among the repo's cached revisions
    revision_re: str               # a revision name -> its step (group 1)
    final_norm: str = "norm"       # the norm after the last layer, on the base model
    transposed: bool = False       # out_proj.weight is (d_mlp, d_model) (GPT-2's Conv1D)


def _intermediate_size(config) -> int:
    return int(config.intermediate_size)


_GATED = dict(layers="layers", out_proj="mlp.down_proj",
              site="input of mlp.down_proj: act(gate_proj(x)) * up_proj(x)",
              n_layers=lambda c: int(c.num_hidden_layers), d_mlp=_intermediate_size,
              context="max_position_embeddings")

FAMILIES = {
    # stanford-crfm Mistral GPT-2 runs: branches checkpoint-N (their model cards)
    "gpt2": Family(
        "gpt2", ("gpt2",), layers="h", out_proj="mlp.c_proj",
        site="input of mlp.c_proj: the post-GELU activation",
        n_layers=lambda c: int(c.n_layer), d_mlp=lambda c: int(c.n_inner or 4 * c.n_embd),
        context="n_positions", hub_repos=(f"{STANFORD_ORG}/",),
        revision="checkpoint-{step}", revision_re=r"^checkpoint-(\d+)$", final_norm="ln_f",
        transposed=True),
    # Pythia and PolyPythias: 154 branches step0, step1 ... step512, step1000 ... step143000
    "gpt-neox": Family(
        "gpt-neox", ("gpt_neox",), layers="layers", out_proj="mlp.dense_4h_to_h",
        site="input of mlp.dense_4h_to_h: the post-GELU activation",
        n_layers=lambda c: int(c.num_hidden_layers), d_mlp=_intermediate_size,
        context="max_position_embeddings", hub_repos=("EleutherAI/pythia-",),
        revision="step{step}", revision_re=r"^step(\d+)$", final_norm="final_layer_norm"),
    # OLMo: branches step<N>-tokens<M>B; OLMo 2: stage1-step<N>-tokens<M>B (the token
    # count is part of the name, so a step is looked up among the cached revisions)
    "olmo": Family(
        "olmo", ("olmo", "olmo2"), **_GATED, hub_repos=("allenai/OLMo-",), revision=None,
        revision_re=r"^(?:stage1-)?step(\d+)-tokens\d+B$"),
    # Llama / Mistral / Qwen style: no common checkpoint naming; @N = checkpoint-N (the
    # HF Trainer's folder name), any other revision passes through
    "llama": Family(
        "llama", ("llama", "mistral", "qwen2", "qwen3"), **_GATED, hub_repos=(),
        revision="checkpoint-{step}", revision_re=r"^checkpoint-(\d+)$"),
}
# The families the steps accept (all of FAMILIES; load_model takes a narrower set).
ENABLED_FAMILIES = frozenset(FAMILIES)

POLYPYTHIA_SIZES = ("14m", "31m", "70m", "160m", "410m")


def polypythia_runs(size: str = "160m", kind: str = "seed") -> list[str]:
    """Hub ids of one Pythia size's runs: the original (seed 1234) and PolyPythias'
    seed1..9 (kind "seed"), or for 160m data-seed1..3 / weight-seed1..3 (kind "data-seed",
    "weight-seed": only the data order, or only the initialisation, varied)."""
    if size not in POLYPYTHIA_SIZES:
        raise OocError(f"PolyPythias has no size {size!r}; expected one of "
                       f"{', '.join(POLYPYTHIA_SIZES)}")
    n = {"seed": 9, "data-seed": 3, "weight-seed": 3}.get(kind)
    if n is None or (kind != "seed" and size != "160m"):
        raise OocError(f"PolyPythias has no {kind!r} runs of size {size}; use kind 'seed', "
                       "or 'data-seed' / 'weight-seed' with size 160m")
    base = f"EleutherAI/pythia-{size}"
    return [base] + [f"{base}-{kind}{i}" for i in range(1, n + 1)]


# Pythia sizes (the Pythia and PolyPythias model cards): layers, model dim, vocabulary
# (embed_in and embed_out untied; padded to 50304, 50432 and 50688); d_mlp = 4 x dim,
# context 2048. The parameter counts this gives match the model cards' totals.
PYTHIA_SHAPES = {"14m": (6, 128, 50304), "31m": (6, 256, 50304), "70m": (6, 512, 50304),
                 "160m": (12, 768, 50304), "410m": (24, 1024, 50304),
                 "1b": (16, 2048, 50304), "1.4b": (24, 2048, 50304),
                 "2.8b": (32, 2560, 50304), "6.9b": (32, 4096, 50432),
                 "12b": (36, 5120, 50688)}
PYTHIA_CONTEXT = 2048
_PYTHIA_RE = re.compile(r"^EleutherAI/pythia-(\d+(?:\.\d+)?[mb])(?:-deduped)?(?:-v0)?"
                        r"(?:-(?:seed|data-seed|weight-seed)\d+)?$")
GPT2_SMALL = (12, 3072, 124_439_808)  # the stanford-crfm runs: n_layers, d_mlp, parameters


def _known_shape(spec: "ModelSpec") -> tuple[int, int, int] | None:
    """(n_layers, d_mlp, n_params) of a hub model whose shape is known by name."""
    if spec.repo_id is None:
        return None
    if spec.repo_id.startswith(STANFORD_ORG + "/") and spec.name in _STANFORD_NAMES:
        return GPT2_SMALL
    m = _PYTHIA_RE.match(spec.repo_id)
    if m is None or m.group(1) not in PYTHIA_SHAPES:
        return None
    n_layers, d, vocab = PYTHIA_SHAPES[m.group(1)]
    per_layer = 12 * d * d + 13 * d  # qkv, dense, the MLP, two layer norms (+ biases)
    return n_layers, 4 * d, n_layers * per_layer + 2 * d + 2 * vocab * d


def family_of_config(config) -> Family | None:
    model_type = getattr(config, "model_type", None)
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


def family_of_repo(repo_id: str) -> Family | None:
    """The family a hub id belongs to by its name (before its config is seen)."""
    return next((f for f in FAMILIES.values() if repo_id.startswith(f.hub_repos)), None) \
        if repo_id else None


def mlp_shape(config) -> tuple[int, int]:
    """(n_layers, d_mlp) of a model config of a known family."""
    family = family_of_config(config)
    if family is None:
        raise OocError(f"model_type {getattr(config, 'model_type', '?')!r} is not of a known "
                       f"family; known: {', '.join(sorted(FAMILIES))}")
    return family.n_layers(config), family.d_mlp(config)


def context_length(config) -> int | None:
    """The longest window the model takes (None when its config does not say)."""
    family = family_of_config(config)
    fields = (family.context,) if family else ("n_positions", "max_position_embeddings")
    return next((int(getattr(config, f)) for f in fields if getattr(config, f, None)), None)


@dataclass(frozen=True)
class ModelSpec:
    name: str              # identity without checkpoint ("alias-gpt2-small-x21", "org/x", abs path)
    repo_id: str | None    # hub repo, None for a local directory
    revision: str | None   # hub revision ("checkpoint-100000", "main", a commit), None = default
    local_dir: str | None  # directory to load from (path/checkpoint-N when @N), None for hub
    step: int | None       # training step, from @N or checkpoint-N
    label: str             # filesystem-safe file stem, e.g. "alias-gpt2-small-x21@100000"
    checkpoint_pattern: str | None = None  # the user's folder pattern ("ckpt_{step}"), if any

    def __str__(self) -> str:
        return self.label

    @property
    def root(self) -> str:
        """The model without its checkpoint: the hub repo, or the local folder holding the
        checkpoint folders (the directory itself when it is no checkpoint folder)."""
        if self.repo_id is not None:
            return self.repo_id
        if self.step is None or self.revision is None:
            return self.local_dir
        return str(Path(self.local_dir).parents[len(Path(self.revision).parts) - 1])

    @property
    def text(self) -> str:
        """A spec string that parses back to this model and checkpoint (labels made
        unique by unique_labels aside)."""
        if self.repo_id is not None:
            return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"
        if self.checkpoint_pattern is not None:
            return f"{Path(self.root) / self.checkpoint_pattern}@{self.step}"
        return self.local_dir if self.step is None else f"{self.root}@{self.revision}"

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


def _revision_and_step(rev: str | None, family: Family | None = None,
                       repo_id: str | None = None) -> tuple[str | None, int | None]:
    """(hub revision, training step) of the part after '@': a step N becomes the family's
    revision name (checkpoint-N when the family is not known); a name passes through,
    with its step when it follows the family's naming."""
    if rev is None:
        return None, None
    family = family or FAMILIES["gpt2"]
    if rev.isdigit():
        return _revision_of_step(family, repo_id, int(rev)), int(rev)
    m = re.match(family.revision_re, rev)
    return rev, (int(m.group(1)) if m else None)


def _revision_of_step(family: Family, repo_id: str | None, step: int) -> str:
    if family.revision is not None:
        return family.revision.format(step=step)
    cached = [r for r in _cached_revisions(repo_id or "")
              if (m := re.match(family.revision_re, r)) and int(m.group(1)) == step]
    if len(cached) == 1:
        return cached[0]
    found = f"{len(cached)} cached revisions match ({', '.join(cached)})" if cached \
        else "none is in the local HF cache"
    raise OocError(
        f"model {repo_id}@{step}: {family.name} revisions carry the token count "
        f"(step{step}-tokens<M>B, OLMo 2: stage1-step{step}-tokens<M>B) and {found}; "
        f"give the full revision name, e.g. {repo_id}@step{step}-tokens<M>B (listed by "
        "huggingface_hub.list_repo_refs)")


def _label(stem: str, revision: str | None, step: int | None) -> str:
    if step is not None:
        return f"{_safe(stem)}@{step}"
    if revision is not None:
        return f"{_safe(stem)}@{_safe(revision)}"
    return _safe(stem)


def parse_model_spec(spec, checkpoint_pattern: str | None = None) -> ModelSpec:
    """Parse a model spec string (see the module docstring); touches only the local disk.

    checkpoint_pattern: how the local checkpoint folders are named, "{step}" marking the
    step ("ckpt_{step}", "{step}/hf"); replaces the usual names (checkpoint-N, ckpt-N,
    step-N, stepN) for this spec. A spec whose path holds "{step}" carries its own."""
    if isinstance(spec, ModelSpec):
        return spec
    spec = str(spec).strip()
    if not spec:
        raise OocError("empty model spec; expected a letter a..e, a hub id org/name "
                       "or a local directory")
    patterns = _checked_patterns(checkpoint_pattern)
    if Path(spec).expanduser().is_dir():  # a local directory, even with '@' in its name
        return _local_spec(spec, None, patterns)
    base, rev = _split_at(spec)
    if STEP_FIELD in base:
        return _pattern_spec(spec, base, rev)
    if Path(base).expanduser().is_dir():
        return _local_spec(base, rev, patterns)
    if base in STANFORD_RUNS or base in _STANFORD_NAMES or (
            base.startswith(STANFORD_ORG + "/") and base.split("/", 1)[1] in _STANFORD_NAMES):
        name = STANFORD_RUNS.get(base, base.split("/")[-1])
        revision, step = _revision_and_step(rev)
        return ModelSpec(name=name, repo_id=f"{STANFORD_ORG}/{name}", revision=revision,
                         local_dir=None, step=step, label=_label(name, revision, step))
    if _HUB_ID_RE.match(base) and not base.startswith((".", "~")):
        revision, step = _revision_and_step(rev, family_of_repo(base), base)
        return ModelSpec(name=base, repo_id=base, revision=revision, local_dir=None, step=step,
                         label=_label(base.replace("/", "--"), revision, step))
    if "/" in base or base.startswith((".", "~")):
        raise OocError(f"model {spec!r}: local directory {base!r} does not exist; "
                       "give a save_pretrained directory, a hub id org/name, or a letter a..e")
    raise OocError(f"unknown model {spec!r}: expected a letter a..e "
                   f"({', '.join(f'{k}={v}' for k, v in STANFORD_RUNS.items())}), "
                   "a stanford-crfm run name, a hub id org/name, or a local directory")


# checkpoint folders as people name them: checkpoint-N (HF Trainer), ckpt-N, step-N, stepN
DEFAULT_CHECKPOINT_PATTERNS = ("checkpoint-{step}", "ckpt-{step}", "step-{step}", "step{step}")


def _checked_patterns(pattern: str | None) -> tuple[str, ...]:
    """(pattern,) after checking it, or the usual names when None."""
    if pattern is None:
        return DEFAULT_CHECKPOINT_PATTERNS
    pattern = str(pattern).strip().strip("/")
    parts = Path(pattern).parts
    if (pattern.count(STEP_FIELD) != 1 or re.search(r"[{}]", pattern.replace(STEP_FIELD, ""))
            or Path(pattern).is_absolute() or ".." in parts or not parts):
        raise OocError(f"checkpoint pattern {pattern!r} is invalid: expected a folder name "
                       "relative to the model's directory with {step} once where the step "
                       "goes, e.g. 'ckpt_{step}' or '{step}/hf'")
    if STEP_FIELD not in parts[0]:  # else DIR/run/ckpt_{step} would not name one model
        raise OocError(f"checkpoint pattern {pattern!r} is invalid: its first folder has no "
                       f"{{step}}; put {'/'.join(parts[:1])!r} into the model's directory "
                       "instead (DIR/run with pattern 'ckpt_{step}')")
    return (pattern,)


def _pattern_re(pattern: str) -> re.Pattern:
    """A folder pattern -> a regex of the relative path, group 1 = the step."""
    head, _, tail = pattern.partition(STEP_FIELD)
    return re.compile(f"^{re.escape(head)}(\\d+){re.escape(tail)}$")


def _step_of_folder(name: str, patterns) -> tuple[int, str] | None:
    """(step, pattern) when the relative path `name` is a checkpoint folder by `patterns`."""
    for pattern in patterns:
        m = _pattern_re(pattern).match(name)
        if m:
            return int(m.group(1)), pattern
    return None


def _pattern_spec(spec: str, base: str, rev: str | None) -> ModelSpec:
    """`dir/ckpt_{step}@N`: the pattern is the path from the first part holding {step}."""
    parts = Path(base).expanduser().parts
    first = next(i for i, part in enumerate(parts) if STEP_FIELD in part)
    root, pattern = Path(*parts[:first]) if first else Path("."), str(Path(*parts[first:]))
    patterns = _checked_patterns(pattern)
    if rev is None:
        raise OocError(f"model {spec!r}: a checkpoint pattern needs the step, e.g. "
                       f"{spec}@1000")
    if not root.expanduser().is_dir():
        raise OocError(f"model {spec!r}: local directory {str(root)!r} does not exist")
    return _local_spec(str(root), rev, patterns)


def _local_spec(path: str, rev: str | None, patterns=DEFAULT_CHECKPOINT_PATTERNS) -> ModelSpec:
    root = Path(path).expanduser().absolute()
    if rev is None:  # "dir/checkpoint-500" is the same model as "dir@500"
        found = _folder_step(root, patterns)
        if found is not None:
            step, folder, top = found
            return _local_step_spec(top, step, folder, patterns)
    elif rev.isdigit():
        return _local_step_spec(root, int(rev), None, patterns)
    elif (named := _step_of_folder(rev, patterns)) is not None:
        return _local_step_spec(root, named[0], rev, patterns)
    load_dir = root if rev is None else root / rev
    if not load_dir.is_dir():
        raise _no_local_revision(root, rev, f"no directory {str(load_dir)!r}", patterns)
    # name: the directory's own name (tiny-a), as in the store label; the path is in model_id
    return ModelSpec(name=root.name, repo_id=None, revision=None, local_dir=str(load_dir),
                     step=None, label=_label(root.name, None, None))


def _folder_step(path: Path, patterns) -> tuple[int, str, Path] | None:
    """(step, folder relative to the model's root, root) when `path` is a checkpoint
    folder by one of `patterns` (a pattern may span folders: '{step}/hf')."""
    for pattern in patterns:
        depth = len(Path(pattern).parts)
        if len(path.parts) <= depth:
            continue
        folder = "/".join(path.parts[-depth:])
        if m := _pattern_re(pattern).match(folder):
            return int(m.group(1)), folder, path.parents[depth - 1]
    return None


def _local_step_spec(root: Path, step: int, folder: str | None, patterns) -> ModelSpec:
    """root's checkpoint folder of `step` (`folder` when named), whatever its naming."""
    found = _local_checkpoints(root, patterns).get(step, [])
    if folder is not None:
        found = [f for f in found if f == folder]
    if not found:
        names = " or ".join(p.format(step=step) for p in patterns)
        raise _no_local_revision(root, folder or str(step),
                                 f"no {names} folder in {str(root)!r}", patterns)
    if len(found) > 1:
        raise OocError(f"model {str(root)!r}: step {step} has {len(found)} folders "
                       f"({', '.join(found)}); name one, e.g. {root}@{found[0]}")
    custom = patterns if patterns != DEFAULT_CHECKPOINT_PATTERNS else None
    return ModelSpec(name=root.name, repo_id=None, revision=found[0],
                     local_dir=str(root / found[0]), step=step,
                     label=_label(root.name, None, step),
                     checkpoint_pattern=custom[0] if custom else None)


def _local_checkpoints(root: Path, patterns=DEFAULT_CHECKPOINT_PATTERNS) -> dict[int, list[str]]:
    """step -> the relative paths of root's checkpoint folders of that step."""
    out: dict[int, list[str]] = {}
    if not root.is_dir():
        return out
    for pattern in patterns:
        for p in sorted(root.glob(pattern.replace(STEP_FIELD, "*"))):
            folder = p.relative_to(root).as_posix()
            m = _pattern_re(pattern).match(folder)
            if m and p.is_dir() and folder not in out.get(int(m.group(1)), []):
                out.setdefault(int(m.group(1)), []).append(folder)
    return out


def _no_local_revision(root: Path, rev: str | None, why: str,
                       patterns=DEFAULT_CHECKPOINT_PATTERNS) -> OocError:
    have = sorted(n for names in _local_checkpoints(root, patterns).values() for n in names)
    hint = ("" if have or patterns != DEFAULT_CHECKPOINT_PATTERNS else
            "; folders named otherwise need a pattern, e.g. DIR/ckpt_{step}@N")
    return OocError(f"model {str(root)!r}: revision {rev!r} not found ({why}); "
                    f"available: {', '.join(have) if have else 'none'}{hint}")


@dataclass
class LoadedModel:
    model: object             # GPT2LMHeadModel, eval(), on device, in dtype
    tokenizer: object | None  # HF tokenizer, or None: the toolkit's byte tokenizer
    spec: ModelSpec
    n_layers: int
    d_mlp: int
    vocab_size: int
    bos_token_id: int | None  # None: the model has no BOS id (256-id byte models, OLMo)
    model_id: str             # hub repo id or local directory
    revision: str | None      # requested revision (None = default branch / local dir)
    commit: str | None = None           # resolved hub commit hash, when known
    tokenizer_name: str | None = None   # "bytes", "bytes256" or where the HF tokenizer
                                        # came from
    family: Family | None = None        # FAMILIES entry of the model's config

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
                       f"{_naming_hint(spec.repo_id)}") from None
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


def _naming_hint(repo_id: str) -> str:
    family = family_of_repo(repo_id)
    if family is None or family.name == "gpt2":
        return "stanford-crfm runs have revisions checkpoint-<step>"
    naming = (family.revision or "").format(step="<step>") or "step<step>-tokens<M>B"
    return f"{family.name} checkpoints are revisions {naming}"


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


def _check_config(config, spec: ModelSpec, families=ENABLED_FAMILIES) -> Family:
    """The config's family; one line when it is not among `families`."""
    family = family_of_config(config)
    if family is not None and family.name in families:
        return family
    kind = getattr(config, "model_type", "?")
    accepted = "; ".join(f"{f.name} (model_type {', '.join(f.model_types)})"
                         for f in FAMILIES.values() if f.name in families)
    raise OocError(f"model {spec.label} ({spec.where}) is a {kind!r} model, not of a "
                   f"supported family: {accepted}; a neuron is the input of the MLP "
                   "output projection, which the toolkit finds only in these families")


def load_model(spec, device="cpu", dtype=None, *, with_tokenizer: bool = True,
               families=ENABLED_FAMILIES) -> LoadedModel:
    """Load a causal LM of one of `families` (eval mode, on `device`, in `dtype`) and its
    tokenizer.

    dtype defaults to torch.float32 and is always passed explicitly: transformers 5 would
    otherwise keep the dtype the checkpoint was saved in (fp16 runs 30x slower on a CPU).
    tokenizer is None for byte-vocabulary models without tokenizer files.
    """
    import torch

    spec = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)
    dtype = torch.float32 if dtype is None else dtype
    source, kw, commit = _model_source(spec)
    if not kw:  # a folder on this disk: checked before anything is loaded
        validate_model_files(spec, folder=source, families=families)
    config = _read_config_checked(spec, source, kw)
    family = _check_config(config, spec, families)
    model = _load_weights(spec, source, kw, dtype)
    if kw:  # downloaded just now: checked before the model is used
        folder = _cached_snapshot(spec)
        if folder is not None:
            validate_model_files(spec, folder=str(folder), families=families)
    model = model.to(resolve_device(device)).eval().requires_grad_(False)
    n_layers, d_mlp = mlp_shape(config)
    _check_neurons(model, family, spec, n_layers, d_mlp)
    tokenizer, tok_name = (load_tokenizer(spec, config=config, _source=(source, kw))
                           if with_tokenizer else (None, None))
    bos = config.bos_token_id
    if bos is None and tokenizer is not None:
        bos = getattr(tokenizer, "bos_token_id", None)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, n_layers=n_layers, d_mlp=d_mlp,
                       vocab_size=int(config.vocab_size),
                       bos_token_id=None if bos is None else int(bos),
                       model_id=spec.repo_id or spec.local_dir, revision=spec.revision,
                       commit=commit, tokenizer_name=tok_name, family=family)


# ---------------------------------------------------------------------------- validation
# A damaged model must never be computed on: transformers fills weights it cannot find
# with random values (a config that claims more layers than the weights hold gives a
# model with random layers), and a garbage config or a truncated weights file ends in a
# traceback. validate_model_files reads config.json and the safetensors headers (8-byte
# length + JSON: no tensor data) and compares them with the shapes the config implies
# (the model built on the meta device: nothing allocated).

_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2,
                "U32": 4, "U64": 8}
_LAYER_KEY = re.compile(r"^(?P<prefix>.*?)\.(?P<layer>\d+)\.(?P<rest>.+)$")


def validate_model_files(spec, folder: str | None = None,
                         families=None) -> dict:
    """Check a model's files before any work: config.json readable and of a supported
    family; weights present and complete (safetensors: each header parses, every
    tensor's bytes lie inside its file, the file is as long as its header says);
    every tensor the config implies that the weights also name has that shape; the
    decoder layers with weights are exactly the config's (not more, not fewer), each
    with its MLP output projection. One OocError line naming the file and the problem.
    `folder`: the model's files (default: the spec's local directory or its cached hub
    snapshot; a hub model not on this disk is checked after its download by load_model).
    Returns {"n_layers", "d_mlp", "files"}."""
    spec = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)
    if folder is None:
        folder = spec.local_dir or (str(_cached_snapshot(spec) or "") or None)
        if folder is None:
            raise OocError(f"model {spec.label} ({spec.where}) is not on this disk; "
                           f"{_download_hint(spec)}")
    folder = Path(folder)
    config = _read_config_checked(spec, str(folder), {})
    _check_config(config, spec, ENABLED_FAMILIES if families is None else families)
    tensors, files = _weight_headers(spec, folder)
    expected, layer_prefix, out_proj = _expected_tensors(config)
    n_layers, d_mlp = mlp_shape(config)
    if tensors is not None:
        _check_tensors(spec, folder, tensors, expected, layer_prefix, out_proj, n_layers)
    return {"n_layers": n_layers, "d_mlp": d_mlp, "files": files}


def _model_error(spec: ModelSpec, path, problem: str, fix: str | None = None) -> OocError:
    fix = fix or ("re-save the model with save_pretrained" if spec.repo_id is None else
                  f"delete it from the HF cache and download it again ({_download_hint(spec)})")
    return OocError(f"model {spec.label}: {str(path)!r} {problem}; {fix}")


def _read_config_checked(spec: ModelSpec, source: str, kw: dict):
    """transformers' config of `source`, or one line naming config.json and the problem."""
    import json as _json
    from transformers import AutoConfig
    path = Path(source) / "config.json"
    if not kw:
        try:
            doc = _json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise _model_error(spec, path, f"is not readable JSON ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:80] if str(exc) else ''})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("model_type"), str):
            raise _model_error(spec, path, "is not a transformers config (no model_type)")
    try:
        return AutoConfig.from_pretrained(source, **kw)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise _model_error(spec, path, f"cannot be read as a config ({first})") from None


def _weight_headers(spec: ModelSpec, folder: Path):
    """({tensor name: (dtype, shape, file)} from the safetensors headers, [files]); the
    tensors are None for pytorch .bin weights (only checked to be complete zip files)."""
    import json as _json
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        try:
            weight_map = _json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise _model_error(spec, index, "is not a readable safetensors index") from None
        files = [folder / s for s in shards]
    elif single.is_file():
        files = [single]
    else:
        bins = sorted(folder.glob("pytorch_model*.bin"))
        if not bins:
            raise _model_error(spec, folder, "holds no weights (model.safetensors, its index, "
                               "or pytorch_model.bin)")
        for b in bins:
            _check_bin(spec, b)
        return None, bins
    tensors = {}
    for f in files:
        if not f.is_file():
            raise _model_error(spec, f, "is missing (the safetensors index names it)")
        for name, (dtype, shape) in _safetensors_header(spec, f).items():
            tensors[name] = (dtype, shape, f)
    return tensors, files


def _safetensors_header(spec: ModelSpec, path: Path) -> dict:
    """{name: (dtype, shape)} of one safetensors file, after checking that the header
    parses and that the file holds every tensor's bytes, no more and no less."""
    import json as _json
    import struct
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n < 2 or 8 + n > size:
            raise _model_error(spec, path, f"is not a safetensors file (truncated or "
                               f"damaged: header length {n}, file {size} bytes)")
        raw = f.read(n)
    try:
        header = _json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError):
        raise _model_error(spec, path, "is not a safetensors file (its header is not JSON: "
                           "damaged)") from None
    out, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], [int(v) for v in info["shape"]]
            begin, stop = (int(v) for v in info["data_offsets"])
            item = _ST_ITEMSIZE[dtype]
        except (KeyError, TypeError, ValueError):
            raise _model_error(spec, path, f"has a damaged header entry for {name!r}") from None
        count = 1
        for v in shape:
            count *= v
        if stop - begin != count * item or begin < 0:
            raise _model_error(spec, path, f"has a damaged header entry for {name!r} "
                               f"({stop - begin} bytes for shape {shape} {dtype})")
        out[name] = (dtype, tuple(shape))
        end = max(end, stop)
    if 8 + n + end != size:
        raise _model_error(spec, path, f"is truncated or damaged: {size} bytes, its header "
                           f"describes {8 + n + end}")
    return out


def _check_bin(spec: ModelSpec, path: Path) -> None:
    """A pytorch_model.bin (torch.save's zip format) whose members are all there."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if not names:
                raise zipfile.BadZipFile("empty")
            for info in zf.infolist():  # sizes only: the CRCs would read every byte
                if info.header_offset + info.compress_size > path.stat().st_size:
                    raise zipfile.BadZipFile("truncated")
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _model_error(spec, path, f"is not a complete torch checkpoint ({exc})") from None


def _expected_tensors(config):
    """({name: shape} of the state dict the config implies, the decoder layers' key
    prefix (e.g. "transformer.h"), the MLP output projection's key within a layer)."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = {id(m): n for n, m in model.named_modules()}
    layer0 = names[id(decoder_layers(model)[0])]          # e.g. "transformer.h.0"
    out_proj = names[id(mlp_out_proj(model, 0))][len(layer0) + 1:] + ".weight"
    return expected, layer0.rsplit(".", 1)[0], out_proj


def _check_tensors(spec: ModelSpec, folder: Path, tensors: dict, expected: dict,
                   layer_prefix: str, out_proj: str, n_layers: int) -> None:
    """Layers with weights are the config's; shared tensors have the shapes it implies."""
    container = layer_prefix.rsplit(".", 1)[-1]           # "h" / "layers"
    by_suffix = {}
    for name, (_, shape, f) in tensors.items():
        m = _LAYER_KEY.match(name)
        if m and m["prefix"].rsplit(".", 1)[-1] == container:
            by_suffix[(int(m["layer"]), m["rest"])] = (shape, f, name)
    layers = sorted({layer for layer, _ in by_suffix})
    where = tensors and next(iter(tensors.values()))[2]
    if layers != list(range(n_layers)):
        held = f"{len(layers)} layer(s)" + (f" ({layers[0]}..{layers[-1]})" if layers else "")
        raise _model_error(spec, where, f"holds weights for {held}, its config.json says "
                           f"{n_layers} layer(s)", "use a config that matches the weights, or "
                           "the weights that match the config")
    for layer in range(n_layers):
        if (layer, out_proj) not in by_suffix:
            raise _model_error(spec, where, f"has no {out_proj} for layer {layer} (the MLP "
                               "output projection whose input is the layer's neurons)")
    for name, want in expected.items():
        m = _LAYER_KEY.match(name)
        hit = (by_suffix.get((int(m["layer"]), m["rest"])) if m and name.startswith(layer_prefix)
               else None)
        if hit is None and name in tensors:
            hit = (tensors[name][1], tensors[name][2], name)
        if hit is not None and tuple(hit[0]) != tuple(want):
            raise _model_error(spec, hit[1], f"holds {hit[2]} of shape {list(hit[0])}, its "
                               f"config.json implies {list(want)}", "use a config that "
                               "matches the weights (n_embd, n_inner, vocab_size, ...)")


def _model_source(spec: ModelSpec) -> tuple[str, dict, str | None]:
    """(path or repo id, from_pretrained kwargs, commit hash or None)."""
    if spec.local_dir is None:
        return _hub_source(spec)
    if not (Path(spec.local_dir) / "config.json").is_file():
        raise OocError(f"model {spec.label}: {spec.local_dir!r} has no config.json; "
                       "give a directory written by save_pretrained")
    return spec.local_dir, {}, None


def _load_weights(spec: ModelSpec, source: str, kw: dict, dtype):
    from transformers import AutoModelForCausalLM
    # transformers 5 draws a "Loading weights" bar per model; a run loads dozens of
    # checkpoints, and the step's own bar already says where it is.
    from ooc_universal.hub import no_weight_loading_bar  # the hub's download bars stay
    try:
        with no_weight_loading_bar():
            return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = _download_hint(spec) if spec.repo_id else "re-save it with save_pretrained"
        raise OocError(f"model {spec.label} ({spec.where}): cannot load the weights ({first}); "
                       f"{hint}") from None


def _check_neurons(model, family: Family, spec: ModelSpec, n_layers: int, d_mlp: int) -> None:
    """Every layer's output projection takes d_mlp inputs, as the config says."""
    axis = out_proj_neuron_axis(model)  # Conv1D: (in, out); nn.Linear: (out, in)
    for layer in range(n_layers):
        width = mlp_out_proj(model, layer).weight.shape[axis]
        if width != d_mlp:
            raise OocError(f"model {spec.label}: layer {layer} MLP has {width} neurons, "
                           f"config says {d_mlp}")


def load_tokenizer(spec, config=None, _source=None) -> tuple[object | None, str]:
    """The spec's own tokenizer and its name; (None, "bytes") for a byte-vocabulary model
    without tokenizer files (257 ids: BOS/EOS 256), (None, "bytes256") for one of plain
    bytes (256 ids, no BOS). Does not load the weights.

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
    if tok_dir is None and int(config.vocab_size) in BYTE_TOKENIZERS:
        return None, BYTE_TOKENIZERS[int(config.vocab_size)]
    if tok_dir is None and spec.repo_id is not None:
        tok_dir = _fetch_tokenizer_files(spec)
    if tok_dir is None:
        fix = (f"or they are not cached: {_download_hint(spec)}" if spec.repo_id
               else "add its tokenizer files (tokenizer.save_pretrained)")
        raise OocError(f"model {spec.label} ({spec.where}) has no tokenizer files and a "
                       f"{config.vocab_size}-token vocabulary (not a byte vocabulary of "
                       f"{BYTE_VOCAB_SIZE} or 256 ids); {fix}")
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


def base_model(model):
    """The decoder stack without the LM head (GPT2LMHeadModel -> .transformer)."""
    return getattr(model, "base_model", model)


def decoder_layers(model):
    """The model's list of decoder layers (GPT-2: transformer.h)."""
    family = family_of_config(getattr(model, "config", None)) or FAMILIES["gpt2"]
    layers = getattr(base_model(model), family.layers, None)
    if layers is None:
        raise OocError(_no_hook(model, family))
    return layers


def mlp_out_proj(model, layer: int):
    """The module whose INPUT is the neurons of `layer`: the MLP output projection
    (GPT-2: transformer.h[layer].mlp.c_proj; FAMILIES for the others). Capture and
    ablation are forward PRE-hooks on it."""
    family = family_of_config(getattr(model, "config", None)) or FAMILIES["gpt2"]
    layers = decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range: the model has {len(layers)} layers")
    proj = layers[layer]
    for name in family.out_proj.split("."):
        proj = getattr(proj, name, None)
    if proj is None:
        raise OocError(_no_hook(model, family))
    return proj


def final_norm(model):
    """The norm between the last decoder layer and the LM head (GPT-2: transformer.ln_f,
    GPT-NeoX: gpt_neox.final_layer_norm, the gated families: model.norm)."""
    family = family_of_config(getattr(model, "config", None)) or FAMILIES["gpt2"]
    norm = getattr(base_model(model), family.final_norm, None)
    if norm is None:
        raise OocError(f"{type(model).__name__} has no {family.final_norm} after its last "
                       f"layer, as a {family.name} model should")
    return norm


def out_proj_neuron_axis(model) -> int:
    """The axis of mlp_out_proj(model, layer).weight that indexes neurons: 0 for GPT-2's
    Conv1D (d_mlp, d_model), 1 for nn.Linear (d_model, d_mlp)."""
    family = family_of_config(getattr(model, "config", None)) or FAMILIES["gpt2"]
    return 0 if family.transposed else 1


def _no_hook(model, family: Family) -> str:
    if family.name == "gpt2":
        return (f"{type(model).__name__} is not a GPT-2-family model: "
                "no transformer.h[i].mlp.c_proj to hook")
    return (f"{type(model).__name__} is not a {family.name} model as expected: "
            f"no {family.layers}[i].{family.out_proj} to hook")


# ------------------------------------------------------- offline facts about a spec

def read_config(spec):
    """The spec's transformers config from the local disk (its directory or the local HF
    cache), or None when it is not there or unreadable. Never touches the network."""
    spec = parse_model_spec(spec)
    folder = spec.local_dir
    if folder is None:
        from huggingface_hub import hf_hub_download
        try:
            folder = str(Path(hf_hub_download(spec.repo_id, "config.json",
                                              revision=spec.revision,
                                              local_files_only=True)).parent)
        except Exception:  # not cached, or the cache is unreadable: not known offline
            return None
    if not (Path(folder) / "config.json").is_file():
        return None
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError):
        return None


def family_of_spec(spec) -> Family | None:
    """The spec's family, offline: from its config when one is on the disk, else from
    the hub id's name (stanford-crfm/ -> gpt2, EleutherAI/pythia- -> gpt-neox); None
    when neither says."""
    spec = parse_model_spec(spec)
    if _known_shape(spec) is not None:
        return family_of_repo(spec.repo_id)
    config = read_config(spec)
    if config is not None:
        return family_of_config(config)
    return family_of_repo(spec.repo_id) if spec.repo_id else None


def model_shape(spec) -> tuple[int, int, int]:
    """(n_layers, d_mlp, n_params) of a spec without downloading anything: known shapes
    for the stanford-crfm runs and every Pythia / PolyPythias size, else its config on
    the disk (parameters counted on the meta device, no memory)."""
    spec = parse_model_spec(spec)
    known = _known_shape(spec)
    if known is not None:
        return known
    config = read_config(spec)
    if config is None:
        raise OocError(f"model {spec.label} ({spec.where}): its shape is not known offline "
                       f"(no config.json on this disk); {_config_hint(spec)}")
    n_layers, d_mlp = mlp_shape(config)
    return n_layers, d_mlp, count_parameters(config)


def _config_hint(spec: ModelSpec) -> str:
    if spec.repo_id is None:
        return "give a directory written by save_pretrained"
    return (f"pre-download its config with `hf download {spec.repo_id} config.json "
            f"--revision {spec.revision or 'main'}`, or give a local directory")


def count_parameters(config) -> int:
    """Parameters of the causal LM a config describes (tied weights once), counted on
    the meta device: nothing is allocated."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return int(sum(p.numel() for p in model.parameters()))


def context_of(spec) -> int | None:
    """The longest window the spec's model takes, offline; None when not known."""
    spec = parse_model_spec(spec)
    known = _known_shape(spec)
    if known is not None:
        return 1024 if known == GPT2_SMALL else PYTHIA_CONTEXT
    config = read_config(spec)
    return None if config is None else context_length(config)


# ----------------------------------------------------------- the models of one run

def unique_labels(specs, checkpoint_pattern: str | None = None) -> list[ModelSpec]:
    """`specs` parsed, with labels unique across the run: models whose labels collide
    (runs/s1/model@100, runs/s2/model@100) get the nearest folders of their paths (the
    org of a hub id) in front until they differ: s1--model@100, s2--model@100. A model
    keeps one stem at all its checkpoints; labels that do not collide are unchanged."""
    parsed = [parse_model_spec(s, checkpoint_pattern) for s in specs]
    stems = {p.root: _stem(p) for p in parsed}
    by_stem: dict[str, list[str]] = {}
    for root, stem in stems.items():
        by_stem.setdefault(stem, []).append(root)
    for stem, roots in by_stem.items():
        if len(roots) > 1:
            stems.update(_distinct_stems(roots))
    return [_with_stem(p, stems[p.root]) for p in parsed]


def _stem(spec: ModelSpec) -> str:
    return spec.label.partition("@")[0]


def _distinct_stems(roots: list[str]) -> dict[str, str]:
    """root -> the shortest tail of its path parts (joined by --) that no other root of
    `roots` shares; a path hash where one path is the tail of another."""
    parts = {r: [_safe(x) for x in Path(r).parts if x not in ("/", "")] for r in roots}
    for k in range(2, max(len(p) for p in parts.values()) + 1):
        tails = {r: "--".join(p[-k:]) for r, p in parts.items()}
        if len(set(tails.values())) == len(roots):
            return tails
    import hashlib
    return {r: f"{'--'.join(p[-2:])}-{hashlib.sha1(r.encode()).hexdigest()[:6]}"
            for r, p in parts.items()}


def _with_stem(spec: ModelSpec, stem: str) -> ModelSpec:
    from dataclasses import replace
    old = _stem(spec)
    return spec if stem == old else replace(spec, label=stem + spec.label[len(old):])


def check_same_family(specs, allow_mixed: bool = False) -> str | None:
    """The family all `specs` belong to (None when none is known offline); one line
    when they span several families, unless allow_mixed: neurons are compared layer by
    layer, which means something only between models of one architecture."""
    labels: dict[str, list[str]] = {}
    for spec in specs:
        spec = parse_model_spec(spec)
        family = family_of_spec(spec)
        if family is not None:
            labels.setdefault(family.name, []).append(spec.label)
    if len(labels) > 1 and not allow_mixed:
        listed = "; ".join(f"{name}: {', '.join(ls)}" for name, ls in labels.items())
        raise OocError(f"the run mixes model families ({listed}); neurons are compared layer "
                       "by layer, which is meaningful within one family only: run each "
                       "family in its own run directory, or allow it explicitly "
                       "(--allow-mixed-families)")
    return next(iter(labels)) if len(labels) == 1 else None
