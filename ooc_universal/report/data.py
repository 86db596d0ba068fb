"""Loading: every step output the report shows, read once into plain records.

The only module of the report that reads files, each through the format module that
owns it where one exists. Every input is optional: a missing or unreadable file becomes
a Source whose `reason` says why, and its section then says "not run" (or "not shown")
instead of the report failing.

  RUN/universal/table1.json           formats.tables.read_table1
  RUN/universal/neurons.parquet|csv   formats.tables.read_neurons (the pair rows); else the
                                      reduce files (formats.reduced), draw 0 of their
                                      baseline
  RUN/persistence/persistence.json    formats.tables.read_persistence
  RUN/cards/cards.json                formats.cards.read_cards
  RUN/tokens/meta.json                formats.tokens.read_token_meta (the footer)
  RUN/ablate/ablation.json            formats.ablation.read_ablation
  RUN/reduce/*.convergence.csv        formats.convergence.read_all_convergence (each
                                      table verified against its checksum sidecar first)
  zoo.json                            read here (the zoo writes it; no reader exists)
  RUN/config.toml                     read here as text (the footer shows it verbatim)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ooc_universal.config import read_config_text
from ooc_universal.errors import OocError
from ooc_universal.formats.ablation import ablate_paths, read_ablation
from ooc_universal.formats.cards import cards_path, read_cards
from ooc_universal.formats.convergence import list_convergence, read_all_convergence
from ooc_universal.formats.reduced import list_reduced, open_reduced
from ooc_universal.formats.tables import (PAIR, persistence_paths, read_neurons,
                                          read_persistence, read_table1, universal_paths)
from ooc_universal.formats.tokens import read_token_meta
from ooc_universal.rundir import file_sha256, verify_file
from ooc_universal.zoo import read_zoo_json

NEURON_COLUMNS = ["reference", "aggregation", "other", "checkpoint", "layer", "max_corr",
                  "baseline_max", "excess", "zero_var"]
# the files the footer lists with their size and checksum, relative to RUN
FOOTER_FILES = ("universal/table1.json", "universal/table1.csv", "universal/table1_draws.csv",
                "universal/sets.json", "persistence/persistence.json",
                "persistence/persistence.csv", "cards/cards.json", "ablate/ablation.json",
                "ablate/ablation.csv", "ablate/ablation_draws.csv", "tokens/meta.json")


@dataclass
class Source:
    """One step output as read: its content, or why there is none."""
    content: object = None         # the format's typed object (Table1File, ...) or a dict
    reason: str | None = None      # "missing", or the one-line error of an unreadable file


@dataclass
class Neurons:
    """The per-neuron table (NEURON_COLUMNS, the pair rows only: the figures compare a
    reference with one other model) and the file(s) it came from."""
    table: object = None           # pandas DataFrame, or None when no source has it
    source: str | None = None


@dataclass
class Provenance:
    """What the footer records about the inputs."""
    config_text: str | None        # RUN/config.toml as written, or None
    token_hash: str | None
    versions: dict                 # step -> toolkit version recorded in its output
    input_files: list              # [path relative to RUN, bytes, sha256 (16 hex)]
    n_reduce_files: int


@dataclass
class RunData:
    """Everything the report shows, as read from one run directory."""
    run_dir: Path
    table1: Source                 # formats.tables.Table1File
    persistence: Source            # formats.tables.PersistenceFile
    ablation: Source               # formats.ablation.AblationFile
    cards: Source                  # formats.cards.CardsFile
    neurons: Neurons
    config: dict | None            # RUN/config.toml parsed (None: absent or unparsable)
    zoo_path: Path | None
    zoo: Source                    # zoo.json as a dict
    provenance: Provenance
    convergence: Source = None     # read_all_convergence's DataFrame (every pair's table)

    def __post_init__(self):
        if self.convergence is None:
            self.convergence = Source(None, "missing")


def load_run(run_dir, zoo_json=None) -> RunData:
    """Read every input of the report from `run_dir` (see the module docstring)."""
    run_dir = Path(run_dir)
    config_text, config = read_config(run_dir)
    sources = {
        "table1": _read_output(universal_paths(run_dir)["table1"], read_table1, run_dir),
        "persistence": _read_output(persistence_paths(run_dir)["json"], read_persistence,
                                    run_dir),
        "ablation": _read_output(ablate_paths(run_dir)["json"], read_ablation, run_dir),
        "cards": _read_output(cards_path(run_dir), read_cards, run_dir),
        "convergence": load_convergence(run_dir)}
    token_meta = read_token_meta(run_dir)
    zoo_path = find_zoo_json(run_dir, zoo_json, config)
    provenance = Provenance(config_text, token_hash(sources, token_meta),
                            input_versions(sources, token_meta), input_files(run_dir),
                            len(list_reduced(run_dir)))
    return RunData(run_dir, neurons=load_neurons(run_dir), config=config,
                   zoo_path=zoo_path, zoo=read_zoo(zoo_path), provenance=provenance,
                   **sources)


# ---------------------------------------------------------------------------- step outputs

def _read_output(path: Path, reader, run_dir: Path) -> Source:
    """A step output through its format's reader; missing and unreadable files are not
    errors here (their sections say so)."""
    if not path.is_file():
        return Source(None, "missing")
    try:
        return Source(reader(run_dir))
    except OocError as exc:
        return Source(None, str(exc))


def load_convergence(run_dir: Path) -> Source:
    """Every pair's token-count convergence table in one DataFrame ("missing" when the
    reduce recorded none); each file verified against its checksum sidecar, and an
    untrusted, damaged or unreadable one is the reason (its section says so)."""
    paths = list_convergence(run_dir)
    if not paths:
        return Source(None, "missing")
    try:
        for path in paths:
            verify_file(path, "convergence table", "run `ooc-universal reduce --force` for "
                        "that pair")
        return Source(read_all_convergence(run_dir))
    except OocError as exc:
        return Source(None, str(exc).rstrip("."))


def read_zoo(path: Path | None) -> Source:
    """A zoo's zoo.json as a dict; "missing" also when no path was found."""
    if path is None or not Path(path).is_file():
        return Source(None, "missing")
    try:
        return Source(read_zoo_json(path))
    except OocError as exc:
        return Source(None, str(exc))


