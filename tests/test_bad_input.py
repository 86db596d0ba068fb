"""Bad input through the CLI: one clear line (the problem and the fix), a non-zero exit,
and no output that looks complete. Plus: zero-variance neurons warn (exit 0), and Ctrl-C
leaves a state that the same command resumes.

Every case copies one small finished run (token set, two stores, a reduce file, universal
sets), breaks one thing, runs `ooc-universal ...` in-process through cli.main.main (the
console script), and compares the run's complete-looking files before and after.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from ooc_universal.cli.main import main
from ooc_universal.config import RunConfig
from ooc_universal.steps.extract import extract
from ooc_universal.steps.reduce import reduce
from ooc_universal.rundir import seal
from ooc_universal.status import status
from ooc_universal.steps.universal import universal
from tests.reduce_helpers import planted_acts, write_store
from tests.test_extract import make_tokens
from tests.test_universal import write_reduced
from tests.tiny import save_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
EXTRACT_ARGS = ["--block-tokens", "128", "--batch-size", "2", "--device", "cpu",
                "--no-progress"]
FAKE_PID = "424242"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Models (good and broken) and a finished run: tokens, stores t0 t1, reduce, universal."""
    root = tmp_path_factory.mktemp("bad")
    m = root / "models"
    save_tiny(m / "t0", seed=0)
    save_tiny(m / "t1", seed=1)
    save_tiny(m / "vocab100", seed=2, vocab_size=100, bos_token_id=99)
    save_tiny(m / "bos0", seed=3, bos_token_id=0)
    save_tiny(m / "ctx32", seed=4, n_positions=32)
    save_tiny(m / "t0x3", seed=5, n_layer=3)
    nan = save_tiny(m / "nanw", seed=6)
    from transformers import BertConfig, GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained(nan)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    model.save_pretrained(nan)
    BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               vocab_size=257).save_pretrained(m / "bert")
    (m / "noconfig").mkdir()
    run = root / "run"
    make_tokens(run, seed=4, n_windows=20)
    for name in ("t0", "t1"):
        extract(run, str(m / name), block_tokens=128, batch_size=2, device="cpu",
                progress=False)
    reduce(run, "t0", ["t1"], device="cpu", progress=False)
    universal(run, progress=False)
    (root / "text.txt").write_bytes(bytes(range(32, 127)) * 200)
    return root


def token_hash(run: Path) -> str:
    return json.loads((run / "tokens" / "meta.json").read_text())["hash"]


def complete_files(run: Path) -> dict:
    """Every file whose name says "finished", with its size and mtime."""
    names = ("meta.json", "sets.json", "table1.json", "persistence.json", "ablation.json",
             "index.html", "config.toml")
    out = {}
    for p in run.rglob("*") if run.exists() else []:
        if p.is_file() and (p.suffix in (".h5", ".sha256") or p.name in names):
            st = p.stat()
            out[str(p.relative_to(run))] = (st.st_size, st.st_mtime_ns)
    return out


