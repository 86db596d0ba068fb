"""Neuron cards on tiny saved models: the chosen neurons against the excess, the matched
neurons against the reduce files (read here with h5py), and the logit effects
W_out . W_U against numpy and scipy from the models' safetensors."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

from ooc_universal.config import CardsConfig, UniversalConfig
from ooc_universal.errors import OocError
from ooc_universal.formats.cards import TopKFile, read_topk, topk_path, write_topk
from ooc_universal.rundir import seal
from ooc_universal.steps.cards import (CONTEXT_AFTER, CONTEXT_BEFORE, N_CONTEXTS, cards,
                                       contexts_of, moments, role_of, top_contexts)
from ooc_universal.steps.tokens import build_token_set, save_token_set
from ooc_universal.steps.universal import universal
from tests.reduce_helpers import write_store
from tests.test_universal import write_reduced
from tests.tiny import tiny_model

N_LAYERS, D_MLP, D_MODEL = 2, 32, 16
N = N_LAYERS * D_MLP
OTHERS = ("b", "c")
STEP, TOP_N, N_TOKENS = 100, 4, 5
ZERO = 5          # a zero-variance reference neuron: excess 0, never chosen
NO_MATCH = 9      # pair c records no matched neuron for it (row_argmax -1)
WINDOW, N_CORR = 16, 300      # the token set: windows of 16 bytes, 300 valid positions
LABEL = f"a@{STEP}"           # the reference store


def _save(root, name, seed):
    """A tiny GPT-2 whose final LayerNorm has a gain other than 1 (so folding it in
    matters) at root/name/checkpoint-STEP."""
    model = tiny_model(seed=seed, n_layer=N_LAYERS, n_embd=D_MODEL, n_head=2, d_mlp=D_MLP)
    with torch.no_grad():
        model.transformer.ln_f.weight.uniform_(0.5, 2.0)
    path = root / name / f"checkpoint-{STEP}"
    model.save_pretrained(path)
    return path


def _arrays(i: int):
    rng = np.random.default_rng([11, i])
    base = rng.uniform(0.05, 0.3, size=(2, N)).astype(np.float32)
    row = (base[0] + rng.uniform(0.0, 0.7, size=N)).astype(np.float32)
    row[ZERO] = base[0, ZERO] = base[1, ZERO] = 0.0
    row[NO_MATCH] = np.float32(0.99)            # the top neuron of both pairs
    argmax = rng.integers(0, N, size=N)
    argmax[ZERO] = -1
    if i == 1:
        argmax[NO_MATCH] = -1
    return row, base, argmax


def _tokens(run_dir):
    """A byte token set with newlines (invalid positions) and BOS columns."""
    rng = np.random.default_rng(4)
    stream = rng.integers(32, 127, size=4000, dtype=np.int32)
    stream[rng.random(stream.size) < 0.08] = 10
    ts = build_token_set(stream, N_CORR, tokenizer="bytes", window=WINDOW)
    save_token_set(ts, run_dir)
    return ts


def _acts():
    """The reference's activations: few distinct fp16 values, so the top k is decided by
    ties (the earlier row wins) in many neurons."""
    rng = np.random.default_rng(5)
    acts = rng.integers(-3, 4, size=(N_CORR, N)).astype(np.float16) / np.float16(4)
    acts[:, ZERO] = 0.5
    return acts


@pytest.fixture(scope="module")
def carded(tmp_path_factory):
    root = tmp_path_factory.mktemp("cards")
    paths = {m: _save(root / "models", m, seed) for seed, m in enumerate(("a",) + OTHERS)}
    rd = root / "run"
    ts = _tokens(rd)
    write_store(rd, LABEL, _acts(), N_LAYERS, D_MLP, token_hash=ts.hash, block_tokens=64,
                step=STEP, name="a")
    for i, other in enumerate(OTHERS):
        row, base, argmax = _arrays(i)
        red = write_reduced(rd, row, base, ref="a", other=other, step=STEP,
                            n_layers_ref=N_LAYERS, d_mlp_ref=D_MLP, n_layers_other=N_LAYERS,
                            d_mlp_other=D_MLP, row_argmax=argmax, zero_var=np.arange(N) == ZERO,
                            token_hash=ts.hash, n_tokens=N_CORR)
        with h5py.File(red, "a") as f:             # name the real models, as reduce does
            f.attrs.update(ref_model_id=str(paths["a"]), other_model_id=str(paths[other]),
                           ref_revision=f"checkpoint-{STEP}",
                           other_revision=f"checkpoint-{STEP}")
        seal(red, {"step": "reduce"})           # written by hand here: vouch for it
    universal(rd, UniversalConfig(thresholds=[0.3, 0.5]), progress=False)
    out = cards(rd, CardsConfig(top_n=TOP_N, n_tokens=N_TOKENS), progress=False)
    return rd, paths, out


def _excess(i: int) -> np.ndarray:
    row, base, _ = _arrays(i)
    return row.astype(np.float64) - base[0].astype(np.float64)


def test_cards_are_the_top_neurons_of_each_pair(carded):
    rd, _, out = carded
    chosen = {}
    for card in out.cards.cards:
        for s in card["selected_by"]:
            chosen[(s["other"], s["rank"])] = card["flat_index"]
    for i, other in enumerate(OTHERS):
        excess = _excess(i)
        live = np.flatnonzero(np.arange(N) != ZERO)
        top = live[np.lexsort((live, -excess[live]))][:TOP_N]      # ties by flat index
        assert [chosen[(other, r)] for r in range(1, TOP_N + 1)] == top.tolist()
        assert top[0] == NO_MATCH
    flats = [c["flat_index"] for c in out.cards.cards]
    assert len(flats) == len(set(flats)) <= TOP_N * len(OTHERS)     # one card per neuron
    assert ZERO not in flats
    for card in out.cards.cards:
        assert (card["layer"], card["neuron"]) == divmod(card["flat_index"], D_MLP)
        assert card["contexts_source"] == "store"           # no top-k file in this run
        assert "computed by the cards step" in card["contexts_note"]


def test_matches_are_the_reduce_files_row_argmax_and_row_max(carded):
    rd, _, out = carded
    for i, other in enumerate(OTHERS):
        with h5py.File(rd / "reduce" / f"a@{STEP}__{other}@{STEP}.h5", "r") as f:
            argmax, row_max = f["row_argmax"][()], f["row_max"][()]
        excess = _excess(i)
        for card in out.cards.cards:
            m = next(m for m in card["matches"] if m["other"] == other)
            k = card["flat_index"]
            assert m["max_corr"] == float(row_max[k])
            assert m["excess"] == pytest.approx(excess[k], abs=1e-12)
            assert m["is_universal"] == {"0.3": bool(excess[k] > 0.3),
                                         "0.5": bool(excess[k] > 0.5)}
            if argmax[k] < 0:
                assert m["match_layer"] is None and m["match_neuron"] is None
            else:
                assert m["match_layer"] * D_MLP + m["match_neuron"] == argmax[k]
    nomatch = next(c for c in out.cards.cards if c["flat_index"] == NO_MATCH)
    assert [m["match_layer"] is None for m in nomatch["matches"]] == [False, True]


def _logit_effect_numpy(weights: dict, flat: int) -> np.ndarray:
    """The LayerNorm-centred W_out row, times ln_f's gain, onto W_U (GPT-2 ties it to
    wte), minus its vocabulary mean: numpy float64 from the safetensors file."""
    layer, neuron = divmod(flat, D_MLP)
    w = weights[f"transformer.h.{layer}.mlp.c_proj.weight"].astype(np.float64)[neuron]
    gain = weights["transformer.ln_f.weight"].astype(np.float64)
    v = ((w - w.mean()) * gain) @ weights["transformer.wte.weight"].astype(np.float64).T
    return v - v.mean()


def test_vocab_effects_match_numpy_from_the_weights(carded):
    _, paths, out = carded
    weights = load_file(paths["a"] / "model.safetensors")
    for card in out.cards.cards:
        v = _logit_effect_numpy(weights, card["flat_index"])
        vocab = card["vocab"]
        promoted, suppressed = np.argsort(-v)[:N_TOKENS], np.argsort(v)[:N_TOKENS]
        assert [t["token_id"] for t in vocab["promoted"]] == promoted.tolist()
        assert [t["token_id"] for t in vocab["suppressed"]] == suppressed.tolist()
        np.testing.assert_allclose([t["logit"] for t in vocab["promoted"]], v[promoted],
                                   rtol=0, atol=1e-9)
        np.testing.assert_allclose([t["logit"] for t in vocab["suppressed"]], v[suppressed],
                                   rtol=0, atol=1e-9)
        assert vocab["kurtosis"] == pytest.approx(scipy.stats.kurtosis(v, fisher=False),
                                                  rel=1e-9)
        assert vocab["skew"] == pytest.approx(scipy.stats.skew(v), rel=1e-9, abs=1e-12)
        for t in vocab["promoted"] + vocab["suppressed"]:   # byte model: the byte, escaped
            i = t["token_id"]
            assert t["token"] == ("<bos>" if i == 256 else repr(bytes([i]))[2:-1])
    assert out.cards.models["a@100"]["tokenizer"] == "bytes"


def test_moments_and_roles():
    rng = np.random.default_rng(0)
    gauss = rng.standard_normal(200_000)
    skew, kurt = moments(gauss)
    assert abs(skew) < 0.05 and kurt == pytest.approx(3.0, abs=0.1)   # plain kurtosis
    assert role_of(skew, kurt) is None
    spike = np.concatenate([rng.standard_normal(5000), [40.0, 35.0]])
    assert role_of(*moments(spike)) == "prediction"
    assert role_of(*moments(-spike)) == "suppression"


def test_open_run_cards_is_a_tidy_frame(carded):
    import ooc_universal as ou
    rd, _, out = carded
    df = ou.open_run(rd).cards()
    assert len(df) == sum(len(c["matches"]) for c in out.cards.cards)
    assert set(df["other"]) == set(OTHERS)
    picked = df.dropna(subset=["pair_rank"])
    assert sorted(picked.groupby("other")["pair_rank"].apply(list).iloc[0]) == \
        list(range(1, TOP_N + 1))
    assert df["match_layer"].dtype == "Int64" and df["pair_rank"].dtype == "Int64"
    assert not [c for c in df.columns if hasattr(pd.DataFrame, c)]   # no df.rank etc.
    assert df["match_layer"].isna().sum() == 1                  # NO_MATCH in pair c
    assert {"is_universal_0.3", "is_universal_0.5", "vocab_kurtosis", "vocab_skew",
            "promoted_tokens", "suppressed_tokens"} <= set(df.columns)
    first = out.cards.cards[0]
    row = df[(df.flat_index == first["flat_index"]) & (df.other == "b")].iloc[0]
    assert row["promoted_tokens"] == [t["token"] for t in first["vocab"]["promoted"]]
    assert row["vocab_kurtosis"] == first["vocab"]["kurtosis"]


def test_report_shows_the_cards(carded):
    from ooc_universal.report import report
    rd, _, out = carded
    data = json.loads(report(rd, progress=False)["data"].read_text())
    assert data["sections"]["cards"]["status"] == "ok"
    table = data["tables"][f"cards_a_{STEP}"]
    assert len(table["rows"]) == len(out.cards.cards)
    assert table["columns"][1:3] == ["vs b", "vs c"]


def test_cli_and_model_overrides(carded, tmp_path):
    import shutil

    from ooc_universal.cli.cards import cards as cards_command
    rd, paths, _ = carded
    res = CliRunner().invoke(cards_command, ["--run-dir", str(rd), "--top-n", "2",
                                             "--no-progress"])
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1] == f"wrote {rd / 'cards' / 'cards.json'}"
    assert json.loads((rd / "cards" / "cards.json").read_text())["config"]["top_n"] == 2
    # the model moved: one line saying how to point at it, then the override works
    moved = tmp_path / "run"
    shutil.copytree(rd, moved)
    for red in (moved / "reduce").glob("*.h5"):
        with h5py.File(red, "a") as f:
            f.attrs["ref_model_id"] = str(tmp_path / "gone" / "a" / f"checkpoint-{STEP}")
        seal(red, {"step": "reduce"})
    with pytest.raises(OocError, match="model_overrides") as exc:
        cards(moved, progress=False)
    assert "\n" not in str(exc.value)
    again = cards(moved, CardsConfig(top_n=1), model_overrides={"a@100": str(paths["a"])},
                  progress=False)
    assert {c["flat_index"] for c in again.cards.cards} == {NO_MATCH}


def test_needs_the_universal_tables(tmp_path):
    with pytest.raises(OocError, match="ooc-universal universal"):
        cards(tmp_path, progress=False)


# ---------------------------------------------------------------- contexts

def _positions(valid):
    """Store row -> (window, position): the valid positions in reading order, walked by
    hand (not np.nonzero)."""
    return [(w, p) for w in range(valid.shape[0]) for p in range(valid.shape[1])
            if valid[w, p]]


def _byte(i):
    return "<bos>" if i == 256 else repr(bytes([int(i)]))[2:-1]


def _expected_contexts(acts, ts, flat, k):
    """The k largest activations of a neuron (stable sort: the earlier row on ties) and
    the bytes around each one's token."""
    order = np.argsort(-acts[:, flat].astype(np.float64), kind="stable")[:k]
    where = _positions(ts.valid)
    out = []
    for row in order:
        w, p = where[row]
        lo, hi = max(0, p - CONTEXT_BEFORE), min(WINDOW, p + CONTEXT_AFTER + 1)
        out.append({"activation": float(acts[row, flat]), "row": int(row), "window": w,
                    "position": p, "focus": p - lo,
                    "tokens": [_byte(t) for t in ts.input_ids[w, lo:hi]]})
    return out


