"""The reduce stays inside --memory: a subprocess at a budget near the planner's minimum
that forces at least 8 row panels, its peak RSS (anonymous + memory-mapped pages, the
whole process from its first import) against the budget, and its row maxima against
float64 on sampled rows."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ooc_universal.plan import PairShape, make_plan
from tests.reduce_helpers import write_store

N_LAYERS, D_MLP, N_TOKENS, CHUNK = 12, 512, 4096, 1024
N = N_LAYERS * D_MLP

_CHILD = """
import json, sys
from ooc_universal.config import ComputeConfig, ReduceConfig
from ooc_universal.steps.reduce import reduce
res = reduce(sys.argv[1], "ref", ["oth"], ReduceConfig(baseline_draws=1),
             ComputeConfig(memory=sys.argv[2], device="cpu"), progress=False)
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")]
print(json.dumps({"peak_rss": hwm[0], "panels": len(res["plan"].panels),
                  "output": str(res["outputs"][0])}))
"""


def _acts(seed: int, shared: np.ndarray) -> np.ndarray:
    """Post-GELU-like activations sharing latent factors with the other model."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((shared.shape[1], N)) * 0.5
    pre = shared @ w + rng.standard_normal((N_TOKENS, N))
    return pre * 0.5 * (1 + np.tanh(0.7978845608 * (pre + 0.044715 * pre ** 3)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("memory")
    z = np.random.default_rng(0).standard_normal((N_TOKENS, 16))
    x, y = _acts(1, z), _acts(2, z)
    write_store(run, "ref", x, N_LAYERS, D_MLP, block_tokens=CHUNK)
    write_store(run, "oth", y, N_LAYERS, D_MLP, block_tokens=CHUNK)
    return run


def _planner_minimum() -> int:
    """The smallest budget the planner accepts for this reduce (bisected to 1 MB)."""
    from ooc_universal.errors import OocError
    from ooc_universal.kernels.convergence import snapshot_counts
    snapshots = len(snapshot_counts(N_TOKENS, 1024)) - 1  # the default convergence_first
    pairs = [PairShape("oth", N, D_MLP)]
    lo, hi = 10**8, 10**10
    while hi - lo > 10**6:
        mid = (lo + hi) // 2
        try:
            make_plan(N_TOKENS, N, pairs, memory=mid, store_chunk_rows=CHUNK, baseline_draws=1,
                      snapshots=snapshots)
            hi = mid
        except OocError:
            lo = mid
    return hi


def _sampled_rss(proc: subprocess.Popen) -> int:
    """Peak VmRSS of a running process, sampled every 5 ms until it exits."""
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.005)
    return peak


def _row_max_float64(run: Path, rows: np.ndarray) -> np.ndarray:
    from ooc_universal.formats.store import open_store
    with open_store(run / "stores" / "ref.h5") as sa, open_store(run / "stores" / "oth.h5") as sb:
        x = sa.read_rows(0, N_TOKENS)[:, rows].astype(np.float64)
        y = sb.read_rows(0, N_TOKENS).astype(np.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    sx, sy = np.sqrt((xc ** 2).sum(0)), np.sqrt((yc ** 2).sum(0))
    return ((xc.T @ yc) / np.outer(sx, sy)).max(1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_peak_rss_within_budget_at_eight_panels(run):
    budget = int(_planner_minimum() * 1.01)  # 1% above the minimum: 10 panels
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(run), f"{budget}B"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampled = _sampled_rss(proc)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    assert got["panels"] >= 8
    assert got["peak_rss"] <= budget, (got["peak_rss"], budget)
    assert sampled <= budget, (sampled, budget)

    import h5py
    rows = np.unique(np.linspace(0, N - 1, 256).round().astype(np.int64))
    with h5py.File(got["output"], "r") as f:
        row_max = f["row_max"][()][rows]
    assert np.abs(row_max - _row_max_float64(run, rows)).max() <= 1e-5
