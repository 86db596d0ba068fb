"""Forward passes -> activation store: the MLP neurons of every layer at the valid positions.

For one model: load the run's token set and the model, check they fit, refuse early when
the disk lacks room, then run batched forward passes with forward PRE-hooks on every
layer's MLP output projection (its input is the neurons: GPT-2 and Pythia's post-GELU
activation, act(gate) * up in OLMo and Llama; models.FAMILIES). The last layer's hook
stops the forward, so neither the rest of that layer nor the LM head is computed.
Only valid positions are kept, as fp16, in token-set order; a block of rows fills one
chunk of the store, and a writer thread hashes, writes (O_DIRECT where it can: no copy
into the page cache), ledgers it and folds it into the running top-k per neuron
(`settings.topk`, kernels/topk.py fold; RUN/stores/<label>.topk.npz, formats/cards.py)
while the next forward runs (store.py). Memory is bounded by `memory`: the batch
(windows per forward) is derived from it, and at most N_BUFFERS (3) blocks are held,
whatever the number of tokens.

Where the time goes (GPT-2 small, 12 x 3072 neurons, 1 torch thread on 2 cores, ~3.7k
tokens; bench/bench_extract.py and a cProfile of extract): the forward's own GEMMs, GELU
and attention are ~95% of the CPU time; the hooks' fp32->fp16 copies ~2.5%, gathering
the valid rows ~1%, the writer's sha256 + pwrite ~1.5%, the top-k fold ~5% at this token
count (its first block costs most; later blocks only key the few entries above each
neuron's k-th best, ~1-2% of a block's forward). What cost the most before: a CPU batch
of 4,096 tokens (15 windows) spanned ~8 blocks, so the writer could not overlap the
forward (the main thread waited for each block) and the forward itself ran out of cache;
the batch is now capped at CPU_MLP_ELEMENTS / d_mlp tokens (about one or two blocks at
this shape), which is faster per token for the bare forward too.

The hooks, the capture buffer and the row gathering are forward.py's, shared with the
reduce's stream source (sources.py), so a streamed block equals the stored one.

Resuming is by the ledger: blocks already written are not recomputed; a batch of windows
is forwarded only when it holds rows of a missing block.
"""
from __future__ import annotations

import math
import os
import queue
import resource
import threading
import time
from pathlib import Path

import numpy as np

from ooc_universal import faults, models
from ooc_universal.config import ComputeConfig, ExtractConfig, validated
from ooc_universal.forward import (FP16_MAX, MAX_BATCH_TOKENS, Capture, gather_rows,
                                   row_starts, window_bytes)
from ooc_universal.forward import check_not_nan as _check_not_nan
from ooc_universal.devices import resolve_device
from ooc_universal.errors import OocError, StaleInputError
from ooc_universal.formats.store import (DTYPE, PartialStore, StorePaths, aligned_block_buffer,
                                         check_store_matches, default_block_tokens,
                                         expected_store_bytes,
                                         identity_mismatch, parse_compression,
                                         remove_stale_temporaries, store_lock)
from ooc_universal.formats.cards import TopKFile, topk_path, write_topk
from ooc_universal.formats.store import rows_sha256
from ooc_universal.formats.tokens import check_tokenizer_matches, load_token_set
from ooc_universal.kernels import topk as topk_kernel
from ooc_universal.plan import parse_bytes
from ooc_universal.rundir import (check_free_space, disk_full, human_bytes, is_disk_full,
                                  sidecar_path, step_dir)

DTYPES = ("float32", "bfloat16")
SLACK_BYTES = 64 * 10**6   # allocator fragmentation, tqdm, small temporaries
N_BUFFERS = 3              # block buffers: one filled, two the writer may still hold
# On a CPU, a forward's MLP temporaries (tokens x d_mlp fp32, ~8 of them in gelu_new)
# should stay near the cache: past about 2^21 elements (8 MB each) throughput falls
# (GPT-2 small, 1 thread: 512-1,024 tokens per forward 15-20% faster than 4,096).
CPU_MLP_ELEMENTS = 1 << 21
SLEEP_ENV = "OOC_TEST_SLEEP_PER_BLOCK"  # tests only: seconds to sleep after each block


