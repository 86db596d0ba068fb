"""Where the reduce's token blocks come from: an activation store, or forward passes.

A block source hands the reduce rows [start, stop) of one model's neurons (fp16, rows in
token-set order, valid positions only, columns layer * d_mlp + i). Two kinds:

  store    RUN/stores/<label>.h5 through formats/store.py (an ActivationStore already is
           a block source: read_block zero-copy views, release_rows)
  stream   forward passes of the model over the run's token set (formats/tokens.py), the
           hooks, rounding and row selection of extract (forward.py), so a streamed block
           equals the stored block; nothing is written

A task gets a SourceSpec (paths and numbers: it pickles to a cluster worker) and opens it
with open_source, which keeps one open source, and one loaded model, per process.

Streaming is deterministic: windows are forwarded in fixed batches, batch k = windows
[k B, (k + 1) B) of the token set, whatever block asks for them, so a row's value never
depends on which block, panel, task or resumed run computed it. The batch last computed
stays in the capture buffer: a batch that straddles two blocks is forwarded once.

Forward precision (forward_autocast): the weights stay fp32 (SourceSpec.dtype) and the
forward runs in fp32 by default on every device. bf16 autocast is there to ask for
(`forward_precision="bf16"`), not the default: the issue's rule was bf16 on CUDA only
where the reduce's row max stays within 2e-3 of the fp32 forward's, and at GPT-2 small's
shape (12 x 3072, random init, 8,192 tokens; bench_stream's "bf16_forward" figure,
bench/results/cpu-2c-epyc-stream-width.json) it moved by 3.1e-3 (tiny models of the tests:
within 2e-3, tests/test_stream_forward.py).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from ooc_universal import models
from ooc_universal.devices import synchronize
from ooc_universal.errors import OocError
from ooc_universal.forward import (MAX_BATCH_TOKENS, Capture, autocast_context,
                                   check_not_nan, gather_rows, row_starts)

SOURCES = ("store", "stream", "auto")
FORWARD_PRECISIONS = ("auto", "fp32", "bf16")
STREAM_BLOCK_ROWS = 64  # the planner's row granularity for a stream (a store: its chunk)
# Each streamed model keeps its own capture buffer (the batch straddling two blocks stays
# in it), so a batch is capped to hold about this many bytes of fp16 neurons: GPT-2
# small at a GPU's 65,536 tokens per forward would hold 4.8 GB per model.
CAPTURE_BYTES = 512 * 10**6


@dataclass(frozen=True)
class SourceSpec:
    """One model's block source: kind "store" (path: the .h5 file) or "stream" (path: the
    model spec text; run_dir: where the token set is; batch_windows: windows per forward;
    device and dtype of the forward's weights; autocast: "" (the forward in the weights'
    dtype) or the torch.autocast dtype it runs under, e.g. "bfloat16")."""
    kind: str
    path: str
    label: str = ""
    run_dir: str = ""
    batch_windows: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    autocast: str = ""

    def __str__(self) -> str:
        return self.path


def store_source(path) -> SourceSpec:
    return SourceSpec("store", str(path))


def stream_source(spec_text: str, label: str, run_dir, batch_windows: int, device: str,
                  dtype: str = "float32", autocast: str = "") -> SourceSpec:
    return SourceSpec("stream", spec_text, label, str(run_dir), int(batch_windows),
                      str(device), dtype, autocast)


def forward_autocast(device: str, precision: str = "auto") -> str:
    """The autocast dtype of a stream's forward passes on `device`: "bfloat16" or ""
    (fp32). precision "auto": fp32 on every device (module docstring: bf16 missed the
    2e-3 bound at GPT-2 small's width); "bf16" or "fp32" as asked (bf16 works on a CPU
    too: the tests measure its error there)."""
    precision = str(precision or "auto").lower()
    if precision not in FORWARD_PRECISIONS:
        raise OocError(f"unknown forward precision {precision!r}; expected "
                       f"{', '.join(FORWARD_PRECISIONS)}")
    if precision == "auto":
        precision = "fp32"
    return "bfloat16" if precision == "bf16" else ""


def forward_counts(specs) -> dict:
    """{label: {"batches", "seconds", "passes"}} of the stream sources of `specs` open in
    this process: the batches forwarded since they were opened, their seconds, and the
    passes over the token set that makes (batches / batches per pass)."""
    out = {}
    with _LOCK:
        for spec in specs:
            src = _SOURCES.get(spec) if isinstance(spec, SourceSpec) else None
            if src is None or not getattr(src, "streamed", False):
                continue
            per_pass = max(1, -(-src.n_windows // src.batch))
            out[src.label] = {"batches": src.batches_forwarded,
                              "seconds": src.forward_seconds,
                              "passes": src.batches_forwarded / per_pass}
    return out


def default_batch_windows(window: int, n_windows: int, device: str,
                          n_neurons: int = 0) -> int:
    """Windows per forward: as many as MAX_BATCH_TOKENS allows (throughput stops rising
    beyond it) and, given n_neurons, a capture buffer of at most CAPTURE_BYTES; at least
    1, at most the token set's windows."""
    cap = MAX_BATCH_TOKENS["cuda" if str(device).startswith("cuda") else "cpu"]
    if n_neurons:
        cap = min(cap, CAPTURE_BYTES // (2 * n_neurons))
    return int(max(1, min(n_windows, cap // max(1, window))))


# --------------------------------------------------------------------------- the cache

_LOCK = threading.RLock()
_SOURCES: dict = {}
_MODELS: dict = {}


def open_source(spec: SourceSpec | str):
    """The open source of `spec` in this process (a plain string is a store path)."""
    if isinstance(spec, str):
        spec = store_source(spec)
    with _LOCK:
        src = _SOURCES.get(spec)
        if src is None:
            if spec.kind == "store":
                from ooc_universal.formats.store import open_store
                src = open_store(spec.path)
            elif spec.kind == "stream":
                src = StreamSource(spec)
            else:
                raise OocError(f"unknown block source {spec.kind!r}; expected store or stream")
            _SOURCES[spec] = src
        return src


def release_sources(specs) -> None:
    """Close this process's open sources of `specs` (store maps; a stream's hooks and its
    model): a study reduces one checkpoint after another in one process."""
    with _LOCK:
        for spec in specs:
            spec = store_source(spec) if not isinstance(spec, SourceSpec) else spec
            src = _SOURCES.pop(spec, None)
            if src is not None:
                src.close()
            if spec.kind == "stream":
                _MODELS.pop(_model_key(spec), None)


def _model_key(spec: SourceSpec) -> tuple:
    """One loaded model per stream source: a source's Capture hooks its model (and the
    last hook stops the forward), so two sources must never share one."""
    return (spec.path, spec.label, spec.device, spec.dtype, spec.batch_windows,
            spec.autocast)


def cached_model(spec: SourceSpec):
    """models.load_model of a stream's model, once per process."""
    import torch
    key = _model_key(spec)
    with _LOCK:
        loaded = _MODELS.get(key)
        if loaded is None:
            from dataclasses import replace
            parsed = models.parse_model_spec(spec.path)
            if spec.label and parsed.label != spec.label:  # unique_labels' label
                parsed = replace(parsed, label=spec.label)
            loaded = _MODELS[key] = models.load_model(parsed, spec.device,
                                                      getattr(torch, spec.dtype))
        return loaded


# --------------------------------------------------------------------------- stream

class StreamSource:
    """A model's neurons at the token set's valid positions, computed on request.

    The reduce reads it through fill_rows(start, stop, out); it has the attributes of a
    store the reduce uses (path, label, n_tokens, n_neurons, n_layers, d_mlp)."""

    streamed = True
    memory_mapped = False
    compressed = False

    def __init__(self, spec: SourceSpec):
        import torch

        from ooc_universal.formats.tokens import check_tokenizer_matches, load_token_set
        self.spec = spec
        token_set = load_token_set(spec.run_dir)
        self.loaded = loaded = cached_model(spec)
        check_tokenizer_matches(token_set, loaded)
        check_window(loaded.model.config, token_set.window, loaded.spec.label)
        self.path, self.label = spec.path, spec.label or loaded.spec.label
        self.token_hash = token_set.hash
        self.input_ids, self.valid = token_set.input_ids, token_set.valid
        self.n_windows, self.window = self.input_ids.shape
        self.n_tokens = token_set.n_tokens
        self.n_layers, self.d_mlp = loaded.n_layers, loaded.d_mlp
        self.n_neurons = loaded.n_neurons
        self.block_tokens = self.n_tokens  # one "chunk": rows are computed, not stored
        self.batch = int(spec.batch_windows) or default_batch_windows(
            self.window, self.n_windows, spec.device, self.n_neurons)
        self.row_start = row_starts(self.valid)
        self.device = torch.device(spec.device)
        self.base = models.base_model(loaded.model)
        self.capture = Capture(loaded, self.batch * self.window, self.device,
                               host_copy=False)
        self._in_buffer = None   # batch index whose activations the capture buffer holds
        self._positions = None   # its valid positions (flat indices into the buffer)
        self._positions_dev = None
        self.batches_forwarded = 0
        self.forward_seconds = 0.0

    # -- the reduce's reads
    def fill_rows(self, start: int, stop: int, out) -> None:
        """out[:stop - start] = rows [start, stop) (a torch fp16 tensor on the CPU or the
        forward's device)."""
        if not 0 <= start < stop <= self.n_tokens:
            raise IndexError(f"rows [{start}, {stop}) out of range 0..{self.n_tokens}")
        w = int(np.searchsorted(self.row_start, start, side="right")) - 1
        k = w // self.batch
        while True:
            w0, w1 = k * self.batch, min(self.n_windows, (k + 1) * self.batch)
            if w0 >= self.n_windows:
                break
            r0, r1 = int(self.row_start[w0]), int(self.row_start[w1])
            if r0 >= stop:
                break
            a, b = max(start, r0), min(stop, r1)
            if b > a:
                self._compute(k)
                self._copy(a - r0, b - r0, out[a - start: b - start])
            k += 1

    def release_rows(self, start: int, stop: int) -> None:
        """Nothing is mapped (the interface of a store)."""

    def close(self) -> None:
        self.capture.remove()

    # -- forward passes
    def _compute(self, k: int) -> None:
        """Forward batch k into the capture buffer (unless it is there already)."""
        import torch
        if self._in_buffer == k:
            return
        w0, w1 = k * self.batch, min(self.n_windows, (k + 1) * self.batch)
        ids = torch.from_numpy(np.ascontiguousarray(self.input_ids[w0:w1])).to(
            self.device).long()
        t0 = time.perf_counter()
        self._in_buffer = None
        with torch.inference_mode(), autocast_context(self.device, self.spec.autocast):
            top = self.capture.forward(self.base, ids)
        check_not_nan(top, self.loaded, w0, w1)
        self._positions = np.flatnonzero(self.valid[w0:w1].reshape(-1))
        self._positions_dev = None
        self._in_buffer = k
        self.batches_forwarded += 1
        self.forward_seconds += time.perf_counter() - t0

    def _copy(self, a: int, b: int, out) -> None:
        """The batch's valid rows a..b into `out`: by runs of positions on a CPU (a
        memcpy each), one index_select on a GPU (the rows never leave the device)."""
        import torch
        cap = self.capture.cap
        if out.device.type == "cpu" and cap.device.type == "cpu":
            gather_rows(cap.numpy(), self._positions[a:b], out.numpy())
            return
        if self._positions_dev is None:
            self._positions_dev = torch.from_numpy(self._positions).to(cap.device)
        rows = cap.index_select(0, self._positions_dev[a:b])
        # asynchronous only device to device: a host `out` is read as soon as this returns
        out.copy_(rows, non_blocking=out.device.type != "cpu")

    def __repr__(self):
        return (f"<StreamSource {self.label}: {self.n_tokens} x {self.n_neurons}, batch "
                f"{self.batch} windows of {self.window}, device {self.device}>")


def check_window(config, window: int, label: str) -> None:
    n_pos = models.context_length(config)
    if n_pos is not None and window > n_pos:
        raise OocError(f"token windows are {window} long but model {label} has only {n_pos} "
                       f"positions; make a token set with --window {n_pos} or less")


# --------------------------------------------------------------------------- shapes, rates

def stream_meta(spec, token_meta: dict, device: str, batch_windows: int = 0) -> dict:
    """What the reduce knows of a streamed model before loading it (offline: its config
    on this disk or a known shape): the keys of a store's metadata, and the shapes the
    planner needs (d_model, n_head, n_params, gated, window, n_windows)."""
    spec = models.parse_model_spec(spec)
    n_layers, d_mlp, n_params = models.model_shape(spec)
    config = models.read_config(spec)
    window, n_windows = int(token_meta["window"]), int(token_meta.get("n_windows") or 0)
    d_model = _config_int(config, ("n_embd", "hidden_size")) or d_mlp // 4
    n_head = _config_int(config, ("n_head", "num_attention_heads")) or max(1, d_model // 64)
    if config is not None:
        check_window(config, window, spec.label)
    family = models.family_of_config(config) if config is not None \
        else models.family_of_spec(spec)
    batch = int(batch_windows) or default_batch_windows(window, n_windows or 1, device,
                                                        n_layers * d_mlp)
    return {"path": spec.text, "label": spec.label, "name": spec.name,
            "step": -1 if spec.step is None else int(spec.step),
            "model_id": spec.repo_id or spec.local_dir, "revision": spec.revision or "",
            "token_hash": str(token_meta["hash"]), "n_tokens": int(token_meta["n_tokens"]),
            "n_neurons": n_layers * d_mlp, "n_layers": n_layers, "d_mlp": d_mlp,
            "block_tokens": STREAM_BLOCK_ROWS, "sha256": None, "source": "stream",
            "spec": spec.text, "batch_windows": batch, "d_model": d_model, "n_head": n_head,
            "n_params": int(n_params), "gated": bool(family and family.name in ("olmo", "llama")),
            "window": window, "n_windows": n_windows}


def _config_int(config, names) -> int:
    for n in names:
        v = getattr(config, n, None) if config is not None else None
        if v:
            return int(v)
    return 0


def measure_forward(spec: SourceSpec, seconds: float = 1.0) -> dict:
    """{"positions_per_s", "seconds", "batches"}: this model's hooked forward passes over
    the token set's first batches, timed after one warm-up batch (at least two timed)."""
    src = open_source(spec)
    n_batches = max(1, -(-src.n_windows // src.batch))
    src._in_buffer = None
    src._compute(0)  # warm-up: allocator, kernels
    t0, done, positions = time.perf_counter(), 0, 0
    while True:
        k = (done + 1) % n_batches if n_batches > 1 else 0
        src._in_buffer = None
        src._compute(k)
        w0, w1 = k * src.batch, min(src.n_windows, (k + 1) * src.batch)
        positions += (w1 - w0) * src.window
        done += 1
        synchronize(src.device)
        if done >= 2 and time.perf_counter() - t0 > seconds:
            break
    src._in_buffer = None
    src.batches_forwarded, src.forward_seconds = 0, 0.0  # the reduce's count starts here
    elapsed = max(time.perf_counter() - t0, 1e-9)
    return {"positions_per_s": positions / elapsed, "seconds": elapsed, "batches": done}
