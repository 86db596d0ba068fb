"""The reduce's stream source: token blocks from forward passes instead of stores.

A streamed reduce must equal a stored reduce of the same models and tokens (row max
within 1e-6, argmax identical), also panelled and when killed and resumed; a streamed
block must equal the model's activations recomputed from its weights in float64 (and the
stored block bit for bit); the planner's source choice is checked against hand-computed
numbers; the CLI flag and its bad values.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ooc_universal.cli.main import cli
from ooc_universal.config import ComputeConfig, ExtractConfig, ReduceConfig
from ooc_universal.errors import OocError
from ooc_universal.formats.store import open_store
from ooc_universal.formats.tokens import load_token_set
from ooc_universal.plan import (PairShape, Rates, SourceOption, StreamShape, choose_source,
                                expected_seconds, forward_flops_per_token, forward_passes,
                                make_plan, store_option, stream_option)
from ooc_universal.sources import open_source, release_sources, stream_source
from ooc_universal.steps.extract import extract
from ooc_universal.steps.reduce import reduce
from tests.test_extract import make_tokens, reference_acts
from tests.test_faults import kill_env, run_child
from tests.tiny import save_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

CPU = ComputeConfig(device="cpu")
SETTINGS = dict(baseline_draws=2, seed=3)
KW = dict(block_tokens=256, progress=False)
KEYS = ("row_max", "col_max", "baseline/row_max", "ref/mean", "ref/var", "other/mean",
        "other/var", "other/self_comoment")
EXTRACT_BATCH = 4


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Three tiny models (2 layers x 128 neurons), a token set of 40 windows of 64
    (2,268 valid positions), their stores, and the stored reduce of m0 against m1, m2."""
    root = tmp_path_factory.mktemp("stream")
    models = [save_tiny(root / f"m{i}", seed=i) for i in range(3)]
    stored = root / "stored"
    make_tokens(stored, seed=4, n_windows=40)
    for m in models:
        extract(stored, str(m), ExtractConfig(batch_size=EXTRACT_BATCH), CPU, block_tokens=256,
                progress=False)
    res = reduce(stored, "m0", ["m1", "m2"], ReduceConfig(**SETTINGS), CPU, **KW)
    refs = {p.stem.split("__")[1]: _read(p) for p in res["outputs"]}
    return root, models, stored, refs


def _stream_run(root: Path, stored: Path, name: str) -> Path:
    """A run directory holding the token set only: no stores."""
    run = root / name
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(stored / "tokens", run / "tokens")
    return run


def _read(path) -> dict:
    with h5py.File(path, "r") as f:
        out = {k: f[k][()] for k in KEYS + ("row_argmax", "col_argmax")}
        out["attrs"] = dict(f.attrs)
    return out


def _assert_same(run: Path, refs: dict, tol: float = 1e-6) -> None:
    for other, ref in refs.items():
        got = _read(run / "reduce" / f"m0__{other}.h5")
        for k in KEYS:
            assert np.abs(got[k] - ref[k]).max() <= tol, (other, k)
        for k in ("row_argmax", "col_argmax"):
            assert np.array_equal(got[k], ref[k]), (other, k)
        for a in ("ref_label", "other_label", "ref_model_id", "n_tokens", "token_hash"):
            assert got["attrs"][a] == ref["attrs"][a], a


def _stream(run, models, settings=None, **kw):
    settings = ReduceConfig(**SETTINGS, source="stream") if settings is None else settings
    return reduce(run, str(models[0]), [str(m) for m in models[1:]], settings, CPU,
                  **{**KW, **kw})


# ---------------------------------------------------------------------------- blocks

