"""Model families (issue 17): the table, the hook site of each family checked against an
independent recomputation from the layer's weights, zero-ablation at that site, step ->
revision naming, local checkpoint folders, and an offline Pythia cache."""
from __future__ import annotations

import json
import math
import os
import shutil
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


def test_user_checkpoint_pattern_as_argument_and_in_the_spec(tmp_path):
    for step in (10, 20):
        (tmp_path / "m1" / f"ckpt_{step}").mkdir(parents=True)
        (tmp_path / "m1" / "run" / f"it{step}" / "hf").mkdir(parents=True)
    by_arg = parse_model_spec(f"{tmp_path / 'm1'}@20", checkpoint_pattern="ckpt_{step}")
    by_spec = parse_model_spec(f"{tmp_path / 'm1'}/ckpt_{{step}}@20")
    assert by_arg == by_spec
    assert (by_spec.step, by_spec.revision, by_spec.label, by_spec.local_dir) == (
        20, "ckpt_20", "m1@20", str(tmp_path / "m1" / "ckpt_20"))
    assert parse_model_spec(by_spec.text) == by_spec and by_spec.root == str(tmp_path / "m1")
    # the folder itself, with the pattern, is the same model and step
    assert parse_model_spec(str(tmp_path / "m1" / "ckpt_20"), "ckpt_{step}") == by_spec
    # the pattern starts at the folder holding {step}: what is above it names the model
    deep = parse_model_spec(f"{tmp_path / 'm1'}/run/it{{step}}/hf@10")
    assert (deep.step, deep.revision, deep.label) == (10, "it10/hf", "run@10")
    assert parse_model_spec(f"{tmp_path / 'm1' / 'run'}@10", "it{step}/hf") == deep
    assert parse_model_spec(deep.text) == deep
    with pytest.raises(OocError, match="its first folder has no {step}; put 'run' into"):
        parse_model_spec(f"{tmp_path / 'm1'}@10", checkpoint_pattern="run/it{step}/hf")
    with pytest.raises(OocError, match=r"revision '30' not found \(no ckpt_30 folder.*"
                                       r"available: ckpt_10, ckpt_20$"):
        parse_model_spec(f"{tmp_path / 'm1'}/ckpt_{{step}}@30")
    with pytest.raises(OocError, match="a checkpoint pattern needs the step"):
        parse_model_spec(f"{tmp_path / 'm1'}/ckpt_{{step}}")
    for bad in ("ckpt", "{step}_{step}", "/abs/{step}", "../{step}", "ck{pt}_{step}"):
        with pytest.raises(OocError, match="checkpoint pattern .* is invalid"):
            parse_model_spec(f"{tmp_path / 'm1'}@20", checkpoint_pattern=bad)
    with pytest.raises(OocError, match=r"folders named otherwise need a pattern, e\.g\. "
                                       r"DIR/ckpt_\{step\}@N"):
        parse_model_spec(f"{tmp_path / 'm1'}@20")  # the usual names find nothing here


def test_labels_from_the_path_when_names_collide(tmp_path):
    for run in ("s1", "s2"):
        for step in (100, 200):
            (tmp_path / "runs" / run / "model" / f"checkpoint-{step}").mkdir(parents=True)
    (tmp_path / "other" / "solo").mkdir(parents=True)
    specs = [f"{tmp_path / 'runs' / r / 'model'}@{s}" for s in (100, 200) for r in ("s1", "s2")]
    labels = [s.label for s in models.unique_labels(specs + [str(tmp_path / "other" / "solo"),
                                                             "a@100000"])]
    assert labels == ["s1--model@100", "s2--model@100", "s1--model@200", "s2--model@200",
                      "solo", "alias-gpt2-small-x21@100000"]
    # a local folder named like a hub run is told apart by its parent and the org
    (tmp_path / "mine" / "alias-gpt2-small-x21").mkdir(parents=True)
    both = models.unique_labels(["a", str(tmp_path / "mine" / "alias-gpt2-small-x21")])
    assert [s.label for s in both] == ["stanford-crfm--alias-gpt2-small-x21",
                                       "mine--alias-gpt2-small-x21"]
    assert models.unique_labels(["a", "b"]) == [parse_model_spec("a"), parse_model_spec("b")]


