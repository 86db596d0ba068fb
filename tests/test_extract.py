"""extract: hooked activations vs the weights, resume after SIGKILL, refusals."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ooc_universal.steps import extract as extract_mod
from ooc_universal import models
from ooc_universal.cli.main import main
from ooc_universal.config import ComputeConfig, ExtractConfig
from ooc_universal.errors import OocError, StaleInputError
from ooc_universal.steps.extract import extract, plan_batch
from ooc_universal.formats.store import open_store
from ooc_universal.formats.tokens import load_token_set, save_token_set
from ooc_universal.steps.tokens import build_token_set
from tests.tiny import save_tiny, tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

WINDOW = 64
CPU = ComputeConfig(device="cpu")
REPO = Path(__file__).resolve().parents[1]


def make_tokens(run_dir: Path, seed: int = 0, n_windows: int = 40, n_tokens: int | None = None):
    """A byte token set from random bytes, ~5% newlines (invalid positions), saved to run_dir."""
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, 256, size=n_windows * WINDOW * 2, dtype=np.int32)
    stream[rng.random(stream.size) < 0.05] = 10
    n_tokens = n_tokens or int(n_windows * (WINDOW - 1) * 0.9)
    ts = build_token_set(stream, n_tokens, tokenizer="bytes", window=WINDOW)
    save_token_set(ts, run_dir)
    return ts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny0", seed=0)


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    make_tokens(run)
    return run


def gelu_new(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def reference_acts(model_dir: Path, token_set) -> np.ndarray:
    """Float64, from the weights: gelu_new(ln_2(h) W_fc + b_fc) per layer, valid rows only."""
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float64).eval()
    ln2 = {}
    hooks = [blk.ln_2.register_forward_hook(
        lambda mod, args, out, i=i: ln2.__setitem__(i, out.numpy().copy()))
        for i, blk in enumerate(model.transformer.h)]
    with torch.no_grad():
        model.transformer(input_ids=torch.from_numpy(token_set.input_ids).long(), use_cache=False)
    for h in hooks:
        h.remove()
    cols = []
    for i, blk in enumerate(model.transformer.h):
        w = blk.mlp.c_fc.weight.detach().numpy()      # Conv1D: (d_model, d_mlp)
        b = blk.mlp.c_fc.bias.detach().numpy()
        cols.append(gelu_new(ln2[i] @ w + b)[token_set.valid])  # (n_valid, d_mlp), row-major
    return np.concatenate(cols, axis=1)


def error_lines(err: str) -> list[str]:
    """The CLI's own stderr lines (transformers may draw a weight-loading bar before)."""
    return [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("error:")]


def assert_one_error_line(err: str, startswith: str, contains: str = "") -> None:
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(startswith) and contains in lines[0], err
    assert err.rstrip("\n").endswith(lines[0])  # nothing after it


def spy_load_model(monkeypatch):
    """Wrap models.load_model so the test sees whether the LM head / ln_f ever run."""
    calls = {"lm_head": 0, "ln_f": 0, "loads": 0}
    real = models.load_model

    def load(*a, **kw):
        loaded = real(*a, **kw)
        calls["loads"] += 1
        loaded.model.lm_head.register_forward_hook(
            lambda *_: calls.__setitem__("lm_head", calls["lm_head"] + 1))
        loaded.model.transformer.ln_f.register_forward_hook(
            lambda *_: calls.__setitem__("ln_f", calls["ln_f"] + 1))
        return loaded
    monkeypatch.setattr(extract_mod.models, "load_model", load)
    return calls


