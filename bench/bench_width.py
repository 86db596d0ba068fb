"""The reduce at the paper's width on a limited-RAM workstation (JSON out).

    python -m ooc_universal.bench.bench_width [--quick | --tiny] [--tokens 8192]
        [--budgets 16GB,4GB] [--no-bf16] [--draws 1] [--rows 256] [--out FILE] [--no-progress]

In-process: run(argv) -> dict; `ooc-universal bench --only width` runs it in the suite.

Builds, in a temporary directory, two randomly initialised GPT-2-small-shaped models
(12 layers, d_model 768, d_mlp 3072, the stanford-crfm config flags: zoo.gpt2_config,
saved with save_pretrained), a byte token set of --tokens valid positions (random bytes
through steps.tokens.build_token_set) and both models' activation stores (steps.extract,
default chunking). Then, for each budget (by default one that needs no panels and one
that does) in fp32, and in bf16 at the first budget, it reduces the first model against
the second in a fresh process and records
  peak RSS    VmHWM (anonymous + memory-mapped pages; reset right before the reduce)
              against --memory, and the work directory's peak disk against the plan's;
  rate        the reduce's useful FLOPs (plan.flops: cross, self co-moments, baseline,
              rotated scales) per CPU-second of the process, over torch.matmul's FLOPs
              per CPU-second at the plan's strip GEMM shape and dtype (best of before
              and after the reduce), and the same per wall second;
  plan        the --dry-run's expected time (rates measured at the plan's shapes in the
              same process, just before) over the measured time, wall and CPU; the
              wall estimate assumes the cores the process got while the dry run
              measured (rates.cores_now), so the other jobs' share during the dry run
              and during the reduce are both recorded (a change between the two is
              what a wall-time estimate cannot foresee);
  accuracy    max |row max - float64| and max |baseline row max - float64| on --rows
              sampled reference rows, the float64 reference from the stores by the
              formulas (exact means, an explicit rotation of the other model).
Other processes' share of the CPUs during each reduce is recorded (a busy machine makes
wall-clock ratios unreliable; the per-CPU-second ones hold). Goals from issue 12 are
printed beside the figures, never asserted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ooc_universal.bench.inputs import random_byte_tokens, random_gpt2_models

GOALS = {"rss": 1.0, "rate_nopanel": 0.85, "rate_panel": 0.7, "rate_bf16": 0.8,
         "plan_lo": 0.75, "plan_hi": 1.33, "row_max_error": 1e-6, "baseline_error": 1e-6,
         "bf16_error": 2e-3}
REF, OTHER = "model-a", "model-b"


@dataclass(frozen=True)
class WidthConfig:
    layers: int = 12              # GPT-2 small
    d_model: int = 768
    heads: int = 12
    d_mlp: int = 3072
    window: int = 512             # tokens per window (BOS first)
    tokens: int = 8192            # valid token positions
    budgets: tuple = ("16GB", "4GB")  # "auto": from the planner (one panel; several)
    draws: int = 1                # baseline draws (the paper's one)
    rows: int = 256               # sampled reference rows of the float64 check
    precision: str = "fp32"
    bf16: bool = True             # also a bf16 reduce at the first budget
    seed: int = 0
    peak_seconds: float = 2.0     # torch.matmul rate: seconds per measurement
    extract_memory: str = "4GB"
    mode: str = "default"         # default | quick | tiny (recorded only)


PRESETS = {
    "default": {},
    "quick": dict(layers=4, d_model=256, heads=4, d_mlp=1024, tokens=4096, window=256,
                  budgets=("auto",), peak_seconds=0.5, extract_memory="2GB", mode="quick"),
    "tiny": dict(layers=2, d_model=32, heads=2, d_mlp=128, tokens=512, window=64,
                 budgets=("auto",), rows=32, peak_seconds=0.1, extract_memory="4GB",
                 mode="tiny"),
}


def log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[bench-width] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- inputs

def build_models(root: Path, cfg: WidthConfig) -> list[Path]:
    """Two randomly initialised GPT-2 models of the config's shape (seeds seed, seed+1)."""
    return random_gpt2_models(root, (REF, OTHER), layers=cfg.layers,
                              d_model=cfg.d_model, heads=cfg.heads, d_mlp=cfg.d_mlp,
                              window=cfg.window, seed=cfg.seed)