# ---------------------------------------------------------------------------- neurons

def load_neurons(run_dir: Path) -> Neurons:
    """The per-neuron table of the universal step, else the same columns from the reduce
    files (so the scatter and histogram show before `universal` has run)."""
    try:
        found = read_neurons(run_dir, columns=NEURON_COLUMNS)
        pairs = found.frame[found.frame["aggregation"] == PAIR].reset_index(drop=True)
        return Neurons(pairs, f"universal/{found.path.name}")
    except OocError:
        pass
    frames = [f for f in map(_neurons_of_pair, list_reduced(run_dir)) if f is not None]
    if frames:
        import pandas as pd
        return Neurons(pd.concat(frames, ignore_index=True),
                       "reduce/*.h5 (row_max, baseline/row_max)")
    return Neurons()


def _neurons_of_pair(path: Path):
    """NEURON_COLUMNS of one reduce file (baseline draw 0), None when unreadable."""
    import pandas as pd
    try:
        with open_reduced(path) as stats:
            baselines = stats.baseline_row_max
            if baselines.shape[0] == 0:
                return None
            row_max = stats.row_max.astype(np.float64)
            baseline = baselines[0].astype(np.float64)
            d_mlp = int(stats.attrs["d_mlp_ref"])
            return pd.DataFrame({
                "reference": str(stats.attrs["ref_name"]), "aggregation": PAIR,
                "other": str(stats.attrs["other_name"]),
                "checkpoint": int(stats.attrs["ref_step"]),
                "layer": np.arange(row_max.size) // d_mlp, "max_corr": row_max,
                "baseline_max": baseline, "excess": row_max - baseline,
                "zero_var": stats.ref_zero_var.astype(bool)})
    except (OSError, KeyError, OocError):
        return None


# ---------------------------------------------------------------------------- zoo.json

def find_zoo_json(run_dir, zoo_json=None, config=None) -> Path | None:
    """The zoo.json to report: the argument, RUN/config.toml's `zoo_json`, or the one
    beside a local model named by the reduce files (its dir, parent or grandparent)."""
    run_dir = Path(run_dir)
    if zoo_json:
        return Path(zoo_json).expanduser()       # shown as "not available" when missing
    value = _find_key(config, "zoo_json")
    if value:
        path = Path(str(value)).expanduser()
        if not path.is_absolute() and (run_dir / path).exists():
            path = run_dir / path                # relative to the run directory when there
        return path
    for model_dir in _local_model_dirs(run_dir):
        for folder in (model_dir, model_dir.parent, model_dir.parent.parent):
            if (folder / "zoo.json").is_file():
                return folder / "zoo.json"
    return None


def _find_key(tree, key):
    """The first non-empty `key` in a nested dict (the TOML may be flat or sectioned)."""
    if isinstance(tree, dict):
        if tree.get(key):
            return tree[key]
        for value in tree.values():
            found = _find_key(value, key)
            if found:
                return found
    return None


def _local_model_dirs(run_dir: Path):
    """The existing absolute model paths the reduce files name, in file order."""
    for path in list_reduced(run_dir):
        try:
            with open_reduced(path) as stats:
                ids = [stats.attrs.get(k) for k in ("ref_model_id", "other_model_id")]
        except (OSError, OocError):
            continue
        for model_id in ids:
            model = Path(str(model_id or ""))
            if model_id and model.is_absolute() and model.exists():
                yield model


# ---------------------------------------------------------------------------- footer

def read_config(run_dir: Path):
    """(text, parsed) of RUN/config.toml (config.read_config_text)."""
    return read_config_text(run_dir)


def token_hash(sources: dict, token_meta: dict | None) -> str | None:
    """The token set's hash, from tokens/meta.json or the first output that records it."""
    table1, persistence = sources["table1"].content, sources["persistence"].content
    ablation = sources["ablation"].content
    ablation_inputs = (ablation.inputs if ablation else None) or {}
    return ((token_meta or {}).get("hash")
            or (table1.provenance.token_hash if table1 else None)
            or (persistence.token_hash if persistence else None)
            or ablation_inputs.get("token_hash"))


def input_versions(sources: dict, token_meta: dict | None) -> dict:
    """step -> the toolkit version that wrote its output."""
    table1, persistence = sources["table1"].content, sources["persistence"].content
    ablation = sources["ablation"].content
    cards = sources["cards"].content
    versions = {"universal": table1.provenance.toolkit_version if table1 else None,
                "persistence": persistence.toolkit_version if persistence else None,
                "cards": cards.toolkit_version if cards else None,
                "ablate": ablation.toolkit_version if ablation else None,
                "tokens": (token_meta or {}).get("toolkit_version")}
    return {step: version for step, version in versions.items() if version}


def input_files(run_dir: Path) -> list:
    """[relative path, size, sha256 prefix] of each FOOTER_FILES entry that exists, and
    of each pair's convergence table."""
    rows = []
    convergence = [f"reduce/{p.name}" for p in list_convergence(run_dir)]
    for rel in (*FOOTER_FILES, *convergence):
        path = run_dir / rel
        if path.is_file():
            rows.append([rel, str(path.stat().st_size), file_sha256(path)[:16]])
    return rows
