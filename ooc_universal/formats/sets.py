"""RUN/universal/sets.json: the universal sets (baseline draw 0); the only reader and writer.

  {"config": {...}, "inputs": [...], "token_hash": "...", "toolkit_version": "...",
   "universal_id": "...", "sets": [record, ...]}

config, inputs, token_hash, toolkit_version and universal_id are the universal step's
provenance (`Provenance`), the same in table1.json and in neurons.parquet's metadata.
A record (`UniversalSet`) is one set:

  reference, other, checkpoint, threshold, definition ("per-pair" | "pair-averaged"),
  draw (0), n_layers, d_mlp, neurons (flat indices layer * d_mlp + neuron, sorted),
  others (pair-averaged sets only: the pairs averaged over)

The file is written with sorted keys (rundir.write_json_atomic) plus its checksum
sidecar, whose `inputs` record the sha256 of every reduce file the sets were made from.
`read_sets` verifies the bytes against the sidecar (verify=True, the default: a file
without one is untrusted and refused); `check_sets_provenance` also checks that those
reduce files are this run's, as they were then (ablate calls it before any model
loads). Readers accept hand-written files that leave out the provenance or a record's
optional fields (None here, left out again by `to_json`), so a record read and written
back hashes the same.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ooc_universal.errors import OocError, StaleInputError
from ooc_universal.rundir import (file_sha256, read_sidecar, recorded_sha256, verify_file,
                                  write_json_atomic)

SETS_FILE = "sets.json"
# record fields in the order they are written; neurons (an array) and others handled apart
_SCALARS = ("reference", "other", "checkpoint", "threshold", "definition", "draw",
            "n_layers", "d_mlp")
_CASTS = {"checkpoint": int, "threshold": float, "draw": int, "n_layers": int, "d_mlp": int}


def sets_path(run_dir) -> Path:
    return Path(run_dir) / "universal" / SETS_FILE


@dataclass(frozen=True)
class Provenance:
    """What produced the universal step's outputs (saved in every one of them)."""
    config: dict | None = None
    inputs: list | None = None
    token_hash: str | None = None
    toolkit_version: str | None = None
    universal_id: str | None = None

    def to_json(self) -> dict:
        return {"config": self.config, "inputs": self.inputs, "token_hash": self.token_hash,
                "toolkit_version": self.toolkit_version, "universal_id": self.universal_id}

    @classmethod
    def from_json(cls, doc: dict) -> "Provenance":
        return cls(**{k: doc.get(k) for k in cls.__dataclass_fields__})


@dataclass(frozen=True, eq=False)
class UniversalSet:
    """One universal set; None marks a field the record does not have."""
    reference: str
    other: str | None = None
    checkpoint: int | None = None
    threshold: float | None = None
    definition: str | None = None
    draw: int | None = None
    n_layers: int | None = None
    d_mlp: int | None = None
    neurons: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # int64
    others: tuple | None = None

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in _SCALARS if getattr(self, k) is not None}
        out["neurons"] = np.asarray(self.neurons, np.int64).tolist()
        if self.others is not None:
            out["others"] = list(self.others)
        return out

    @classmethod
    def from_json(cls, rec: dict) -> "UniversalSet":
        """A record as parsed from JSON; OocError naming the record when a value is bad."""
        if not isinstance(rec, dict) or "reference" not in rec:
            raise OocError(f"sets.json record {str(rec)[:80]!r} has no reference; run "
                           "`ooc-universal universal` again")
        values = {k: rec.get(k) for k in _SCALARS}
        try:
            for k, cast in _CASTS.items():
                if values[k] is not None:
                    values[k] = cast(values[k])
            neurons = np.asarray(rec.get("neurons", []), dtype=np.int64).reshape(-1)
        except (TypeError, ValueError):
            raise OocError(f"sets.json record {_describe(values)} has a value of the wrong "
                           "type; run `ooc-universal universal` again") from None
        others = rec.get("others")
        return cls(**values, neurons=neurons,
                   others=None if others is None else tuple(str(o) for o in others))

    def describe(self) -> str:
        """The record's identity for messages: (reference, other, checkpoint, threshold)."""
        return _describe({k: getattr(self, k) for k in _SCALARS})


def _describe(values: dict) -> str:
    return (f"(reference {values.get('reference')!r}, other {values.get('other')!r}, "
            f"checkpoint {values.get('checkpoint')!r}, threshold {values.get('threshold')!r})")


@dataclass
class SetsFile:
    """RUN/universal/sets.json as read (path and sha256 set) or about to be written."""
    sets: list[UniversalSet]
    provenance: Provenance = field(default_factory=Provenance)
    path: Path | None = None
    sha256: str | None = None   # of the bytes on disk, for the inputs of later steps

    @property
    def token_hash(self) -> str | None:
        return self.provenance.token_hash

    @property
    def config(self) -> dict | None:
        return self.provenance.config

    def to_json(self) -> dict:
        return {**self.provenance.to_json(), "sets": [s.to_json() for s in self.sets]}


