"""The benchmark suite behind `ooc-universal bench`: every part in one run, one JSON
document and one Markdown table.

Parts (each a script beside this file, called in this process through its run(argv)):
  kernels  co-moment block kernel GFLOP/s against torch.matmul on the same shapes and
           dtype (fp32, bf16); tile max/argmax bytes/s against a plain memory copy
  reduce   end to end on fp16 HDF5 stores: useful FLOP/s over the GEMM peak, peak RSS
           against --memory, speed-up over (a) the original authors' streaming method,
           (b) dask.array, (c) numpy.corrcoef and the agreement of their row maxima with
           ours; scaling (tokens x2, x4, neurons x2, memory halved); (c) runs when both
           stores fit a quarter of RAM in float64 (else it is reported as skipped)
  extract  tokens/s against a bare forward pass of the same model
  ablate   ablated passes/s against plain and naive hooked forward passes
  width    (only when named: --only width) the reduce at the paper's width on random
           GPT-2-small-shaped models at two budgets: peak RSS against --memory, useful
           FLOPs per CPU-second against torch.matmul's, the plan's time against the
           measured, row max and baseline against float64 (bench_width.py)
and a projection of the paper's full experiment on this device from the measured rates
and a stated disk bandwidth. Every figure is a ratio against a baseline measured in the
same run on the same data; goals are printed beside the figures, never asserted.

Results: OUT/<machine>.json (all parts' documents, machine, toolkit version, timestamp,
the table's rows, the projection) and OUT/<machine>.md (the table); a run of other parts
than the default ones is named <machine>-<parts> (e.g. cpu-2c-xeon-width).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ooc_universal.errors import OocError, UsageError

PARTS = ("kernels", "reduce", "extract", "ablate")  # what a plain `bench` runs
EXTRA_PARTS = ("width",)                          # run only when named (long)
SIZES = ("tiny", "quick", "default")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# Goals from issue 8 that are not already in bench_reduce.GOALS (printed, never asserted).
GOALS = {"kernel_vs_matmul": 0.9, "extract_vs_forward": 0.9}

# The paper's full experiment (design.md, "What it is for").
PAPER = dict(models=5, checkpoints=3, n_tokens=5_000_000, n_layers=12, d_mlp=3072,
             d_model=768, window=512, cross_pairs=12, extracts=15, baseline_draws=1)

# Script arguments per size; "default" is each script's own default (the sizes).
ARGS = {
    "kernels": {
        "tiny": ["--n", "512", "--na", "128", "--nb", "128", "--tile-rows", "256",
                 "--tile-cols", "256", "--repeats", "2", "--baseline-rows", "128",
                 "--baseline-d", "64"],
        "quick": ["--n", "2048", "--na", "1024", "--nb", "1024", "--tile-rows", "2048",
                  "--tile-cols", "2048", "--repeats", "3", "--baseline-rows", "1024",
                  "--baseline-d", "512"],
        "default": [],
    },
    "reduce": {"tiny": ["--tiny"], "quick": ["--quick"], "default": []},
    "extract": {
        "tiny": ["--layers", "1", "--d-model", "32", "--heads", "2", "--window", "64",
                 "--windows", "8", "--repeats", "1"],
        "quick": ["--layers", "2", "--d-model", "128", "--heads", "2", "--window", "128",
                  "--windows", "32", "--repeats", "1"],
        "default": [],  # 4 layers, d_model 256, 64 windows of 256, best of 2
    },
    "ablate": {
        "tiny": ["--layers", "2", "--d-model", "32", "--window", "32", "--batch", "2",
                 "--batches", "1", "--draws", "1"],
        "quick": ["--batches", "2"],
        "default": [],
    },
    "width": {"tiny": ["--tiny"], "quick": ["--quick"], "default": []},
}
EXTRACT_WINDOWS = {"tiny": 8, "quick": 32, "default": 64}


@dataclass
class SuiteConfig:
    parts: tuple = PARTS          # which parts run, in this order
    size: str = "default"         # tiny | quick | default
    scale: float = 1.0            # multiplies the token counts of reduce and extract
    device: str = "cpu"           # cpu | cuda (resolved: devices.device_name)
    memory: str = "2GB"           # budget given to reduce and extract
    disk_gbps: float = 2.0        # disk bandwidth (GB/s) assumed by the projection
    paper_memory: str | None = None  # reduce budget in the projection [RAM or GPU memory]
    threads: int | None = None    # torch threads for extract and ablate [torch default]
    machine: str | None = None    # result file name [machine_slug()]
    argv: list = field(default_factory=list)  # the command line, for the record


def log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- inputs

def parse_parts(text: str | None) -> tuple:
    """'reduce,kernels' -> ('kernels', 'reduce') (always in suite order)."""
    if not text:
        return PARTS
    known = PARTS + EXTRA_PARTS
    want = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in want if p not in known]
    if bad or not want:
        raise UsageError(f"unknown part(s) {', '.join(bad) or repr(text)}; "
                         f"choose from {','.join(known)}")
    return tuple(p for p in known if p in want)


def default_out_dir() -> Path:
    """bench/results/ of the source checkout; ./bench-results for a non-editable install."""
    here = Path(__file__).resolve().parent
    if (here.parent / "setup.cfg").exists():
        return here / "results"
    return Path("bench-results")


def default_readme() -> Path:
    return Path(__file__).resolve().parents[1] / "README.md"


# --------------------------------------------------------------------------- machine

def _words(text: str, drop: set, limit: int) -> list:
    t = re.sub(r"\((r|tm)\)", " ", text.lower())
    t = re.sub(r"@.*$", "", t)                       # clock speed
    t = re.sub(r"\b\d+-core\b", " ", t)
    words = [w for w in re.split(r"[^a-z0-9]+", t) if w and w not in drop]
    return words[:limit]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_slug(device: str, cpu: str, cores: int, gpu: str | None = None) -> str:
    """'cpu-2c-xeon-8488c', 'cuda-h100-80gb-16c-xeon-8480': device, cores, CPU model."""
    cpu_drop = {"intel", "amd", "apple", "genuine", "processor", "cpu", "core", "with",
                "radeon", "graphics", "platinum", "gold", "silver", "bronze", "r", "tm"}
    slug = f"{cores}c-" + ("-".join(_words(cpu, cpu_drop, 3)) or platform.machine().lower())
    if device == "cuda":
        gpu_words = _words(gpu or "gpu", {"nvidia", "geforce", "tesla"}, 2)
        slug = f"{'-'.join(gpu_words) or 'gpu'}-{slug}"
    return f"{device}-{slug}"


def machine_info(device: str) -> dict:
    import torch

    from ooc_universal import __version__
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "device": device,
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "toolkit_version": __version__}
    if _ram_bytes():
        info["ram_bytes"] = _ram_bytes()
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = p.name
        info["gpu_memory_bytes"] = p.total_memory
    info["slug"] = machine_slug(device, info["cpu"], info["cores"], info.get("gpu"))
    return info


def _cpu_busy_seconds():
    """(all CPUs' busy seconds from /proc/stat, this process's and its children's CPU
    seconds), so other jobs' share of the machine can be told from the bench's own."""
    import resource
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz   # less idle and iowait
    except (OSError, ValueError, IndexError):
        return None
    own = sum(getattr(resource.getrusage(who), k) for who in
              (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for k in ("ru_utime", "ru_stime"))
    return busy, own


def _other_jobs_share(start, end, wall_s: float, cores: int):
    """Share of the machine's CPU time taken by other processes during the run."""
    if not start or not end or wall_s <= 0:
        return None
    other = (end[0] - start[0]) - (end[1] - start[1])
    return round(max(0.0, other) / (wall_s * max(1, cores)), 3)


def _load_average():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------- parts

def part_argv(part: str, cfg: SuiteConfig) -> list:
    """The argument list this suite hands the part's script."""
    argv = list(ARGS[part][cfg.size])
    threads = str(cfg.threads or _torch_threads())
    device = script_device(cfg.device)
    if part == "kernels":
        argv += ["--device", device]
    elif part == "reduce":
        argv += ["--device", device, "--memory", cfg.memory]
        ram = _ram_bytes()
        if ram:  # (c) holds both stores in float64: let it run where a quarter of RAM holds them
            argv += ["--corrcoef-limit", f"{max(ram // 4, 2 * 10**9)}B"]
        if cfg.scale != 1:
            argv += ["--scale", repr(cfg.scale)]
    elif part == "extract":
        argv += ["--device", device, "--memory", cfg.memory, "--threads", threads]
        if cfg.scale != 1:
            windows = max(1, round(EXTRACT_WINDOWS[cfg.size] * cfg.scale))
            argv = _set(argv, "--windows", str(windows))
    elif part == "ablate":
        argv += ["--device", device, "--threads", threads]
    elif part == "width" and cfg.scale != 1:  # CPU only: the workstation case
        argv += ["--scale", repr(cfg.scale)]
    return argv


def script_device(device: str) -> str:
    """The part scripts take auto | cpu | cuda; a cuda:N of the suite is made torch's
    current device (select_cuda_device) and handed on as "cuda"."""
    return "cuda" if str(device).startswith("cuda") else str(device)


def select_cuda_device(device: str) -> None:
    """cuda:N -> torch's current CUDA device N, so that every part's "cuda" is GPU N."""
    kind, _, index = str(device).partition(":")
    if kind == "cuda" and index:
        import torch
        torch.cuda.set_device(int(index))


def _set(argv: list, flag: str, value: str) -> list:
    if flag in argv:
        i = argv.index(flag)
        return argv[:i + 1] + [value] + argv[i + 2:]
    return argv + [flag, value]


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def run_part(part: str, argv: list, progress: bool = True) -> dict:
    """One script's run(argv) in this process; torch/numba thread counts are restored."""
    import importlib

    import numba
    import torch
    mod = importlib.import_module(f"ooc_universal.bench.bench_{part}")
    if part in ("reduce", "width") and not progress:
        argv = argv + ["--no-progress"]
    threads, nthreads = torch.get_num_threads(), numba.get_num_threads()
    try:
        return mod.run(argv)
    finally:
        torch.set_num_threads(threads)
        numba.set_num_threads(nthreads)


def _result_name(slug: str, parts: tuple) -> str:
    """<machine> for the default parts, <machine>-<parts> otherwise: a run of some parts
    (say --only width) never overwrites the whole suite's results."""
    return slug if tuple(parts) == PARTS else f"{slug}-{'-'.join(parts)}"


def run_suite(cfg: SuiteConfig, progress: bool = True) -> dict:
    """Run the chosen parts; return the suite document (see the module docstring).
    progress=False: no progress lines on stderr."""
    quiet = not progress
    select_cuda_device(cfg.device)
    from ooc_universal import __version__
    t_start = time.perf_counter()
    info = machine_info(cfg.device)
    slug = cfg.machine or _result_name(info["slug"], cfg.parts)
    doc = {"bench": "suite", "toolkit_version": __version__,
           "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": dict(info, name=slug, load_average_start=_load_average()),
           "config": asdict(cfg), "parts": {}, "part_argv": {}, "part_wall_s": {}}
    cpu_start, t_cpu = _cpu_busy_seconds(), time.perf_counter()
    for part in cfg.parts:
        argv = part_argv(part, cfg)
        log(f"{part}: bench_{part} {' '.join(argv)}", quiet)
        t0 = time.perf_counter()
        doc["parts"][part] = run_part(part, argv, progress)
        doc["part_argv"][part] = argv
        doc["part_wall_s"][part] = time.perf_counter() - t0
        log(f"{part}: done in {doc['part_wall_s'][part]:.1f} s", quiet)
    doc["machine"]["load_average_end"] = _load_average()
    doc["machine"]["other_jobs_cpu_share"] = _other_jobs_share(
        cpu_start, _cpu_busy_seconds(), time.perf_counter() - t_cpu, info.get("cores") or 1)
    doc["figures"] = figures(doc)
    doc["projection"] = projection(doc, cfg)
    doc["wall_s"] = time.perf_counter() - t_start
    return doc


# --------------------------------------------------------------------------- figures

def _row(part, figure, value, baseline=None, ratio=None, goal=None, met=None, unit=""):
    return {"part": part, "figure": figure, "value": value, "baseline": baseline,
            "ratio": ratio, "goal": goal, "met": met, "unit": unit}


