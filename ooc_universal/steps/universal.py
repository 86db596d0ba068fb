"""Universal neurons from the reduced statistics: excess correlation, sets, Table 1.

Reads RUN/reduce/<ref_label>__<other_label>.h5 through formats/reduced.py (attributes and
a few (N,) arrays; the (Na, Nb) cross co-moment only when more baseline draws are asked
for) and writes RUN/universal/ through formats/tables.py and formats/sets.py:

  neurons.parquet, neurons.csv  one row per (reference, other, checkpoint, ref neuron)
  table1.json, table1.csv       % universal per threshold x checkpoint, per pair, per
                                layer, with the spread over baseline draws
  sets.json                     the universal sets (draw 0), read by persistence/ablate

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
      written with other = "pair-averaged".

A zero-variance reference neuron has row_max 0 and baseline 0, so excess 0: it is
never universal but counts in every denominator (percent = 100 * count / n_neurons).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ooc_universal import __version__
from ooc_universal.config import UniversalConfig
from ooc_universal.errors import OocError, StaleInputError
from ooc_universal.formats.reduced import ReducedStats, list_reduced, open_reduced
from ooc_universal.formats.sets import Provenance, SetsFile, UniversalSet
from ooc_universal.formats.tables import Table1File, write_universal
from ooc_universal.formats.tokens import existing_hash, meta_path
from ooc_universal.rundir import check_free_space, config_hash, recorded_sha256, step_dir

DEFINITIONS = ("per-pair", "pair-averaged")
PAIR_AVERAGED = "pair-averaged"  # the `other` of a pair-averaged set


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
            raise OocError(f"threshold {t!r} is not a number; give values in (0, 1), "
                           "e.g. --thresholds 0.4,0.5,0.6") from None
        if not (0.0 < value < 1.0):  # also rejects NaN
            raise OocError(f"threshold {t!r} is outside (0, 1); an excess-correlation "
                           "threshold must satisfy 0 < tau < 1, e.g. --thresholds 0.4,0.5,0.6")
        out.append(value)
    if not out:
        raise OocError("no thresholds given; give values in (0, 1), e.g. --thresholds 0.4,0.5,0.6")
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
    """What one universal set is made from: a pair, or a reference's pair average."""
    reference: str
    other: str
    checkpoint: int
    n_layers: int
    d_mlp: int
    excess: np.ndarray  # (D, Na)
    zero_var: np.ndarray  # (Na,)
    others: tuple  # the pairs behind it (one for per-pair)


def _units(stats: list[PairStats], definition: str) -> list[Unit]:
    if definition == "per-pair":
        return [Unit(s.record.ref_name, s.record.other_name, s.record.checkpoint,
                     s.record.n_layers_ref, s.record.d_mlp_ref, s.excess, s.zero_var,
                     (s.record.other_name,)) for s in stats]
    return [Unit(a.reference, PAIR_AVERAGED, a.checkpoint, a.record.n_layers_ref,
                 a.record.d_mlp_ref, a.row_max[None, :] - a.baseline, a.zero_var, a.others)
            for a in _pair_averages(stats)]


@dataclass
class PairAverage:
    """A reference's pairs at one checkpoint, averaged (Gurnee et al.)."""
    reference: str
    checkpoint: int
    record: ReducedPair  # the first pair's (shapes of the reference)
    row_max: np.ndarray  # (Na,) mean over the pairs
    baseline: np.ndarray  # (D, Na) mean over the pairs, D = the fewest draws of any
    zero_var: np.ndarray  # (Na,) zero variance in any pair
    others: tuple  # the pairs averaged over


def _pair_averages(stats: list[PairStats]) -> list[PairAverage]:
    groups: dict = {}
    for s in stats:
        groups.setdefault((s.record.ref_name, s.record.checkpoint), []).append(s)
    out = []
    for (ref, ckpt), group in groups.items():
        n_draws = min(s.baseline.shape[0] for s in group)
        out.append(PairAverage(ref, ckpt, group[0].record,
                               np.mean([s.row_max for s in group], axis=0),
                               np.mean([s.baseline[:n_draws] for s in group], axis=0),
                               np.any([s.zero_var for s in group], axis=0),
                               tuple(s.record.other_name for s in group)))
    return out


# ---------------------------------------------------------------- tables

