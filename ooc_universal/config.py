"""One typed RunConfig for the whole study: a section per step, validated on load, saved
with every result, and the only source of defaults (the CLI's defaults come from here).

TOML layout (the file `run` reads and writes as RUN/config.toml):

    models = ["a", "b", "c"]        # the study: which models, which checkpoints
    checkpoints = [100000, 200000]
    [tokens]   n_tokens, n_eval_tokens, window, bos, source, tokenizer
    [compute]  device, memory, scheduler, disk, keep_stores  (where and how fast; not hashed)
    [extract]  compression, batch_size
    [reduce]   precision, baseline_draws, seed, keep_covariance, source, disk_gbps
    [universal] thresholds, definition, extra_baseline_draws, seed
    [cards]    top_n, n_tokens
    [ablate]   control_draws, mode, layerwise, all_non_universal, batch_size, seed
    [report]   zoo_json

A flat file with the old top-level keys (`n_tokens = ...`, `ablate_mode = ...`) still
loads: each legacy key is moved into its section (FLAT_KEYS). Every wrong type, range,
unknown key or unparsable value is one OocError line naming the field, the value and
what is expected.
"""
from __future__ import annotations

import hashlib
import json
import math
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ooc_universal.errors import OocError, UsageError

STANFORD = ["a", "b", "c", "d", "e"]
MAX_TOKENS = 10 ** 12    # a bound that catches a typo (1e15 tokens) before planning
MAX_SEED = 2 ** 32 - 1   # numpy's SeedSequence accepts more, but no one means it


class Section(BaseModel):
    # strict: "5000" is not an integer, 64.5 is not a window, "true" is not a boolean
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True,
                              allow_inf_nan=False)


class TokensConfig(Section):
    source: str = "pile"          # "pile", "zoo-heldout", a text file/folder or .npy
    tokenizer: str = "gpt2"       # "bytes", an HF tokenizer name/path, or a model spec
    n_tokens: int = Field(5_000_000, ge=2, le=MAX_TOKENS)   # valid positions correlated
    n_eval_tokens: int = Field(65_536, ge=0, le=MAX_TOKENS)  # held-out positions (ablate)
    window: int = Field(512, ge=2, le=1 << 20)  # tokens per window, BOS at column 0
    bos: bool = True              # False: windows of text only (models trained without BOS)


class ComputeConfig(Section):
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    memory: str = "8GB"           # per-process memory budget (extract, reduce)
    scheduler: str = ""           # tcp://host:port of a dask.distributed cluster
    disk: str = ""                # disk budget for the run dir ("" = its free space - margin)
    keep_stores: bool = False     # keep a checkpoint's stores after every reader finished

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        kind, _, index = v.partition(":")
        if v != "auto" and (kind not in ("cpu", "cuda") or (index and not index.isdigit())
                            or (kind == "cpu" and index)):
            raise ValueError("expected auto, cpu, cuda or cuda:N")
        return v

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        from ooc_universal.plan import parse_bytes
        try:
            parse_bytes(v)
        except OocError:
            raise ValueError("expected a size such as 8GB, 512MB or 1.5GiB") from None
        return v

    @field_validator("disk")
    @classmethod
    def _disk(cls, v: str) -> str:
        if v:
            from ooc_universal.plan import parse_bytes
            try:
                parse_bytes(v)
            except OocError:
                raise ValueError("expected a size such as 500GB or 2TB, or empty") from None
        return v

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        if v and "://" not in v:
            raise ValueError("expected an address such as tcp://host:8786, or empty")
        return v


class ExtractConfig(Section):
    compression: Literal["none", "gzip", "lzf"] = "none"  # none keeps stores memory-mapped
    batch_size: int = Field(0, ge=0, le=1 << 20)  # windows per forward pass (0 = from memory)
    topk: int = Field(20, ge=0, le=10_000)  # top-activating tokens kept per neuron (0 = none)