def test_contexts_from_the_store_equal_a_stable_sort(carded):
    from ooc_universal.formats.tokens import load_token_set
    rd, _, out = carded
    ts, acts = load_token_set(rd), _acts()
    assert len(out.cards.cards) > 1
    for card in out.cards.cards:
        assert card["contexts"] == _expected_contexts(acts, ts, card["flat_index"],
                                                      N_CONTEXTS)
        first = card["contexts"][0]
        assert first["tokens"][first["focus"]] == _byte(
            ts.input_ids[first["window"], first["position"]])
    sidecar = json.loads((rd / "cards" / "cards.json.sha256").read_text())
    assert f"stores/{LABEL}.h5" in sidecar["inputs"]


def test_contexts_frame_is_tidy(carded):
    from ooc_universal.formats.cards import contexts_frame, read_cards
    rd, _, _ = carded
    doc = read_cards(rd)               # (another test may have rewritten it: read it)
    df = contexts_frame(doc)
    assert len(df) == sum(len(c["contexts"]) for c in doc.cards) > 0
    card = doc.cards[0]
    mine = df[df.flat_index == card["flat_index"]].sort_values("context_rank")
    assert mine["context_rank"].tolist() == list(range(1, len(card["contexts"]) + 1))
    assert mine["activation"].tolist() == [c["activation"] for c in card["contexts"]]
    first = card["contexts"][0]
    assert mine["text"].iloc[0] == "".join(
        f"[{t}]" if i == first["focus"] else t for i, t in enumerate(first["tokens"]))
    assert df["window"].dtype == np.int64 and set(df["contexts_source"]) == {"store"}
    assert not [c for c in df.columns if hasattr(pd.DataFrame, c)]   # no df.rank etc.


