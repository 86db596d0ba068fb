"""Reduced statistics: RUN/reduce/<ref>__<other>.h5, one file per (reference, other) pair.

This module is the only reader and writer of that file (and of the reduce's work
directory, RUN/reduce/.work/<key>/, whose checkpoints only the reduce reads).

Layout (layout_version 1; the file exists under its final name only when complete):

  ref/mean, ref/var, ref/zero_var       (Na,) f64, f64, bool   reference neurons
  other/mean, other/var, other/zero_var (Nb,) f64, f64, bool   other model's neurons
  other/self_comoment                   (L_b, d, d) f64        within-layer co-moment sums
  row_max, row_argmax                   (Na,) f32|f64, i64     max_l rho(a_k, b_l), flat l
                                                               (-1: zero variance)
  col_max, col_argmax                   (Nb,) f32|f64, i64     the reverse direction
  baseline/row_max                      (K, Na) f32|f64        rotated other model, per draw
  cross_comoment                        (Na, Nb) f32           only with keep_covariance;
                                                               chunks of <= 1024 x 1024
  attributes: ref_/other_ label, name, step, model_id, revision; token_hash, n_tokens,
  n_layers_ref, d_mlp_ref, n_layers_other, d_mlp_other, precision, baseline_seeds (K,)
  i64, n_zero_var_ref, n_zero_var_other, config_json (settings, plan, both stores'
  metadata), toolkit_version, layout_version.
  Na = n_layers_ref * d_mlp_ref, Nb = n_layers_other * d_mlp_other (flat index
  layer * d_mlp + neuron), d = d_mlp_other.

Reading: `open_reduced(path)` -> ReducedStats (a context manager; attributes read at
open, arrays on first use, the two big ones lazily by slices). A file without a
readable checksum sidecar is untrusted and refused. What is read is verified before it
is used: the sidecar records, besides the whole file's sha256 and size, the sha256 of
the attributes and of each (N,) / (K, Na) array (DIGESTS), so opening checks the size
and the attributes, each array is checked when first read, and the first access to
`self_comoment` or `cross_comoment` (read by slices) hashes the whole file
(rundir.verify_file: once per process while the file is unchanged). So a reader of
the per-neuron statistics (universal, cards, ablate, report) hashes a few MB of a file
that at the paper's width holds ~0.9 GB of self co-moments, and a flipped byte in
anything it reads is refused all the same. A sidecar without DIGESTS (a file sealed by
hand, rundir.seal) gets the whole-file hash at open. `verify=False` is for `status`,
which hashes whole files itself. Writing: `create_reduced`
yields a ReducedWriter on a temporary name; the arrays can be written panel by panel
(rows of the reference), and the file is renamed to its final name, with its checksum
sidecar, only when the block exits without an error.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ooc_universal import __version__, faults
from ooc_universal.errors import OocError
from ooc_universal.formats.store import plain_attr

LAYOUT_VERSION = 1
REDUCE_DIR = "reduce"
CROSS_CHUNK = 1024  # rows and columns per chunk of cross_comoment (read by slices)

# the attributes every reader relies on (the rest have defaults)
REQUIRED_ATTRS = (
    "ref_label", "other_label", "ref_name", "other_name", "ref_step", "other_step",
    "token_hash", "n_tokens", "n_layers_ref", "d_mlp_ref", "n_layers_other",
    "d_mlp_other", "baseline_seeds")

# python attribute of ReducedStats -> dataset name in the file
ARRAYS = {
    "ref_mean": "ref/mean", "ref_var": "ref/var", "ref_zero_var": "ref/zero_var",
    "other_mean": "other/mean", "other_var": "other/var", "other_zero_var": "other/zero_var",
    "row_max": "row_max", "row_argmax": "row_argmax",
    "col_max": "col_max", "col_argmax": "col_argmax",
    "baseline_row_max": "baseline/row_max",
}
SELF_COMOMENT = "other/self_comoment"
CROSS_COMOMENT = "cross_comoment"


# ---------------------------------------------------------------------------- paths

def reduced_path(run_dir, ref_label: str, other_label: str) -> Path:
    """Where the pair (ref_label, other_label) of a run is (or will be) stored."""
    return Path(run_dir) / REDUCE_DIR / f"{ref_label}__{other_label}.h5"


def is_reduced_name(name: str) -> bool:
    """A final pair file name (`a__b.h5`), not a temporary or a partial one."""
    return name.endswith(".h5") and "__" in name[:-3] and "/" not in name


def list_reduced(run_dir) -> list[Path]:
    """The complete pair files of a run, sorted by name ([] when there is no reduce/).
    Temporaries (`x.h5.tmp-<pid>`) and work in progress never carry the final name."""
    rdir = Path(run_dir) / REDUCE_DIR
    if not rdir.is_dir():
        return []
    return sorted(p for p in rdir.glob("*__*.h5") if p.is_file() and is_reduced_name(p.name))


# ---------------------------------------------------------------------------- reading

def plain(value):
    """An HDF5 attribute as a plain Python value (bytes -> str, numpy -> int/float/list)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    return plain_attr(value)