class ReduceConfig(Section):
    precision: Literal["fp32", "bf16", "fp64"] = "fp32"  # GEMM inputs (fp32 accumulation)
    baseline_draws: int = Field(3, ge=1, le=1000)  # rotation draws (draw 0 is the paper's)
    seed: int = Field(0, ge=0, le=MAX_SEED)         # draw j uses seed + j
    keep_covariance: bool = False                   # keep the cross co-moments (fp32)
    source: Literal["store", "stream", "auto"] = "store"  # blocks from stores or forward passes
    disk_gbps: float = Field(0.0, ge=0.0, le=1000.0)  # stated disk bandwidth (0 = measure)
    convergence_first: int = Field(1024, ge=0, le=1 << 40)  # first snapshot's tokens (0 = none)
    # a stream's forward passes: fp32 (auto: bf16 missed its 2e-3 bound at GPT-2 small's
    # width, sources.py) or bf16 autocast when asked
    forward_precision: Literal["auto", "fp32", "bf16"] = "auto"


class UniversalConfig(Section):
    thresholds: list[float] = Field(default_factory=lambda: [0.4, 0.5, 0.6], min_length=1)
    definition: Literal["per-pair", "pair-averaged"] = "per-pair"  # paper | Gurnee et al.
    extra_baseline_draws: int = Field(0, ge=0, le=1000)  # from cross_comoment, if kept
    seed: int = Field(0, ge=0, le=MAX_SEED)              # first seed of the extra draws

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: list) -> list:
        bad = [t for t in v if not 0 < t < 1]
        if bad:
            raise ValueError(f"each threshold must lie in (0, 1), got {bad}")
        if len(set(v)) != len(v):
            raise ValueError("thresholds must be distinct")
        return v


class AblateConfig(Section):
    control_draws: int = Field(5, ge=0, le=1000)  # matched random controls per set
    mode: Literal["zero", "mean"] = "zero"         # zero (the paper) | mean
    layerwise: bool = True                         # also each layer's universal neurons
    all_non_universal: bool = False                # also every non-universal neuron
    batch_size: int = Field(0, ge=0, le=1 << 20)   # windows per batch (0 = automatic)
    seed: int = Field(0, ge=0, le=MAX_SEED)        # seed of the matched controls


class CardsConfig(Section):
    top_n: int = Field(8, ge=1, le=10_000)     # cards per pair, by excess (draw 0)
    n_tokens: int = Field(10, ge=1, le=1000)   # promoted and suppressed tokens per card
    n_contexts: int = Field(8, ge=1, le=1000)  # top-activating contexts per card


class ReportConfig(Section):
    zoo_json: str = ""            # a zoo's zoo.json, for held-out losses in the report


SECTIONS = {"tokens": TokensConfig, "compute": ComputeConfig, "extract": ExtractConfig,
            "reduce": ReduceConfig, "universal": UniversalConfig, "cards": CardsConfig,
            "ablate": AblateConfig, "report": ReportConfig}

# legacy flat key (and `run` override name) -> where it lives now
FLAT_KEYS = {
    "source": [("tokens", "source")], "tokenizer": [("tokens", "tokenizer")],
    "n_tokens": [("tokens", "n_tokens")], "n_eval_tokens": [("tokens", "n_eval_tokens")],
    "window": [("tokens", "window")],
    "device": [("compute", "device")], "memory": [("compute", "memory")],
    "scheduler": [("compute", "scheduler")],
    "compression": [("extract", "compression")],
    "extract_batch_size": [("extract", "batch_size")],
    "precision": [("reduce", "precision")], "baseline_draws": [("reduce", "baseline_draws")],
    "keep_covariance": [("reduce", "keep_covariance")],
    "seed": [("reduce", "seed"), ("universal", "seed"), ("ablate", "seed")],
    "thresholds": [("universal", "thresholds")], "definition": [("universal", "definition")],
    "control_draws": [("ablate", "control_draws")], "ablate_mode": [("ablate", "mode")],
    "layerwise": [("ablate", "layerwise")],
    "all_non_universal": [("ablate", "all_non_universal")],
    "ablate_batch_size": [("ablate", "batch_size")],
    "zoo_json": [("report", "zoo_json")],
    # `run` override names of fields added later (also accepted as flat TOML keys)
    "bos": [("tokens", "bos")], "disk": [("compute", "disk")],
    "keep_stores": [("compute", "keep_stores")], "reduce_source": [("reduce", "source")],
    "disk_gbps": [("reduce", "disk_gbps")],
    "forward_precision": [("reduce", "forward_precision")],
}
# what results do not depend on: where and how fast they are computed
NOT_HASHED = {"compute": None, "extract": ("batch_size",), "ablate": ("batch_size",),
              "reduce": ("source", "disk_gbps"), "report": None}