def kernel_figures(k: dict) -> list:
    rows = []
    goal = GOALS["kernel_vs_matmul"]
    for prec in ("fp32", "bf16"):
        mine = {r["kernel"]: r for r in k["comoment"] if r["precision"] == prec}
        mm, upd = mine["matmul"], mine.get("strips+spare row (the reduce's fold)",
                                          mine["comoment_update_+workspace"])
        rows.append(_row("kernels", f"{prec} co-moment block kernel / torch.matmul "
                         f"({k['args']['n']} x {k['args']['na']} x {k['args']['nb']})",
                         upd["gflops"], mm["gflops"], upd["ratio_to_matmul"], f">= {goal}",
                         upd["ratio_to_matmul"] >= goal, "GFLOP/s"))
    tiles = [r for r in k["tile_max"] if "kernel" in r]
    copy = tiles[0]  # the memory copy comes first
    kern = next(r for r in tiles if r["kernel"] in ("tile_max (numba)",
                                                     "tile_max (torch, cuda)"))
    shape = next(r["shape"] for r in k["tile_max"] if "shape" in r)
    rows.append(_row("kernels", f"{kern['kernel']} max/argmax / {copy['kernel']} copy "
                     f"({shape[0]} x {shape[1]} f32)", kern["gbytes_per_s"],
                     copy["gbytes_per_s"], kern["ratio_to_copy"], None, None, "GB/s"))
    acc = k["accuracy"]
    for prec in ("fp32", "bf16"):
        rows.append(_row("kernels", f"{prec} max |rho - float64 rho|, blocks of 512",
                         acc[f"{prec}_max_abs_err_blocks_of_512"]))
    if "baseline" in k:
        b = k["baseline"]
        rows_, layers, d = b["shape"]
        rows.append(_row("kernels", f"fp32 baseline max |row max - float64 baseline| "
                         f"(same C, {rows_} rows x {layers} layers of {d})",
                         b["fp32_max_abs_diff_from_float64"], None, None, "<= 1e-06",
                         b["fp32_max_abs_diff_from_float64"] <= 1e-6))
        rows.append(_row("kernels", "fp32 baseline speed-up over the float64 one",
                         b["seconds"]["fp32 (rotation_baseline_scaled)"],
                         b["seconds"]["float64 (rotation_baseline)"],
                         b["speedup_fp32_over_float64"], None, None, "s"))
    return rows


def extract_figures(e: dict) -> list:
    goal = GOALS["extract_vs_forward"]
    m = e["model"]
    f = e["fraction_of_forward"]
    return [
        _row("extract", f"extract tokens/s / bare forward pass ({m['layers']} layers, "
             f"d_model {m['d_model']})", e["extract_tokens_per_s"],
             e["forward_tokens_per_s"], f, f">= {goal}", f >= goal, "tok/s"),
        _row("extract", "extract tokens per CPU-second / bare forward pass",
             e["extract_tokens_per_cpu_s"], e["forward_tokens_per_cpu_s"],
             e["fraction_of_forward_cpu"], f">= {goal}", e["fraction_of_forward_cpu"] >= goal,
             "tok/s"),
        _row("extract", "extract peak RSS / --memory", e["peak_rss_bytes"] / 1e9,
             e["memory_bytes"] / 1e9, e["peak_rss_fraction_of_memory"], "<= 1",
             e["peak_rss_fraction_of_memory"] <= 1, "GB"),
    ]


def ablate_figures(a: dict) -> list:
    return [
        _row("ablate", "toolkit ablated passes/s / naive (one hooked forward per set)",
             a["toolkit_ablated_passes_per_s"], a["naive_ablated_passes_per_s"],
             a["toolkit_over_naive"], None, None, "passes/s"),
        _row("ablate", "toolkit ablated passes/s / plain forward passes/s",
             a["toolkit_ablated_passes_per_s"], a["plain_passes_per_s"],
             a["toolkit_over_plain"], None, None, "passes/s"),
    ]