class ReducedStats:
    """One open pair file (read-only). Attributes and config are plain Python values;
    the (N,) and (K, Na) arrays are read whole on first use and kept; `self_comoment`
    and `cross_comoment` are h5py datasets, read by the slices asked for
    (`stats.self_comoment[layer]`, `stats.cross_comoment[r0:r1, c0:c1]`)."""

    def __init__(self, path, h5file, attrs: dict, config: dict, digests: dict | None = None,
                 verify: bool = False):
        self.path = Path(path)
        self._f = h5file
        self.attrs = attrs
        self.config = config
        self._cache: dict = {}
        self._digests = digests  # dataset -> sha256 from the sidecar (None: not checked)
        self._verify = verify    # the big lazily read datasets: whole-file hash first

    # -- identity and shapes
    @property
    def ref_label(self) -> str:
        return str(self.attrs["ref_label"])

    @property
    def other_label(self) -> str:
        return str(self.attrs["other_label"])

    @property
    def n_tokens(self) -> int:
        return int(self.attrs["n_tokens"])

    @property
    def n_ref(self) -> int:
        return int(self.attrs["n_layers_ref"]) * int(self.attrs["d_mlp_ref"])

    @property
    def n_other(self) -> int:
        return int(self.attrs["n_layers_other"]) * int(self.attrs["d_mlp_other"])

    @property
    def baseline_seeds(self) -> tuple[int, ...]:
        return tuple(int(s) for s in np.atleast_1d(self.attrs["baseline_seeds"]))

    @property
    def settings(self) -> dict:
        """The reduce settings the file was made with ({} when not recorded)."""
        return dict(self.config.get("settings") or {})

    # -- arrays
    def _array(self, name: str) -> np.ndarray:
        if name not in self._cache:
            key = ARRAYS[name]
            if key not in self._f:
                raise OocError(f"{str(self.path)!r} has no dataset {key!r}; it is not a "
                               "complete reduce output: run `ooc-universal reduce` again")
            value = self._f[key][...]
            if self._digests is not None:
                _check_digest(self.path, key, value, self._digests)
            self._cache[name] = value
        return self._cache[name]

    def _verify_whole(self) -> None:
        if self._verify:
            from ooc_universal.rundir import verify_file
            verify_file(self.path, "reduce output", RECOMPUTE)
            self._verify = False

    def has(self, name: str) -> bool:
        """Whether the file holds the array `name` (a key of ARRAYS, or self/cross)."""
        key = {"self_comoment": SELF_COMOMENT, "cross_comoment": CROSS_COMOMENT}.get(
            name, ARRAYS.get(name, name))
        return key in self._f

    ref_mean = property(lambda self: self._array("ref_mean"))
    ref_var = property(lambda self: self._array("ref_var"))
    ref_zero_var = property(lambda self: self._array("ref_zero_var"))
    other_mean = property(lambda self: self._array("other_mean"))
    other_var = property(lambda self: self._array("other_var"))
    other_zero_var = property(lambda self: self._array("other_zero_var"))
    row_max = property(lambda self: self._array("row_max"))
    row_argmax = property(lambda self: self._array("row_argmax"))
    col_max = property(lambda self: self._array("col_max"))
    col_argmax = property(lambda self: self._array("col_argmax"))

    @property
    def baseline_row_max(self) -> np.ndarray:
        """(K, Na), one row per baseline draw (K may be 0)."""
        if ARRAYS["baseline_row_max"] not in self._f:
            return np.zeros((0, self.n_ref), np.float32)
        return self._array("baseline_row_max").reshape(-1, self.n_ref)

    @property
    def self_comoment(self):
        """(L_b, d, d) float64 dataset; index by layer to read one (d, d) block."""
        if SELF_COMOMENT not in self._f:
            raise OocError(f"{str(self.path)!r} has no {SELF_COMOMENT!r}; it is not a "
                           "complete reduce output: run `ooc-universal reduce` again")
        self._verify_whole()
        return self._f[SELF_COMOMENT]

    @property
    def has_cross_comoment(self) -> bool:
        return CROSS_COMOMENT in self._f

    @property
    def cross_comoment(self):
        """(Na, Nb) float32 dataset (only with keep_covariance); read it by slices."""
        if not self.has_cross_comoment:
            raise OocError(f"{str(self.path)!r} has no cross_comoment; re-run "
                           "`ooc-universal reduce --keep-covariance` to keep it")
        self._verify_whole()
        return self._f[CROSS_COMOMENT]

    # -- lifetime
    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"ReducedStats({str(self.path)!r}, {self.ref_label} vs {self.other_label})"


RECOMPUTE = ("delete it (and its .sha256) and run `ooc-universal reduce` again for "
             "this pair")


