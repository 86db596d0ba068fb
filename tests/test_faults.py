"""Fault injection: SIGKILL at named points, a task that raises, a dead dask worker, a full disk.

Each kill runs the step in a child process with OOC_TEST_KILL_AT=<point>:<n> (the process
SIGKILLs itself at the n-th hit of that point: ooc_universal/faults.py), then runs the
same step again in a fresh process and checks that
  - the outputs equal an uninterrupted run (bit-identical stores; reduce within 1e-6),
  - every file opens and every recorded checksum verifies (ooc-universal status --verify),
  - nothing finished before the kill was computed again (counted from the ledger / the
    chain checkpoints before the re-run and the work the re-run reports).
Children are forked from a forkserver that has torch and the toolkit imported, so a kill
and its re-run cost well under a second each. Deterministic: fixed data, fixed seeds,
kills at hit counts, not at times.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ooc_universal import faults
from ooc_universal.cli.main import main
from ooc_universal.steps.extract import extract
from ooc_universal.steps.reduce import _blocks_on_disk, reduce
from ooc_universal.rundir import read_sidecar
from ooc_universal.status import problems, status
from ooc_universal.formats.store import open_store
from tests.reduce_helpers import planted_acts, write_store
from tests.test_extract import make_tokens
from tests.tiny import save_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

CTX = multiprocessing.get_context("forkserver")
# the package first: it un-shadows HF's `kernels` before transformers asks for it
# (ooc_universal/__init__.py); a forkserver preload that fails is skipped silently
CTX.set_forkserver_preload(["ooc_universal", "torch", "transformers", "h5py", "numpy", "dask",
                            "dask.threaded", "transformers.models.gpt2.modeling_gpt2",
                            "ooc_universal.steps.extract", "ooc_universal.steps.reduce",
                            "ooc_universal.cli.main", "tests.test_faults"])

EXTRACT_KW = dict(block_tokens=128, batch_size=2, device="cpu", progress=False)
REDUCE_KW = dict(baseline_draws=2, seed=3, block_tokens=64, checkpoint_blocks=2, n_workers=2,
                 device="cpu", progress=False)
REDUCE_KEYS = ("row_max", "col_max", "baseline/row_max", "ref/mean", "ref/var", "other/mean",
               "other/var", "other/self_comoment")
COUNTS = {"extract_kills": 0, "reduce_kills": 0}


# ---------------------------------------------------------------------------- children

def _child(kind: str, args: tuple, kw: dict, env: dict, stats_path: str) -> None:
    """Runs in a forked process: the step with the fault variables in `env`."""
    import threading

    from tqdm import tqdm
    tqdm.set_lock(threading.RLock())  # not a multiprocessing lock: a SIGKILL would leak it
    os.environ.update(env)
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    if kind == "extract":
        stats: dict = {}
        extract(*args, stats=stats, **kw)
    else:
        res = reduce(*args, **kw)
        stats = {"blocks_folded": res["blocks_folded"], "blocks_resumed": res["blocks_resumed"],
                 "skipped": [str(p) for p in res["skipped"]],
                 "outputs": [str(p) for p in res["outputs"]]}
    Path(stats_path).write_text(json.dumps(stats))


def run_child(kind, args, kw, env=None, tmp=None) -> tuple[int, dict | None]:
    """(exit code, stats written by the child or None)."""
    stats_path = Path(tmp or args[0]).parent / f"stats-{os.urandom(4).hex()}.json"
    p = CTX.Process(target=_child, args=(kind, tuple(str(a) for a in args), kw, env or {},
                                         str(stats_path)))
    p.start()
    p.join(180)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail(f"{kind} child hung with {env}")
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    stats_path.unlink(missing_ok=True)
    return p.exitcode, stats


def kill_env(point: str, n: int) -> dict:
    return {faults.KILL_ENV: f"{point}:{n}"}


def assert_everything_opens(run: Path) -> None:
    """Every file of the run opens, no temporaries are left, every checksum verifies."""
    leftovers = [p for p in run.rglob("*") if p.is_file() and (
        ".tmp-" in p.name or p.name.endswith((".partial", ".ledger")))]
    assert not leftovers, leftovers
    for p in run.rglob("*"):
        if p.suffix == ".h5":
            with h5py.File(p, "r"):
                pass
            if p.parent.name == "stores":
                with open_store(p):
                    pass
        elif p.suffix in (".json", ".sha256"):
            json.loads(p.read_text())
        elif p.suffix == ".npz":
            np.load(p).close()
    rows = status(run, verify=True)
    assert not problems(rows), [r for r in rows if r["state"] == "corrupt"
                                or r["checksum"].startswith("MISMATCH")]
    for r in rows:
        if r["state"] == "complete" and r["step"] in ("extract", "reduce"):
            assert r["checksum"] == "ok", r


# ---------------------------------------------------------------------------- extract

@pytest.fixture(scope="module")
def extract_base(tmp_path_factory):
    """A tiny model, a token set (9 blocks of 128 rows) and an uninterrupted store."""
    root = tmp_path_factory.mktemp("extract")
    model = save_tiny(root / "tiny0", seed=0)
    clean = root / "clean"
    make_tokens(clean, seed=4, n_windows=20)
    stats = {}
    ref = extract(clean, str(model), stats=stats, **EXTRACT_KW)
    assert stats["blocks_total"] == 9
    return root, model, clean, ref.read_bytes(), read_sidecar(ref)


def _fresh_run(base: Path, clean: Path, name: str) -> Path:
    run = base / name
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(clean / "tokens", run / "tokens")
    return run


def _ledger_done(run: Path) -> tuple[int, bool]:
    """(complete `done` lines in the ledger, whether its last line is torn)."""
    ledger = run / "stores" / "tiny0.ledger"
    if not ledger.exists():
        return 0, False
    raw = ledger.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1].decode()
    return sum(1 for ln in complete.splitlines()[1:] if ln.startswith("done ")), \
        not raw.endswith(b"\n")


# (kill point, hit number, where the kill leaves the store)
EXTRACT_KILLS = [
    ("store.create.h5", 1, "HDF5 file open for writing, no ledger"),
    ("store.create.before_ledger", 1, "file complete, ledger not yet renamed in"),
    ("extract.start", 1, "ledger header only"),
    ("store.block.mid_write", 1, "half of block 0 written"),
    ("store.block.before_ledger", 2, "block 1 written, not ledgered"),
    ("store.ledger.mid_append", 4, "torn ledger line"),
    ("store.block.after_ledger", 3, "3 blocks done"),
    ("extract.batch", 6, "between forward passes"),
    ("store.block.mid_write", 7, "half of block 6 written"),
    ("store.block.after_ledger", 9, "every block done, not finalized"),
    ("store.finalize.before_rename", 1, "sidecar written, not renamed"),
    ("store.finalize.after_rename", 1, "renamed, ledger still there"),
]


@pytest.mark.parametrize("point,n,where", EXTRACT_KILLS,
                         ids=[f"{p}:{n}" for p, n, _ in EXTRACT_KILLS])
def test_extract_sigkill_then_rerun(extract_base, point, n, where):
    root, model, clean, ref_bytes, ref_sidecar = extract_base
    run = _fresh_run(root, clean, f"kill-{point}-{n}")
    code, _ = run_child("extract", (run, model), EXTRACT_KW, kill_env(point, n))
    assert code == -signal.SIGKILL, f"not killed at {point}:{n} ({where})"
    COUNTS["extract_kills"] += 1
    final = run / "stores" / "tiny0.h5"
    done, torn = _ledger_done(run)
    assert torn == (point == "store.ledger.mid_append")
    st = {r["item"]: r for r in status(run)}["stores/tiny0.h5"]
    if point == "store.finalize.after_rename":
        assert final.exists() and st["state"] == "complete"
    else:  # nothing that looks complete
        assert not final.exists() and st["state"] == "partial", st
        if done:
            assert st["progress"] == f"{done}/9 blocks"

    code, stats = run_child("extract", (run, model), EXTRACT_KW)
    assert code == 0
    if point == "store.finalize.after_rename":
        assert stats["status"] == "skipped" and stats["blocks_written"] == 0
    else:
        assert stats["blocks_done_before"] == done
        assert stats["blocks_written"] == 9 - done  # finished blocks were not redone
    assert final.read_bytes() == ref_bytes  # bit-identical to the uninterrupted run
    def fixed(rec):  # when and by which run a sidecar was written differ by design
        return {k: v for k, v in rec.items() if k not in ("written_at", "run_id")}
    assert fixed(read_sidecar(final)) == fixed(ref_sidecar)
    assert_everything_opens(run)


def test_extract_killed_twice_then_finishes(extract_base):
    root, model, clean, ref_bytes, _ = extract_base
    run = _fresh_run(root, clean, "kill-twice")
    code, _ = run_child("extract", (run, model), EXTRACT_KW,
                        kill_env("store.block.after_ledger", 2))
    assert code == -signal.SIGKILL
    code, _ = run_child("extract", (run, model), EXTRACT_KW,
                        kill_env("store.block.after_ledger", 3))  # 3 more in the resumed run
    assert code == -signal.SIGKILL
    COUNTS["extract_kills"] += 2
    assert _ledger_done(run) == (5, False)
    code, stats = run_child("extract", (run, model), EXTRACT_KW)
    assert code == 0 and stats["blocks_done_before"] == 5 and stats["blocks_written"] == 4
    assert (run / "stores" / "tiny0.h5").read_bytes() == ref_bytes
    assert_everything_opens(run)


def test_extract_compressed_killed_during_repack(extract_base):
    """A kill while the compressed copy's HDF5 file is open: the partial is intact, the
    re-run repacks from it without a forward pass; the data equal the plain store's."""
    root, model, clean, ref_bytes, ref_sidecar = extract_base
    run = _fresh_run(root, clean, "kill-repack")
    kw = dict(EXTRACT_KW, compression="gzip")
    code, _ = run_child("extract", (run, model), kw, kill_env("store.repack.chunk", 3))
    assert code == -signal.SIGKILL
    COUNTS["extract_kills"] += 1
    assert not (run / "stores" / "tiny0.h5").exists() and _ledger_done(run) == (9, False)
    code, stats = run_child("extract", (run, model), kw)
    assert code == 0 and stats["blocks_written"] == 0 and stats["windows_forwarded"] == 0
    with open_store(run / "stores" / "tiny0.h5") as a, \
            open_store(root / "clean" / "stores" / "tiny0.h5") as b:
        assert a.compressed
        np.testing.assert_array_equal(a.read_rows(0, a.n_tokens), b.read_rows(0, b.n_tokens))
    # the same data, so the same content checksum as the uncompressed store
    assert read_sidecar(run / "stores" / "tiny0.h5")["sha256"] == ref_sidecar["sha256"]
    assert_everything_opens(run)