class RunConfig(Section):
    models: list[str]                        # model specs without checkpoint; the first
                                             # is the reference unless `reference`
    checkpoints: list[int] = Field(default_factory=list)  # training steps ("@N"); [] = as given
    reference: str = ""                      # reference model (default: models[0])
    all_references: bool = False             # repeat universal/persistence per reference
    allow_mixed_families: bool = False       # compare models of different families by layer
    tokens: TokensConfig = Field(default_factory=TokensConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    reduce: ReduceConfig = Field(default_factory=ReduceConfig)
    universal: UniversalConfig = Field(default_factory=UniversalConfig)
    cards: CardsConfig = Field(default_factory=CardsConfig)
    ablate: AblateConfig = Field(default_factory=AblateConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @model_validator(mode="before")
    @classmethod
    def _legacy_flat_keys(cls, data):
        return nest_flat_keys(data) if isinstance(data, dict) else data

    @field_validator("checkpoints")
    @classmethod
    def _checkpoints(cls, v: list) -> list:
        if any(c < 0 for c in v):
            raise ValueError("checkpoints must be non-negative training steps")
        if v != sorted(set(v)):
            raise ValueError(f"checkpoints must be sorted and distinct; use {sorted(set(v))}")
        return v

    @field_validator("models")
    @classmethod
    def _models(cls, v: list) -> list:
        if len(v) < 2:
            raise ValueError("need at least two models to compare; list two or more under "
                             "`models`")
        if len(set(v)) != len(v):
            raise ValueError("list each model once")
        if any(not m.strip() for m in v):
            raise ValueError("a model spec is empty")
        return v

    @model_validator(mode="after")
    def _reference(self):
        if self.reference and self.reference not in self.models:
            raise ValueError(f"reference {self.reference!r} is not among models {self.models}")
        return self

    # ------------------------------------------------------------------ the study
    @property
    def reference_model(self) -> str:
        return self.reference or self.models[0]

    def spec(self, model: str, checkpoint: int | None) -> str:
        return model if checkpoint is None else f"{model}@{checkpoint}"

    def checkpoint_list(self) -> list:
        return list(self.checkpoints) or [None]

    # ------------------------------------------------------------------ records
    def to_dict(self) -> dict:
        return self.model_dump()

    def differences(self, other: "RunConfig") -> list[str]:
        """Names of the settings (leaf fields) that differ from `other`'s."""
        a, b = self.to_dict(), other.to_dict()
        out = []
        for k, v in a.items():
            if k in SECTIONS:
                out += [name for name in v if v[name] != b[k].get(name)]
            elif v != b.get(k):
                out.append(k)
        return out

    def hash(self) -> str:
        """What the results depend on (not where or how fast they are computed)."""
        d = self.to_dict()
        for section, keys in NOT_HASHED.items():
            if keys is None:
                d.pop(section)
            else:
                for k in keys:
                    d[section].pop(k)
        # defaults of fields added later: older runs keep their hash
        if d["tokens"]["bos"]:
            d["tokens"].pop("bos")
        if not d["allow_mixed_families"]:
            d.pop("allow_mixed_families")
        if d["cards"]["n_contexts"] == 8:
            d["cards"].pop("n_contexts")
        if d["extract"]["topk"] == 20:
            d["extract"].pop("topk")
        if d["reduce"]["convergence_first"] == 1024:
            d["reduce"].pop("convergence_first")
        if d["reduce"]["forward_precision"] == "auto":
            d["reduce"].pop("forward_precision")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_toml(self) -> str:
        d = self.to_dict()
        lines = ["# ooc-universal run configuration (RunConfig; README: Configuration)"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in d.items() if k not in SECTIONS]
        for name in SECTIONS:
            lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in d[name].items()]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "RunConfig":
        return validated(cls, d, where)

    @classmethod
    def from_toml(cls, path) -> "RunConfig":
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise OocError(f"config file {str(path)!r} not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise OocError(f"config file {str(path)!r} is unreadable ({exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
        return cls.from_dict(data, where=f"config file {str(path)!r}")

    def replace(self, where: str = "command line", **overrides) -> "RunConfig":
        """A copy with `overrides` (flat names as in FLAT_KEYS, or section dicts)."""
        d = self.to_dict()
        for k, v in nest_flat_keys({k: v for k, v in overrides.items() if v is not None}).items():
            if k in SECTIONS and isinstance(v, dict):
                d[k] = {**d[k], **v}
            else:
                d[k] = v
        return validated(RunConfig, d, where)


def nest_flat_keys(data: dict) -> dict:
    """Move legacy top-level keys (FLAT_KEYS) into their sections."""
    out = {k: (dict(v) if k in SECTIONS and isinstance(v, dict) else v)
           for k, v in data.items() if k not in FLAT_KEYS}
    for key, places in FLAT_KEYS.items():
        if key in data:
            for section, name in places:
                sec = out.setdefault(section, {})
                if isinstance(sec, dict):
                    sec.setdefault(name, data[key])
    return out


def validated(model, data, where: str = "config"):
    """`model(**data)` or one OocError line: the field, the value, what is expected."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UsageError(describe_error(exc, where)) from None


def describe_error(exc: ValidationError, where: str) -> str:
    err = exc.errors(include_url=False)[0]
    field = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        parent = err["loc"][:-1]
        known = sorted(_known_keys(parent))
        return f"{where}: unknown key {field!r}; known keys here: {', '.join(known)}"
    if err["type"] == "missing":
        return f"{where}: {field} is missing; it is required (e.g. models = [\"a\", \"b\"])"
    value = err.get("input")
    shown = "NaN" if isinstance(value, float) and math.isnan(value) else repr(value)
    if isinstance(value, dict) and err["loc"] and err["loc"][-1] not in SECTIONS:
        shown = "(the whole config)"
    more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
    return f"{where}: {field} = {shown} is invalid: {msg}{more}"


def _known_keys(parent) -> set:
    model = RunConfig
    for p in parent:
        model = SECTIONS.get(str(p), model)
    return set(model.model_fields)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def read_config_text(run_dir) -> tuple[str | None, dict | None]:
    """(text, parsed TOML) of RUN/config.toml; (None, None) without one, (text, None)
    when it does not parse (a report footer still shows the text)."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        return None, None
    text = path.read_text()
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return text, None


def defaults(section: str) -> Section:
    """The default settings of one section (what a step uses when given none)."""
    return SECTIONS[section]()


# ---------------------------------------------------------------------------- presets

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
        checkpoints=[int(s) for s in steps],
        tokens=TokensConfig(source="zoo-heldout", tokenizer="bytes", n_tokens=65_536,
                            n_eval_tokens=16_384, window=64),
        compute=ComputeConfig(memory="2GB"),
        reduce=ReduceConfig(baseline_draws=3),
        ablate=AblateConfig(control_draws=5),
        report=ReportConfig(zoo_json=str(zoo / "zoo.json")))


def paper_config() -> RunConfig:
    return RunConfig(models=list(STANFORD), checkpoints=[100_000, 200_000, 300_000],
                     reference="a",
                     tokens=TokensConfig(source="pile", tokenizer="gpt2", n_tokens=5_000_000,
                                         n_eval_tokens=65_536, window=512),
                     compute=ComputeConfig(memory="16GB"))


def pythia_config() -> RunConfig:
    """PolyPythias at 160m: the original run (seed 1234) and seed1..seed4, five runs as in
    the paper's study, at an early, a middle and the final step of the schedule
    (branches step1000, step36000, step143000), on the Pile with the Pythia tokenizer;
    12 layers x 3072 neurons per model, as GPT-2 small. More seeds: polypythia_runs."""
    from ooc_universal.models import polypythia_runs
    runs = polypythia_runs("160m", "seed")[:5]
    return RunConfig(models=runs, checkpoints=[1_000, 36_000, 143_000], reference=runs[0],
                     tokens=TokensConfig(source="pile", tokenizer=runs[0],
                                         n_tokens=5_000_000, n_eval_tokens=65_536,
                                         window=512),
                     compute=ComputeConfig(memory="16GB"))


PRESETS = {"demo": demo_config, "paper": paper_config, "pythia": pythia_config}


def load_config(path=None, preset: str | None = None, **overrides) -> RunConfig:
    """A config file, else a preset (default demo), with command-line overrides on top."""
    if path:
        cfg = RunConfig.from_toml(path)
    else:
        name = preset or "demo"
        if name not in PRESETS:
            raise UsageError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg
