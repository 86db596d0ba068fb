"""The reduce against float64 numpy: every tiling, every precision, resume, a cluster."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from ooc_universal.errors import OocError
from ooc_universal.steps.reduce import reduce
from tests.reduce_helpers import planted_acts, planted_triple, reference_stats, write_store

D_OTHER = 8
SEEDS = [3, 4]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    x, y, y2, _ = planted_triple(1000, mix=0.5)
    write_store(run, "ref", x, 2, 16, block_tokens=64)
    write_store(run, "oth", y, 3, D_OTHER, block_tokens=64)
    write_store(run, "oth2", y2, 3, D_OTHER, block_tokens=64)
    refs = {"oth": reference_stats(x, y, D_OTHER, SEEDS),
            "oth2": reference_stats(x, y2, D_OTHER, SEEDS)}
    return run, refs


def _read(path):
    with h5py.File(path, "r") as f:
        out = {k: f[k][()] for k in ("row_max", "row_argmax", "col_max", "col_argmax",
                                     "ref/mean", "ref/var", "other/mean", "other/var",
                                     "ref/zero_var", "other/zero_var", "baseline/row_max",
                                     "other/self_comoment")}
        out["attrs"] = dict(f.attrs)
        if "cross_comoment" in f:
            out["cross_comoment"] = f["cross_comoment"][()]
    return out


def _check(got, ref, tol):
    assert np.abs(got["row_max"] - ref["row_max"]).max() <= tol
    assert np.abs(got["col_max"] - ref["col_max"]).max() <= tol
    assert np.abs(got["baseline/row_max"] - ref["baseline"]).max() <= max(tol, 1e-6)
    # argmax identical wherever the top two differ by more than the tolerance
    for rho, arg, axis in ((ref["rho"], got["row_argmax"], 1), (ref["rho"].T, got["col_argmax"], 1)):
        srt = np.sort(rho, axis=axis)
        clear = (srt[:, -1] - srt[:, -2]) > 2 * tol
        nonzero = np.abs(rho).max(axis) > 0
        sel = clear & nonzero
        assert np.array_equal(arg[sel], rho.argmax(axis)[sel])
    np.testing.assert_allclose(got["ref/mean"], ref["mean_x"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["ref/var"], ref["var_x"], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(got["other/var"], ref["var_y"], rtol=1e-5, atol=1e-9)


def _run(run, tag, **kw):
    out_run = Path(run)
    res = reduce(out_run, "ref", ["oth", "oth2"], baseline_draws=2, seed=3, progress=False,
                 force=True, **kw)
    return {p.stem.split("__")[1]: _read(p) for p in res["outputs"]}, res


def test_fp32_matches_float64_reference(planted):
    run, refs = planted
    got, res = _run(run, "fp32")
    for other in ("oth", "oth2"):
        _check(got[other], refs[other], 1e-5)
    g = got["oth"]
    # planted pairs found, signs kept (row max is the signed max)
    assert g["row_argmax"][5] == 3 and abs(g["row_max"][5] - refs["oth"]["row_max"][5]) < 1e-5
    assert refs["oth"]["rho"][7, 10] < -0.6 and g["row_argmax"][7] != 10
    # zero variance: counted, rho 0, argmax -1, never NaN
    assert g["ref/zero_var"][12] and g["row_max"][12] == 0 and g["row_argmax"][12] == -1
    assert g["other/zero_var"][20] and g["col_max"][20] == 0
    assert g["attrs"]["n_zero_var_ref"] == 1 and g["attrs"]["n_zero_var_other"] == 1
    assert not g["ref/zero_var"][20]
    for k in ("row_max", "col_max", "baseline/row_max"):
        assert np.isfinite(g[k]).all()
    assert list(g["attrs"]["baseline_seeds"]) == SEEDS
    assert res["plan"].groups == [[0, 1]]  # one pass over the reference serves both pairs


def test_self_comoment_matches(planted):
    run, _ = planted
    got, _ = _run(run, "self")
    with h5py.File(Path(run) / "stores" / "oth.h5", "r") as f:
        y = f["acts"][()].astype(np.float64)
    yc = y - y.mean(0)
    for layer in range(3):
        blk = yc[:, layer * D_OTHER:(layer + 1) * D_OTHER]
        want = blk.T @ blk
        scale = np.sqrt(np.outer(np.diag(want), np.diag(want))) + 1e-300
        # fp32 GEMM: errors relative to the norms of the two columns (i.e. in rho units)
        assert (np.abs(got["oth"]["other/self_comoment"][layer] - want) / scale).max() < 1e-6


@pytest.mark.parametrize("kw", [
    dict(block_tokens=64),                       # not dividing 1000 tokens
    dict(block_tokens=1024),                     # a single block
    dict(max_panels=2, block_tokens=128),        # row panels
    dict(max_panels=3, block_tokens=192),        # uneven panels
    dict(n_workers=3, block_tokens=64),          # token chains merged with Chan's formula
])
def test_every_tiling_same_answer(planted, kw):
    run, refs = planted
    got, res = _run(run, "tiling", **kw)
    for other in ("oth", "oth2"):
        _check(got[other], refs[other], 1e-5)


def test_small_memory_splits_groups(planted):
    run, refs = planted
    from ooc_universal import plan as plan_mod
    # A budget that fits one pair's accumulator at a time, not both.
    one = plan_mod._peak(32, [24], 32, 64, "fp32", [8], 2, 1)
    got, res = _run(run, "mem", memory=one + 1, block_tokens=64)
    assert len(res["plan"].groups) == 2
    for other in ("oth", "oth2"):
        _check(got[other], refs[other], 1e-5)


def test_bf16_and_fp64(planted):
    run, refs = planted
    got, _ = _run(run, "bf16", precision="bf16")
    _check(got["oth"], refs["oth"], 2e-3)
    got, _ = _run(run, "fp64", precision="fp64")
    _check(got["oth"], refs["oth"], 1e-9)


def test_keep_covariance(planted):
    run, refs = planted
    got, _ = _run(run, "cov", keep_covariance=True)
    with h5py.File(Path(run) / "stores" / "ref.h5", "r") as f:
        x = f["acts"][()].astype(np.float64)
    with h5py.File(Path(run) / "stores" / "oth.h5", "r") as f:
        y = f["acts"][()].astype(np.float64)
    c = (x - x.mean(0)).T @ (y - y.mean(0))
    np.testing.assert_allclose(got["oth"]["cross_comoment"], c, rtol=1e-4, atol=1e-3)


def test_skip_complete_and_refuse_other_settings(planted):
    run, _ = planted
    reduce(run, "ref", ["oth"], baseline_draws=2, seed=3, progress=False, force=True)
    res = reduce(run, "ref", ["oth"], baseline_draws=2, seed=3, progress=False)
    assert res["skipped"] and res["blocks_folded"] == 0
    with pytest.raises(OocError, match="other settings"):
        reduce(run, "ref", ["oth"], baseline_draws=5, seed=3, progress=False)


def test_bad_inputs(tmp_path):
    x, y = planted_acts(200)
    write_store(tmp_path, "ref", x, 2, 16)
    write_store(tmp_path, "oth", y, 3, 8, token_hash="u" * 64)
    with pytest.raises(OocError, match="different token sets"):
        reduce(tmp_path, "ref", ["oth"], progress=False)
    with pytest.raises(OocError, match="no activation store"):
        reduce(tmp_path, "ref", ["nope"], progress=False)
    with pytest.raises(OocError, match="at least one other"):
        reduce(tmp_path, "ref", [], progress=False)
    write_store(tmp_path, "oth3", y, 3, 8)
    with pytest.raises(OocError, match="too small"):
        reduce(tmp_path, "ref", ["oth3"], memory="10MB", progress=False)
    assert not list((tmp_path / "reduce").glob("*.h5"))


def test_dry_run_paper_scale_plans():
    from ooc_universal.plan import PairShape, describe, make_plan
    pairs = [PairShape(o, 36864, 3072) for o in "bcde"]
    ws = make_plan(5_000_000, 36864, pairs, memory="16GB", store_chunk_rows=448)
    assert ws.peak_bytes <= 16e9 and len(ws.panels) == 1  # full width, pairs in turn
    gpu = make_plan(5_000_000, 36864, pairs, memory="80GB", device="cuda",
                    store_chunk_rows=448)
    assert len(gpu.groups) == 1 and len(gpu.panels) == 1  # one pass over every store
    cluster = make_plan(5_000_000, 36864, pairs, memory="64GB", n_workers=8,
                        store_chunk_rows=448)
    assert cluster.n_chains == 8 and cluster.peak_bytes <= 64e9
    text = describe(ws, 1e11)
    for word in ("passes", "bytes read", "FLOPs", "peak memory", "expected time"):
        assert word in text


def test_plan_counts_every_task_the_disk_and_every_flop():
    """Issue 12's shapes: paper width at 4 GB panels and fits with its margin; a 12,288-
    wide reduce plans at 1.1 GB; the FLOPs include the self co-moments, the baseline and
    its rotated scales; the dry-run text says peak by task, disk and the time parts."""
    from ooc_universal.plan import (PairShape, Rates, describe, expected_seconds,
                                    make_plan, with_margin)
    paper = make_plan(8192, 36864, [PairShape("b", 36864, 3072)], memory="4GB",
                      store_chunk_rows=448)
    assert 1 < len(paper.panels) <= 4
    assert paper.required_bytes == with_margin(paper.peak_bytes) <= 4e9
    assert set(paper.task_peaks) == {"fold", "merge", "finalize", "self", "rotations",
                                     "assemble"}
    assert set(paper.flops_by_kind) == {"cross", "self", "baseline", "scales"}
    assert paper.flops == pytest.approx(sum(paper.flops_by_kind.values()))
    assert paper.flops_by_kind["baseline"] == pytest.approx(2.0 * 36864 ** 2 * 3072)
    assert paper.work_disk_bytes > 12 * 3072 ** 2 * 8  # the self co-moments at least
    wide = make_plan(4096, 12288, [PairShape("b", 12288, 1024)], memory="1.1GB",
                     store_chunk_rows=1024)
    assert wide.required_bytes <= 1.1e9
    secs = expected_seconds(paper, Rates(gemm_flops_per_s=1e11))
    assert secs["total"] == pytest.approx(sum(v for k, v in secs.items() if k != "total"))
    assert secs["gemm"] + secs["baseline_gemm"] == pytest.approx(paper.flops / 1e11)
    text = describe(paper, Rates(gemm_flops_per_s=1e11))
    for word in ("by task: fold", "work directory up to", "scales", "margin"):
        assert word in text


def test_cli_dry_run_and_run(planted, capsys):
    from ooc_universal.cli.main import main
    run, refs = planted
    main(["reduce", "--run-dir", str(run), "-r", "ref", "oth", "--dry-run"])
    out = capsys.readouterr().out
    assert "reduce plan" in out and "expected time" in out
    main(["reduce", "--run-dir", str(run), "-r", "ref", "oth", "--force", "--no-progress",
          "--seed", "3", "--baseline-draws", "2"])
    out = capsys.readouterr()
    assert "ref__oth.h5" in out.out and "zero variance" in out.err


def test_cli_prints_the_achieved_rate(planted, capsys):
    """A whole reduce in one process ends with its useful GFLOP/s and the fraction of
    torch.matmul measured at the plan's shapes (per wall and per CPU-second)."""
    from ooc_universal.cli.main import main
    run, _ = planted
    main(["reduce", "--run-dir", str(run), "-r", "ref", "oth", "--force", "--no-progress"])
    out = capsys.readouterr().out
    assert "achieved" in out and "of torch.matmul's" in out and "per CPU-second" in out