def figures(doc: dict) -> list:
    """Rows of the table: part | figure | value | baseline | ratio | goal | met."""
    p = doc["parts"]
    rows = []
    if "kernels" in p:
        rows += kernel_figures(p["kernels"])
    if "reduce" in p:
        rows += [dict(r, part="reduce") for r in p["reduce"]["figures"]]
    if "extract" in p:
        rows += extract_figures(p["extract"])
    if "ablate" in p:
        rows += ablate_figures(p["ablate"])
    if "width" in p:
        rows += [dict(r, part="width") for r in p["width"]["figures"]]
    return rows


# --------------------------------------------------------------------------- projection

def forward_flops_per_token(layers: int, d_model: int, window: int) -> float:
    """2 N + 2 L n_ctx d (Kaplan et al. 2020), N = 12 L d^2 non-embedding parameters."""
    return 2.0 * 12 * layers * d_model ** 2 + 2.0 * layers * window * d_model


def _paper_memory(cfg: SuiteConfig, info: dict) -> int:
    from ooc_universal.plan import parse_bytes
    if cfg.paper_memory:
        return parse_bytes(cfg.paper_memory)
    if cfg.device == "cuda" and info.get("gpu_memory_bytes"):
        return int(info["gpu_memory_bytes"] * 0.9)
    return int(info.get("ram_bytes", 16e9) * 0.8)


def projection(doc: dict, cfg: SuiteConfig) -> dict:
    """Wall time of the paper's experiment on this device: per stage max(compute, disk),
    compute from the rates measured in this run, disk at --disk-gbps."""
    from ooc_universal.plan import PairShape, make_plan
    from ooc_universal.formats.store import default_block_tokens
    P = PAPER
    n, nn = P["n_tokens"], P["n_layers"] * P["d_mlp"]
    bw = cfg.disk_gbps * 1e9
    store_bytes = n * nn * 2
    out = {"paper": P, "disk_gbps": cfg.disk_gbps, "device": cfg.device, "stages": {},
           "notes": []}
    parts = doc["parts"]
    if "extract" in parts:
        e = parts["extract"]
        f_bench = forward_flops_per_token(e["model"]["layers"], e["model"]["d_model"],
                                          e["model"]["window"])
        f_paper = forward_flops_per_token(P["n_layers"], P["d_model"], P["window"])
        rate = e["extract_tokens_per_s"] * f_bench / f_paper  # GPT-2 small tokens/s
        compute = P["extracts"] * n / rate
        disk = P["extracts"] * store_bytes / bw
        out["stages"]["extract"] = {
            "work": f"{P['extracts']} stores of {n:,} tokens x {nn:,} neurons "
                    f"({P['extracts'] * store_bytes / 1e12:.1f} TB written)",
            "measured": f"{e['extract_tokens_per_s']:,.0f} tok/s at "
                        f"{f_bench / 1e6:.2f} MFLOP/token -> {rate:,.0f} tok/s for GPT-2 small",
            "compute_s": compute, "disk_s": disk, "seconds": max(compute, disk)}
        out["notes"].append("extract: tokens/s scaled by forward FLOPs per token "
                            "(2N + 2 L n_ctx d) from the bench model to GPT-2 small")
    else:
        out["notes"].append("extract: not measured in this run (--only)")
    if "reduce" in parts:
        r = parts["reduce"]
        memory = _paper_memory(cfg, doc["machine"])
        pairs = [PairShape(f"m{i}", nn, P["d_mlp"]) for i in range(P["models"] - 1)]
        per_ckpt = P["cross_pairs"] // P["checkpoints"]
        pairs = pairs[:per_ckpt]
        for prec in ("fp32", "bf16"):
            key = f"reduce_{prec}"
            try:
                plan = make_plan(n, nn, pairs, memory=memory, device=cfg.device,
                                 precision=prec, store_chunk_rows=default_block_tokens(n, nn),
                                 baseline_draws=P["baseline_draws"])
            except Exception as exc:  # noqa: BLE001 (a budget too small: say so, go on)
                out["stages"][key] = {"error": str(exc)}
                continue
            flops = plan.flops * P["checkpoints"]
            bytes_read = plan.bytes_read * P["checkpoints"]
            rate = r["ours"][prec]["useful_flops_per_s"]
            compute, disk = flops / rate, bytes_read / bw
            out["stages"][key] = {
                "work": f"{P['cross_pairs']} pairs, {flops:.2e} FLOP, "
                        f"{bytes_read / 1e12:.1f} TB read ({len(plan.panels)} panel(s), "
                        f"{len(plan.groups)} pass(es) per checkpoint at "
                        f"{memory / 1e9:.0f} GB)",
                "measured": f"{rate / 1e9:,.1f} useful GFLOP/s ({prec})",
                "compute_s": compute, "disk_s": disk, "seconds": max(compute, disk),
                "memory_bytes": memory, "panels": len(plan.panels),
                "groups": len(plan.groups), "flops": flops, "bytes_read": bytes_read}
        out["notes"].append("reduce: the useful FLOP/s measured at the bench's shapes; "
                            "larger GEMMs usually run closer to peak, so this errs long")
    else:
        out["notes"].append("reduce: not measured in this run (--only)")
    ex = out["stages"].get("extract", {}).get("seconds")
    for prec in ("fp32", "bf16"):
        red = out["stages"].get(f"reduce_{prec}", {}).get("seconds")
        if ex is not None and red is not None:
            out[f"total_{prec}_s"] = ex + red
    out["notes"].append("each stage takes max(compute, disk): reads and writes overlap "
                        "compute; universal, persistence and ablate (minutes) are left out")
    return out