def test_mixed_families_are_refused_unless_allowed(tmp_path):
    save_tiny_family(tmp_path / "neox", "gpt-neox")
    tiny_model().save_pretrained(tmp_path / "g")
    assert models.check_same_family(["a@100000", str(tmp_path / "g")]) == "gpt2"
    assert models.check_same_family(["EleutherAI/pythia-70m@1000", str(tmp_path / "neox"),
                                     "EleutherAI/pythia-70m-seed2"]) == "gpt-neox"
    assert models.check_same_family(["org/unknown"]) is None
    with pytest.raises(OocError, match=r"the run mixes model families \(gpt2: "
                                       r"alias-gpt2-small-x21@100000; gpt-neox: neox\).*"
                                       r"--allow-mixed-families"):
        models.check_same_family(["a@100000", str(tmp_path / "neox")])
    assert models.check_same_family(["a", str(tmp_path / "neox")], allow_mixed=True) is None


def test_shapes_and_context_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert models.model_shape("a@100000") == (12, 3072, 124_439_808)
    assert models.model_shape("EleutherAI/pythia-160m-seed3@36000") == (12, 3072, 162_322_944)
    assert models.model_shape("EleutherAI/pythia-1.4b-deduped") == (24, 8192, 1_414_647_808)
    assert models.context_of("EleutherAI/pythia-410m") == 2048
    assert models.context_of("a") == 1024 and models.context_of("org/unknown") is None
    path = save_tiny_family(tmp_path / "llama", "llama")
    n_params = sum(p.numel() for p in tiny_family_model("llama").parameters())
    assert models.model_shape(str(path)) == (2, 64, n_params)
    assert models.family_of_spec(str(path)).name == "llama"
    with pytest.raises(OocError, match=r"org/unknown.*not known offline.*hf download "
                                       r"org/unknown config.json --revision main"):
        models.model_shape("org/unknown")


def test_pythia_preset():
    from ooc_universal.config import load_config
    cfg = load_config(preset="pythia")
    specs = [parse_model_spec(cfg.spec(m, c)) for m in cfg.models for c in cfg.checkpoints]
    assert cfg.models == polypythia_runs("160m")[:5] and cfg.reference == cfg.models[0]
    assert {s.revision for s in specs} == {"step1000", "step36000", "step143000"}
    assert models.check_same_family(specs) == "gpt-neox"
    assert models.model_shape(specs[0]) == (12, 3072, 162_322_944)
    assert cfg.tokens.window <= models.context_of(specs[0])


