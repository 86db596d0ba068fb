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