def build_tokens(run_dir: Path, cfg: WidthConfig) -> None:
    """cfg.tokens valid positions of random bytes (no newlines: every position counts)."""
    random_byte_tokens(run_dir, cfg.tokens, cfg.window, cfg.seed)


def build_stores(run_dir: Path, models: list, cfg: WidthConfig, quiet: bool) -> dict:
    """Both activation stores (default chunking); {label: seconds}."""
    from ooc_universal.config import ComputeConfig, ExtractConfig
    from ooc_universal.steps.extract import extract
    seconds = {}
    for path in models:
        t0 = time.perf_counter()
        extract(run_dir, str(path), ExtractConfig(),
                ComputeConfig(memory=cfg.extract_memory, device="cpu"), progress=False)
        seconds[path.name] = time.perf_counter() - t0
        log(f"extracted {path.name} in {seconds[path.name]:.1f} s", quiet)
    return seconds


def auto_budgets(run_dir: Path, cfg: WidthConfig) -> list[str]:
    """One budget that needs no panels (the one-panel plan's need + 10%) and one between
    the needs of 4 panels and of 1 (so the planner cuts 2 to 4), from the planner."""
    from ooc_universal.config import ComputeConfig, ReduceConfig
    from ooc_universal.steps.reduce import reduce
    settings = ReduceConfig(precision=cfg.precision, baseline_draws=cfg.draws)

    def need(panels):
        return reduce(run_dir, REF, [OTHER], settings, ComputeConfig(memory="1TB", device="cpu"),
                      dry_run=True, gemm_rate=1.0, max_panels=panels)["plan"].required_bytes
    one, four = need(1), need(4)
    return [f"{int(one * 1.1)}B", f"{int(four + 0.25 * (one - four))}B"]


# --------------------------------------------------------------------------- the child

