"""Universal neurons from the reduced statistics: excess correlation, sets, Table 1.

Reads RUN/reduce/<ref_label>__<other_label>.h5 through formats/reduced.py (attributes and
a few (N,) arrays; the (Na, Nb) cross co-moment only when more baseline draws are asked
for) and writes RUN/universal/ through formats/tables.py and formats/sets.py:

  neurons.parquet, neurons.csv  one row per (reference, aggregation, other, checkpoint,
                                ref neuron): max corr, match, baseline and excess of draw 0,
                                is_universal_<tau>
  neuron_draws.parquet          the same, one row per baseline draw
  table1.json, table1.csv,      % universal per threshold x checkpoint, per pair (and
  table1_draws.csv              their mean), whole model and per layer: the draw-0 view
                                with the spread over draws, and one row per draw
  sets.json                     the universal sets (draw 0), read by persistence/ablate
(formats/tables.py documents the columns and their conventions.)

Definitions (the paper, after Gurnee et al. 2024):

  excess_j[k] = row_max[k] - baseline_row_max[j, k]
      row_max[k]: max over every neuron l of the other model of rho(a_k, b_l);
      baseline_row_max[j, k]: the same max over the other model rotated layer by layer
      with the Gaussian rotation of draw j (seed baseline_seeds[j]).
  excess = excess_0: the paper's single-rotation definition; the other draws only
      give the spread the random rotation puts on every fraction.
  universal at threshold tau: excess > tau (strict; excess == tau is not universal).
  per-pair (default, the paper): one set per (reference, other, checkpoint).
  pair-averaged (Gurnee et al.): row_max and baseline averaged over the reference's
      pairs at a checkpoint before subtracting; one set per (reference, checkpoint),
      written to sets.json with other = "pair-averaged" and to the tables as rows of
      aggregation "pair_averaged".

A zero-variance reference neuron has row_max 0 and baseline 0, so excess 0: it is
never universal but counts in every denominator
(pct_universal = 100 * n_universal / n_neurons).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ooc_universal import __version__
from ooc_universal.config import UniversalConfig
from ooc_universal.errors import OocError, StaleInputError, UsageError
from ooc_universal.formats.reduced import ReducedStats, list_reduced, open_reduced
from ooc_universal.formats.sets import Provenance, SetsFile, UniversalSet
from ooc_universal.formats.tables import (MEAN_OVER_PAIRS, PAIR, SCOPE_ALL, SCOPE_LAYER,
                                          Table1File, table1_view, universal_column,
                                          write_universal)
from ooc_universal.formats.tables import PAIR_AVERAGED as AVERAGED_ROWS  # "pair_averaged"
from ooc_universal.formats.tokens import existing_hash, meta_path
from ooc_universal.rundir import (check_free_space, config_hash, file_lock, recorded_sha256,
                                  refuse_if_run_in_progress, remove_dead_temporaries,
                                  step_dir)

DEFINITIONS = ("per-pair", "pair-averaged")
PAIR_AVERAGED = "pair-averaged"  # the definition, and the `other` of its sets in sets.json


# ---------------------------------------------------------------- reading reduce files

@dataclass(frozen=True)
class ReducedPair:
    """What one reduce file says about itself (attributes only; no arrays read)."""
    path: Path
    ref_label: str
    other_label: str
    ref_name: str
    other_name: str
    ref_step: int
    other_step: int
    ref_model_id: str
    other_model_id: str
    token_hash: str
    n_tokens: int
    n_layers_ref: int
    d_mlp_ref: int
    n_layers_other: int
    d_mlp_other: int
    baseline_seeds: tuple
    has_cross_comoment: bool
    precision: str
    toolkit_version: str
    reduce_config: dict | None = field(repr=False, default=None)

    @property
    def checkpoint(self) -> int:
        return self.ref_step

    @property
    def n_ref(self) -> int:
        return self.n_layers_ref * self.d_mlp_ref

    def describe(self) -> dict:
        """The provenance record written into every output."""
        return {
            "file": self.path.name, "ref_label": self.ref_label,
            "other_label": self.other_label, "ref_name": self.ref_name,
            "other_name": self.other_name, "checkpoint": self.checkpoint,
            "ref_model_id": self.ref_model_id, "other_model_id": self.other_model_id,
            "token_hash": self.token_hash, "n_tokens": self.n_tokens,
            "baseline_seeds": list(self.baseline_seeds), "precision": self.precision,
            "toolkit_version": self.toolkit_version, "reduce_config": self.reduce_config}


def read_reduced(path) -> ReducedPair:
    """The attributes of one reduce file (formats.reduced checks the header)."""
    with open_reduced(path) as stats:
        return _pair_of(stats)


def _pair_of(stats: ReducedStats) -> ReducedPair:
    a = stats.attrs
    text = {k: str(a.get(k, "")) for k in ("ref_label", "other_label", "ref_name",
                                            "other_name", "ref_model_id", "other_model_id",
                                            "token_hash", "precision", "toolkit_version")}
    ints = {k: int(a[k]) for k in ("ref_step", "other_step", "n_tokens", "n_layers_ref",
                                   "d_mlp_ref", "n_layers_other", "d_mlp_other")}
    return ReducedPair(path=stats.path, **text, **ints, baseline_seeds=stats.baseline_seeds,
                       has_cross_comoment=stats.has_cross_comoment,
                       reduce_config=stats.config if a.get("config_json") else None)


def find_reduced(run_dir) -> list[ReducedPair]:
    """Every complete reduce file in RUN/reduce (attributes only), sorted.

    Only the final names count: `x.h5.partial` and temporary names are work in
    progress and are skipped.
    """
    paths = list_reduced(run_dir)
    if not paths:
        raise OocError(f"no reduced statistics in {str(Path(run_dir) / 'reduce')!r} "
                       "(expected <ref>__<other>.h5 files); run `ooc-universal reduce` first")
    records = [read_reduced(p) for p in paths]
    return sorted(records, key=lambda r: (r.ref_name, r.checkpoint, r.other_name, r.path.name))


def check_thresholds(thresholds) -> tuple[float, ...]:
    """Thresholds as sorted unique floats, each strictly inside (0, 1)."""
    if isinstance(thresholds, (int, float)):
        thresholds = [thresholds]
    out = []
    for t in thresholds:
        try:
            value = float(t)
        except (TypeError, ValueError):
            raise UsageError(f"threshold {t!r} is not a number; give values in (0, 1), "
                           "e.g. --thresholds 0.4,0.5,0.6") from None
        if not (0.0 < value < 1.0):  # also rejects NaN
            raise UsageError(f"threshold {t!r} is outside (0, 1); an excess-correlation "
                           "threshold must satisfy 0 < tau < 1, e.g. --thresholds 0.4,0.5,0.6")
        out.append(value)
    if not out:
        raise UsageError("no thresholds given; give values in (0, 1), e.g. --thresholds 0.4,0.5,0.6")
    return tuple(sorted(set(out)))


def _check_token_set(run_dir, records) -> str:
    hashes = {}
    for r in records:
        hashes.setdefault(r.token_hash, []).append(r.path.name)
    if len(hashes) > 1:
        parts = "; ".join(f"{h[:12]}: {', '.join(files)}" for h, files in hashes.items())
        raise StaleInputError(
            f"reduce files come from {len(hashes)} different token sets ({parts}); "
            "delete the stale files and re-run `ooc-universal reduce` on one token set")
    token_hash = records[0].token_hash
    current = existing_hash(run_dir)
    if current and current != token_hash:
        raise StaleInputError(
            f"reduce files were made from token set {token_hash[:12]} but "
            f"{str(meta_path(run_dir))!r} is token set {current[:12]}; re-run "
            "`ooc-universal reduce` (and extract) for the current token set")
    return token_hash


def _check_checkpoints(records) -> None:
    for r in records:
        if r.ref_step != r.other_step:
            raise OocError(
                f"{r.path.name} pairs checkpoint {r.ref_step} of {r.ref_name} with "
                f"checkpoint {r.other_step} of {r.other_name}; the universal step compares "
                "models at the same checkpoint: remove it or reduce a same-step pair")


def _match_reference(value: str, names: list[str], records) -> str | None:
    for name in names:
        ids = {name, name.rstrip("/").split("/")[-1]}
        ids |= {r.ref_label for r in records if r.ref_name == name}
        ids |= {r.ref_model_id for r in records if r.ref_name == name and r.ref_model_id}
        if value in ids:
            return name
    try:  # a model alias ("a") or spec, when the models module is there
        from ooc_universal.models import parse_model_spec
        spec_name = parse_model_spec(value).name
    except Exception:  # noqa: BLE001 - not a spec: fall through to the error
        return None
    return spec_name if spec_name in names else None


def select_references(records, reference=None, all_references=False) -> list[str]:
    """The reference model names to analyse (ref_name values of the reduce files)."""
    names = sorted({r.ref_name for r in records})
    if reference is not None and all_references:
        raise OocError("give either --reference or --all-references, not both")
    if all_references:
        return names
    if reference is not None:
        name = _match_reference(str(reference), names, records)
        if name is None:
            raise OocError(f"reference {reference!r} is not the reference of any reduce "
                           f"file; available: {', '.join(names)}")
        return [name]
    if len(names) > 1:
        raise OocError(f"the reduce files have {len(names)} reference models "
                       f"({', '.join(names)}); choose one with --reference NAME or use "
                       "--all-references")
    return names


def _check_selection(records) -> None:
    seen = {}
    for r in records:
        key = (r.ref_name, r.other_name, r.checkpoint)
        if key in seen:
            raise OocError(
                f"two reduce files for {r.ref_name} vs {r.other_name} at checkpoint "
                f"{r.checkpoint}: {seen[key].path.name} and {r.path.name}; delete one")
        seen[key] = r
    shapes = {}
    for r in records:
        shape = (r.n_layers_ref, r.d_mlp_ref)
        first = shapes.setdefault(r.ref_name, (shape, r))
        if first[0] != shape:
            raise OocError(
                f"reference {r.ref_name} has {first[0][0]}x{first[0][1]} neurons in "
                f"{first[1].path.name} but {shape[0]}x{shape[1]} in {r.path.name}; "
                "re-run `ooc-universal reduce` for the stale file")


# ---------------------------------------------------------------- baseline draws

def extra_draw_seeds(existing, n: int, seed: int = 0) -> tuple[int, ...]:
    """`n` rotation seeds for additional draws: seed, seed+1, ... skipping used ones."""
    used, out, s = set(int(x) for x in existing), [], int(seed)
    while len(out) < n:
        if s not in used:
            out.append(s)
        s += 1
    return tuple(out)


def baseline_from_cross_comoment(stats: ReducedStats, seeds, progress: bool = False
                                 ) -> np.ndarray:
    """Baseline row maxima (len(seeds), Na) float64 from a kept cross co-moment.

    For seed s and layer l of the other model, R = rotation_matrix(s, l, d) and
      cov(a_k, (R b)_m) ~ (C[:, layer l] R^T)[k, m],  var((R b)_m) ~ R[m] S_l R[m]^T,
    with C = cross_comoment, S_l = other/self_comoment[l] and the reference's
    co-moment m2_x = ref/var * n_tokens (all sums, so the 1/n cancels in rho).
    No pass over the activations: kernels.rotation.rotation_baseline (the reduce's own
    baseline) reads C one strip of rows at a time.
    """
    from tqdm.auto import tqdm

    from ooc_universal.kernels.rotation import rotation_baseline

    n_layers, d = int(stats.attrs["n_layers_other"]), int(stats.attrs["d_mlp_other"])
    cross = stats.cross_comoment
    m2_x = stats.ref_var.astype(np.float64) * stats.n_tokens  # (Na,)
    if cross.shape != (m2_x.size, n_layers * d):
        raise OocError(f"{str(stats.path)!r}: cross_comoment has shape {cross.shape}, "
                       f"expected ({m2_x.size}, {n_layers * d}); re-run `ooc-universal reduce`")
    with tqdm(total=len(seeds) * n_layers, disable=not progress, unit="layer", leave=False,
              desc=f"baseline draws {stats.path.stem}") as bar:
        return rotation_baseline(cross, m2_x, stats.self_comoment, seeds, d,
                                 zero_rows=stats.ref_zero_var.astype(bool),
                                 on_layer=lambda: bar.update(1))


# ---------------------------------------------------------------- per-pair statistics

@dataclass
class PairStats:
    """One pair's per-neuron numbers, all draws (draw 0 first)."""
    record: ReducedPair
    row_max: np.ndarray  # (Na,) float64 (exact copy of the file's float32)
    row_argmax: np.ndarray  # (Na,) int64 flat index into the other model, -1 if none
    zero_var: np.ndarray  # (Na,) bool, reference neurons with zero variance
    baseline: np.ndarray  # (D, Na) float64
    seeds: tuple  # (D,) rotation seed of each draw
    sources: tuple  # (D,) "reduce" | "cross_comoment"

    @property
    def excess(self) -> np.ndarray:
        """(D, Na) excess correlation per draw; row 0 is the canonical one."""
        return self.row_max[None, :] - self.baseline


