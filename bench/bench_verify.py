"""What verifying its inputs costs the universal step, at the paper's width.

    python -m ooc_universal.bench.bench_verify [--layers 12 --d-mlp 3072] [--pairs 2]
                                               [--draws 1] [--out FILE]

Writes `--pairs` reduce files of GPT-2-small width (12 x 3072 = 36,864 neurons a side;
random statistics, ~0.9 GB each, nearly all of it the other model's within-layer self
co-moments) with the reduce's own writer (formats/reduced.create_reduced, so their
sidecars carry the per-dataset digests), then runs the universal step on them:

  step_s             the universal step as it runs (verifies what it reads: attributes
                     and the per-neuron arrays against their digests)
  digest_hash_s      the sha256 of those arrays alone (the verification's own cost)
  file_hash_s        the sha256 of the whole files (what verifying them whole would cost)
  verify_fraction    digest_hash_s / step_s (goal: under 0.05)
  whole_file_fraction  file_hash_s / step_s: the cost if each file were hashed whole

Timings are ratios within one run; nothing here depends on the machine's speed.
JSON to stdout (or --out). In-process: run(argv) -> dict.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ooc_universal.bench.inputs import random_byte_tokens

GOAL = 0.05


def write_pair(run_dir: Path, ref: str, other: str, n_layers: int, d_mlp: int, draws: int,
               token_hash: str, n_tokens: int, seed: int) -> Path:
    from ooc_universal.formats.reduced import PairHeader, create_reduced, reduced_path
    rng = np.random.default_rng(seed)
    n = n_layers * d_mlp

    def meta(label):
        return dict(label=f"{label}@100", name=label, step=100, model_id=label,
                    revision="", n_layers=n_layers, d_mlp=d_mlp)
    header = PairHeader(reference=meta(ref), other=meta(other), token_hash=token_hash,
                        n_tokens=n_tokens, precision="fp32",
                        baseline_seeds=tuple(range(draws)), config={"bench": "verify"})
    path = reduced_path(run_dir, f"{ref}@100", f"{other}@100")
    path.parent.mkdir(parents=True, exist_ok=True)
    with create_reduced(path, header, keep_cross=False,
                        record={"step": "reduce", "token_hash": token_hash}) as w:
        for side in ("ref", "other"):
            w.write_moments(side, 0, rng.normal(size=n), rng.uniform(0.5, 2.0, n) * n_tokens,
                            n_tokens)
        for layer in range(n_layers):
            w.write_self_comoment_layer(layer, rng.normal(size=(d_mlp, d_mlp)))
        row_max = rng.uniform(0.2, 0.9, n)
        w.write_rows(0, row_max, rng.integers(0, n, n), row_max[None] * rng.uniform(
            0.3, 0.9, (draws, n)), np.zeros(n, bool))
        w.write_cols(rng.uniform(0.2, 0.9, n), rng.integers(0, n, n), np.zeros(n, bool))
    return path


def run_bench(layers: int, d_mlp: int, pairs: int, draws: int, workdir=None) -> dict:
    from ooc_universal.formats.reduced import ARRAYS, _array_sha256, list_reduced
    from ooc_universal.formats.tokens import existing_hash
    from ooc_universal.rundir import file_sha256, forget_verified
    from ooc_universal.steps.universal import universal
    import h5py
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        random_byte_tokens(run_dir, 2048, 64)
        token_hash = existing_hash(run_dir)
        t0 = time.perf_counter()
        for i in range(pairs):
            write_pair(run_dir, "ref", f"other{i}", layers, d_mlp, draws, token_hash, 2048, i)
        write_s = time.perf_counter() - t0
        files = list_reduced(run_dir)
        forget_verified()
        t0 = time.perf_counter()
        universal(run_dir, progress=False)
        step_s = time.perf_counter() - t0
        arrays = []
        for path in files:
            with h5py.File(path, "r") as f:
                arrays += [f[k][...] for k in ARRAYS.values() if k in f]
        t0 = time.perf_counter()
        for a in arrays:
            _array_sha256(a)
        digest_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for path in files:
            file_sha256(path)
        file_s = time.perf_counter() - t0
        sizes = [p.stat().st_size for p in files]
    return {"bench": "verify", "layers": layers, "d_mlp": d_mlp, "n_neurons": layers * d_mlp,
            "pairs": pairs, "draws": draws, "file_bytes": sizes,
            "digested_bytes": int(sum(a.nbytes for a in arrays)),
            "write_s": write_s, "step_s": step_s, "digest_hash_s": digest_s,
            "file_hash_s": file_s, "verify_fraction": digest_s / step_s,
            "whole_file_fraction": file_s / step_s, "goal": GOAL,
            "met": digest_s / step_s < GOAL, "load_average": list(os.getloadavg())}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-mlp", type=int, default=3072)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--draws", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="where the temporary run goes")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    return ap


def run(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    return run_bench(a.layers, a.d_mlp, a.pairs, a.draws, a.workdir)


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    doc = run_bench(a.layers, a.d_mlp, a.pairs, a.draws, a.workdir)
    text = json.dumps(doc, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