def test_streamed_rows_equal_weights_and_store(zoo):
    """Rows from forward passes: within fp16 rounding of float64 from the weights, and
    bit for bit the stored rows (at extract's batch and at another batch grid), over
    ranges that start and end inside windows and batches."""
    root, models, stored, _ = zoo
    ts = load_token_set(stored)
    want = reference_acts(models[0], ts)
    with open_store(stored / "stores" / "m0.h5") as st:
        stored_rows = st.read_rows(0, st.n_tokens)
    for batch in (EXTRACT_BATCH, 3):
        spec = stream_source(str(models[0]), "m0", stored, batch, "cpu")
        src = open_source(spec)
        try:
            assert (src.n_tokens, src.n_neurons) == stored_rows.shape
            for i, (a, b) in enumerate(((0, 1000), (1000, 1001), (1001, 2268), (70, 700))):
                out = torch.empty(b - a, src.n_neurons, dtype=torch.float16)
                src.fill_rows(a, b, out)
                got = out.numpy()
                assert np.array_equal(got, stored_rows[a:b]), (batch, a, b)
                err = np.abs(got.astype(np.float64) - want[a:b])
                assert (err <= 2e-3 * np.maximum(1.0, np.abs(want[a:b]))).all()
                if i == 2:  # one pass in order: each batch forwarded once (the one
                    # straddling two ranges stays in the capture buffer)
                    assert src.batches_forwarded == -(-src.n_windows // batch)
        finally:
            release_sources([spec])


def test_streamed_rows_out_of_range(zoo):
    root, models, stored, _ = zoo
    spec = stream_source(str(models[0]), "m0", stored, 4, "cpu")
    src = open_source(spec)
    try:
        with pytest.raises(IndexError):
            src.fill_rows(0, src.n_tokens + 1, torch.empty(1, 1, dtype=torch.float16))
    finally:
        release_sources([spec])


# ---------------------------------------------------------------------------- reduce

def test_streamed_reduce_equals_stored_reduce(zoo):
    root, models, stored, refs = zoo
    run = _stream_run(root, stored, "streamed")
    res = _stream(run, models)
    assert res["source"] == "stream" and res["plan"].source == "stream"
    assert res["plan"].bytes_read == 0 and res["plan"].forward_flops > 0
    assert not (run / "stores").exists()  # nothing but the outputs is written
    _assert_same(run, refs)
    assert "forward" in res["timings"] and "read" not in res["timings"]
    with h5py.File(run / "reduce" / "m0__m1.h5") as f:
        import json
        config = json.loads(f.attrs["config_json"])
    assert config["reference_store"]["source"] == "stream"
    assert config["reference_store"]["spec"] == str(models[0])
    from ooc_universal.rundir import read_sidecar
    side = read_sidecar(run / "reduce" / "m0__m1.h5")
    assert side["source"] == "stream" and side["inputs"] == {}
    assert side["models"] == {"m0": str(models[0]), "m1": str(models[1])}
    assert side["token_hash"] == load_token_set(stored).hash
    # complete: the same command skips both pairs (no forward pass)
    again = _stream(run, models)
    assert len(again["skipped"]) == 2 and again["blocks_folded"] == 0


def test_streamed_reduce_panelled_by_memory(zoo, monkeypatch):
    """One pair (so only row panels can cut it) at a budget just under what a full-width
    accumulator needs; forward batches of 8 windows (5 per pass: a pass is forwarded
    again, not kept in the capture buffer)."""
    import ooc_universal.sources as sources
    monkeypatch.setattr(sources, "CAPTURE_BYTES", 2 * 256 * 64 * 8)
    root, models, stored, refs = zoo
    run = _stream_run(root, stored, "panelled")
    one = reduce(run, str(models[0]), [str(models[1])], ReduceConfig(**SETTINGS, source="stream"),
                 CPU, dry_run=True, gemm_rate=1e10, **KW)["plan"]
    assert len(one.panels) == 1
    budget = one.required_bytes
    while len(one.panels) == 1:  # the fused self co-moments' room, then a panel's
        budget -= 2 * 10**5
        one = reduce(run, str(models[0]), [str(models[1])],
                     ReduceConfig(**SETTINGS, source="stream"),
                     ComputeConfig(device="cpu", memory=str(budget)), dry_run=True,
                     gemm_rate=1e10, **KW)["plan"]
    compute = ComputeConfig(device="cpu", memory=str(budget))
    res = reduce(run, str(models[0]), [str(models[1])],
                 ReduceConfig(**SETTINGS, source="stream"), compute, **KW)
    plan = res["plan"]
    assert len(plan.panels) >= 2 and plan.required_bytes <= budget
    # each panel forwards the models again (and the self co-moments once more unless
    # folded in the first panel's pass): the planner counts it, as they ran
    self_pass = 0 if plan.self_fused else 1
    assert plan.forward_passes == {"m0": len(plan.panels), "m1": len(plan.panels) + self_pass}
    assert plan.forward_flops == pytest.approx(
        plan.stream.positions * (plan.stream.flops_ref * len(plan.panels)
                                 + plan.stream.flops_others[0] * (len(plan.panels) + self_pass)))
    assert res["forward_passes"] == plan.forward_passes
    _assert_same(run, {"m1": refs["m1"]})


def test_streamed_reduce_killed_and_resumed(zoo):
    root, models, stored, refs = zoo
    run = _stream_run(root, stored, "killed")
    kw = dict(settings=ReduceConfig(**SETTINGS, source="stream"), compute=CPU,
              checkpoint_blocks=2, **KW)
    args = (run, str(models[0]), [str(m) for m in models[1:]])
    code, _ = run_child("reduce", args[:2], dict(kw, others=args[2]),
                        kill_env("reduce.checkpoint.after_rename", 3))
    assert code == -9
    assert not list((run / "reduce").glob("*.h5"))
    work = [p for p in (run / "reduce" / ".work").iterdir() if p.is_dir()]
    assert len(work) == 1
    import json
    manifest = json.loads((work[0] / "manifest.json").read_text())
    assert "--source stream" in manifest["command"] and str(models[0]) in manifest["command"]
    res = reduce(*args, **kw)  # the same command again: resumes, recomputing forwards
    assert res["blocks_resumed"] > 0 and res["blocks_folded"] < 9
    _assert_same(run, refs)


def test_stream_needs_no_store_but_a_token_set_and_models(zoo, tmp_path):
    root, models, stored, _ = zoo
    with pytest.raises(OocError, match="no token set"):
        _stream(tmp_path / "empty", models)
    run = _stream_run(root, stored, "missing-model")
    with pytest.raises(OocError, match="does not exist"):
        reduce(run, str(models[0]), [str(root / "nope")], ReduceConfig(source="stream"), CPU)
    with pytest.raises(OocError, match="also among the other models"):
        reduce(run, str(models[0]), [str(models[0])], ReduceConfig(source="stream"), CPU)


def test_stream_by_store_label_uses_the_recorded_spec(zoo):
    """`reduce --source stream -r m0 m1 m2` in a run with stores: each store's recorded
    spec is streamed (the store itself is not read)."""
    root, models, stored, refs = zoo
    run = root / "by-label"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(stored, run, ignore=shutil.ignore_patterns("reduce"))
    res = reduce(run, "m0", ["m1", "m2"], ReduceConfig(**SETTINGS, source="stream"), CPU, **KW)
    assert res["source"] == "stream" and res["timings"].get("forward", 0) > 0
    _assert_same(run, refs)
    # and a store reduce of the same settings takes the streamed outputs as complete
    again = reduce(run, "m0", ["m1", "m2"], ReduceConfig(**SETTINGS), CPU, **KW)
    assert len(again["skipped"]) == 2 and again["blocks_folded"] == 0


def test_auto_prints_both_options_and_the_choice(zoo):
    root, models, stored, _ = zoo
    res = reduce(stored, "m0", ["m1", "m2"], ReduceConfig(**SETTINGS, source="auto",
                                                          disk_gbps=2.0),
                 CPU, dry_run=True, gemm_rate=1e10, force=True, **KW)
    text = res["describe"]
    assert "block source (--source auto): both options" in text
    assert "\n  stream  expected" in text and "\n  store   expected" in text
    assert "chosen: " in text and "stated 2 GB/s" in text
    chosen = text.split("chosen: ", 1)[1].split()[0]
    assert res["source"] == chosen and res["plan"].source == chosen
    # no stores: streaming is the only option, and it says why
    run = _stream_run(root, stored, "auto-nostores")
    res = reduce(run, str(models[0]), [str(m) for m in models[1:]],
                 ReduceConfig(**SETTINGS, source="auto"), CPU, dry_run=True, gemm_rate=1e10,
                 **KW)
    assert res["source"] == "stream"
    assert "stream, the only one that can run (store: no activation store" in res["describe"]


# ---------------------------------------------------------------------------- the planner

def test_forward_flops_by_hand():
    # 2 layers, d_model 32, d_mlp 128, window 64:
    # N = 2 (4 32^2 + 2 32 128) = 24,576; 2 N + 2 L n_ctx d = 49,152 + 8,192
    assert forward_flops_per_token(2, 32, 128, 64) == 57_344.0
    # gated: N = 2 (4 32^2 + 3 32 128) = 32,768 -> 65,536 + 8,192
    assert forward_flops_per_token(2, 32, 128, 64, gated=True) == 73_728.0
    assert forward_passes(1, 3, 2) == (3, 4)
    assert forward_passes(2, 1, 4) == (2, 2)
    # self co-moments folded in the first panel's pass: no pass of their own
    assert forward_passes(1, 3, 2, self_fused=True) == (3, 3)
    assert forward_passes(2, 1, 4, self_fused=True) == (2, 1)


def _stream_plan(max_panels, n_workers=1, batches=()):
    stream = StreamShape(positions=100, flops_ref=10.0, flops_others=(20.0, 30.0),
                         resident_bytes=10**6, transient_bytes=10**5,
                         labels=("r", "o1", "o2"), batches=batches)
    return make_plan(1000, 64, [PairShape("o1", 48, 16), PairShape("o2", 48, 16)],
                     memory="8GB", max_panels=max_panels, store_chunk_rows=64,
                     block_tokens=256, stream=stream, n_workers=n_workers)


def test_stream_plan_counts_forwards_per_panel():
    one, two = _stream_plan(1), _stream_plan(2)
    assert one.bytes_read == 0 and two.bytes_read == 0
    # one group, one chain: reference and others forwarded once per panel (the others'
    # self co-moments ride along in the first panel's pass)
    assert one.self_fused and two.self_fused
    assert one.forward_flops == 100 * (10 * 1 + (20 + 30) * 1) == 6_000
    assert two.forward_flops == 100 * (10 * 2 + (20 + 30) * 2) == 12_000
    assert two.forward_passes == {"r": 2, "o1": 2, "o2": 2}
    assert two.passes()["others"] == {"o1": 2, "o2": 2}
    rates = Rates(forward_flops_per_s=1000.0)
    assert expected_seconds(two, rates)["forward"] == pytest.approx(12.0)
    # two chains (a cluster): the self co-moments take a pass of their own
    chained = _stream_plan(2, n_workers=2)
    assert not chained.self_fused and chained.passes()["others"] == {"o1": 3, "o2": 3}
    assert chained.forward_flops == 100 * (10 * 2 + (20 + 30) * 3) == 17_000
    assert chained.forward_passes == {"r": 2, "o1": 3, "o2": 3}
    # a model whose token set is one forward batch is forwarded once in all
    single = _stream_plan(2, batches=(1, 3, 1))
    assert single.forward_passes == {"r": 1, "o1": 2, "o2": 1}
    assert single.forward_flops == 100 * (10 * 1 + 20 * 2 + 30 * 1)
    # the fused fold holds the self co-moments (2 x 3 layers of 16 x 16 f64) beside
    # its accumulators
    unfused = _stream_plan(2, n_workers=2)
    assert two.task_peaks["fold"] >= unfused.task_peaks["fold"] + 2 * 3 * 16 * 16 * 8 \
        - 64 * 1000
    # the models stay loaded: every task's peak holds them
    store = make_plan(1000, 64, [PairShape("o1", 48, 16), PairShape("o2", 48, 16)],
                      memory="8GB", max_panels=2, store_chunk_rows=64, block_tokens=256)
    assert min(two.task_peaks.values()) >= min(store.task_peaks.values()) + 10**6 - 64 * 1000


def test_stream_batches_and_the_paper_on_one_gpu():
    """GPT-2 small windows of 1024: a CPU forwards 4 per batch (MAX_BATCH_TOKENS 4096),
    a GPU 6 (capture buffer <= 512 MB: 512e6 // (2 x 36,864) = 6,944 tokens); the
    paper's 4 pairs then fit one 80 GB device in one pass, checkpointing every ~1e16
    FLOP, not every 2e13 as on a CPU."""
    import math

    from ooc_universal.plan import stream_shape
    from ooc_universal.sources import default_batch_windows
    assert default_batch_windows(1024, 4883, "cpu", 36864) == 4
    assert default_batch_windows(1024, 4883, "cuda", 36864) == 6
    assert default_batch_windows(64, 3, "cuda", 256) == 3  # at most the token set's
    meta = {"window": 1024, "batch_windows": 6, "n_neurons": 36864, "n_layers": 12,
            "d_mlp": 3072, "d_model": 768, "n_head": 12, "n_params": 124_439_808,
            "n_windows": math.ceil(5_000_000 / 1023)}
    metas = [dict(meta, label=x) for x in "abcde"]
    plan = make_plan(5_000_000, 36864, [PairShape(x, 36864, 3072) for x in "bcde"],
                     memory="80GB", device="cuda", precision="bf16", store_chunk_rows=64,
                     stream=stream_shape(metas))
    assert (len(plan.groups), len(plan.panels)) == (1, 1)
    assert plan.self_fused  # the self co-moments ride along: one pass per model
    assert plan.forward_passes == {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}
    # 5 models of 124M fp32 parameters + their capture buffers (6 x 1024 x 36,864 x 2 B)
    assert plan.stream.resident_bytes == 5 * (124_439_808 * 4 + 6 * 1024 * 36864 * 2)
    per_block = 2.0 * plan.block_tokens * 36864 * 4 * 36864
    assert plan.blocks_per_segment == max(8, int(1e16 / per_block))


def test_source_options_by_hand():
    stream = _stream_plan(1)
    store = make_plan(1000, 64, [PairShape("o1", 48, 16), PairShape("o2", 48, 16)],
                      memory="8GB", max_panels=1, store_chunk_rows=64, block_tokens=256)
    rates = Rates(read_bytes_per_s=1e6, disk_bytes_per_s=1e5, forward_flops_per_s=1e3)
    # bytes read: reference 1000 x 64 x 2, each other once for the fold, once for self
    assert store.bytes_read == 1000 * 64 * 2 + 2 * 2 * 1000 * 48 * 2 == 512_000
    opt = store_option(store, rates)
    assert opt.parts["read"] == pytest.approx(0.512) and opt.parts["extract"] == 0
    assert opt.disk_bytes == store.work_disk_bytes + store.output_bytes
    opt = store_option(store, rates, write_bytes=10**6, extract_flops=5e3)
    assert opt.parts["extract"] == pytest.approx(10.0)  # the writes: 1e6 B at 1e5 B/s
    assert opt.disk_bytes == 10**6 + store.work_disk_bytes + store.output_bytes
    s = stream_option(stream, rates)
    assert s.parts["forward"] == pytest.approx(6.0) and s.disk_bytes < opt.disk_bytes


def test_choose_source_by_hand():
    fast_big = SourceOption("store", 50.0, 10 * 10**9, 10**9)
    slow_small = SourceOption("stream", 100.0, 1 * 10**9, 10**9)
    assert choose_source([slow_small, fast_big])[0].source == "store"
    chosen, why = choose_source([slow_small, fast_big], free_disk=5 * 10**9)
    assert chosen.source == "stream" and "store needs 10.0 GB of disk" in why
    chosen, why = choose_source([slow_small, fast_big], free_disk=20 * 10**9)
    assert chosen.source == "store" and why == "expected 50.0 s against 100.0 s with stream"
    gone = SourceOption("store", 1.0, 0, 0, unavailable="no activation store for 'x'")
    chosen, why = choose_source([slow_small, gone])
    assert chosen.source == "stream" and "store cannot run: no activation store" in why
    with pytest.raises(OocError, match="no block source can run here"):
        choose_source([slow_small, fast_big], free_disk=10**8)


# ---------------------------------------------------------------------------- the CLI

def test_cli_source_flag(zoo):
    root, models, stored, _ = zoo
    run = _stream_run(root, stored, "cli")
    runner = CliRunner()
    args = ["reduce", "--run-dir", str(run), "-r", str(models[0]), str(models[1]),
            "--device", "cpu", "--block-tokens", "256", "--no-progress"]
    out = runner.invoke(cli, args + ["--source", "stream", "--dry-run"])
    assert out.exit_code == 0, out.output
    assert "blocks from forward passes (stream)" in out.output and "forwards" in out.output
    out = runner.invoke(cli, args + ["--source", "stream"])
    assert out.exit_code == 0, out.output
    assert "reduced 1 pair(s) from forward passes" in out.output
    assert (run / "reduce" / "m0__m1.h5").exists()


@pytest.mark.parametrize("flag, value, says", [
    ("--source", "disk", "'disk' is not one of 'store', 'stream', 'auto'"),
    ("--disk-gbps", "-1", "disk_gbps"),
    ("--disk-gbps", "fast", "'fast' is not a valid float"),
])
def test_cli_bad_source_values_give_one_line(zoo, flag, value, says, capfd):
    from ooc_universal.cli.main import main
    root, models, stored, _ = zoo
    with pytest.raises(SystemExit) as exc:
        main(["reduce", "--run-dir", str(stored), "-r", "m0", "m1", flag, value,
              "--dry-run"])
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert says in lines[0], err


# ---------------------------------------------------------------------------- devices
# The CUDA paths (accumulators on the device, blocks computed there): run on a GPU, or on
# a CPU with OOC_TEST_DEVICE=cpu (bench/gpu_check.sh's smoke mode).

DEVICE = os.environ.get("OOC_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
needs_device = pytest.mark.skipif(not DEVICE, reason="no CUDA device (OOC_TEST_DEVICE=cpu "
                                                     "runs these on a CPU)")


@needs_device
@pytest.mark.parametrize("precision, forward, tol", [
    ("fp32", "fp32", 1e-5), ("bf16", "fp32", 2e-3),
    # CUDA's default forward (bf16 autocast) moves the streamed rows by bf16 rounding:
    # the bound on the row max is 2e-3 of the fp32 forward's, and the store's
    # fp16 rows add their own rounding
    ("fp32", "bf16", 3e-3)])
def test_device_stream_and_store_match_float64(zoo, precision, forward, tol):
    """Both sources on DEVICE against float64 numpy from the stored fp16 activations
    (the stream's forward passes in `forward` precision)."""
    from tests.reduce_helpers import reference_stats
    root, models, stored, _ = zoo
    with open_store(stored / "stores" / "m0.h5") as a, open_store(stored / "stores" / "m1.h5") as b:
        x, y = a.read_rows(0, a.n_tokens), b.read_rows(0, b.n_tokens)
    want = reference_stats(x, y, 128, [3, 4])
    compute = ComputeConfig(device=DEVICE)
    outs = {}
    run = _stream_run(root, stored, f"device-{precision}-{forward}")
    res = reduce(run, str(models[0]), [str(models[1])],
                 ReduceConfig(**SETTINGS, precision=precision, source="stream",
                              forward_precision=forward), compute, **KW)
    outs["stream"] = _read(res["outputs"][0])
    res = reduce(stored, "m0", ["m1"], ReduceConfig(**SETTINGS, precision=precision), compute,
                 force=True, **KW)
    outs["store"] = _read(res["outputs"][0])
    for name, got in outs.items():
        assert np.abs(got["row_max"] - want["row_max"]).max() <= tol, name
        assert np.abs(got["col_max"] - want["col_max"]).max() <= tol, name
        assert np.abs(got["baseline/row_max"] - want["baseline"]).max() <= max(tol, 1e-5), name
        srt = np.sort(want["rho"], axis=1)
        clear = srt[:, -1] - srt[:, -2] > 2 * tol
        assert np.array_equal(got["row_argmax"][clear], want["row_argmax"][clear]), name


def test_compare_runs_finds_a_changed_row_max(zoo, tmp_path):
    """The GPU check's CUDA-vs-CPU comparison (bench_stream --compare-runs): equal runs
    pass with zero differences; a row max moved by 3e-3 fails the run, one line naming
    the pair."""
    from ooc_universal.bench import bench_stream
    root, models, stored, _ = zoo
    twin = tmp_path / "twin"
    shutil.copytree(stored / "reduce", twin / "reduce")
    doc = bench_stream.main(["--compare-runs", str(stored), str(twin)])
    assert set(doc["pairs"]) == {"m0__m1.h5", "m0__m2.h5"}
    for got in doc["pairs"].values():
        assert got["max_abs_row_max_diff"] == 0 and got["argmax_identical_fraction"] == 1
    with h5py.File(twin / "reduce" / "m0__m2.h5", "r+") as f:
        f["row_max"][3] += 3e-3
    with pytest.raises(SystemExit, match=r"runs differ or are missing: \['m0__m2.h5'\]"):
        bench_stream.main(["--compare-runs", str(stored), str(twin)])
    assert bench_stream.compare_runs(stored, twin)["pairs"]["m0__m2.h5"][
        "max_abs_row_max_diff"] == pytest.approx(3e-3, rel=1e-3)
