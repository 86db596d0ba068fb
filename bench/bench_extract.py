"""Extract throughput vs a bare forward pass of the same model, and peak RSS vs --memory.

    python bench/bench_extract.py [--out FILE] [--layers 4 --d-model 256 --windows 160 ...]
                                  [--device cpu|cuda]

Builds a GPT-2 model with the stanford-crfm flags (random weights, byte vocabulary) and a
byte token set in a temporary run directory, then alternates, each in a fresh process:
  forward   model.transformer on the same batches (same batch size, same windows), no
            hooks, no writes: the ceiling;
  extract   ooc_universal.steps.extract.extract with --memory (hooks, fp16 gather, block
            writes + fsync, ledger, the running top-k per neuron: --topk, default the
            config's 20);
each `--repeats` times, and reports the best valid tokens/s of each, their ratio,
extract's peak RSS against --memory, and where extract's time went (its own stats: the
hooked forward passes, gathering rows into blocks, waiting for the writer thread, and
the writer's wall and CPU seconds of hashing, writing and folding the top-k, which
overlap the forwards). On a shared machine, the per-CPU-second fraction is the robust one.
JSON to stdout (or --out). Default run under a minute. On a shared machine, compare
runs only with the machine idle (the JSON records the load average).
In-process: run(argv) -> dict (the children are still separate processes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_model(path: Path, layers: int, d_model: int, heads: int, window: int, seed: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=257, n_positions=window, n_embd=d_model, n_layer=layers,
                     n_head=heads, n_inner=4 * d_model, activation_function="gelu_new",
                     scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True,
                     bos_token_id=256, eos_token_id=256)
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)


def build_tokens(run_dir: Path, n_windows: int, window: int, seed: int) -> None:
    """A byte token set from this repository's Python source (newlines are invalid rows)."""
    from ooc_universal.formats.tokens import save_token_set
    from ooc_universal.steps.tokens import build_token_set
    src = Path(__file__).resolve().parents[1]
    text = "".join(p.read_text(errors="replace") for p in sorted(src.rglob("*.py")))
    while len(text.encode()) < n_windows * window * 2:
        text += text
    n_tokens = int(n_windows * (window - 1) * 0.9)
    del seed  # the text is fixed
    src_file = run_dir.parent / "source.txt"
    src_file.write_text(text)
    ts = build_token_set(src_file, n_tokens, tokenizer="bytes", window=window)
    save_token_set(ts, run_dir)


def child_forward(run_dir: str, model_dir: str, batch: int, threads: int,
                  device: str = "cpu") -> dict:
    """The ceiling: model.transformer on the same batches, no hooks, no writes."""
    import numpy as np
    import torch
    from ooc_universal import models
    from ooc_universal.formats.tokens import load_token_set
    torch.set_num_threads(threads)
    ts = load_token_set(run_dir)
    loaded = models.load_model(model_dir, device, torch.float32)
    base = models.base_model(loaded.model)
    n_windows = ts.input_ids.shape[0]
    cuda = device.startswith("cuda")
    if cuda:  # warm-up (context, kernels), as extract's first batch pays it too
        with torch.inference_mode():
            base(input_ids=torch.from_numpy(np.ascontiguousarray(ts.input_ids[:batch]))
                 .long().to(device), use_cache=False)
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for w0 in range(0, n_windows, batch):
            ids = torch.from_numpy(np.ascontiguousarray(ts.input_ids[w0:w0 + batch])).long()
            base(input_ids=ids.to(device), use_cache=False)
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": int(ts.n_tokens),
            "tokens_per_s": ts.n_tokens / seconds,
            "tokens_per_cpu_s": ts.n_tokens / cpu_seconds}


def child_extract(run_dir: str, model_dir: str, memory: str, threads: int,
                  device: str = "cpu", topk: int = -1) -> dict:
    import torch
    from ooc_universal.config import ComputeConfig, ExtractConfig
    from ooc_universal.steps.extract import extract
    torch.set_num_threads(threads)
    stores = Path(run_dir) / "stores"
    shutil.rmtree(stores, ignore_errors=True)
    stats = {}
    settings = ExtractConfig() if topk < 0 else ExtractConfig(topk=topk)
    extract(run_dir, model_dir, settings, ComputeConfig(device=device, memory=memory),
            progress=False, stats=stats)
    out = {k: stats[k] for k in ("seconds", "cpu_seconds", "tokens_written", "tokens_per_s",
                                 "batch_size", "block_tokens", "blocks_total",
                                 "peak_rss_bytes", "memory_bytes", "seconds_forward",
                                 "seconds_copy", "seconds_writer_wait",
                                 "seconds_writer_busy", "cpu_seconds_writer",
                                 "cpu_seconds_topk", "topk")}
    out["tokens_per_cpu_s"] = stats["tokens_written"] / stats["cpu_seconds"]
    return out


