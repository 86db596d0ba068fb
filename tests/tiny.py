"""Tiny GPT-2 models for the tests: the flags the stanford-crfm configs carry, no network."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

BYTE_VOCAB = 257  # 256 bytes + BOS/EOS id 256 (the toolkit's byte tokenizer)


def tiny_config(n_layer=2, n_embd=32, n_head=2, d_mlp=None, vocab_size=BYTE_VOCAB,
                n_positions=64, bos_token_id=256) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, n_inner=d_mlp or 4 * n_embd, activation_function="gelu_new",
        scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True,
        bos_token_id=bos_token_id, eos_token_id=bos_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def tiny_model(seed=0, **kw) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(tiny_config(**kw)).eval()
    # Random init has tiny MLP weights; scale them so activations vary and correlate.
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.weight.mul_(5.0)
            block.mlp.c_fc.bias.normal_(0.0, 0.5)
    return model


def save_tiny(path, seed=0, **kw) -> Path:
    path = Path(path)
    tiny_model(seed=seed, **kw).save_pretrained(path)
    return path


# --------------------------------------------------------------- the other families

def _family_config(family: str, n_layer: int, d_model: int, d_mlp: int, n_positions: int,
                   vocab_size: int, bos_token_id: int):
    import transformers
    common = dict(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp,
                  num_hidden_layers=n_layer, num_attention_heads=2,
                  max_position_embeddings=n_positions, bos_token_id=bos_token_id,
                  eos_token_id=bos_token_id, pad_token_id=None)
    if family == "gpt-neox":  # Pythia's flags: gelu, parallel residual, partial rotary
        return transformers.GPTNeoXConfig(**common, hidden_act="gelu", rotary_pct=0.25,
                                          use_parallel_residual=True,
                                          tie_word_embeddings=False)
    cls = {"olmo": transformers.OlmoConfig, "olmo2": transformers.Olmo2Config,
           "llama": transformers.LlamaConfig}[family]
    return cls(**common, num_key_value_heads=2, hidden_act="silu")


def tiny_family_model(family: str, seed=0, n_layer=2, d_model=32, d_mlp=64, n_positions=64,
                      vocab_size=BYTE_VOCAB, bos_token_id=256):
    """A tiny causal LM of `family` (gpt-neox, olmo, olmo2, llama), byte vocabulary,
    MLP input weights and embeddings scaled up so that the neurons vary (OLMo 2 norms
    after the MLP, not before: its MLP sees the residual stream as it is)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = _family_config(family, n_layer, d_model, d_mlp, n_positions, vocab_size,
                         bos_token_id)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("dense_h_to_4h.weight", "gate_proj", "up_proj")):
                p.mul_(5.0)
            if any(k in name for k in ("embed_in", "embed_tokens")):
                p.mul_(50.0)
    return model


def save_tiny_family(path, family: str, seed=0, **kw) -> Path:
    path = Path(path)
    tiny_family_model(family, seed=seed, **kw).save_pretrained(path)
    return path


def make_hub_cache(hf_home: Path, src: Path, repo_id: str, revision: str) -> str:
    """A huggingface_hub cache holding the files of `src` as repo_id@revision:
    hub/models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>,
    refs/<revision> = <commit>}. Returns the commit hash."""
    import hashlib
    repo = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snap = repo / "snapshots" / commit
    for d in (repo / "blobs", snap, repo / "refs"):
        d.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(src).iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snap / f.name).symlink_to(Path("../../blobs") / blob)
    (repo / "refs" / revision).write_text(commit)
    return commit