def open_reduced(path, verify: bool = True) -> ReducedStats:
    """Open a complete pair file read-only; one OocError line when it is missing,
    incomplete, untrusted or damaged (verify: its checksum sidecar), unreadable, not a
    reduce output, or of another layout version."""
    import h5py

    from ooc_universal.rundir import read_sidecar, untrusted, verify_file
    path = Path(path)
    if not path.exists():
        writing = list(path.parent.glob(f"{path.name}.tmp-*")) if path.parent.is_dir() else []
        why = ("is incomplete (a reduce is writing it, or was killed)" if writing
               else "does not exist")
        raise OocError(f"reduce output {str(path)!r} {why}; run `ooc-universal reduce` "
                       "(the same command resumes an interrupted one)")
    digests = None
    if verify:
        rec = read_sidecar(path)
        if rec is None:
            raise untrusted(path, "reduce output", RECOMPUTE)
        if isinstance(rec.get(DIGESTS), dict) and isinstance(rec.get(ATTRS_DIGEST), str):
            digests = rec[DIGESTS]
            size = path.stat().st_size
            if rec.get("size") is not None and size != rec["size"]:
                raise OocError(f"reduce output {str(path)!r} is damaged: {size} bytes, its "
                               f"checksum sidecar records {rec['size']}; {RECOMPUTE}")
        else:  # no per-dataset digests recorded: the whole file now
            verify_file(path, "reduce output", RECOMPUTE)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        if digests is not None:  # it has a sidecar: the bytes changed since
            raise OocError(f"reduce output {str(path)!r} is damaged: unreadable as HDF5 "
                           f"({exc}); {RECOMPUTE}") from None
        raise OocError(f"cannot read reduce file {str(path)!r} ({exc}); delete it and "
                       "run `ooc-universal reduce` again") from None
    try:
        attrs = {k: plain(v) for k, v in f.attrs.items()}
        if digests is not None and attrs_sha256(attrs) != rec[ATTRS_DIGEST]:
            raise OocError(f"reduce output {str(path)!r} is damaged: its attributes do not "
                           f"match the checksum sidecar's record of them; {RECOMPUTE}")
        _check_header(path, attrs)
        _check_name(path, attrs)
        config = _parse_config(path, attrs.get("config_json"))
    except BaseException:
        f.close()
        raise
    return ReducedStats(path, f, attrs, config, digests, verify=digests is not None)


def verify_reduced(path) -> dict:
    """Check everything a reader of the per-neuron statistics uses (attributes and every
    (N,) / (K, Na) array; the whole file when no per-dataset digests were recorded);
    returns the file's attributes (as read_attrs). One OocError line when it fails."""
    with open_reduced(path) as stats:
        for name in ARRAYS:
            if ARRAYS[name] in stats._f:
                stats._array(name)
        return dict(stats.attrs)


# Per-dataset digests in the sidecar: what readers check instead of the whole file
DIGESTS, ATTRS_DIGEST = "dataset_sha256", "attrs_sha256"


def _array_sha256(value: np.ndarray) -> str:
    import hashlib
    value = np.ascontiguousarray(value)
    h = hashlib.sha256(f"{value.dtype.str}{value.shape}".encode())
    h.update(value.view(np.uint8).reshape(-1) if value.size else b"")
    return h.hexdigest()


def attrs_sha256(attrs: dict) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(attrs, sort_keys=True, default=str).encode()).hexdigest()


def _check_digest(path: Path, key: str, value: np.ndarray, digests: dict) -> None:
    want = digests.get(key)
    if want is None:
        raise OocError(f"reduce output {str(path)!r} is untrusted: its checksum sidecar "
                       f"records no checksum of {key!r}; {RECOMPUTE}")
    if _array_sha256(value) != want:
        raise OocError(f"reduce output {str(path)!r} is damaged: dataset {key!r} does not "
                       f"match its checksum; {RECOMPUTE}")


def dataset_digests(path) -> dict:
    """The sidecar's per-dataset record of a finished pair file (create_reduced)."""
    import h5py
    with h5py.File(path, "r") as f:
        attrs = {k: plain(v) for k, v in f.attrs.items()}
        return {ATTRS_DIGEST: attrs_sha256(attrs),
                DIGESTS: {key: _array_sha256(f[key][...]) for key in ARRAYS.values()
                          if key in f}}


def read_attrs(path, verify: bool = True) -> dict:
    """The attributes of a pair file as plain values (opens and closes it)."""
    with open_reduced(path, verify=verify) as stats:
        return dict(stats.attrs)


def _check_header(path: Path, attrs: dict) -> None:
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise OocError(f"{str(path)!r} is not a reduce output (missing attributes "
                       f"{', '.join(missing)}); remove it from the reduce folder")
    layout = int(attrs.get("layout_version", LAYOUT_VERSION))
    if layout != LAYOUT_VERSION:
        raise OocError(f"{str(path)!r} has layout_version {layout}, this toolkit reads "
                       f"{LAYOUT_VERSION}; re-run `ooc-universal reduce`")


def _check_name(path: Path, attrs: dict) -> None:
    """A pair file in a reduce folder is named after the pair it holds (a file copied
    over another's name would be read as the wrong pair)."""
    want = f"{attrs['ref_label']}__{attrs['other_label']}.h5"
    if path.parent.name == REDUCE_DIR and path.name != want:
        raise OocError(f"reduce output {str(path)!r} holds the pair {want[:-3]!r}, not the "
                       f"one its name says (a file copied over another?); {RECOMPUTE}")


def _parse_config(path: Path, text) -> dict:
    if not text:
        return {}
    try:
        config = json.loads(str(text))
    except ValueError:
        raise OocError(f"{str(path)!r} has an unreadable config_json attribute; delete it "
                       "and run `ooc-universal reduce` again") from None
    return config if isinstance(config, dict) else {"value": config}


# ---------------------------------------------------------------------------- writing

