"""Model specs, loading (local dirs and an offline HF cache), and the MLP hook point."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ooc_universal.errors import OocError
from ooc_universal.models import load_model, mlp_out_proj, parse_model_spec
from tests.tiny import make_hub_cache, save_tiny, tiny_model

ROOT = Path(__file__).resolve().parents[1]
A = "alias-gpt2-small-x21"


# ------------------------------------------------------------------------ spec parsing

@pytest.mark.parametrize("spec, name, repo_id, revision, step, label", [
    ("a", A, f"stanford-crfm/{A}", None, None, A),
    ("a@100000", A, f"stanford-crfm/{A}", "checkpoint-100000", 100000, f"{A}@100000"),
    ("b@200000", "battlestar-gpt2-small-x49", "stanford-crfm/battlestar-gpt2-small-x49",
     "checkpoint-200000", 200000, "battlestar-gpt2-small-x49@200000"),
    ("c", "caprica-gpt2-small-x81", "stanford-crfm/caprica-gpt2-small-x81", None, None,
     "caprica-gpt2-small-x81"),
    ("d@300000", "darkmatter-gpt2-small-x343", "stanford-crfm/darkmatter-gpt2-small-x343",
     "checkpoint-300000", 300000, "darkmatter-gpt2-small-x343@300000"),
    ("e@checkpoint-5", "expanse-gpt2-small-x777", "stanford-crfm/expanse-gpt2-small-x777",
     "checkpoint-5", 5, "expanse-gpt2-small-x777@5"),
    (f"{A}@100000", A, f"stanford-crfm/{A}", "checkpoint-100000", 100000, f"{A}@100000"),
    (f"stanford-crfm/{A}@100000", A, f"stanford-crfm/{A}", "checkpoint-100000", 100000,
     f"{A}@100000"),
    ("org/x", "org/x", "org/x", None, None, "org--x"),
    ("org/x@main", "org/x", "org/x", "main", None, "org--x@main"),
    ("org/x@7", "org/x", "org/x", "checkpoint-7", 7, "org--x@7"),
    ("org/x@checkpoint-0", "org/x", "org/x", "checkpoint-0", 0, "org--x@0"),
    ("org/x@feature/y", "org/x", "org/x", "feature/y", None, "org--x@feature_y"),
])
def test_parse_hub_specs(spec, name, repo_id, revision, step, label):
    s = parse_model_spec(spec)
    assert (s.name, s.repo_id, s.revision, s.step, s.label, s.local_dir) == (
        name, repo_id, revision, step, label, None)


def test_parse_local_dirs(tmp_path, monkeypatch):
    root = tmp_path / "zoo" / "m1"
    (root / "checkpoint-500").mkdir(parents=True)
    (root / "checkpoint-1000").mkdir()
    s = parse_model_spec(str(root))
    assert (s.name, s.local_dir, s.repo_id, s.step, s.label) == (
        "m1", str(root), None, None, "m1")
    s = parse_model_spec(f"{root}@500")
    assert (s.name, s.local_dir, s.step, s.revision, s.label) == (
        "m1", str(root / "checkpoint-500"), 500, "checkpoint-500", "m1@500")
    # the checkpoint folder itself names the same model and step
    assert parse_model_spec(str(root / "checkpoint-500")) == s
    monkeypatch.chdir(tmp_path)  # relative paths become absolute
    assert parse_model_spec("zoo/m1@500") == s
    with pytest.raises(OocError,
                       match=r"revision '600' not found.*checkpoint-1000, checkpoint-500"):
        parse_model_spec(f"{root}@600")
    weird = tmp_path / "has@at"
    weird.mkdir()
    s = parse_model_spec(str(weird))  # a directory with '@' in its name is a directory
    assert (s.label, s.step, s.local_dir) == ("has_at", None, str(weird))


@pytest.mark.parametrize("spec, match", [
    ("z", "unknown model 'z'"),
    ("f@100000", "unknown model 'f@100000'"),
    ("gpt3", "expected a letter a..e"),
    ("", "empty model spec"),
    ("a@", "bad model spec"),
    ("./no/such/dir", "does not exist"),
])
def test_parse_errors(spec, match):
    with pytest.raises(OocError, match=match):
        parse_model_spec(spec)


# ------------------------------------------------------------------------ local loading

def _np(t):
    return t.detach().double().numpy()


def _gelu_new(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def test_hook_is_post_gelu_activation(tmp_path):
    """The pre-hook input of mlp_out_proj equals gelu_new(LN2(x) W_fc + b_fc), recomputed in
    float64 numpy from the layer's own residual input and the model's weights."""
    torch.set_num_threads(1)
    path = save_tiny(tmp_path / "m", seed=3, n_layer=3, d_mlp=96)
    lm = load_model(str(path))
    assert (lm.n_layers, lm.d_mlp, lm.vocab_size, lm.bos_token_id) == (3, 96, 257, 256)
    assert lm.tokenizer is None and lm.tokenizer_name == "bytes"
    resid, post, handles = {}, {}, []
    for layer, block in enumerate(lm.model.transformer.h):
        handles.append(block.ln_2.register_forward_pre_hook(
            lambda m, a, layer=layer: resid.__setitem__(layer, a[0].detach().clone())))
        handles.append(mlp_out_proj(lm.model, layer).register_forward_pre_hook(
            lambda m, a, layer=layer: post.__setitem__(layer, a[0].detach().clone())))
    ids = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 256
    with torch.no_grad():
        lm.model(ids)
    for h in handles:
        h.remove()
    for layer, block in enumerate(lm.model.transformer.h):
        x = resid[layer].double().numpy()
        ln = block.ln_2
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        h = (x - mu) / np.sqrt(var + ln.eps) * _np(ln.weight) + _np(ln.bias)
        w_fc = _np(block.mlp.c_fc.weight)  # Conv1D: (n_embd, d_mlp)
        expected = _gelu_new(h @ w_fc + _np(block.mlp.c_fc.bias))
        got = post[layer].double().numpy()
        assert got.shape == (2, 20, 96)
        assert expected.std() > 0.1  # activations that vary, not a vacuous match
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_dtype_is_explicit_even_for_fp16_checkpoint(tmp_path):
    tiny_model(seed=1).half().save_pretrained(tmp_path / "half")
    assert next(load_model(str(tmp_path / "half")).model.parameters()).dtype == torch.float32
    lm = load_model(str(tmp_path / "half"), dtype=torch.float64, device="auto")
    assert next(lm.model.parameters()).dtype == torch.float64
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_local_checkpoint_step(tmp_path):
    save_tiny(tmp_path / "m" / "checkpoint-20", seed=2)
    lm = load_model(f"{tmp_path / 'm'}@20")
    assert lm.spec.label == "m@20" and lm.spec.step == 20 and lm.model_id.endswith("checkpoint-20")
    ref = tiny_model(seed=2)
    assert torch.equal(lm.model.transformer.h[1].mlp.c_fc.weight,
                       ref.transformer.h[1].mlp.c_fc.weight)


def test_unsupported_family(tmp_path):
    from transformers import BertConfig
    BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               vocab_size=257).save_pretrained(tmp_path / "bert")
    with pytest.raises(OocError, match="'bert' model, not of a supported family: gpt2 "
                                       r"\(model_type gpt2\); gpt-neox"):
        load_model(str(tmp_path / "bert"))
    with pytest.raises(OocError, match="no transformer.h"):
        mlp_out_proj(torch.nn.Linear(2, 2), 0)
    with pytest.raises(ValueError, match="layer 5 out of range"):
        mlp_out_proj(tiny_model(), 5)


def test_local_dir_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(OocError, match="has no config.json"):
        load_model(str(tmp_path / "empty"))


# ----------------------------------------------------------------- the offline hub cache

OFFLINE_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from ooc_universal.errors import OocError
    from ooc_universal.models import load_model
    from ooc_universal.steps.tokens import resolve_tokenizer
    out = {}
    lm = load_model("a@100000")
    out["label"], out["commit"], out["revision"] = lm.spec.label, lm.commit, lm.revision
    out["model_id"], out["tok"], out["d_mlp"] = lm.model_id, lm.tokenizer_name, lm.d_mlp
    out["w"] = lm.model.transformer.h[0].mlp.c_fc.weight[:2, :3].tolist()
    out["tokenizer_from_spec"] = resolve_tokenizer("a@100000").name
    for spec in ("a@200000", "b@100000"):
        try:
            load_model(spec)
            out[spec] = "loaded"
        except OocError as exc:
            out[spec] = str(exc)
    print("RESULT " + json.dumps(out))
""")