def test_pythia_preset_dry_run_offline(tmp_path):
    """`run --preset pythia --dry-run` in a fresh process with an empty HF cache and
    HF_HUB_OFFLINE=1: the plan of downloads, disk, memory and time, no download, no run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "ooc_universal", "run", "--preset", "pythia",
                           "--dry-run", "--run-dir", str(tmp_path / "run")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for part in ("5 models x 3 checkpoint(s) x 5,000,000 tokens x 36,864 neurons",
                 "downloads: 15 hub checkpoints", "[extract] 15 stores", "peak memory",
                 "expected time", "[ablate]", "[disk]", "peak RAM per process"):
        assert part in out, (part, out)
    assert not (tmp_path / "run").exists() and not (tmp_path / "hf" / "hub").exists()


def test_walking_helpers_of_each_family():
    for family in ("gpt2",) + OTHER_FAMILIES:
        model = tiny_model() if family == "gpt2" else tiny_family_model(family)
        norm, axis = models.final_norm(model), models.out_proj_neuron_axis(model)
        assert mlp_out_proj(model, 0).weight.shape[axis] == models.mlp_shape(model.config)[1]
        h = torch.zeros(1, 3, model.config.hidden_size)
        assert norm(h).shape == h.shape
        assert norm is getattr(models.base_model(model), models.FAMILIES[
            "gpt2" if family == "gpt2" else family_of_config(model.config).name].final_norm)


# ------------------------------------------------------------------------------ loading

@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_load_local_model_of_each_family(tmp_path, family):
    path = save_tiny_family(tmp_path / family / "ckpt-7", family, seed=2)
    with pytest.raises(OocError, match="not of a supported family: gpt2 "):
        load_model(str(path), families=frozenset({"gpt2"}))  # a caller's narrower set
    lm = load_model(f"{tmp_path / family}@7")
    assert (lm.n_layers, lm.d_mlp, lm.vocab_size, lm.bos_token_id) == (2, 64, 257, 256)
    assert lm.tokenizer_name == "bytes" and lm.spec.label == f"{family}@7"
    assert lm.family is family_of_config(lm.model.config)
    ref = tiny_family_model(family, seed=2)
    torch.testing.assert_close(mlp_out_proj(lm.model, 1).weight, mlp_out_proj(ref, 1).weight)


OFFLINE_SCRIPT = textwrap.dedent("""
    import json, sys
    from ooc_universal.errors import OocError
    from ooc_universal.models import load_model
    for present, missing in json.loads(sys.argv[1]):
        out = {}
        lm = load_model(present)
        out["label"], out["revision"], out["commit"] = lm.spec.label, lm.revision, lm.commit
        out["d_mlp"], out["family"] = lm.d_mlp, type(lm.model).__name__
        try:
            load_model(missing)
        except OocError as exc:
            out["missing"] = str(exc)
        print("RESULT " + json.dumps(out))
""")

# family, its real repo, the revision cached, the spec naming it, a spec not cached, the
# model class, and what the refusal of the missing one must say
OFFLINE_CASES = [
    ("gpt2", "stanford-crfm/alias-gpt2-small-x21", "checkpoint-400000", "@400000", "@300000",
     "GPT2LMHeadModel", ["not in the local HF cache",
                         "hf download stanford-crfm/alias-gpt2-small-x21 --revision "
                         "checkpoint-300000"]),
    ("gpt-neox", "EleutherAI/pythia-160m", "step143000", "@143000", "@142000",
     "GPTNeoXForCausalLM", ["step142000", "not in the local HF cache",
                            "hf download EleutherAI/pythia-160m --revision step142000",
                            "cached revisions: step143000"]),
    ("olmo", "allenai/OLMo-1B-hf", "step20000-tokens84B", "@20000", "@21000",
     "OlmoForCausalLM", ["none is in the local HF cache; give the full revision name"]),
    ("olmo2", "allenai/OLMo-2-0425-1B", "stage1-step10000-tokens21B", "@10000", "@11000",
     "Olmo2ForCausalLM", ["none is in the local HF cache; give the full revision name"]),
    ("llama", "meta-llama/Llama-3.2-1B", "main", "@main", "@other",
     "LlamaForCausalLM", ["not in the local HF cache"]),
]


@pytest.fixture(scope="module")
def offline_loads(tmp_path_factory):
    """One HF cache holding a tiny model of each family under its real repo name and
    revision; every case loaded in one fresh process with HF_HUB_OFFLINE=1."""
    root = tmp_path_factory.mktemp("hub")
    commits = []
    for family, repo, revision, *_ in OFFLINE_CASES:
        src = root / "src" / family
        if family == "gpt2":
            tiny_model(seed=5).save_pretrained(src)
        else:
            save_tiny_family(src, family, seed=5)
        commits.append(make_hub_cache(root / "hf", src, repo, revision))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    pairs = [[repo + present, repo + missing]
             for _, repo, _, present, missing, *_ in OFFLINE_CASES]
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, json.dumps(pairs)], env=env,
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = [json.loads(ln[len("RESULT "):]) for ln in proc.stdout.splitlines()
            if ln.startswith("RESULT ")]
    assert len(outs) == len(OFFLINE_CASES)
    return {case[0]: (out, commit) for case, out, commit in zip(OFFLINE_CASES, outs, commits)}


@pytest.mark.parametrize("family, repo, revision, present, missing, cls, refusal",
                         OFFLINE_CASES, ids=[c[0] for c in OFFLINE_CASES])
def test_offline_hub_cache_of_each_family(offline_loads, family, repo, revision, present,
                                          missing, cls, refusal):
    """A spec of each family resolves to its revision in an HF cache under the real repo
    name, offline; an uncached one is refused with the family's hint."""
    out, commit = offline_loads[family]
    label = repo.split("/")[1] if family == "gpt2" else repo.replace("/", "--")
    assert (out["label"], out["revision"], out["commit"]) == (
        f"{label}@{present[1:]}", revision, commit)
    assert out["family"] == cls and out["d_mlp"] > 0
    for part in refusal:
        assert part in out["missing"], out["missing"]