def load_pair(record: ReducedPair, extra_baseline_draws: int = 0, seed: int = 0,
              progress: bool = False) -> PairStats:
    """Read one pair's row maxima and baselines, adding draws from the cross co-moment."""
    with open_reduced(record.path) as stats:
        row_max = stats.row_max.astype(np.float64)
        if row_max.size != record.n_ref:
            raise OocError(f"{record.path.name}: row_max has {row_max.size} entries, "
                           f"expected {record.n_layers_ref} x {record.d_mlp_ref}; re-run reduce")
        baseline = stats.baseline_row_max.astype(np.float64)
        if baseline.shape[0] != len(record.baseline_seeds):
            raise OocError(f"{record.path.name}: baseline/row_max has {baseline.shape[0]} "
                           f"draws but baseline_seeds lists {len(record.baseline_seeds)}; "
                           "re-run reduce")
        seeds, sources = list(record.baseline_seeds), ["reduce"] * len(record.baseline_seeds)
        if extra_baseline_draws:
            new = extra_draw_seeds(seeds, extra_baseline_draws, seed)
            baseline = np.concatenate([baseline, _extra_draws(stats, new, progress)], axis=0)
            seeds += list(new)
            sources += ["cross_comoment"] * len(new)
        pair = PairStats(record, row_max, stats.row_argmax.astype(np.int64),
                         stats.ref_zero_var.astype(bool), baseline, tuple(seeds),
                         tuple(sources))
    if baseline.shape[0] == 0:
        raise OocError(f"{record.path.name} has no baseline draw; re-run `ooc-universal "
                       "reduce` with --baseline-draws 1 or more (or --keep-covariance and "
                       "--extra-baseline-draws here)")
    return pair


