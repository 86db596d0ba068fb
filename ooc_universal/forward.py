"""Forward passes with capture: the neurons of every layer, as extract stores them.

One hook site for the whole toolkit (models.mlp_out_proj: the INPUT of each layer's MLP
output projection), one rounding (fp32 -> fp16 into one capture buffer), one rule for
which rows count (the token set's valid positions, in order). Extract writes these rows
to a store; the reduce's stream source (sources.py) feeds them straight into its
accumulators. Both go through this module, so a streamed block equals the stored block.

  Capture(loaded, rows, dev)   forward pre-hooks filling an fp16 (rows, n_neurons) buffer;
                               the last layer's hook stops the forward (no LM head)
  forward_to_last_hook(base, ids)
  autocast_context(device, dtype)    torch.autocast for a forward in `dtype` ("": none)
  gather_rows(src, positions, out)   valid rows by runs of consecutive positions
  window_bytes(loaded, window)       memory one window adds to a forward with capture
"""
from __future__ import annotations

import math

import numpy as np

from ooc_universal import models
from ooc_universal.errors import OocError

# Tokens per forward beyond which throughput stops rising: on a CPU, bigger batches fall
# out of cache (measured: 1-4k tokens best, 8k tokens 30% slower); a GPU wants many.
MAX_BATCH_TOKENS = {"cpu": 4096, "cuda": 65536}
FP16_MAX = 65504.0


class StopForward(Exception):
    """Raised by the last layer's hook: everything after it (LM head included) is skipped."""


class Capture:
    """Forward pre-hooks on every layer's MLP output projection: each copies its whole
    (B*T, d_mlp) input into its columns of one fp16 capture buffer (a strided
    fp32->fp16 copy, the cheapest pass) and records its range (overflow, NaN); the last
    layer's hook stops the forward."""

    def __init__(self, loaded, rows: int, dev, host_copy: bool = True):
        import torch
        self.d, self.n_layers = loaded.d_mlp, loaded.n_layers
        self.cap = torch.empty((rows, loaded.n_layers * loaded.d_mlp), dtype=torch.float16,
                               device=dev)
        self.host = (torch.empty_like(self.cap, device="cpu").pin_memory()
                     if dev.type == "cuda" and host_copy else None)
        self.n, self.ranges = 0, []
        self.handles = [models.mlp_out_proj(loaded.model, layer).register_forward_pre_hook(
            self._hook(layer)) for layer in range(loaded.n_layers)]

    def _hook(self, layer: int):
        import torch
        cols = slice(layer * self.d, (layer + 1) * self.d)
        last = layer == self.n_layers - 1

        def hook(module, args):
            x = args[0].reshape(-1, self.d)                          # (B*T, d_mlp)
            self.cap[: self.n, cols].copy_(x)
            # both ends: act(gate) * up (OLMo, Llama) overflows either way; NaN propagates
            self.ranges.append(torch.stack(torch.aminmax(x)))
            if last:
                raise StopForward
        return hook

    def forward(self, base, ids) -> float:
        """Run a batch; the largest |activation| (NaN when any is NaN)."""
        import torch
        self.n, self.ranges = ids.numel(), []
        forward_to_last_hook(base, ids)
        return float(torch.stack(self.ranges).abs().max())  # (waits for a GPU)

    def valid_rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(src, sel): the batch's valid row k is src[sel[k]], on the host. On a GPU the
        rows are gathered there first, so only valid rows cross to the host."""
        import torch
        if self.host is None:
            return self.cap.numpy(), idx
        nv = len(idx)
        self.host[:nv].copy_(self.cap.index_select(0, torch.from_numpy(idx).to(self.cap.device)))
        return self.host[:nv].numpy(), np.arange(nv)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def forward_to_last_hook(base, ids) -> None:
    """base(ids), stopped by the last layer's hook (nothing after it is computed)."""
    try:
        base(input_ids=ids, use_cache=False)
    except StopForward:
        return
    raise RuntimeError("the last layer's hook did not run")


def autocast_context(device, dtype: str = ""):
    """torch.autocast(device type, dtype) around a forward pass (weights stay as they
    are; matmuls run in `dtype`), or a no-op context for dtype "" (or "float32")."""
    import contextlib

    import torch
    if not dtype or dtype == "float32":
        return contextlib.nullcontext()
    kind = device.type if hasattr(device, "type") else str(device).split(":")[0]
    return torch.autocast(kind, dtype=getattr(torch, dtype))


def check_not_nan(top: float, loaded, w0: int, w1: int) -> None:
    if math.isnan(top):
        raise OocError(
            f"model {loaded.spec.label} produced NaN activations (windows {w0}..{w1 - 1}); "
            "its weights are broken (NaN or overflowing): check the checkpoint, then run "
            "the same command again")


def row_starts(valid: np.ndarray) -> np.ndarray:
    """(n_windows + 1,) int64: the first valid row of each window in token-set order."""
    return np.concatenate([[0], np.cumsum(valid.sum(axis=1, dtype=np.int64))])


def gather_rows(src: np.ndarray, positions: np.ndarray, out: np.ndarray) -> None:
    """out[k] = src[positions[k]] for increasing positions, one memcpy per run of
    consecutive positions.

    Why not torch.index_select: on a CPU its float16 kernel copies element by element
    (0.4 GB/s measured, about a fifth of extract's time at GPT-2-small shape); valid
    positions come in long runs (only BOS, newlines and the cut are left out), so a
    slice copy per run is a handful of memcpys per window (10+ GB/s)."""
    if not len(positions):
        return
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(positions)]])
    for a, b in zip(starts.tolist(), ends.tolist()):
        p = int(positions[a])
        out[a:b] = src[p: p + b - a]


def window_bytes(loaded, window: int) -> int:
    """Peak bytes one window adds to a forward pass with capture (no grad: one layer live).

    Capture buffer (fp16, all neurons) + the MLP's fc output, GELU output and gathered
    copy (fp32) + residual-stream temporaries + attention scores and probabilities
    (fp32: reorder_and_upcast_attn).
    """
    cfg = loaded.model.config
    d_model = int(getattr(cfg, "n_embd", 0) or cfg.hidden_size)
    n_head = int(getattr(cfg, "n_head", 0) or cfg.num_attention_heads)
    return window_bytes_of(loaded.n_layers, loaded.d_mlp, d_model, n_head, window)


def window_bytes_of(n_layers: int, d_mlp: int, d_model: int, n_head: int, window: int) -> int:
    """window_bytes from the shapes alone (the planner's, before any model is loaded)."""
    n_neurons = n_layers * d_mlp
    # gelu_new in eager torch makes ~6 fp32 temporaries of the fc output (x^3, scaled,
    # tanh, ...), on top of the fc output, the GELU output and the gathered copy
    per_pos = n_neurons * 2 + d_mlp * 4 * 9 + d_model * 4 * 10
    return window * per_pos + n_head * window * window * 4 * 3