# ---------------------------------------------------------------------------- reduce

@pytest.fixture(scope="module")
def reduce_base(tmp_path_factory):
    """Stores ref (2x16), oth, oth2 (3x8) over 1000 tokens (16 blocks of 64) and the
    uninterrupted reduce of ref against both."""
    root = tmp_path_factory.mktemp("reduce")
    stores = root / "stores-src"
    x, y = planted_acts(1000)
    rng = np.random.default_rng(9)
    y2 = (rng.standard_normal((1000, 24)) + 0.5 * y.astype(np.float64)).astype(np.float16)
    for label, a, nl, d in (("ref", x, 2, 16), ("oth", y, 3, 8), ("oth2", y2, 3, 8)):
        write_store(stores, label, a, nl, d, block_tokens=64)
    clean = _reduce_run(root, stores, "clean")
    res = reduce(clean, "ref", ["oth", "oth2"], **REDUCE_KW)
    assert res["blocks_folded"] == 16 and res["plan"].n_chains == 2  # 2 chains of 8 blocks
    return root, stores, {o: _read(clean / "reduce" / f"ref__{o}.h5") for o in ("oth", "oth2")}


def _reduce_run(root: Path, stores: Path, name: str) -> Path:
    run = root / name
    shutil.rmtree(run, ignore_errors=True)
    (run / "stores").mkdir(parents=True)
    for p in (stores / "stores").iterdir():
        if p.is_file() and not p.name.startswith("."):
            shutil.copy2(p, run / "stores" / p.name)
    return run


