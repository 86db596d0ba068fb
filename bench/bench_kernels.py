"""Kernel benchmark: co-moment GEMM rate vs torch.matmul, tile_max rate vs a memory copy.

(a) comoment_chunk / comoment_update_ / the reduce's strip fold on fp16 blocks (the
    store's dtype) against a bare torch.matmul of the same shapes (row-major operands,
    its fastest layout) in the compute dtype, same run, interleaved repeats, median
    times. FLOPs = 2 n Na Nb for both. Goal: ratio >= 0.9.
(b) tile_max (numba) over an (I, J) float32 co-moment tile against np.copyto of the same
    array; rate = c.nbytes / time for both (the copy also writes, the kernel only reads).
(c) accuracy: max |rho - rho_fp64| of one block for fp32 and bf16 on correlated data.
(d) baseline: the reduce's rotation baseline (rotated scales precomputed, one GEMM per
    strip in fp32: rotation_baseline_scaled) against the float64 one (rotation_baseline)
    on the same co-moments: time of each, max |difference| (the fp32 error), and the
    strip GEMM's rate against torch.matmul of the same shape.

    python bench/bench_kernels.py [--n 4096 --na 2048 --nb 2048] [--device cpu|cuda]
                                  [--out result.json]

Prints one JSON document (also written to --out). On CUDA, (b) times the torch tile_max
against a torch copy_ on the device (numba is CPU only). In-process: run(argv) -> dict.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from ooc_universal.devices import device_name
from ooc_universal.kernels import comoments as cm
from ooc_universal.kernels import tilemax as tm


def _sync(device="cpu"):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict, repeats: int, device="cpu") -> dict:
    """Median seconds of each callable, timed round-robin so drift hits all alike."""
    for f in fns.values():
        f()  # warm-up (allocations, numba compile, oneDNN kernels)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def correlated(n, na, nb, seed=0):
    """fp16 blocks with shared latent factors (so many |rho| are large)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 32, generator=g)
    x = z @ torch.randn(32, na, generator=g) + torch.randn(n, na, generator=g) + 2.0
    y = z @ torch.randn(32, nb, generator=g) + torch.randn(n, nb, generator=g) - 1.0
    return x.half(), y.half()


def bench_comoments(n, na, nb, repeats, device="cpu"):
    x16, y16 = (t.to(device) for t in correlated(n, na, nb))
    flops = 2.0 * n * na * nb
    rows = []
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = x16.to(dt).T.contiguous(), y16.to(dt)  # row-major: matmul's fastest layout
        ws = {}
        acc = cm.empty_comoments(na, nb, dt, device=device)
        fns = {
            "matmul": lambda: torch.matmul(a, b),
            "comoment_chunk": lambda: cm.comoment_chunk(x16, y16, dt),
            "comoment_chunk+workspace": lambda: cm.comoment_chunk(x16, y16, dt, workspace=ws),
            "comoment_update_+workspace":
                lambda: cm.comoment_update_(acc, x16, y16, dt, workspace=ws),
            "strips+spare row (the reduce's fold)":
                lambda: fold_in_strips(acc, x16, y16, dt, ws),
            "centring only (x and y)": lambda: (
                cm.centre_block(x16, dt, workspace=ws, role="x"),
                cm.centre_block(y16, dt, workspace=ws, role="y")),
        }
        t = interleaved(fns, repeats, device)
        for k, s in t.items():
            rows.append({"precision": name, "kernel": k, "median_s": s,
                         "gflops": flops / s / 1e9 if "centring" not in k else None,
                         "ratio_to_matmul": t["matmul"] / s if k != "matmul" else 1.0,
                         "goal": 0.9 if k.startswith("comoment") else None})
    return rows