class DiskWatch:
    """Peak bytes under a directory, sampled every 0.2 s in a thread."""

    def __init__(self, root: Path):
        self.root, self.peak = root, 0
        self._stop = threading.Event()

    def _size(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                try:
                    total += os.path.getsize(os.path.join(dirpath, name))
                except OSError:
                    pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._size())
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def child_reduce(spec: dict) -> dict:
    """One budget: the dry run (expected time), the reduce (peak RSS, CPU and wall time,
    work-dir disk), torch.matmul at the plan's shape before and after."""
    from ooc_universal.bench.bench_reduce import RssWatch
    from ooc_universal.bench.suite import _cpu_busy_seconds, _other_jobs_share
    from ooc_universal.config import ComputeConfig, ReduceConfig
    from ooc_universal.formats.reduced import open_reduced
    from ooc_universal.kernels import tilemax
    from ooc_universal.plan import expected_seconds, gemm_shape, measure_gemm, parse_bytes
    from ooc_universal.steps.reduce import reduce
    tilemax.tile_max(np.ones((4, 4), np.float32), np.ones(4), np.ones(4))  # numba load
    run_dir, prec = spec["run_dir"], spec["precision"]
    settings = ReduceConfig(precision=prec, baseline_draws=spec["draws"], seed=spec["seed"])
    compute = ComputeConfig(memory=spec["memory"], device="cpu")
    busy_dry, t_dry = _cpu_busy_seconds(), time.perf_counter()
    dry = reduce(run_dir, REF, [OTHER], settings, compute, dry_run=True, force=True)
    share_dry = _other_jobs_share(busy_dry, _cpu_busy_seconds(), time.perf_counter() - t_dry,
                                  os.cpu_count() or 1)
    plan, rates = dry["plan"], dry["rates"]
    expected = expected_seconds(plan, rates)
    expected_cpu = expected_seconds(plan, rates, per_cpu=True)
    shape = gemm_shape(plan)
    before = measure_gemm("cpu", prec, shape, spec["peak_seconds"])
    busy0 = _cpu_busy_seconds()
    with RssWatch() as rss, DiskWatch(Path(run_dir) / "reduce" / ".work") as disk:
        t0, c0 = time.perf_counter(), time.process_time()
        res = reduce(run_dir, REF, [OTHER], settings, compute, force=True, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # less the reduce's own closing matmul measurement (for its summary line)
    wall -= res["rate"]["measure_seconds"]
    cpu -= res["rate"]["measure_cpu_seconds"]
    share = _other_jobs_share(busy0, _cpu_busy_seconds(), wall, os.cpu_count() or 1)
    after = measure_gemm("cpu", prec, shape, spec["peak_seconds"])
    with open_reduced(res["outputs"][0]) as stats:
        np.savez(spec["npz"], row_max=stats.row_max, baseline=stats.baseline_row_max)
    mm_cpu, mm_wall = max(before["cpu"], after["cpu"]), max(before["wall"], after["wall"])
    return {
        "memory": spec["memory"], "memory_bytes": parse_bytes(spec["memory"]),
        "seconds": wall, "cpu_seconds": cpu, "flops": plan.flops,
        "flops_by_kind": plan.flops_by_kind,
        "flops_per_cpu_s": plan.flops / cpu, "flops_per_s": plan.flops / wall,
        "matmul_flops_per_cpu_s": mm_cpu, "matmul_flops_per_s": mm_wall,
        "matmul_before": before, "matmul_after": after, "matmul_shape": list(shape),
        "fraction_per_cpu_s": plan.flops / cpu / mm_cpu,
        "fraction_per_wall_s": plan.flops / wall / mm_wall,
        "expected_seconds": expected, "rates": asdict(rates),
        "plan_over_actual": expected["total"] / wall,
        "expected_cpu_seconds": expected_cpu,
        "plan_over_actual_cpu": expected_cpu["total"] / cpu,
        "plan": {"block_tokens": plan.block_tokens, "panels": len(plan.panels),
                 "panel_rows": plan.panel_rows, "groups": len(plan.groups),
                 "peak_bytes": plan.peak_bytes, "required_bytes": plan.required_bytes,
                 "task_peaks": plan.task_peaks, "work_disk_bytes": plan.work_disk_bytes,
                 "output_bytes": plan.output_bytes, "describe": dry["describe"]},
        "work_disk_peak_bytes": disk.peak,
        **rss.result,
        "peak_rss_fraction_of_memory": rss.result["peak_rss_bytes"] / parse_bytes(spec["memory"]),
        "timings_s": res["timings"], "cpu_timings_s": res["cpu_timings"],
        "reduce_rate_line": res.get("rate"),
        "other_jobs_cpu_share": share,
        # the load the dry run's rates met (plan: rates.cores_now of rates.threads cores)
        "other_jobs_cpu_share_dry_run": share_dry,
        "cores_used": cpu / wall if wall > 0 else None,
    }


def run_child(spec: dict, work: Path) -> dict:
    spec_path = work / f"spec-{spec['tag']}.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "ooc_universal.bench.bench_width", "--child",
                           str(spec_path)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"width reduce at {spec['memory']} failed (exit "
                           f"{proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- float64

def float64_reference(run_dir: Path, rows: int, seed: int, draws: int) -> dict:
    """Row max and baseline row max of `rows` sampled reference neurons against every
    neuron of the other model, in float64 from the stores: exact means first, then
    centred sums; the baseline from the explicitly rotated other model."""
    from ooc_universal.kernels.rotation import rotation_matrix
    from ooc_universal.formats.store import open_store
    stores = Path(run_dir) / "stores"
    with open_store(stores / f"{REF}.h5") as sa, open_store(stores / f"{OTHER}.h5") as sb:
        idx = np.unique(np.linspace(0, sa.n_neurons - 1, rows).round().astype(np.int64))
        lb, d = sb.n_layers, sb.d_mlp
        mx, my = _means(sa, sb, idx)
        rots = [[rotation_matrix(seed + j, layer, d) for layer in range(lb)]
                for j in range(draws)]
        c = np.zeros((idx.size, sb.n_neurons))
        cr = np.zeros((draws, idx.size, sb.n_neurons))
        vx, vy, vr = np.zeros(idx.size), np.zeros(sb.n_neurons), np.zeros((draws, sb.n_neurons))
        for start in range(0, sa.n_tokens, 1024):
            stop = min(sa.n_tokens, start + 1024)
            xc = sa.read_rows(start, stop)[:, idx].astype(np.float64) - mx
            yc = sb.read_rows(start, stop).astype(np.float64) - my
            c += xc.T @ yc
            vx += (xc * xc).sum(0)
            vy += (yc * yc).sum(0)
            for j in range(draws):
                for layer in range(lb):
                    sl = slice(layer * d, (layer + 1) * d)
                    yr = yc[:, sl] @ rots[j][layer].T
                    cr[j][:, sl] += xc.T @ yr
                    vr[j, sl] += (yr * yr).sum(0)
    return {"idx": idx, "row_max": _rho(c, vx, vy).max(1),
            "baseline": np.stack([_rho(cr[j], vx, vr[j]).max(1) for j in range(draws)])}


def _means(sa, sb, idx) -> tuple:
    mx, my = np.zeros(idx.size), np.zeros(sb.n_neurons)
    for start in range(0, sa.n_tokens, 1024):
        stop = min(sa.n_tokens, start + 1024)
        mx += sa.read_rows(start, stop)[:, idx].sum(0, dtype=np.float64)
        my += sb.read_rows(start, stop).sum(0, dtype=np.float64)
    return mx / sa.n_tokens, my / sb.n_tokens


def _rho(c, vx, vy):
    ix = np.where(vx > 0, 1 / np.sqrt(np.where(vx > 0, vx, 1)), 0.0)
    iy = np.where(vy > 0, 1 / np.sqrt(np.where(vy > 0, vy, 1)), 0.0)
    return c * ix[:, None] * iy[None, :]


# --------------------------------------------------------------------------- driver

def run_bench(cfg: WidthConfig, quiet: bool = False, workdir=None) -> dict:
    t_start = time.perf_counter()
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="bench-width-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run_dir = work / "run"
        run_dir.mkdir(exist_ok=True)
        extract_s = _inputs(work, run_dir, cfg, quiet)
        budgets = auto_budgets(run_dir, cfg) if cfg.budgets == ("auto",) else list(cfg.budgets)
        cases = [(m, cfg.precision) for m in budgets]
        if cfg.bf16 and cfg.precision != "bf16":
            cases.append((budgets[0], "bf16"))
        runs = {f"{m} {prec}": _one_case(work, run_dir, cfg, m, prec, k, quiet)
                for k, (m, prec) in enumerate(cases)}
        log(f"float64 reference on {cfg.rows} rows ...", quiet)
        t0 = time.perf_counter()
        ref64 = float64_reference(run_dir, cfg.rows, cfg.seed, cfg.draws)
        for k, r in enumerate(runs.values()):
            with np.load(work / f"out-{k}.npz") as z:
                got_rows, got_base = z["row_max"][ref64["idx"]], z["baseline"][:, ref64["idx"]]
            r["row_max_error"] = _maxdiff(got_rows, ref64["row_max"])
            r["baseline_error"] = _maxdiff(got_base, ref64["baseline"])
        float64_s = time.perf_counter() - t0
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    doc = {"bench": "width", "config": asdict(cfg), "budgets": budgets, "runs": runs,
           "extract_seconds": extract_s, "float64_seconds": float64_s,
           "shape": {"n_tokens": cfg.tokens, "n_neurons": cfg.layers * cfg.d_mlp,
                     "layers": cfg.layers, "d_mlp": cfg.d_mlp, "d_model": cfg.d_model},
           "wall_s": time.perf_counter() - t_start}
    doc["figures"] = figures(doc)
    return doc


def _one_case(work: Path, run_dir: Path, cfg: WidthConfig, memory: str, precision: str,
              k: int, quiet: bool) -> dict:
    """One reduce in its own process; its row maxima go to work/out-<k>.npz."""
    spec = dict(run_dir=str(run_dir), memory=memory, precision=precision, draws=cfg.draws,
                seed=cfg.seed, peak_seconds=cfg.peak_seconds, npz=str(work / f"out-{k}.npz"),
                tag=str(k))
    log(f"reduce {precision} at --memory {memory} ...", quiet)
    r = run_child(spec, work)
    r["precision"] = precision
    log(f"  {r['seconds']:.1f} s, {r['plan']['panels']} panel(s), peak RSS "
        f"{r['peak_rss_bytes'] / 1e9:.2f} GB, {r['fraction_per_cpu_s']:.2f} of matmul per "
        f"CPU-s, plan/actual {r['plan_over_actual']:.2f} (CPU {r['plan_over_actual_cpu']:.2f})"
        f", other jobs {r['other_jobs_cpu_share']} (dry run "
        f"{r['other_jobs_cpu_share_dry_run']}; cores planned {r['rates'].get('cores_now')}"
        f", used {r['cores_used']:.2f})", quiet)
    return r


def _inputs(work: Path, run_dir: Path, cfg: WidthConfig, quiet: bool) -> dict:
    """Models, tokens and both stores (kept from an earlier run in --workdir); returns
    the extract seconds per model ({} when reused)."""
    stores = run_dir / "stores"
    if all((stores / f"{label}.h5").exists() for label in (REF, OTHER)):
        log(f"reusing the stores in {stores}", quiet)
        return {}
    t0 = time.perf_counter()
    models = build_models(work, cfg)
    build_tokens(run_dir, cfg)
    log(f"models and {cfg.tokens:,} tokens in {time.perf_counter() - t0:.1f} s", quiet)
    seconds = build_stores(run_dir, models, cfg, quiet)
    for m in models:
        shutil.rmtree(m, ignore_errors=True)  # the weights are no longer needed
    return seconds


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --------------------------------------------------------------------------- figures

def _row(figure, value, baseline=None, ratio=None, goal=None, met=None, unit=""):
    return {"figure": figure, "value": value, "baseline": baseline, "ratio": ratio,
            "goal": goal, "met": met, "unit": unit}


def figures(doc: dict) -> list:
    """Rows of the suite's table, per budget: peak RSS, rate, plan, accuracy."""
    s = doc["shape"]
    rows = []
    for r in doc["runs"].values():
        panels, prec = r["plan"]["panels"], r["precision"]
        tag = (f"{s['layers']} x {s['d_mlp']}, {s['n_tokens']:,} tokens, {prec}, --memory "
               f"{r['memory_bytes'] / 1e9:.3g}GB ({panels} panel{'s' if panels > 1 else ''})")
        goal = GOALS["rate_bf16"] if prec == "bf16" else \
            GOALS["rate_panel"] if panels > 1 else GOALS["rate_nopanel"]
        rows.append(_row(f"width {tag}: peak RSS / --memory", r["peak_rss_bytes"] / 1e9,
                         r["memory_bytes"] / 1e9, r["peak_rss_fraction_of_memory"], "<= 1",
                         r["peak_rss_fraction_of_memory"] <= GOALS["rss"], "GB"))
        rows.append(_row(f"width {tag}: useful GFLOP per CPU-s / torch.matmul "
                         f"{prec} per CPU-s (same shapes)",
                         r["flops_per_cpu_s"] / 1e9, r["matmul_flops_per_cpu_s"] / 1e9,
                         r["fraction_per_cpu_s"], f">= {goal}",
                         r["fraction_per_cpu_s"] >= goal, "GFLOP/s"))
        for key, what, exp, act in (
                ("plan_over_actual", "time", "expected_seconds", "seconds"),
                ("plan_over_actual_cpu", "CPU time", "expected_cpu_seconds", "cpu_seconds")):
            p = r[key]
            load = _load_note(r) if key == "plan_over_actual" else ""
            rows.append(_row(f"width {tag}: plan-predicted {what} / actual{load}",
                             r[exp]["total"], r[act], p,
                             f"{GOALS['plan_lo']}-{GOALS['plan_hi']}",
                             GOALS["plan_lo"] <= p <= GOALS["plan_hi"], "s"))
        rows.append(_row(f"width {tag}: work-dir disk peak / plan",
                         r["work_disk_peak_bytes"] / 1e9, r["plan"]["work_disk_bytes"] / 1e9,
                         r["work_disk_peak_bytes"] / max(1, r["plan"]["work_disk_bytes"]),
                         "<= 1", r["work_disk_peak_bytes"] <= r["plan"]["work_disk_bytes"],
                         "GB"))
        n = doc["config"]["rows"]
        for key, what in (("row_max_error", "row max"), ("baseline_error", "baseline row max")):
            goal = GOALS["bf16_error"] if prec == "bf16" else GOALS[key]
            rows.append(_row(f"width {tag}: max |{what} - float64| ({n} rows)", r[key], None,
                             None, f"<= {goal:g}", r[key] <= goal))
    return rows


def _load_note(r: dict) -> str:
    """' (other jobs 5% of the CPUs in the dry run, 43% in the reduce)' where known."""
    dry, run = r.get("other_jobs_cpu_share_dry_run"), r.get("other_jobs_cpu_share")
    if dry is None or run is None:
        return ""
    return f" (other jobs {100 * dry:.0f}% of the CPUs in the dry run, {100 * run:.0f}% in " \
           "the reduce)"


def format_table(rows: list) -> str:
    from ooc_universal.bench.suite import format_table as suite_table
    return suite_table([dict(r, part="width") for r in rows])


# --------------------------------------------------------------------------- CLI

def config_from_args(a) -> WidthConfig:
    preset = "tiny" if a.tiny else "quick" if a.quick else "default"
    cfg = replace(WidthConfig(), **PRESETS[preset])
    over = {k: v for k, v in dict(tokens=a.tokens, draws=a.draws, rows=a.rows,
                                  precision=a.precision).items() if v is not None}
    if a.budgets:
        over["budgets"] = tuple(b.strip() for b in a.budgets.split(",") if b.strip())
    if a.no_bf16:
        over["bf16"] = False
    if a.scale and a.scale != 1:
        over["tokens"] = max(cfg.window, int(over.get("tokens", cfg.tokens) * a.scale))
    return replace(cfg, **over)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller shape (4 x 1024)")
    ap.add_argument("--tiny", action="store_true", help="the smallest run (tests)")
    ap.add_argument("--tokens", type=int, default=None, help="valid token positions (8192)")
    ap.add_argument("--scale", type=float, default=None, help="multiply the token count")
    ap.add_argument("--budgets", default=None,
                    help="comma-separated --memory budgets (16GB,4GB; 'auto': planner's)")
    ap.add_argument("--draws", type=int, default=None, help="baseline draws (1)")
    ap.add_argument("--rows", type=int, default=None, help="rows of the float64 check (256)")
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp64"])
    ap.add_argument("--no-bf16", action="store_true",
                    help="skip the bf16 reduce at the first budget")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu"],
                    help="the width bench runs on the CPU (the workstation case)")
    ap.add_argument("--workdir", default=None, help="keep the models and stores here")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="progress lines on stderr (--no-progress: none)")
    # the earlier spelling of --no-progress, kept so old command lines still run
    ap.add_argument("--quiet", dest="progress", action="store_false", help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap


def run(argv=None) -> dict:
    """Measure; return the result document (progress on stderr unless --no-progress)."""
    a = build_parser().parse_args(argv)
    return run_bench(config_from_args(a), quiet=not a.progress, workdir=a.workdir)


def main(argv=None) -> dict | None:
    a = build_parser().parse_args(argv)
    if a.child:
        print(json.dumps(child_reduce(json.loads(Path(a.child).read_text())),
                         default=_json_default))
        return None
    doc = run_bench(config_from_args(a), quiet=not a.progress, workdir=a.workdir)
    text = json.dumps(doc, indent=1, default=_json_default)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    if a.progress:
        print(format_table(doc["figures"]), file=sys.stderr)
    return doc


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o) if not isinstance(o, float) or math.isfinite(o) else None


if __name__ == "__main__":
    main()