@dataclass(frozen=True)
class PairHeader:
    """What a pair file says about itself: both models, the tokens, the settings.
    `reference` and `other` are store metadata (label, name, step, model_id, revision,
    n_layers, d_mlp, ...); `config` is saved whole as config_json."""
    reference: dict
    other: dict
    token_hash: str
    n_tokens: int
    precision: str
    baseline_seeds: tuple
    config: dict

    @property
    def n_ref(self) -> int:
        return int(self.reference["n_layers"]) * int(self.reference["d_mlp"])

    @property
    def n_other(self) -> int:
        return int(self.other["n_layers"]) * int(self.other["d_mlp"])

    @property
    def out_dtype(self):
        """Correlations in float32, or float64 for fp64 reference runs."""
        return np.float64 if self.precision == "fp64" else np.float32

    def attrs(self) -> dict:
        ref, oth = self.reference, self.other
        a = {}
        for side, meta in (("ref", ref), ("other", oth)):
            a[f"{side}_label"], a[f"{side}_name"] = meta["label"], meta["name"]
            a[f"{side}_step"] = int(meta["step"])
            a[f"{side}_model_id"], a[f"{side}_revision"] = meta["model_id"], meta["revision"]
        a["token_hash"], a["n_tokens"] = self.token_hash, int(self.n_tokens)
        a["n_layers_ref"], a["d_mlp_ref"] = int(ref["n_layers"]), int(ref["d_mlp"])
        a["n_layers_other"], a["d_mlp_other"] = int(oth["n_layers"]), int(oth["d_mlp"])
        a["precision"] = self.precision
        a["baseline_seeds"] = np.asarray(self.baseline_seeds, dtype=np.int64)
        a["config_json"] = json.dumps(self.config, sort_keys=True, default=str)
        a["toolkit_version"] = __version__
        a["layout_version"] = LAYOUT_VERSION
        return a


class ReducedWriter:
    """Fills one pair file whose datasets are all allocated at creation. Rows of the
    reference can arrive panel by panel (`write_rows`), so no caller needs every panel
    in memory at once. A zero-variance neuron gets correlation 0 and argmax -1 here,
    whatever the caller passes, and is counted in n_zero_var_ref / n_zero_var_other."""

    def __init__(self, h5file, header: PairHeader, keep_cross: bool):
        self._f = h5file
        self.header = header
        na, nb = header.n_ref, header.n_other
        n_layers, d = int(header.other["n_layers"]), int(header.other["d_mlp"])
        k, out = len(header.baseline_seeds), header.out_dtype
        for side, n in (("ref", na), ("other", nb)):
            h5file.create_dataset(f"{side}/mean", (n,), np.float64)
            h5file.create_dataset(f"{side}/var", (n,), np.float64)
            h5file.create_dataset(f"{side}/zero_var", (n,), bool)
        h5file.create_dataset(SELF_COMOMENT, (n_layers, d, d), np.float64)
        h5file.create_dataset("row_max", (na,), out)
        h5file.create_dataset("row_argmax", (na,), np.int64)
        h5file.create_dataset("col_max", (nb,), out)
        h5file.create_dataset("col_argmax", (nb,), np.int64)
        h5file.create_dataset("baseline/row_max", (k, na), out)
        if keep_cross:
            h5file.create_dataset(CROSS_COMOMENT, (na, nb), np.float32,
                                  chunks=(min(na, CROSS_CHUNK), min(nb, CROSS_CHUNK)))
        self._zero = {"ref": 0, "other": 0}
        h5file.attrs.update(header.attrs())
        write_dims(h5file, header, keep_cross)

    def write_moments(self, side: str, start: int, mean, m2, n: int) -> np.ndarray:
        """Mean and population variance (m2 / n) of neurons [start, start + len) of
        `side` ("ref" or "other"); returns their zero-variance flags."""
        m2 = np.asarray(m2, np.float64)
        zero = m2 <= 0
        stop = start + m2.size
        self._f[f"{side}/mean"][start:stop] = np.asarray(mean, np.float64)
        self._f[f"{side}/var"][start:stop] = m2 / n
        self._f[f"{side}/zero_var"][start:stop] = zero
        self._zero[side] += int(zero.sum())
        return zero

    def write_self_comoment(self, s) -> None:
        """(L_b, d, d) within-layer co-moment sums of the other model (or one layer at a
        time: write_self_comoment_layer)."""
        self._f[SELF_COMOMENT][...] = np.asarray(s, np.float64)

    def write_self_comoment_layer(self, layer: int, s) -> None:
        self._f[SELF_COMOMENT][layer] = np.asarray(s, np.float64)

    def write_rows(self, start: int, row_max, row_argmax, baseline, zero_ref) -> None:
        """Reference rows [start, start + len): row max and argmax, and the (K, len)
        baseline maxima; zero_ref (the rows' zero-variance flags) masks them."""
        out = self.header.out_dtype
        stop = start + len(row_max)
        self._f["row_max"][start:stop] = np.where(zero_ref, 0.0, row_max).astype(out)
        self._f["row_argmax"][start:stop] = np.where(zero_ref, -1, row_argmax).astype(np.int64)
        base = np.array(baseline, dtype=out, copy=True).reshape(-1, stop - start)
        base[:, zero_ref] = 0.0
        if base.shape[0]:
            self._f["baseline/row_max"][:, start:stop] = base

    def write_cols(self, col_max, col_argmax, zero_other) -> None:
        out = self.header.out_dtype
        self._f["col_max"][...] = np.where(zero_other, 0.0, col_max).astype(out)
        self._f["col_argmax"][...] = np.where(zero_other, -1, col_argmax).astype(np.int64)

    def write_cross_rows(self, start: int, c) -> None:
        """Rows [start, start + len) of the (Na, Nb) cross co-moment sums (fp32)."""
        self._f[CROSS_COMOMENT][start:start + len(c)] = np.asarray(c, np.float32)

    def finish(self) -> None:
        """Record the zero-variance counts (call once every row is written)."""
        self._f.attrs["n_zero_var_ref"] = self._zero["ref"]
        self._f.attrs["n_zero_var_other"] = self._zero["other"]