def _extra_draws(stats: ReducedStats, seeds, progress: bool) -> np.ndarray:
    if not stats.has_cross_comoment:
        raise OocError(f"{stats.path.name} has no cross_comoment, so no extra baseline "
                       "draws can be computed from it; re-run `ooc-universal reduce "
                       "--keep-covariance` or ask for more --baseline-draws there")
    return baseline_from_cross_comoment(stats, seeds, progress=progress)


@dataclass
class Unit:
    """One block of per-neuron numbers: a pair, or a reference's pair average (its
    aggregation "pair_averaged", no other model and no matched neuron)."""
    reference: str
    aggregation: str  # formats.tables PAIR | PAIR_AVERAGED
    other: str | None  # the other model of a pair
    checkpoint: int
    n_layers: int
    d_mlp: int
    row_max: np.ndarray  # (Na,)
    baseline: np.ndarray  # (D, Na), draw 0 first
    zero_var: np.ndarray  # (Na,)
    others: tuple  # the pairs behind it (one for a pair)
    match: np.ndarray | None = None  # (Na,) flat index into the other model, -1: none
    d_other: int = 1
    seeds: tuple | None = None  # (D,) rotation seed of each draw (pairs only)
    sources: tuple | None = None  # (D,) "reduce" | "cross_comoment" (pairs only)

    @property
    def excess(self) -> np.ndarray:
        """(D, Na) excess correlation per draw; row 0 is the canonical one."""
        return self.row_max[None, :] - self.baseline

    @property
    def set_other(self) -> str:
        """The `other` of this unit's universal sets (sets.json keeps "pair-averaged")."""
        return self.other if self.aggregation == PAIR else PAIR_AVERAGED


