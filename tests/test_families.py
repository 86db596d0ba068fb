"""Model families (issue 17): the table, the hook site of each family checked against an
independent recomputation from the layer's weights, zero-ablation at that site, step ->
revision naming, local checkpoint folders, and an offline Pythia cache."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ooc_universal import models
from ooc_universal.errors import OocError
from ooc_universal.models import (FAMILIES, decoder_layers, family_of_config, load_model,
                                  mlp_out_proj, parse_model_spec, polypythia_runs)
from tests.tiny import make_hub_cache, save_tiny_family, tiny_family_model, tiny_model

ROOT = Path(__file__).resolve().parents[1]
OTHER_FAMILIES = ("gpt-neox", "olmo", "olmo2", "llama")
ALL = frozenset(FAMILIES)
torch.set_num_threads(1)


# ------------------------------------------------------------------------- the table

@pytest.mark.parametrize("family, name, out_proj", [
    ("gpt-neox", "gpt-neox", "mlp.dense_4h_to_h"), ("olmo", "olmo", "mlp.down_proj"),
    ("olmo2", "olmo", "mlp.down_proj"), ("llama", "llama", "mlp.down_proj")])
def test_family_of_each_tiny_config(family, name, out_proj):
    model = tiny_family_model(family)
    fam = family_of_config(model.config)
    assert fam.name == name and fam.out_proj == out_proj
    assert models.mlp_shape(model.config) == (2, 64)
    assert models.context_length(model.config) == 64
    assert len(decoder_layers(model)) == 2
    assert mlp_out_proj(model, 1).in_features == 64  # a neuron is an input of the projection


def test_gpt2_entry_and_unknown_types():
    gpt2 = tiny_model()
    assert family_of_config(gpt2.config) is FAMILIES["gpt2"]
    assert models.mlp_shape(gpt2.config) == (2, 128)
    assert mlp_out_proj(gpt2, 0) is gpt2.transformer.h[0].mlp.c_proj
    from transformers import BertConfig
    assert family_of_config(BertConfig()) is None
    with pytest.raises(OocError, match="'bert' is not of a known family"):
        models.mlp_shape(BertConfig())


# ------------------------------------------------------ hook site vs the layer's weights

def _gelu_erf(z):
    return 0.5 * z * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


def _silu(z):
    return z / (1.0 + np.exp(-z))


def _expected_neurons(family: str, mlp, x: np.ndarray) -> np.ndarray:
    """The neurons from the MLP's input x, in float64 numpy, from the weights alone."""
    w = {n: p.detach().double().numpy() for n, p in mlp.named_parameters()}
    if family == "gpt-neox":  # gelu(x W_in^T + b_in)
        return _gelu_erf(x @ w["dense_h_to_4h.weight"].T + w["dense_h_to_4h.bias"])
    return _silu(x @ w["gate_proj.weight"].T) * (x @ w["up_proj.weight"].T)  # act(gate) * up


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_hook_site_equals_recomputation_from_weights(family):
    model = tiny_family_model(family, seed=3)
    mlp_in, hooked, handles = {}, {}, []
    for layer, block in enumerate(decoder_layers(model)):
        handles.append(block.mlp.register_forward_pre_hook(
            lambda m, a, layer=layer: mlp_in.__setitem__(layer, a[0].detach().clone())))
        handles.append(mlp_out_proj(model, layer).register_forward_pre_hook(
            lambda m, a, layer=layer: hooked.__setitem__(layer, a[0].detach().clone())))
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 256
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    for layer, block in enumerate(decoder_layers(model)):
        expected = _expected_neurons(family, block.mlp, mlp_in[layer].double().numpy())
        got = hooked[layer].double().numpy()
        assert got.shape == (2, 20, 64)
        assert expected.std() > 0.05  # neurons that vary, not a vacuous match
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ("gpt2",) + OTHER_FAMILIES)
def test_zeroing_at_the_site_equals_zeroed_projection_columns(family):
    """Zero-ablation at the hook (a pre-hook setting some neurons to 0) is the same model
    as one whose output projection has those neurons' weights zeroed."""
    build = (lambda: tiny_model(seed=4)) if family == "gpt2" else \
        (lambda: tiny_family_model(family, seed=4))
    hooked, zeroed = build(), build()
    layer, neurons = 1, [0, 5, 17]

    def zero(module, args):
        x = args[0].clone()
        x[..., neurons] = 0
        return (x,)
    handle = mlp_out_proj(hooked, layer).register_forward_pre_hook(zero)
    proj = mlp_out_proj(zeroed, layer)
    with torch.no_grad():
        if FAMILIES["gpt2" if family == "gpt2" else family_of_config(zeroed.config).name] \
                .transposed:
            proj.weight[neurons, :] = 0   # Conv1D: (d_mlp, d_model)
        else:
            proj.weight[:, neurons] = 0   # nn.Linear: (d_model, d_mlp)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b, base = hooked(ids).logits, zeroed(ids).logits, build()(ids).logits
    handle.remove()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - base).abs().max() > 1e-3  # the ablation changed something


# ------------------------------------------------------------------ specs and revisions

@pytest.mark.parametrize("spec, revision, step, label", [
    ("EleutherAI/pythia-160m@143000", "step143000", 143000, "EleutherAI--pythia-160m@143000"),
    ("EleutherAI/pythia-160m@step143000", "step143000", 143000,
     "EleutherAI--pythia-160m@143000"),
    ("EleutherAI/pythia-160m-seed3@0", "step0", 0, "EleutherAI--pythia-160m-seed3@0"),
    ("EleutherAI/pythia-160m@main", "main", None, "EleutherAI--pythia-160m@main"),
    ("stanford-crfm/alias-gpt2-small-x21@100000", "checkpoint-100000", 100000,
     "alias-gpt2-small-x21@100000"),
    ("meta-llama/Llama-3.2-1B@5", "checkpoint-5", 5, "meta-llama--Llama-3.2-1B@5"),
    ("allenai/OLMo-1B-hf@step20000-tokens84B", "step20000-tokens84B", 20000,
     "allenai--OLMo-1B-hf@20000"),
    ("allenai/OLMo-2-0425-1B@stage1-step1000-tokens3B", "stage1-step1000-tokens3B", 1000,
     "allenai--OLMo-2-0425-1B@1000"),
])
def test_step_maps_to_the_family_revision(spec, revision, step, label):
    s = parse_model_spec(spec)
    assert (s.revision, s.step, s.label) == (revision, step, label)


def test_olmo_step_is_looked_up_in_the_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(OocError, match=r"none is in the local HF cache; give the full "
                                       r"revision name"):
        parse_model_spec("allenai/OLMo-1B-hf@20000")
    refs = tmp_path / "hub" / "models--allenai--OLMo-1B-hf" / "refs"
    refs.mkdir(parents=True)
    for name in ("main", "step20000-tokens84B", "step21000-tokens88B"):
        (refs / name).write_text("0" * 40)
    s = parse_model_spec("allenai/OLMo-1B-hf@20000")
    assert (s.revision, s.step, s.label) == ("step20000-tokens84B", 20000,
                                             "allenai--OLMo-1B-hf@20000")


def test_polypythia_presets():
    assert polypythia_runs("160m") == ["EleutherAI/pythia-160m"] + [
        f"EleutherAI/pythia-160m-seed{i}" for i in range(1, 10)]
    assert polypythia_runs("160m", "data-seed")[1:] == [
        f"EleutherAI/pythia-160m-data-seed{i}" for i in (1, 2, 3)]
    assert len(polypythia_runs("14m")) == 10
    with pytest.raises(OocError, match="no size '1b'"):
        polypythia_runs("1b")
    with pytest.raises(OocError, match="weight-seed"):
        polypythia_runs("70m", "weight-seed")


@pytest.mark.parametrize("folder", ["checkpoint-20", "ckpt-20", "step-20", "step20"])
def test_local_checkpoint_folders_as_people_name_them(tmp_path, folder):
    (tmp_path / "m1" / folder).mkdir(parents=True)
    (tmp_path / "m1" / "ckpt-40").mkdir()
    s = parse_model_spec(f"{tmp_path / 'm1'}@20")
    assert (s.step, s.revision, s.label, s.local_dir) == (
        20, folder, "m1@20", str(tmp_path / "m1" / folder))
    assert parse_model_spec(str(tmp_path / "m1" / folder)) == s
    assert parse_model_spec(f"{tmp_path / 'm1'}@{folder}") == s
    available = ", ".join(sorted([folder, "ckpt-40"]))
    with pytest.raises(OocError, match=rf"revision '30' not found.*available: {available}$"):
        parse_model_spec(f"{tmp_path / 'm1'}@30")


def test_two_folders_of_one_step_are_ambiguous(tmp_path):
    for name in ("ckpt-20", "step20"):
        (tmp_path / "m" / name).mkdir(parents=True)
    with pytest.raises(OocError, match=r"step 20 has 2 folders \(ckpt-20, step20\)"):
        parse_model_spec(f"{tmp_path / 'm'}@20")
    assert parse_model_spec(f"{tmp_path / 'm'}@step20").revision == "step20"


# ------------------------------------------------------------------------------ loading

@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_load_local_model_of_each_family(tmp_path, family):
    path = save_tiny_family(tmp_path / family / "ckpt-7", family, seed=2)
    with pytest.raises(OocError, match="not yet enabled in the steps"):
        load_model(str(path))  # the steps accept GPT-2 only, for now
    lm = load_model(f"{tmp_path / family}@7", families=ALL)
    assert (lm.n_layers, lm.d_mlp, lm.vocab_size, lm.bos_token_id) == (2, 64, 257, 256)
    assert lm.tokenizer_name == "bytes" and lm.spec.label == f"{family}@7"
    ref = tiny_family_model(family, seed=2)
    torch.testing.assert_close(mlp_out_proj(lm.model, 1).weight, mlp_out_proj(ref, 1).weight)


OFFLINE_SCRIPT = textwrap.dedent("""
    import json
    from ooc_universal.errors import OocError
    from ooc_universal.models import FAMILIES, load_model
    out = {}
    lm = load_model("EleutherAI/pythia-160m@143000", families=frozenset(FAMILIES))
    out["label"], out["revision"], out["commit"] = lm.spec.label, lm.revision, lm.commit
    out["d_mlp"], out["family"] = lm.d_mlp, type(lm.model).__name__
    try:
        load_model("EleutherAI/pythia-160m@142000", families=frozenset(FAMILIES))
    except OocError as exc:
        out["missing"] = str(exc)
    print("RESULT " + json.dumps(out))
""")


def test_offline_pythia_cache(tmp_path):
    """EleutherAI/pythia-160m@143000 resolves to revision step143000 in an HF cache under
    the real repo name, with HF_HUB_OFFLINE=1, in a fresh process."""
    src = save_tiny_family(tmp_path / "src", "gpt-neox", seed=5)
    commit = make_hub_cache(tmp_path / "hf", src, "EleutherAI/pythia-160m", "step143000")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    assert (out["label"], out["revision"], out["commit"]) == (
        "EleutherAI--pythia-160m@143000", "step143000", commit)
    assert (out["d_mlp"], out["family"]) == (64, "GPTNeoXForCausalLM")
    for part in ("step142000", "not in the local HF cache",
                 "hf download EleutherAI/pythia-160m --revision step142000",
                 "cached revisions: step143000"):
        assert part in out["missing"], out["missing"]
