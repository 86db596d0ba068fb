"""Damaged inputs are never computed on (issue 13): a table of adversarial cases, each
with its exact outcome.

Families (CASES, parametrized; each case damages a copy of one small finished run):
  store      an activation store's bytes, sidecar or name damaged -> the reduce refuses
  reduce     a reduce output damaged -> universal refuses
  sets       universal sets edited, untrusted, foreign -> persistence / provenance refuse
  report     a report input or a report file damaged -> report refuses / status --verify
  lock       a step started by hand while another process holds the run -> refused
  model      damaged model files -> extract refuses before any forward pass
and KILLS: a step SIGKILLed at a named point (or its checkpoints damaged) and then run
again gives the same result as an uninterrupted run, with nothing left behind.

Every refusal is one line (OocError, exit 1 through the CLI) naming the file, and the
step's output is not there afterwards (nothing complete-looking).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ooc_universal import faults
from ooc_universal.cli.main import main
from ooc_universal.config import ComputeConfig, ReduceConfig, UniversalConfig
from ooc_universal.errors import OocError
from ooc_universal.formats.sets import check_sets_provenance, read_sets
from ooc_universal.formats.store import blocks_sha256, open_store
from ooc_universal.formats.tokens import save_token_set
from ooc_universal.report import report
from ooc_universal.rundir import forget_verified, run_lock
from ooc_universal.status import problems, status
from ooc_universal.steps import tokens
from ooc_universal.steps.extract import extract
from ooc_universal.steps.persistence import persistence
from ooc_universal.steps.reduce import reduce, release_stores
from ooc_universal.steps.universal import universal
from tests.tiny import save_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

CPU = ComputeConfig(device="cpu")
ONE_DRAW = ReduceConfig(baseline_draws=1)
STEPS = (100, 200)
PAIR = "reduce/t0@100__t1@100.h5"
STORE = "stores/t1@100.h5"
UNIVERSAL_FILES = ("sets.json", "table1.json", "table1.csv", "table1_draws.csv",
                   "neurons.csv", "neurons.parquet", "neuron_draws.parquet")

CTX = multiprocessing.get_context("forkserver")
# the package first: it un-shadows HF's `kernels` before transformers asks for it
# (ooc_universal/__init__.py); a forkserver preload that fails is skipped silently
CTX.set_forkserver_preload(["ooc_universal", "torch", "transformers", "h5py", "numpy", "dask",
                            "ooc_universal.steps.universal", "ooc_universal.steps.reduce",
                            "ooc_universal.report", "tests.test_integrity"])


# ---------------------------------------------------------------------------- the run

def _token_set(seed: int):
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, 256, size=40 * 64 * 2, dtype=np.int32)
    return tokens.build_token_set(stream, 1000, tokenizer="bytes", window=64,
                                  n_eval_tokens=300)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """2 tiny models x 2 checkpoints: tokens, extract, reduce, universal, persistence,
    report, all finished."""
    root = tmp_path_factory.mktemp("integrity")
    models = root / "m"
    for name, seed in (("t0", 0), ("t1", 10)):
        for k, step in enumerate(STEPS):
            save_tiny(models / name / f"checkpoint-{step}", seed=seed + k)
    run = root / "run"
    save_token_set(_token_set(0), run)
    for step in STEPS:
        for name in ("t0", "t1"):
            extract(run, f"{models}/{name}@{step}", compute=CPU, block_tokens=128,
                    progress=False)
        reduce(run, f"{models}/t0@{step}", [f"{models}/t1@{step}"], ONE_DRAW, CPU,
               progress=False)
    release_stores([run / "stores" / f"{m}@{s}.h5" for m in ("t0", "t1") for s in STEPS])
    universal(run, progress=False)
    persistence(run, progress=False)
    report(run, progress=False)
    return root, models, run


@pytest.fixture
def run(base, tmp_path):
    _, _, src = base
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    forget_verified()  # each case starts with a process that has verified nothing
    yield dst
    forget_verified()


# ---------------------------------------------------------------------------- damage

def flip(rel, where=0.5):
    """Flip one byte at `where` (a fraction of the file, or ("block", i) of a store)."""
    def setup(run, ctx):
        path = run / rel
        if isinstance(where, tuple):
            with open_store(path, verify=False) as st:
                offset = st.block_offset(where[1]) + 101
        else:
            offset = int(path.stat().st_size * where)
        flip_byte(path, offset)
    return setup


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def flip_dataset(rel, key, at=3):
    """Flip one byte inside dataset `key` of an HDF5 file (contiguous storage)."""
    def setup(run, ctx):
        path = run / rel
        with h5py.File(path, "r") as f:
            offset = f[key].id.get_offset() + at
        flip_byte(path, offset)
    return setup


def edit_attr_bytes(rel, name):
    """Change one character of a string attribute in place (same size: the size check
    alone cannot see it)."""
    def setup(run, ctx):
        path = run / rel
        with h5py.File(path, "r") as f:
            value = str(f.attrs[name]).encode()
        data = bytearray(path.read_bytes())
        at = data.find(value)
        assert at >= 0
        data[at] = ord("x") if data[at] != ord("x") else ord("y")
        path.write_bytes(bytes(data))
    return setup


def drop(rel):
    def setup(run, ctx):
        p = run / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return setup


def write_bytes(rel, data: bytes):
    def setup(run, ctx):
        (run / rel).write_bytes(data)
    return setup


def truncate(rel, fraction=0.5):
    def setup(run, ctx):
        p = run / rel
        os.truncate(p, int(p.stat().st_size * fraction))
    return setup


def copy(src, dst):
    def setup(run, ctx):
        shutil.copy2(run / src, run / dst)
    return setup


def edit_json(rel, fn):
    def setup(run, ctx):
        p = run / rel
        doc = json.loads(p.read_text())
        fn(doc)
        p.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return setup


def fewer_block_digests(doc):
    doc["block_sha256"] = doc["block_sha256"][:-1]
    doc["sha256"] = blocks_sha256(doc["block_sha256"])


def add_a_neuron(doc):
    doc["sets"][0]["neurons"] = sorted(set(doc["sets"][0]["neurons"]) | {3})


def seq(*fns):
    def setup(run, ctx):
        for fn in fns:
            fn(run, ctx)
    return setup


# ---------------------------------------------------------------------------- actions

def do_reduce(run, ctx):
    models = ctx["models"]
    return reduce(run, f"{models}/t0@100", [f"{models}/t1@100"], ONE_DRAW, CPU,
                  progress=False)


def do_universal(run, ctx):
    return universal(run, progress=False)


def do_persistence(run, ctx):
    return persistence(run, progress=False)


def do_report(run, ctx):
    return report(run, progress=False)


def do_provenance(run, ctx):
    return check_sets_provenance(run, token_hash=json.loads(
        (run / "tokens" / "meta.json").read_text())["hash"])


def do_extract(model_dir):
    def action(run, ctx):
        return extract(run, str(model_dir(ctx)), compute=CPU, block_tokens=128,
                       progress=False)
    return action


# ---------------------------------------------------------------------------- the table
# (id, setup, action, what must be gone afterwards (the step's output), words of the
#  one-line error)

REDUCE_OUT = (PAIR,)
UNIVERSAL_OUT = tuple(f"universal/{f}" for f in UNIVERSAL_FILES)
PERSIST_OUT = ("persistence/persistence.json", "persistence/persistence.csv")
REPORT_OUT = ("report",)

CASES = [
    # --- store: verified as it is read (the reduce's input)
    ("store-flipped-byte", flip(STORE, ("block", 3)), do_reduce, REDUCE_OUT,
     ["activation store", "t1@100.h5", "is damaged: block 3 of 8", "run `ooc-universal extract` again"]),
    ("store-flipped-last-block", flip(STORE, ("block", 7)), do_reduce, REDUCE_OUT,
     ["is damaged: block 7 of 8", "differs from its recorded sha256"]),
    ("store-sidecar-deleted", drop(STORE + ".sha256"), do_reduce, REDUCE_OUT,
     ["t1@100.h5", "is untrusted: no readable checksum sidecar t1@100.h5.sha256",
      "run `ooc-universal extract` again"]),
    ("store-sidecar-garbage", write_bytes(STORE + ".sha256", os.urandom(300)), do_reduce,
     REDUCE_OUT, ["is untrusted: no readable checksum sidecar"]),
    ("store-sidecar-empty-object", write_bytes(STORE + ".sha256", b"{}"), do_reduce,
     REDUCE_OUT, ["is untrusted: no readable checksum sidecar"]),
    ("store-flipped-and-sidecar-deleted", seq(flip(STORE, ("block", 2)),
                                              drop(STORE + ".sha256")),
     do_reduce, REDUCE_OUT, ["is untrusted"]),
    ("store-sidecar-of-another-store", copy("stores/t0@100.h5.sha256", STORE + ".sha256"),
     do_reduce, REDUCE_OUT, ["t1@100.h5", "is damaged: block 0 of 8"]),
    ("store-sidecar-block-count", edit_json(STORE + ".sha256", fewer_block_digests),
     do_reduce, REDUCE_OUT, ["does not match its checksum sidecar", "7 block checksums"]),
    ("store-swapped-for-another-model", seq(copy("stores/t0@100.h5", STORE),
                                            copy("stores/t0@100.h5.sha256", STORE + ".sha256")),
     do_reduce, REDUCE_OUT, ["holds the activation store of 't0@100', not of 't1@100'"]),
    # --- reduce output: what a reader uses is verified (attributes when opened, each
    # per-neuron array when read, the whole file before the self co-moments)
    ("reduce-flipped-byte", flip_dataset(PAIR, "row_max"), do_universal, UNIVERSAL_OUT,
     ["reduce output", "t0@100__t1@100.h5", "is damaged: dataset 'row_max'",
      "run `ooc-universal reduce` again for this pair"]),
    ("reduce-flipped-baseline-byte", flip_dataset(PAIR, "baseline/row_max", at=5),
     do_universal, UNIVERSAL_OUT, ["is damaged: dataset 'baseline/row_max'"]),
    ("reduce-flipped-argmax-byte", flip_dataset(PAIR, "row_argmax", at=9), do_universal,
     UNIVERSAL_OUT, ["is damaged: dataset 'row_argmax'"]),
    ("reduce-attribute-edited", edit_attr_bytes(PAIR, "ref_name"), do_universal, UNIVERSAL_OUT,
     ["is damaged: its attributes do not match"]),
    ("reduce-sidecar-deleted", drop(PAIR + ".sha256"), do_universal, UNIVERSAL_OUT,
     ["reduce output", "is untrusted: no readable checksum sidecar t0@100__t1@100.h5.sha256"]),
    ("reduce-flipped-and-sidecar-deleted", seq(flip_dataset(PAIR, "row_max"),
                                               drop(PAIR + ".sha256")),
     do_universal, UNIVERSAL_OUT, ["is untrusted"]),
    ("reduce-sidecar-garbage", write_bytes(PAIR + ".sha256", b"\x00garbage"), do_universal,
     UNIVERSAL_OUT, ["is untrusted"]),
    ("reduce-sidecar-digest-edited",
     edit_json(PAIR + ".sha256", lambda d: d["dataset_sha256"].update(row_max="ab" * 32)),
     do_universal, UNIVERSAL_OUT, ["is damaged: dataset 'row_max' does not match"]),
    ("reduce-sidecar-digest-deleted",
     edit_json(PAIR + ".sha256", lambda d: d["dataset_sha256"].pop("row_max")),
     do_universal, UNIVERSAL_OUT, ["is untrusted: its checksum sidecar records no checksum "
                                   "of 'row_max'"]),
    ("report-reads-damaged-reduce", flip_dataset(PAIR, "row_max"), do_report, REPORT_OUT,
     ["reduce output", "is damaged"]),
    # --- universal sets
    ("sets-edited", edit_json("universal/sets.json", add_a_neuron), do_persistence,
     PERSIST_OUT, ["universal sets", "sets.json", "is damaged:",
                   "run `ooc-universal universal --run-dir"]),
    ("sets-sidecar-deleted", drop("universal/sets.json.sha256"), do_persistence, PERSIST_OUT,
     ["universal sets", "is untrusted: no readable checksum sidecar sets.json.sha256"]),
    ("sets-sidecar-garbage", write_bytes("universal/sets.json.sha256", b"[1, 2"),
     do_persistence, PERSIST_OUT, ["is untrusted"]),
    ("sets-provenance-reduce-recomputed", edit_json(PAIR + ".sha256",
                                                    lambda d: d.update(sha256="cd" * 32)),
     do_provenance, (), ["were made from reduce/t0@100__t1@100.h5 with sha256",
                         "it is now cdcdcdcdcdcd"]),
    ("sets-provenance-reduce-gone", seq(drop(PAIR), drop(PAIR + ".sha256")), do_provenance,
     (), ["were made from reduce/t0@100__t1@100.h5, which is not in this run"]),
    ("sets-provenance-no-inputs", seq(edit_json("universal/sets.json.sha256",
                                                lambda d: d.update(inputs={}))),
     do_provenance, (), ["records no reduce files they were made from"]),
    # --- report
    ("report-input-edited", seq(edit_json("universal/table1.json",
                                          lambda d: d.update(edited=True))),
     do_report, REPORT_OUT, ["universal output", "table1.json", "is damaged",
                             "run `ooc-universal universal --run-dir"]),
    ("report-input-sidecar-deleted", drop("persistence/persistence.json.sha256"), do_report,
     REPORT_OUT, ["persistence output", "is untrusted"]),
]


def _gone(run, rels):
    for rel in rels:
        p = run / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        Path(str(p) + ".sha256").unlink(missing_ok=True)


@pytest.mark.parametrize("name,setup,action,output,words", CASES, ids=[c[0] for c in CASES])
def test_damaged_input_is_refused(base, run, name, setup, action, output, words):
    """One line naming the problem, nothing complete-looking left (the step's output was
    removed before the step ran and is not there after it)."""
    root, models, _ = base
    ctx = {"models": models, "root": root}
    _gone(run, output)
    setup(run, ctx)
    with pytest.raises(OocError) as exc:
        action(run, ctx)
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    for rel in output:
        assert not (run / rel).exists(), rel
    assert not list(run.rglob("*.tmp-*")), list(run.rglob("*.tmp-*"))


# ---------------------------------------------------------------------------- status --verify

def _verify_exit(run, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main(["status", "--run-dir", str(run), "--verify"])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


STATUS_CASES = [
    ("status-store-swapped", seq(copy("stores/t0@100.h5", STORE),
                                 copy("stores/t0@100.h5.sha256", STORE + ".sha256")),
     "stores/t1@100.h5", "MISMATCH: label 't0@100'"),
    ("status-reduce-swapped", seq(copy("reduce/t0@200__t1@200.h5", PAIR),
                                  copy("reduce/t0@200__t1@200.h5.sha256", PAIR + ".sha256")),
     PAIR, "MISMATCH: unreadable"),
    ("status-reduce-self-comoment-flipped",
     flip_dataset(PAIR, "other/self_comoment", at=1001), PAIR, "MISMATCH"),
    ("status-reduce-sidecar-sha-edited",
     edit_json(PAIR + ".sha256", lambda d: d.update(sha256="ab" * 32)), PAIR, "MISMATCH"),
    ("status-report-file-edited", edit_json("report/report_data.json",
                                            lambda d: d.update(edited=True)),
     "report/", "MISMATCH: report_data.json"),
    ("status-report-figure-added", write_bytes("report/fig_extra.png", b"png"),
     "report/", "fig_extra.png: not in checksums.json"),
    ("status-report-checksums-deleted", drop("report/checksums.json"), "report/",
     "UNTRUSTED: no readable report/checksums.json"),
]


@pytest.mark.parametrize("name,setup,item,verdict", STATUS_CASES,
                         ids=[c[0] for c in STATUS_CASES])
def test_status_verify_flags_it(base, run, capsys, name, setup, item, verdict):
    setup(run, {})
    code, out, err = _verify_exit(run, capsys)
    rows = {r["item"]: r for r in status(run, verify=True)}
    assert verdict in rows[item]["checksum"], rows[item]
    assert code == 1 and err.count("\n") == 1 and item in err, (code, err)


def test_flip_in_the_self_comoments_is_refused_where_they_are_read(run):
    """The per-neuron readers do not read other/self_comoment, so a flipped byte there
    leaves universal's results as they were (its arrays verify); the first reader of the
    self co-moments hashes the whole file and refuses it, and status --verify flags it."""
    from ooc_universal.formats.reduced import open_reduced
    from ooc_universal.rundir import forget_verified
    want = (run / "universal" / "sets.json").read_bytes()
    flip_dataset(PAIR, "other/self_comoment", at=1001)(run, {})
    forget_verified()
    universal(run, progress=False)
    assert (run / "universal" / "sets.json").read_bytes() == want
    with open_reduced(run / PAIR) as stats:
        assert stats.row_max.shape == (256,)
        with pytest.raises(OocError, match=r"is damaged: sha256"):
            stats.self_comoment
    rows = {r["item"]: r for r in status(run, verify=True)}
    assert "MISMATCH" in rows[PAIR]["checksum"]


def test_status_of_the_finished_run_is_clean(run, capsys):
    code, out, err = _verify_exit(run, capsys)
    assert code == 0, (out, err)
    assert not problems(status(run, verify=True))


# ---------------------------------------------------------------------------- foreign sets

def _other_run(base, tmp_path) -> Path:
    """A copy of the run made into another run directory (new run id) whose first pair
    is recomputed with other settings and whose universal step is re-run."""
    root, models, src = base
    other = tmp_path / "other-run"
    shutil.copytree(src, other)
    (other / "run_id").unlink(missing_ok=True)
    reduce(other, f"{models}/t0@100", [f"{models}/t1@100"], ReduceConfig(baseline_draws=2,
                                                                         seed=7),
           CPU, progress=False, force=True)
    universal(other, progress=False)
    return other


def test_sets_from_another_run_are_refused_and_flagged(base, run, tmp_path, capsys):
    other = _other_run(base, tmp_path)
    for f in ("sets.json", "sets.json.sha256"):
        shutil.copy2(other / "universal" / f, run / "universal" / f)
    with pytest.raises(OocError, match=r"were made from reduce/t0@100__t1@100.h5 with "
                       r"sha256 \w+, it is now \w+ \(recomputed since, or from another run\)"):
        do_provenance(run, {})
    code, out, err = _verify_exit(run, capsys)
    row = {r["item"]: r for r in status(run, verify=True)}["universal/"]
    assert row["checksum"].startswith("UNTRUSTED: made in another run directory"), row
    assert code == 1 and "universal/" in err


def test_sets_rewritten_under_a_running_pipeline(run):
    made = read_sets(run).provenance.universal_id
    check_sets_provenance(run, universal_id=made)  # as the run made it: fine
    universal(run, UniversalConfig(thresholds=[0.3]), progress=False)  # by hand, meanwhile
    with pytest.raises(OocError, match=r"were rewritten while this run was running "
                       r"\(universal_id \w+, this run made \w+\)"):
        check_sets_provenance(run, universal_id=made)


# ---------------------------------------------------------------------------- the run lock

def _hold_lock(run_dir: str, ready, release) -> None:
    with run_lock(run_dir):
        ready.set()
        release.wait(60)


@pytest.mark.parametrize("step", ["universal", "persistence", "report"])
def test_step_by_hand_during_a_run_is_refused(run, step):
    """A `run` (or ablate) holds RUN/.lock; universal, persistence and report started
    by hand meanwhile would rewrite what it reads: one line with the holder's pid."""
    ready, release = CTX.Event(), CTX.Event()
    holder = CTX.Process(target=_hold_lock, args=(str(run), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        before = {p: p.stat().st_mtime_ns for p in (run / "universal").iterdir()}
        action = {"universal": do_universal, "persistence": do_persistence,
                  "report": do_report}[step]
        with pytest.raises(OocError, match=rf"is in use by another process \(pid "
                           rf"{holder.pid}\); `ooc-universal {step}` now would rewrite"):
            action(run, {})
        assert before == {p: p.stat().st_mtime_ns for p in (run / "universal").iterdir()}
    finally:
        release.set()
        holder.join(30)
    action(run, {})  # the run is over: fine


# ---------------------------------------------------------------------------- models

def _model_dir(kind):
    """A copy of t1@100's model folder damaged as `kind` says (made on first use)."""
    def make(ctx):
        src = ctx["models"] / "t1" / "checkpoint-100"
        dst = ctx["root"] / "bad-models" / kind / "m"
        if dst.exists():
            return dst
        shutil.copytree(src, dst)
        cfg = json.loads((src / "config.json").read_text())
        weights = dst / "model.safetensors"
        if kind == "config-garbage":
            (dst / "config.json").write_bytes(os.urandom(300))
        elif kind == "config-not-a-config":
            (dst / "config.json").write_text("[1, 2, 3]")
        elif kind == "config-unknown-model-type":
            (dst / "config.json").write_text(json.dumps({**cfg, "model_type": "nonsense"}))
        elif kind.startswith("config-"):
            key, value = {"config-n-embd": ("n_embd", 48), "config-n-inner": ("n_inner", 64),
                          "config-more-layers": ("n_layer", 3),
                          "config-fewer-layers": ("n_layer", 1),
                          "config-vocab": ("vocab_size", 300)}[kind]
            (dst / "config.json").write_text(json.dumps({**cfg, key: value}))
        elif kind == "weights-truncated":
            os.truncate(weights, weights.stat().st_size // 2)
        elif kind == "weights-random-bytes":
            weights.write_bytes(os.urandom(weights.stat().st_size))
        elif kind == "weights-empty":
            weights.write_bytes(b"")
        elif kind == "weights-header-garbage":
            data = bytearray(weights.read_bytes())
            data[9:13] = b"\xff\xfe\x00\x01"
            weights.write_bytes(bytes(data))
        elif kind == "weights-tail-cut":
            os.truncate(weights, weights.stat().st_size - 4)
        return dst
    return make


MODEL_CASES = [
    ("config-garbage", ["config.json", "is not readable JSON"]),
    ("config-not-a-config", ["config.json", "is not a transformers config"]),
    ("config-unknown-model-type", ["config.json", "cannot be read as a config"]),
    ("config-n-embd", ["model.safetensors", "holds transformer.wte.weight of shape [257, 32], "
                       "its config.json implies [257, 48]"]),
    ("config-n-inner", ["holds transformer.h.0.mlp.c_fc.weight of shape [32, 128], its "
                        "config.json implies [32, 64]"]),
    ("config-more-layers", ["holds weights for 2 layer(s) (0..1), its config.json says 3 "
                            "layer(s)"]),
    ("config-fewer-layers", ["holds weights for 2 layer(s) (0..1), its config.json says 1 "
                             "layer(s)"]),
    ("config-vocab", ["its config.json implies [300, 32]"]),
    ("weights-truncated", ["model.safetensors", "is truncated or damaged: 72788 bytes, its "
                           "header describes 145576"]),
    ("weights-tail-cut", ["model.safetensors", "is truncated or damaged"]),
    ("weights-random-bytes", ["model.safetensors", "is not a safetensors file"]),
    ("weights-empty", ["model.safetensors", "is not a safetensors file"]),
    ("weights-header-garbage", ["model.safetensors", "its header is not JSON"]),
]


@pytest.mark.parametrize("kind,words", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_damaged_model_is_refused_before_any_work(base, run, kind, words):
    root, models, _ = base
    ctx = {"models": models, "root": root}
    with pytest.raises(OocError) as exc:
        do_extract(_model_dir(kind))(run, ctx)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("model m"), msg
    for w in words:
        assert w in msg, (w, msg)
    assert not [p for p in (run / "stores").iterdir() if p.name.startswith("m")]


# ---------------------------------------------------------------------------- kills

def _child(kind: str, run: str, models: str, env: dict) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)
    if kind == "universal":
        universal(run, progress=False)
    elif kind == "persistence":
        persistence(run, progress=False)
    elif kind == "report":
        report(run, progress=False)
    else:
        reduce(run, f"{models}/t0@100", [f"{models}/t1@100"], ONE_DRAW, CPU, progress=False)


def _killed(kind: str, run: Path, models: Path, point: str) -> None:
    p = CTX.Process(target=_child, args=(kind, str(run), str(models),
                                         {faults.KILL_ENV: point}))
    p.start()
    p.join(120)
    assert p.exitcode == -signal.SIGKILL, f"{kind} not killed at {point} ({p.exitcode})"


def _universal_bytes(run: Path) -> dict:
    return {f: (run / "universal" / f).read_bytes() for f in UNIVERSAL_FILES}


def _report_tables(run: Path) -> dict:
    return json.loads((run / "report" / "report_data.json").read_text())["tables"]


KILLS = [  # (step, fault point, what it leaves behind)
    ("universal", "sidecar.write:1", "universal/neurons.parquet.tmp-"),
    ("universal", "sidecar.write:4", "universal/table1.csv.tmp-"),
    ("universal", "sidecar.write:7", "universal/sets.json.tmp-"),
    ("persistence", "sidecar.write:1", "persistence/"),
    ("report", "report.write:1", "report.tmp-"),
    ("report", "report.replace:1", "report.tmp-"),
]


@pytest.mark.parametrize("step,point,left", KILLS, ids=[f"{s}@{p}" for s, p, _ in KILLS])
def test_killed_step_resumes_to_the_same_result(base, run, step, point, left):
    """SIGKILL at `point`, then the same step again: identical outputs to the
    uninterrupted run, and no temporaries left (the killed writer's are removed)."""
    root, models, src = base
    want = _universal_bytes(src), _report_tables(src)
    _killed(step, run, models, point)
    assert [p for p in run.rglob("*") if ".tmp-" in p.name and left.split("/")[-1] in p.name
            and str(p.relative_to(run)).startswith(left.split("/")[0])], \
        f"nothing left by the kill at {point}"
    assert [r for r in status(run) if r["state"] in ("leftover", "partial")]
    {"universal": do_universal, "persistence": do_persistence, "report": do_report}[step](
        run, {})
    assert not list(run.rglob("*.tmp-*")), list(run.rglob("*.tmp-*"))
    assert _universal_bytes(run) == want[0]
    if step == "persistence":
        assert (run / "persistence" / "persistence.json").read_bytes() == \
            (src / "persistence" / "persistence.json").read_bytes()
    if step == "report":
        assert _report_tables(run) == want[1]
    assert not problems(status(run, verify=True))


def _pair_arrays(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("row_max", "row_argmax", "col_max", "baseline/row_max",
                                      "ref/mean", "other/self_comoment")}


@pytest.mark.parametrize("victim", ["final_g0_p0.npz", "self_0.npz", "rotations_d128.npy"])
def test_damaged_reduce_checkpoint_is_discarded_and_recomputed(base, run, victim, capsys):
    """A reduce killed while assembling leaves its final checkpoints; one of them damaged
    is discarded with a warning and recomputed: the same numbers as the finished run."""
    root, models, src = base
    (run / PAIR).unlink()
    (run / (PAIR + ".sha256")).unlink()
    _killed("reduce", run, models, "reduce.assemble.h5:1")
    work = next((run / "reduce" / ".work").iterdir())
    os.truncate(work / victim, (work / victim).stat().st_size // 2)
    capsys.readouterr()
    reduce(run, f"{models}/t0@100", [f"{models}/t1@100"], ONE_DRAW, CPU, progress=False)
    err = capsys.readouterr().err
    assert f"warning: reduce checkpoint {str(work / victim)!r} is damaged" in err, err
    got, want = _pair_arrays(run / PAIR), _pair_arrays(src / PAIR)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)
    assert not (run / "reduce" / ".work").exists() or not list((run / "reduce" / ".work").iterdir())


def test_dead_writers_temporaries_are_removed_on_the_next_start(run):
    """`*.tmp-<pid>` of a dead process in universal/ and a report.tmp-<pid>/ folder:
    listed by status as leftovers, gone after the next universal and report."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (run / "universal" / f"table1.csv.tmp-{dead}").write_text("half")
    (run / f"report.tmp-{dead}").mkdir()
    (run / f"report.tmp-{dead}" / "index.md").write_text("half")
    live = subprocess.Popen(["sleep", "60"])  # a writer that is still running
    try:
        theirs = run / "universal" / f"neurons.csv.tmp-{live.pid}"
        theirs.write_text("being written")
        left = {r["item"] for r in status(run) if r["state"] == "leftover"}
        assert {f"universal/table1.csv.tmp-{dead}", f"report.tmp-{dead}"} <= left, left
        assert f"universal/neurons.csv.tmp-{live.pid}" not in left
        universal(run, progress=False)
        report(run, progress=False)
        assert not (run / "universal" / f"table1.csv.tmp-{dead}").exists()
        assert not (run / f"report.tmp-{dead}").exists()
        assert theirs.exists()
    finally:
        live.kill()
        live.wait()


def test_there_are_at_least_40_cases():
    n = len(CASES) + len(STATUS_CASES) + len(MODEL_CASES) + len(KILLS) + 3 + 3 + 2 + 1
    assert n >= 40, n


# ---------------------------------------------------------------------------- HDF5 dims

def _dim_names(ds) -> list[str]:
    return [ds.dims[i][0].name.lstrip("/") for i in range(ds.ndim)]


def test_store_and_reduce_files_have_named_dimensions(base):
    """h5py dimension scales: a store is (token, neuron) with layer / index coordinates;
    every array of a reduce file has named axes (ref_neuron, other_neuron, draw, ...)."""
    _, _, run = base
    with h5py.File(run / STORE, "r") as f:
        acts = f["acts"]
        assert _dim_names(acts) == ["token", "neuron"]
        n = acts.shape[1]
        np.testing.assert_array_equal(f["layer"][...], np.arange(n) // 128)
        np.testing.assert_array_equal(f["index"][...], np.arange(n) % 128)
        assert _dim_names(f["layer"]) == ["neuron"]
        assert acts.attrs["coordinates"] == "layer index window position"
        assert _dim_names(f["window"]) == ["token"] and _dim_names(f["position"]) == ["token"]
        assert f["token"].id.get_storage_size() == 0  # a dimension only: no bytes
    with h5py.File(run / PAIR, "r") as f:
        assert _dim_names(f["row_max"]) == ["ref_neuron"]
        assert _dim_names(f["baseline/row_max"]) == ["draw", "ref_neuron"]
        assert _dim_names(f["other/var"]) == ["other_neuron"]
        assert _dim_names(f["other/self_comoment"]) == ["other_layer_block", "other_unit",
                                                        "other_unit_t"]
        np.testing.assert_array_equal(f["ref_layer"][...], np.arange(256) // 128)
        np.testing.assert_array_equal(f["other_index"][...], np.arange(256) % 128)
        assert f["baseline_seed"][...].tolist() == [0]
    with open_store(run / STORE) as st:  # the readers are unaffected
        assert st.shape == (st.n_tokens, 256) and "DIMENSION_LIST" not in st.attrs


def test_xarray_opens_a_reduce_file_with_named_dims(base):
    _, _, run = base
    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    ds = xr.open_dataset(run / PAIR, engine="h5netcdf")
    assert set(ds["row_max"].dims) == {"ref_neuron"} and "ref_layer" in ds.coords
