"""One RunConfig (TOML <-> dataclass) for the whole study, and the presets demo / paper.

The config used is saved as RUN/config.toml; every step's output also carries it.
"""
from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ooc_universal.errors import OocError

STANFORD = ["a", "b", "c", "d", "e"]


@dataclass
class RunConfig:
    # what is compared
    models: list = field(default_factory=list)   # model specs without checkpoint; the
                                                 # first is the reference unless `reference`
    checkpoints: list = field(default_factory=list)  # training steps ("@N"); [] = as given
    reference: str = ""                 # reference model (default: models[0])
    all_references: bool = False        # repeat universal/persistence with each reference
    # tokens
    source: str = "pile"                # "pile", "zoo-heldout", a text file/folder or .npy
    tokenizer: str = "gpt2"             # "bytes", an HF tokenizer name/path, or a model spec
    n_tokens: int = 5_000_000           # valid positions correlated
    n_eval_tokens: int = 65_536         # held-out valid positions for the ablation
    window: int = 512                   # tokens per window, BOS at column 0 included
    # extract + reduce
    device: str = "auto"                # auto | cpu | cuda
    memory: str = "8GB"                 # per-process memory budget
    compression: str = "none"           # activation stores: none (memory-mapped) | gzip | lzf
    extract_batch_size: int = 0         # windows per forward pass (0 = from --memory)
    precision: str = "fp32"             # reduce GEMM inputs: fp32 | bf16 | fp64
    baseline_draws: int = 3             # rotation baseline draws (draw 0 is the paper's)
    seed: int = 0                       # first rotation seed; also the controls' seed
    keep_covariance: bool = False       # keep the cross co-moment matrices (fp32)
    scheduler: str = ""                 # tcp://host:port of a dask.distributed cluster
    # universal
    thresholds: list = field(default_factory=lambda: [0.4, 0.5, 0.6])
    definition: str = "per-pair"        # per-pair (the paper) | pair-averaged (Gurnee)
    # ablation
    control_draws: int = 5              # matched random controls per universal set
    ablate_mode: str = "zero"           # zero (the paper) | mean
    layerwise: bool = True              # also ablate each layer's universal neurons alone
    all_non_universal: bool = False     # also ablate every non-universal neuron
    ablate_batch_size: int = 0          # windows per ablation batch (0 = automatic)
    # report
    zoo_json: str = ""                  # a zoo's zoo.json, for held-out losses in the report

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if len(self.models) < 2:
            raise OocError(f"need at least two models to compare, got {self.models}; "
                           "list two or more under `models`")
        if len(set(self.models)) != len(self.models):
            raise OocError(f"duplicate models in {self.models}; list each model once")
        cks = list(self.checkpoints)
        if any(not isinstance(c, int) or c < 0 for c in cks):
            raise OocError(f"checkpoints must be non-negative integer steps, got {cks}")
        if cks != sorted(set(cks)):
            raise OocError(f"checkpoints must be sorted and distinct, got {cks}; "
                           f"use {sorted(set(cks))}")
        bad = [t for t in self.thresholds if not 0 < float(t) < 1]
        if bad or not self.thresholds:
            raise OocError(f"thresholds must lie in (0, 1), got {self.thresholds}")
        if self.reference and self.reference not in self.models:
            raise OocError(f"reference {self.reference!r} is not among models {self.models}")
        for name, val, allowed in (("precision", self.precision, ("fp32", "bf16", "fp64")),
                                   ("device", self.device, ("auto", "cpu", "cuda")),
                                   ("definition", self.definition, ("per-pair", "pair-averaged")),
                                   ("ablate_mode", self.ablate_mode, ("zero", "mean"))):
            if val not in allowed:
                raise OocError(f"{name} {val!r} is not one of {allowed}")
        if self.n_tokens < 2 or self.window < 2:
            raise OocError(f"n_tokens and window must be >= 2, got {self.n_tokens}, "
                           f"{self.window}")

    @property
    def reference_model(self) -> str:
        return self.reference or self.models[0]

    def spec(self, model: str, checkpoint: int | None) -> str:
        return model if checkpoint is None else f"{model}@{checkpoint}"

    def checkpoint_list(self) -> list:
        return list(self.checkpoints) or [None]

    def to_dict(self) -> dict:
        return asdict(self)

    def hash(self) -> str:
        """What the results depend on (not where or how fast they are computed)."""
        d = self.to_dict()
        for k in ("device", "memory", "scheduler", "extract_batch_size",
                  "ablate_batch_size", "zoo_json"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    # TOML
    def to_toml(self) -> str:
        lines = ["# ooc-universal run configuration (RunConfig)"]
        for f in fields(self):
            lines.append(f"{f.name} = {_toml_value(getattr(self, f.name))}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise OocError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_toml(cls, path) -> "RunConfig":
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise OocError(f"config file {str(path)!r} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise OocError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
        return cls.from_dict(data)

    def replace(self, **overrides) -> "RunConfig":
        d = self.to_dict()
        d.update({k: v for k, v in overrides.items() if v is not None})
        return RunConfig.from_dict(d)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def demo_zoo_dir() -> Path:
    """The zoo shipped inside the package (trained with `zoo train --preset demo`)."""
    return Path(__file__).parent / "zoo_data" / "demo"


def demo_config() -> RunConfig:
    zoo = demo_zoo_dir()
    info = json.loads((zoo / "zoo.json").read_text()) if (zoo / "zoo.json").exists() else {}
    names = [m["dir"] for m in info.get("models", [])]
    steps = info.get("checkpoint_steps") or []
    return RunConfig(
        models=[str(zoo / n) for n in names] or ["<demo zoo missing>", "<demo zoo missing 2>"],
        checkpoints=[int(s) for s in steps], source="zoo-heldout", tokenizer="bytes",
        n_tokens=65_536, n_eval_tokens=16_384, window=64, memory="2GB",
        baseline_draws=3, control_draws=5, zoo_json=str(zoo / "zoo.json"))


def paper_config() -> RunConfig:
    return RunConfig(models=list(STANFORD), checkpoints=[100_000, 200_000, 300_000],
                     reference="a", source="pile", tokenizer="gpt2", n_tokens=5_000_000,
                     n_eval_tokens=65_536, window=512, memory="16GB")


PRESETS = {"demo": demo_config, "paper": paper_config}


def load_config(path=None, preset: str | None = None, **overrides) -> RunConfig:
    """A config file, else a preset (default demo), with command-line overrides on top."""
    if path:
        cfg = RunConfig.from_toml(path)
    else:
        name = preset or "demo"
        if name not in PRESETS:
            raise OocError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg
