"""Inputs the benches build for themselves: randomly initialised GPT-2-shaped models saved
with save_pretrained, and a token set of random bytes (no newlines, so every position is a
valid one). Nothing is downloaded; the same seeds give the same models and tokens."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def random_gpt2_models(root: Path, labels, *, layers: int, d_model: int, heads: int,
                       d_mlp: int, window: int, seed: int = 0) -> list[Path]:
    """One model per label under root/<label>, seeded seed, seed + 1, ..."""
    import torch
    from transformers import GPT2LMHeadModel

    from ooc_universal.zoo import ZooRecipe, gpt2_config, quiet_transformers
    recipe = ZooRecipe(n_layer=layers, n_embd=d_model, n_head=heads, d_mlp=d_mlp,
                       context=window)
    paths = []
    for i, label in enumerate(labels):
        torch.manual_seed(seed + i)
        path = Path(root) / label
        with quiet_transformers():  # its "Writing model shards" bar ignores --no-progress
            GPT2LMHeadModel(gpt2_config(recipe)).eval().save_pretrained(path)
        paths.append(path)
    return paths


def random_byte_tokens(run_dir: Path, n_tokens: int, window: int, seed: int = 0) -> None:
    """A token set of n_tokens valid positions of random bytes 11..255 in run_dir."""
    from ooc_universal.formats.tokens import save_token_set
    from ooc_universal.steps.tokens import build_token_set
    ids = np.random.default_rng(seed).integers(11, 256, size=n_tokens * 2, dtype=np.int32)
    save_token_set(build_token_set(ids, n_tokens, tokenizer="bytes", window=window), run_dir)
