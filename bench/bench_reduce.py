"""The reduce end to end on fp16 HDF5 stores, against the machine's GEMM peak and against
the tools a user would pick instead (JSON out).

    python -m ooc_universal.bench.bench_reduce [--quick | --tiny] [--scale K]
        [--tokens N --layers L --d-mlp D] [--device cpu|cuda] [--memory 2GB]
        [--no-scaling] [--inprocess | --subprocess] [--out FILE] [--no-progress]

In-process: run(argv) -> dict.

Builds two fp16 activation stores (reference + one other model) with planted
correlations in a temporary run directory, then measures, each in the same run:
  ours        ooc_universal.steps.reduce.reduce, fp32 and bf16: useful FLOP/s (plan.flops: the
              cross GEMM, the self co-moments, the baseline GEMMs and rotated scales) over
              the torch.matmul
              peak on the reduce's own GEMM shapes (block_tokens x Na)^T (block_tokens x Nb)
              and dtype, measured in the same process right before and right after; peak
              RSS of the reduce (VmHWM, reset before it) against --memory; a time breakdown
              by phase (reads, centring, cross GEMM, the self co-moment pass, checkpoints,
              rotations and scales, tile max, baseline, assembly, the rest) as the step's
              tasks record it;
  accuracy    bf16 and fp32 row maxima against each other and against a float64 two-pass
              reference (exact means) on a subset of reference neurons;
  read path   every block through open_store(...).read_block (memmap) + fp32 conversion
              (the reduce's load_block), and h5py chunk reads, against a raw sequential
              os.readinto of the same file; warm page cache for both (the file is read once
              first), plus a cold pass after posix_fadvise(DONTNEED) where the OS allows;
  (a) original the original authors' streaming method, re-implemented from its description:
              per layer pair, fp32 GEMM of raw (uncentred) activations added into float64
              sums held in RAM, the one-pass formula, and the rotation baseline as a second
              full pass over the rotated activations (same rotation matrices as ours);
  (b) dask    what a competent Dask user writes: da.from_array on the h5py datasets (the
              store's chunks), astype float32, centre with .mean(0), Xc.T @ Yc, divide by
              the norms, .max(1), threaded scheduler; plus the same for the rotated other
              model (the baseline), so the comparison is like for like;
  (c) corrcoef numpy.corrcoef in RAM (and again on the rotated other model) when
              n x (Na + Nb) x 8 bytes <= --corrcoef-limit, else skipped with a note;
  scaling     tokens x2 and x4 (time and peak RSS ratios), neurons per layer x2 (time, ~x4
              expected), memory budget halved with 2 row panels (same answer, more passes).
Goals from the issue are printed beside each figure; they are never asserted.

Each measurement runs in its own Python process by default (clean peak RSS); --quick and
--tiny run them in this process (faster start, RSS then includes earlier phases' heap).
All timed code uses torch's default thread count.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

# Goals from issue 8 (printed beside each figure; never asserted).
GOALS = {
    "fraction_of_peak": 0.75,
    "vs_original": {"fp32": 3.0, "bf16": 6.0},
    "vs_dask": {"fp32": 1.4, "bf16": 3.0},
    "agreement": 1e-4,
    "fp32_error": 1e-5,
    "bf16_error": 2e-3,
}
REF, OTHER = "ref", "other"


@dataclass(frozen=True)
class BenchConfig:
    tokens: int = 131072          # token rows per store
    layers: int = 4               # layers per model
    d_mlp: int = 512              # neurons per layer
    memory: str = "2GB"           # the reduce's --memory
    device: str = "cpu"
    seed: int = 0
    peak_seconds: float = 2.0     # torch.matmul peak: seconds per measurement
    f64_rows: int = 256           # reference neurons in the float64 reference (0: all)
    corrcoef_limit: str = "2GB"   # n x (Na + Nb) x 8 bytes above this: (c) is skipped
    orig_batch: int = 16384       # (a): tokens per batch (the original: 32 x 512 windows)
    read_repeats: int = 3         # read path: best of this many passes
    scaling: bool = True
    inprocess: bool = False
    mode: str = "default"         # default | quick | tiny (recorded only)

    @property
    def n_neurons(self) -> int:
        return self.layers * self.d_mlp


PRESETS = {
    "default": {},
    "quick": dict(tokens=16384, layers=4, d_mlp=256, peak_seconds=0.5, f64_rows=0,
                  orig_batch=4096, read_repeats=2, inprocess=True, mode="quick"),
    "tiny": dict(tokens=4096, layers=2, d_mlp=64, peak_seconds=0.1, f64_rows=0,
                 orig_batch=1024, read_repeats=3, inprocess=True, mode="tiny"),
}


def log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[bench-reduce] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- stores

def store_block_tokens(n_tokens: int, n_neurons: int) -> int:
    """The extract step's chunk rows, but at least 8 blocks (so the bench is blockwise)."""
    from ooc_universal.formats.store import default_block_tokens
    rows = default_block_tokens(n_tokens, n_neurons)
    eighth = max(64, (n_tokens // 8) // 64 * 64)
    return int(min(rows, eighth, n_tokens))


def _model_params(seed: int, model: int, n_neurons: int, n_factors: int):
    """Per-neuron recipe of one model: which shared factor, how strongly, scale, bias."""
    rng = np.random.default_rng([seed, 1000 + model, n_neurons])
    factor = rng.integers(0, n_factors, n_neurons)
    w = rng.uniform(0.3, 0.98, n_neurons).astype(np.float32)
    scale = rng.uniform(0.3, 2.0, n_neurons).astype(np.float32)
    bias = rng.uniform(-1.0, 0.5, n_neurons).astype(np.float32)
    dead = np.sort(rng.choice(n_neurons, max(1, n_neurons // 512), replace=False))
    return factor, w, np.sqrt(1 - w * w), scale, bias, dead


def gen_block(seed: int, model: int, block: int, rows: int, n_neurons: int) -> np.ndarray:
    """(rows, n_neurons) float16 post-GELU-like activations of one block.

    Both models see the same latent factors z on the same tokens (block-seeded), so
    neurons that share a factor correlate at about w_a * w_b before the GELU; a few
    neurons per model are exactly 0 (dead: zero variance)."""
    n_factors = max(1, n_neurons // 2)
    factor, w, w_noise, scale, bias, dead = _model_params(seed, model, n_neurons, n_factors)
    z = np.random.default_rng([seed, 0, block]).standard_normal((rows, n_factors),
                                                               dtype=np.float32)
    pre = np.random.default_rng([seed, 1 + model, block]).standard_normal(
        (rows, n_neurons), dtype=np.float32)
    pre *= w_noise
    pre += z[:, factor] * w
    pre *= scale
    pre += bias
    # GELU (tanh form), in place: 0.5 x (1 + tanh(0.79788 (x + 0.044715 x^3)))
    t = pre * pre
    t *= 0.044715
    t += 1.0
    t *= pre
    t *= 0.7978845608
    np.tanh(t, out=t)
    t += 1.0
    t *= pre
    t *= 0.5
    t[:, dead] = 0.0
    return t.astype(np.float16)


def write_stores(run_dir: Path, cfg: BenchConfig, tokens: int, d_mlp: int, quiet=True):
    """RUN/stores/ref.h5 and other.h5 (tokens x layers*d_mlp, fp16, uncompressed)."""
    from ooc_universal.formats.store import PartialStore, StorePaths
    n_neurons = cfg.layers * d_mlp
    bt = store_block_tokens(tokens, n_neurons)
    ident = f"bench-reduce seed={cfg.seed} tokens={tokens} layers={cfg.layers} d={d_mlp}"
    token_hash = hashlib.sha256(ident.encode()).hexdigest()
    stores = run_dir / "stores"
    stores.mkdir(parents=True, exist_ok=True)
    paths = {}
    for model, label in enumerate((REF, OTHER)):
        attrs = {"model_id": f"bench/{label}", "revision": "", "label": label, "name": label,
                 "step": -1, "n_layers": cfg.layers, "d_mlp": d_mlp, "n_tokens": tokens,
                 "token_hash": token_hash, "dtype": "float16", "layout_version": 1,
                 "block_tokens": bt, "compression": "none", "toolkit_version": "bench"}
        ps = PartialStore.create(StorePaths.of(stores, label), attrs, tokens, n_neurons, bt)
        for i in range(ps.n_blocks):
            s, e = ps.block_bounds(i)
            ps.write_block(i, gen_block(cfg.seed, model, i, e - s, n_neurons))
        paths[label] = str(ps.finalize())
    log(f"stores {tokens:,} x {n_neurons:,} fp16 ({bt} rows per chunk) in {run_dir}", quiet)
    return paths


# --------------------------------------------------------------------------- probes

def _status_kb() -> dict:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


class RssWatch:
    """Peak RSS of a code region: VmHWM reset through /proc/self/clear_refs ("5") before,
    read after; plus the peak anonymous (heap) and file-backed (memory-mapped store
    pages) RSS sampled every 5 ms. Without clear_refs the sampled VmRSS peak is used."""

    def __init__(self):
        self.result = {}
        self._stop = threading.Event()
        self._peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}

    def _sample(self):
        while not self._stop.is_set():
            st = _status_kb()
            for k in self._peak:
                self._peak[k] = max(self._peak[k], st.get(k, 0))
            self._stop.wait(0.005)

    def __enter__(self):
        self.start = _status_kb()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            self.reset = False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        end = _status_kb()
        for k in self._peak:
            self._peak[k] = max(self._peak[k], end.get(k, 0))
        hwm = end.get("VmHWM", 0) if self.reset else 0
        self.result = {
            "peak_rss_bytes": max(hwm, self._peak["VmRSS"]),
            "peak_anon_bytes": self._peak["RssAnon"],
            "peak_file_bytes": self._peak["RssFile"],
            "rss_at_start_bytes": self.start.get("VmRSS", 0),
            "anon_at_start_bytes": self.start.get("RssAnon", 0),
            "hwm_reset": self.reset,
        }


def _sync(device):
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def gemm_peak(rows: int, na: int, nb: int, precision: str, device: str, seconds: float,
              tf32: bool | None = None) -> float:
    """torch.matmul FLOP/s of (rows x na)^T (rows x nb) in the reduce's dtype, here, now
    (operands row-major: the fastest layout)."""
    import torch
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[precision]
    old = torch.backends.cuda.matmul.allow_tf32
    if tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        # row-major operands: matmul's fastest layout (bf16 on a CPU: twice a^T b)
        a = torch.randn(na, rows, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(rows, nb, generator=g).to(device=device, dtype=dtype)
        torch.matmul(a, b)
        _sync(device)
        reps, t0 = 0, time.perf_counter()
        while True:
            torch.matmul(a, b)
            reps += 1
            if device == "cuda" and reps % 8:
                continue
            _sync(device)
            el = time.perf_counter() - t0
            if el >= seconds and reps >= 3:
                break
        return 2.0 * rows * na * nb * reps / el
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


# the step's own phases (graph.TIMINGS, recorded by its tasks on the real call path)
FOLD_PHASES = ("read", "centre", "cross_gemm", "moments", "release", "checkpoint")
SELF_PHASES = ("self_read", "self_centre", "self_comoments", "self_release",
               "self_checkpoint")
FINAL_PHASES = ("rotations", "scales", "chan_merge", "tile_max", "baseline",
                "finalize_save", "assemble")


def breakdown(timings: dict, wall: float) -> dict:
    """Where the reduce's time went (seconds), from the timings the step itself records
    (result["timings"]: {phase: seconds}); what no phase covers (planning, the graph,
    Dask, opening files, the loop's own bookkeeping) is graph_dask_planning_other."""
    out = {"wall": wall}
    for name in FOLD_PHASES + SELF_PHASES + FINAL_PHASES:
        out[name] = float(timings.get(name, 0.0))
    out.update({k: float(v) for k, v in timings.items() if k not in out})
    covered = sum(v for k, v in out.items() if k != "wall")
    out["fold_total"] = sum(out[k] for k in FOLD_PHASES)
    out["self_total"] = sum(out[k] for k in SELF_PHASES)
    out["graph_dask_planning_other"] = wall - covered
    out["fractions"] = {k: v / wall for k, v in out.items()
                        if k != "wall" and isinstance(v, float) and wall > 0}
    return out


# --------------------------------------------------------------------------- phases
# Each phase takes a JSON-able spec and returns a JSON-able dict; arrays go to spec["npz"].

def phase_ours(spec: dict) -> dict:
    """ooc_universal.steps.reduce.reduce with peaks measured before and after, peak RSS, timers."""
    import torch

    import dask.threaded  # noqa: F401  (imports outside the timed region)
    from ooc_universal.config import ComputeConfig, ReduceConfig
    from ooc_universal.formats.reduced import open_reduced
    from ooc_universal.kernels import tilemax
    from ooc_universal.steps import reduce as R
    tilemax.tile_max(np.ones((4, 4), np.float32), np.ones(4), np.ones(4))  # numba load/JIT
    dev, prec = spec["device"], spec["precision"]
    settings = ReduceConfig(precision=prec, baseline_draws=1, seed=spec["seed"])
    compute = ComputeConfig(memory=spec["memory"], device=dev)
    kw = dict(max_panels=spec.get("max_panels"), progress=False, force=True)
    plan = R.reduce(spec["run_dir"], REF, [OTHER], settings, compute, dry_run=True,
                    gemm_rate=1.0, **kw)["plan"]
    bt, na, nb = plan.block_tokens, plan.n_ref, plan.pairs[0].n_other
    secs = spec["peak_seconds"]
    peaks = {"before": gemm_peak(bt, na, nb, prec, dev, secs)}
    if dev == "cuda" and prec == "fp32":
        peaks["tf32_before"] = gemm_peak(bt, na, nb, prec, dev, secs, tf32=True)
    with RssWatch() as rss:
        t0 = time.perf_counter()
        res = R.reduce(spec["run_dir"], REF, [OTHER], settings, compute, **kw)
        _sync(dev)
        wall = time.perf_counter() - t0
    peaks["after"] = gemm_peak(bt, na, nb, prec, dev, secs)
    if dev == "cuda" and prec == "fp32":
        peaks["tf32_after"] = gemm_peak(bt, na, nb, prec, dev, secs, tf32=True)
    with open_reduced(res["outputs"][0]) as stats:
        arrays = {k: getattr(stats, k) for k in ("row_max", "row_argmax", "col_max")}
        arrays["baseline"] = stats.baseline_row_max
    np.savez(spec["npz"], **arrays)
    peak = max(peaks["before"], peaks["after"])
    from ooc_universal.plan import parse_bytes
    out = {
        "precision": prec, "device": dev, "seconds": wall,
        "flops": plan.flops, "useful_flops_per_s": plan.flops / wall,
        "peak_flops_per_s": peak, "peak_before": peaks["before"], "peak_after": peaks["after"],
        "fraction_of_peak": plan.flops / wall / peak,
        "gemm_shape": [bt, na, nb],
        "plan": {"block_tokens": bt, "n_blocks": plan.n_blocks, "panels": len(plan.panels),
                 "groups": len(plan.groups), "passes": plan.passes(),
                 "bytes_read": plan.bytes_read, "peak_bytes": plan.peak_bytes,
                 "flops": plan.flops, "notes": plan.notes},
        "memory_bytes": parse_bytes(spec["memory"]),
        **rss.result,
        "breakdown_s": breakdown(res["timings"], wall),
        "torch_threads": torch.get_num_threads(),
    }
    if "tf32_before" in peaks:
        tf = max(peaks["tf32_before"], peaks["tf32_after"])
        out["peak_tf32_flops_per_s"] = tf
        out["fraction_of_tf32_peak"] = plan.flops / wall / tf
    return out


def phase_original(spec: dict) -> dict:
    """(a) The original authors' streaming Pearson method, re-implemented from its description.

    Per batch of tokens and per (reference layer, other layer) pair: an fp32 GEMM of the
    raw, uncentred activations added into a float64 (L x d x L x d) accumulator in RAM;
    sums and sums of squares likewise (fp32 per batch, added into float64). Then the
    one-pass formula (sum xy - sum x sum y / n) / norms, NaN (dead neurons) -> 0, row max
    over every neuron of the other model. The rotation baseline is a second full pass over
    the other model's activations rotated layer by layer (y_l R_l^T, fp32) with
    kernels.rotation.rotation_matrix(seed, l, d), as ours uses. Two generosities: each
    layer is converted to fp32 once per batch (the original converts the other model's
    layer once per layer pair) and sums are fp32 (the original sums fp16 tensors); the
    result is not rounded to fp16 before the max (the original stores fp16).
    """
    import h5py
    import torch

    from ooc_universal.kernels.rotation import rotation_matrix
    dev = spec["device"]
    with h5py.File(spec["ref_path"], "r") as fx, h5py.File(spec["other_path"], "r") as fy:
        dx, dy = fx["acts"], fy["acts"]
        la, da_ = int(dx.attrs["n_layers"]), int(dx.attrs["d_mlp"])
        lb, db = int(dy.attrs["n_layers"]), int(dy.attrs["d_mlp"])
        n = dx.shape[0]
        batch = int(spec["batch"])
        rots = [torch.from_numpy(rotation_matrix(spec["seed"], l, db)).float().to(dev)
                for l in range(lb)]

        def one_pass(rotate: bool):
            f64 = dict(dtype=torch.float64, device=dev)
            acc = torch.zeros(la, da_, lb, db, **f64)
            sx, sxx = torch.zeros(la, da_, **f64), torch.zeros(la, da_, **f64)
            sy, syy = torch.zeros(lb, db, **f64), torch.zeros(lb, db, **f64)
            for s in range(0, n, batch):
                e = min(n, s + batch)
                xb = torch.from_numpy(dx[s:e]).to(dev)
                yb = torch.from_numpy(dy[s:e]).to(dev)
                xs = [xb[:, l * da_:(l + 1) * da_].float() for l in range(la)]
                ys = [yb[:, l * db:(l + 1) * db].float() for l in range(lb)]
                if rotate:
                    ys = [y @ rots[l].T for l, y in enumerate(ys)]
                for l1 in range(la):
                    for l2 in range(lb):
                        acc[l1, :, l2, :] += xs[l1].T @ ys[l2]
                for l1 in range(la):
                    sx[l1] += xs[l1].sum(0)
                    sxx[l1] += (xs[l1] * xs[l1]).sum(0)
                for l2 in range(lb):
                    sy[l2] += ys[l2].sum(0)
                    syy[l2] += (ys[l2] * ys[l2]).sum(0)
            rows = []
            for l1 in range(la):  # layerwise, as the original does
                num = acc[l1] - torch.einsum("i,lj->ilj", sx[l1], sy) / n
                n1 = (sxx[l1] - sx[l1] ** 2 / n) ** 0.5
                n2 = (syy - sy ** 2 / n) ** 0.5
                corr = torch.nan_to_num(num / torch.einsum("i,lj->ilj", n1, n2), nan=0.0)
                rows.append(corr.reshape(da_, -1).amax(1))
            return torch.cat(rows).cpu().numpy()

        with RssWatch() as rss:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row_max = one_pass(False)
            _sync(dev)
            t1 = time.perf_counter()
            base = one_pass(True)
            _sync(dev)
            t2 = time.perf_counter()
    np.savez(spec["npz"], row_max=row_max, baseline=base[None, :])
    return {"seconds": t2 - t0, "seconds_correlation_pass": t1 - t0,
            "seconds_baseline_pass": t2 - t1, "batch_tokens": batch, "device": dev,
            **rss.result}


def phase_dask(spec: dict) -> dict:
    """(b) dask.array over the h5py datasets: centre, Xc.T @ Yc, normalise, row max;
    then the same against the rotated other model (the baseline), in one dask.compute."""
    import dask
    import dask.array as da
    import h5py

    from ooc_universal.kernels.rotation import rotation_matrix
    with h5py.File(spec["ref_path"], "r") as fx, h5py.File(spec["other_path"], "r") as fy:
        dx, dy = fx["acts"], fy["acts"]
        lb, db = int(dy.attrs["n_layers"]), int(dy.attrs["d_mlp"])
        with RssWatch() as rss:
            t0 = time.perf_counter()
            x = da.from_array(dx, chunks=dx.chunks).astype(np.float32)
            y = da.from_array(dy, chunks=dy.chunks).astype(np.float32)
            xc = x - x.mean(axis=0)
            yc = y - y.mean(axis=0)
            sx = da.sqrt((xc * xc).sum(axis=0))
            sy = da.sqrt((yc * yc).sum(axis=0))
            rho = (xc.T @ yc) / (sx[:, None] * sy[None, :])
            row_max = da.nan_to_num(rho).max(axis=1)
            rots = [rotation_matrix(spec["seed"], l, db).astype(np.float32) for l in range(lb)]
            yr = da.concatenate([y[:, l * db:(l + 1) * db] @ rots[l].T for l in range(lb)],
                                axis=1)
            yrc = yr - yr.mean(axis=0)
            syr = da.sqrt((yrc * yrc).sum(axis=0))
            rho_r = (xc.T @ yrc) / (sx[:, None] * syr[None, :])
            base = da.nan_to_num(rho_r).max(axis=1)
            with warnings.catch_warnings(), dask.config.set(scheduler="threads"):
                warnings.simplefilter("ignore")
                rm, bm = da.compute(row_max, base)
            t1 = time.perf_counter()
    np.savez(spec["npz"], row_max=rm, baseline=bm[None, :])
    return {"seconds": t1 - t0, "chunks": list(dx.chunks), "scheduler": "threads",
            "dask_workers": os.cpu_count(), **rss.result,
            "note": "includes the rotated second matmul (the baseline), like for like"}


def phase_corrcoef(spec: dict) -> dict:
    """(c) numpy.corrcoef on the whole stores in RAM, and on the rotated other model."""
    import h5py

    from ooc_universal.kernels.rotation import rotation_matrix
    from ooc_universal.plan import parse_bytes
    with h5py.File(spec["ref_path"], "r") as fx, h5py.File(spec["other_path"], "r") as fy:
        dx, dy = fx["acts"], fy["acts"]
        n, na, nb = dx.shape[0], dx.shape[1], dy.shape[1]
        lb, db = int(dy.attrs["n_layers"]), int(dy.attrs["d_mlp"])
        need = n * (na + nb) * 8
        limit = parse_bytes(spec["limit"])
        if need > limit:
            return {"skipped": f"does not fit: n x (Na + Nb) x 8 = {need / 1e9:.2f} GB > "
                               f"--corrcoef-limit {limit / 1e9:.2f} GB", "bytes_needed": need}
        with RssWatch() as rss, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            x, y = dx[()], dy[()]
            rho = np.nan_to_num(np.corrcoef(x, y, rowvar=False)[:na, na:])
            row_max = rho.max(1)
            del rho
            yr = np.concatenate([y[:, l * db:(l + 1) * db].astype(np.float64)
                                 @ rotation_matrix(spec["seed"], l, db).T for l in range(lb)],
                                axis=1)
            base = np.nan_to_num(np.corrcoef(x, yr, rowvar=False)[:na, na:]).max(1)
            t1 = time.perf_counter()
    np.savez(spec["npz"], row_max=row_max, baseline=base[None, :])
    return {"seconds": t1 - t0, "bytes_needed": need, **rss.result,
            "note": "float64; includes a second corrcoef against the rotated other model"}


def phase_f64ref(spec: dict) -> dict:
    """Float64 two-pass reference (exact means, then centred sums) on a subset of reference
    neurons against every neuron of the other model, and its rotated baseline."""
    from ooc_universal.kernels.rotation import rotation_matrix
    from ooc_universal.formats.store import open_store
    with open_store(spec["ref_path"]) as sa, open_store(spec["other_path"]) as sb:
        na, nb, n = sa.n_neurons, sb.n_neurons, sa.n_tokens
        k = int(spec["rows"]) or na
        idx = np.unique(np.linspace(0, na - 1, min(k, na)).round().astype(np.int64))
        lb, db = sb.n_layers, sb.d_mlp
        rots = [rotation_matrix(spec["seed"], l, db) for l in range(lb)]
        t0 = time.perf_counter()
        mx, my = np.zeros(idx.size), np.zeros(nb)
        for i in range(sa.n_blocks):
            mx += sa.read_block(i)[:, idx].sum(0, dtype=np.float64)
            my += sb.read_block(i).sum(0, dtype=np.float64)
        mx, my = mx / n, my / n
        c, cr = np.zeros((idx.size, nb)), np.zeros((idx.size, nb))
        vx, vy, vr = np.zeros(idx.size), np.zeros(nb), np.zeros(nb)
        for i in range(sa.n_blocks):
            xc = sa.read_block(i)[:, idx].astype(np.float64) - mx
            yc = sb.read_block(i).astype(np.float64) - my
            yr = np.concatenate([yc[:, l * db:(l + 1) * db] @ rots[l].T for l in range(lb)], 1)
            c += xc.T @ yc
            cr += xc.T @ yr
            vx += (xc * xc).sum(0)
            vy += (yc * yc).sum(0)
            vr += (yr * yr).sum(0)

    def rho(cm, a, b):
        ia = np.where(a > 0, 1 / np.sqrt(np.where(a > 0, a, 1)), 0.0)
        ib = np.where(b > 0, 1 / np.sqrt(np.where(b > 0, b, 1)), 0.0)
        return cm * ia[:, None] * ib[None, :]

    np.savez(spec["npz"], idx=idx, row_max=rho(c, vx, vy).max(1),
             baseline=rho(cr, vx, vr).max(1)[None, :])
    return {"seconds": time.perf_counter() - t0, "rows": int(idx.size)}


def phase_readpath(spec: dict) -> dict:
    """Bytes/s: raw sequential read vs read_block (memmap) + fp32 conversion vs h5py."""
    import h5py
    import torch

    from ooc_universal.steps.reduce import load_block
    from ooc_universal.formats.store import open_store
    path = spec["path"]
    size = os.path.getsize(path)
    raw_buf = bytearray(8 << 20)

    def raw():
        with open(path, "rb", buffering=0) as f:
            view = memoryview(raw_buf)
            while f.readinto(view):
                pass
        return size

    with open_store(path) as st:
        bt, nn = st.block_tokens, st.n_neurons
        payload = st.n_tokens * nn * 2
        b32 = torch.empty(bt, nn, dtype=torch.float32)
        b16 = np.empty((bt, nn), np.float16)

        def mm_fp32():
            for i in range(st.n_blocks):
                s, e = st.block_bounds(i)
                load_block(st, s, e, None, b32)
            return payload

        def mm_fp16():
            for i in range(st.n_blocks):
                blk = st.read_block(i)
                np.copyto(b16[:blk.shape[0]], blk)
            return payload

        def h5():
            with h5py.File(path, "r") as f:
                ds = f["acts"]
                for i in range(st.n_blocks):
                    s, e = st.block_bounds(i)
                    ds.read_direct(b16, np.s_[s:e], np.s_[0:e - s])
            return payload

        def best(fn, cold=False):
            rates = []
            for _ in range(spec["repeats"]):
                if cold:
                    _drop_cache(path)
                t0 = time.perf_counter()
                nbytes = fn()
                rates.append(nbytes / (time.perf_counter() - t0))
            return max(rates)

        raw()  # warm: the whole file once into the page cache
        warm = {"raw_read": best(raw), "memmap_read_block_fp32": best(mm_fp32),
                "memmap_read_block_fp16_copy": best(mm_fp16), "h5py_read_direct": best(h5)}
        cold = None
        if _drop_cache(path):
            cold = {"raw_read": best(raw, True), "memmap_read_block_fp32": best(mm_fp32, True)}
            raw()  # leave it warm for what follows
    out = {"file_bytes": size, "payload_bytes": payload, "block_tokens": bt,
           "warm_bytes_per_s": warm,
           "warm_ratio_to_raw": {k: v / warm["raw_read"] for k, v in warm.items()},
           "note": "page cache cannot be dropped machine-wide here (needs root): warm = the "
                   "file read once first, then best of the passes; cold = after "
                   "posix_fadvise(DONTNEED) on this file only (best effort)"}
    if cold:
        out["cold_bytes_per_s"] = cold
        out["cold_ratio_to_raw"] = {k: v / cold["raw_read"] for k, v in cold.items()}
    return out


def _drop_cache(path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (AttributeError, OSError):
        return False


PHASES = {"ours": phase_ours, "original": phase_original, "dask": phase_dask,
          "corrcoef": phase_corrcoef, "f64ref": phase_f64ref, "readpath": phase_readpath}


def run_phase(kind: str, spec: dict, inprocess: bool, quiet: bool) -> dict:
    """One measurement, in a fresh interpreter unless `inprocess`."""
    label = spec.get("label", kind)
    log(f"{label} ...", quiet)
    t0 = time.perf_counter()
    if inprocess:
        out = PHASES[kind](spec)
    else:
        spec_path = Path(spec["npz"]).with_suffix(".spec.json")
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-m", "ooc_universal.bench.bench_reduce",
                               "--child", kind, str(spec_path)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"phase {label} failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-4000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    sec = out.get("seconds")
    log(f"{label}: " + (f"{sec:.2f} s" if sec is not None else out.get("skipped", "done"))
        + f" (phase wall {time.perf_counter() - t0:.1f} s)", quiet)
    return out


# --------------------------------------------------------------------------- driver

def _load(npz) -> dict:
    with np.load(npz) as z:
        return {k: z[k] for k in z.files}


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def machine() -> dict:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    out = {"hostname": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "python": platform.python_version(), "numpy": np.__version__,
           "platform": platform.platform()}
    try:
        out["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["cuda_device"] = p.name
        out["cuda_memory_bytes"] = p.total_memory
    return out


def run_bench(cfg: BenchConfig, workdir=None, quiet=False) -> dict:
    """Run every measurement; returns the result document (see the module docstring)."""
    from ooc_universal.plan import parse_bytes
    t_start = time.perf_counter()
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="bench-reduce-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = machine().get("load_average")
    try:
        base = work / "base"
        paths = write_stores(base, cfg, cfg.tokens, cfg.d_mlp, quiet)
        store_bytes = sum(os.path.getsize(p) for p in paths.values())
        common = dict(seed=cfg.seed, device=cfg.device, memory=cfg.memory,
                      peak_seconds=cfg.peak_seconds)
        ip = cfg.inprocess

        def ours(run_dir, precision, tag, **extra):
            spec = dict(common, run_dir=str(run_dir), precision=precision,
                        npz=str(work / f"ours_{tag}.npz"), label=f"ours {tag}", **extra)
            out = run_phase("ours", spec, ip, quiet)
            return out, _load(spec["npz"])

        pair = dict(ref_path=paths[REF], other_path=paths[OTHER], seed=cfg.seed)
        res = {}
        res["fp32"], arr32 = ours(base, "fp32", "fp32")
        res["bf16"], arr16 = ours(base, "bf16", "bf16")
        ref64 = run_phase("f64ref", dict(pair, rows=cfg.f64_rows, npz=str(work / "f64.npz"),
                                         label="float64 reference"), ip, quiet)
        a64 = _load(work / "f64.npz")
        readpath = run_phase("readpath", dict(path=paths[OTHER], repeats=cfg.read_repeats,
                                              npz=str(work / "read.npz"), label="read path"),
                             ip, quiet)
        alt_specs = {
            "original": ("original", dict(pair, device=cfg.device, batch=cfg.orig_batch)),
            "dask": ("dask", dict(pair)),
            "corrcoef": ("corrcoef", dict(pair, limit=cfg.corrcoef_limit)),
        }
        if cfg.device == "cuda":  # dask and corrcoef are CPU tools: measured in the CPU run
            alt_specs = {"original": alt_specs["original"]}
        alts = {}
        for name, (kind, spec) in alt_specs.items():
            spec = dict(spec, npz=str(work / f"alt_{name}.npz"), label=f"({name})")
            out = run_phase(kind, spec, ip, quiet)
            if "skipped" not in out:
                a = _load(spec["npz"])
                out["agreement_row_max"] = _maxdiff(a["row_max"], arr32["row_max"])
                out["agreement_baseline"] = _maxdiff(a["baseline"][0], arr32["baseline"][0])
                out["error_vs_float64"] = _maxdiff(a["row_max"][a64["idx"]], a64["row_max"])
                out["useful_flops_per_s"] = res["fp32"]["flops"] / out["seconds"]
                out["fraction_of_fp32_peak"] = (out["useful_flops_per_s"]
                                                / res["fp32"]["peak_flops_per_s"])
                out["speedup_ours_fp32"] = out["seconds"] / res["fp32"]["seconds"]
                out["speedup_ours_bf16"] = out["seconds"] / res["bf16"]["seconds"]
            alts[name] = out
        idx = a64["idx"]
        accuracy = {
            "float64_rows": int(idx.size),
            "bf16_vs_fp32_row_max": _maxdiff(arr16["row_max"], arr32["row_max"]),
            "bf16_vs_fp32_baseline": _maxdiff(arr16["baseline"], arr32["baseline"]),
            "bf16_vs_float64_row_max": _maxdiff(arr16["row_max"][idx], a64["row_max"]),
            "fp32_vs_float64_row_max": _maxdiff(arr32["row_max"][idx], a64["row_max"]),
            "fp32_vs_float64_baseline": _maxdiff(arr32["baseline"][0][idx], a64["baseline"][0]),
            "bf16_vs_float64_baseline": _maxdiff(arr16["baseline"][0][idx], a64["baseline"][0]),
            "bf16_argmax_agreement_with_fp32": float(np.mean(arr16["row_argmax"]
                                                             == arr32["row_argmax"])),
            "float64_seconds": ref64["seconds"],
        }
        scaling = run_scaling(cfg, work, base, res["fp32"], arr32, ours, quiet) \
            if cfg.scaling else {"skipped": "--no-scaling"}
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    doc = {
        "bench": "reduce",
        "config": asdict(cfg),
        "machine": dict(machine(), load_average_start=load_start),
        "data": {"n_tokens": cfg.tokens, "n_layers": cfg.layers, "d_mlp": cfg.d_mlp,
                 "n_ref": cfg.n_neurons, "n_other": cfg.n_neurons, "store_bytes": store_bytes,
                 "store_block_tokens": store_block_tokens(cfg.tokens, cfg.n_neurons),
                 "dead_neurons_per_model": max(1, cfg.n_neurons // 512),
                 "page_cache": "stores were just written: reads are warm (page cache)"},
        "ours": res,
        "accuracy": accuracy,
        "read_path": readpath,
        "alternatives": alts,
        "scaling": scaling,
        "memory_bytes": parse_bytes(cfg.memory),
        "wall_s": time.perf_counter() - t_start,
    }
    doc["figures"] = figures(doc)
    return doc


def run_scaling(cfg, work, base, r1, arr1, ours, quiet) -> dict:
    """tokens x2, x4; neurons per layer x2; memory halved with 2 panels (fp32 only)."""
    from ooc_universal.plan import parse_bytes
    out = {"tokens": {"x1": _scal_row(r1, r1)}}
    for k in (2, 4):
        d = work / f"tokens_x{k}"
        write_stores(d, cfg, cfg.tokens * k, cfg.d_mlp, quiet)
        r, _ = ours(d, "fp32", f"fp32 tokens x{k}")
        out["tokens"][f"x{k}"] = _scal_row(r, r1)
        shutil.rmtree(d, ignore_errors=True)
    d = work / "neurons_x2"
    write_stores(d, cfg, cfg.tokens, cfg.d_mlp * 2, quiet)
    r, _ = ours(d, "fp32", "fp32 neurons x2")
    out["neurons_x2"] = _scal_row(r, r1)
    shutil.rmtree(d, ignore_errors=True)
    half = f"{parse_bytes(cfg.memory) // 2}B"
    note = "--memory halved and max_panels=2"
    try:
        r, arr = ours(base, "fp32", "fp32 memory halved", max_panels=2, memory=half)
    except RuntimeError as exc:  # the halved budget cannot hold even 2 panels' plan
        note = f"half the budget did not plan ({str(exc).strip().splitlines()[-1]}); " \
               "ran max_panels=2 at the full budget"
        r, arr = ours(base, "fp32", "fp32 2 panels", max_panels=2)
    out["memory_halved"] = dict(_scal_row(r, r1), memory_bytes=r["memory_bytes"], note=note,
                                panels=r["plan"]["panels"], passes=r["plan"]["passes"],
                                passes_full_budget=r1["plan"]["passes"],
                                bytes_read=r["plan"]["bytes_read"],
                                bytes_read_full_budget=r1["plan"]["bytes_read"],
                                max_diff_row_max=_maxdiff(arr["row_max"], arr1["row_max"]),
                                max_diff_baseline=_maxdiff(arr["baseline"], arr1["baseline"]),
                                argmax_identical=float(np.mean(arr["row_argmax"]
                                                               == arr1["row_argmax"])))
    return out


def _scal_row(r, r1) -> dict:
    return {"seconds": r["seconds"], "time_ratio": r["seconds"] / r1["seconds"],
            "flops_ratio": r["flops"] / r1["flops"],
            "fraction_of_peak": r["fraction_of_peak"],
            "peak_rss_bytes": r["peak_rss_bytes"], "peak_anon_bytes": r["peak_anon_bytes"],
            "peak_file_bytes": r["peak_file_bytes"],
            "rss_ratio": r["peak_rss_bytes"] / r1["peak_rss_bytes"],
            "anon_ratio": r["peak_anon_bytes"] / max(1, r1["peak_anon_bytes"])}


# --------------------------------------------------------------------------- figures

def _row(figure, value, baseline=None, ratio=None, goal=None, met=None, unit=""):
    return {"figure": figure, "value": value, "baseline": baseline, "ratio": ratio,
            "goal": goal, "met": met, "unit": unit}


def figures(doc: dict) -> list:
    """Rows of the summary table: figure | value | baseline | ratio | goal | met."""
    rows = []
    ours, alts, acc = doc["ours"], doc["alternatives"], doc["accuracy"]
    gpu = doc["config"]["device"] == "cuda"
    unit = "TFLOP/s" if gpu else "GFLOP/s"
    scale = 1e12 if gpu else 1e9
    for p in ("fp32", "bf16"):
        r = ours[p]
        f = r["fraction_of_peak"]
        rows.append(_row(f"reduce {p}: useful {unit} / torch.matmul {p} peak (same shapes)",
                         r["useful_flops_per_s"] / scale, r["peak_flops_per_s"] / scale, f,
                         f">= {GOALS['fraction_of_peak']}", f >= GOALS["fraction_of_peak"],
                         unit))
        if "fraction_of_tf32_peak" in r:
            rows.append(_row("reduce fp32: useful TFLOP/s / torch.matmul tf32 peak",
                             r["useful_flops_per_s"] / scale,
                             r["peak_tf32_flops_per_s"] / scale, r["fraction_of_tf32_peak"],
                             None, None, unit))
        mem = r["memory_bytes"]
        rows.append(_row(f"reduce {p}: peak RSS / --memory (incl. memory-mapped store pages)",
                         r["peak_rss_bytes"] / 1e9, mem / 1e9, r["peak_rss_bytes"] / mem,
                         "<= 1", r["peak_rss_bytes"] <= mem, "GB"))
        rows.append(_row(f"reduce {p}: peak anonymous RSS / --memory",
                         r["peak_anon_bytes"] / 1e9, mem / 1e9, r["peak_anon_bytes"] / mem,
                         "<= 1", r["peak_anon_bytes"] <= mem, "GB"))
    b = ours["bf16"]["seconds"]
    rows.append(_row("bf16 speed-up over fp32 (reduce wall time)", b,
                     ours["fp32"]["seconds"], ours["fp32"]["seconds"] / b, None, None, "s"))
    rows.append(_row("bf16 max |row_max - fp32 row_max|", acc["bf16_vs_fp32_row_max"], None,
                     None, f"<= {GOALS['bf16_error']}",
                     acc["bf16_vs_fp32_row_max"] <= GOALS["bf16_error"]))
    rows.append(_row(f"bf16 max |row_max - float64| ({acc['float64_rows']} rows)",
                     acc["bf16_vs_float64_row_max"], None, None, f"<= {GOALS['bf16_error']}",
                     acc["bf16_vs_float64_row_max"] <= GOALS["bf16_error"]))
    rows.append(_row(f"fp32 max |row_max - float64| ({acc['float64_rows']} rows)",
                     acc["fp32_vs_float64_row_max"], None, None, f"<= {GOALS['fp32_error']}",
                     acc["fp32_vs_float64_row_max"] <= GOALS["fp32_error"]))
    names = {"original": "(a) original method (2 passes)", "dask": "(b) dask.array",
             "corrcoef": "(c) numpy.corrcoef in RAM"}
    for name, a in alts.items():
        if "skipped" in a:
            rows.append(_row(f"{names[name]}: skipped", a["skipped"]))
            continue
        for p in ("fp32", "bf16"):
            goal = GOALS.get(f"vs_{name}", {}).get(p)
            sp = a[f"speedup_ours_{p}"]
            rows.append(_row(f"speed-up of ours {p} over {names[name]}", ours[p]["seconds"],
                             a["seconds"], sp, f">= {goal}" if goal else None,
                             (sp >= goal) if goal else None, "s"))
        ag = a["agreement_row_max"]
        rows.append(_row(f"{names[name]}: max |row_max - ours fp32|", ag, None, None,
                         f"<= {GOALS['agreement']}", ag <= GOALS["agreement"]))
        rows.append(_row(f"{names[name]}: max |baseline row_max - ours fp32|",
                         a["agreement_baseline"], None, None, f"<= {GOALS['agreement']}",
                         a["agreement_baseline"] <= GOALS["agreement"]))
        rows.append(_row(f"{names[name]}: useful {unit} / fp32 peak",
                         a["useful_flops_per_s"] / scale,
                         ours["fp32"]["peak_flops_per_s"] / scale, a["fraction_of_fp32_peak"],
                         None, None, unit))
    rp = doc["read_path"]
    w = rp["warm_bytes_per_s"]
    for k, label in (("memmap_read_block_fp32", "read_block (memmap) + fp32 conversion"),
                     ("memmap_read_block_fp16_copy", "read_block (memmap) + fp16 copy"),
                     ("h5py_read_direct", "h5py read_direct per chunk")):
        rows.append(_row(f"read path, warm: {label} / raw sequential read", w[k] / 1e9,
                         w["raw_read"] / 1e9, w[k] / w["raw_read"], None, None, "GB/s"))
    if "cold_bytes_per_s" in rp:
        c = rp["cold_bytes_per_s"]
        rows.append(_row("read path, cold (fadvise): read_block + fp32 / raw read",
                         c["memmap_read_block_fp32"] / 1e9, c["raw_read"] / 1e9,
                         c["memmap_read_block_fp32"] / c["raw_read"], None, None, "GB/s"))
    sc = doc["scaling"]
    if "skipped" not in sc:
        for k, expect in (("x2", 2), ("x4", 4)):
            r = sc["tokens"][k]
            rows.append(_row(f"scaling: tokens {k}, time ratio", r["seconds"],
                             sc["tokens"]["x1"]["seconds"], r["time_ratio"],
                             f"~{expect} (linear)", abs(r["time_ratio"] / expect - 1) <= 0.25,
                             "s"))
            rows.append(_row(f"scaling: tokens {k}, peak RSS ratio", r["peak_rss_bytes"] / 1e9,
                             sc["tokens"]["x1"]["peak_rss_bytes"] / 1e9, r["rss_ratio"],
                             "~1 (flat)", r["rss_ratio"] <= 1.25, "GB"))
            rows.append(_row(f"scaling: tokens {k}, peak anonymous RSS ratio",
                             r["peak_anon_bytes"] / 1e9,
                             sc["tokens"]["x1"]["peak_anon_bytes"] / 1e9, r["anon_ratio"],
                             "~1 (flat)", r["anon_ratio"] <= 1.25, "GB"))
        r = sc["neurons_x2"]
        rows.append(_row("scaling: neurons x2, time ratio", r["seconds"],
                         sc["tokens"]["x1"]["seconds"], r["time_ratio"], "~4",
                         abs(r["time_ratio"] / 4 - 1) <= 0.25, "s"))
        r = sc["memory_halved"]
        rows.append(_row("scaling: memory halved (2 panels), time ratio", r["seconds"],
                         sc["tokens"]["x1"]["seconds"], r["time_ratio"], None, None, "s"))
        rows.append(_row("scaling: memory halved, max |row_max diff| (same answer)",
                         r["max_diff_row_max"], None, None, "<= 1e-5",
                         r["max_diff_row_max"] <= 1e-5))
    return rows


def format_table(rows: list) -> str:
    """Markdown: figure | value | baseline | ratio | goal | met."""
    from ooc_universal.bench.suite import _num as num   # one number format for all tables

    lines = ["| figure | value | baseline | ratio | goal | met |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        u = f" {r['unit']}" if r.get("unit") and r.get("value") is not None \
            and not isinstance(r["value"], str) else ""
        ub = f" {r['unit']}" if r.get("unit") and r.get("baseline") is not None else ""
        lines.append(f"| {r['figure']} | {num(r['value'])}{u} | {num(r['baseline'])}{ub} | "
                     f"{num(r['ratio'])} | {r['goal'] or ''} | {num(r['met'])} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI

def config_from_args(a) -> BenchConfig:
    preset = "tiny" if a.tiny else "quick" if a.quick else "default"
    cfg = replace(BenchConfig(), **PRESETS[preset])
    over = {k: v for k, v in dict(tokens=a.tokens, layers=a.layers, d_mlp=a.d_mlp,
                                  memory=a.memory, device=a.device,
                                  corrcoef_limit=a.corrcoef_limit).items() if v is not None}
    cfg = replace(cfg, **over)
    if a.scale and a.scale != 1:
        cfg = replace(cfg, tokens=int(cfg.tokens * a.scale))
    if a.no_scaling:
        cfg = replace(cfg, scaling=False)
    if a.inprocess:
        cfg = replace(cfg, inprocess=True)
    if a.subprocess:
        cfg = replace(cfg, inprocess=False)
    if cfg.device == "auto":
        from ooc_universal.devices import device_name
        cfg = replace(cfg, device=device_name("auto"))
    return cfg


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~30 s smoke run (16k tokens)")
    ap.add_argument("--tiny", action="store_true", help="the smallest run (tests)")
    ap.add_argument("--scale", type=float, default=None, help="multiply the token count")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--d-mlp", type=int, default=None)
    ap.add_argument("--memory", default=None, help="the reduce's --memory (default 2GB)")
    ap.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    ap.add_argument("--corrcoef-limit", default=None,
                    help="run numpy.corrcoef only when n x (Na+Nb) x 8 bytes fits (2GB)")
    ap.add_argument("--no-scaling", action="store_true", help="skip the scaling runs")
    ap.add_argument("--inprocess", action="store_true", help="measure in this process")
    ap.add_argument("--subprocess", action="store_true", help="one process per measurement")
    ap.add_argument("--workdir", default=None, help="keep the stores here (default: temp)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="progress lines on stderr (--no-progress: none)")
    # the earlier spelling of --no-progress, kept so old command lines still run
    ap.add_argument("--quiet", dest="progress", action="store_false", help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    return ap


def run(argv=None) -> dict:
    """Measure; return the result document (progress on stderr unless --no-progress)."""
    a = build_parser().parse_args(argv)
    return run_bench(config_from_args(a), workdir=a.workdir, quiet=not a.progress)


def main(argv=None) -> dict | None:
    a = build_parser().parse_args(argv)
    if a.child:
        kind, spec_path = a.child
        spec = json.loads(Path(spec_path).read_text())
        print(json.dumps(PHASES[kind](spec)))
        return None
    cfg = config_from_args(a)
    doc = run_bench(cfg, workdir=a.workdir, quiet=not a.progress)
    text = json.dumps(doc, indent=2, default=float)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    if a.progress:
        print(format_table(doc["figures"]), file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