def neuron_table(stats: list[PairStats], definition: str = "per-pair"):
    """The per-neuron DataFrame (per-pair rows; pair-averaged rows added on request)."""
    import pandas as pd
    n_draws = max(s.baseline.shape[0] for s in stats)
    frames = []

    def frame(ref, other, ckpt, n_layers, d_mlp, row_max, match, d_other, baseline, zero):
        n = row_max.size
        flat = np.arange(n, dtype=np.int64)
        cols = {
            "reference": ref, "other": other, "checkpoint": np.full(n, ckpt, np.int64),
            "layer": flat // d_mlp, "neuron": flat % d_mlp, "flat_index": flat,
            "max_corr": row_max,
            "match_layer": np.where(match >= 0, match // d_other, -1),
            "match_neuron": np.where(match >= 0, match % d_other, -1),
        }
        padded = np.full((n_draws, n), np.nan)
        padded[:baseline.shape[0]] = baseline
        for j in range(n_draws):
            cols[f"baseline_max_{j}"] = padded[j]
        for j in range(n_draws):
            cols[f"excess_{j}"] = row_max - padded[j]
        cols["excess"] = row_max - padded[0]
        cols["zero_var"] = zero
        return pd.DataFrame(cols)

    for s in stats:
        r = s.record
        frames.append(frame(r.ref_name, r.other_name, r.checkpoint, r.n_layers_ref,
                            r.d_mlp_ref, s.row_max, s.row_argmax, r.d_mlp_other,
                            s.baseline, s.zero_var))
    if definition == PAIR_AVERAGED:
        for a in _pair_averages(stats):
            none = np.full(a.row_max.size, -1, np.int64)
            frames.append(frame(a.reference, PAIR_AVERAGED, a.checkpoint,
                                a.record.n_layers_ref, a.record.d_mlp_ref, a.row_max, none,
                                1, a.baseline, a.zero_var))
    df = pd.concat(frames, ignore_index=True)
    for col in ("reference", "other"):
        df[col] = df[col].astype(str)
    return df


def _spread(values) -> dict:
    """mean, std (ddof=1; null for one draw), min, max of a list of percentages."""
    v = np.asarray(values, dtype=np.float64)
    return {"n_draws": int(v.size), "percent": v.tolist(), "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if v.size > 1 else None,
            "min": float(v.min()), "max": float(v.max())}


def _counts(unit: Unit, tau: float) -> np.ndarray:
    """(D, L) universal counts per draw and layer (strict excess > tau)."""
    d_draws = unit.excess.shape[0]
    return (unit.excess > tau).reshape(d_draws, unit.n_layers, unit.d_mlp).sum(-1)


def table1(units: list[Unit], thresholds) -> list[dict]:
    """Table 1 entries: one per (reference, checkpoint, threshold)."""
    groups: dict = {}
    for u in units:
        groups.setdefault((u.reference, u.checkpoint), []).append(u)
    entries = []
    for (ref, ckpt) in sorted(groups):
        group = sorted(groups[(ref, ckpt)], key=lambda u: u.other)
        n_layers, d_mlp = group[0].n_layers, group[0].d_mlp
        n = n_layers * d_mlp
        common = min(u.excess.shape[0] for u in group)
        for tau in thresholds:
            pairs, pct_layer, pct_draw = [], [], []
            for u in group:
                counts = _counts(u, tau)  # (D, L)
                total = counts.sum(1)
                pairs.append({
                    "other": u.other, "others": list(u.others),
                    "count": int(total[0]), "percent": 100.0 * total[0] / n,
                    "n_zero_var": int(u.zero_var.sum()),
                    "per_layer_count": counts[0].tolist(),
                    "per_layer_percent": (100.0 * counts[0] / d_mlp).tolist(),
                    "draws": _spread(100.0 * total / n),
                    "per_layer_draws": [_spread(100.0 * counts[:, layer] / d_mlp)
                                        for layer in range(n_layers)],
                })
                pct_layer.append(100.0 * counts[:common] / d_mlp)  # (common, L)
                pct_draw.append(100.0 * total[:common] / n)  # (common,)
            pct_layer, pct_draw = np.mean(pct_layer, 0), np.mean(pct_draw, 0)
            entries.append({
                "reference": ref, "checkpoint": ckpt, "threshold": tau,
                "n_pairs": len(group), "n_neurons": n, "n_layers": n_layers,
                "d_mlp": d_mlp, "percent": float(pct_draw[0]),
                "per_layer_percent": pct_layer[0].tolist(),
                "draws": _spread(pct_draw),
                "per_layer_draws": [_spread(pct_layer[:, layer]) for layer in range(n_layers)],
                "pairs": pairs,
            })
    return entries


def universal_sets(units: list[Unit], thresholds, definition: str) -> list[UniversalSet]:
    """The draw-0 universal sets, one per (unit, threshold)."""
    sets = []
    for u in sorted(units, key=lambda u: (u.reference, u.checkpoint, u.other)):
        for tau in thresholds:
            sets.append(UniversalSet(
                reference=u.reference, other=u.other, checkpoint=u.checkpoint,
                threshold=tau, definition=definition, draw=0, n_layers=u.n_layers,
                d_mlp=u.d_mlp, neurons=np.flatnonzero(u.excess[0] > tau),
                others=tuple(u.others) if definition == PAIR_AVERAGED else None))
    return sets


# ---------------------------------------------------------------- the step

@dataclass
class UniversalOutput:
    """What the step wrote: the paths (neurons_parquet, neurons_csv, table1_csv, table1,
    sets) and Table 1 itself (formats.tables.format_table1 prints it)."""
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
    records = find_reduced(run_dir)
    token_hash = _check_token_set(run_dir, records)
    refs = select_references(records, reference, all_references)
    records = [r for r in records if r.ref_name in refs]
    _check_checkpoints(records)
    _check_selection(records)

    stats = _load_pairs(records, settings, progress)
    units = _units(stats, settings.definition)
    neurons = neuron_table(stats, settings.definition)
    provenance = _provenance(stats, settings, thresholds, refs, reference, all_references,
                             token_hash)
    table = Table1File(table1(units, thresholds), provenance)
    sets = SetsFile(universal_sets(units, thresholds, settings.definition), provenance)

    out = step_dir(run_dir, "universal")
    check_free_space(out, int(neurons.memory_usage(deep=True).sum() * 3), "universal tables")
    record = {"step": "universal", "token_hash": token_hash,
              "config_hash": config_hash(provenance.config),
              "inputs": {f"reduce/{r.path.name}": recorded_sha256(r.path) for r in records}}
    return UniversalOutput(write_universal(run_dir, neurons, table, sets, record), table)


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