def test_contexts_come_from_the_topk_file_when_it_matches(carded, tmp_path):
    import shutil

    from ooc_universal.formats.tokens import load_token_set
    from ooc_universal.kernels import topk
    rd, _, out = carded
    run = tmp_path / "run"
    shutil.copytree(rd, run)
    ts = load_token_set(run)
    other_acts = -_acts()                 # not the store's numbers: the file must be used
    values, rows = topk.chunk(other_acts, 0, 20)
    write_topk(run, TopKFile(values, rows, LABEL, ts.hash, N_CORR, "extract"))
    got = read_topk(run, LABEL)
    np.testing.assert_array_equal(got.values, values)
    np.testing.assert_array_equal(got.rows, rows)
    flats = [c["flat_index"] for c in out.cards.cards]
    found = top_contexts(run, LABEL, flats, 5)
    assert found.source == "topk file" and "kept by extract" in found.note
    loaded = type("Loaded", (), {"tokenizer": None})()
    for flat in flats:
        contexts, source, note = contexts_of(found, flat, loaded)
        assert contexts == _expected_contexts(other_acts, ts, flat, 5)
        assert source == "topk file" and f"{LABEL}.topk.npz" in note
    # a top-k file of another token set is not used: the store is, and the note says so
    write_topk(run, TopKFile(values, rows, LABEL, "another-hash", N_CORR, "extract"))
    found = top_contexts(run, LABEL, flats, 5)
    assert found.source == "store" and "another token set" in found.note
    assert contexts_of(found, flats[0], loaded)[0] == _expected_contexts(_acts(), ts,
                                                                         flats[0], 5)
    # neither a top-k file nor a store (released): no contexts, one sentence why
    topk_path(run, LABEL).unlink()
    (run / "stores" / f"{LABEL}.h5").unlink()
    found = top_contexts(run, LABEL, flats, 5)
    assert contexts_of(found, flats[0], loaded) == (None, None, found.note)
    assert "released or never extracted" in found.note and "\n" not in found.note


def test_a_damaged_topk_file_is_one_line(carded, tmp_path):
    import shutil
    rd, _, _ = carded
    run = tmp_path / "run"
    shutil.copytree(rd, run)
    values, rows = np.zeros((2, N), np.float32), np.zeros((2, N), np.int64)
    path = write_topk(run, TopKFile(values, rows, LABEL, "h", N_CORR, "reduce"))
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(OocError, match="top-k file") as exc:
        read_topk(run, LABEL)
    assert "\n" not in str(exc.value)