# ------------------------------------------- one whole pipeline on a GPT-NeoX zoo

ZOO_STEP, ZOO_WINDOW, ZOO_TOKENS = 40, 32, 1200


def _permuted(model, seed: int):
    """The same function with each layer's neurons permuted (rows of dense_h_to_4h, columns
    of dense_4h_to_h): every neuron has an exact partner in the original."""
    g = torch.Generator().manual_seed(seed)
    perms = []
    with torch.no_grad():
        for block in decoder_layers(model):
            perm = torch.randperm(block.mlp.dense_h_to_4h.out_features, generator=g)
            block.mlp.dense_h_to_4h.weight.copy_(block.mlp.dense_h_to_4h.weight[perm])
            block.mlp.dense_h_to_4h.bias.copy_(block.mlp.dense_h_to_4h.bias[perm])
            block.mlp.dense_4h_to_h.weight.copy_(block.mlp.dense_4h_to_h.weight[:, perm])
            perms.append(perm.numpy())
    return perms


@pytest.fixture(scope="module")
def neox_zoo(tmp_path_factory):
    """Three Pythia-style byte models of 256 ids and no BOS, saved as mK/ckpt-N (how a new
    user saves them): m2 is m1 with its neurons permuted, m3 an independent seed. The
    pipeline runs from the CLI: tokens (the model as --tokenizer), extract, reduce,
    universal, ablate."""
    from click.testing import CliRunner
    from ooc_universal.cli.main import cli
    root = tmp_path_factory.mktemp("neox")
    kw = dict(vocab_size=256, bos_token_id=None, n_layer=2, d_model=32, d_mlp=64)
    m1 = tiny_family_model("gpt-neox", seed=1, **kw)
    m1.save_pretrained(root / "m1" / f"ckpt-{ZOO_STEP}")
    m2 = tiny_family_model("gpt-neox", seed=1, **kw)
    perms = _permuted(m2, seed=7)
    m2.save_pretrained(root / "m2" / f"ckpt-{ZOO_STEP}")
    tiny_family_model("gpt-neox", seed=2, **kw).save_pretrained(root / "m3" / f"ckpt-{ZOO_STEP}")
    text = root / "text.txt"
    text.write_bytes(Path(json.__file__).read_bytes() * 2)
    run = root / "run"
    runner = CliRunner()

    def cli_run(*args, ok=True):
        res = runner.invoke(cli, [str(a) for a in args])
        assert (res.exit_code == 0) == ok, res.output + repr(res.exception)
        return res.output + ("" if ok else str(res.exception))

    specs = [f"{root / m}@{ZOO_STEP}" for m in ("m1", "m2", "m3")]
    tokens = ["tokens", "--run-dir", run, "--source", text, "--n-tokens", ZOO_TOKENS,
              "--n-eval-tokens", 300, "--tokenizer", specs[0], "--no-progress"]
    too_long = cli_run(*tokens, "--window", 128, ok=False)
    cli_run(*tokens, "--window", ZOO_WINDOW)
    cli_run("extract", "--run-dir", run, *specs, "--device", "cpu", "--no-progress")
    cli_run("reduce", "--run-dir", run, "-r", specs[0], *specs[1:], "--baseline-draws", 1,
            "--device", "cpu", "--memory", "1GB", "--no-progress")
    cli_run("universal", "--run-dir", run, "--thresholds", "0.2,0.5", "--no-progress")
    cli_run("cards", "--run-dir", run, "--top-n", 3, "--n-tokens", 5, "--no-progress")
    mean_run = root / "run-mean"   # mean-ablation on a copy: both modes of the same sets
    shutil.copytree(run, mean_run)
    ablate = runner.invoke(cli, ["ablate", "--run-dir", str(run), "--control-draws", "0",
                                 "--device", "cpu", "--no-progress"])
    ablate_mean = runner.invoke(cli, ["ablate", "--run-dir", str(mean_run), "--mode", "mean",
                                      "--control-draws", "0", "--device", "cpu",
                                      "--no-progress"])
    report = runner.invoke(cli, ["report", "--run-dir", str(run), "--no-progress"])
    return dict(root=root, run=run, mean_run=mean_run, specs=specs, perms=perms,
                too_long=too_long, ablate=ablate, ablate_mean=ablate_mean, report=report)


