"""Ablation: sets, hooks, restart path, KL and delta loss against independent computations.

The references here run the model plainly (a full HF forward of a copy whose output-
projection rows are edited) and compute KL / CE from the formulas in float64 numpy.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ooc_universal.steps.ablate import (AblationSet, _Runner, ablation_hooks, ablation_sets,
                                  evaluate_ablations)
from ooc_universal.errors import OocError
from tests.tiny import tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
D_MLP = 128  # tiny_model default: 4 * n_embd (32)


def _tokens(n=7, window=40, seed=0, p_valid=0.8):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 256, (n, window))
    ids[:, 0] = 256
    valid = rng.random((n, window)) < p_valid
    valid[:, 0] = False
    return ids, valid


def _set(neurons, name="s"):
    return AblationSet(name, "universal", "all", 0, np.sort(np.asarray(neurons, np.int64)))


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _edited_copy(model, neurons, means=None):
    """A copy whose c_proj rows of `neurons` are zero (mean mode: moved into the bias)."""
    abl = copy.deepcopy(model)
    with torch.no_grad():
        for f in neurons:
            layer, i = divmod(int(f), D_MLP)
            proj = abl.transformer.h[layer].mlp.c_proj   # Conv1D weight: (d_mlp, d_model)
            if means is not None:
                proj.bias += float(means[f]) * proj.weight[i]
            proj.weight[i] = 0.0
    return abl


def _reference(model, neurons, ids, valid, means=None):
    """KL(P||Q), delta loss and their per-window standard errors, float64 numpy."""
    abl = _edited_copy(model, neurons, means)
    with torch.no_grad():
        t = torch.as_tensor(ids)
        lp = _log_softmax(model(t).logits.numpy())
        lq = _log_softmax(abl(t).logits.numpy())
    kl_w, dl_w = [], []
    all_kl, all_dl = [], []
    for w in range(ids.shape[0]):
        pos = [t for t in range(ids.shape[1] - 1) if valid[w, t]]   # t predicts t + 1
        if not pos:
            continue
        nxt = ids[w, [t + 1 for t in pos]]
        kl = (np.exp(lp[w, pos]) * (lp[w, pos] - lq[w, pos])).sum(-1)
        dl = -lq[w, pos, nxt] + lp[w, pos, nxt]
        kl_w.append(kl.mean())
        dl_w.append(dl.mean())
        all_kl += list(kl)
        all_dl += list(dl)
    se = lambda x: np.std(x, ddof=1) / np.sqrt(len(x))   # noqa: E731
    return dict(kl=np.mean(all_kl), kl_se=se(kl_w), delta_loss=np.mean(all_dl),
                delta_loss_se=se(dl_w), n_positions=len(all_kl))


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3, n_layer=3)


def test_no_neuron_and_zero_row_change_nothing_exactly(model):
    ids, valid = _tokens()
    dead = copy.deepcopy(model)
    with torch.no_grad():
        dead.transformer.h[1].mlp.c_proj.weight[5].zero_()       # neuron 1*128+5
        dead.transformer.h[2].mlp.c_proj.weight[77].zero_()
    sets = [_set([]), _set([D_MLP + 5]), _set([D_MLP + 5, 2 * D_MLP + 77])]
    for r in evaluate_ablations(dead, sets, ids, valid, batch_size=3):
        assert r.kl == 0.0 and r.delta_loss == 0.0
        assert r.n_positions == int(valid[:, :-1].sum())


def test_against_independent_forward(model):
    ids, valid = _tokens(n=9, seed=1)
    valid[4] = False                                   # a window with no position
    neuron_sets = [[0, 3, 200], [D_MLP + 1, D_MLP + 9, 2 * D_MLP + 100],
                   list(range(2 * D_MLP, 2 * D_MLP + 40)), [5]]
    results = evaluate_ablations(model, [_set(n) for n in neuron_sets], ids, valid,
                                 batch_size=4)
    for neurons, r in zip(neuron_sets, results):
        ref = _reference(model, neurons, ids, valid)
        assert r.n_positions == ref["n_positions"]
        for k in ("kl", "kl_se", "delta_loss", "delta_loss_se"):
            assert getattr(r, k) == pytest.approx(ref[k], rel=1e-5, abs=1e-10), k
        assert r.kl > 0


def test_kl_nonnegative_and_batch_size_invariant(model):
    ids, valid = _tokens(n=6, seed=2)
    rng = np.random.default_rng(0)
    sets = [_set(rng.choice(3 * D_MLP, size=k, replace=False)) for k in (1, 10, 100, 300)]
    a = evaluate_ablations(model, sets, ids, valid, batch_size=1)
    b = evaluate_ablations(model, sets, ids, valid, batch_size=6)
    for ra, rb in zip(a, b):
        assert ra.kl >= 0 and np.nanmin(ra.window_kl) >= 0
        assert ra.kl == pytest.approx(rb.kl, rel=1e-6)
        assert ra.delta_loss == pytest.approx(rb.delta_loss, rel=1e-6, abs=1e-9)


def test_restart_from_cached_residual_equals_full_forward(model):
    ids = torch.as_tensor(_tokens(n=4)[0])
    runner = _Runner(model)
    assert runner.restartable
    with torch.inference_mode():
        plain = model(ids).logits
        hid, cache = runner.original(ids, [0, 1, 2])
        assert torch.equal(runner.head(hid), plain)
        for layer in range(3):
            assert torch.equal(runner.ablated(ids, layer, cache), hid)   # no hooks: identical
            neurons = np.array([layer * D_MLP + 3, 2 * D_MLP + 50])
            with ablation_hooks(model, neurons, D_MLP):
                full = model(ids).logits
                restarted = runner.head(runner.ablated(ids, layer, cache))
            torch.testing.assert_close(restarted, full, rtol=0, atol=1e-6)
            assert not torch.allclose(full, plain)
        assert torch.equal(model(ids).logits, plain)                  # hooks were removed


def test_mean_mode_against_bias_edit(model):
    ids, valid = _tokens(n=5, seed=4)
    means = np.random.default_rng(1).uniform(-0.2, 1.0, 3 * D_MLP)
    neurons = [2, 40, D_MLP + 7, 2 * D_MLP + 120]
    (r,) = evaluate_ablations(model, [_set(neurons)], ids, valid, mode="mean", means=means)
    ref = _reference(model, neurons, ids, valid, means=means)
    for k in ("kl", "kl_se", "delta_loss", "delta_loss_se"):
        assert getattr(r, k) == pytest.approx(ref[k], rel=1e-5, abs=1e-10), k
    (z,) = evaluate_ablations(model, [_set(neurons)], ids, valid, mode="zero")
    assert z.kl != pytest.approx(r.kl, rel=1e-3)
    with pytest.raises(OocError, match="needs means"):
        evaluate_ablations(model, [_set(neurons)], ids, valid, mode="mean")


def _record(neurons, n_layers=3, d_mlp=16, **kw):
    rec = dict(reference="ref", other="oth", checkpoint=100, threshold=0.5,
               definition="per-pair", draw=0, n_layers=n_layers, d_mlp=d_mlp,
               neurons=sorted(neurons))
    rec.update(kw)
    return rec


def test_matched_controls():
    uni = [0, 1, 5, 16 + 3, 32 + 0, 32 + 9, 32 + 15]
    rec = _record(uni)
    sets = ablation_sets({"sets": [rec]}, control_draws=4, seed=7,
                         include_all_non_universal=True)
    by = {(s.kind, s.layer, s.draw): s for s in sets}
    counts = lambda n: np.bincount(np.asarray(n) // 16, minlength=3)   # noqa: E731
    assert list(by["universal", "all", 0].neurons) == uni
    assert sorted(set(by["all-non-universal", "all", 0].neurons) | set(uni)) == list(range(48))
    assert not set(by["all-non-universal", "all", 0].neurons) & set(uni)
    draws = [by["control", "all", k].neurons for k in range(4)]
    for c in draws:
        assert list(counts(c)) == list(counts(uni)) == [3, 1, 3]
        assert len(set(c)) == len(c) and not set(c) & set(uni)
    assert len({tuple(c) for c in draws}) > 1                        # draws differ
    for layer in range(3):
        u = by["universal", layer, 0].neurons
        assert list(u) == [n for n in uni if n // 16 == layer]
        for k in range(4):
            c = by["control", layer, k].neurons
            assert len(c) == len(u) and set(c // 16) <= {layer} and not set(c) & set(uni)
    again = ablation_sets([rec], control_draws=4, seed=7)
    other = ablation_sets([rec], control_draws=4, seed=8)
    pick = lambda ss: [tuple(s.neurons) for s in ss if s.kind == "control"]   # noqa: E731
    assert pick(again) == pick(sets) and pick(other) != pick(sets)
    assert len(ablation_sets([rec], control_draws=0, layerwise=False)) == 1


def test_too_few_non_universal_is_a_clear_error():
    rec = _record(list(range(16, 16 + 9)))                            # layer 1: 9 of 16
    with pytest.raises(OocError, match="layer 1 has 9 universal neurons but only 7"):
        ablation_sets([rec], control_draws=1)
    assert ablation_sets([rec], control_draws=0)                      # no controls: fine
    with pytest.raises(OocError, match="d_mlp=16, the model has 32"):
        ablation_sets([rec], n_layers=3, d_mlp=32)


# --------------------------------------------------------------------------------------
# The step and the CLI on a hand-written run directory


def _write_tokens(run_dir, ids, valid):
    from ooc_universal.steps import tokens
    return tokens.write_token_set_arrays(run_dir, ids, valid)


def _write_reduce(run_dir, model_dir, means, token_hash, other="other-model"):
    rdir = Path(run_dir) / "reduce"
    rdir.mkdir(parents=True, exist_ok=True)
    label = Path(model_dir).name
    with h5py.File(rdir / f"{label}__{other}.h5", "w") as f:
        f.attrs.update(dict(ref_label=label, other_label=other, ref_name=str(model_dir),
                            other_name=other, ref_step=-1, other_step=-1,
                            ref_model_id=str(model_dir), other_model_id=other,
                            token_hash=token_hash))
        # the rest of the header formats.reduced requires of a reduce output
        f.attrs.update(dict(n_tokens=300, n_layers_ref=2, d_mlp_ref=D_MLP, n_layers_other=2,
                            d_mlp_other=D_MLP, baseline_seeds=np.zeros(1, np.int64)))
        f["ref/mean"] = means
    from ooc_universal.rundir import seal
    seal(rdir / f"{label}__{other}.h5", {"step": "reduce"})


def _write_sets(run_dir, doc):
    """sets.json as the universal step commits it: the bytes and their checksum sidecar,
    which records the reduce files (RUN/reduce/*.h5, sealed) it was made from."""
    from ooc_universal.rundir import read_sidecar, write_json_atomic
    inputs = {f"reduce/{p.name}": read_sidecar(p)["sha256"]
              for p in sorted((Path(run_dir) / "reduce").glob("*__*.h5"))}
    assert inputs, "write the reduce file(s) first: the sets record what they were made from"
    write_json_atomic(Path(run_dir) / "universal" / "sets.json", doc,
                      record={"step": "universal", "inputs": inputs})


def _cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "ooc_universal", "ablate", *args],
                          capture_output=True, text=True, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory: byte token set, a tiny model, sets.json and a reduce file."""
    from ooc_universal.steps.tokens import build_token_set, save_token_set
    from tests.tiny import save_tiny
    root = tmp_path_factory.mktemp("ablate")
    model_dir = save_tiny(root / "tinyref", seed=5)                   # 2 layers x 128
    text = (REPO / "ooc_universal" / "steps" / "ablate.py").read_bytes()
    stream = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    ts = build_token_set(stream, 300, tokenizer="bytes", window=48, n_eval_tokens=400)
    run_dir = root / "run"
    save_token_set(ts, run_dir)
    rng = np.random.default_rng(0)
    uni = sorted(rng.choice(2 * D_MLP, 12, replace=False).tolist())
    (run_dir / "universal").mkdir()
    sets = [dict(reference=str(model_dir), other="other-model", checkpoint=-1,
                 threshold=t, definition="per-pair", draw=0, n_layers=2, d_mlp=D_MLP,
                 neurons=uni[:k]) for t, k in ((0.4, 12), (0.5, 5))]
    means = rng.uniform(-0.1, 0.8, 2 * D_MLP)
    _write_reduce(run_dir, model_dir, means, ts.hash)
    _write_sets(run_dir, {"config": {}, "sets": sets})
    return dict(run_dir=run_dir, model_dir=model_dir, uni=uni, means=means, ts=ts)


def _read_csv(path):
    import pandas as pd
    return pd.read_csv(path)


def test_cli_end_to_end_matches_independent_computation(run):
    from click.testing import CliRunner
    from ooc_universal.cli.main import cli
    from transformers import GPT2LMHeadModel
    rd = run["run_dir"]
    res = CliRunner().invoke(cli, ["ablate", "--run-dir", str(rd), "--control-draws", "3",
                                   "--all-non-universal", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "delta_loss" in res.output and "all-non-universal" in res.output
    summary, draws = _read_csv(rd / "ablate" / "ablation.csv"), \
        _read_csv(rd / "ablate" / "ablation_draws.csv")
    doc = json.loads((rd / "ablate" / "ablation.json").read_text())
    assert len(doc["rows"]) == len(summary) == 2 * (3 + 2 * 2)   # 2 thresholds
    assert doc["inputs"]["eval_hash"] and doc["config"]["mode"] == "zero"

    model = GPT2LMHeadModel.from_pretrained(run["model_dir"]).eval()
    ids, valid = run["ts"].eval_input_ids.astype(np.int64), run["ts"].eval_valid
    uni_row = summary[(summary["threshold"] == 0.4) & (summary["set"] == "universal")
                      & (summary["scope"] == "all")].iloc[0]
    ref = _reference(model, run["uni"], ids, valid)
    assert uni_row["n_neurons"] == 12 and uni_row["n_positions"] == ref["n_positions"]
    for k in ("kl", "kl_se", "delta_loss", "delta_loss_se"):
        assert uni_row[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-10), k

    ctrl = draws[(draws["threshold"] == 0.4) & (draws["set"] == "control")
                 & (draws["scope"] == "all")]
    row = summary[(summary["threshold"] == 0.4) & (summary["set"] == "control")
                  & (summary["scope"] == "all")].iloc[0]
    assert len(ctrl) == 3 and row["kl"] == pytest.approx(ctrl["kl"].mean())
    assert row["kl_ci_low"] <= row["kl"] <= row["kl_ci_high"]
    assert (summary["kl"] >= 0).all()

    again = CliRunner().invoke(cli, ["ablate", "--run-dir", str(rd), "--control-draws", "3",
                                     "--all-non-universal", "--no-progress"])
    assert again.exit_code == 0 and "reused 1 of 1" in again.output
    assert _read_csv(rd / "ablate" / "ablation.csv").equals(summary)


def test_cli_mean_mode_and_model_override(run):
    from click.testing import CliRunner
    from ooc_universal.cli.main import cli
    from transformers import GPT2LMHeadModel
    rd, md = run["run_dir"], run["model_dir"]
    res = CliRunner().invoke(cli, ["ablate", "--run-dir", str(rd), "--mode", "mean",
                                   "--thresholds", "0.5", "--control-draws", "1",
                                   "--no-layerwise", "--n-eval-tokens", "150",
                                   "--model", f"{md}={md}", "--no-progress"])
    assert res.exit_code == 0, res.output
    summary = _read_csv(rd / "ablate" / "ablation.csv")
    assert list(summary["set"]) == ["universal", "control"]
    model = GPT2LMHeadModel.from_pretrained(md).eval()
    ids, valid = run["ts"].eval_input_ids.astype(np.int64), run["ts"].eval_valid.copy()
    cut = np.flatnonzero(np.pad(valid[:, :-1], ((0, 0), (0, 1))).reshape(-1))[149]
    valid.reshape(-1)[cut + 1:] = False                    # the first 150 positions of T
    ref = _reference(model, run["uni"][:5], ids, valid, means=run["means"])
    row = summary.iloc[0]
    assert row["n_positions"] == 150
    for k in ("kl", "delta_loss"):
        assert row[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-10), k


def test_cli_errors_are_one_line_exit_1(run, tmp_path):
    res = _cli("--run-dir", str(tmp_path / "empty"))
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0
    assert "run `ooc-universal universal` first" in res.stderr

    rd = tmp_path / "crowded"
    (rd / "universal").mkdir(parents=True)
    import shutil
    shutil.copytree(run["run_dir"] / "tokens", rd / "tokens")
    shutil.copytree(run["run_dir"] / "reduce", rd / "reduce")
    rec = dict(reference=str(run["model_dir"]), other="o", checkpoint=-1, threshold=0.5,
               definition="per-pair", draw=0, n_layers=2, d_mlp=D_MLP,
               neurons=list(range(D_MLP, D_MLP + 70)))                   # 70 of 128 in layer 1
    _write_sets(rd, {"sets": [rec]})
    md = run["model_dir"]
    res = _cli("--run-dir", str(rd), "--model", f"{md}={md}", "--no-progress")
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().count("\n") == 0
    assert "layer 1 has 70 universal neurons but only 58 non-universal" in res.stderr
    assert not (rd / "ablate" / "ablation.csv").exists()


def test_model_spec_from_reduce_attrs_and_overrides(tmp_path):
    from ooc_universal.formats.sets import UniversalSet
    from ooc_universal.steps.ablate import _before_padding, _model_spec
    from tests.tiny import save_tiny
    save_tiny(tmp_path / "m" / "checkpoint-100")
    local = dict(ref_model_id=str(tmp_path / "m" / "checkpoint-100"), ref_step=100,
                 ref_label="m@100", ref_name=str(tmp_path / "m"))
    hub = dict(ref_model_id="stanford-crfm/alias-gpt2-small-x21", ref_step=100000,
               ref_label="alias-gpt2-small-x21@100000", ref_name="alias-gpt2-small-x21")
    index = [(tmp_path / "x.h5", local), (tmp_path / "y.h5", hub)]
    rec_local = UniversalSet(reference=str(tmp_path / "m"), checkpoint=100)
    rec_hub = UniversalSet(reference="alias-gpt2-small-x21", checkpoint=100000)
    assert _model_spec(rec_local, {}, index)[1] == "m@100"
    assert _model_spec(rec_hub, {}, index) == ("stanford-crfm/alias-gpt2-small-x21@100000",
                                               "alias-gpt2-small-x21@100000")
    spec = str(tmp_path / "m" / "checkpoint-100")
    assert _model_spec(rec_hub, {"a@100000": spec}, index) == (spec, "m@100")
    with pytest.raises(OocError, match="--model alias-gpt2-small-x21@200000=SPEC"):
        _model_spec(UniversalSet(reference=rec_hub.reference, checkpoint=200000), {}, index)
    ids = np.array([[256, 1, 2, 3, 256, 256], [256, 1, 256, 3, 4, 5]])
    assert _before_padding(ids, 256).astype(int).tolist() == [[0, 0, 0, 1, 1, 1],
                                                              [0, 0, 0, 0, 0, 1]]


def _copy_run(run, tmp_path):
    import shutil
    rd = tmp_path / "run"
    shutil.copytree(run["run_dir"], rd, ignore=shutil.ignore_patterns("ablate"))
    return rd


def _other_token_set(rd):
    from ooc_universal.steps.tokens import build_token_set, save_token_set
    stream = np.frombuffer(bytes(range(32, 127)) * 40, dtype=np.uint8).astype(np.int64)
    save_token_set(build_token_set(stream, 300, tokenizer="bytes", window=48,
                                   n_eval_tokens=400), rd, force=True)


def _reduce_recomputed(rd):
    from ooc_universal.rundir import ensure_sidecar, read_sidecar, write_json_atomic
    (red,) = (rd / "reduce").glob("*.h5")
    ensure_sidecar(red, {"step": "reduce"})
    sets = rd / "universal" / "sets.json"       # made from the reduce file as it was
    write_json_atomic(sets, json.loads(sets.read_text()),
                      record={"step": "universal",
                              "inputs": {f"reduce/{red.name}": read_sidecar(red)["sha256"]}})
    return red


def _mutate(case, rd):
    from ooc_universal.rundir import ensure_sidecar, sidecar_path
    sets = rd / "universal" / "sets.json"
    if case == "no sidecar":
        sidecar_path(sets).unlink()
    elif case == "edited by hand":
        sets.write_text(sets.read_text().replace('"threshold": 0.5', '"threshold": 0.55'))
    elif case == "another run's token set":
        doc = json.loads(sets.read_text())
        doc["token_hash"] = "0" * 64
        _write_sets(rd, doc)
    elif case == "reduce recomputed since":
        red = _reduce_recomputed(rd)
        with h5py.File(red, "a") as f:
            f.attrs["n_tokens"] = 301
        sidecar_path(red).unlink()
        ensure_sidecar(red, {"step": "reduce"})
    elif case == "reduce gone":
        red = _reduce_recomputed(rd)
        red.rename(red.with_name("elsewhere.h5"))
    return {"no sidecar": "(has no readable checksum sidecar|untrusted)",
            "edited by hand": "(does not match its checksum sidecar|damaged)",
            "another run's token set": "made from token set 000000000000",
            "reduce recomputed since": r"it is now \w+ \(recomputed since",
            "reduce gone": "which is not in this run"}[case]


@pytest.mark.parametrize("case", ["no sidecar", "edited by hand", "another run's token set",
                                  "reduce recomputed since", "reduce gone"])
def test_foreign_or_damaged_sets_are_refused(run, tmp_path, case):
    from ooc_universal.steps.ablate import ablate
    from ooc_universal.config import AblateConfig
    rd = _copy_run(run, tmp_path)
    expected = _mutate(case, rd)
    with pytest.raises(OocError, match=expected + r".*run `ooc-universal universal --run-dir"):
        ablate(rd, AblateConfig(control_draws=1), progress=False)
    assert not (rd / "ablate" / "ablation.csv").exists()


def test_sets_of_another_run_via_the_cli_is_one_line(run, tmp_path):
    rd = _copy_run(run, tmp_path)
    sets = rd / "universal" / "sets.json"
    doc = {**json.loads(sets.read_text()), "token_hash": run["ts"].hash}  # this run's sets
    _write_sets(rd, doc)
    _other_token_set(rd)      # ... now beside another run's token set
    md = run["model_dir"]
    res = _cli("--run-dir", str(rd), "--model", f"{md}={md}", "--no-progress")
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0, res.stderr
    assert "(a sets.json from another run?)" in res.stderr
    assert not (rd / "ablate" / "ablation.csv").exists()


def _flip_byte(path, at=None):
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_in_a_reduce_file_is_refused_in_one_line(run, tmp_path):
    """A reduce file whose bytes no longer match its sidecar (the sidecar, and so the
    sets' provenance, still record the old sha256): ablate verifies it before use
    (rundir.verify_file), and refuses with one line, exit 1, no ablation files."""
    from ooc_universal.rundir import forget_verified
    rd = _copy_run(run, tmp_path)
    (red,) = (rd / "reduce").glob("*.h5")
    _flip_byte(red)
    forget_verified()
    md = run["model_dir"]
    res = _cli("--run-dir", str(rd), "--model", f"{md}={md}", "--no-progress")
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().count("\n") == 0, res.stderr
    assert f"reduce output {str(red)!r} is damaged: sha256" in res.stderr
    assert "run `ooc-universal reduce` again" in res.stderr
    assert not (rd / "ablate" / "ablation.csv").exists()
    # its sidecar deleted as well: untrusted, refused the same way (also from the API)
    from ooc_universal.rundir import sidecar_path
    from ooc_universal.steps.ablate import ablate
    from ooc_universal.config import AblateConfig
    sidecar_path(red).unlink()
    with pytest.raises(OocError, match=r"made from reduce/.*\.h5, which is untrusted now: it "
                                       r"has no readable checksum sidecar"):
        ablate(rd, AblateConfig(control_draws=1), progress=False)
    assert not (rd / "ablate" / "ablation.csv").exists()


def test_flipped_byte_in_sets_json_is_refused_in_one_line(run, tmp_path):
    rd = _copy_run(run, tmp_path)
    sets = rd / "universal" / "sets.json"
    text = sets.read_text()
    at = text.index('"neurons": [') + len('"neurons": [')   # a digit of the first neuron
    _flip_byte(sets, at)
    res = _cli("--run-dir", str(rd), "--no-progress")
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0, res.stderr
    assert f"universal sets {str(sets)!r} is damaged: sha256" in res.stderr
    assert not (rd / "ablate" / "ablation.csv").exists()


def test_sets_rewritten_under_a_running_pipeline_are_refused(run, tmp_path):
    """`run` passes the universal_id its own universal step made: sets.json written
    since by another `universal` (a valid, sealed file with another id) is refused."""
    from ooc_universal.config import AblateConfig
    from ooc_universal.errors import StaleInputError
    from ooc_universal.steps.ablate import ablate
    rd = _copy_run(run, tmp_path)
    doc = json.loads((rd / "universal" / "sets.json").read_text())
    _write_sets(rd, {**doc, "universal_id": "made-by-this-run"})
    md = str(run["model_dir"])
    kw = dict(progress=False, model_overrides={md: md}, thresholds=[0.5])
    with pytest.raises(StaleInputError, match=r"were rewritten while this run was running "
                                              r"\(universal_id made-by-this-run, this run "
                                              r"made other-id\)"):
        ablate(rd, AblateConfig(control_draws=1), universal_id="other-id", **kw)
    assert not (rd / "ablate" / "ablation.csv").exists()
    out = ablate(rd, AblateConfig(control_draws=1), universal_id="made-by-this-run", **kw)
    assert out.rows and (rd / "ablate" / "ablation.csv").exists()