# --------------------------------------------------------------------------- output

def _num(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e5):
        return f"{v:.2e}"
    return f"{v:.3g}"


def _hms(secs: float) -> str:
    from ooc_universal.plan import _hms as hms
    return hms(secs)


def format_table(rows: list) -> str:
    lines = ["| part | figure | value | baseline | ratio | goal | met |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        numeric = r.get("value") is not None and not isinstance(r["value"], str)
        u = f" {r['unit']}" if r.get("unit") and numeric else ""
        ub = f" {r['unit']}" if r.get("unit") and r.get("baseline") is not None else ""
        met = "" if r.get("met") is None else ("met" if r["met"] else "missed")
        fig = r["figure"].replace("|", "\\|")
        lines.append(f"| {r['part']} | {fig} | {_num(r['value'])}{u} | "
                     f"{_num(r['baseline'])}{ub} | {_num(r['ratio'])} | {r['goal'] or ''} | "
                     f"{met} |")
    return "\n".join(lines)


def format_projection(proj: dict) -> str:
    P = proj["paper"]
    lines = [f"Projected wall time of the paper's full experiment on this device "
             f"({proj['device']}): {P['models']} models x {P['checkpoints']} checkpoints x "
             f"{P['n_tokens']:,} tokens x {P['n_layers'] * P['d_mlp']:,} neurons; "
             f"{P['extracts']} extracts, {P['cross_pairs']} cross pairs; disk "
             f"{proj['disk_gbps']:g} GB/s (`--disk-gbps`).", ""]
    if proj["stages"]:
        lines += ["| stage | work | measured rate | compute | disk | projected |",
                  "| --- | --- | --- | --- | --- | --- |"]
    for name, s in proj["stages"].items():
        if "error" in s:
            lines.append(f"| {name} | not planned: {s['error']} | | | | |")
            continue
        lines.append(f"| {name} | {s['work']} | {s['measured']} | {_hms(s['compute_s'])} | "
                     f"{_hms(s['disk_s'])} | {_hms(s['seconds'])} |")
    for prec in ("fp32", "bf16"):
        if f"total_{prec}_s" in proj:
            lines.append(f"| **total ({prec} reduce)** | extract + reduce | | | | "
                         f"**{_hms(proj[f'total_{prec}_s'])}** |")
    lines += ([""] if proj["stages"] else []) + [f"- {n}" for n in proj["notes"]]
    return "\n".join(lines)


def format_markdown(doc: dict, heading: str = "#") -> str:
    """The results as Markdown: a provenance line, the table, the projection."""
    m, c = doc["machine"], doc["config"]
    size = {"tiny": "`--tiny` (smallest; figures mean little)",
            "quick": "`--quick` (smoke run; small shapes, figures are indicative only)",
            "default": "default sizes"}[c["size"]]
    scale = f", `--scale {c['scale']:g}`" if c["scale"] != 1 else ""
    device = m.get("gpu", m["cpu"]) if c["device"] == "cuda" else m["cpu"]
    lines = [
        f"{heading} Benchmark: {m['name']}", "",
        f"Measured {doc['timestamp']} with {size}{scale}, device {c['device']} ({device}; "
        f"{m['cores']} CPU cores, torch {m['torch']}, {m['torch_threads']} threads), "
        f"ooc-universal {doc['toolkit_version']}; load average at start "
        f"{_load_text(m.get('load_average_start'))}, at end "
        f"{_load_text(m.get('load_average_end'))}; {doc['wall_s']:.0f} s in all. "
        f"Every ratio is against a baseline measured in the same run on the same data; "
        f"goals are printed, not asserted.", "",
        f"Command: `ooc-universal bench {' '.join(c['argv'])}`".rstrip(), "",
        *[f"{w}\n" for w in warnings_of(doc)],
        format_table(doc["figures"]),
    ]
    if doc["projection"]["stages"]:  # a run of parts that measure a stage's rate
        lines += ["", f"{heading}# Projection", "", format_projection(doc["projection"])]
    return "\n".join(lines) + "\n"


def warnings_of(doc: dict) -> list:
    """Lines that say when the figures are not representative (small run, busy machine)."""
    m, size = doc["machine"], doc["config"]["size"]
    out = []
    if size != "default":
        out.append(f"**Not representative:** a `--{size}` run with small shapes, where fixed "
                   "overheads dominate; run `ooc-universal bench --update-readme` (the "
                   "default sizes) on a quiet machine for figures to rely on.")
    share = m.get("other_jobs_cpu_share")
    if share is not None:   # measured: other processes' CPU time during the run
        if share > 0.1:
            out.append(f"**Busy machine:** other processes took {100 * share:.0f}% of the "
                       f"{m.get('cores')} cores' time during the run: timings and ratios "
                       "are unreliable.")
        return out
    # older results: only the load average (which the bench's own threads raise too)
    loads = [v for v in (m.get("load_average_start"), m.get("load_average_end")) if v]
    busy = max((v[0] for v in loads), default=0.0)
    if busy > 0.5 * (m.get("cores") or 1):
        out.append(f"**Busy machine?** 1-minute load average up to {busy:g} on "
                   f"{m.get('cores')} cores, the bench's own threads included: timings "
                   "and ratios may be unreliable.")
    return out


def _load_text(v) -> str:
    return "n/a" if not v else " / ".join(f"{x:g}" for x in v)


def _json_default(o):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    return str(o)


def write_results(doc: dict, out_dir) -> tuple:
    """OUT/<machine>.json and OUT/<machine>.md; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = doc["machine"]["name"]
    jpath, mpath = out / f"{name}.json", out / f"{name}.md"
    jpath.write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    mpath.write_text(format_markdown(doc))
    return jpath, mpath


def load_results(path) -> dict:
    """A results JSON written by write_results."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise OocError(f"cannot read bench results {path}: {exc}") from None
    if doc.get("bench") != "suite":
        raise OocError(f"{path} is not a results file of `ooc-universal bench` "
                       "(no \"bench\": \"suite\")")
    return doc


def readme_markers(parts) -> tuple:
    """The README markers a run of `parts` writes between: the whole suite's table for the
    default parts, its own block (e.g. `<!-- bench-width:begin -->`) for any other set, so
    that `--only width --update-readme` never overwrites the suite's table."""
    if not parts or tuple(parts) == PARTS:
        return BEGIN, END
    name = "-".join(parts)
    return f"<!-- bench-{name}:begin -->", f"<!-- bench-{name}:end -->"


def update_readme(readme, doc: dict) -> Path:
    """Replace the text between this run's bench markers of `readme` with its tables."""
    path = Path(readme)
    text = path.read_text()
    begin, end = readme_markers(tuple(doc.get("parts") or ()))
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise OocError(f"{path} has no '{begin}' ... '{end}' block; add the two markers "
                       "where the table should go")
    block = format_markdown(doc, heading="###")
    path.write_text(text[:i + len(begin)] + "\n" + block + text[j:])
    return path