def test_activations_equal_recomputation_from_weights(run_dir, model_dir, monkeypatch):
    calls = spy_load_model(monkeypatch)
    stats = {}
    # 256-row chunks and 3-window batches: batches straddle chunk bounds, the last chunk is short
    path = extract(run_dir, str(model_dir), ExtractConfig(batch_size=3), CPU, block_tokens=256,
                   progress=False, stats=stats)
    assert path == run_dir / "stores" / "tiny0.h5"
    assert calls == {"lm_head": 0, "ln_f": 0, "loads": 1}
    ts = load_token_set(run_dir)
    ref = reference_acts(model_dir, ts)
    with open_store(path) as s:
        assert s.n_tokens == ts.n_tokens == ref.shape[0] and s.n_neurons == ref.shape[1] == 256
        assert s.n_layers == 2 and s.d_mlp == 128 and s.block_tokens == 256
        assert s.attrs["token_hash"] == ts.hash and s.attrs["model_id"] == str(model_dir)
        assert s.attrs["label"] == "tiny0" and s.attrs["compression"] == "none"
        got = s.read_rows(0, s.n_tokens).astype(np.float64)
    # fp16 rounding of the fp32 forward: within half an fp16 ulp (+ fp32 noise) of float64
    tol = np.maximum(np.abs(ref), 2.0 ** -14) * 2.0 ** -11 + 1e-5
    assert np.all(np.abs(got - ref) <= tol), np.max(np.abs(got - ref) - tol)
    # and almost every entry is exactly the fp16 rounding of the float64 value
    assert np.mean(got == ref.astype(np.float16).astype(np.float64)) > 0.97
    assert ref.std() > 0.1  # the activations vary (not a trivially passing comparison)
    assert stats["status"] == "written" and stats["blocks_written"] == s.n_blocks
    assert stats["windows_forwarded"] == ts.input_ids.shape[0]


def test_positions_follow_the_valid_mask(tmp_path, model_dir):
    """Rows are exactly the valid positions in order: a window whose last valid position is
    cut by n_tokens contributes only its first rows (checked against the weights)."""
    run = tmp_path / "run"
    make_tokens(run, seed=3, n_windows=12, n_tokens=500)
    ts = load_token_set(run)
    assert ts.n_tokens == 500 and int(ts.valid.sum()) == 500
    path = extract(run, str(model_dir), ExtractConfig(batch_size=5), block_tokens=64,
                   progress=False)
    ref = reference_acts(model_dir, ts)
    with open_store(path) as s:
        got = s.read_rows(0, s.n_tokens).astype(np.float64)
    assert np.allclose(got, ref, rtol=2.0 ** -10, atol=1e-4)


def test_compressed_extract_equals_uncompressed(tmp_path, model_dir):
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    make_tokens(run_a, seed=1)
    shutil.copytree(run_a / "tokens", run_b / "tokens")
    pa = extract(run_a, str(model_dir), block_tokens=256, progress=False)
    pb = extract(run_b, str(model_dir), ExtractConfig(compression="gzip"), block_tokens=256,
                 progress=False)
    with open_store(pa) as a, open_store(pb) as b:
        assert not a.compressed and b.compressed and b.attrs["compression"] == "gzip"
        np.testing.assert_array_equal(a.read_rows(0, a.n_tokens), b.read_rows(0, b.n_tokens))
    assert sorted(p.name for p in (run_b / "stores").iterdir() if p.name[0] != ".") \
        == ["tiny0.h5", "tiny0.h5.sha256", "tiny0.topk.npz", "tiny0.topk.npz.sha256"]


def test_existing_complete_store_is_skipped(run_dir, model_dir, monkeypatch):
    path = extract(run_dir, str(model_dir), progress=False)
    before = (path.stat().st_mtime_ns, path.read_bytes())
    calls = spy_load_model(monkeypatch)
    stats = {}
    assert extract(run_dir, str(model_dir), progress=False, stats=stats) == path
    assert stats["status"] == "skipped" and calls["loads"] == 0  # not even loaded
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before