def pair_units(stats: list[PairStats]) -> list[Unit]:
    return [Unit(s.record.ref_name, PAIR, s.record.other_name, s.record.checkpoint,
                 s.record.n_layers_ref, s.record.d_mlp_ref, s.row_max, s.baseline, s.zero_var,
                 (s.record.other_name,), s.row_argmax, s.record.d_mlp_other, s.seeds,
                 s.sources) for s in stats]


def averaged_units(stats: list[PairStats]) -> list[Unit]:
    """A reference's pairs at one checkpoint averaged (Gurnee et al.): the mean row_max
    and baseline (over the fewest draws of any pair), zero variance in any pair."""
    groups: dict = {}
    for s in stats:
        groups.setdefault((s.record.ref_name, s.record.checkpoint), []).append(s)
    out = []
    for (ref, ckpt), group in groups.items():
        n_draws = min(s.baseline.shape[0] for s in group)
        first = group[0].record
        out.append(Unit(ref, AVERAGED_ROWS, None, ckpt, first.n_layers_ref, first.d_mlp_ref,
                        np.mean([s.row_max for s in group], axis=0),
                        np.mean([s.baseline[:n_draws] for s in group], axis=0),
                        np.any([s.zero_var for s in group], axis=0),
                        tuple(s.record.other_name for s in group)))
    return out