def _read(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        out = {k: f[k][()] for k in REDUCE_KEYS + ("row_argmax", "col_argmax")}
        out["n_tokens"] = int(f.attrs["n_tokens"])
    return out


def assert_reduce_matches(run: Path, refs: dict, tol: float = 1e-6) -> None:
    for other, ref in refs.items():
        got = _read(run / "reduce" / f"ref__{other}.h5")
        for k in REDUCE_KEYS:
            assert np.abs(got[k] - ref[k]).max() <= tol, (other, k)
        for k in ("row_argmax", "col_argmax", "n_tokens"):
            assert np.array_equal(got[k], ref[k]), (other, k)


def _work_dirs(run: Path) -> list[Path]:
    return [p for p in (run / "reduce" / ".work").glob("*") if p.is_dir()] \
        if (run / "reduce" / ".work").is_dir() else []


# (kill point, hit number); 16 block folds in 2 chains of 8, a checkpoint every 2 blocks
REDUCE_KILLS = [
    ("reduce.fold.block", 1),               # nothing checkpointed yet
    ("reduce.checkpoint.mid_write", 1),     # a torn checkpoint temporary
    ("reduce.checkpoint.before_rename", 2),
    ("reduce.checkpoint.after_rename", 3),
    ("reduce.fold.block", 11),              # mid-segment: 1 fold lost
    ("reduce.checkpoint.after_rename", 8),  # every fold of the run checkpointed
    ("reduce.merge.mid_write", 1),          # Chan merge of the two chains, torn
    ("reduce.merge.after_rename", 1),
    ("reduce.final.before_rename", 1),      # row/col max and baseline, not committed
    ("reduce.final.after_rename", 1),
    ("reduce.assemble.h5", 1),              # the output's HDF5 file open for writing
    ("reduce.assemble.before_rename", 1),
    ("reduce.assemble.after_rename", 1),    # first pair committed, its sidecar not yet
    ("reduce.assemble.after_rename", 2),    # both committed, work dir not yet removed
]


@pytest.mark.parametrize("point,n", REDUCE_KILLS, ids=[f"{p}:{n}" for p, n in REDUCE_KILLS])
def test_reduce_sigkill_then_rerun(reduce_base, point, n):
    root, stores, refs = reduce_base
    run = _reduce_run(root, stores, f"kill-{point}-{n}")
    args = (run, "ref", ["oth", "oth2"])
    code, _ = run_child("reduce", (run,), dict(REDUCE_KW, reference="ref",
                                               others=["oth", "oth2"]),
                        kill_env(point, n))
    assert code == -signal.SIGKILL, f"not killed at {point}:{n}"
    COUNTS["reduce_kills"] += 1
    finals = sorted(p.name for p in (run / "reduce").glob("*.h5"))
    if point == "reduce.assemble.after_rename":
        assert len(finals) == n
    else:
        assert finals == []  # nothing that looks complete
    states = {r["item"]: r["state"] for r in status(run)}
    for other in ("oth", "oth2"):
        item = f"reduce/ref__{other}.h5"
        assert states[item] == ("complete" if f"ref__{other}.h5" in finals else "partial")
    on_disk = sum(_blocks_on_disk(w, None) for w in _work_dirs(run))

    res = reduce(*args, **REDUCE_KW)  # the same command again
    if len(finals) == 2:  # all committed before the kill: nothing left to do
        assert res["blocks_folded"] == 0 and res["blocks_resumed"] == 0
    else:
        assert res["blocks_resumed"] == on_disk
        assert res["blocks_folded"] == 16 - on_disk  # checkpointed folds are not redone
    if point.startswith(("reduce.merge", "reduce.final", "reduce.assemble")) \
            or (point, n) == ("reduce.checkpoint.after_rename", 8):
        assert res["blocks_folded"] == 0
    assert len(res["skipped"]) == len(finals)
    assert_reduce_matches(run, refs)
    assert _work_dirs(run) == []
    assert_everything_opens(run)


def test_reduce_killed_twice_then_finishes(reduce_base):
    root, stores, refs = reduce_base
    run = _reduce_run(root, stores, "kill-twice")
    kw = dict(REDUCE_KW, reference="ref", others=["oth", "oth2"])
    for n in (2, 3):  # 2 checkpoints, then 3 more in the resumed run
        code, _ = run_child("reduce", (run,), kw, kill_env("reduce.checkpoint.after_rename", n))
        assert code == -signal.SIGKILL
        COUNTS["reduce_kills"] += 1
    on_disk = sum(_blocks_on_disk(w, None) for w in _work_dirs(run))
    assert on_disk == 10
    code, stats = run_child("reduce", (run,), kw)
    assert code == 0 and stats["blocks_resumed"] == 10 and stats["blocks_folded"] == 6
    assert_reduce_matches(run, refs)
    assert_everything_opens(run)


# ---------------------------------------------------------------------------- dask tasks

def test_task_that_raises_once_is_retried(reduce_base, monkeypatch, capsys):
    root, stores, refs = reduce_base
    run = _reduce_run(root, stores, "fail-once")
    monkeypatch.setenv(faults.FAIL_ENV, "reduce.fold.block:5")
    res = reduce(run, "ref", ["oth", "oth2"], **REDUCE_KW)
    err = capsys.readouterr().err
    assert "warning: reduce task fold (group 0, panel 0, chain" in err and "retrying" in err
    # the 5th fold failed after 2 checkpoints (4 blocks): one fold was redone
    assert res["blocks_folded"] == 17
    assert_reduce_matches(run, refs)
    assert_everything_opens(run)


def test_task_that_keeps_raising_fails_cleanly_naming_it(reduce_base, monkeypatch, capsys):
    root, stores, refs = reduce_base
    run = _reduce_run(root, stores, "fail-always")
    monkeypatch.setenv(faults.FAIL_ENV, "reduce.final.write:*")
    argv = ["reduce", "--run-dir", str(run), "-r", "ref", "oth", "oth2", "--block-tokens",
            "64", "--checkpoint-every", "2", "--baseline-draws", "2", "--seed", "3",
            "--device", "cpu", "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0])
    # the final checkpoint is written by the chain's fold task (it finalizes in place)
    assert "reduce task fold (group 0, panel 0, chain 0) failed 2 times" in errors[0]
    assert "InjectedFailure" in errors[0] and "run the same command again" in errors[0]
    assert not list((run / "reduce").glob("*.h5"))
    # the folds are checkpointed every segment (2 blocks); the last segment is finalized
    # from memory, not checkpointed, so the same command redoes at most that segment
    monkeypatch.delenv(faults.FAIL_ENV)
    res = reduce(run, "ref", ["oth", "oth2"], baseline_draws=2, seed=3, block_tokens=64,
                 checkpoint_blocks=2, device="cpu", progress=False)
    assert res["blocks_folded"] <= 2 and res["blocks_resumed"] + res["blocks_folded"] == 16
    assert_everything_opens(run)


@pytest.mark.slow
def test_worker_killed_mid_reduce_on_a_local_cluster(reduce_base, tmp_path, monkeypatch):
    """LocalCluster, 2 worker processes x 1 thread: one worker SIGKILLs itself after its
    2nd checkpoint; the nanny restarts it, the scheduler reruns the task, which resumes
    from its checkpoint. The result equals the uninterrupted run."""
    from distributed import Client, LocalCluster
    root, stores, refs = reduce_base
    run = _reduce_run(root, stores, "cluster-kill")
    marker = tmp_path / "killed-once"
    monkeypatch.setenv(faults.KILL_ENV, "reduce.checkpoint.after_rename:2")
    monkeypatch.setenv(faults.ONCE_ENV, str(marker))  # exactly one kill, in one worker
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=50) as cluster:
        monkeypatch.delenv(faults.KILL_ENV)  # the driver itself never dies
        with Client(cluster) as client:
            pids = set(client.run(os.getpid).values())
            res = reduce(run, "ref", ["oth", "oth2"], baseline_draws=2, seed=3,
                         block_tokens=64, checkpoint_blocks=2, device="cpu", progress=False,
                         scheduler=cluster.scheduler_address)
            client.wait_for_workers(2, timeout=60)
            pids_after = set(client.run(os.getpid).values())
    assert marker.exists()             # a worker did die
    assert pids_after != pids          # and was replaced
    assert res["plan"].n_chains == 2
    assert_reduce_matches(run, refs)
    assert_everything_opens(run)


# ---------------------------------------------------------------------------- disk full

def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("point", ["store.create.h5", "store.block.write:4",
                                   "store.ledger.write:2", "sidecar.write"])
def test_extract_disk_full_then_room_is_made(extract_base, point, monkeypatch, capsys):
    root, model, clean, ref_bytes, _ = extract_base
    label, _, n = point.partition(":")
    run = _fresh_run(root, clean, f"enospc-{label}")
    monkeypatch.setenv(faults.ENOSPC_ENV, f"{label}:{n or 1}")
    argv = ["extract", "--run-dir", str(run), str(model), "--block-tokens", "128",
            "--batch-size", "2", "--device", "cpu", "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "disk full" in line and "free some space" in line
    assert not (run / "stores" / "tiny0.h5").exists()
    assert {r["item"]: r["state"] for r in status(run)}["stores/tiny0.h5"] != "complete"
    done, _ = _ledger_done(run)
    monkeypatch.delenv(faults.ENOSPC_ENV)  # room is made
    stats = {}
    extract(run, str(model), stats=stats, **EXTRACT_KW)
    assert stats.get("blocks_written", 0) == 9 - done
    assert (run / "stores" / "tiny0.h5").read_bytes() == ref_bytes
    assert_everything_opens(run)


@pytest.mark.parametrize("point", ["reduce.checkpoint.write:3", "reduce.assemble.h5:1"])
def test_reduce_disk_full_then_room_is_made(reduce_base, point, monkeypatch, capsys):
    root, stores, refs = reduce_base
    run = _reduce_run(root, stores, f"enospc-{point.split(':')[0]}")
    monkeypatch.setenv(faults.ENOSPC_ENV, point)
    argv = ["reduce", "--run-dir", str(run), "-r", "ref", "oth", "oth2", "--block-tokens",
            "64", "--checkpoint-every", "2", "--baseline-draws", "2", "--seed", "3",
            "--device", "cpu", "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "disk full while writing reduce task" in line and "free some space" in line
    assert not list((run / "reduce").glob("*.h5"))
    states = {r["item"]: r["state"] for r in status(run)}
    assert states["reduce/ref__oth.h5"] != "complete"
    on_disk = sum(_blocks_on_disk(w, None) for w in _work_dirs(run))
    monkeypatch.delenv(faults.ENOSPC_ENV)
    res = reduce(run, "ref", ["oth", "oth2"], baseline_draws=2, seed=3, block_tokens=64,
                 checkpoint_blocks=2, device="cpu", progress=False)
    assert res["blocks_folded"] == 16 - on_disk
    assert_reduce_matches(run, {o: _ref_one_chain(reduce_base, o) for o in ("oth", "oth2")})
    assert_everything_opens(run)


_ONE_CHAIN: dict = {}


def _ref_one_chain(reduce_base, other):
    """The uninterrupted one-chain reduce (the CLI's plan without a cluster)."""
    root, stores, _ = reduce_base
    if not _ONE_CHAIN:
        run = _reduce_run(root, stores, "clean-one-chain")
        reduce(run, "ref", ["oth", "oth2"], baseline_draws=2, seed=3, block_tokens=64,
               checkpoint_blocks=2, device="cpu", progress=False)
        _ONE_CHAIN.update({o: _read(run / "reduce" / f"ref__{o}.h5") for o in ("oth", "oth2")})
    return _ONE_CHAIN[other]


def test_kill_point_counts():
    """At least 10 kill points per step, spread over the run (the closing numbers: run
    with -s to see how many kills this session survived)."""
    assert len(EXTRACT_KILLS) + 3 >= 10 and len(REDUCE_KILLS) + 2 >= 10
    assert len({p for p, _, _ in EXTRACT_KILLS}) >= 9 and len({p for p, _ in REDUCE_KILLS}) >= 10
    print(f"\nkill points: extract {len(EXTRACT_KILLS) + 3}, reduce {len(REDUCE_KILLS) + 2}; "
          f"kills survived in this session: extract {COUNTS['extract_kills']}, "
          f"reduce {COUNTS['reduce_kills']}")
