"""Universal neurons from the reduced statistics: excess correlation, sets, Table 1.

Reads RUN/reduce/<ref_label>__<other_label>.h5 (attributes and a few (N,) arrays; the
(Na, Nb) cross co-moment only when more baseline draws are asked for) and writes
RUN/universal/:

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

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ooc_universal import __version__
from ooc_universal.errors import OocError, StaleInputError
from ooc_universal.rundir import (atomic_path, check_free_space, config_hash, recorded_sha256, step_dir,
                     write_json_atomic)

DEFINITIONS = ("per-pair", "pair-averaged")
DEFAULT_THRESHOLDS = (0.4, 0.5, 0.6)
PAIR_AVERAGED = "pair-averaged"  # the `other` of a pair-averaged set
MEAN_OVER_PAIRS = "mean over pairs"  # the `other` of a table1.csv mean row
LAYOUT_VERSION = 1
_REQUIRED_ATTRS = (
    "ref_label", "other_label", "ref_name", "other_name", "ref_step", "other_step",
    "token_hash", "n_tokens", "n_layers_ref", "d_mlp_ref", "n_layers_other",
    "d_mlp_other", "baseline_seeds")


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
    config_json: str = field(repr=False, default="")

    @property
    def checkpoint(self) -> int:
        return self.ref_step

    @property
    def n_ref(self) -> int:
        return self.n_layers_ref * self.d_mlp_ref

    def describe(self) -> dict:
        """The provenance record written into every output."""
        try:
            config = json.loads(self.config_json) if self.config_json else None
        except ValueError:
            config = self.config_json
        return {
            "file": self.path.name, "ref_label": self.ref_label,
            "other_label": self.other_label, "ref_name": self.ref_name,
            "other_name": self.other_name, "checkpoint": self.checkpoint,
            "ref_model_id": self.ref_model_id, "other_model_id": self.other_model_id,
            "token_hash": self.token_hash, "n_tokens": self.n_tokens,
            "baseline_seeds": list(self.baseline_seeds), "precision": self.precision,
            "toolkit_version": self.toolkit_version, "reduce_config": config}


def _attr(attrs, key, default=None):
    if key not in attrs:
        return default
    value = attrs[key]
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_reduced(path) -> ReducedPair:
    """The attributes of one reduce file, checked for the fields this step needs."""
    import h5py
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise OocError(f"cannot read reduce file {str(path)!r} ({exc}); delete it and "
                       "run `ooc-universal reduce` again") from None
    with f:
        attrs = f.attrs
        missing = [k for k in _REQUIRED_ATTRS if k not in attrs]
        if missing:
            raise OocError(f"{str(path)!r} is not a reduce output (missing attributes "
                           f"{', '.join(missing)}); remove it from the reduce folder")
        layout = int(_attr(attrs, "layout_version", LAYOUT_VERSION))
        if layout != LAYOUT_VERSION:
            raise OocError(f"{str(path)!r} has layout_version {layout}, this toolkit reads "
                           f"{LAYOUT_VERSION}; re-run `ooc-universal reduce`")
        seeds = np.atleast_1d(np.asarray(_attr(attrs, "baseline_seeds"), dtype=np.int64))
        return ReducedPair(
            path=path,
            ref_label=str(_attr(attrs, "ref_label")),
            other_label=str(_attr(attrs, "other_label")),
            ref_name=str(_attr(attrs, "ref_name")),
            other_name=str(_attr(attrs, "other_name")),
            ref_step=int(_attr(attrs, "ref_step")),
            other_step=int(_attr(attrs, "other_step")),
            ref_model_id=str(_attr(attrs, "ref_model_id", "")),
            other_model_id=str(_attr(attrs, "other_model_id", "")),
            token_hash=str(_attr(attrs, "token_hash")),
            n_tokens=int(_attr(attrs, "n_tokens")),
            n_layers_ref=int(_attr(attrs, "n_layers_ref")),
            d_mlp_ref=int(_attr(attrs, "d_mlp_ref")),
            n_layers_other=int(_attr(attrs, "n_layers_other")),
            d_mlp_other=int(_attr(attrs, "d_mlp_other")),
            baseline_seeds=tuple(int(s) for s in seeds),
            has_cross_comoment="cross_comoment" in f,
            precision=str(_attr(attrs, "precision", "")),
            toolkit_version=str(_attr(attrs, "toolkit_version", "")),
            config_json=str(_attr(attrs, "config_json", "")),
        )


def find_reduced(run_dir) -> list[ReducedPair]:
    """Every complete reduce file in RUN/reduce (attributes only), sorted.

    Only the final names count: `x.h5.partial` and temporary names are work in
    progress and are skipped.
    """
    reduce_dir = Path(run_dir) / "reduce"
    paths = sorted(p for p in reduce_dir.glob("*__*.h5") if p.is_file()) \
        if reduce_dir.is_dir() else []
    if not paths:
        raise OocError(f"no reduced statistics in {str(reduce_dir)!r} (expected "
                       "<ref>__<other>.h5 files); run `ooc-universal reduce` first")
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
    meta_path = Path(run_dir) / "tokens" / "meta.json"
    if meta_path.is_file():
        current = json.loads(meta_path.read_text()).get("hash")
        if current and current != token_hash:
            raise StaleInputError(
                f"reduce files were made from token set {token_hash[:12]} but "
                f"{str(meta_path)!r} is token set {current[:12]}; re-run "
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


def baseline_from_cross_comoment(path, seeds, chunk_rows: int = 2048,
                                 progress: bool = False) -> np.ndarray:
    """Baseline row maxima (len(seeds), Na) float64 from a kept cross co-moment.

    For seed s and layer l of the other model, R = rotation_matrix(s, l, d) and
      cov(a_k, (R b)_m) ~ (C[:, layer l] R^T)[k, m],  var((R b)_m) ~ R[m] S_l R[m]^T,
    with C = cross_comoment, S_l = other/self_comoment[l] and the reference's
    co-moment m2_x = ref/var * n_tokens (all sums, so the 1/n cancels in rho).
    No pass over the activations: C is read one (rows, d) block at a time, and each
    layer's rotation is built once per draw.
    """
    import h5py
    from tqdm.auto import tqdm

    from ooc_universal.kernels.rotation import rotated_row_max, rotation_matrix

    with h5py.File(path, "r") as f:
        n_tokens = int(_attr(f.attrs, "n_tokens"))
        n_layers, d = int(_attr(f.attrs, "n_layers_other")), int(_attr(f.attrs, "d_mlp_other"))
        cross = f["cross_comoment"]
        self_comoment = f["other/self_comoment"][...].astype(np.float64)  # (L_b, d, d)
        m2_x = f["ref/var"][...].astype(np.float64) * n_tokens  # (Na,)
        zero_x = f["ref/zero_var"][...].astype(bool)
        n_ref = cross.shape[0]
        if cross.shape != (m2_x.size, n_layers * d):
            raise OocError(f"{str(path)!r}: cross_comoment has shape {cross.shape}, expected "
                           f"({m2_x.size}, {n_layers * d}); re-run `ooc-universal reduce`")
        out = np.full((len(seeds), n_ref), -np.inf)
        bar = tqdm(total=len(seeds) * n_layers, disable=not progress, unit="layer",
                   desc=f"baseline draws {Path(path).stem}", leave=False)
        for j, s in enumerate(seeds):
            for layer in range(n_layers):
                rot = rotation_matrix(int(s), layer, d)  # (d, d), built once per layer
                cols = slice(layer * d, (layer + 1) * d)
                for r0 in range(0, n_ref, chunk_rows):
                    r1 = min(n_ref, r0 + chunk_rows)
                    m = rotated_row_max(cross[r0:r1, cols].astype(np.float64), m2_x[r0:r1],
                                        self_comoment[layer], rot)
                    np.maximum(out[j, r0:r1], m, out=out[j, r0:r1])
                bar.update(1)
        out[~np.isfinite(out)] = 0.0  # rho with a zero-variance neuron is 0
        out[:, zero_x] = 0.0
        bar.close()
    return out


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
    import h5py
    with h5py.File(record.path, "r") as f:
        row_max = f["row_max"][...].astype(np.float64)
        row_argmax = f["row_argmax"][...].astype(np.int64)
        zero_var = f["ref/zero_var"][...].astype(bool)
        baseline = f["baseline/row_max"][...].astype(np.float64) \
            if "baseline/row_max" in f else np.zeros((0, row_max.size))
    baseline = baseline.reshape(-1, row_max.size)
    if baseline.shape[0] != len(record.baseline_seeds):
        raise OocError(f"{record.path.name}: baseline/row_max has {baseline.shape[0]} draws "
                       f"but baseline_seeds lists {len(record.baseline_seeds)}; re-run reduce")
    if row_max.size != record.n_ref:
        raise OocError(f"{record.path.name}: row_max has {row_max.size} entries, expected "
                       f"{record.n_layers_ref} x {record.d_mlp_ref}; re-run reduce")
    seeds, sources = list(record.baseline_seeds), ["reduce"] * len(record.baseline_seeds)
    if extra_baseline_draws:
        if not record.has_cross_comoment:
            raise OocError(f"{record.path.name} has no cross_comoment, so no extra baseline "
                           "draws can be computed from it; re-run `ooc-universal reduce "
                           "--keep-covariance` or ask for more --baseline-draws there")
        new = extra_draw_seeds(seeds, extra_baseline_draws, seed)
        more = baseline_from_cross_comoment(record.path, new, progress=progress)
        baseline = np.concatenate([baseline, more], axis=0)
        seeds += list(new)
        sources += ["cross_comoment"] * len(new)
    if baseline.shape[0] == 0:
        raise OocError(f"{record.path.name} has no baseline draw; re-run `ooc-universal "
                       "reduce` with --baseline-draws 1 or more (or --keep-covariance and "
                       "--extra-baseline-draws here)")
    return PairStats(record, row_max, row_argmax, zero_var, baseline, tuple(seeds),
                     tuple(sources))


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
    groups: dict = {}
    for s in stats:
        groups.setdefault((s.record.ref_name, s.record.checkpoint), []).append(s)
    units = []
    for (ref, ckpt), group in groups.items():
        n_draws = min(s.baseline.shape[0] for s in group)
        row_max = np.mean([s.row_max for s in group], axis=0)
        baseline = np.mean([s.baseline[:n_draws] for s in group], axis=0)
        r = group[0].record
        units.append(Unit(ref, PAIR_AVERAGED, ckpt, r.n_layers_ref, r.d_mlp_ref,
                          row_max[None, :] - baseline,
                          np.any([s.zero_var for s in group], axis=0),
                          tuple(s.record.other_name for s in group)))
    return units


def _pair_averaged_rows(stats: list[PairStats]):
    """Mean row_max / baseline per (reference, checkpoint), for the neuron table."""
    groups: dict = {}
    for s in stats:
        groups.setdefault((s.record.ref_name, s.record.checkpoint), []).append(s)
    for (ref, ckpt), group in groups.items():
        n_draws = min(s.baseline.shape[0] for s in group)
        r = group[0].record
        yield (ref, ckpt, r, np.mean([s.row_max for s in group], axis=0),
               np.mean([s.baseline[:n_draws] for s in group], axis=0),
               np.any([s.zero_var for s in group], axis=0))


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
        for ref, ckpt, r, row_max, baseline, zero in _pair_averaged_rows(stats):
            none = np.full(row_max.size, -1, np.int64)
            frames.append(frame(ref, PAIR_AVERAGED, ckpt, r.n_layers_ref, r.d_mlp_ref,
                                row_max, none, 1, baseline, zero))
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


def table1_frame(entries: list[dict]):
    """table1.json entries in long format (other = name or "mean over pairs")."""
    import pandas as pd
    rows = []

    def add(e, other, layer, percent, count, n, spread):
        rows.append({"reference": e["reference"], "threshold": e["threshold"],
                     "checkpoint": e["checkpoint"], "other": other, "layer": layer,
                     "percent": percent, "count": count, "n_neurons": n,
                     "n_draws": spread["n_draws"], "draws_mean": spread["mean"],
                     "draws_std": spread["std"], "draws_min": spread["min"],
                     "draws_max": spread["max"]})

    for e in entries:
        add(e, MEAN_OVER_PAIRS, "all", e["percent"], None, e["n_neurons"], e["draws"])
        for layer in range(e["n_layers"]):
            add(e, MEAN_OVER_PAIRS, str(layer), e["per_layer_percent"][layer], None,
                e["d_mlp"], e["per_layer_draws"][layer])
        for p in e["pairs"]:
            add(e, p["other"], "all", p["percent"], p["count"], e["n_neurons"], p["draws"])
            for layer in range(e["n_layers"]):
                add(e, p["other"], str(layer), p["per_layer_percent"][layer],
                    p["per_layer_count"][layer], e["d_mlp"], p["per_layer_draws"][layer])
    df = pd.DataFrame(rows)
    df["count"] = df["count"].astype("Int64")
    return df


def universal_sets(units: list[Unit], thresholds, definition: str) -> list[dict]:
    """The draw-0 universal sets, one per (unit, threshold)."""
    sets = []
    for u in sorted(units, key=lambda u: (u.reference, u.checkpoint, u.other)):
        for tau in thresholds:
            entry = {"reference": u.reference, "other": u.other, "checkpoint": u.checkpoint,
                     "threshold": tau, "definition": definition, "draw": 0,
                     "n_layers": u.n_layers, "d_mlp": u.d_mlp,
                     "neurons": np.flatnonzero(u.excess[0] > tau).tolist()}
            if definition == PAIR_AVERAGED:
                entry["others"] = list(u.others)
            sets.append(entry)
    return sets


def format_table1(doc: dict) -> str:
    """Table 1 as text: mean over pairs, draw spread, per-pair values, per layer."""
    entries = doc["table1"]
    lines = []
    for ref in sorted({e["reference"] for e in entries}):
        es = [e for e in entries if e["reference"] == ref]
        ckpts = sorted({e["checkpoint"] for e in es})
        taus = sorted({e["threshold"] for e in es})
        by = {(e["threshold"], e["checkpoint"]): e for e in es}
        definition = doc["config"]["definition"]
        n_pairs = max(e["n_pairs"] for e in es)
        what = ("mean over pairs" if definition == "per-pair"
                else "pair-averaged excess, one set per checkpoint")
        lines.append(f"Table 1: % universal neurons (excess > tau, draw 0) of {ref}, "
                     f"{what} ({n_pairs} pair(s))")
        head = "threshold".ljust(12) + "".join(f"{_ckpt(c):>14}" for c in ckpts)
        lines.append(head)
        for tau in taus:
            lines.append(f"{tau:<12g}" + "".join(
                f"{by[(tau, c)]['percent']:>14.2f}" if (tau, c) in by else f"{'-':>14}"
                for c in ckpts))
        draws = max(e["draws"]["n_draws"] for e in es)
        if draws > 1:
            lines.append(f"spread over {draws} baseline draws of the value above "
                         "(mean +- std [min, max]):")
            for tau in taus:
                cells = []
                for c in ckpts:
                    s = by[(tau, c)]["draws"] if (tau, c) in by else None
                    cells.append(f"{s['mean']:.2f}+-{s['std']:.2f} [{s['min']:.2f}, "
                                 f"{s['max']:.2f}]" if s else "-")
                lines.append(f"  {tau:<10g}" + "  ".join(f"{x:>26}" for x in cells))
        if definition == "per-pair":
            lines.append("per pair (draw 0" + (", +- std over draws)" if draws > 1 else ")")
                         + ":")
            lines.append(f"  {'other':<28} {'tau':<6}" + " ".join(f"{_ckpt(c):>17}"
                                                                for c in ckpts))
            others = sorted({p["other"] for e in es for p in e["pairs"]})
            for other in others:
                for tau in taus:
                    cells = []
                    for c in ckpts:
                        p = next((p for p in by.get((tau, c), {}).get("pairs", [])
                                  if p["other"] == other), None)
                        if p is None:
                            cells.append(f"{'-':>17}")
                        elif p["draws"]["n_draws"] > 1:
                            cells.append(f"{p['percent']:>7.2f} (+-{p['draws']['std']:5.2f})")
                        else:
                            cells.append(f"{p['percent']:>17.2f}")
                    lines.append(f"  {other[:28]:<28} {tau:<6g}" + " ".join(cells))
        lines.append("per layer (" + ("mean over pairs" if definition == "per-pair"
                                      else "pair-averaged") + "):")
        n_layers = es[0]["n_layers"]
        for tau in taus:
            lines.append(f"  tau={tau:g}: layer " + " ".join(f"{c:>{8}}" for c in
                                                           map(_ckpt, ckpts)))
            for layer in range(n_layers):
                lines.append(f"  {'':8}{layer:>6} " + " ".join(
                    f"{by[(tau, c)]['per_layer_percent'][layer]:>8.2f}"
                    if (tau, c) in by else f"{'-':>8}" for c in ckpts))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _ckpt(c: int) -> str:
    return "no step" if c < 0 else str(c)


# ---------------------------------------------------------------- the step

def universal(run_dir, reference=None, thresholds=DEFAULT_THRESHOLDS,
              definition: str = "per-pair", all_references: bool = False,
              extra_baseline_draws: int = 0, seed: int = 0,
              progress: bool = True) -> dict[str, Path]:
    """Excess correlation, universal sets and Table 1 from RUN/reduce; returns the paths.

    reference: a ref_name (or its label, model id or alias); default: the only one.
    extra_baseline_draws: more rotation draws from each file's cross_comoment (needs
      `reduce --keep-covariance`), seeded seed, seed+1, ... skipping the reduce's seeds.
    """
    from tqdm.auto import tqdm

    thresholds = check_thresholds(thresholds)
    if definition not in DEFINITIONS:
        raise OocError(f"definition {definition!r} is not one of {', '.join(DEFINITIONS)}")
    if int(extra_baseline_draws) != extra_baseline_draws or extra_baseline_draws < 0:
        raise OocError(f"extra_baseline_draws {extra_baseline_draws!r} must be an integer >= 0")
    extra_baseline_draws = int(extra_baseline_draws)
    records = find_reduced(run_dir)
    token_hash = _check_token_set(run_dir, records)
    refs = select_references(records, reference, all_references)
    records = [r for r in records if r.ref_name in refs]
    _check_checkpoints(records)
    _check_selection(records)

    stats = [load_pair(r, extra_baseline_draws, seed, progress=progress)
             for r in tqdm(records, disable=not progress, desc="universal", unit="pair")]
    units = _units(stats, definition)
    entries = table1(units, thresholds)
    neurons = neuron_table(stats, definition)

    config = {
        "thresholds": list(thresholds), "definition": definition,
        "rule": "universal when excess > threshold (strict); excess = excess_0 "
                "(draw 0, the paper's single rotation)",
        "canonical_draw": 0, "references": refs, "reference_arg": reference,
        "all_references": bool(all_references),
        "extra_baseline_draws": extra_baseline_draws, "seed": int(seed),
    }
    inputs = []
    for s in stats:
        d = s.record.describe()
        d["draw_seeds"], d["draw_sources"] = list(s.seeds), list(s.sources)
        inputs.append(d)
    provenance = {"config": config, "inputs": inputs, "token_hash": token_hash,
                  "toolkit_version": __version__}
    provenance["universal_id"] = hashlib.sha256(
        json.dumps(provenance, sort_keys=True, default=str).encode()).hexdigest()[:16]

    out = step_dir(run_dir, "universal")
    check_free_space(out, int(neurons.memory_usage(deep=True).sum() * 3), "universal tables")
    paths = {"neurons_parquet": out / "neurons.parquet", "neurons_csv": out / "neurons.csv",
             "table1_csv": out / "table1.csv", "table1": out / "table1.json",
             "sets": out / "sets.json"}
    for key in ("sets", "table1"):  # the completion markers go first and come back last
        paths[key].unlink(missing_ok=True)
    record = {"step": "universal", "token_hash": token_hash, "config_hash": config_hash(config),
              "inputs": {f"reduce/{r.path.name}": recorded_sha256(r.path) for r in records}}
    _write_parquet(neurons, paths["neurons_parquet"], provenance, record)
    with atomic_path(paths["neurons_csv"], record) as tmp:
        neurons.to_csv(tmp, index=False)
    with atomic_path(paths["table1_csv"], record) as tmp:
        table1_frame(entries).to_csv(tmp, index=False)
    write_json_atomic(paths["table1"], {**provenance, "table1": entries}, record)
    write_json_atomic(paths["sets"], {**provenance, "sets": universal_sets(
        units, thresholds, definition)}, record)
    return paths


def _write_parquet(df, path: Path, provenance: dict, record: dict | None = None) -> None:
    """Parquet with the provenance in the schema metadata (key b"ooc_universal")."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"ooc_universal"] = json.dumps(provenance, sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(path, record) as tmp:
        pq.write_table(table, tmp)


def load_sets(run_dir) -> dict:
    """RUN/universal/sets.json, or a one-line error saying which step makes it."""
    path = Path(run_dir) / "universal" / "sets.json"
    if not path.is_file():
        raise OocError(f"no universal sets at {str(path)!r}; run `ooc-universal universal` first")
    return json.loads(path.read_text())

