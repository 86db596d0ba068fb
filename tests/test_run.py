"""`ooc-universal run` on the shipped demo zoo, on a smaller slice so CI stays fast:
every table and figure, report numbers equal to the files they come from, the config
saved, and a run killed between steps resumes without redoing completed steps."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ooc_universal.cli.main import cli
from ooc_universal.config import RunConfig, demo_config, demo_zoo_dir

# A slice of the demo: fewer tokens and draws than the preset, the same models and steps.
SLICE = ["--n-tokens", "4096", "--n-eval-tokens", "1024", "--baseline-draws", "2",
         "--control-draws", "2", "--no-progress"]
FIGURES = (["universal_percent", "corr_vs_baseline", "excess_hist", "universal_layer_counts",
            "heldout_loss", "convergence"]
           + [f"{k}_t{t}" for t in ("04", "05", "06") for k in
              ("persistence_pairs", "persistence_layers", "persistence_layers_by_pair",
               "ablation", "ablation_layers")])


def test_demo_zoo_is_shipped_and_small():
    zoo = demo_zoo_dir()
    info = json.loads((zoo / "zoo.json").read_text())
    files = [p for p in zoo.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2 ** 20
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == len(info["models"]) * len(info["checkpoint_steps"]) >= 5 * 3
    from safetensors import safe_open
    with safe_open(str(weights[0]), "np") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"float16"}
    assert not list(zoo.rglob("train_state.pt"))
    # learned real structure: every model's last checkpoint beats the unigram baseline
    last = str(info["checkpoint_steps"][-1])
    assert all(m["checkpoints"][last]["heldout_loss"] < info["unigram_heldout_loss"] - 0.5
               for m in info["models"])
    cfg = demo_config()
    assert len(cfg.models) == len(info["models"]) and cfg.checkpoints == info["checkpoint_steps"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    rd = tmp_path_factory.mktemp("demo") / "run"
    res = CliRunner().invoke(cli, ["run", "--run-dir", str(rd), *SLICE])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return rd, res.output


def test_demo_run_produces_every_table_and_figure(demo_run):
    rd, out = demo_run
    assert f"report: {rd / 'report' / 'index.html'}" in out
    data = json.loads((rd / "report" / "report_data.json").read_text())
    assert sorted(data["figures"]) == sorted(FIGURES)
    for fig in data["figures"].values():
        assert (rd / "report" / fig["file"]).read_bytes().startswith(b"\x89PNG")
    assert all(s["status"] == "ok" for s in data["sections"].values()), data["sections"]
    for name in ("table1", "table1_pairs", "table1_layers", "persistence", "ablation",
                 "zoo_loss"):
        assert data["tables"][name]["rows"], name
    md = (rd / "report" / "index.md").read_text()
    assert md.count("](fig_") == len(FIGURES)
    html = (rd / "report" / "index.html").read_text()
    assert html.count('src="data:image/png;base64,') == len(FIGURES)
    # the config actually used is saved, with the command-line overrides in it
    used = RunConfig.from_toml(rd / "config.toml")
    assert used.tokens.n_tokens == 4096 and used.ablate.control_draws == 2
    assert used.models == demo_config().models


def test_report_numbers_equal_their_sources(demo_run):
    rd, _ = demo_run
    data = json.loads((rd / "report" / "report_data.json").read_text())
    t1 = [e for e in json.loads((rd / "universal" / "table1.json").read_text())["rows"]
          if e["aggregation"] == "mean_over_pairs" and e["scope"] == "all"]
    by = {(e["threshold"], e["checkpoint"]): e for e in t1}
    recs = data["tables"]["table1"]["records"]
    assert len(recs) == 3 * 3
    for rec in recs:
        assert rec["pct_universal"] == by[(rec["threshold"], rec["checkpoint"])]["pct_universal"]
    # Table 1 against the per-neuron table, recomputed here: mean over pairs of
    # 100 * count(excess > tau) / n_neurons (draw 0)
    import pandas as pd
    neurons = pd.read_parquet(rd / "universal" / "neurons.parquet")
    for (tau, ck), e in by.items():
        sub = neurons[neurons.checkpoint == ck]
        pct = [100.0 * float((g.excess > tau).mean()) for _, g in sub.groupby("other")]
        assert e["pct_universal"] == pytest.approx(np.mean(pct), abs=1e-9)
    with open(rd / "ablate" / "ablation.csv") as f:
        abl = {(r["other"], int(r["checkpoint"]), float(r["threshold"]), r["set"]): r
               for r in csv.DictReader(f) if r["scope"] == "all"}
    for rec in data["tables"]["ablation"]["records"]:
        src = abl[(rec["other"], rec["checkpoint"], rec["threshold"], rec["set"])]
        assert rec["kl"] == float(src["kl"]) and rec["delta_loss"] == float(src["delta_loss"])
    pers = json.loads((rd / "persistence" / "persistence.json").read_text())
    src = {(r["other"], r["threshold"], r["t1"], r["t2"]): r for r in pers["rows"]
           if r["aggregation"] == "pair" and r["scope"] == "all"}
    for rec in data["tables"]["persistence"]["records"]:
        if rec["other"] in {r[0] for r in src}:
            s = src[(rec["other"], rec["threshold"], rec["t1"], rec["t2"])]
            assert rec["p_persist"] == s["p_persist"] and rec["n_t1"] == s["n_t1"]
    zoo = json.loads((demo_zoo_dir() / "zoo.json").read_text())
    unigram = [r for r in data["tables"]["zoo_loss"]["records"]
               if r["model"] == "unigram baseline"]
    assert unigram and unigram[0]["heldout_loss"] == zoo["unigram_heldout_loss"]


def _stamp(paths):
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def test_killed_between_steps_resumes_without_redoing(tmp_path):
    rd = tmp_path / "run"
    cmd = [sys.executable, "-m", "ooc_universal", "run", "--run-dir", str(rd), *SLICE]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # 1) a run that stopped after extract (as if killed between extract and reduce)
    subprocess.run(cmd + ["--steps", "tokens,extract"], check=True, env=env,
                   capture_output=True, timeout=600)
    stores = sorted((rd / "stores").glob("*.h5"))
    assert len(stores) == 5 * 3
    before = _stamp(stores + [rd / "tokens" / "meta.json"])
    # 2) the full run, SIGKILLed as soon as the universal step has written its output
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (rd / "universal" / "table1.json").exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (rd / "report" / "index.html").exists()
    reduced = sorted((rd / "reduce").glob("*.h5"))
    assert len(reduced) == 4 * 3
    before.update(_stamp(reduced))
    # 3) the same command again: nothing finished is recomputed, the report appears
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert _stamp([Path(p) for p in before]) == before
    assert "token set complete; skipped" in res.stdout
    assert "0 block folds computed" in res.stdout
    assert (rd / "report" / "index.html").exists()


def test_scheduler_runs_the_same_study_on_a_cluster(demo_run, tmp_path):
    """--scheduler: the extractions and reductions go to a dask.distributed cluster (two
    worker processes here); the stores are bit-identical to the local run's and the
    statistics equal within 1e-6."""
    import h5py
    from distributed import LocalCluster
    local, _ = demo_run
    rd = tmp_path / "run"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        res = CliRunner().invoke(cli, ["run", "--run-dir", str(rd), *SLICE,
                                       "--scheduler", cluster.scheduler_address,
                                       "--steps", "tokens,extract,reduce,universal"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    for store in sorted((local / "stores").glob("*.h5")):
        with h5py.File(store) as a, h5py.File(rd / "stores" / store.name) as b:
            assert np.array_equal(a["acts"][()], b["acts"][()]), store.name
    for red in sorted((local / "reduce").glob("*.h5")):
        with h5py.File(red) as a, h5py.File(rd / "reduce" / red.name) as b:
            for k in ("row_max", "col_max", "baseline/row_max", "ref/mean", "other/var"):
                assert np.abs(a[k][()] - b[k][()]).max() <= 1e-6, (red.name, k)
    t_local = json.loads((local / "universal" / "table1.json").read_text())["rows"]
    t_cluster = json.loads((rd / "universal" / "table1.json").read_text())["rows"]
    # equal, up to a neuron whose excess lies within 1e-6 of a threshold (none here)
    assert [e["pct_universal"] for e in t_cluster] == pytest.approx(
        [e["pct_universal"] for e in t_local], abs=100.0 / 1024 + 1e-9)


def _byte_config(tmp_path, models, **kw) -> RunConfig:
    text = tmp_path / "text.txt"
    text.write_bytes(bytes(range(32, 127)) * 200)
    return RunConfig(models=models, tokens={"source": str(text), "tokenizer": "bytes",
                                            "n_tokens": 512, "n_eval_tokens": 0,
                                            "window": 32}, **kw)


def test_run_labels_folders_of_one_name_from_their_paths(tmp_path):
    from tests.tiny import save_tiny
    from ooc_universal.run import run
    from ooc_universal.formats.store import open_store
    dirs = [save_tiny(tmp_path / "runs" / s / "model", seed=i) for i, s in enumerate(("s1", "s2"))]
    rd = tmp_path / "run"
    run(_byte_config(tmp_path, [str(d) for d in dirs]), rd, progress=False,
        steps=("tokens", "extract"), echo=lambda *a: None)
    stores = sorted(p.name for p in (rd / "stores").glob("*.h5"))
    assert stores == ["s1--model.h5", "s2--model.h5"]
    # each store holds its own model's activations: the two seeds differ
    with open_store(rd / "stores" / stores[0]) as a, open_store(rd / "stores" / stores[1]) as b:
        assert not np.array_equal(np.asarray(a[:64]), np.asarray(b[:64]))


def test_run_refuses_mixed_families_before_writing_anything(tmp_path):
    from tests.tiny import save_tiny, save_tiny_family
    from ooc_universal.errors import OocError
    from ooc_universal.run import run
    g, n = save_tiny(tmp_path / "g"), save_tiny_family(tmp_path / "n", "gpt-neox")
    rd = tmp_path / "run"
    with pytest.raises(OocError, match=r"^the run mixes model families \(gpt2: g; gpt-neox: n\)"):
        run(_byte_config(tmp_path, [str(g), str(n)]), rd, progress=False, echo=lambda *a: None)
    assert not rd.exists() or not any(rd.iterdir())
    # allowed explicitly, the same study gets its token set and stores
    run(_byte_config(tmp_path, [str(g), str(n)], allow_mixed_families=True), rd,
        progress=False, steps=("tokens", "extract"), echo=lambda *a: None)
    assert sorted(p.name for p in (rd / "stores").glob("*.h5")) == ["g.h5", "n.h5"]


def _two_checkpoint_zoo(tmp_path, n_models=3):
    from tests.tiny import save_tiny
    models = []
    for i in range(n_models):
        for step in (10, 20):
            save_tiny(tmp_path / "zoo" / f"m{i}" / f"checkpoint-{step}", seed=10 * i + step)
        models.append(str(tmp_path / "zoo" / f"m{i}"))
    return models


def test_disk_budget_makes_stores_one_checkpoint_at_a_time(tmp_path, monkeypatch):
    from ooc_universal import run as run_mod
    from ooc_universal.disk import released
    from ooc_universal.formats.reduced import list_reduced, open_reduced
    models = _two_checkpoint_zoo(tmp_path)
    quiet = dict(progress=False, steps=("tokens", "extract", "reduce"), echo=lambda *a: None)
    base = _byte_config(tmp_path, models, checkpoints=[10, 20],
                        reduce={"baseline_draws": 1})
    run_mod.run(base, tmp_path / "all", **quiet)  # plenty of disk: every store at once
    assert len(list((tmp_path / "all" / "stores").glob("*.h5"))) == 6
    specs = run_mod.study_specs(base)
    plan = run_mod.study_disk_plan(base, tmp_path / "all", specs)
    assert plan.mode == "all" and plan.per_checkpoint < plan.all_at_once
    # a budget that holds one checkpoint's stores, not both
    tight = base.replace(disk=f"{(plan.per_checkpoint + plan.all_at_once) // 2}B")
    seen = []
    real = run_mod.release_stores

    def spy(run_dir, labels, checkpoint, read_by):
        stores = sorted(p.name for p in (run_dir / "stores").glob("*.h5"))
        seen.append((checkpoint, stores, all(p.exists() for p in read_by)))
        return real(run_dir, labels, checkpoint, read_by)
    monkeypatch.setattr(run_mod, "release_stores", spy)
    rd = tmp_path / "tight"
    run_mod.run(tight, rd, **quiet)
    # checkpoint 10's stores were deleted after its pair files were complete and before
    # checkpoint 20's stores existed
    assert seen == [(10, ["m0@10.h5", "m1@10.h5", "m2@10.h5"], True),
                    (20, ["m0@20.h5", "m1@20.h5", "m2@20.h5"], True)]
    assert not list((rd / "stores").glob("*.h5")) and len(released(rd)) == 6
    from ooc_universal.status import status
    rows = status(rd)
    assert [r["state"] for r in rows if r["step"] == "extract"] == ["released"] * 6
    assert {r["state"] for r in rows if r["step"] == "reduce"} == {"complete"}
    # the statistics equal those of the run that kept every store
    names = [p.name for p in list_reduced(rd)]
    assert names == [p.name for p in list_reduced(tmp_path / "all")] and len(names) == 4
    for name in names:
        a, b = open_reduced(rd / "reduce" / name), open_reduced(tmp_path / "all" / "reduce" / name)
        np.testing.assert_array_equal(np.asarray(a.row_max), np.asarray(b.row_max))
    # the same command again extracts nothing: the released checkpoints are complete
    seen.clear()
    run_mod.run(tight, rd, **quiet)
    assert seen == [] and not list((rd / "stores").glob("*.h5"))


def test_disk_budget_refusals_are_one_line(tmp_path):
    from ooc_universal import run as run_mod
    from ooc_universal.errors import UsageError
    models = _two_checkpoint_zoo(tmp_path, n_models=2)
    cfg = _byte_config(tmp_path, models, checkpoints=[10, 20])
    with pytest.raises(UsageError, match=r"^not enough disk for one checkpoint's 2 stores of "
                                         r".*; use --source stream"):
        run_mod.run(cfg.replace(disk="1KB"), tmp_path / "r", progress=False,
                    echo=lambda *a: None)
    plan = run_mod.study_disk_plan(cfg, tmp_path, run_mod.study_specs(cfg))
    half = f"{(plan.per_checkpoint + plan.all_at_once) // 2}B"
    with pytest.raises(UsageError, match=r"^--keep-stores needs .* more than the disk budget"):
        run_mod.run(cfg.replace(disk=half, keep_stores=True), tmp_path / "r", progress=False,
                    echo=lambda *a: None)
    assert not (tmp_path / "r" / "stores").exists()


def test_memory_limit_below_the_plan_is_one_line(tmp_path):
    from ooc_universal.devices import check_memory_limit
    from ooc_universal.errors import UsageError
    with pytest.raises(UsageError, match=r"^the plan needs 2.1 GB of memory, but the cgroup "
                                         r"memory limit leaves this process 1.1 GB"):
        check_memory_limit(2 << 30, "the plan", {"cgroup memory limit": 1 << 30})
    check_memory_limit(1 << 30, "the plan", {"cgroup memory limit": 2 << 30})
    # a real `ulimit -v`: 512 MB more than the process maps, far below the paper's plan
    code = ("import resource, sys\n"
            "from ooc_universal.cli.main import main\n"
            "vm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') "
            "if l.startswith('VmSize:')][0]\n"
            "resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.RLIM_INFINITY))\n"
            f"main(['run', '--preset', 'paper', '--steps', 'reduce', '--run-dir', "
            f"{str(tmp_path / 'run')!r}, '--no-progress'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the reduce's plan (--memory 16GB) "
                                                   "needs "), proc.stderr
    assert "address space (ulimit -v) leaves this process" in lines[0]
    assert not (tmp_path / "run").exists()
