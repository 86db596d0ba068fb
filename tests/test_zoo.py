"""The tiny zoo: format, determinism, resume, corpus split, learning, CLI."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import GPT2LMHeadModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ooc_universal import zoo  # noqa: E402
from ooc_universal.errors import OocError, StaleInputError  # noqa: E402

TINY = zoo.ZooRecipe(n_models=2, n_layer=1, n_embd=16, n_head=2, d_mlp=32, context=16,
                     batch_size=8, steps=40, warmup_steps=4, lr=3e-3, eval_bytes=2048)
STEPS = (10, 20, 30)                       # 25/50/75% of 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    torch.set_num_threads(1)
    dirs = zoo.train_zoo(TINY, out, device="cpu", progress=False)
    return out, dirs


def _weights(path) -> dict:
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_checkpoints_in_save_pretrained_format(trained):
    out, dirs = trained
    assert [d.name for d in dirs] == ["tiny-a", "tiny-b"]
    for d in dirs:
        assert sorted(p.name for p in d.iterdir() if p.is_dir()) == \
            [f"checkpoint-{s}" for s in STEPS]
        assert not (d / "train_state.pt").exists()        # removed once complete
        for s in STEPS:
            ck = d / f"checkpoint-{s}"
            assert all(w.dtype == torch.float16 for w in _weights(ck).values())
            m = GPT2LMHeadModel.from_pretrained(ck)
            c = m.config
            assert (c.vocab_size, c.bos_token_id, c.eos_token_id) == (257, 256, 256)
            assert (c.n_layer, c.n_embd, c.n_inner, c.n_positions) == (1, 16, 32, 16)
            assert c.activation_function == "gelu_new"
            assert c.scale_attn_by_inverse_layer_idx and c.reorder_and_upcast_attn
    meta = json.loads((out / "zoo.json").read_text())
    assert meta["recipe"] == json.loads(json.dumps(TINY.to_json()))
    assert meta["checkpoint_steps"] == list(STEPS)
    assert [m["name"] for m in meta["models"]] == ["tiny-a", "tiny-b"]
    assert [m["seed"] for m in meta["models"]] == [0, 1]


def test_heldout_and_unigram_losses_match_a_hand_computation(trained):
    out, _ = trained
    meta = json.loads((out / "zoo.json").read_text())
    corpus = zoo.load_corpus("stdlib", TINY.heldout_fraction)
    held = corpus.heldout[: (2048 // 15) * 15]             # windows of BOS + 15 bytes
    # unigram: add-one frequencies of the training bytes, counted here with np.unique
    vals, counts = np.unique(corpus.train, return_counts=True)
    freq = np.ones(256)
    freq[vals] += counts
    p = freq / freq.sum()
    assert meta["unigram_heldout_loss"] == pytest.approx(-np.mean(np.log(p[held])), rel=1e-12)
    # model loss: float64 log-softmax of the fp16 weights' logits on the same windows
    ck = out / "tiny-b" / "checkpoint-30"
    m = GPT2LMHeadModel.from_pretrained(ck, dtype=torch.float32).eval()
    ids = np.concatenate([np.full((len(held) // 15, 1), 256), held.reshape(-1, 15)], axis=1)
    with torch.no_grad():
        logits = m(input_ids=torch.from_numpy(ids)).logits.double().numpy()[:, :-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - np.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0]
    got = meta["models"][1]["checkpoints"]["30"]["heldout_loss"]
    assert got == pytest.approx(nll.mean(), rel=1e-5)


def test_loss_decreases(trained):
    out, _ = trained
    for m in json.loads((out / "zoo.json").read_text())["models"]:
        losses = [m["checkpoints"][str(s)]["heldout_loss"] for s in STEPS]
        assert losses[0] < np.log(257)                       # below a uniform guess
        assert losses[2] < losses[0]


def test_same_seed_identical_other_seed_different_and_resume_exact(trained, tmp_path,
                                                                    monkeypatch):
    out, _ = trained
    real = zoo.batch_windows

    def dies_at_25(data, context, batch, seed, step):
        if step == 25:
            raise KeyboardInterrupt("killed")
        return real(data, context, batch, seed, step)

    monkeypatch.setattr(zoo, "batch_windows", dies_at_25)
    with pytest.raises(KeyboardInterrupt):
        zoo.train_zoo(TINY, tmp_path, device="cpu", progress=False, model_indices=[0])
    a = tmp_path / "tiny-a"
    assert (a / "train_state.pt").exists() and not (a / "checkpoint-30").exists()
    monkeypatch.setattr(zoo, "batch_windows", real)
    zoo.train_zoo(TINY, tmp_path, device="cpu", progress=False, model_indices=[0])
    assert not (tmp_path / "zoo.json").exists()              # tiny-b not trained here
    for s in STEPS:                                          # resumed == uninterrupted, bitwise
        ref, got = _weights(out / "tiny-a" / f"checkpoint-{s}"), _weights(a / f"checkpoint-{s}")
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref)
    other = _weights(out / "tiny-b" / "checkpoint-30")
    mine = _weights(out / "tiny-a" / "checkpoint-30")
    assert not torch.equal(other["transformer.h.0.mlp.c_fc.weight"],
                           mine["transformer.h.0.mlp.c_fc.weight"])


def test_other_recipe_in_same_dir_is_refused(trained):
    out, _ = trained
    with pytest.raises(StaleInputError):
        zoo.train_zoo(dataclasses.replace(TINY, lr=1e-3), out, device="cpu", progress=False)


def test_growing_a_zoo_trains_only_the_new_model(trained, tmp_path):
    """Model i depends on the recipe less n_models: a 3-model zoo reuses a 2-model zoo's
    models untouched and its third model is what a fresh 3-model zoo trains."""
    out, _ = trained
    grown = tmp_path / "grown"
    import shutil
    shutil.copytree(out, grown)
    (grown / "zoo.json").unlink()
    stamp = {p: p.stat().st_mtime_ns for p in grown.rglob("model.safetensors")}
    three = dataclasses.replace(TINY, n_models=3)
    zoo.train_zoo(three, grown, device="cpu", progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    info = json.loads((grown / "zoo.json").read_text())
    assert [m["name"] for m in info["models"]] == ["tiny-a", "tiny-b", "tiny-c"]
    fresh = tmp_path / "fresh"
    zoo.train_zoo(three, fresh, device="cpu", progress=False, model_indices=[2])
    a, b = _weights(grown / "tiny-c" / "checkpoint-30"), _weights(fresh / "tiny-c" / "checkpoint-30")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["transformer.h.0.mlp.c_fc.weight"],
                           _weights(grown / "tiny-b" / "checkpoint-30")["transformer.h.0.mlp.c_fc.weight"])


def test_stdlib_order_and_disjoint_heldout_split():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = zoo.stdlib_files(root)
    assert files == sorted(files) and len(files) > 100
    assert all(f.endswith(".py") for f in files)
    assert not any(set(f.split("/")[:-1]) & {"test", "tests", "site-packages"} for f in files)
    frac = 0.05
    held = [f for f in files
            if int(hashlib.sha256(f.encode()).hexdigest()[:16], 16) < frac * 2 ** 64]
    train = [f for f in files if f not in set(held)]
    assert held and train and not set(held) & set(train)
    corpus = zoo.load_corpus("stdlib", frac)
    assert corpus.info["heldout_files"] == held
    assert corpus.heldout.tobytes() == b"".join((root / f).read_bytes() for f in held)
    assert corpus.train.tobytes() == b"".join((root / f).read_bytes() for f in train)


def test_directory_and_file_corpus(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    for i in range(40):
        (d / f"{i:02d}.txt").write_bytes(bytes([65 + i % 26]) * (10 + i))
    c = zoo.load_corpus(str(d), 0.2)
    held = [f"{i:02d}.txt" for i in range(40) if zoo.is_heldout(f"{i:02d}.txt", 0.2)]
    assert c.info["heldout_files"] == held
    assert len(c.train) + len(c.heldout) == sum(10 + i for i in range(40))
    f = tmp_path / "one.txt"
    f.write_bytes(bytes(range(100)))
    c = zoo.load_corpus(str(f), 0.1)
    assert c.train.tolist() == list(range(90)) and c.heldout.tolist() == list(range(90, 100))
    with pytest.raises(OocError, match="neither"):
        zoo.load_corpus(str(tmp_path / "missing"), 0.1)


def test_training_windows_start_with_bos_and_come_from_the_text():
    data = np.arange(1000, dtype=np.int64) % 251
    w = zoo.batch_windows(data.astype(np.uint8), 9, 5, seed=3, step=7)
    assert w.shape == (5, 9) and (w[:, 0] == 256).all()
    for row in w:                                            # 8 consecutive bytes of data
        start = int(np.flatnonzero(data == row[1])[0])
        assert row[1:].tolist() == data[start:start + 8].tolist()
    assert np.array_equal(w, zoo.batch_windows(data.astype(np.uint8), 9, 5, seed=3, step=7))
    assert not np.array_equal(w, zoo.batch_windows(data.astype(np.uint8), 9, 5, 4, 7))


def test_lr_schedule_and_recipe_checks():
    r = zoo.ZooRecipe(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert r.checkpoints() == (25, 50, 75)
    assert zoo.lr_at(r, 0) == pytest.approx(0.1) and zoo.lr_at(r, 9) == pytest.approx(1.0)
    assert zoo.lr_at(r, 55) == pytest.approx(0.1 + 0.45 * (1 + np.cos(np.pi * 0.5)))
    assert zoo.lr_at(r, 100) == pytest.approx(0.1)
    with pytest.raises(OocError, match="n_head"):
        zoo.ZooRecipe(n_embd=30, n_head=4)
    with pytest.raises(OocError, match="checkpoints"):
        zoo.ZooRecipe(steps=100, checkpoint_steps=(50, 200))
    demo = zoo.PRESETS["demo"]
    assert 15 * 2 * demo.n_params() <= 25e6                 # 5 models x 3 fp16 checkpoints


def test_cli_trains_and_prints_losses(tmp_path):
    from click.testing import CliRunner

    from ooc_universal.cli.main import cli
    res = CliRunner().invoke(cli, [
        "zoo", "train", "--preset", "smoke", "--out", str(tmp_path / "z"), "--steps", "20",
        "--n-models", "1", "--checkpoint-fracs", "0.5,1.0", "--device", "cpu",
        "--threads", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "unigram baseline" in res.output and "tiny-a" in res.output
    assert (tmp_path / "z" / "tiny-a" / "checkpoint-20" / "model.safetensors").exists()
    assert json.loads((tmp_path / "z" / "zoo.json").read_text())["checkpoint_steps"] == [10, 20]


def test_cli_error_is_one_line(tmp_path, capsys):
    from ooc_universal.cli.main import main
    with pytest.raises(SystemExit) as exc:
        main(["zoo", "train", "--preset", "smoke", "--out", str(tmp_path / "z"),
              "--corpus", str(tmp_path / "nope"), "--no-progress"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: corpus")