def test_store_from_another_token_set_is_refused(tmp_path, model_dir, capsys):
    run = tmp_path / "run"
    make_tokens(run, seed=0)
    path = extract(run, str(model_dir), progress=False)
    before = path.read_bytes()
    shutil.rmtree(run / "tokens")
    make_tokens(run, seed=9)  # another token set in the same run dir
    with pytest.raises(StaleInputError, match="token_hash"):
        extract(run, str(model_dir), progress=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["extract", "--run-dir", str(run), str(model_dir), "--no-progress"])
    assert exc.value.code == 1
    assert_one_error_line(capsys.readouterr().err, "error: ", "never appended")
    assert path.read_bytes() == before


def test_partial_from_another_token_set_is_refused(tmp_path, model_dir):
    run = tmp_path / "run"
    make_tokens(run, seed=0)
    stores = run / "stores"
    from ooc_universal.formats.store import PartialStore, StorePaths
    ts = load_token_set(run)
    attrs = dict(model_id=str(model_dir), revision="", label="tiny0", name=str(model_dir),
                 step=-1, n_layers=2, d_mlp=128, token_hash="0" * 64, compute_dtype="float32")
    stores.mkdir()
    PartialStore.create(StorePaths.of(stores, "tiny0"), attrs, ts.n_tokens, 256, 64).close()
    with pytest.raises(StaleInputError, match="token_hash"):
        extract(run, str(model_dir), progress=False)
    assert not (stores / "tiny0.h5").exists()


def _stores_listing(run: Path) -> list[str]:
    d = run / "stores"
    return sorted(p.name for p in d.iterdir() if p.name[0] != ".") if d.is_dir() else []


def test_not_enough_disk(run_dir, model_dir, monkeypatch, capsys):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real(p)._replace(free=100_000))
    with pytest.raises(SystemExit) as exc:
        main(["extract", "--run-dir", str(run_dir), str(model_dir), "--no-progress"])
    assert exc.value.code == 1
    assert_one_error_line(capsys.readouterr().err, "error: not enough disk")
    assert _stores_listing(run_dir) == []