def run_child(*args) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:  # the child's own last line says why (e.g. --memory too small)
        lines = out.stderr.strip().splitlines() or ["(no output)"]
        raise SystemExit(f"bench_extract: the {args[0]} child exited {out.returncode}: "
                         f"{lines[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--windows", type=int, default=64, help="windows in the token set")
    ap.add_argument("--memory", default="1GB", help="extract's --memory")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (both sides)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--topk", type=int, default=-1,
                    help="extract's top-k per neuron (0 = none; default: the config's)")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                    help="where both the forward pass and extract run")
    ap.add_argument("--workdir", default=None, help="where the run goes (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write the JSON here too")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> None:
    a = build_parser().parse_args(argv)
    if a.child:
        kind, *rest = a.child
        if kind == "forward":
            res = child_forward(rest[0], rest[1], int(rest[2]), int(rest[3]), rest[4])
        else:
            res = child_extract(rest[0], rest[1], rest[2], int(rest[3]), rest[4],
                                int(rest[5]))
        print(json.dumps(res))
        return
    result = run(argv)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


def run(argv=None) -> dict:
    """Measure; return the result document (nothing printed)."""
    a = build_parser().parse_args(argv)
    if a.device == "auto":
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-extract-"))
    t_start = time.perf_counter()
    try:
        model_dir, run_dir = work / "model", work / "run"
        build_model(model_dir, a.layers, a.d_model, a.heads, a.window, seed=0)
        build_tokens(run_dir, a.windows, a.window, seed=0)
        ex, fw = [], []
        for _ in range(a.repeats):
            ex.append(run_child("extract", run_dir, model_dir, a.memory, a.threads, a.device,
                                a.topk))
            fw.append(run_child("forward", run_dir, model_dir, ex[-1]["batch_size"], a.threads,
                                a.device))
        best_ex = max(ex, key=lambda r: r["tokens_per_s"])
        best_fw = max(fw, key=lambda r: r["tokens_per_s"])
        store_bytes = sum(p.stat().st_size for p in (run_dir / "stores").glob("*.h5"))
        result = {
            "bench": "extract",
            "machine": {"cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count(), "torch_threads": a.threads},
            "device": a.device,
            "model": {"layers": a.layers, "d_model": a.d_model, "d_mlp": 4 * a.d_model,
                      "heads": a.heads, "window": a.window, "dtype": "float32"},
            "tokens": best_ex["tokens_written"],
            "store_bytes": store_bytes,
            "extract_tokens_per_s": best_ex["tokens_per_s"],
            "forward_tokens_per_s": best_fw["tokens_per_s"],
            "fraction_of_forward": best_ex["tokens_per_s"] / best_fw["tokens_per_s"],
            # CPU seconds of this process (all threads): robust to other load on the machine
            "extract_tokens_per_cpu_s": max(r["tokens_per_cpu_s"] for r in ex),
            "forward_tokens_per_cpu_s": max(r["tokens_per_cpu_s"] for r in fw),
            "fraction_of_forward_cpu": max(r["tokens_per_cpu_s"] for r in ex)
            / max(r["tokens_per_cpu_s"] for r in fw),
            "load_average": os.getloadavg(),
            "extract_write_MB_per_s": best_ex["tokens_per_s"] * a.layers * 4 * a.d_model * 2
            / 1e6,
            "topk": best_ex["topk"],
            "batch_size": best_ex["batch_size"], "block_tokens": best_ex["block_tokens"],
            "blocks": best_ex["blocks_total"],
            "memory_bytes": best_ex["memory_bytes"],
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ex),
            "peak_rss_fraction_of_memory": max(r["peak_rss_bytes"] for r in ex)
            / best_ex["memory_bytes"],
            # where extract's time went (its best run; measured on the real call path):
            # forward = the hooked forward passes, copy = gathering valid rows into block
            # buffers, writer_wait = waiting for the writer thread, writer_busy = the
            # writer's own hashing, writing, syncing and top-k folding (overlaps the
            # forward passes; topk_cpu is the folding's part of writer_cpu)
            "extract_breakdown_s": {
                "total": best_ex["seconds"], "forward": best_ex["seconds_forward"],
                "copy": best_ex["seconds_copy"], "writer_wait": best_ex["seconds_writer_wait"],
                "writer_busy": best_ex["seconds_writer_busy"],
                "writer_cpu": best_ex["cpu_seconds_writer"],
                "topk_cpu": best_ex["cpu_seconds_topk"],
                "bare_forward": best_fw["seconds"]},
            "runs": {"extract": ex, "forward": fw},
            "wall_s": time.perf_counter() - t_start,
        }
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