def extract(run_dir, model_spec, settings: ExtractConfig = ExtractConfig(),
            compute: ComputeConfig = ComputeConfig(), *, dtype: str = "float32",
            block_tokens: int | None = None, progress: bool = True,
            stats: dict | None = None, **legacy) -> Path:
    """Write RUN/stores/<label>.h5 for `model_spec` (a spec string, or a models.ModelSpec
    such as models.unique_labels gives); return its path.

    settings: compression and batch size (0 = the most windows that fit in
    compute.memory); compute: device and memory budget. dtype is the forward pass's
    compute dtype; `block_tokens` (rows per chunk) defaults to about 32 MB per chunk, and
    a resumed store keeps the chunking it was started with.

    An existing complete store of the same token set and model is returned untouched; one
    made from other inputs raises StaleInputError (never appended to). A partial store of
    the same inputs is resumed: only its missing blocks are computed. `stats`, when given,
    is filled with what was done (status, blocks, tokens/s, batch size, peak RSS).
    """
    import torch

    settings, compute = _sections_with_legacy(settings, compute, legacy)
    stats = {} if stats is None else stats
    memory_bytes = parse_bytes(compute.memory)
    parse_compression(settings.compression)
    if dtype not in DTYPES:
        raise OocError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    dev = resolve_device(compute.device)

    token_set = load_token_set(run_dir)
    spec = models.parse_model_spec(model_spec)
    paths = StorePaths.of(step_dir(run_dir, "stores"), spec.label)
    with store_lock(paths):
        remove_stale_temporaries(paths)
        if paths.final.exists():
            return _reuse_complete(paths, spec, token_set, stats)
        loaded = models.load_model(spec, dev, getattr(torch, dtype))
        check_tokenizer_matches(token_set, loaded)
        _check_window(loaded, token_set)
        attrs = _store_attrs(loaded, token_set, dtype)
        partial = _open_partial(paths, attrs, token_set, loaded.n_neurons, block_tokens,
                                settings.compression)
        faults.point("extract.start")
        try:
            batch = plan_batch(loaded, token_set, memory_bytes, partial.chunk_nbytes,
                               batch_size=settings.batch_size or None, device=dev.type,
                               topk=settings.topk)
            # refused inputs touch nothing; past them, an older top-k file goes: it is
            # never left beside a store it was not made from
            _remove_topk(run_dir, spec.label)
            stats.update(status="resumed" if partial.done else "written",
                         blocks_total=partial.n_blocks, blocks_done_before=len(partial.done),
                         batch_size=batch, block_tokens=partial.block_tokens,
                         memory_bytes=memory_bytes, device=str(dev), dtype=dtype)
            t0, c0 = time.perf_counter(), time.process_time()
            written, summary = _run_forward(loaded, token_set, partial, batch, dev, progress,
                                            stats, settings.topk)
            if summary is not None:   # before the store is final: a final store has its file
                _write_topk(run_dir, spec.label, summary, token_set, partial)
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
            path = partial.finalize(settings.compression)
        finally:
            partial.close()
        stats.update(tokens_written=written, seconds=seconds, cpu_seconds=cpu_seconds,
                     tokens_per_s=written / seconds if seconds > 0 else float("nan"),
                     peak_rss_bytes=peak_rss_bytes())
        return path


# Transitional: the keywords extract took before it took sections. Remove once every
# caller passes ExtractConfig / ComputeConfig (see the lead's list of call sites).
_LEGACY_KEYWORDS = {"batch_size": "extract", "compression": "extract",
                    "device": "compute", "memory": "compute"}