@contextmanager
def held_lock(path: Path, pid: str = FAKE_PID):
    """Another process's lock on `path` (a second open file description: flock conflicts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{pid}\n".encode(), 0)
    try:
        yield
    finally:
        os.close(fd)


# Each case: setup(run, models, root, monkeypatch, stack) -> argv (run = a copy of the
# finished run); then the words that name the problem and the fix in the one error line.

def _extract(model):
    return lambda run, m, root, mp: ["extract", "--run-dir", str(run), str(m / model),
                                     *EXTRACT_ARGS]


def _hub(spec, offline=True):
    def setup(run, m, root, mp):
        from huggingface_hub import constants
        from huggingface_hub.utils import _http
        mp.setattr(constants, "HF_HUB_OFFLINE", offline)
        mp.setattr(constants, "HF_HUB_CACHE", str(root / "empty-hf-cache"))
        mp.setattr(_http.time, "sleep", lambda s: None)  # the hub client's retry back-off
        return ["extract", "--run-dir", str(run), spec, *EXTRACT_ARGS]
    return setup


def _drop(*rel):
    def setup(run, m, root, mp, then=None):
        for r in rel:
            p = run / r
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return setup


def _seq(*steps):
    def setup(run, m, root, mp):
        argv = None
        for s in steps:
            argv = s(run, m, root, mp) or argv
        return argv
    return setup


def _argv(*args):
    return lambda run, m, root, mp: [a.format(run=run, m=m, root=root) for a in args]


def _truncate(rel, size):
    def setup(run, m, root, mp):
        p = run / rel
        with open(p, "r+b") as f:
            f.truncate(size if size >= 0 else p.stat().st_size + size)
    return setup


def _scribble(rel, offset=0, n=4096):
    def setup(run, m, root, mp):
        with open(run / rel, "r+b") as f:
            f.seek(offset)
            f.write(b"\x5a" * n)
    return setup


def _store(label, acts=None, **kw):
    """write_store into the run with its token hash (acts: (n_tokens, 2*128) by default)."""
    def setup(run, m, root, mp):
        n = json.loads((run / "tokens" / "meta.json").read_text())["n_tokens"]
        a = np.random.default_rng(0).standard_normal((n, 256)) if acts is None else acts(n)
        kw2 = dict(dict(n_layers=2, d_mlp=128, token_hash=token_hash(run)), **kw)
        write_store(run, label, a, kw2.pop("n_layers"), kw2.pop("d_mlp"),
                    block_tokens=128, **kw2)
    return setup


def _with_bad(value):
    def acts(n):
        a = np.random.default_rng(1).standard_normal((n, 256))
        a[n // 2, 7] = value
        return a
    return acts


def _lock(rel):
    def setup(run, m, root, mp):
        mp.setattr(sys.modules[__name__], "_LOCK_PATH", run / rel)
    return setup


_LOCK_PATH = None


def _config(run, m, root, **kw):
    d = dict(models=[str(m / "t0"), str(m / "t1")], checkpoints=[], source=str(root / "text.txt"),
             tokenizer="bytes", n_tokens=1000, n_eval_tokens=0, window=64, device="cpu")
    d.update(kw)
    return RunConfig(**d).to_toml()


def _run_config_differs(run, m, root, mp):
    (run / "config.toml").write_text(_config(run, m, root, n_tokens=999))
    (root / "cfg.toml").write_text(_config(run, m, root))
    return ["run", str(root / "cfg.toml"), "--run-dir", str(run), "--no-progress"]


def _run_with(**kw):
    def setup(run, m, root, mp):
        (root / "cfg2.toml").write_text(_config(run, m, root))
        args = ["run", str(root / "cfg2.toml"), "--run-dir", str(run / "new"), "--no-progress"]
        for k, v in kw.items():
            args += [f"--{k}", v]
        return args
    return setup


def _reduce_argv(*others, extra=()):
    return _argv("reduce", "--run-dir", "{run}", "-r", "t0", *others, "--device", "cpu",
                 "--no-progress", *extra)


def _sidecar_sha(rel, sha="0" * 64):
    """The store's recorded checksum changes as a re-extract from other weights changes
    it: its last block's checksum and the store checksum they add up to (so the store
    itself still opens; the reduce output made from the old one is what is stale)."""
    def setup(run, m, root, mp):
        from ooc_universal.formats.store import blocks_sha256
        p = run / (rel + ".sha256")
        rec = json.loads(p.read_text())
        rec["block_sha256"][-1] = sha
        rec["sha256"] = blocks_sha256(rec["block_sha256"])
        p.write_text(json.dumps(rec))
    return setup


def _disk_full_savez(run, m, root, mp):
    import errno

    from ooc_universal.steps import tokens as tokens_mod

    def savez(f, **arrays):
        raise OSError(errno.ENOSPC, "No space left on device", str(getattr(f, "name", f)))
    mp.setattr(tokens_mod.np, "savez", savez)


def _reduced_other_shape(run, m, root, mp):
    # a second reduce file for reference t0 whose reference has another shape
    write_reduced(run, np.zeros(24, np.float32), np.zeros(24, np.float32), ref="t0",
                  other="x", step=-1, n_layers_ref=3, d_mlp_ref=8, n_layers_other=3,
                  d_mlp_other=8, token_hash=token_hash(run), label_suffix="-old")
    rd = run / "reduce"
    import h5py
    with h5py.File(rd / "t0__t1.h5", "r") as f:
        name = f.attrs["ref_name"]
    with h5py.File(next(rd.glob("t0-old*.h5")), "r+") as f:
        f.attrs["ref_name"] = name
    seal(next(rd.glob("t0-old*.h5")), {"step": "reduce"})  # made by hand: vouched for
    return None


CASES = [
    # --- models
    ("unknown-model", _argv("extract", "--run-dir", "{run}", "zz@100", *EXTRACT_ARGS),
     ["unknown model 'zz@100'", "expected a letter a..e"]),
    ("unknown-local-revision", _argv("extract", "--run-dir", "{run}", "{m}/t0@999",
                                     *EXTRACT_ARGS),
     ["revision '999' not found", "available"]),
    ("hub-repo-not-cached-offline", _hub("nobody/no-such-model@main"),
     ["not in the local HF cache and HF_HUB_OFFLINE is set", "hf download nobody/no-such-model"]),
    ("stanford-checkpoint-not-cached", _hub("a@100000"),
     ["alias-gpt2-small-x21", "not in the local HF cache", "--revision checkpoint-100000"]),
    ("hub-unreachable-not-cached", _hub("nobody/no-such-model@main", offline=False),
     ["not in the local HF cache and the hub is unreachable", "hf download"]),
    ("not-a-supported-family", _extract("bert"), ["'bert' model", "not of a supported family"]),
    ("model-dir-without-config", _extract("noconfig"), ["has no config.json", ""]),
    ("model-weights-give-nan", _extract("nanw"), ["produced NaN activations", "check the checkpoint"]),
    # --- tokens vs model
    ("tokenizer-vocab-mismatch", _extract("vocab100"),
     ["has no tokenizer files and a 100-token vocabulary", "add its tokenizer files"]),
    ("tokenizer-bos-mismatch", _extract("bos0"),
     ["BOS id 256", "bos_token_id 0", "build the token set with that model's tokenizer"]),
    ("window-longer-than-context", _extract("ctx32"),
     ["only 32 positions", "--window 32 or less"]),
    ("no-token-set", _seq(_drop("tokens"), _extract("t0")),
     ["no token set", "run `ooc-universal tokens"]),
    ("token-set-modified", _seq(_scribble("tokens/tokens.npz", 200, 64), _extract("t0")),
     ["token set in", "--force"]),
    ("store-from-another-token-set", _seq(_drop("tokens"), lambda run, m, root, mp:
                                          make_tokens(run, seed=9, n_windows=20) and None,
                                          _extract("t0")),
     ["was made from other inputs (token_hash", "delete it or use another --run-dir"]),
    ("store-of-another-model-shape", _seq(_drop("stores/t0.h5", "stores/t0.h5.sha256"),
                                          _store("t0", n_layers=3, d_mlp=8,
                                                 acts=lambda n: np.ones((n, 24))),
                                          _extract("t0")),
     ["n_layers: store has 3, wanted 2", "delete it or use another --run-dir"]),
    ("unknown-compression", _argv("extract", "--run-dir", "{run}", "{m}/t0",
                                  "--compression", "zip", *EXTRACT_ARGS),
     ["unknown compression 'zip'", "expected none, gzip"]),
    # --- stores into the reduce
    ("stores-from-different-token-sets", _seq(_store("u1", token_hash="u" * 64),
                                              _reduce_argv("u1")),
     ["different token sets", "re-extract both from the same"]),
    ("stores-at-different-checkpoints", _seq(_store("s200", step=200), _reduce_argv("s200")),
     ["checkpoints differ", "reduce models at the same checkpoint"]),
    ("store-missing", _reduce_argv("nothere"),
     ["no activation store for 'nothere'", "run `ooc-universal extract"]),
    ("store-only-partial", _seq(_store("p1"), lambda run, m, root, mp: os.rename(
        run / "stores" / "p1.h5", run / "stores" / "p1.h5.partial"), _reduce_argv("p1")),
     ["is incomplete", "run the same `ooc-universal extract` again"]),
    ("store-header-truncated", _seq(_truncate("stores/t1.h5", 1000), _reduce_argv("t1", extra=["--force"])),
     ["is not a readable HDF5 file (truncated or corrupt", "run `ooc-universal extract` again"]),
    ("store-data-truncated", _seq(_truncate("stores/t1.h5", -5000), _reduce_argv("t1", extra=["--force"])),
     ["(truncated file: eof = ", "delete it and run `ooc-universal extract` again"]),
    ("store-header-corrupt", _seq(_scribble("stores/t1.h5", 0, 512), _reduce_argv("t1", extra=["--force"])),
     ["is not a readable HDF5 file", "delete it"]),
    ("store-has-nan", _seq(_store("nan1", acts=_with_bad(np.nan)), _reduce_argv("nan1")),
     ["nan1.h5' has NaN or Inf activations in 1 neuron(s) (flat index 7)", "re-extract it"]),
    ("store-has-inf", _seq(_store("inf1", acts=_with_bad(np.inf)), _reduce_argv("inf1")),
     ["has NaN or Inf activations in 1 neuron(s)", "re-extract it"]),
    ("store-changed-since-reduce", _seq(_sidecar_sha("stores/t1.h5"), _reduce_argv("t1")),
     ["made from another version of activation store t1", "pass --force"]),
    ("reduce-output-other-settings", _reduce_argv("t1", extra=["--baseline-draws", "2"]),
     ["exists with other settings", "pass --force"]),
    ("reference-among-others", _reduce_argv("t0"),
     ["the reference 't0' is also among the other models", "correlate a model with other"]),
    ("fewer-than-two-models-reduce", _argv("reduce", "--run-dir", "{run}", "-r", "t0"),
     ["Missing argument 'OTHERS...'", "see `ooc-universal reduce --help`"]),
    ("fewer-than-two-models-run", _run_with(models="{m}/t0"),
     ["need at least two models", "list two or more"]),
    ("reduce-memory-too-small", _seq(_drop("reduce/t0__t1.h5"),
                                     _reduce_argv("t1", extra=["--memory", "100KB"])),
     ["too small", "--memory"]),
    ("extract-memory-too-small", _seq(_drop("stores/t0.h5"),
                                      _argv("extract", "--run-dir", "{run}", "{m}/t0",
                                            "--memory", "50MB", "--device", "cpu",
                                            "--no-progress")),
     ["--memory 50.0 MB is too small", "raise --memory to at least"]),
    # --- universal / persistence
    ("threshold-above-one", _argv("universal", "--run-dir", "{run}", "--thresholds", "0.5,1.5",
                                  "--no-progress"), ["threshold 1.5 is outside (0, 1)", "0 < tau < 1"]),
    ("threshold-zero", _argv("universal", "--run-dir", "{run}", "--thresholds", "0",
                             "--no-progress"), ["threshold 0.0 is outside (0, 1)", "0 < tau < 1"]),
    ("threshold-not-a-number", _argv("universal", "--run-dir", "{run}", "--thresholds", "abc",
                                     "--no-progress"), ["threshold 'abc' is not a number", "(0, 1)"]),
    ("reduce-file-corrupt", _seq(_scribble("reduce/t0__t1.h5", 0, 512),
                                 _argv("universal", "--run-dir", "{run}", "--no-progress")),
     ["reduce output", "is damaged", "run `ooc-universal reduce` again"]),
    ("reduce-files-of-another-shape", _seq(_reduced_other_shape,
                                           _argv("universal", "--run-dir", "{run}", "--no-progress")),
     ["neurons in", "re-run `ooc-universal reduce` for the stale file"]),
    ("no-reduce-output", _seq(_drop("reduce"), _argv("universal", "--run-dir", "{run}", "--no-progress")),
     ["no reduced statistics", "run `ooc-universal reduce` first"]),
    ("persistence-one-checkpoint", _argv("persistence", "--run-dir", "{run}", "--no-progress"),
     ["persistence needs universal sets at two or more checkpoints", "reduce and run"]),
    ("duplicate-checkpoints", _run_with(checkpoints="100,100"),
     ["checkpoints must be sorted and distinct", "use [100]"]),
    ("unsorted-checkpoints", _run_with(checkpoints="200,100"),
     ["checkpoints must be sorted and distinct", "use [100, 200]"]),
    # --- run directory
    ("unwritable-run-dir", _seq(_drop("stores"), lambda run, m, root, mp: (
        run / "stores").write_text("a file"), _extract("t0")),
     ["cannot write to run directory", "choose a writable --run-dir"]),
    ("run-dir-under-a-file", _argv("tokens", "--run-dir", "{root}/text.txt/run", "--source",
                                   "{root}/text.txt", "--n-tokens", "100", "--tokenizer",
                                   "bytes", "--window", "64", "--no-progress"),
     ["cannot write to run directory", "choose a writable --run-dir"]),
    ("run-dir-of-another-config", _run_config_differs,
     ["was made with another configuration (differs in ['n_tokens'])", "use a new run directory"]),
    ("second-process-tokens", _seq(_lock(".lock"), _argv(
        "tokens", "--run-dir", "{run}", "--source", "{root}/text.txt", "--n-tokens", "100",
        "--tokenizer", "bytes", "--window", "64", "--no-progress")),
     [f"is in use by another process (pid {FAKE_PID})", "wait for it to finish"]),
    ("second-process-extract", _seq(_drop("stores/t1.h5"), _lock("stores/.t1.lock"),
                                    _extract("t1")),
     [f"being written by another process (pid {FAKE_PID})", "wait for it to finish"]),
    ("second-process-reduce", _seq(_drop("reduce/t0__t1.h5"), _lock("reduce/.t0__t1.lock"),
                                   _reduce_argv("t1")),
     [f"is in use by another process (pid {FAKE_PID})", "wait for that reduce to finish"]),
    ("second-process-run", _seq(_lock(".lock"), _run_with()),
     [f"is in use by another process (pid {FAKE_PID})", "wait for it to finish"]),
    ("disk-full-writing-tokens", _seq(_drop("tokens"), _disk_full_savez, _argv(
        "tokens", "--run-dir", "{run}", "--source", "{root}/text.txt", "--n-tokens", "100",
        "--tokenizer", "bytes", "--window", "64", "--no-progress")),
     ["disk full", "free some space and run the same command again"]),
    ("status-of-no-run", _argv("status", "{root}/no-such-run"),
     ["does not exist", "give the --run-dir of a run"]),
]


@pytest.mark.parametrize("name,setup,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_nonzero_nothing_complete(base, tmp_path, monkeypatch, capsys,
                                                     name, setup, words):
    global _LOCK_PATH
    _LOCK_PATH = None
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    for p in run.rglob(".*.lock"):
        p.unlink()
    models = base / "models"
    argv = setup(run, models, base, monkeypatch)
    if name == "second-process-run":  # its run dir is run/new
        _LOCK_PATH = run / "new" / ".lock"
    argv = [a.format(run=run, m=models, root=base) for a in argv]
    before = complete_files(run)
    states_before = {r["item"]: r["state"] for r in status(run)} if run.exists() else {}
    capsys.readouterr()
    if _LOCK_PATH is not None:
        with held_lock(_LOCK_PATH):
            with pytest.raises(SystemExit) as exc:
                main(argv)
    else:
        with pytest.raises(SystemExit) as exc:
            main(argv)
    err = capsys.readouterr().err
    assert exc.value.code not in (0, None), err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    # nothing new looks complete, nothing complete was touched
    assert complete_files(run) == before
    if run.exists():
        for r in status(run):
            if r["state"] == "complete":
                assert states_before.get(r["item"]) == "complete", r


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


def test_zero_variance_neurons_warn_with_the_count(tmp_path, capsys):
    x, y = planted_acts(1000)  # one constant neuron in each model
    write_store(tmp_path, "ref", x, 2, 16)
    write_store(tmp_path, "oth", y, 3, 8)
    capsys.readouterr()
    main(["reduce", "--run-dir", str(tmp_path), "-r", "ref", "oth", "--device", "cpu",
          "--no-progress"])  # returns: exit status 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("warning: ")
    assert "1 reference and 1 other neurons have zero variance" in err[0]
    assert {r["item"]: r["state"] for r in status(tmp_path)}["reduce/ref__oth.h5"] == "complete"


def test_ctrl_c_leaves_a_resumable_state(base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base / "run" / "tokens", run / "tokens")
    model = base / "models" / "t0"
    env = dict(os.environ, OOC_TEST_SLEEP_PER_BLOCK="0.5", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "ooc_universal", "extract", "--run-dir",
                             str(run), str(model), *EXTRACT_ARGS], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ledger = run / "stores" / "t0.ledger"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if ledger.exists() and ledger.read_text().count("\ndone ") >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["error: interrupted; run the same command again to resume"], err
    assert not (run / "stores" / "t0.h5").exists()
    done = ledger.read_text().count("\ndone ")
    row = {r["item"]: r for r in status(run)}["stores/t0.h5"]
    assert row["state"] == "partial" and row["progress"] == f"{done}/9 blocks"
    stats = {}
    extract(run, str(model), block_tokens=128, batch_size=2, device="cpu", progress=False,
            stats=stats)
    assert stats["status"] == "resumed" and stats["blocks_done_before"] == done >= 2
    assert stats["blocks_written"] == 9 - done
    assert (run / "stores" / "t0.h5").read_bytes() == \
        (base / "run" / "stores" / "t0.h5").read_bytes()


def test_ctrl_c_stops_a_reduce_promptly_and_keeps_its_folds(tmp_path):
    """SIGINT mid-chain: the running fold checkpoints what it has and stops at its next
    block (the process does not wait for the rest of the chain); the same command resumes
    without redoing a fold and gives the uninterrupted result."""
    import h5py
    x, y = planted_acts(1000)
    for run in (tmp_path / "a", tmp_path / "b"):
        write_store(run, "ref", x, 2, 16)
        write_store(run, "oth", y, 3, 8)
    args = ["--block-tokens", "64", "--checkpoint-every", "4", "--device", "cpu",
            "--no-progress"]
    env = dict(os.environ, OOC_TEST_SLEEP_PER_BLOCK="0.2", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    run = tmp_path / "a"
    proc = subprocess.Popen([sys.executable, "-m", "ooc_universal", "reduce", "--run-dir",
                             str(run), "-r", "ref", "oth", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if list((run / "reduce").glob(".work/*/fold_g0_p0_c0.npz")):
            break
        time.sleep(0.02)
    time.sleep(0.3)  # past the first checkpoint (4 blocks), into the next segment
    assert proc.poll() is None, proc.communicate()
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 5  # not the rest of the chain
    assert proc.returncode == 130, err
    assert [ln for ln in err.splitlines() if ln.strip()] == \
        ["error: interrupted; run the same command again to resume"], err
    assert not list((run / "reduce").glob("*.h5"))
    row = {r["item"]: r for r in status(run)}["reduce/ref__oth.h5"]
    assert row["state"] == "partial"
    done = int(row["progress"].split("/")[0])
    assert 4 <= done < 16
    res = reduce(run, "ref", ["oth"], block_tokens=64, checkpoint_blocks=4, device="cpu",
                 progress=False)
    assert res["blocks_resumed"] == done and res["blocks_folded"] == 16 - done
    reduce(tmp_path / "b", "ref", ["oth"], block_tokens=64, checkpoint_blocks=4,
           device="cpu", progress=False)
    with h5py.File(run / "reduce" / "ref__oth.h5") as fa, \
            h5py.File(tmp_path / "b" / "reduce" / "ref__oth.h5") as fb:
        for k in ("row_max", "col_max", "baseline/row_max", "ref/var", "other/var"):
            assert np.abs(fa[k][()] - fb[k][()]).max() <= 1e-6
        assert np.array_equal(fa["row_argmax"][()], fb["row_argmax"][()])


def test_interrupted_fold_checkpoints_its_partial_segment(tmp_path, monkeypatch):
    """Deterministic twin of the test above: Ctrl-C arrives after the 6th block (mid
    segment of 4): the fold saves 6 blocks before stopping, and the re-run does 10."""
    from ooc_universal.steps import reduce as reduce_mod
    x, y = planted_acts(1000)
    write_store(tmp_path, "ref", x, 2, 16)
    write_store(tmp_path, "oth", y, 3, 8)
    real = reduce_mod._PROGRESS.update

    def update(n=1):
        real(n)
        if reduce_mod._PROGRESS.count == 6:
            reduce_mod._CANCEL.set()  # what _execute does on KeyboardInterrupt
    monkeypatch.setattr(reduce_mod._PROGRESS, "update", update)
    with pytest.raises(KeyboardInterrupt):
        reduce(tmp_path, "ref", ["oth"], block_tokens=64, checkpoint_blocks=4, device="cpu",
               progress=False)
    row = {r["item"]: r for r in status(tmp_path)}["reduce/ref__oth.h5"]
    assert (row["state"], row["progress"]) == ("partial", "6/16 block folds")
    monkeypatch.undo()
    res = reduce(tmp_path, "ref", ["oth"], block_tokens=64, checkpoint_blocks=4, device="cpu",
                 progress=False)
    assert res["blocks_resumed"] == 6 and res["blocks_folded"] == 10
