"""tokens -> extract -> reduce -> universal -> persistence from the CLI on tiny models,
against float64 numpy computed here from the paper's formulas (design.md, "The math"):
windows and validity mask from the text, activations from a hook of our own, Pearson
correlation, signed row max over every neuron of the other model, the rotation baseline
by explicit rotation of the other model's activations, excess, universal sets, Table 1
and P(universal at t2 | universal at t1)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from transformers import GPT2LMHeadModel

from ooc_universal.cli.main import cli
from tests.tiny import tiny_model

N_TOKENS, WINDOW, BOS, NEWLINE = 1500, 32, 256, 10
N_LAYERS, D_MLP = 2, 64
STEPS = (100, 200)
TAUS = (0.2, 0.5)
SEED, DRAWS = 5, 2


def _perturbed(seed: int, noise: float, noise_seed: int):
    """tiny_model(seed) with Gaussian noise of `noise` x each tensor's std added: a
    stand-in for a model trained alongside (small noise: many universal neurons)."""
    model = tiny_model(seed=seed, n_layer=N_LAYERS, n_embd=16, n_head=2, d_mlp=D_MLP)
    g = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * float(p.std()))
    return model


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    zoo = {"a": (0, 0.0), "b": (0, 0.1), "c": (9, 0.0)}   # b near a, c independent
    for name, (seed, noise) in zoo.items():
        for i, step in enumerate(STEPS):
            _perturbed(seed, noise + 0.05 * i, 100 * seed + 10 * i + ord(name)).save_pretrained(
                root / name / f"checkpoint-{step}")
    text = root / "text.txt"
    text.write_bytes(Path(json.__file__).read_bytes() * 2)
    rd = root / "run"
    runner = CliRunner()

    def ok(*args):
        res = runner.invoke(cli, [str(a) for a in args])
        assert res.exit_code == 0, res.output + repr(res.exception)
        return res.output

    ok("tokens", "--run-dir", rd, "--source", text, "--n-tokens", N_TOKENS, "--window", WINDOW,
       "--tokenizer", "bytes", "--no-progress")
    specs = [f"{root / m}@{s}" for s in STEPS for m in "abc"]
    ok("extract", "--run-dir", rd, *specs, "--device", "cpu", "--no-progress")
    for s in STEPS:
        ok("reduce", "--run-dir", rd, "-r", f"{root / 'a'}@{s}", f"{root / 'b'}@{s}",
           f"{root / 'c'}@{s}", "--baseline-draws", DRAWS, "--seed", SEED, "--device", "cpu",
           "--memory", "1GB", "--no-progress")
    out_u = ok("universal", "--run-dir", rd, "--thresholds", ",".join(map(str, TAUS)),
               "--no-progress")
    out_p = ok("persistence", "--run-dir", rd, "--no-progress")
    return root, rd, text, out_u, out_p


# ----------------------------------------------------------------- the reference, here

def windows_from_text(text: Path):
    stream = np.frombuffer(text.read_bytes(), np.uint8).astype(np.int64)
    w = WINDOW - 1
    n_win = len(stream) // w
    ids = np.full((n_win, WINDOW), BOS, np.int64)
    ids[:, 1:] = stream[: n_win * w].reshape(n_win, w)
    valid = (ids != BOS) & (ids != NEWLINE)
    cut = np.flatnonzero(valid.reshape(-1))[N_TOKENS - 1]        # exactly N_TOKENS valid
    flat = valid.reshape(-1).copy()
    flat[cut + 1:] = False
    n_used = cut // WINDOW + 1
    return ids[:n_used], flat.reshape(valid.shape)[:n_used]


def acts64(model_dir: Path, ids, valid) -> np.ndarray:
    """Post-GELU activations (input of each c_proj) at the valid positions, rounded to
    fp16 as the store keeps them, in float64."""
    model = GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    got = []
    hooks = [blk.mlp.c_proj.register_forward_pre_hook(
        lambda mod, args: got.append(args[0].reshape(-1, D_MLP).numpy().copy()))
        for blk in model.transformer.h]
    with torch.no_grad():
        model(input_ids=torch.from_numpy(ids))
    for h in hooks:
        h.remove()
    x = np.concatenate(got, axis=1)[valid.reshape(-1)]
    return x.astype(np.float16).astype(np.float64)


def corr64(x, y):
    xc, yc = x - x.mean(0), y - y.mean(0)
    sx, sy = np.sqrt((xc ** 2).sum(0)), np.sqrt((yc ** 2).sum(0))
    c = xc.T @ yc
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = c / np.outer(sx, sy)
    return np.where(np.outer(sx > 0, sy > 0), rho, 0.0)


def rotate(y, seed):
    out = np.empty_like(y)
    for layer in range(N_LAYERS):
        r = np.random.default_rng([seed, layer]).standard_normal((D_MLP, D_MLP))
        r /= np.linalg.norm(r, axis=1, keepdims=True)
        cols = slice(layer * D_MLP, (layer + 1) * D_MLP)
        out[:, cols] = y[:, cols] @ r.T              # (R b)_m = sum_i R[m, i] b_i
    return out


@pytest.fixture(scope="module")
def expected(chain):
    root, rd, text, _, _ = chain
    ids, valid = windows_from_text(text)
    out = {"ids": ids, "valid": valid}
    for s in STEPS:
        a = acts64(root / "a" / f"checkpoint-{s}", ids, valid)
        for o in "bc":
            y = acts64(root / o / f"checkpoint-{s}", ids, valid)
            rho = corr64(a, y)
            base = [corr64(a, rotate(y, SEED + j)).max(1) for j in range(DRAWS)]
            out[(o, s)] = {"max_corr": rho.max(1), "argmax": rho.argmax(1), "rho": rho,
                           "baseline": np.array(base), "excess": rho.max(1) - base[0]}
    return out


# ----------------------------------------------------------------------------- tests

def test_token_set_is_the_texts_windows(chain, expected):
    _, rd, _, _, _ = chain
    z = np.load(rd / "tokens" / "tokens.npz")
    assert np.array_equal(z["input_ids"], expected["ids"])
    assert np.array_equal(z["valid"], expected["valid"])
    assert int(z["valid"].sum()) == N_TOKENS


def test_max_corr_baseline_and_excess_match_float64(chain, expected):
    _, rd, _, _, _ = chain
    neurons = pd.read_parquet(rd / "universal" / "neurons.parquet")
    draws = pd.read_parquet(rd / "universal" / "neuron_draws.parquet")
    assert len(neurons) == len(STEPS) * 2 * N_LAYERS * D_MLP
    for s in STEPS:
        for o in "bc":
            e = expected[(o, s)]
            d = neurons[(neurons.checkpoint == s) & (neurons.other == o)].sort_values(
                "flat_index")
            assert np.abs(d.max_corr.to_numpy() - e["max_corr"]).max() <= 1e-5
            for j in range(DRAWS):
                dj = draws[(draws.checkpoint == s) & (draws.other == o) & (draws.draw == j)]
                assert np.abs(dj.sort_values("flat_index").baseline_max.to_numpy()
                              - e["baseline"][j]).max() <= 1e-5
            assert np.abs(d.excess.to_numpy() - e["excess"]).max() <= 2e-5
            # the matched neuron is the argmax wherever the top two are clearly apart
            srt = np.sort(e["rho"], axis=1)
            clear = srt[:, -1] - srt[:, -2] > 1e-4
            match = d.match_layer.to_numpy() * D_MLP + d.match_neuron.to_numpy()
            assert np.array_equal(match[clear], e["argmax"][clear])
    # the plant worked: b shares many neurons with a, c (independent) far fewer
    assert (expected[("b", 100)]["excess"] > 0.5).sum() > 5 * max(
        1, (expected[("c", 100)]["excess"] > 0.5).sum())


def _sets(expected, o, s, tau):
    e = expected[(o, s)]["excess"]
    assert np.abs(e - tau).min() > 1e-4          # no neuron on the fence: sets are exact
    return set(np.flatnonzero(e > tau).tolist())


def test_universal_sets_and_table1(chain, expected):
    _, rd, _, out_u, _ = chain
    doc = json.loads((rd / "universal" / "sets.json").read_text())
    got = {(r["other"], r["checkpoint"], r["threshold"]): set(r["neurons"])
           for r in doc["sets"] if r["draw"] in (0, None)}
    t1 = {(e["threshold"], e["checkpoint"], e["layer"]): e
          for e in json.loads((rd / "universal" / "table1.json").read_text())["rows"]
          if e["aggregation"] == "mean_over_pairs"}
    for s in STEPS:
        for tau in TAUS:
            pct = []
            for o in "bc":
                want = _sets(expected, o, s, tau)
                assert got[(o, s, tau)] == want
                pct.append(100.0 * len(want) / (N_LAYERS * D_MLP))
            assert t1[(tau, s, None)]["pct_universal"] == pytest.approx(np.mean(pct), abs=1e-9)
            per_layer = [np.mean([100.0 * sum(1 for k in _sets(expected, o, s, tau)
                                               if k // D_MLP == layer) / D_MLP for o in "bc"])
                         for layer in range(N_LAYERS)]
            assert [t1[(tau, s, layer)]["pct_universal"] for layer in range(N_LAYERS)] \
                == pytest.approx(per_layer, abs=1e-9)
    assert "Table 1" in out_u


def test_persistence_matches_hand_computation(chain, expected):
    _, rd, _, _, out_p = chain
    doc = json.loads((rd / "persistence" / "persistence.json").read_text())
    rows = {(r["other"], r["threshold"], "all" if r["layer"] is None else str(r["layer"])): r
            for r in doc["rows"] if r["aggregation"] == "pair" and (r["t1"], r["t2"]) == STEPS}
    for o in "bc":
        for tau in TAUS:
            u1, u2 = _sets(expected, o, STEPS[0], tau), _sets(expected, o, STEPS[1], tau)
            r = rows[(o, tau, "all")]
            assert (r["n_t1"], r["n_t2"], r["n_both"]) == (len(u1), len(u2), len(u1 & u2))
            if u1:
                assert r["p_persist"] == pytest.approx(len(u1 & u2) / len(u1), abs=1e-12)
            else:
                assert r["p_persist"] is None and r["undefined"]
            if u1 | u2:
                assert r["jaccard"] == pytest.approx(len(u1 & u2) / len(u1 | u2), abs=1e-12)
            assert r["n_emerged"] == len(u2 - u1)
            for layer in range(N_LAYERS):
                l1 = {k for k in u1 if k // D_MLP == layer}
                l2 = {k for k in u2 if k // D_MLP == layer}
                rl = rows[(o, tau, str(layer))]
                assert (rl["n_t1"], rl["n_both"]) == (len(l1), len(l1 & l2))
    assert "100" in out_p and "200" in out_p