def test_pipeline_tokens_have_no_bos_and_fit_the_context(neox_zoo):
    from ooc_universal.formats.tokens import load_token_set
    ts = load_token_set(neox_zoo["run"])
    assert (ts.tokenizer, ts.has_bos, ts.bos_token_id, ts.meta["vocab_size"]) == (
        "bytes256", False, None, 256)
    assert int(ts.input_ids.max()) < 256 and ts.n_tokens == ZOO_TOKENS
    assert "--window 128 is longer than the 64 positions" in neox_zoo["too_long"]


def test_pipeline_stores_hold_the_hooked_neurons(neox_zoo):
    """Each store's rows are the input of dense_4h_to_h at the valid positions, from a
    forward pass of our own (fp16 as stored)."""
    from ooc_universal.formats.store import open_store
    from ooc_universal.formats.tokens import load_token_set
    from transformers import GPTNeoXForCausalLM
    ts = load_token_set(neox_zoo["run"])
    ids = torch.from_numpy(ts.input_ids.astype(np.int64))
    for name in ("m1", "m3"):
        model = GPTNeoXForCausalLM.from_pretrained(
            neox_zoo["root"] / name / f"ckpt-{ZOO_STEP}", dtype=torch.float32).eval()
        got = []
        hooks = [blk.mlp.dense_4h_to_h.register_forward_pre_hook(
            lambda m, a: got.append(a[0].reshape(-1, 64).numpy().copy()))
            for blk in model.gpt_neox.layers]
        with torch.no_grad():
            model(input_ids=ids)
        for h in hooks:
            h.remove()
        want = np.concatenate(got, axis=1)[ts.valid.reshape(-1)].astype(np.float16)
        with open_store(neox_zoo["run"] / "stores" / f"{name}@{ZOO_STEP}.h5") as s:
            assert s.attrs["family"] == "gpt-neox" and s.shape == (ZOO_TOKENS, 128)
            np.testing.assert_allclose(np.asarray(s[:]), want, rtol=2e-3, atol=2e-3)


