"""`ooc-universal status RUN_DIR [--verify]`: missing / partial / complete / stale /
corrupt per step output, with progress, provenance, and checksums that catch a flipped
byte. One small finished run (2 models x 2 checkpoints, every step) is built once and
copied for each test."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ooc_universal import __version__, faults

from ooc_universal.steps import tokens
from ooc_universal.steps.ablate import ablate
from ooc_universal.cli.main import main
from ooc_universal.config import AblateConfig, ComputeConfig, ReduceConfig, RunConfig
from ooc_universal.errors import OocError
from ooc_universal.steps.extract import extract
from ooc_universal.steps.persistence import persistence
from ooc_universal.steps.reduce import reduce
from ooc_universal.report import report
from ooc_universal.status import COLUMNS, STATES, problems, status
from ooc_universal.formats.store import open_store
from ooc_universal.formats.tokens import save_token_set
from ooc_universal.steps.universal import universal
from tests.tiny import save_tiny

CPU = ComputeConfig(device="cpu")
ONE_DRAW = ReduceConfig(baseline_draws=1)  # what config_toml() below records

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

STEPS = (100, 200)
STORES = [f"stores/{m}@{s}.h5" for s in STEPS for m in ("t0", "t1")]
PAIRS = [f"reduce/t0@{s}__t1@{s}.h5" for s in STEPS]


def _token_set(seed: int):
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, 256, size=40 * 64 * 2, dtype=np.int32)
    return tokens.build_token_set(stream, 1000, tokenizer="bytes", window=64,
                                  n_eval_tokens=300)


def _extract_and_reduce(run: Path, models: Path, step: int, **kw):
    for name in ("t0", "t1"):
        extract(run, f"{models}/{name}@{step}", compute=CPU, block_tokens=128, progress=False)
    return reduce(run, f"{models}/t0@{step}", [f"{models}/t1@{step}"], ONE_DRAW, CPU,
                  progress=False, **kw)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    root = tmp_path_factory.mktemp("status")
    models = root / "m"
    for name, seed in (("t0", 0), ("t1", 10)):
        for k, step in enumerate(STEPS):
            save_tiny(models / name / f"checkpoint-{step}", seed=seed + k)
    run = root / "run"
    save_token_set(_token_set(0), run)
    for step in STEPS:
        _extract_and_reduce(run, models, step)
    universal(run, progress=False)
    persistence(run, progress=False)
    ablate(run, AblateConfig(control_draws=1, layerwise=False), CPU,
           progress=False)
    report(run, progress=False)
    return root, models, run


@pytest.fixture
def run(full, tmp_path):
    root, models, src = full
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def by_item(rows):
    return {r["item"]: r for r in rows}


def states(rows):
    return {r["item"]: r["state"] for r in rows}


def config_toml(models: Path, **kw) -> str:
    d = dict(models=[str(models / "t0"), str(models / "t1")], checkpoints=list(STEPS),
             tokenizer="bytes", source="x", n_tokens=1000, n_eval_tokens=300, window=64,
             baseline_draws=1, thresholds=[0.4, 0.5, 0.6])
    d.update(kw)
    return RunConfig(**d).to_toml()


def test_finished_run_is_complete_with_provenance_and_checksums(run, full):
    _, models, _ = full
    (run / "config.toml").write_text(config_toml(models))
    rows = status(run, verify=True)
    assert [r["step"] for r in rows] == ["tokens"] + ["extract"] * 4 + ["reduce"] * 2 + \
        ["universal", "persistence", "ablate", "report"]
    assert [r["item"] for r in rows[1:7]] == STORES + PAIRS
    assert all(r["state"] == "complete" for r in rows), [r for r in rows
                                                         if r["state"] != "complete"]
    th = json.loads((run / "tokens" / "meta.json").read_text())["hash"]
    for r in rows:  # what produced it
        assert r["token_hash"] == th, r
        assert r["toolkit_version"] == __version__, r
        assert r["config_hash"] or r["step"] == "report", r
        assert r["checksum"] == "ok", r  # the report too: its checksums.json
    assert by_item(rows)["stores/t0@100.h5"]["progress"] == "8/8 blocks"
    df = pd.DataFrame(rows)  # a table
    assert list(df.columns) == list(COLUMNS) and set(df["state"]) <= set(STATES)
    assert not problems(rows)


def test_empty_run_dir_lists_what_the_config_expects(tmp_path, full, capsys):
    _, models, _ = full
    run = tmp_path / "empty"
    run.mkdir()
    assert states(status(run)) == {"tokens/": "missing", "universal/": "missing",
                                   "persistence/": "missing", "ablate/": "missing",
                                   "report/": "missing"}
    (run / "config.toml").write_text(config_toml(models))
    got = states(status(run))
    assert [k for k in got if k.startswith(("stores/", "reduce/"))] == STORES + PAIRS
    assert set(got.values()) == {"missing"}
    with pytest.raises(OocError, match="does not exist"):
        status(tmp_path / "nope")


def test_partial_store_and_reduce_show_progress(run, full, monkeypatch):
    _, models, _ = full
    for rel in ("stores/t1@200.h5", "reduce/t0@200__t1@200.h5"):
        (run / rel).unlink()
        (run / (rel + ".sha256")).unlink()
    monkeypatch.setenv(faults.FAIL_ENV, "store.block.after_ledger:3")
    with pytest.raises(faults.InjectedFailure):
        extract(run, f"{models}/t1@200", compute=CPU, block_tokens=128, progress=False)
    row = by_item(status(run))["stores/t1@200.h5"]
    assert (row["state"], row["progress"]) == ("partial", "3/8 blocks")
    assert "run the same `ooc-universal extract` again" in row["detail"]
    monkeypatch.delenv(faults.FAIL_ENV)
    extract(run, f"{models}/t1@200", compute=CPU, block_tokens=128, progress=False)
    # a reduce task that keeps failing after 2 checkpoints of 2 blocks
    monkeypatch.setenv(faults.FAIL_ENV, "reduce.fold.block:5,reduce.fold.block:6")
    with pytest.raises(OocError, match=r"reduce task fold \(group 0, panel 0, chain 0\)"):
        reduce(run, f"{models}/t0@200", [f"{models}/t1@200"], ONE_DRAW, CPU, progress=False,
               block_tokens=128, checkpoint_blocks=2)
    row = by_item(status(run))["reduce/t0@200__t1@200.h5"]
    assert (row["state"], row["progress"]) == ("partial", "4/8 block folds")
    assert row["token_hash"] and row["config_hash"]
    monkeypatch.delenv(faults.FAIL_ENV)
    reduce(run, f"{models}/t0@200", [f"{models}/t1@200"], ONE_DRAW, CPU, progress=False,
           block_tokens=128, checkpoint_blocks=2)
    assert states(status(run))["reduce/t0@200__t1@200.h5"] == "complete"


def test_superseded_reduce_work_is_listed_and_cleaned(run, full, monkeypatch, capsys):
    """A reduce killed with one setting and redone with another leaves the first work
    directory behind: status lists it (with its size) as leftover, `clean` removes it,
    and a partial reduce is kept unless --partial."""
    _, models, _ = full
    pair = "reduce/t0@200__t1@200.h5"
    (run / pair).unlink()
    (run / (pair + ".sha256")).unlink()
    ref, others = f"{models}/t0@200", [f"{models}/t1@200"]
    monkeypatch.setenv(faults.FAIL_ENV, "reduce.fold.block:6,reduce.fold.block:5")  # fresh counts
    with pytest.raises(OocError):
        reduce(run, ref, others, ONE_DRAW, CPU, progress=False, block_tokens=128,
               checkpoint_blocks=2)
    row = by_item(status(run))[pair]
    assert row["state"] == "partial" and "finish it: run the same `ooc-universal reduce" \
        in row["detail"] and "--partial" in row["detail"]
    assert "--memory" in row["detail"] and "--block-tokens 128" in row["detail"]  # exact command
    monkeypatch.delenv(faults.FAIL_ENV)
    reduce(run, ref, others, ReduceConfig(baseline_draws=2), CPU, progress=False,
           block_tokens=128)
    rows = status(run)
    left = [r for r in rows if r["state"] == "leftover"]
    work = sorted((run / "reduce" / ".work").iterdir())
    assert len(work) == 1 and [r["item"] for r in left] == [f"reduce/.work/{work[0].name}"]
    assert "ooc-universal clean" in left[0]["detail"] and left[0]["progress"].endswith("B")
    assert main_exit(["clean", "--run-dir", str(run), "--dry-run"]) == 0
    assert work[0].exists()
    assert main_exit(["clean", "--run-dir", str(run)]) == 0
    assert "removed 1 item(s)" in capsys.readouterr().out
    assert not work[0].exists() and not [r for r in status(run) if r["state"] == "leftover"]
    assert states(status(run))[pair] == "complete"


@pytest.mark.parametrize("victim", ["reduce/t0@200__t1@200.h5", "stores/t1@100.h5",
                                    "universal/sets.json"])
def test_missing_sidecar_is_untrusted_not_unrecorded(run, victim, capsys):
    """A file whose checksum sidecar is gone cannot be told from a damaged one: plain
    status flags it, --verify exits 1 (bytes flipped too: the same verdict)."""
    (run / (victim + ".sha256")).unlink()
    data = bytearray((run / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (run / victim).write_bytes(bytes(data))
    item = victim if not victim.startswith("universal") else "universal/"
    row = by_item(status(run))[item]
    assert row["state"] == "corrupt" or (row["checksum"].startswith("UNTRUSTED")
                                         and "--force" in row["checksum"]), row
    assert main_exit(["status", "--run-dir", str(run), "--verify"]) == 1
    assert "failed verification" in capsys.readouterr().err


def main_exit(argv) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return exc.code or 0
    return 0


def test_new_token_set_makes_everything_downstream_stale(run):
    save_token_set(_token_set(1), run, force=True)
    got = by_item(status(run))
    assert got["tokens/"]["state"] == "complete"
    for item in STORES + PAIRS + ["universal/", "ablate/", "report/"]:
        assert got[item]["state"] == "stale", got[item]
        assert "token set" in got[item]["detail"]
    # persistence depends on the universal sets only, and they did not change
    assert got["persistence/"]["state"] == "complete"


def test_changed_store_then_reduce_then_universal(run, full):
    """Re-extracting a store from other weights makes the reduce stale; redoing the reduce
    makes universal stale; redoing universal makes persistence and ablate stale."""
    root, models, _ = full
    other = run.parent / "m2" / "t1"  # other weights; the same store label t1@100
    save_tiny(other / "checkpoint-100", seed=77)
    for rel in ("stores/t1@100.h5", "stores/t1@100.h5.sha256"):
        (run / rel).unlink()
    extract(run, f"{other}@100", compute=CPU, block_tokens=128, progress=False)
    got = by_item(status(run))
    assert got["stores/t1@100.h5"]["state"] == "complete"
    assert got[PAIRS[0]]["state"] == "stale"
    assert "store t1@100 changed since" in got[PAIRS[0]]["detail"]
    assert got["universal/"]["state"] == "complete"  # its inputs are the reduce files
    with pytest.raises(OocError, match="another version of activation store t1@100"):
        reduce(run, f"{models}/t0@100", [f"{other}@100"], ONE_DRAW, CPU, progress=False)
    reduce(run, f"{models}/t0@100", [f"{other}@100"], ONE_DRAW, CPU, progress=False,
           force=True)
    got = by_item(status(run))
    assert got[PAIRS[0]]["state"] == "complete"
    assert got["universal/"]["state"] == "stale"
    assert f"{PAIRS[0]} changed" in got["universal/"]["detail"]
    universal(run, progress=False)
    got = by_item(status(run))
    assert got["universal/"]["state"] == "complete"
    assert got["persistence/"]["state"] == "stale"
    assert got["ablate/"]["state"] == "stale"
    assert got["report/"]["state"] == "stale"


def test_config_toml_with_other_settings_marks_stale(run, full):
    _, models, _ = full
    (run / "config.toml").write_text(config_toml(models, thresholds=[0.5], baseline_draws=3,
                                                 n_tokens=2000))
    got = by_item(status(run))
    assert got["tokens/"]["state"] == "stale" and "n_tokens 1000" in got["tokens/"]["detail"]
    assert got[PAIRS[0]]["state"] == "stale" and "baseline_draws 1" in got[PAIRS[0]]["detail"]
    assert got["universal/"]["state"] == "stale" and "thresholds" in got["universal/"]["detail"]


def test_verify_catches_a_flipped_byte(run, capsys):
    with open_store(run / "stores" / "t0@200.h5") as st:
        offset = st.block_offset(5) + 100  # inside block 5's rows
    with open(run / "stores" / "t0@200.h5", "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))
    with open(run / "universal" / "table1.csv", "ab") as f:
        f.write(b"\n")
    assert states(status(run))["stores/t0@200.h5"] == "complete"  # without --verify: cheap
    rows = status(run, verify=True)
    got = by_item(rows)
    assert got["stores/t0@200.h5"]["state"] == "corrupt"
    assert "block(s) 5 of 8 differ" in got["stores/t0@200.h5"]["checksum"]
    assert got["universal/"]["state"] == "corrupt"
    assert "table1.csv" in got["universal/"]["checksum"]
    assert got["stores/t0@100.h5"]["checksum"] == "ok"
    assert {r["item"] for r in problems(rows)} == {"stores/t0@200.h5", "universal/"}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["status", str(run), "--verify"])
    assert exc.value.code == 1
    out, err = capsys.readouterr()
    assert "MISMATCH" in out and "corrupt" in out
    assert err.count("\n") == 1 and err.startswith("error: 2 output(s) failed verification")


def test_verify_catches_a_modified_token_set(run):
    with open(run / "tokens" / "tokens.npz", "r+b") as f:
        f.seek(300)
        f.write(b"\x00\x01\x02")
    row = by_item(status(run, verify=True))["tokens/"]
    assert row["state"] == "corrupt" and row["checksum"].startswith("MISMATCH")


def test_cli_table_and_json(run, capsys):
    main(["status", str(run)])
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["STEP", "ITEM", "STATE", "PROGRESS", "DETAIL"]
    assert "stores/t0@100.h5" in out and "8/8 blocks" in out
    main(["status", str(run), "--json", "--verify"])
    rows = json.loads(capsys.readouterr().out)
    df = pd.DataFrame(rows)
    assert (df["state"] == "complete").all() and (df["checksum"] != "").all()