# HDF5 dimension scales (h5py's dims API, netCDF-4 conventions): every array's axes are
# named, so xarray (engine h5netcdf) opens the file with named dims and the neurons'
# (layer, index) as coordinates instead of phony_dim_*. The scales are small datasets
# beside the arrays; readers that ask for the arrays by name are unaffected.
#   ref_neuron (Na,)   coordinates ref_layer, ref_index      ref/*, row_*, baseline/*
#   other_neuron (Nb,) coordinates other_layer, other_index  other/{mean,var,zero_var}, col_*
#   draw (K,)          the baseline draws (seed: baseline_seed)
#   other_layer_block (L_b,), other_unit (d,), other_unit_t (d,)   other/self_comoment
DIMS = {"ref/mean": ("ref_neuron",), "ref/var": ("ref_neuron",),
        "ref/zero_var": ("ref_neuron",), "other/mean": ("other_neuron",),
        "other/var": ("other_neuron",), "other/zero_var": ("other_neuron",),
        "row_max": ("ref_neuron",), "row_argmax": ("ref_neuron",),
        "col_max": ("other_neuron",), "col_argmax": ("other_neuron",),
        "baseline/row_max": ("draw", "ref_neuron"),
        SELF_COMOMENT: ("other_layer_block", "other_unit", "other_unit_t"),
        CROSS_COMOMENT: ("ref_neuron", "other_neuron")}