_KILL_SCRIPT = """
import sys
from ooc_universal.steps.reduce import reduce
reduce(sys.argv[1], "ref", ["oth", "oth2"], baseline_draws=2, seed=3, progress=False,
       block_tokens=64, checkpoint_blocks=1)
"""


def test_sigkill_and_resume(tmp_path):
    x, y = planted_acts(1000)
    write_store(tmp_path, "ref", x, 2, 16)
    write_store(tmp_path, "oth", y, 3, 8)
    write_store(tmp_path, "oth2", y[:, ::-1].copy(), 3, 8)
    clean = tmp_path / "clean"
    for lbl in ("ref", "oth", "oth2"):
        (clean / "stores").mkdir(parents=True, exist_ok=True)
        for name in (f"{lbl}.h5", f"{lbl}.h5.sha256"):  # a store opens with its sidecar
            os.link(tmp_path / "stores" / name, clean / "stores" / name)
    reduce(clean, "ref", ["oth", "oth2"], baseline_draws=2, seed=3, progress=False,
           block_tokens=64)
    env = dict(os.environ, OOC_TEST_SLEEP_AFTER_CHECKPOINT="0.15")
    work = tmp_path / "reduce" / ".work"
    kills = 0
    for delay in (0.5, 1.0, 1.6):
        proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path)], env=env)
        deadline = time.time() + 60
        while time.time() < deadline and not list(work.glob("*/fold_*.npz")):
            time.sleep(0.05)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        assert not list((tmp_path / "reduce").glob("*.h5")) or proc.returncode == 0
    assert kills >= 2
    res = reduce(tmp_path, "ref", ["oth", "oth2"], baseline_draws=2, seed=3, progress=False,
                 block_tokens=64, checkpoint_blocks=1)
    assert res["blocks_resumed"] > 0
    for other in ("oth", "oth2"):
        a = _read(tmp_path / "reduce" / f"ref__{other}.h5")
        b = _read(clean / "reduce" / f"ref__{other}.h5")
        for k in ("row_max", "col_max", "baseline/row_max", "ref/var"):
            assert np.abs(a[k] - b[k]).max() <= 1e-6
        assert np.array_equal(a["row_argmax"], b["row_argmax"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_distributed_cluster_same_answer(planted, tmp_path):
    run, refs = planted
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler",
                               "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        time.sleep(2)
        for _ in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", addr, "--nthreads", "1",
                 "--no-dashboard", "--memory-limit", "2GB"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client
        with Client(addr, timeout="30s") as c:
            c.wait_for_workers(2, timeout=60)
        res = reduce(run, "ref", ["oth", "oth2"], baseline_draws=2, seed=3, progress=False,
                     force=True, scheduler=addr, block_tokens=64)
        assert res["plan"].n_chains == 2
        for p in res["outputs"]:
            other = p.stem.split("__")[1]
            _check(_read(p), refs[other], 1e-5)
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_snapshot_counts_never_cut_a_block_into_a_sliver():
    """With 448-row store chunks the chunk-aligned block is 4,032 rows; the doubling
    snapshot counts (1,024, 2,048, 4,096) would cut it into spans of 64 and 128 rows.
    The planner takes 4,096 instead, and its time model counts the cut spans."""
    from ooc_universal.plan import (PairShape, Rates, expected_seconds, make_plan,
                                    span_efficiency, token_spans)
    assert token_spans(8192, 4032, (1024, 2048, 4096)) == [
        (0, 1024), (1024, 2048), (2048, 4032), (4032, 4096), (4096, 8064), (8064, 8192)]
    assert span_efficiency(8192, 4096, ()) == 1.0
    assert span_efficiency(8192, 4032, (1024, 2048, 4096)) == \
        pytest.approx((8192 + 256 * 6) / (8192 + 256 * 3))
    pairs = [PairShape("b", 36864, 3072)]
    for memory in ("16GB", "4GB"):
        plan = make_plan(8192, 36864, pairs, memory=memory, store_chunk_rows=448,
                         snapshots=(1024, 2048, 4096))
        assert plan.block_tokens == 4096 and plan.snapshots == 3
        assert min(e - s for s, e in plan.spans()) == 1024
    plan = make_plan(8192, 36864, pairs, memory="16GB", store_chunk_rows=448,
                     snapshots=(1024, 2048, 4096), block_tokens=4032)  # forced
    assert len(plan.spans()) == 6
    cut = expected_seconds(plan, Rates(gemm_flops_per_s=1e11))["gemm"]
    whole = (plan.flops_by_kind["cross"] + plan.flops_by_kind["self"]) / 1e11
    assert cut == pytest.approx(whole * span_efficiency(8192, 4032, (1024, 2048, 4096)))


def test_blocks_across_store_chunks_match_float64(tmp_path):
    """48-row chunks: the planner's 4,096-row blocks (not a multiple of 48) read across
    chunk edges, cut at the snapshot counts; the answer is float64's."""
    x, y, _, _ = planted_triple(5000, mix=0.5)
    write_store(tmp_path, "ref", x, 2, 16, block_tokens=48)
    write_store(tmp_path, "oth", y, 3, D_OTHER, block_tokens=48)
    res = reduce(tmp_path, "ref", ["oth"], baseline_draws=2, seed=3, progress=False)
    assert res["plan"].block_tokens == 4096 and res["plan"].block_tokens % 48
    assert len(res["plan"].spans()) == 4  # [0,1024) [1024,2048) [2048,4096) [4096,5000)
    _check(_read(res["outputs"][0]), reference_stats(x, y, D_OTHER, SEEDS), 1e-5)