def _sections_with_legacy(settings: ExtractConfig, compute: ComputeConfig, legacy: dict):
    """(settings, compute) with the old keywords batch_size=, compression=, device=,
    memory= laid over them (None = the section's value)."""
    unknown = sorted(set(legacy) - set(_LEGACY_KEYWORDS))
    if unknown:
        raise TypeError(f"extract() got unexpected keyword argument(s) {unknown}")
    given = {k: v for k, v in legacy.items() if v is not None}
    if not given:
        return settings, compute
    over = {"extract": {}, "compute": {}}
    for key, value in given.items():
        over[_LEGACY_KEYWORDS[key]][key] = str(value) if key != "batch_size" else value
    return (validated(ExtractConfig, {**settings.model_dump(), **over["extract"]}, "extract"),
            validated(ComputeConfig, {**compute.model_dump(), **over["compute"]}, "extract"))


def _reuse_complete(paths: StorePaths, spec, token_set, stats: dict) -> Path:
    """The complete store, after checking it was made from these inputs."""
    check_store_matches(paths.final, _cheap_identity(spec, token_set))
    for p in (paths.partial, paths.ledger):  # left by a kill after the rename
        p.unlink(missing_ok=True)
    stats.update(status="skipped", blocks_written=0)
    return paths.final


def _open_partial(paths: StorePaths, attrs: dict, token_set, n_neurons: int,
                  block_tokens: int | None, compression) -> PartialStore:
    """The partial store to fill: resumed when one of the same inputs is there, else
    created, after checking that the disk holds what is still to be written."""
    if block_tokens is None:
        block_tokens = default_block_tokens(token_set.n_tokens, n_neurons)
    elif not 1 <= block_tokens <= token_set.n_tokens:
        raise OocError(f"--block-tokens {block_tokens} out of range; expected 1.."
                       f"{token_set.n_tokens} (the token set's valid positions)")
    partial = _resumable(paths, attrs)
    if partial is not None:
        block_tokens = partial.block_tokens
    try:
        _check_disk(paths, attrs, token_set.n_tokens, n_neurons, block_tokens, partial,
                    compression)
    except OocError:
        if partial is not None:
            partial.close()
        raise
    if partial is not None:
        return partial
    window, position = np.nonzero(token_set.valid)   # store row i -> (window, position)
    return _create_partial(paths, attrs, token_set.n_tokens, n_neurons, block_tokens,
                           {"window": window[: token_set.n_tokens],
                            "position": position[: token_set.n_tokens]})


def _resumable(paths: StorePaths, attrs: dict) -> PartialStore | None:
    partial = PartialStore.resume(paths)
    if partial is None:
        return None
    bad = identity_mismatch(partial.attrs, {k: attrs[k] for k in _IDENTITY_KEYS})
    if bad:
        partial.close()
        raise StaleInputError(
            f"partial activation store {str(paths.partial)!r} was started from other "
            f"inputs ({'; '.join(bad)}); it is never appended to: delete it and "
            f"{paths.ledger.name}, or use another --run-dir")
    return partial


def _check_disk(paths: StorePaths, attrs: dict, n_tokens: int, n_neurons: int,
                block_tokens: int, partial: PartialStore | None, compression) -> None:
    """Refuse before any forward pass when the missing blocks (and a compressed copy)
    would not fit on the disk."""
    full = expected_store_bytes(n_tokens, n_neurons, block_tokens)
    n_blocks = math.ceil(n_tokens / block_tokens)
    n_missing = n_blocks if partial is None else len(partial.missing())
    need = full - (n_blocks - n_missing) * block_tokens * n_neurons * DTYPE.itemsize
    if parse_compression(compression)[0] != "none":
        need += full
    check_free_space(paths.final.parent, need, f"activation store {attrs['label']}")


def _create_partial(paths: StorePaths, attrs: dict, n_tokens: int, n_neurons: int,
                    block_tokens: int, row_coords: dict | None = None) -> PartialStore:
    for p in (paths.partial, paths.ledger):
        p.unlink(missing_ok=True)
    try:
        return PartialStore.create(paths, attrs, n_tokens, n_neurons, block_tokens,
                                   row_coords=row_coords)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(exc, f"activation store {str(paths.partial)!r}") from None
        raise