def write_dims(f, header: PairHeader, keep_cross: bool) -> None:
    """The dimension scales and neuron coordinates of a pair file (see DIMS)."""
    ref, oth = header.reference, header.other
    d_ref, d_oth = int(ref["d_mlp"]), int(oth["d_mlp"])
    scales = {"ref_neuron": np.arange(header.n_ref), "other_neuron": np.arange(header.n_other),
              "draw": np.arange(len(header.baseline_seeds)),
              "other_layer_block": np.arange(int(oth["n_layers"])),
              "other_unit": np.arange(d_oth), "other_unit_t": np.arange(d_oth)}
    for name, values in scales.items():
        f.create_dataset(name, data=values.astype(np.int32)).make_scale(name)
    coords = {"ref_layer": ("ref_neuron", scales["ref_neuron"] // d_ref),
              "ref_index": ("ref_neuron", scales["ref_neuron"] % d_ref),
              "other_layer": ("other_neuron", scales["other_neuron"] // d_oth),
              "other_index": ("other_neuron", scales["other_neuron"] % d_oth),
              "baseline_seed": ("draw", np.asarray(header.baseline_seeds))}
    for name, (dim, values) in coords.items():
        f.create_dataset(name, data=values.astype(np.int64)).dims[0].attach_scale(f[dim])
    for name, dims in DIMS.items():
        if name == CROSS_COMOMENT and not keep_cross:
            continue
        for axis, dim in enumerate(dims):
            f[name].dims[axis].attach_scale(f[dim])
        own = [c for c, (dim, _) in coords.items() if dim in dims]
        if own:
            f[name].attrs["coordinates"] = " ".join(own)


@contextmanager
def create_reduced(path, header: PairHeader, *, keep_cross: bool, record: dict | None = None,
                   fault: str | None = "reduce.assemble"):
    """Yield a ReducedWriter on a temporary name beside `path`; on a clean exit the file
    is closed, renamed to `path` and given its checksum sidecar (`record`: provenance).
    `fault` names the fault-injection points (<fault>.h5 once the file is open,
    <fault>.before_rename, <fault>.after_rename)."""
    import h5py

    from ooc_universal.rundir import atomic_path
    record = None if record is None else dict(record)
    with atomic_path(path, record=record, fault=fault) as tmp:
        with h5py.File(tmp, "w") as f:
            writer = ReducedWriter(f, header, keep_cross)
            if fault:
                faults.point(f"{fault}.h5")  # the output's HDF5 file is open here
            yield writer
            writer.finish()
        if record is not None:  # read back from the closed file: what readers will see
            record.update(dataset_digests(tmp))


def remove_temporaries(path) -> list[Path]:
    """Delete temporaries of `path` left by a killed writer; returns what went."""
    path = Path(path)
    gone = []
    for stale in path.parent.glob(f"{path.name}.tmp-*") if path.parent.is_dir() else []:
        stale.unlink(missing_ok=True)
        gone.append(stale)
    return gone


# ---------------------------------------------------------------------------- work dir
# RUN/reduce/.work/<key>/ holds one command's unfinished work (key: a content hash of
# the inputs, settings and plan, so a changed input never resumes stale work):
#   manifest.json            what it is for (pairs, outputs, total block folds), for status
#   self_<I>.npz             other model I's within-layer self co-moments (its own pass,
#                            checkpointed; one member per layer: s_<layer>)
#   rotations_d<D>.npy       the baseline draws' rotations of width D (K, L, D, D) float32
#                            (float64 for fp64 runs), shared by every pair; read one
#                            (D, D) rotation at a time into a reused buffer
#   scales_<I>.npz           iv (K, L, D) f64: 1/sqrt(diag(R S R^T)) of other model I
#   fold_g<G>_p<P>_c<C>.npz  chain C's accumulators of group G, panel P (checkpointed)
#   merged_g<G>_p<P>.npz     the chains Chan-merged (only with several chains)
#   final_g<G>_p<P>.npz      the panel's row/col maxima and baseline, ready to assemble;
#                            once it exists the panel's fold and merged files are removed
#                            (it records their block folds: n_blocks_done)
# Every file is written beside, fsynced and renamed (a kill never leaves half of one);
# an unreadable one is recomputed, never trusted.

WORK_DIR = ".work"
MANIFEST = "manifest.json"
_FOLD_NAME = "fold_g{g}_p{p}_c{c}.npz"
_FOLD_RE = re.compile(r"fold_g(\d+)_p(\d+)_c\d+\.npz")  # not its temporaries
_FINAL_RE = re.compile(r"final_g(\d+)_p(\d+)\.npz")
ACC_KEYS = ("mean_x", "mean_y", "m2_x", "m2_y", "c")   # one pair's co-moment accumulator
SELF_KEYS = ("mean", "m2", "s")                        # the other model's self co-moments


class WorkDir:
    """One reduce command's checkpoints (see above). Paths are strings in tasks, so a
    cluster worker rebuilds a WorkDir from `path` alone."""

    def __init__(self, path):
        self.path = Path(path)

    @classmethod
    def of(cls, run_dir, key: str) -> "WorkDir":
        return cls(Path(run_dir) / REDUCE_DIR / WORK_DIR / key)

    # -- names
    def fold_path(self, g: int, p: int, c: int) -> Path:
        return self.path / _FOLD_NAME.format(g=g, p=p, c=c)

    def merged_path(self, g: int, p: int) -> Path:
        return self.path / f"merged_g{g}_p{p}.npz"

    def final_path(self, g: int, p: int) -> Path:
        return self.path / f"final_g{g}_p{p}.npz"

    def self_path(self, i: int) -> Path:
        return self.path / f"self_{i}.npz"

    def rotations_path(self, d: int) -> Path:
        return self.path / f"rotations_d{d}.npy"

    def scales_path(self, i: int) -> Path:
        return self.path / f"scales_{i}.npz"

    def drop_panel(self, g: int, p: int) -> None:
        """Remove the fold and merged checkpoints of (g, p): its final file holds all
        that is left to use (call only once final_path(g, p) is committed)."""
        for f in self.path.glob(f"fold_g{g}_p{p}_c*.npz"):
            if _FOLD_RE.fullmatch(f.name):
                f.unlink(missing_ok=True)
        self.merged_path(g, p).unlink(missing_ok=True)

    # -- lifetime
    def exists(self) -> bool:
        return self.path.is_dir()

    def create(self, manifest: dict) -> list[str]:
        """Make the directory, drop temporaries a kill left, discard checkpoints that
        fail to load (discard_damaged), record the manifest once. Returns the warnings
        (also printed to stderr)."""
        from ooc_universal.rundir import write_json_atomic
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob("*.tmp-*"):
            stale.unlink(missing_ok=True)
        warned = self.discard_damaged()
        if not (self.path / MANIFEST).exists():
            write_json_atomic(self.path / MANIFEST, manifest)
        return warned

    def discard_damaged(self) -> list[str]:
        """Delete the checkpoints that the reduce trusts once they exist (final, merged,
        self co-moment, scale and rotation files) when they do not load whole: an npz
        whose members fail their CRC or are missing, an npy shorter than its header
        says. Each is recomputed by the same command; one warning line per file. (Fold
        checkpoints are read whole on resume, and an unreadable one restarts its chain.)"""
        import sys
        warned = []
        for f in sorted(self.path.glob("*.np[yz]")):
            if not _TRUSTED_RE.fullmatch(f.name) or _loads_whole(f):
                continue
            f.unlink(missing_ok=True)
            if f.name.startswith("final_"):  # its fold checkpoints went when it was made
                m = _FINAL_RE.fullmatch(f.name)
                if m:
                    self.drop_panel(int(m.group(1)), int(m.group(2)))
            msg = (f"warning: reduce checkpoint {str(f)!r} is damaged (does not load); "
                   "discarded, its work is recomputed")
            print(msg, file=sys.stderr)
            warned.append(msg)
        return warned

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def manifest(self) -> dict | None:
        try:
            m = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        return m if isinstance(m, dict) else None

    # -- checkpoints
    def save(self, path, state, kind: str = "checkpoint") -> None:
        """Atomic: write beside, fsync, rename. `state`: a dict of arrays, or an iterable
        of (key, array) pairs made one at a time (save_state_iter). `kind` (checkpoint,
        merge, final, self, rotations, scales) names the fault-injection points
        reduce.<kind>.write / mid_write / before_rename / after_rename."""
        save_state_iter(Path(path), state.items() if isinstance(state, dict) else state, kind)

    def load(self, path, prefixes: tuple | None = None) -> dict | None:
        """A checkpoint's arrays (only the keys starting with one of `prefixes`, when
        given: npz members are read one by one, so the rest never reach memory)."""
        return load_state(Path(path), prefixes)

    def blocks_done(self) -> int:
        """Block folds held by the work dir: a finished panel's final file counts all of
        its folds, an unfinished one its chain checkpoints (temporaries excluded)."""
        finished = {}
        for f in self.path.glob("final_g*_p*.npz"):
            m = _FINAL_RE.fullmatch(f.name)
            if m:
                finished[m.groups()] = _n_blocks_done(f)
        n = sum(v for v in finished.values() if v is not None)
        for f in self.path.glob("fold_g*_p*_c*.npz"):
            m = _FOLD_RE.fullmatch(f.name)
            if m and finished.get(m.groups()) is None:
                n += _n_blocks_done(f) or 0
        return n

    def panels_done(self) -> int:
        """Panels whose row/col maxima and baseline are on disk (final files)."""
        return sum(1 for f in self.path.glob("final_g*_p*.npz") if _FINAL_RE.fullmatch(f.name))

    def disk_bytes(self) -> int:
        """Bytes the work dir takes now (its checkpoints, temporaries included)."""
        return sum(f.stat().st_size for f in self.path.glob("*") if f.is_file())

    def summary(self) -> dict:
        """What `status` can say about this unfinished reduce: the manifest's pairs and
        outputs, block folds done of the total, finished panels of the total, and the
        disk it holds. Finishing it = running the same reduce command again; discarding
        it = deleting this directory (nothing else refers to it)."""
        m = self.manifest() or {}
        return {"path": str(self.path), "reference": m.get("reference"),
                "others": m.get("others", []), "outputs": m.get("outputs", []),
                "folds_done": self.blocks_done(), "total_folds": m.get("total_folds"),
                "panels_done": self.panels_done(), "total_panels": m.get("total_panels"),
                "disk_bytes": self.disk_bytes(), "command": m.get("command")}


_TRUSTED_RE = re.compile(r"(final_g\d+_p\d+|merged_g\d+_p\d+|self_\d+|scales_\d+)\.npz"
                         r"|rotations_d\d+\.npy")


def _loads_whole(path: Path) -> bool:
    """An npz whose every member passes its CRC and parses as an array, or an npy whose
    data is as long as its header says."""
    import zipfile
    try:
        if path.suffix == ".npy":
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(f)
                need = f.tell() + int(np.prod(shape)) * dtype.itemsize
            return path.stat().st_size == need
        with zipfile.ZipFile(path) as zf:
            if zf.testzip() is not None:
                return False
            for name in zf.namelist():
                with zf.open(name) as member:
                    version = np.lib.format.read_magic(member)
                    (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)(member)
        return True
    except Exception:  # noqa: BLE001 - whatever the damage, it is not usable
        return False


def _n_blocks_done(path: Path) -> int | None:
    try:
        with np.load(path) as z:
            return int(z["n_blocks_done"])
    except Exception:  # noqa: BLE001 - unreadable: recomputed, counts nothing
        return None


def list_work(run_dir) -> list[tuple[WorkDir, dict]]:
    """Every unfinished reduce of a run with a readable manifest, sorted by path."""
    root = Path(run_dir) / REDUCE_DIR / WORK_DIR
    out = []
    for manifest in sorted(root.glob(f"*/{MANIFEST}")) if root.is_dir() else []:
        work = WorkDir(manifest.parent)
        m = work.manifest()
        if m is not None:
            out.append((work, m))
    return out


def save_state(path: Path, state: dict, kind: str = "checkpoint") -> None:
    """Write the arrays of `state` to `path` (npz) atomically; see WorkDir.save."""
    save_state_iter(path, state.items(), kind)


def save_state_iter(path: Path, items, kind: str = "checkpoint") -> None:
    """save_state for (key, array) pairs made one at a time (a generator): each array is
    written as it comes and can be dropped before the next is made, so a file of many
    large members never needs them all in memory. The same npz as np.savez."""
    import zipfile
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}-{threading.get_ident()}.npz")
    try:
        faults.point(f"reduce.{kind}.write")
        with open(tmp, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for key, value in items:
                    with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, np.asarray(value),
                                                  allow_pickle=False)
            f.flush()
            faults.point(f"reduce.{kind}.mid_write",
                         torn=lambda: os.truncate(tmp, os.path.getsize(tmp) // 2))
            os.fsync(f.fileno())
        faults.point(f"reduce.{kind}.before_rename")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    faults.point(f"reduce.{kind}.after_rename")


def save_array_stream(path: Path, shape: tuple, dtype, items, kind: str) -> None:
    """An .npy of `shape` written item by item along its leading axes (items: arrays of
    shape[-2:], in C order), atomically like save_state (fault points reduce.<kind>.*):
    no more than one item in memory."""
    dtype = np.dtype(dtype)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}-{threading.get_ident()}.npy")
    try:
        faults.point(f"reduce.{kind}.write")
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                    "shape": tuple(int(v) for v in shape)})
            for item in items:
                f.write(np.ascontiguousarray(item, dtype=dtype).data)
            f.flush()
            faults.point(f"reduce.{kind}.mid_write",
                         torn=lambda: os.truncate(tmp, os.path.getsize(tmp) // 2))
            os.fsync(f.fileno())
        faults.point(f"reduce.{kind}.before_rename")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    faults.point(f"reduce.{kind}.after_rename")


def read_array_item(path: Path, index: tuple, out: np.ndarray) -> np.ndarray:
    """Item `index` (leading indices) of an .npy written by save_array_stream, read
    into `out` (shape and dtype of one item): no new allocation, no mapping."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(f)
        lead, item = shape[:len(index)], int(np.prod(shape[len(index):]))
        if out.shape != shape[len(index):] or out.dtype != dtype or not out.flags.c_contiguous:
            raise ValueError(f"{path}: an item is {shape[len(index):]} {dtype}, out is "
                             f"{out.shape} {out.dtype}")
        f.seek(f.tell() + int(np.ravel_multi_index(index, lead)) * item * dtype.itemsize)
        if f.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise OocError(f"reduce work file {str(path)!r} is truncated; delete the "
                           "reduce's .work folder and run the same command again")
    return out


def load_state(path: Path, prefixes: tuple | None = None) -> dict | None:
    """The arrays of a checkpoint (those whose key starts with one of `prefixes`, when
    given), or None when it is missing or unreadable."""
    if not path.exists():
        return None
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files if prefixes is None or k.startswith(prefixes)}
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is recomputed, never trusted
        return None


def state_keys(path: Path) -> list[str]:
    """The member names of a checkpoint ([] when missing or unreadable), nothing loaded."""
    try:
        with np.load(path) as z:
            return list(z.files)
    except Exception:  # noqa: BLE001 - unreadable: recomputed
        return []


def pack_fold_state(accs: list, selfs: list, next_block: int, n_done: int) -> dict:
    """A chain's accumulators (dicts of numpy arrays, see ACC_KEYS / SELF_KEYS, plus "n")
    as the flat arrays of its checkpoint."""
    return dict(fold_state_items(accs, selfs, next_block, n_done))


def fold_state_items(accs: list, selfs: list, next_block: int, n_done: int,
                     to_host=np.asarray):
    """pack_fold_state's (key, array) pairs, one at a time (for WorkDir.save):
    `to_host` makes each member a numpy array only when it is written, so accumulators
    on a GPU reach host memory one member at a time."""
    yield "next_block", np.int64(next_block)
    yield "n_blocks_done", np.int64(n_done)
    for i, a in enumerate(accs):
        yield f"acc{i}_n", np.int64(a["n"])
        for k in ACC_KEYS:
            yield f"acc{i}_{k}", to_host(a[k])
    for i, s in enumerate(selfs):
        yield f"self{i}_n", np.int64(s["n"])
        for k in SELF_KEYS:
            yield f"self{i}_{k}", to_host(s[k])


def self_layer_key(layer: int) -> str:
    return f"s_{layer:04d}"


def pack_self_state(acc: dict, next_block: int, n_done: int) -> dict:
    """A self co-moment record ({"n", "mean", "m2", "s" (L, d, d)}, numpy arrays) as the
    flat arrays of its checkpoint: one member per layer, so a reader loads one (d, d)
    layer at a time (load_state(path, (self_layer_key(l),)))."""
    st = {"next_block": np.int64(next_block), "n_blocks_done": np.int64(n_done),
          "n": np.int64(acc["n"]), "mean": np.asarray(acc["mean"]),
          "m2": np.asarray(acc["m2"])}
    for layer, s_layer in enumerate(acc["s"]):
        st[self_layer_key(layer)] = np.asarray(s_layer)
    return st


def read_self_moments(path) -> dict | None:
    """A self co-moment file's counters and (N,) moments, without its layers:
    {"next_block", "n_blocks_done", "n", "mean", "m2", "n_layers"}; None when missing or
    unreadable."""
    st = load_state(Path(path), ("next_block", "n_blocks_done", "n", "mean", "m2"))
    if st is None or "m2" not in st:
        return None
    try:
        with np.load(path) as z:
            n_layers = sum(1 for k in z.files if k.startswith("s_"))
    except Exception:  # noqa: BLE001 - unreadable: recomputed
        return None
    return {"next_block": int(st["next_block"]), "n_blocks_done": int(st["n_blocks_done"]),
            "n": int(st["n"]), "mean": st["mean"], "m2": st["m2"], "n_layers": n_layers}


def iter_self_layers(path, n_layers: int):
    """Yield (layer, (d, d) float64 array) of a self co-moment file, one layer in memory
    at a time."""
    for layer in range(n_layers):
        key = self_layer_key(layer)
        st = load_state(Path(path), (key,))
        if st is None or key not in st:
            raise OocError(f"reduce work file {str(path)!r} lacks layer {layer}; delete "
                           "the reduce's .work folder and run the same command again")
        yield layer, st[key]


def unpack_fold_state(st: dict) -> tuple[list, list]:
    """(accs, selfs) of a checkpoint (pack_fold_state's inverse), numpy arrays."""
    n_pairs = sum(1 for k in st if k.startswith("acc") and k.endswith("_n"))
    n_selfs = sum(1 for k in st if k.startswith("self") and k.endswith("_n"))
    accs = [{"n": int(st[f"acc{i}_n"]), **{k: st[f"acc{i}_{k}"] for k in ACC_KEYS}}
            for i in range(n_pairs)]
    selfs = [{"n": int(st[f"self{i}_n"]), **{k: st[f"self{i}_{k}"] for k in SELF_KEYS}}
             for i in range(n_selfs)]
    return accs, selfs