def test_offline_stanford_cache(tmp_path):
    """a@100000 resolves to the real repo name and revision in an HF cache, with
    HF_HUB_OFFLINE=1, in a fresh process (so huggingface_hub reads the env at import)."""
    src = save_tiny(tmp_path / "src", seed=5)
    commit = make_hub_cache(tmp_path / "hf", src, f"stanford-crfm/{A}", "checkpoint-100000")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    assert out["label"] == f"{A}@100000"
    assert (out["commit"], out["revision"]) == (commit, "checkpoint-100000")
    assert (out["model_id"], out["tok"], out["d_mlp"]) == (f"stanford-crfm/{A}", "bytes", 128)
    ref = tiny_model(seed=5).transformer.h[0].mlp.c_fc.weight[:2, :3].detach()
    np.testing.assert_array_equal(np.array(out["w"], dtype=np.float32), ref.numpy())
    assert out["tokenizer_from_spec"] == "bytes"
    missing = out["a@200000"]
    for part in (A, "checkpoint-200000", "HF_HUB_OFFLINE", f"hf download stanford-crfm/{A} "
                 "--revision checkpoint-200000", "local save_pretrained directory",
                 "cached revisions: checkpoint-100000"):
        assert part in missing, missing
    assert "\n" not in missing
    assert "battlestar-gpt2-small-x49" in out["b@100000"] and "checkpoint-100000" in out["b@100000"]