# ---------------------------------------------------------------------------- checks

_IDENTITY_KEYS = ("model_id", "revision", "label", "step", "n_layers", "d_mlp", "n_tokens",
                  "token_hash", "compute_dtype")


def _cheap_identity(spec, token_set) -> dict:
    """What a complete store must say before it is reused (no model load needed)."""
    want = {"model_id": spec.repo_id or spec.local_dir, "revision": spec.revision or "",
            "label": spec.label, "n_tokens": int(token_set.n_tokens),
            "token_hash": token_set.hash}
    if spec.local_dir is not None:  # the directory may have been overwritten: check shape
        from transformers import AutoConfig
        n_layers, d_mlp = models.mlp_shape(AutoConfig.from_pretrained(spec.local_dir))
        want.update(n_layers=n_layers, d_mlp=d_mlp)
    return want


def _check_window(loaded, token_set) -> None:
    n_pos = models.context_length(loaded.model.config)
    if n_pos is not None and token_set.window > n_pos:
        raise OocError(f"token windows are {token_set.window} long but model "
                       f"{loaded.spec.label} has only {n_pos} positions; make a token set "
                       f"with --window {n_pos} or less")


def _store_attrs(loaded, token_set, dtype: str) -> dict:
    spec = loaded.spec
    return {"model_id": loaded.model_id, "revision": loaded.revision or "",
            "commit": loaded.commit or "", "label": spec.label, "name": spec.name,
            "spec": spec.text, "family": loaded.family.name if loaded.family else "",
            "step": -1 if spec.step is None else int(spec.step),
            "n_layers": int(loaded.n_layers), "d_mlp": int(loaded.d_mlp),
            "n_tokens": int(token_set.n_tokens), "token_hash": token_set.hash,
            "window": int(token_set.window), "compute_dtype": dtype}


# ---------------------------------------------------------------------------- memory

