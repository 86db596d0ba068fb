"""Ablated forward passes per second against a plain forward pass (JSON out).

One "pass" = one batch of windows through the model. Four timings on the same model
and batches:
  plain     model(ids).logits, no hooks
  toolkit   evaluate_ablations: the original once per batch, each set restarted from
            the cached residual at its lowest ablated layer (the cached prefix), LM head
            on the evaluated rows only, float64 KL and CE; reported per (set, batch)
  stacked   the same with --stack sets of one starting layer stacked along the batch
            dimension in each restart (sets_per_pass)
  naive     the previous way: a full hooked forward per (set, batch) plus the same
            float64 KL and CE
toolkit_over_naive is the cached prefix's speed-up over full ablated forwards, and
stacked_over_toolkit says whether stacking sets beats looping them over one prefix, both
measured in the same run. The set mix is the step's default: universal + controls over
all layers, then each layer's universal neuron set + controls (so most sets start above
layer 0).

  python bench/bench_ablate.py [--layers 6 --d-model 128 --window 128 --batch 16
                                --batches 4 --draws 2 --stack 4 --threads 1
                                --device auto --out F]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ooc_universal.devices import resolve_device
from ooc_universal.steps.ablate import (ablation_hooks, ablation_sets, evaluate_ablations,
                                        target_mask)
from ooc_universal.zoo import ZooRecipe, gpt2_config


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="windows per pass")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--draws", type=int, default=2, help="control draws per set")
    ap.add_argument("--frac", type=float, default=0.05, help="universal fraction per layer")
    ap.add_argument("--stack", type=int, default=4,
                    help="sets per restart in the stacked timing (sets_per_pass)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    return ap


def main(argv=None):
    out = run(argv)
    text = json.dumps(out, indent=2)
    print(text)
    if out["args"]["out"]:
        Path(out["args"]["out"]).write_text(text + "\n")


def run(argv=None) -> dict:
    """Measure; return the result document (nothing printed)."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)

    # the stanford-crfm GPT-2 flags at a chosen size (the timing does not depend on the
    # weights); built in the package, so an installed toolkit benchmarks without tests/
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(ZooRecipe(
        n_layer=args.layers, n_embd=args.d_model, n_head=max(1, args.d_model // 64),
        d_mlp=4 * args.d_model, context=args.window))).eval().to(dev)
    d_mlp = 4 * args.d_model
    rng = np.random.default_rng(0)
    n_win = args.batch * args.batches
    ids = rng.integers(0, 256, (n_win, args.window))
    ids[:, 0] = 256
    valid = rng.random(ids.shape) < 0.95
    valid[:, 0] = False
    uni = np.sort(rng.choice(args.layers * d_mlp, int(args.frac * args.layers * d_mlp),
                             replace=False))
    rec = dict(reference="bench", other="x", checkpoint=0, threshold=0.5, draw=0,
               n_layers=args.layers, d_mlp=d_mlp, neurons=uni.tolist())
    sets = ablation_sets([rec], control_draws=args.draws, seed=0)
    n_passes = len(sets) * args.batches

    batches = [torch.as_tensor(ids[i:i + args.batch], device=dev)
               for i in range(0, n_win, args.batch)]
    tmask = target_mask(valid)

    def plain():
        with torch.inference_mode():
            for b in batches:
                model(b).logits

    def toolkit():
        evaluate_ablations(model, sets, ids, valid, batch_size=args.batch)

    def stacked():
        evaluate_ablations(model, sets, ids, valid, batch_size=args.batch,
                           sets_per_pass=args.stack)

    def naive():
        with torch.inference_mode():
            for k, b in enumerate(batches):
                m = torch.as_tensor(tmask[k * args.batch:(k + 1) * args.batch], device=dev)
                tgt = torch.roll(b, -1, dims=1)[m]
                lp = torch.log_softmax(model(b).logits[m].double(), -1)
                for s in sets:
                    with ablation_hooks(model, s.neurons, d_mlp):
                        lq = torch.log_softmax(model(b).logits[m].double(), -1)
                    (lp.exp() * (lp - lq)).sum(-1).cpu()
                    lq.gather(1, tgt[:, None]).cpu()

    plain()                                   # warm-up (allocator, kernels)
    # The variants take turns, `repeat` rounds, and each keeps its best time, so load on
    # a shared machine biases the ratios as little as possible; plain is cheap and is
    # timed around each of them.
    t_plain = t_tool = t_stack = t_naive = float("inf")
    for _ in range(args.repeat):
        t_plain = min(t_plain, _timed(plain, 2))
        t_tool = min(t_tool, _timed(toolkit, 1))
        t_plain = min(t_plain, _timed(plain, 2))
        t_stack = min(t_stack, _timed(stacked, 1))
        t_plain = min(t_plain, _timed(plain, 2))
        t_naive = min(t_naive, _timed(naive, 1))
    t_plain = min(t_plain, _timed(plain, 2))
    plain_ps = args.batches / t_plain
    tool_ps = n_passes / t_tool
    stack_ps = n_passes / t_stack
    naive_ps = n_passes / t_naive
    out = dict(
        bench="ablate", device=str(dev), threads=args.threads, torch=torch.__version__,
        cpu=platform.processor() or platform.machine(),
        model=dict(n_layers=args.layers, d_model=args.d_model, d_mlp=d_mlp, vocab=257,
                   window=args.window),
        batch_windows=args.batch, n_batches=args.batches, n_sets=len(sets),
        n_universal=int(uni.size),
        plain_passes_per_s=plain_ps, toolkit_ablated_passes_per_s=tool_ps,
        naive_ablated_passes_per_s=naive_ps, stacked_ablated_passes_per_s=stack_ps,
        toolkit_over_plain=tool_ps / plain_ps, naive_over_plain=naive_ps / plain_ps,
        toolkit_over_naive=tool_ps / naive_ps, stacked_over_toolkit=stack_ps / tool_ps,
        stack=args.stack,
        seconds=dict(plain=t_plain, toolkit=t_tool, stacked=t_stack, naive=t_naive),
        note="pass = one batch of windows; toolkit and naive include float64 KL and CE; "
             "toolkit time includes its one original pass per batch",
        args=vars(args))
    return out


if __name__ == "__main__":
    main()