def fold_in_strips(acc, x16, y16, dt, ws, strips: int = 4):
    """One block as the reduce folds it: x centred once with a spare row, y in
    `strips` column strips (one layer each in the reduce), the Chan term in the GEMM."""
    cx = cm.centre_block(x16, dt, workspace=ws, role="x", spare_row=True)
    xt = cm.transpose_block(cx, ws) if dt == torch.bfloat16 and x16.device.type == "cpu" \
        else None
    w = y16.shape[1] // strips
    mean_y = torch.empty(y16.shape[1], dtype=torch.float64, device=y16.device)
    m2_y = torch.empty_like(mean_y)
    for c0 in range(0, y16.shape[1], w):
        cy = cm.centre_block(y16[:, c0:c0 + w], dt, workspace=ws, role="y", spare_row=True)
        cm.comoment_strip_update_(acc, cx, cy, c0, xt=xt)
        mean_y[c0:c0 + w], m2_y[c0:c0 + w] = cy[0], cy[1]
    cm.comoment_moments_update_(acc, x16.shape[0], cx[0], cx[1], mean_y, m2_y)


def bench_baseline(rows, d, repeats, layers: int = 2):
    """(d): float64 vs the reduce's fp32 baseline on the same C (rows, layers d) and S."""
    from ooc_universal.kernels import rotation as rot
    x16, y16 = correlated(max(2048, 2 * d), rows, layers * d, seed=2)
    st = cm.comoment_chunk(x16, y16, torch.float32)
    s = cm.self_comoment_chunk(y16, d)["s"].numpy()
    c, m2_x = st["c"].numpy(), st["m2_x"].numpy()
    r32 = {l: rot.rotation_matrix(0, l, d).astype(np.float32) for l in range(layers)}
    iv = {l: rot.rotated_scales_fast(s[l], r32[l]) for l in range(layers)}
    scaled = {l: rot.scaled_rotation(torch.from_numpy(r32[l]), iv[l]) for l in range(layers)}
    strip = torch.from_numpy(c[:, :d])
    out = torch.empty(rows, d)
    t = interleaved({
        "float64 (rotation_baseline)": lambda: rot.rotation_baseline(c, m2_x, s, [0], d),
        "fp32 (rotation_baseline_scaled)": lambda: rot.rotation_baseline_scaled(
            c, m2_x, lambda j, l: scaled[l], 1, d),
        "strip GEMM C R'^T": lambda: torch.mm(strip, scaled[0].T, out=out),
        "matmul same shape": lambda: torch.matmul(strip, scaled[0].T)}, repeats)
    f64 = rot.rotation_baseline(c, m2_x, s, [0], d)
    f32 = rot.rotation_baseline_scaled(c, m2_x, lambda j, l: scaled[l], 1, d)
    flops = 2.0 * rows * d * d
    return {"shape": [rows, layers, d], "seconds": t,
            "fp32_max_abs_diff_from_float64": float(np.abs(f32 - f64).max()),
            "max_baseline": float(f64.max()),
            "speedup_fp32_over_float64": t["float64 (rotation_baseline)"]
            / t["fp32 (rotation_baseline_scaled)"],
            "strip_gemm_gflops": flops / t["strip GEMM C R'^T"] / 1e9,
            "strip_gemm_ratio_to_matmul": t["matmul same shape"] / t["strip GEMM C R'^T"]}


def bench_accuracy(n, na, nb, device="cpu"):
    x16, y16 = correlated(min(n, 4096), min(na, 1024), min(nb, 1024), seed=1)
    x16, y16 = x16.to(device), y16.to(device)
    ref = cm.comoment_chunk(x16, y16, torch.float64)
    rho_ref = cm.correlation_from_comoments(ref["c"], ref["m2_x"], ref["m2_y"])
    out = {"shape": list(x16.shape) + [y16.shape[1]],
           "max_abs_rho": float(rho_ref.abs().max())}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        s = cm.comoment_chunk(x16, y16, dt)
        err = (cm.correlation_from_comoments(s["c"], s["m2_x"], s["m2_y"]) - rho_ref).abs()
        out[f"{name}_max_abs_err_one_block"] = float(err.max())
        acc = cm.empty_comoments(x16.shape[1], y16.shape[1], dt, device=device)
        for i in range(0, x16.shape[0], 512):
            cm.comoment_update_(acc, x16[i:i + 512], y16[i:i + 512], dt)
        err = (cm.correlation_from_comoments(acc["c"], acc["m2_x"], acc["m2_y"]) - rho_ref).abs()
        out[f"{name}_max_abs_err_blocks_of_512"] = float(err.max())
    return out