def test_unwritable_run_dir(run_dir, model_dir, capsys):
    (run_dir / "stores").write_text("a file where the stores folder should be")
    with pytest.raises(SystemExit) as exc:
        main(["extract", "--run-dir", str(run_dir), str(model_dir), "--no-progress"])
    assert exc.value.code == 1
    assert_one_error_line(capsys.readouterr().err, "error: cannot write to run directory")
    assert not list(run_dir.rglob("*.h5")) and not list(run_dir.rglob("*.partial"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_run_dir(run_dir, model_dir, capsys):
    run_dir.chmod(0o555)
    try:
        with pytest.raises(SystemExit) as exc:
            main(["extract", "--run-dir", str(run_dir), str(model_dir), "--no-progress"])
    finally:
        run_dir.chmod(0o755)
    assert exc.value.code == 1
    assert_one_error_line(capsys.readouterr().err, "error: cannot write")


def test_memory_bounds_the_batch(run_dir, model_dir, monkeypatch):
    loaded = models.load_model(str(model_dir))
    ts = load_token_set(run_dir)
    per = extract_mod.window_bytes(loaded, WINDOW)
    chunk = 64 * 256 * 2
    plan_batch(loaded, ts, 10**12, chunk)   # first call faults in weights: RSS settles
    rss = extract_mod.current_rss_bytes()
    fixed = rss + extract_mod.N_BUFFERS * chunk + extract_mod.SLACK_BYTES
    assert plan_batch(loaded, ts, fixed + 3 * per + per // 2, chunk) == 3
    assert plan_batch(loaded, ts, 10**12, chunk) == ts.input_ids.shape[0]  # capped by windows
    # on a CPU, also by the MLP's temporaries (tokens x d_mlp): here 2 windows' worth
    monkeypatch.setattr(extract_mod, "CPU_MLP_ELEMENTS", 2 * WINDOW * loaded.d_mlp + 5)
    assert plan_batch(loaded, ts, 10**12, chunk) == 2
    # on a GPU: the forward's bytes against 90 % of the device's free memory, the
    # host's pinned capture copy (fp16, all neurons) against --memory
    free = {"bytes": 10**15}
    monkeypatch.setattr(extract_mod, "_gpu_free_bytes", lambda device: free["bytes"])
    assert plan_batch(loaded, ts, 10**12, chunk, device="cuda") == ts.input_ids.shape[0]
    free["bytes"] = int((3 * per + per // 2) / 0.9)
    assert plan_batch(loaded, ts, 10**12, chunk, device="cuda") == 3
    pinned = WINDOW * loaded.n_neurons * 2   # 32 KB here: hold the RSS still
    monkeypatch.setattr(extract_mod, "current_rss_bytes", lambda: rss)
    free["bytes"] = 10**15
    assert plan_batch(loaded, ts, fixed + 2 * pinned + pinned // 2, chunk, device="cuda") == 2
    free["bytes"] = int(per / 2)
    with pytest.raises(OocError, match=r"cuda has .* free; extracting .* 1 window\(s\) .*"
                                       r"free the GPU, lower --batch-size, or use --device cpu"):
        plan_batch(loaded, ts, 10**12, chunk, device="cuda")
    free["bytes"] = int(4 * per)
    with pytest.raises(OocError, match=r"with 5 window\(s\)"):
        plan_batch(loaded, ts, 10**12, chunk, device="cuda", batch_size=5)
    # the running top-k's memory is part of the fixed share
    k_bytes = extract_mod.topk_bytes(loaded.n_neurons, 20)
    assert plan_batch(loaded, ts, fixed + k_bytes + 3 * per + per // 2, chunk, topk=20) == 2
    with pytest.raises(OocError, match="raise --memory to at least"):
        plan_batch(loaded, ts, fixed - 10**6, chunk)
    with pytest.raises(OocError, match="lower --batch-size"):
        plan_batch(loaded, ts, fixed + 2 * per, chunk, batch_size=5)


def test_memory_option_too_small_is_one_line(run_dir, model_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["extract", "--run-dir", str(run_dir), str(model_dir), "--memory", "100MB",
              "--no-progress"])
    assert exc.value.code == 1
    assert_one_error_line(capsys.readouterr().err, "error: --memory", "raise --memory")
    assert not list(run_dir.rglob("*.h5"))


def test_resume_after_sigkill_is_bit_identical(tmp_path, model_dir):
    run_a, run_b = tmp_path / "killed", tmp_path / "clean"
    make_tokens(run_a, seed=2)
    shutil.copytree(run_a / "tokens", run_b / "tokens")
    args = ["--block-tokens", "64", "--batch-size", "2", "--device", "cpu", "--no-progress"]
    env = dict(os.environ, OOC_TEST_SLEEP_PER_BLOCK="0.4", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "ooc_universal", "extract", "--run-dir",
                             str(run_a), str(model_dir), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ledger = run_a / "stores" / "tiny0.ledger"
    deadline = time.monotonic() + 120
    n_done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if ledger.exists():
            n_done = ledger.read_text().count("\ndone ")
            if n_done >= 3:
                break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stores = run_a / "stores"
    assert not (stores / "tiny0.h5").exists()
    assert (stores / "tiny0.h5.partial").exists() and ledger.exists()
    done_at_kill = ledger.read_text().count("\ndone ")
    assert done_at_kill >= 3

    stats = {}
    path_a = extract(run_a, str(model_dir), ExtractConfig(batch_size=2), CPU, block_tokens=64,
                     progress=False, stats=stats)
    assert stats["status"] == "resumed"
    assert stats["blocks_done_before"] == done_at_kill
    # finished blocks were not recomputed
    assert stats["blocks_written"] == stats["blocks_total"] - done_at_kill
    assert stats["tokens_written"] < load_token_set(run_a).n_tokens
    assert not ledger.exists() and not (stores / "tiny0.h5.partial").exists()

    path_b = extract(run_b, str(model_dir), ExtractConfig(batch_size=2), CPU, block_tokens=64,
                     progress=False)
    assert path_a.read_bytes() == path_b.read_bytes()


def test_help_explains_the_store():
    from click.testing import CliRunner
    from ooc_universal.cli.main import cli
    out = CliRunner().invoke(cli, ["extract", "--help"]).output
    for word in ("float16", "valid", "layer * d_mlp + neuron", "Resumable", "--memory"):
        assert word in out, word


def test_plan_counts_lazily_mapped_weights(tmp_path):
    """transformers maps safetensors lazily: the resident size measured for the batch plan
    must include the weights (the first forward pass faults them in anyway)."""
    from ooc_universal import models
    from ooc_universal.steps.extract import _touch_weights, current_rss_bytes
    path = save_tiny(tmp_path / "m", n_layer=4, n_embd=256, n_head=4)    # ~13 MB fp32
    weight_bytes = sum(p.numel() * 4 for p in tiny_model(n_layer=4, n_embd=256,
                                                         n_head=4).parameters())
    before = current_rss_bytes()
    loaded = models.load_model(str(path), "cpu", torch.float32)
    _touch_weights(loaded.model)
    assert current_rss_bytes() - before >= 0.8 * weight_bytes


def test_legacy_keywords_map_to_the_sections(tmp_path, model_dir):
    """Transitional: extract(..., batch_size=, device=, memory=, compression=) as before
    the sections, the same store; an unknown keyword is a TypeError."""
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    make_tokens(run_a, seed=3, n_windows=8)
    shutil.copytree(run_a / "tokens", run_b / "tokens")
    stats = {}
    pa = extract(run_a, str(model_dir), block_tokens=64, batch_size=2, device="cpu",
                 memory="2GB", compression=None, progress=False, stats=stats)
    assert (stats["batch_size"], stats["device"], stats["memory_bytes"]) == (2, "cpu", 2 * 10**9)
    pb = extract(run_b, str(model_dir), ExtractConfig(batch_size=2),
                 ComputeConfig(device="cpu", memory="2GB"), block_tokens=64, progress=False)
    assert pa.read_bytes() == pb.read_bytes()
    with pytest.raises(TypeError, match="windows"):
        extract(run_a, str(model_dir), windows=3)


def test_staged_gather_matches_the_direct_one(model_dir):
    """The GPU path (gather on the device into a host buffer, then route contiguous rows)
    gives the rows the CPU path (route straight from the capture buffer) gives; here
    both on the CPU, the host buffer standing in for the pinned one."""
    from ooc_universal.steps.extract import _Capture, gather_rows
    loaded = models.load_model(str(model_dir))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    capture = _Capture(loaded, ids.numel(), torch.device("cpu"))
    try:
        top = capture.forward(models.base_model(loaded.model), ids)
    finally:
        capture.remove()
    assert top > 0
    idx = np.flatnonzero(np.random.default_rng(0).random(ids.numel()) > 0.3)
    direct = np.empty((len(idx), capture.cap.shape[1]), np.float16)
    gather_rows(*capture.valid_rows(idx), direct)
    capture.host = torch.empty_like(capture.cap)
    src, sel = capture.valid_rows(idx)
    staged = np.empty_like(direct)
    gather_rows(src, sel, staged)
    np.testing.assert_array_equal(staged, direct)
    np.testing.assert_array_equal(direct, capture.cap.numpy()[idx])


def test_gather_rows_by_runs():
    from ooc_universal.steps.extract import gather_rows
    src = np.arange(40, dtype=np.float16).reshape(20, 2)
    positions = np.array([0, 1, 2, 5, 6, 9, 10, 11, 19])
    out = np.zeros((len(positions), 2), np.float16)
    gather_rows(src, positions, out)
    np.testing.assert_array_equal(out, src[positions])
    gather_rows(src, positions[:0], out[:0])  # nothing to copy