def test_pipeline_finds_the_permuted_partners(neox_zoo):
    import pandas as pd
    neurons = pd.read_parquet(neox_zoo["run"] / "universal" / "neurons.parquet")
    assert len(neurons) == 2 * 128
    twin = neurons[neurons.other.astype(str).str.startswith("m2")].sort_values("flat_index")
    alone = neurons[neurons.other.astype(str).str.startswith("m3")]
    assert len(twin) == 128 and twin.max_corr.min() > 0.999
    # neuron k of m1 is neuron inverse-perm(k) of m2, in the same layer
    for layer, perm in enumerate(neox_zoo["perms"]):
        rows = twin[twin.flat_index // 64 == layer]
        want = np.argsort(perm)[rows.flat_index.to_numpy() % 64]
        assert (rows.match_layer == layer).all()
        np.testing.assert_array_equal(rows.match_neuron.to_numpy(), want)
    assert alone.max_corr.median() < twin.max_corr.median() - 0.05


def test_pipeline_ablate(neox_zoo):
    res = neox_zoo["ablate"]
    assert res.exit_code == 0, res.output + repr(res.exception)
    import pandas as pd
    table = pd.read_csv(neox_zoo["run"] / "ablate" / "ablation.csv")
    assert len(table) > 0 and np.isfinite(table.kl).all() and (table.kl >= 0).all()
    assert table[table.other.astype(str).str.startswith("m2")].kl.max() > 1e-6


def test_pipeline_ablate_mean_mode(neox_zoo):
    """Mean-ablation of the same sets: complete, finite, and not the zero-ablation."""
    res = neox_zoo["ablate_mean"]
    assert res.exit_code == 0, res.output + repr(res.exception)
    import pandas as pd
    zero = pd.read_csv(neox_zoo["run"] / "ablate" / "ablation.csv")
    mean = pd.read_csv(neox_zoo["mean_run"] / "ablate" / "ablation.csv")
    assert set(mean.ablation_mode) == {"mean"} and set(zero.ablation_mode) == {"zero"}
    assert len(mean) == len(zero) and np.isfinite(mean.kl).all() and (mean.kl >= 0).all()
    assert not np.allclose(mean.kl.to_numpy(), zero.kl.to_numpy())


def test_pipeline_cards_read_the_neox_weights(neox_zoo):
    """Each card's vocabulary effect is the neuron's dense_4h_to_h column through the
    final LayerNorm (centred, times its gain) onto the unembedding, minus its vocabulary mean,
    recomputed here in float64 from the saved weights; its top context's activation is
    the neuron's largest value in the store."""
    from ooc_universal.formats.cards import read_cards
    from ooc_universal.formats.store import open_store
    from transformers import GPTNeoXForCausalLM
    cards = read_cards(neox_zoo["run"]).cards
    assert cards and {c["reference"] for c in cards} == {"m1"}
    model = GPTNeoXForCausalLM.from_pretrained(
        neox_zoo["root"] / "m1" / f"ckpt-{ZOO_STEP}", dtype=torch.float32)
    gain = model.gpt_neox.final_layer_norm.weight.detach().double().numpy()
    unembed = model.get_output_embeddings().weight.detach().double().numpy()
    with open_store(neox_zoo["run"] / "stores" / f"m1@{ZOO_STEP}.h5") as s:
        acts = np.asarray(s[:], dtype=np.float32)
    for card in cards:
        w = model.gpt_neox.layers[card["layer"]].mlp.dense_4h_to_h.weight.detach()
        col = w[:, card["neuron"]].double().numpy()
        effect = ((col - col.mean()) * gain) @ unembed.T
        effect -= effect.mean()
        top = card["vocab"]["promoted"][0]
        assert top["token_id"] == int(np.argmax(effect))
        np.testing.assert_allclose(top["logit"], effect.max(), rtol=1e-6, atol=1e-9)
        low = card["vocab"]["suppressed"][0]
        assert low["token_id"] == int(np.argmin(effect))
        assert card["contexts"], card.get("contexts_note")
        np.testing.assert_allclose(card["contexts"][0]["activation"],
                                   acts[:, card["flat_index"]].max(), rtol=1e-6)


def test_pipeline_report(neox_zoo):
    """The report of the Pythia-style run: written, naming the zoo's models, with figures."""
    res = neox_zoo["report"]
    assert res.exit_code == 0, res.output + repr(res.exception)
    report_dir = neox_zoo["run"] / "report"
    html = (report_dir / "index.html").read_text()
    md = (report_dir / "index.md").read_text()
    assert "m1" in md and "m2" in md and "m3" in md
    assert list(report_dir.glob("fig_*.png")) and "data:image/png;base64" in html
    data = json.loads((report_dir / "report_data.json").read_text())
    for name in ("table1", "ablation", "cards"):
        assert data["sections"][name]["status"] == "ok", (name, data["sections"][name])
    assert data["tables"]["table1"]["rows"]


# the final norm of each family, by hand: does it centre, and its gain (None: no weights)
FINAL_NORMS = {"gpt-neox": (True, lambda m: m.gpt_neox.final_layer_norm.weight),
               "olmo": (True, lambda m: None),            # OLMo's norm has no parameters
               "olmo2": (False, lambda m: m.model.norm.weight),
               "llama": (False, lambda m: m.model.norm.weight)}


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_card_logit_effects_of_each_family(family):
    """The cards' vocabulary effect, recomputed from the weights in float64: the neuron's
    column of the output projection, centred for a LayerNorm (not for an RMSNorm), times the
    final norm's gain, onto the unembedding, minus its vocabulary mean."""
    from ooc_universal.steps.cards import logit_effects
    model = tiny_family_model(family, seed=6)
    proj = mlp_out_proj(model, 1)
    d_mlp = proj.weight.shape[1]
    centres, gain_of = FINAL_NORMS[family]
    gain = gain_of(model)
    if gain is not None:  # not the ones of a fresh init: the gain must be applied
        with torch.no_grad():
            gain.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
    unembed = model.get_output_embeddings().weight.detach().double().numpy()
    flats = [d_mlp + 3, d_mlp + 11]
    got = logit_effects(model, flats, d_mlp)
    for row, flat in zip(got, flats):
        col = proj.weight[:, flat - d_mlp].detach().double().numpy()
        if centres:
            col = col - col.mean()
        if gain is not None:
            col = col * gain.detach().double().numpy()
        want = unembed @ col
        np.testing.assert_allclose(row, want - want.mean(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", ("gpt2",) + OTHER_FAMILIES)
def test_mean_ablation_hook_equals_shifted_projection(family):
    """The ablate step's mean-mode hooks (neurons set to their means) give the model whose
    output projection has those columns zeroed and W[:, n] * mean_n added to its output,
    built here by hand."""
    from ooc_universal.steps.ablate import ablation_hooks
    build = (lambda: tiny_model(seed=5)) if family == "gpt2" else \
        (lambda: tiny_family_model(family, seed=5))
    hooked, shifted = build(), build()
    d_mlp = mlp_out_proj(hooked, 0).weight.shape[
        0 if FAMILIES["gpt2" if family == "gpt2" else family_of_config(hooked.config).name]
        .transposed else 1]
    n_layers = len(decoder_layers(hooked))
    means = np.random.default_rng(3).normal(size=n_layers * d_mlp)
    layer, neurons = 1, [2, 9]
    flats = [layer * d_mlp + n for n in neurons]
    proj = mlp_out_proj(shifted, layer)
    with torch.no_grad():
        if proj.weight.shape[0] == d_mlp:          # Conv1D: (d_mlp, d_model)
            shift = proj.weight[neurons, :].double().T @ torch.tensor(means[flats])
            proj.weight[neurons, :] = 0
        else:                                      # nn.Linear: (d_model, d_mlp)
            shift = proj.weight[:, neurons].double() @ torch.tensor(means[flats])
            proj.weight[:, neurons] = 0
    handle = proj.register_forward_hook(lambda m, a, out: out + shift.to(out.dtype))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with ablation_hooks(hooked, flats, d_mlp, mode="mean", means=means):
            a = hooked(ids).logits
        b, base = shifted(ids).logits, build()(ids).logits
    handle.remove()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - base).abs().max() > 1e-3


@pytest.mark.parametrize("family", ("llama", "olmo", "olmo2"))
def test_extract_stores_the_gated_neurons(tmp_path, family):
    """extract on a gated-MLP family: the store's rows are the input of down_proj at the
    valid positions (BOS windows of the 257-id bytes), from a forward pass of our own."""
    from ooc_universal.config import ComputeConfig
    from ooc_universal.formats.store import open_store
    from ooc_universal.formats.tokens import load_token_set
    from ooc_universal.steps.extract import extract
    from tests.test_extract import make_tokens
    model_dir = save_tiny_family(tmp_path / family, family, seed=6)
    make_tokens(tmp_path / "run", n_windows=6, n_tokens=200)
    path = extract(tmp_path / "run", str(model_dir), compute=ComputeConfig(device="cpu"),
                   progress=False)
    ts = load_token_set(tmp_path / "run")
    model = tiny_family_model(family, seed=6)
    got = []
    hooks = [mlp_out_proj(model, i).register_forward_pre_hook(
        lambda m, a: got.append(a[0].reshape(-1, 64).numpy().copy())) for i in range(2)]
    with torch.no_grad():
        model(input_ids=torch.from_numpy(ts.input_ids.astype(np.int64)))
    for h in hooks:
        h.remove()
    want = np.concatenate(got, axis=1)[ts.valid.reshape(-1)].astype(np.float16)
    with open_store(path) as s:
        assert s.attrs["family"] == ("olmo" if family.startswith("olmo") else family)
        np.testing.assert_allclose(np.asarray(s[:]), want, rtol=2e-3, atol=2e-3)


def test_extract_cli_labels_from_paths_and_refuses_mixed_families(tmp_path):
    from click.testing import CliRunner
    from ooc_universal.cli.main import cli
    from tests.test_extract import make_tokens
    for run, seed in (("s1", 1), ("s2", 2)):
        tiny_model(seed=seed).save_pretrained(tmp_path / run / "model" / "step-5")
    save_tiny_family(tmp_path / "neox" / "ckpt-5", "gpt-neox")
    make_tokens(tmp_path / "run", n_windows=4, n_tokens=100)
    runner = CliRunner()
    args = ["extract", "--run-dir", str(tmp_path / "run"), "--device", "cpu", "--no-progress"]
    res = runner.invoke(cli, args + [f"{tmp_path / r / 'model'}@5" for r in ("s1", "s2")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    stores = sorted(p.name for p in (tmp_path / "run" / "stores").glob("*.h5"))
    assert stores == ["s1--model@5.h5", "s2--model@5.h5"]
    res = runner.invoke(cli, args + [f"{tmp_path / 's1' / 'model'}@5", f"{tmp_path / 'neox'}@5"])
    assert res.exit_code != 0 and "the run mixes model families" in str(res.exception)
    res = runner.invoke(cli, args + ["--allow-mixed-families", f"{tmp_path / 'neox'}@5"])
    assert res.exit_code == 0, res.output + repr(res.exception)


def test_negative_overflow_of_a_gated_mlp_is_counted(tmp_path):
    """act(gate) * up can overflow float16 downwards (GELU cannot): counted and warned."""
    from ooc_universal.config import ComputeConfig
    from ooc_universal.formats.store import open_store
    from ooc_universal.steps.extract import extract
    from tests.test_extract import make_tokens
    model = tiny_family_model("llama", seed=3)
    with torch.no_grad():
        mlp = decoder_layers(model)[0].mlp
        mlp.gate_proj.weight.mul_(1e3)  # silu(g) * up with up = -g: -g^2 where g > 0,
        mlp.up_proj.weight.copy_(-mlp.gate_proj.weight)  # ~0 where g < 0: only downwards
    model.save_pretrained(tmp_path / "big")
    make_tokens(tmp_path / "run", n_windows=4, n_tokens=100)
    stats = {}
    with pytest.warns(RuntimeWarning, match="exceed the float16 range"):
        path = extract(tmp_path / "run", str(tmp_path / "big"),
                       compute=ComputeConfig(device="cpu"), progress=False, stats=stats)
    with open_store(path) as s:
        rows = np.asarray(s[:])
    assert stats["fp16_overflow"] == int(np.isinf(rows).sum()) > 0
    assert (rows[np.isinf(rows)] < 0).all()