def bench_tile_max(rows, cols, repeats, device="cpu"):
    rng = np.random.default_rng(0)
    c = rng.standard_normal((rows, cols)).astype(np.float32)
    m2x, m2y = rng.uniform(0.5, 2, rows), rng.uniform(0.5, 2, cols)
    dst = np.empty_like(c)
    ct, xt, yt = torch.from_numpy(c), torch.from_numpy(m2x), torch.from_numpy(m2y)
    if str(device).startswith("cuda"):  # the reduce's device path: torch kernels on the GPU
        ct, xt, yt = ct.to(device), xt.to(device), yt.to(device)
        dt_ = torch.empty_like(ct)
        fns = {"copy_ (torch, cuda)": lambda: dt_.copy_(ct),
               "tile_max (torch, cuda)": lambda: tm.tile_max(ct, xt, yt)}
    else:
        fns = {"np.copyto": lambda: np.copyto(dst, c),
               "tile_max (numba)": lambda: tm.tile_max(c, m2x, m2y),
               "tile_max (torch, cpu)": lambda: tm.tile_max(ct, xt, yt)}
    t = interleaved(fns, repeats, device)
    copy = next(iter(t))  # the first entry is the memory copy
    return [{"kernel": k, "median_s": s, "gbytes_per_s": c.nbytes / s / 1e9,
             "ratio_to_copy": t[copy] / s,
             "goal": None} for k, s in t.items()] + [{"shape": [rows, cols], "dtype": "float32"}]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="tokens per block")
    p.add_argument("--na", type=int, default=2048, help="neurons of the reference tile")
    p.add_argument("--nb", type=int, default=2048, help="neurons of the other model")
    p.add_argument("--tile-rows", type=int, default=4096, help="tile_max tile rows")
    p.add_argument("--tile-cols", type=int, default=4096, help="tile_max tile columns")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    p.add_argument("--baseline-rows", type=int, default=2048,
                   help="(d) reference rows of the baseline comparison")
    p.add_argument("--baseline-d", type=int, default=1024,
                   help="(d) neurons per layer of the baseline comparison (3072: GPT-2)")
    p.add_argument("--threads", type=int, default=None, help="torch and numba threads")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                   help="where the kernels run (auto: cuda when available)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p


def run(argv=None) -> dict:
    """Measure; return the result document (nothing printed)."""
    args = build_parser().parse_args(argv)
    args.device = device_name(args.device)  # auto -> cuda when torch sees a GPU, else cpu
    if args.threads:
        import numba
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    import numba
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "numba_threads": numba.get_num_threads()},
        "args": vars(args),
        "device": args.device,
        "comoment": bench_comoments(args.n, args.na, args.nb, args.repeats, args.device),
        "tile_max": bench_tile_max(args.tile_rows, args.tile_cols, args.repeats, args.device),
        "accuracy": bench_accuracy(args.n, args.na, args.nb, args.device),
        "baseline": bench_baseline(args.baseline_rows, args.baseline_d, args.repeats),
    }
    result["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    return result


def main(argv=None):
    result = run(argv)
    args = argparse.Namespace(**result["args"])
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    for r in result["comoment"]:
        if r["kernel"].startswith("comoment"):
            print(f"# {r['precision']} {r['kernel']}: {r['gflops']:.0f} GFLOP/s, "
                  f"{r['ratio_to_matmul']:.2f} of matmul (goal >= 0.9)")
    for r in result["tile_max"][:-1]:
        print(f"# {r['kernel']}: {r['gbytes_per_s']:.1f} GB/s, {r['ratio_to_copy']:.2f} of copy")


if __name__ == "__main__":
    main()