def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def _touch_weights(model) -> None:
    """Fault in weights that are still lazily memory-mapped (safetensors): the first
    forward pass would, so the resident size measured for the plan must include them."""
    import torch
    with torch.no_grad():
        for p in model.parameters():
            if p.device.type == "cpu" and p.numel():
                p.reshape(-1)[:: max(1, 4096 // p.element_size())].sum()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def topk_bytes(n_neurons: int, k: int) -> int:
    """Memory of the running top-k (kernels/topk.py fold): its keys, a decoded copy at
    the end, and one strip's scratch (a compare mask, candidates, the merge)."""
    if not k:
        return 0
    return 2 * n_neurons * k * 8 + topk_kernel.FOLD_STRIP_ENTRIES * 3 \
        + topk_kernel.STRIP * k * 8 * 4


def plan_batch(loaded, token_set, memory_bytes: int, chunk_bytes: int,
               batch_size: int | None = None, device: str = "cpu", topk: int = 0) -> int:
    """Windows per forward that keep the process under `memory_bytes`.

    Fixed: what the process holds now (interpreter, torch, weights, token set) +
    N_BUFFERS block buffers + the running top-k; the rest is divided by window_bytes.
    On a CPU the batch is also kept to about CPU_MLP_ELEMENTS / d_mlp tokens (cache).
    On a GPU the forward's window_bytes are device memory, bounded by the device's free
    memory (less 10 %), and the host holds a pinned copy of the capture buffer (fp16,
    all neurons) per window within `memory_bytes`.
    """
    n_windows, window = token_set.input_ids.shape
    _touch_weights(loaded.model)
    fixed = (current_rss_bytes() + N_BUFFERS * chunk_bytes + SLACK_BYTES
             + topk_bytes(loaded.n_neurons, topk))
    per = window_bytes(loaded, window)    # per window: host memory, or on a GPU device memory
    cuda = str(device).startswith("cuda")
    if cuda:
        _check_gpu_fits(device, per, batch_size, loaded.spec.label)
        gpu_fits = int(_gpu_free_bytes(device) * 0.9) // per
        per = window * loaded.n_neurons * 2   # the host's pinned copy of the capture
        fits = min(gpu_fits, (memory_bytes - fixed) // per)
    else:
        fits = (memory_bytes - fixed) // per
    if batch_size is not None:
        if batch_size > fits:
            raise OocError(
                f"--batch-size {batch_size} needs about {human_bytes(fixed + batch_size * per)}"
                f", over --memory {human_bytes(memory_bytes)}; lower --batch-size or raise "
                "--memory")
        return int(batch_size)
    if fits < 1:
        raise OocError(
            f"--memory {human_bytes(memory_bytes)} is too small to extract "
            f"{loaded.spec.label}: the process holds {human_bytes(current_rss_bytes())} "
            f"(torch, weights, token set), {N_BUFFERS} store blocks take "
            f"{human_bytes(N_BUFFERS * chunk_bytes)} and one window {human_bytes(per)}; "
            "raise --memory to at least "
            f"{human_bytes(fixed + per, up=True)}")
    cap = MAX_BATCH_TOKENS["cuda" if cuda else "cpu"]
    if not cuda:
        cap = min(cap, max(window, CPU_MLP_ELEMENTS // max(1, int(loaded.d_mlp))))
    return int(max(1, min(fits, n_windows, cap // window)))


def _check_gpu_fits(device, per_window: int, batch_size, label: str) -> None:
    """One window (or the asked --batch-size) of the forward within 90 % of the GPU's
    free memory; one line naming both otherwise."""
    free = _gpu_free_bytes(device)
    want = 1 if batch_size is None else int(batch_size)
    if want * per_window > free * 0.9:
        raise OocError(
            f"{device} has {human_bytes(free)} free; extracting {label} with {want} "
            f"window(s) per forward needs about {human_bytes(want * per_window / 0.9, up=True)}"
            " of it; free the GPU, lower --batch-size, or use --device cpu")


def _gpu_free_bytes(device) -> int:
    """Free memory of the CUDA device now (its weights already loaded)."""
    import torch
    return int(torch.cuda.mem_get_info(torch.device(device))[0])


# ---------------------------------------------------------------------------- the loop

class _BlockWriter:
    """A thread that writes finished blocks (pwrite, fsync, ledger) while forwards run,
    and folds each into the running top-k per neuron (kernels/topk.py fold) when `topk`
    > 0. Blocks written before a resume (`readback`) are read back from the partial
    file, checked against their ledger digests and folded first, so the summary is that
    of every row, as an uninterrupted run's.

    `n_buffers` block buffers circulate: the main thread fills one while the writer
    writes another (the read-back uses them too), so at most n_buffers blocks are held.
    """

    def __init__(self, partial: PartialStore, n_buffers: int = 2, topk: int = 0,
                 readback=()):
        self.partial = partial
        self.topk = topk_kernel.start(topk, partial.n_neurons) if topk else None
        self.readback = sorted(readback) if topk else []
        self.topk_cpu = 0.0   # CPU seconds of folding (part of busy_cpu)
        self.sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
        self.free: queue.Queue = queue.Queue()
        for _ in range(n_buffers):
            self.free.put(aligned_block_buffer(partial.block_tokens, partial.n_neurons))
        self.todo: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.written = 0
        self.busy = 0.0     # seconds the writer spent hashing, writing, syncing
        self.busy_cpu = 0.0  # CPU seconds of that (it competes with the forward's threads)
        self.waited = 0.0   # seconds the main thread waited for a free buffer
        self.drained = 0.0  # seconds close() waited for the last blocks
        self.thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if self.readback:
            buf = self.free.get()
            try:
                t0, c0 = time.perf_counter(), time.thread_time()
                self._fold_written(buf)
                self.busy += time.perf_counter() - t0
                self.busy_cpu += time.thread_time() - c0
            except BaseException as exc:  # handed to the main thread
                self.error = exc
            finally:
                self.free.put(buf)
        while True:
            item = self.todo.get()
            if item is None:
                return
            i, buf, rows = item
            try:
                if self.error is None:
                    t0, c0 = time.perf_counter(), time.thread_time()
                    buf[rows:] = 0  # a whole chunk: written without a copy (O_DIRECT)
                    self.partial.write_block(i, buf)
                    if self.topk is not None:
                        c1 = time.thread_time()
                        topk_kernel.fold(self.topk, buf[:rows], i * self.partial.block_tokens)
                        self.topk_cpu += time.thread_time() - c1
                    self.busy += time.perf_counter() - t0
                    self.busy_cpu += time.thread_time() - c0
                    self.written += 1
                    if self.sleep:
                        time.sleep(self.sleep)
            except BaseException as exc:  # handed to the main thread
                self.error = exc
            finally:
                self.free.put(buf)

    def _fold_written(self, buf: np.ndarray) -> None:
        """Fold the blocks written before this run (read back into `buf`)."""
        partial = self.partial
        fd = os.open(partial.paths.partial, os.O_RDONLY)
        try:
            for i in self.readback:
                start, stop = partial.block_bounds(i)
                view = memoryview(buf.reshape(-1).view(np.uint8))[: partial.chunk_nbytes]
                got = os.preadv(fd, [view], partial.offsets[i])
                rows = buf[: stop - start]
                want = partial.digests.get(i)
                if got != partial.chunk_nbytes or (want and rows_sha256(rows) != want):
                    raise OocError(
                        f"block {i} of the partial store {str(partial.paths.partial)!r} "
                        "does not match its ledger (damaged on disk since it was written); "
                        f"delete it and {partial.paths.ledger.name} and extract again")
                c1 = time.thread_time()
                topk_kernel.fold(self.topk, rows, start)
                self.topk_cpu += time.thread_time() - c1
                try:
                    os.posix_fadvise(fd, partial.offsets[i], partial.chunk_nbytes,
                                     os.POSIX_FADV_DONTNEED)
                except (AttributeError, OSError):
                    pass
        finally:
            os.close(fd)

    def buffer(self) -> np.ndarray:
        t0 = time.perf_counter()
        buf = self.free.get()
        self.waited += time.perf_counter() - t0
        self._raise()
        return buf

    def submit(self, i: int, buf: np.ndarray, rows: int) -> None:
        self.todo.put((i, buf, rows))

    def close(self) -> None:
        t0 = time.perf_counter()
        self.todo.put(None)
        self.thread.join()
        self.drained += time.perf_counter() - t0
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


def _run_forward(loaded, token_set, partial: PartialStore, batch: int, dev, progress: bool,
                 stats: dict, topk: int = 0):
    """Forward the windows that hold rows of missing blocks; return (rows written, the
    top-k summary of every row (values, rows) or None when topk is 0).

    The hooks (forward.Capture) fill an fp16 capture buffer; the valid rows are then gathered
    once per batch, on the GPU before the transfer, on a CPU straight into the block
    buffers (gather_rows: one memcpy per run of valid positions).
    """
    import torch
    from tqdm import tqdm

    base = models.base_model(loaded.model)  # the decoder stack, without the LM head
    input_ids, valid = token_set.input_ids, token_set.valid
    n_windows, window = input_ids.shape
    row_start = row_starts(valid)
    bt, n_tokens, done = partial.block_tokens, partial.n_tokens, set(partial.done)
    capture = Capture(loaded, batch * window, dev)
    writer = _BlockWriter(partial, n_buffers=N_BUFFERS, topk=topk, readback=done)
    bar = tqdm(total=n_tokens, initial=sum(min(n_tokens, (i + 1) * bt) - i * bt for i in done),
               unit="tok", unit_scale=True, disable=not progress,
               desc=f"extract {loaded.spec.label}")
    cur = {"block": None, "buf": None}
    rows_written = windows = overflow = 0
    clock = {"forward": 0.0, "copy": 0.0}  # where the time goes (stats, the bench)
    try:
        with torch.inference_mode():
            for w0 in range(0, n_windows, batch):
                w1 = min(n_windows, w0 + batch)
                r0, r1 = int(row_start[w0]), int(row_start[w1])
                if r1 == r0 or all(b in done for b in range(r0 // bt, (r1 - 1) // bt + 1)):
                    continue
                ids = torch.from_numpy(np.ascontiguousarray(input_ids[w0:w1])).to(dev).long()
                t0 = time.perf_counter()
                top = capture.forward(base, ids)
                t1 = time.perf_counter()
                _check_not_nan(top, loaded, w0, w1)
                src, sel = capture.valid_rows(np.flatnonzero(valid[w0:w1].reshape(-1)))
                if top > FP16_MAX:
                    overflow += int(np.isinf(src[sel]).sum())
                rows_written += _route(src, sel, r0, r1 - r0, bt, n_tokens, done, cur,
                                       writer, bar)
                clock["forward"] += t1 - t0
                clock["copy"] += time.perf_counter() - t1
                windows += w1 - w0
                faults.point("extract.batch")
        writer.close()
    finally:
        capture.remove()
        bar.close()
        if writer.thread.is_alive():
            writer.todo.put(None)
            writer.thread.join()
    if len(partial.done) != partial.n_blocks:
        raise RuntimeError(f"{partial.n_blocks - len(partial.done)} blocks were not written")
    if overflow:
        import warnings
        warnings.warn(f"{overflow} activations of {loaded.spec.label} exceed the float16 range "
                      "and were stored as +-inf", RuntimeWarning, stacklevel=3)
    stats.update(blocks_written=writer.written, windows_forwarded=windows,
                 fp16_overflow=overflow, seconds_forward=clock["forward"],
                 seconds_copy=clock["copy"] - writer.waited,
                 seconds_writer_wait=writer.waited + writer.drained,
                 seconds_writer_busy=writer.busy, cpu_seconds_writer=writer.busy_cpu,
                 cpu_seconds_topk=writer.topk_cpu, topk=topk,
                 blocks_read_back=len(writer.readback))
    return rows_written, (None if writer.topk is None else topk_kernel.finish(writer.topk))


def _remove_topk(run_dir, label: str) -> None:
    """Drop a top-k file (and its checksum) of an earlier store of this label: the one
    this extract makes replaces it, and with topk = 0 none must be left to describe
    another model's activations."""
    path = topk_path(run_dir, label)
    path.unlink(missing_ok=True)
    sidecar_path(path).unlink(missing_ok=True)


def _write_topk(run_dir, label: str, summary, token_set, partial: PartialStore) -> Path:
    values, rows = summary
    return write_topk(run_dir, TopKFile(values, rows, label, token_set.hash,
                                        partial.n_tokens, "extract"),
                      {"step": "extract", "label": label, "k": int(values.shape[0]),
                       "model_id": str(partial.attrs.get("model_id", "")),
                       "revision": str(partial.attrs.get("revision", ""))})


def _route(src: np.ndarray, sel: np.ndarray, r0: int, n: int, bt: int, n_tokens: int,
           done: set, cur: dict, writer: _BlockWriter, bar) -> int:
    """Copy a batch's n valid rows (global rows r0..r0+n) into block buffers; submit
    full blocks. Row k of the batch is src[sel[k]]."""
    pos = kept = 0
    while pos < n:
        row = r0 + pos
        b = row // bt
        b0, b1 = b * bt, min(n_tokens, (b + 1) * bt)
        take = min(n - pos, b1 - row)
        if b not in done:
            if cur["block"] != b:
                if row != b0:
                    raise RuntimeError(f"block {b} entered at row {row}, not at its start {b0}")
                cur["block"], cur["buf"] = b, writer.buffer()
            gather_rows(src, sel[pos: pos + take], cur["buf"][row - b0: row - b0 + take])
            kept += take
            if row + take == b1:
                writer.submit(b, cur["buf"], b1 - b0)
                cur["block"] = cur["buf"] = None
                done.add(b)
            bar.update(take)
        pos += take
    return kept


_Capture = Capture  # the name the tests and older callers use
