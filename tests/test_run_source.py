"""`run --source store|stream|auto` (issue 15): a tiny 3-model study run with stores and
with forward passes gives the same reduce statistics (row max within 1e-6, argmax
identical: the reduce's own store-vs-stream tolerance, tests/test_stream.py), the same
Table 1 and ablation; the streamed run writes no store; auto is decided before extract
from the plan (both options in the dry run, the chosen one and why; a disk budget that
holds no stores makes it stream)."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ooc_universal.cli.main import cli
from ooc_universal.config import RunConfig
from tests.tiny import save_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

STEPS = "tokens,extract,reduce,universal,ablate"
KEYS = ("row_max", "col_max", "baseline/row_max", "ref/mean", "ref/var", "other/mean",
        "other/var")


def _config(root: Path) -> Path:
    models = [str(save_tiny(root / "zoo" / f"m{i}", seed=20 + i)) for i in range(3)]
    text = root / "text.txt"
    text.write_bytes(bytes(range(32, 127)) * 300)
    cfg = RunConfig(models=models,
                    tokens={"source": str(text), "tokenizer": "bytes", "n_tokens": 768,
                            "n_eval_tokens": 256, "window": 32},
                    reduce={"baseline_draws": 2, "seed": 1},
                    universal={"thresholds": [0.02, 0.1]},
                    ablate={"control_draws": 1, "layerwise": False})
    path = root / "study.toml"
    path.write_text(cfg.to_toml())
    return path


def _run(config: Path, rd: Path, *args) -> str:
    res = CliRunner().invoke(cli, ["run", str(config), "--run-dir", str(rd), "--steps", STEPS,
                                   "--no-progress", *args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("source")
    config = _config(root)
    out = {s: (root / s, _run(config, root / s, "--source", s)) for s in ("store", "stream")}
    return root, config, out


def _stats(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        got = {k: f[k][()] for k in KEYS + ("row_argmax", "col_argmax")}
        got["attrs"] = {k: f.attrs[k] for k in ("ref_label", "other_label", "n_tokens",
                                                "token_hash")}
    return got


def test_stream_and_store_give_the_same_study(study):
    _, _, out = study
    (store, _), (stream, text) = out["store"], out["stream"]
    names = sorted(p.name for p in (store / "reduce").glob("*__*.h5"))
    assert len(names) == 2
    assert sorted(p.name for p in (stream / "reduce").glob("*__*.h5")) == names
    for name in names:
        a, b = _stats(store / "reduce" / name), _stats(stream / "reduce" / name)
        for k in KEYS:
            assert np.abs(a[k] - b[k]).max() <= 1e-6, (name, k)
        for k in ("row_argmax", "col_argmax"):
            assert np.array_equal(a[k], b[k]), (name, k)
        assert a["attrs"] == b["attrs"]
    # Table 1 and the ablation: the same numbers
    rows = {}
    for which, (rd, _) in out.items():
        t1 = json.loads((rd / "universal" / "table1.json").read_text())["rows"]
        rows[which] = [(r["threshold"], r["aggregation"], r["scope"], r["pct_universal"])
                       for r in t1]
    assert rows["stream"] == pytest.approx(rows["store"], abs=1e-12)
    assert 0 < min(r[3] for r in rows["store"]) <= max(r[3] for r in rows["store"]) < 100
    for which, (rd, _) in out.items():
        with open(rd / "ablate" / "ablation.csv") as f:
            rows[which] = sorted((r["other"], r["threshold"], r["set"], r["scope"],
                                  float(r["kl"]), float(r["delta_loss"]))
                                 for r in csv.DictReader(f))
    assert len(rows["store"]) == len(rows["stream"]) > 0
    for a, b in zip(rows["store"], rows["stream"]):
        assert a[:4] == b[:4] and a[4:] == pytest.approx(b[4:], rel=1e-9, abs=1e-12)
    # the streamed run extracted nothing, wrote no store, and its disk plan counts none
    assert "no activation stores to write" in text
    assert "no activation stores (--source stream)" in text
    assert not list(stream.rglob("*.h5.partial")) and not (stream / "stores").exists()
    assert len(list((store / "stores").glob("*.h5"))) == 3
    assert "streamed" in text or "from forward passes" in text
    assert json.loads((stream / "run_timings.json").read_text())["source"] == "stream"
    # status: the streamed models' stores are "streamed" (never written), not missing;
    # a run with stores lists them complete
    from ooc_universal.status import problems, status
    rows = [r for r in status(stream, verify=True) if r["step"] == "extract"]
    assert len(rows) == 3 and {r["state"] for r in rows} == {"streamed"}, rows
    assert all("--source stream" in r["detail"] for r in rows)
    assert not problems(status(stream, verify=True))
    assert {r["state"] for r in status(store) if r["step"] == "extract"} == {"complete"}


def test_auto_dry_run_names_both_options_and_the_choice(study):
    root, config, _ = study
    res = CliRunner().invoke(cli, ["run", str(config), "--run-dir", str(root / "dry"),
                                   "--source", "auto", "--disk-gbps", "2", "--dry-run"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    text = res.output
    assert "[source]  block source (--source auto): both options" in text
    stream = next(line for line in text.splitlines() if line.strip().startswith("stream "))
    store = next(line for line in text.splitlines() if line.strip().startswith("store "))
    for line in (stream, store):
        assert "expected" in line and "disk" in line and "memory" in line
    assert "forward" in stream and "extract" in store
    chosen = text.split("chosen: ", 1)[1].split()[0]
    assert chosen in ("store", "stream") and "stated 2 GB/s" in text
    assert not (root / "dry").exists()  # a dry run writes nothing
    # a given source is compared too (the dry run), and named as given; the study's
    # totals are the per-reduce options of plan.py summed by hand here
    from ooc_universal import run as run_mod
    from ooc_universal.plan import Rates
    cfg = RunConfig.from_toml(config).replace(reduce_source="stream", disk_gbps=2.0)
    specs = run_mod.study_specs(cfg)
    rates = Rates(gemm_flops_per_s=1e10, forward_flops_per_s=1.0)
    choice = run_mod.study_source(cfg, None, specs, rates=rates, forward_rate=1e4,
                                  compare=True)
    assert choice.source == "stream" and choice.reason == "--source stream"
    assert "block source (--source stream): both options" in choice.text
    assert "chosen: stream (--source stream)" in choice.text
    stream_opt, store_opt = choice.options
    # by hand: 768 tokens in windows of 32 (BOS + 31) = 25 windows = 800 positions
    # forwarded at 1e4 positions/s (the models have one shape, so FLOPs cancel out):
    # extract forwards 3 models once (its 3 stores of 768 x 256 fp16 + 64 KiB at 2 GB/s
    # are faster); the stream forwards the reference once and each other model once per
    # panel (1 here); their self co-moments ride along in that pass
    positions = 25 * 32
    write = 3 * (768 * 256 * 2 + (1 << 16)) / 2e9
    assert store_opt.parts["extract"] == pytest.approx(max(3 * positions / 1e4, write))
    assert stream_opt.parts["forward"] == pytest.approx((1 + 2 * 1) * positions / 1e4)
    assert stream_opt.seconds == pytest.approx(sum(stream_opt.parts.values()))
    assert store_opt.seconds == pytest.approx(sum(store_opt.parts.values()))
    assert store_opt.disk_bytes - stream_opt.disk_bytes == 3 * (768 * 256 * 2 + (1 << 16))
    # given, not auto: nothing is costed
    plain = run_mod.study_source(cfg, None, specs)
    assert plain.source == "stream" and not plain.options


def test_auto_without_disk_for_stores_streams_and_says_why(study, tmp_path):
    """A disk budget that holds the reduce outputs but not one checkpoint's stores: auto
    chooses stream before any extract (it says why), writes no store, and the study's
    numbers are the stored run's."""
    from ooc_universal import run as run_mod
    _, config, out = study
    cfg = RunConfig.from_toml(config)
    specs = run_mod.study_specs(cfg)
    stream_disk = run_mod.study_disk_plan(cfg, tmp_path, specs, stores=False).peak
    store_disk = run_mod.study_disk_plan(cfg, tmp_path, specs).per_checkpoint
    assert stream_disk < store_disk
    budget = (stream_disk + store_disk) // 2
    rd = tmp_path / "auto"
    text = _run(config, rd, "--source", "auto", "--disk", f"{budget}B",
                "--steps", "tokens,extract,reduce,universal")
    assert "block source (--source auto): stream (store needs " in text
    assert "of disk, only " in text
    assert not (rd / "stores").exists()
    store = out["store"][0]
    for p in sorted((store / "reduce").glob("*__*.h5")):
        a, b = _stats(p), _stats(rd / "reduce" / p.name)
        assert np.abs(a["row_max"] - b["row_max"]).max() <= 1e-6
        assert np.array_equal(a["row_argmax"], b["row_argmax"])
    assert json.loads((rd / "universal" / "table1.json").read_text())["rows"] == \
        json.loads((store / "universal" / "table1.json").read_text())["rows"]


def test_auto_on_a_finished_study_measures_nothing_and_writes_no_store(study, monkeypatch):
    """Every pair file complete: `run --source auto` again costs nothing (no GEMM, forward
    or disk rate measured: each would raise here) and picks the source that does no work,
    so a streamed study is not given stores after the fact."""
    root, config, out = study

    def refuse(*args, **kwargs):
        raise AssertionError("a rate was measured for a study with nothing to reduce")

    import ooc_universal.plan as plan_mod
    import ooc_universal.run as run_mod
    monkeypatch.setattr(plan_mod, "measure_rates", refuse)
    monkeypatch.setattr(plan_mod, "disk_rates", refuse)
    monkeypatch.setattr(run_mod, "_measure_forward_rate", refuse)
    for which in ("store", "stream"):
        rd = out[which][0]
        before = {p: p.stat().st_mtime_ns for p in (rd / "reduce").glob("*__*.h5")}
        text = _run(config, rd, "--source", "auto")
        assert (f"block source (--source auto): {which} (every pair file is complete"
                in text), text
        assert {p: p.stat().st_mtime_ns for p in (rd / "reduce").glob("*__*.h5")} == before
    assert not (out["stream"][0] / "stores").exists()