def set_units(stats: list[PairStats], definition: str) -> list[Unit]:
    """What the universal sets and Table 1 are made from under `definition`."""
    return pair_units(stats) if definition == "per-pair" else averaged_units(stats)


# ---------------------------------------------------------------- per-neuron tables

def _neuron_keys(u: Unit) -> dict:
    """The identity columns of a unit's rows (formats.tables.NEURON_KEYS)."""
    import pandas as pd
    n = u.row_max.size
    flat = np.arange(n, dtype=np.int64)
    return {"reference": pd.array([u.reference] * n, dtype="str"),
            "aggregation": pd.array([u.aggregation] * n, dtype="str"),
            "other": pd.array([u.other] * n, dtype="str"),
            "checkpoint": np.full(n, u.checkpoint, np.int64),
            "layer": pd.array(flat // u.d_mlp, dtype="Int64"), "neuron": flat % u.d_mlp,
            "flat_index": flat}


def _matches(u: Unit) -> tuple:
    """(match_layer, match_neuron) as nullable integers, <NA> where there is no match."""
    import pandas as pd
    if u.match is None:
        none = pd.array([None] * u.row_max.size, dtype="Int64")
        return none, none.copy()
    found = u.match >= 0
    layer = pd.array(np.where(found, u.match // u.d_other, 0), dtype="Int64")
    neuron = pd.array(np.where(found, u.match % u.d_other, 0), dtype="Int64")
    layer[~found] = pd.NA
    neuron[~found] = pd.NA
    return layer, neuron


def _neurons_of(u: Unit, thresholds):
    """The draw-0 view of one unit (formats.tables.NEURON_COLUMNS + is_universal_*)."""
    import pandas as pd
    match_layer, match_neuron = _matches(u)
    excess = u.excess[0]
    cols = {**_neuron_keys(u), "max_corr": u.row_max, "match_layer": match_layer,
            "match_neuron": match_neuron, "baseline_max": u.baseline[0], "excess": excess,
            "n_draws": np.full(u.row_max.size, u.baseline.shape[0], np.int64),
            "zero_var": u.zero_var.astype(bool)}
    cols.update({universal_column(tau): excess > tau for tau in thresholds})
    return pd.DataFrame(cols)


def _draws_of(u: Unit, thresholds):
    """One unit's rows of the long table, one per (neuron, draw), draw-major."""
    import pandas as pd
    n_draws, n = u.baseline.shape
    rows = np.tile(np.arange(n), n_draws)       # row j * n + k is neuron k at draw j
    excess = u.excess.reshape(-1)
    seeds = (pd.array([None] * rows.size, dtype="Int64") if u.seeds is None else
             pd.array(np.repeat(np.asarray(u.seeds, np.int64), n), dtype="Int64"))
    sources = ["pair_average"] * n_draws if u.sources is None else list(u.sources)
    cols = {k: v.take(rows) for k, v in _neuron_keys(u).items()}
    cols.update({
        "draw": np.repeat(np.arange(n_draws, dtype=np.int64), n), "seed": seeds,
        "draw_source": pd.array(np.repeat(np.asarray(sources), n), dtype="str"),
        "max_corr": u.row_max[rows], "baseline_max": u.baseline.reshape(-1),
        "excess": excess})
    cols.update({universal_column(tau): excess > tau for tau in thresholds})
    return pd.DataFrame(cols)


def neuron_tables(units: list[Unit], thresholds) -> tuple:
    """(draw-0 view, long table) of every unit's neurons (formats.tables)."""
    import pandas as pd
    neurons = pd.concat([_neurons_of(u, thresholds) for u in units], ignore_index=True)
    draws = pd.concat([_draws_of(u, thresholds) for u in units], ignore_index=True)
    return neurons, draws


# ---------------------------------------------------------------- Table 1

def _counts(unit: Unit, tau: float) -> np.ndarray:
    """(D, L) universal counts per draw and layer (strict excess > tau)."""
    d_draws = unit.excess.shape[0]
    return (unit.excess > tau).reshape(d_draws, unit.n_layers, unit.d_mlp).sum(-1)


def _scopes(n_layers: int) -> list:
    """(scope, layer) of the rows of one cell: the whole model, then each layer."""
    return [(SCOPE_ALL, None)] + [(SCOPE_LAYER, layer) for layer in range(n_layers)]


def _unit_draw_rows(u: Unit, tau: float, definition: str) -> list[dict]:
    """Table 1's long rows of one unit at one threshold: per draw, per scope."""
    counts = _counts(u, tau)  # (D, L)
    zero = u.zero_var.reshape(u.n_layers, u.d_mlp).sum(-1)
    rows = []
    for j in range(counts.shape[0]):
        for scope, layer in _scopes(u.n_layers):
            n_univ = int(counts[j].sum() if layer is None else counts[j, layer])
            n = u.n_layers * u.d_mlp if layer is None else u.d_mlp
            rows.append({"reference": u.reference, "definition": definition,
                         "aggregation": u.aggregation, "other": u.other,
                         "checkpoint": u.checkpoint, "threshold": tau, "scope": scope,
                         "layer": layer, "draw": j, "n_universal": n_univ, "n_neurons": n,
                         "pct_universal": 100.0 * n_univ / n,
                         "n_zero_var": int(zero.sum() if layer is None else zero[layer]),
                         "n_pairs": len(u.others)})
    return rows


def _mean_rows(pair_rows: list[dict], n_pairs: int, common: int) -> list[dict]:
    """mean_over_pairs rows: per draw below `common` (every pair has it) and scope, the
    mean of the pairs' percent; no count (a mean of counts is not a count)."""
    groups: dict = {}
    for r in pair_rows:
        if r["draw"] < common:
            groups.setdefault((r["draw"], r["scope"], r["layer"]), []).append(r)
    return [{**group[0], "aggregation": MEAN_OVER_PAIRS, "other": None, "n_universal": None,
             "pct_universal": float(np.mean([r["pct_universal"] for r in group])),
             "n_zero_var": None, "n_pairs": n_pairs} for group in groups.values()]


def table1_draws(units: list[Unit], thresholds, definition: str) -> list[dict]:
    """Table 1 in long format (formats.tables.TABLE1_DRAW_COLUMNS): per (reference,
    checkpoint, threshold) every unit's rows, then (per-pair) their mean over pairs."""
    groups: dict = {}
    for u in units:
        groups.setdefault((u.reference, u.checkpoint), []).append(u)
    rows = []
    for key in sorted(groups):
        group = sorted(groups[key], key=lambda u: str(u.other))
        common = min(u.baseline.shape[0] for u in group)
        for tau in thresholds:
            mine = [r for u in group for r in _unit_draw_rows(u, tau, definition)]
            if definition == "per-pair":
                mine = _mean_rows(mine, len(group), common) + mine
            rows += mine
    return rows


def universal_sets(units: list[Unit], thresholds, definition: str) -> list[UniversalSet]:
    """The draw-0 universal sets, one per (unit, threshold)."""
    sets = []
    for u in sorted(units, key=lambda u: (u.reference, u.checkpoint, u.set_other)):
        for tau in thresholds:
            sets.append(UniversalSet(
                reference=u.reference, other=u.set_other, checkpoint=u.checkpoint,
                threshold=tau, definition=definition, draw=0, n_layers=u.n_layers,
                d_mlp=u.d_mlp, neurons=np.flatnonzero(u.excess[0] > tau),
                others=tuple(u.others) if definition == PAIR_AVERAGED else None))
    return sets


# ---------------------------------------------------------------- the step

@dataclass
class UniversalOutput:
    """What the step wrote: the paths (formats.tables.universal_paths: neurons_parquet,
    neurons_csv, neuron_draws, table1_csv, table1_draws_csv, table1, sets) and Table 1
    itself (formats.tables.format_table1 prints it)."""
    paths: dict[str, Path]
    table1: Table1File


def universal(run_dir, settings: UniversalConfig = UniversalConfig(), *, reference=None,
              all_references: bool = False, progress: bool = True) -> UniversalOutput:
    """Excess correlation, universal sets and Table 1 from RUN/reduce.

    reference: a ref_name (or its label, model id or alias); default: the only one.
    settings.extra_baseline_draws: more rotation draws from each file's cross_comoment
      (needs `reduce --keep-covariance`), seeded settings.seed, seed+1, ... skipping
      the reduce's seeds.
    """
    thresholds = check_thresholds(settings.thresholds)
    refuse_if_run_in_progress(run_dir, "universal")
    records = find_reduced(run_dir)  # each file verified against its checksum sidecar
    token_hash = _check_token_set(run_dir, records)
    refs = select_references(records, reference, all_references)
    records = [r for r in records if r.ref_name in refs]
    _check_checkpoints(records)
    _check_selection(records)

    stats = _load_pairs(records, settings, progress)
    units = set_units(stats, settings.definition)
    shown = pair_units(stats) + (units if settings.definition == PAIR_AVERAGED else [])
    neurons, neuron_draws = neuron_tables(shown, thresholds)
    provenance = _provenance(stats, settings, thresholds, refs, reference, all_references,
                             token_hash)
    draw_rows = table1_draws(units, thresholds, settings.definition)
    table = Table1File(table1_view(draw_rows, 0), draw_rows, provenance)
    sets = SetsFile(universal_sets(units, thresholds, settings.definition), provenance)

    out = step_dir(run_dir, "universal")
    size = sum(int(df.memory_usage(deep=True).sum()) for df in (neurons, neuron_draws))
    check_free_space(out, 2 * size, "universal tables")
    record = {"step": "universal", "token_hash": token_hash,
              "config_hash": config_hash(provenance.config),
              "inputs": {f"reduce/{r.path.name}": recorded_sha256(r.path) for r in records}}
    with file_lock(out / ".lock", f"universal outputs {str(out)!r}", busy="are being written by"):
        remove_dead_temporaries(out)  # what a killed universal left (`*.tmp-<pid>`)
        paths = write_universal(run_dir, neurons, neuron_draws, table, sets, record)
    return UniversalOutput(paths, table)


def _load_pairs(records, settings: UniversalConfig, progress: bool) -> list[PairStats]:
    from tqdm.auto import tqdm
    return [load_pair(r, settings.extra_baseline_draws, settings.seed, progress=progress)
            for r in tqdm(records, disable=not progress, desc="universal", unit="pair")]


def _provenance(stats, settings, thresholds, refs, reference, all_references,
                token_hash) -> Provenance:
    """The settings, the inputs and their id, saved in every output of the step."""
    config = {
        "thresholds": list(thresholds), "definition": settings.definition,
        "rule": "universal when excess > threshold (strict); excess = excess_0 "
                "(draw 0, the paper's single rotation)",
        "canonical_draw": 0, "references": refs, "reference_arg": reference,
        "all_references": bool(all_references),
        "extra_baseline_draws": settings.extra_baseline_draws, "seed": settings.seed,
    }
    inputs = []
    for s in stats:
        d = s.record.describe()
        d["draw_seeds"], d["draw_sources"] = list(s.seeds), list(s.sources)
        inputs.append(d)
    described = {"config": config, "inputs": inputs, "token_hash": token_hash,
                 "toolkit_version": __version__}
    return Provenance(**described, universal_id=config_hash(described))