def _again(run_dir) -> str:
    return f"run `ooc-universal universal --run-dir {run_dir}` again"


def read_sets(run_dir, verify: bool = True) -> SetsFile:
    """RUN/universal/sets.json, or one line naming the step that makes it. verify: the
    bytes must match the checksum sidecar (untrusted without one)."""
    path = sets_path(run_dir)
    if not path.is_file():
        raise OocError(f"no universal sets at {str(path)!r}; run `ooc-universal universal` "
                       "first")
    if verify:
        verify_file(path, "universal sets", _again(run_dir))
    doc = _parse(path)
    return SetsFile([UniversalSet.from_json(r) for r in doc["sets"]],
                    Provenance.from_json(doc), path, file_sha256(path))


def _parse(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc["sets"], list):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise OocError(f"{str(path)!r} is not a sets file written by `ooc-universal "
                       "universal`; run that step again") from None
    return doc


def as_sets(sets) -> list[UniversalSet]:
    """Universal sets from a SetsFile, a path to sets.json, its parsed dict, a list of
    records (dicts or UniversalSet), or one record."""
    if isinstance(sets, SetsFile):
        return list(sets.sets)
    if isinstance(sets, (str, Path)):
        sets = _parse(Path(sets))
    if isinstance(sets, dict) and "sets" in sets:
        sets = sets["sets"]
    if isinstance(sets, (dict, UniversalSet)):
        sets = [sets]
    return [s if isinstance(s, UniversalSet) else UniversalSet.from_json(s) for s in sets]


def write_sets(run_dir, sets: SetsFile, record: dict | None = None) -> Path:
    """Write RUN/universal/sets.json atomically (with its checksum sidecar)."""
    path = sets_path(run_dir)
    write_json_atomic(path, sets.to_json(), record)
    return path


def check_sets_provenance(run_dir, sets: SetsFile | None = None, token_hash: str | None = None,
                          universal_id: str | None = None) -> SetsFile:
    """The universal sets are this run's, as the universal step wrote them: the bytes
    match the checksum sidecar, they come from token set `token_hash` (when given),
    every reduce file they were made from is in RUN/reduce with the checksum it had then,
    and (when given) their universal_id is `universal_id` (the id the calling run's own
    universal step returned: anything else was rewritten under it). Anything else (a
    sets.json copied from another run, edited by hand, made before a reduce file was
    recomputed, rewritten by another process) is one line naming the file and the fix.
    Returns the sets (read and verified when not given)."""
    sets = read_sets(run_dir) if sets is None else sets
    path, fix = sets.path, _again(run_dir)
    side = read_sidecar(path)
    if side is None:
        verify_file(path, "universal sets", fix)  # raises: untrusted
    if side.get("sha256") != (sets.sha256 or file_sha256(path)):
        raise OocError(f"universal sets {str(path)!r} are damaged: they do not match their "
                       f"checksum sidecar (edited since the universal step wrote them); {fix}")
    if sets.token_hash and token_hash and sets.token_hash != token_hash:
        raise StaleInputError(
            f"universal sets {str(path)!r} were made from token set {sets.token_hash[:12]}, "
            f"this run's is {token_hash[:12]} (a sets.json from another run?); {fix}")
    inputs = side.get("inputs") or {}
    if not inputs:
        raise OocError(f"universal sets {str(path)!r} are untrusted: their checksum sidecar "
                       f"records no reduce files they were made from; {fix}")
    for name, sha in sorted(inputs.items()):
        here = Path(run_dir) / name
        if not here.exists():
            raise StaleInputError(f"universal sets {str(path)!r} were made from {name}, which "
                                  f"is not in this run (a sets.json from another run?); {fix}")
        now = recorded_sha256(here)
        if now is None:
            raise OocError(
                f"universal sets {str(path)!r} were made from {name}, which is untrusted now: "
                f"it has no readable checksum sidecar; recompute it (`ooc-universal reduce`), "
                f"then {fix}")
        if now != sha:
            raise StaleInputError(
                f"universal sets {str(path)!r} were made from {name} with sha256 "
                f"{str(sha)[:12]}, it is now {str(now)[:12]} (recomputed since, or from "
                f"another run); {fix}")
    if universal_id and sets.provenance.universal_id != universal_id:
        raise StaleInputError(
            f"universal sets {str(path)!r} were rewritten while this run was running "
            f"(universal_id {sets.provenance.universal_id}, this run made {universal_id}); "
            f"{fix}, without starting another `universal` under it")
    return sets
