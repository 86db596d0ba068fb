"""Block and tile sizes for the reduce, from shapes, the memory budget and the device.

The reduce keeps one co-moment accumulator (rows of the reference x all neurons of the
other model) per pair. A *group* is a set of pairs reduced in one pass over the token
blocks (the reference block is read and converted once for all of them); a *panel* is a
range of reference rows (used only when a full-width accumulator does not fit). The
planner picks the (group size, panel count, block size) that fits the budget at the
least estimated time (expected_seconds with default rates; on a GPU, the fewest bytes
read first).

Memory: every task of the reduce (steps/reduce.py) is counted buffer by buffer
(task_bytes: blocks, memory-mapped store pages, centred strips, accumulators, the self
co-moments, the baseline's rotations and strips, kernel scratch), on top of
OVERHEAD_BYTES for the interpreter and libraries; the budget must hold the largest task
plus the safety margin: required = (OVERHEAD + task) * (1 + SAFETY_FRACTION) +
SCRATCH_BYTES. `--dry-run` prints the peak, the work directory's disk, the FLOPs of
every kind and the expected time from rates measured at the plan's own shapes.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace

from ooc_universal.devices import synchronize
from ooc_universal.errors import OocError

# RSS of a CPU reduce process before its first block: 384 MB measured (python 3.11,
# torch 2.13, numba kernels loaded from their cache, dask, h5py, one GEMM run), + 15%
# (the pair file's HDF5 chunk caches, a few MB, included): every task's constant part
OVERHEAD_BYTES = 450 * 10**6
SAFETY_FRACTION = 0.05         # on top of every counted buffer: allocator slack
SCRATCH_BYTES = 64 * 10**6     # BLAS packing buffers, numba and torch per-thread scratch
PAGE_BYTES = 4096
FAULT_AROUND_BYTES = 64 * 1024  # Linux maps up to 64 KiB of cached file pages per fault
THREADS_ALLOWANCE = 64         # per-thread partial sums (centring, tile max) for <= 64 threads
BASELINE_ROW_STRIP = 4096      # reference rows per baseline GEMM (C strip R'^T)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp64": 8}


def parse_bytes(text) -> int:
    """'16GB' -> 16e9 (decimal units; KiB/MiB/GiB binary). Ints pass through."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise OocError(f"cannot read memory size {text!r}; expected e.g. '16GB', '512MB' or '8GiB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass
class PairShape:
    other_label: str
    n_other: int        # neurons of the other model (all layers)
    d_other: int        # neurons per layer of the other model (the rotation's d)


@dataclass(frozen=True)
class StreamShape:
    """What forward passes add to a reduce whose blocks are streamed (sources.py): the
    reference's model and each pair's other model, in the order of the pairs."""
    positions: int          # token positions forwarded per pass (windows x window)
    flops_ref: float        # forward FLOPs per position of the reference model
    flops_others: tuple     # the same, per pair
    resident_bytes: int     # weights and capture buffers of every model (kept loaded)
    transient_bytes: int    # the largest forward's activations beyond its capture buffer
    labels: tuple = ()      # reference first, then each pair's other model
    # forward batches per pass of each model (reference first; () unknown): a model
    # whose token set is one batch is forwarded once in all (its capture buffer keeps
    # the batch for every later pass)
    batches: tuple = ()

    def passes(self, ref_passes: int, other_passes: int) -> tuple:
        """The forward passes each model really runs (reference first), given the
        plan's passes of the reference and of each other model."""
        n = 1 + len(self.flops_others)
        want = (ref_passes, *(other_passes,) * (n - 1))
        if len(self.batches) != n:
            return want
        return tuple(min(w, 1) if b == 1 else w for w, b in zip(want, self.batches))


def forward_flops_per_token(n_layers: int, d_model: int, d_mlp: int, window: int,
                            gated: bool = False) -> float:
    """Forward FLOPs per token position: 2 N + 2 L n_ctx d_model (Kaplan et al. 2020),
    N the non-embedding parameters, L (4 d_model^2 + 2 d_model d_mlp) (3 d_model d_mlp
    for a gated MLP: gate, up and down projections)."""
    n = n_layers * (4 * d_model * d_model + (3 if gated else 2) * d_model * d_mlp)
    return 2.0 * n + 2.0 * n_layers * window * d_model


def stream_shape(metas: list, param_bytes: int = 4) -> StreamShape:
    """The StreamShape of models described by sources.stream_meta dicts (the reference
    first): per model its weights (n_params x param_bytes) and its capture buffer
    (batch x window x n_neurons fp16) stay resident; one forward's activations are
    transient (forward.window_bytes_of, without the capture buffer)."""
    from ooc_universal.forward import window_bytes_of
    flops, resident, transient = [], 0, 0
    for m in metas:
        window, batch, n_neurons = int(m["window"]), int(m["batch_windows"]), int(m["n_neurons"])
        flops.append(forward_flops_per_token(m["n_layers"], m["d_model"], m["d_mlp"], window,
                                             m.get("gated", False)))
        capture = batch * window * n_neurons * 2
        resident += int(m["n_params"]) * param_bytes + capture
        per_window = window_bytes_of(m["n_layers"], m["d_mlp"], m["d_model"], m["n_head"],
                                     window)
        transient = max(transient, batch * per_window - capture)
    positions = int(metas[0]["n_windows"]) * int(metas[0]["window"])
    batches = tuple(-(-int(m["n_windows"]) // max(1, int(m["batch_windows"])))
                    for m in metas) if all(m.get("n_windows") for m in metas) else ()
    return StreamShape(positions, flops[0], tuple(flops[1:]), resident, transient,
                       tuple(m["label"] for m in metas), batches)


def forward_passes(n_groups: int, n_panels: int, n_pairs: int,
                   self_fused: bool = False) -> tuple[int, int]:
    """(passes of the reference model, passes of each other model) of a streamed reduce:
    the reference is forwarded once per (group, panel) fold, each other model once per
    panel of its group, and once more for its self co-moments unless they are folded in
    the first panel's pass (`self_fused`: one chain, steps/reduce.py)."""
    return n_groups * n_panels, n_panels + (0 if self_fused else 1)


@dataclass
class ReducePlan:
    n_tokens: int
    n_ref: int
    pairs: list                 # [PairShape]
    device: str
    precision: str
    memory_bytes: int
    block_tokens: int           # token rows per GEMM (see _block_options)
    store_chunk_rows: int
    groups: list                # [[pair index, ...]] reduced together in one pass
    panels: list                # [(row start, row stop)] over reference neurons
    n_chains: int               # token ranges reduced in parallel per (group, panel)
    blocks_per_segment: int     # blocks between on-disk checkpoints of an accumulator
    baseline_draws: int
    keep_covariance: bool
    source: str = "store"       # where the blocks come from: store | stream (sources.py)
    peak_bytes: int = 0         # expected peak RSS of a worker (the largest task)
    required_bytes: int = 0     # peak_bytes with the safety margin: what the budget holds
    task_peaks: dict = field(default_factory=dict)   # {task kind: expected peak bytes}
    bytes_read: int = 0
    work_disk_bytes: int = 0    # peak disk of the work directory (checkpoints)
    output_bytes: int = 0       # the pair files
    flops: float = 0.0          # every useful FLOP (the sum of flops_by_kind)
    flops_by_kind: dict = field(default_factory=dict)
    forward_flops: float = 0.0  # stream: the forward passes' FLOPs (not in `flops`)
    forward_passes: dict = field(default_factory=dict)  # stream: {label: passes}
    stream: "StreamShape | None" = None
    # stream, one chain: the others' self co-moments are folded by the first panel's
    # fold of their group, from the same forward passes (no self pass of their own)
    self_fused: bool = False
    snapshots: int = 0          # convergence snapshots below the total token count
    snapshot_counts: tuple = ()  # their token counts, where known (they cut blocks)
    notes: list = field(default_factory=list)

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.n_tokens / self.block_tokens)

    def block_bounds(self, b: int) -> tuple[int, int]:
        return b * self.block_tokens, min(self.n_tokens, (b + 1) * self.block_tokens)

    def spans(self) -> list:
        """The (start, stop) token rows of every GEMM the fold runs: the blocks, each cut
        at the snapshot counts inside it (steps/reduce.py _block_spans)."""
        return token_spans(self.n_tokens, self.block_tokens, self.snapshot_counts)

    def chain_blocks(self, chain: int) -> range:
        """The contiguous range of blocks that chain `chain` folds."""
        per = math.ceil(self.n_blocks / self.n_chains)
        return range(chain * per, min(self.n_blocks, (chain + 1) * per))

    @property
    def n_fold_tasks(self) -> int:
        return len(self.groups) * len(self.panels) * self.n_chains

    @property
    def panel_rows(self) -> int:
        return max(b - a for a, b in self.panels)

    def passes(self) -> dict:
        """Passes over each store (a panel pass over the reference counts its fraction;
        the others' self co-moment pass counts 1, none when it is fused into the
        first panel's). A stream's forward passes: forward_passes."""
        ref = sum((b - a) / self.n_ref for a, b in self.panels) * len(self.groups)
        other = {self.pairs[i].other_label: len(self.panels) + (0 if self.self_fused else 1)
                 for g in self.groups for i in g}
        return {"reference": ref, "others": other}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["n_blocks"] = self.n_blocks
        d["n_fold_tasks"] = self.n_fold_tasks
        d["passes"] = self.passes()
        return d


# --------------------------------------------------------------------------- memory
# Bytes of each task beyond the process overhead; shapes in the comments. cb: bytes of a
# compute element (fp32 4, bf16 2, fp64 8); ab: of an accumulator element (4 or 8).

@dataclass(frozen=True)
class _Cut:
    """What the memory of one (group, panel) depends on."""
    rows: int            # reference rows of the panel
    others: tuple        # ((n_other, d_other), ...) of the group
    n_ref: int
    block: int           # token rows per block
    chunk: int           # store chunk rows (a block of more rows is gathered)
    precision: str
    device: str
    draws: int
    chains: int
    keep_covariance: bool
    stream: bool = False      # blocks from forward passes (sources.StreamSource)
    resident: int = 0         # stream: models and capture buffers held by the process
    transient: int = 0        # stream: the largest forward's activations
    snapshots: int = 0        # convergence snapshots below the total (steps/reduce.py)
    self_fused: bool = False  # the fold also holds the group's self co-moments

    @property
    def cb(self) -> int:
        return _COMPUTE_BYTES[self.precision]

    @property
    def ab(self) -> int:
        return 8 if self.precision == "fp64" else 4

    @property
    def gathers(self) -> bool:
        """Blocks copied into host buffers (a GPU, or blocks of several chunks); a
        stream's blocks are computed into buffers counted as its mapped pages."""
        return not self.stream and (self.device.startswith("cuda") or self.block > self.chunk)

    @property
    def d_max(self) -> int:
        return max(d for _, d in self.others)

    @property
    def nb_max(self) -> int:
        return max(nb for nb, _ in self.others)


def _mapped_ref(cut: _Cut) -> int:
    """Pages of the reference block a panel maps: its columns of every token row, and
    the fault-around window on either side (measured at 12 x 3072: a panel of 12,288
    columns maps whole rows). A stream computes every neuron of the block into one
    buffer."""
    if cut.stream:
        return cut.block * cut.n_ref * 2
    return cut.block * min(cut.n_ref * 2, cut.rows * 2 + 2 * FAULT_AROUND_BYTES)


def _acc_bytes(cut: _Cut, nb: int) -> int:
    """One pair's accumulator: c (rows, Nb) and its moment vectors."""
    return cut.rows * nb * cut.ab + 48 * nb + 48 * cut.rows


def _fold_bytes(cut: _Cut) -> int:
    """The group's accumulators, and either the block buffers or (a single chain
    finalizes from memory once they are freed) the finalize's own buffers."""
    acc = sum(_acc_bytes(cut, nb) for nb, _ in cut.others)
    centred = (cut.block + 1) * (cut.rows + cut.d_max) * cut.cb  # x block, one y strip
    # bf16 strip GEMM: its product, the row-major copy of the x block and oneDNN's
    # reordered operands
    product = (cut.rows * cut.d_max * 4 + 2 * (cut.block + 1) * (2 * cut.rows + cut.d_max)
               if cut.precision == "bf16" else 0)
    staging = 2 if cut.device.startswith("cuda") else 1  # double-buffered uploads
    gather = staging * cut.block * (cut.rows + cut.d_max) * 2 if cut.gathers else 0
    mapped = _mapped_ref(cut) + cut.block * cut.nb_max * 2  # one other block at a time
    partials = THREADS_ALLOWANCE * (cut.rows + cut.d_max) * 24
    buffers = centred + product + gather + mapped + partials + cut.transient
    if cut.device.startswith("cuda"):
        # each upload lands in a fresh device copy beside its pinned buffer, and the
        # torch centring's scratch (tmp, sq; for the x block and a y strip) is bounded
        from ooc_universal.kernels.comoments import GPU_CHUNK_BYTES
        work = 8 if cut.precision == "fp64" else 4
        buffers += gather + 2 * sum(min(GPU_CHUNK_BYTES, (cut.block + 1) * cols * work)
                                    for cols in (cut.rows, cut.d_max))
    # a convergence snapshot frees the block buffers, then finalizes from memory
    finalize = _finalize_extra(cut) + _snapshot_scales_bytes(cut) \
        if cut.chains == 1 or cut.snapshots else 0
    plain = acc + _snapshot_bytes(cut) + max(buffers, finalize)
    if not cut.self_fused:
        return plain
    # fused (stream, one chain): the group's (L, d, d) f64 self co-moments and their
    # snapshots' rotated scales are held beside the accumulators while folding (and a
    # (d, d) fp32 product); a self snapshot adds one rotation, S and R S; then they
    # are written out and freed before the scales (one layer's: _rotation_bytes) and
    # the finalize
    held = sum((nb // d) * d * d * 8 + 48 * nb + cut.snapshots * cut.draws * nb * 8
               for nb, d in cut.others)
    self_snap = 3 * cut.d_max ** 2 * 8 if cut.snapshots else 0
    during = acc + _snapshot_bytes(cut) + held + max(
        buffers + cut.d_max ** 2 * 4, finalize + self_snap if cut.snapshots else 0)
    return max(plain, during, acc + _snapshot_bytes(cut) + _rotation_bytes(cut))


def _snapshot_bytes(cut: _Cut) -> int:
    """The convergence snapshots a panel holds: row max and every draw's baseline of
    its rows, per pair and snapshot, in the output dtype."""
    return cut.snapshots * len(cut.others) * cut.rows * (1 + cut.draws) * cut.ab


def _snapshot_scales_bytes(cut: _Cut) -> int:
    """One snapshot's rotated scales (draws, L, d) f64, loaded for one pair."""
    return cut.draws * cut.nb_max * 8 if cut.snapshots else 0


def _merge_bytes(cut: _Cut) -> int:
    """Chan merge of the chains, one pair at a time: two of its accumulators."""
    if cut.chains < 2:
        return 0
    return max(2 * _acc_bytes(cut, nb) for nb, _ in cut.others)


def _finalize_bytes(cut: _Cut) -> int:
    """One pair's accumulator (loaded from its checkpoint) and the finalize's buffers."""
    return (max(_acc_bytes(cut, nb) for nb, _ in cut.others) + _finalize_extra(cut)
            + _snapshot_bytes(cut))


def _finalize_extra(cut: _Cut) -> int:
    """Beyond the accumulators: the tile max's column partials, the baseline's rotation
    (loaded and scaled) and strip product, a float32 copy of an fp64 c to keep, and
    the panel's results."""
    eb = 8 if cut.precision == "fp64" else 4
    strip = min(BASELINE_ROW_STRIP, cut.rows)
    per_pair = max(THREADS_ALLOWANCE * nb * 16 + 2 * d * d * eb + strip * d * eb
                   + (cut.rows * nb * 4 if cut.keep_covariance and cut.ab == 8 else 0)
                   for nb, d in cut.others)
    # on a GPU the tile max works where C is, in f64 row strips (a strip, its product
    # and the argmax/gather temporaries: about three of kernels/tilemax's strips)
    device_strips = 3 * (64 << 20) if cut.device.startswith("cuda") else 0
    return per_pair + device_strips + len(cut.others) * cut.rows * (64 + 16 * cut.draws)


def _self_bytes(cut: _Cut) -> int:
    """One other model's self co-moment pass: the (L, d, d) f64 accumulator, the fp32
    block product, one centred strip, the mapped block."""
    out = 0
    for nb, d in cut.others:
        gather = cut.block * d * 2 * (2 if cut.device.startswith("cuda") else 1) \
            if cut.gathers else 0
        # convergence snapshots: one rotation, S in its dtype and R S; the scales kept
        snap = 3 * d * d * 8 + cut.snapshots * cut.draws * nb * 8 if cut.snapshots else 0
        out = max(out, (nb // d) * d * d * 8 + d * d * 4 + (cut.block + 1) * d * cut.cb
                  + cut.block * nb * 2 + gather + 48 * nb + THREADS_ALLOWANCE * d * 24
                  + cut.transient + snap)
    return out


def _rotation_bytes(cut: _Cut) -> int:
    """Drawing one rotation (f64, its squares for the norms, the fp32 copy), or the
    rotated scales of one layer (S in f64 and fp32, R, R S, its product with R)."""
    d = cut.d_max
    return max(d * d * (8 * 3 + 4), d * d * (8 + 4 * 4))


def _assemble_bytes(cut: _Cut) -> int:
    """One panel's results, one self co-moment layer, the column maxima."""
    nb, d = max(cut.others)
    cov = cut.rows * nb * 4 if cut.keep_covariance else 0
    # convergence table: the file's own row max and baseline of every row, one
    # snapshot's (concatenated from the panels), summarize's temporaries
    table = 3 * cut.n_ref * (1 + cut.draws) * 8 if cut.snapshots else 0
    return cut.rows * (64 + 16 * cut.draws) + d * d * 8 + nb * 48 + cov + table


TASK_BYTES = {"fold": _fold_bytes, "merge": _merge_bytes, "finalize": _finalize_bytes,
              "self": _self_bytes, "rotations": _rotation_bytes, "assemble": _assemble_bytes}


def task_bytes(cut: _Cut) -> dict:
    """{task kind: expected peak RSS of a worker running it}, overhead included (and a
    stream's models: they stay loaded in the process for the whole reduce)."""
    return {kind: OVERHEAD_BYTES + cut.resident + fn(cut) for kind, fn in TASK_BYTES.items()}


def with_margin(peak: int) -> int:
    """The budget a peak needs: the safety margin on top."""
    return int(peak * (1 + SAFETY_FRACTION)) + SCRATCH_BYTES


def _peak(rows, n_others, n_ref, block, precision, d_others, draws, n_chains, *,
          chunk: int | None = None, device: str = "cpu", keep_covariance: bool = False) -> int:
    """The budget one (group, panel) needs: its largest task, margin included."""
    cut = _Cut(int(rows), tuple(zip(n_others, d_others)), int(n_ref), int(block),
               int(chunk or block), precision, str(device), int(draws), int(n_chains),
               bool(keep_covariance))
    return with_margin(max(task_bytes(cut).values()))


# --------------------------------------------------------------------------- the plan

def make_plan(n_tokens: int, n_ref: int, pairs: list, *, memory="4GB", device="cpu",
              precision="fp32", n_workers: int = 1, store_chunk_rows: int = 64,
              block_tokens: int | None = None, max_panels: int | None = None,
              baseline_draws: int = 1, keep_covariance: bool = False,
              blocks_per_segment: int | None = None,
              stream: StreamShape | None = None, snapshots=0) -> ReducePlan:
    """Choose groups, panels, block size and chains for `pairs` (list of PairShape).

    `stream`: the blocks come from forward passes (sources.py), not stores: no store
    bytes are read, the models stay loaded in every task, and each panel pass forwards
    the models again (plan.forward_flops; the cut that minimises the time counts it).

    `n_workers` > 1 (a cluster) splits the tokens into that many chains per
    (group, panel), each on its own worker, merged at the end (Chan merge).
    `max_panels` forces that many panels (tests, and 'memory halved' in the bench).
    `snapshots`: the convergence snapshots' token counts below the total (or just how
    many): each cuts the block it falls in, so the block size that keeps the cut spans
    long is preferred.
    """
    if n_tokens < 2:
        raise OocError(f"need at least 2 token positions to correlate, got {n_tokens}")
    if precision not in _COMPUTE_BYTES:
        raise OocError(f"unknown precision {precision!r}; expected fp32, bf16 or fp64")
    memory_bytes = parse_bytes(memory)
    chunk = max(1, int(store_chunk_rows))
    counts = () if isinstance(snapshots, int) else tuple(sorted(int(c) for c in snapshots))
    n_snapshots = max(0, snapshots) if isinstance(snapshots, int) else len(counts)
    shape = dict(n_ref=n_ref, chunk=chunk, precision=precision, device=str(device),
                 draws=baseline_draws, chains=max(1, int(n_workers)),
                 keep_covariance=keep_covariance, stream=stream,
                 snapshots=n_snapshots,
                 snapshot_counts=counts)
    best = None
    # a stream of one chain may fold the others' self co-moments in the first panel's
    # pass (one forward pass fewer per other model, their accumulators held meanwhile)
    fuse_options = (True, False) if stream is not None and shape["chains"] == 1 else (False,)
    for fused in fuse_options:
        cut_shape = {**shape, "self_fused": fused}
        for groups in _group_options(len(pairs)):
            for block in _block_options(n_tokens, chunk, device, block_tokens, counts):
                cand = _fit(groups, pairs, block, memory_bytes, max_panels, cut_shape)
                if cand is None:
                    continue
                cand["self_fused"] = fused
                key = _candidate_key(cand, pairs, n_tokens, device, stream, counts)
                if best is None or key < best[0]:
                    best = (key, cand)
    if best is None:
        raise OocError(_too_small(memory, pairs, n_tokens, chunk, shape))
    shape = {**shape, "self_fused": best[1]["self_fused"]}
    return _build(best[1], pairs, n_tokens, memory_bytes, shape, blocks_per_segment)


def _group_options(n_pairs: int):
    """Pairs per pass, largest first: [[0..g-1], [g..2g-1], ...] for g = n_pairs .. 1."""
    for g in range(n_pairs, 0, -1):
        yield [list(range(i, min(n_pairs, i + g))) for i in range(0, n_pairs, g)]


def _block_options(n_tokens: int, chunk: int, device, block_tokens, counts=()) -> list:
    """Token rows per block, largest first: multiples of the store's chunk rows, and the
    powers of two themselves (4,096 against 4,032 for 448-row chunks), which the
    doubling snapshot counts (1,024, 2,048, ...) fall on, so that no block is cut into a
    sliver (a GEMM of 64 inner rows costs its full output traffic for 2 % of the work).
    A block needs no chunk alignment: a block's rows are read chunk by chunk."""
    if block_tokens is not None:
        blocks = [max(chunk, (int(block_tokens) // chunk) * chunk)]
    else:
        # big blocks keep the GEMM efficient; smaller ones leave room for accumulators
        top = 8192 if str(device).startswith("cuda") else 4096
        sizes = (top, top // 2, top // 4, top // 8)
        blocks = {max(chunk, (b // chunk) * chunk) for b in sizes}
        blocks |= {b for b in sizes if b >= chunk}
    cap = math.ceil(n_tokens / chunk) * chunk
    return sorted({min(b, cap) for b in blocks}, reverse=True)


def _cut_text(plan) -> str:
    """', cut into 4 spans by 3 snapshot counts' when the snapshots cut blocks."""
    counts = getattr(plan, "snapshot_counts", ())
    n_spans = len(plan.spans()) if counts else plan.n_blocks
    if n_spans == plan.n_blocks:
        return ""
    return f", {n_spans:,} GEMM spans: cut at {len(counts)} snapshot counts"


def token_spans(n_tokens: int, block_tokens: int, counts=()) -> list:
    """(start, stop) of every block of `block_tokens` rows, cut at the `counts` inside."""
    out = []
    for s in range(0, n_tokens, block_tokens):
        e = min(n_tokens, s + block_tokens)
        edges = [s, *sorted(c for c in counts if s < c < e), e]
        out += list(zip(edges[:-1], edges[1:]))
    return out


def span_efficiency(n_tokens: int, block_tokens: int, counts=()) -> float:
    """GEMM time of the cut spans over that of whole blocks, at k / (k + H) of peak for
    k inner rows (GEMM_HALF_EFFICIENCY_ROWS): >= 1, 1 when no count cuts a block."""
    h = GEMM_HALF_EFFICIENCY_ROWS
    blocks = math.ceil(n_tokens / block_tokens)
    return (n_tokens + h * len(token_spans(n_tokens, block_tokens, counts))) / \
        (n_tokens + h * blocks)


def _cut(rows: int, grp: list, pairs: list, block: int, shape: dict) -> _Cut:
    stream = shape.get("stream")
    return _Cut(rows, tuple((pairs[i].n_other, pairs[i].d_other) for i in grp),
                shape["n_ref"], block, shape["chunk"], shape["precision"], shape["device"],
                shape["draws"], shape["chains"], shape["keep_covariance"],
                stream is not None, stream.resident_bytes if stream else 0,
                stream.transient_bytes if stream else 0,
                snapshots=shape.get("snapshots", 0),
                self_fused=bool(shape.get("self_fused")))


def _required(rows: int, groups: list, pairs: list, block: int, shape: dict) -> int:
    return max(with_margin(max(task_bytes(_cut(rows, g, pairs, block, shape)).values()))
               for g in groups)


def _fit(groups, pairs, block, memory_bytes, max_panels, shape) -> dict | None:
    """The fewest equal panels (or max_panels) whose every task fits; None if none."""
    n_ref = shape["n_ref"]
    if max_panels:
        n_panels = min(int(max_panels), n_ref)
    else:
        rows = _max_rows(groups, pairs, block, memory_bytes, shape)
        if rows == 0:
            return None
        n_panels = math.ceil(n_ref / rows)
    rows = math.ceil(n_ref / n_panels)
    if _required(rows, groups, pairs, block, shape) > memory_bytes:
        return None
    return {"groups": groups, "block": block, "n_panels": n_panels, "rows": rows,
            "n_ref": n_ref}


def _max_rows(groups, pairs, block, memory_bytes, shape) -> int:
    """The most reference rows per panel that fit (0: not even one); the need grows
    with the rows, so bisect."""
    lo, hi = 0, shape["n_ref"]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _required(mid, groups, pairs, block, shape) <= memory_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _candidate_key(cand: dict, pairs: list, n_tokens: int, device, stream=None,
                   counts=()) -> tuple:
    """GPU: fewest bytes read (or forward passes), then fewest panels (it is IO-bound).
    CPU: least estimated time at default rates (a small block costs GEMM efficiency, a
    panel more centring and reads, or forward passes); ties to fewer panels, larger
    blocks."""
    reads = len(cand["groups"]) + cand["n_panels"] * len(pairs)  # in store passes
    if stream is not None:  # in forward passes
        ref_passes, other_passes = forward_passes(len(cand["groups"]), cand["n_panels"],
                                                  len(pairs), cand.get("self_fused", False))
        reads = ref_passes + other_passes * len(pairs)
    if str(device).startswith("cuda"):
        return (reads, cand["n_panels"], -cand["block"])
    secs = _rough_seconds(cand, pairs, n_tokens, stream, counts)
    return (round(secs, 6), cand["n_panels"], -cand["block"])


def _rough_seconds(cand: dict, pairs: list, n_tokens: int, stream=None,
                   counts=()) -> float:
    """Time of a candidate cut at DEFAULT_RATES, the GEMM slowed by short spans (each
    block, and each piece of one that a snapshot count cuts, at k / (k + H) of peak)."""
    r = DEFAULT_RATES
    spans = len(token_spans(n_tokens, cand["block"], counts))
    na, nb = cand["n_ref"], sum(p.n_other for p in pairs)
    gemm = 2.0 * (n_tokens + GEMM_HALF_EFFICIENCY_ROWS * spans) * na * nb / \
        r.gemm_flops_per_s
    elements = n_tokens * (na * len(cand["groups"]) + nb * cand["n_panels"])
    if stream is not None:
        fwd = _forward_flops(stream, len(cand["groups"]), cand["n_panels"],
                             cand.get("self_fused", False))
        return gemm + elements / r.centre_elements_per_s + fwd / r.forward_flops_per_s
    return gemm + elements / r.centre_elements_per_s + 2.0 * elements / r.read_bytes_per_s


def _forward_flops(stream: StreamShape, n_groups: int, n_panels: int,
                   self_fused: bool = False) -> float:
    ref_passes, *others = stream.passes(*forward_passes(
        n_groups, n_panels, len(stream.flops_others), self_fused))
    return stream.positions * (stream.flops_ref * ref_passes
                               + sum(f * n for f, n in zip(stream.flops_others, others)))


def _too_small(memory, pairs, n_tokens, chunk, shape) -> str:
    """The error for a budget that holds no plan, with the smallest that does."""
    cap = math.ceil(n_tokens / chunk) * chunk
    block = min(chunk, cap)
    need = _required(1, [[i] for i in range(len(pairs))], pairs, block, shape)
    need_gb = math.ceil(need / 1e7) / 100  # rounded up: never the budget just refused
    return (f"memory budget {memory} is too small for the reduce (needs at least "
            f"{need_gb:.2f} GB: one reference row against the widest other model, "
            f"its self co-moments and the overhead); raise --memory")


def _build(cand, pairs, n_tokens, memory_bytes, shape, blocks_per_segment) -> ReducePlan:
    n_ref, rows = shape["n_ref"], cand["rows"]
    panels = [(s, min(n_ref, s + rows)) for s in range(0, n_ref, rows)]
    plan = ReducePlan(
        n_tokens=n_tokens, n_ref=n_ref, pairs=pairs, device=shape["device"],
        precision=shape["precision"], memory_bytes=memory_bytes, block_tokens=cand["block"],
        store_chunk_rows=shape["chunk"], groups=cand["groups"], panels=panels,
        n_chains=shape["chains"], blocks_per_segment=1, baseline_draws=shape["draws"],
        keep_covariance=shape["keep_covariance"])
    stream = shape.get("stream")
    if stream is not None:
        plan.source, plan.stream = "stream", stream
        plan.self_fused = bool(shape.get("self_fused"))
        plan.forward_flops = _forward_flops(stream, len(plan.groups), len(panels),
                                            plan.self_fused)
        passes = stream.passes(*forward_passes(len(plan.groups), len(panels), len(pairs),
                                               plan.self_fused))
        labels = stream.labels or ("reference", *(p.other_label for p in pairs))
        plan.forward_passes = dict(zip(labels, passes))
    plan.blocks_per_segment = blocks_per_segment or _segment_blocks(plan)
    peaks = {}
    for grp in plan.groups:
        for kind, b in task_bytes(_cut(rows, grp, pairs, plan.block_tokens, shape)).items():
            peaks[kind] = max(peaks.get(kind, 0), b)
    plan.task_peaks = peaks
    plan.peak_bytes = max(peaks.values())
    plan.required_bytes = with_margin(plan.peak_bytes)
    plan.bytes_read = _bytes_read(plan)
    plan.snapshots = shape.get("snapshots", 0)  # their finalizes are in the FLOPs
    plan.snapshot_counts = tuple(shape.get("snapshot_counts", ()))
    plan.flops_by_kind = _flops_by_kind(plan)
    plan.flops = sum(plan.flops_by_kind.values())
    plan.work_disk_bytes = _work_disk_bytes(plan)
    plan.output_bytes = _output_bytes(plan)
    if len(plan.groups) > 1:
        plan.notes.append(f"{len(plan.groups)} passes over the reference: not all pairs' "
                          "accumulators fit at once")
    if len(panels) > 1:
        plan.notes.append(f"{len(panels)} row panels: a full-width accumulator does not fit; "
                          + ("each model is forwarded again per panel" if stream else
                             "each other store is read once per panel"))
    if plan.self_fused:
        plan.notes.append("the other models' self co-moments are folded in the first "
                          "panel's pass, from its forward passes (no pass of their own)")
    return plan


# FLOPs between two checkpoints of an accumulator: minutes of work on either device
# (a GPU is ~1000x a CPU: at 2e13 FLOP an H100 would write its 22 GB of accumulators
# every 0.1 s of GEMMs)
SEGMENT_FLOPS = {"cpu": 2e13, "cuda": 1e16}


def _segment_blocks(plan: ReducePlan) -> int:
    """Checkpoint an accumulator about every SEGMENT_FLOPS (minutes of work) or 8 blocks,
    whichever comes later, so saving it costs a small fraction of the work."""
    rows = plan.panels[0][1] - plan.panels[0][0]
    per_block = 2.0 * plan.block_tokens * rows * sum(p.n_other for p in plan.pairs)
    target = SEGMENT_FLOPS["cuda" if str(plan.device).startswith("cuda") else "cpu"]
    return max(1, min(max(8, int(target / max(per_block, 1.0))), plan.n_blocks))


def _bytes_read(plan: ReducePlan) -> int:
    """Store bytes read: the reference's panels once per group, each other store once
    per panel and once more for its self co-moments (none for a stream)."""
    if plan.source == "stream":
        return 0
    total = 0
    for grp in plan.groups:
        for a, b in plan.panels:
            total += plan.n_tokens * (b - a) * 2
            total += sum(plan.n_tokens * plan.pairs[i].n_other * 2 for i in grp)
    total += sum(plan.n_tokens * p.n_other * 2 for p in plan.pairs)
    return total


def _flops_by_kind(plan: ReducePlan) -> dict:
    """Useful FLOPs: the cross GEMMs 2 n Na Nb, the self co-moments 2 n Nb d, the
    baseline's C_l R_l'^T 2 Na Nb d per draw, and its rotated scales R S R^T 2 Nb d^2 per
    draw (once per draw and layer for the whole reduce). Each convergence snapshot
    (plan.snapshots) finalizes the running accumulators once more: its baseline and
    rotated scales again ("snapshot")."""
    n, na, k = plan.n_tokens, plan.n_ref, plan.baseline_draws
    out = {"cross": 0.0, "self": 0.0, "baseline": 0.0, "scales": 0.0}
    for p in plan.pairs:
        out["cross"] += 2.0 * n * na * p.n_other
        out["self"] += 2.0 * n * p.n_other * p.d_other
        out["baseline"] += k * 2.0 * na * p.n_other * p.d_other
        out["scales"] += k * 2.0 * p.n_other * p.d_other ** 2
    if getattr(plan, "snapshots", 0):
        out["snapshot"] = plan.snapshots * (out["baseline"] + out["scales"])
    return out


def _acc_file_bytes(plan: ReducePlan, grp: list, rows: int) -> int:
    ab = 8 if plan.precision == "fp64" else 4
    return sum(rows * plan.pairs[i].n_other * ab + 32 * plan.pairs[i].n_other
               for i in grp) + 32 * rows


def _work_disk_bytes(plan: ReducePlan) -> int:
    """Peak bytes of the work directory: every other model's self co-moments and scales,
    the rotations, every panel's final file (kept for the assembly), and the fold
    checkpoints in flight. One chain: a panel's checkpoint (rewritten beside its old
    copy) only when it has more than one segment (its last is finalized from memory),
    and a finished panel's checkpoints are removed. Several chains (a cluster): every
    panel's chain checkpoints and merged file may coexist."""
    rows = plan.panel_rows
    k = plan.baseline_draws
    selfs = sum((p.n_other // p.d_other) * p.d_other ** 2 * 8 + 16 * p.n_other
                for p in plan.pairs)
    biggest_self = max((p.n_other // p.d_other) * p.d_other ** 2 * 8 for p in plan.pairs)
    widths = {p.d_other: p.n_other // p.d_other for p in plan.pairs}
    rotations = sum(k * layers * d * d * 4 for d, layers in widths.items())
    scales = sum(k * p.n_other * 8 for p in plan.pairs)
    finals = sum(plan.n_ref * (64 + 8 * k) + 16 * p.n_other * len(plan.panels)
                 + (plan.n_ref * p.n_other * 4 if plan.keep_covariance else 0)
                 for p in plan.pairs)
    fold = max(_acc_file_bytes(plan, grp, rows) for grp in plan.groups)
    if plan.self_fused:  # the first panel's checkpoints hold its group's self co-moments
        fold += max(sum((plan.pairs[i].n_other // plan.pairs[i].d_other)
                        * plan.pairs[i].d_other ** 2 * 8 + 16 * plan.pairs[i].n_other
                        for i in grp) for grp in plan.groups)
    if plan.n_chains == 1:
        in_flight = 2 * fold if _segments(plan) > 1 else 0
    else:
        in_flight = len(plan.panels) * (plan.n_chains + 1) * fold + fold
    return selfs + biggest_self + rotations + scales + finals + in_flight


def _segments(plan: ReducePlan) -> int:
    """Checkpoint segments of one chain."""
    return math.ceil(math.ceil(plan.n_blocks / plan.n_chains) / plan.blocks_per_segment)


def _output_bytes(plan: ReducePlan) -> int:
    """Bytes of the pair files."""
    out = 0
    for p in plan.pairs:
        out += (p.n_other // p.d_other) * p.d_other ** 2 * 8 + 24 * (plan.n_ref + p.n_other)
        out += plan.baseline_draws * plan.n_ref * 4 + 12 * (plan.n_ref + p.n_other)
        if plan.keep_covariance:
            out += plan.n_ref * p.n_other * 4
    return out


# --------------------------------------------------------------------------- time

GEMM_HALF_EFFICIENCY_ROWS = 256  # a GEMM of k inner rows runs at k / (k + 256) of peak


@dataclass(frozen=True)
class Rates:
    """The machine's rates the time model uses (measure_rates measures them)."""
    gemm_flops_per_s: float = 1e11       # the fold's strip update at the plan's shape
    baseline_flops_per_s: float = 0.0    # the baseline's GEMMs (the run's precision);
                                         # 0: the same as gemm_flops_per_s
    centre_elements_per_s: float = 4e8   # fp16 -> centred compute dtype (two passes)
    tile_elements_per_s: float = 8e8     # normalise + row/col max over a co-moment tile
    disk_bytes_per_s: float = 1e9        # checkpoints written (fsynced) and read back
    read_bytes_per_s: float = 2e9        # store pages read (page cache or disk)
    normals_per_s: float = 1e8           # numpy standard normals (the rotations)
    forward_flops_per_s: float = 2e10    # hooked forward passes (a stream; extract)
    hash_bytes_per_s: float = 7e8        # sha256 on one thread (verifying what is read)
    measured: tuple = ()                 # which of the above were measured now
    per_cpu_s: dict = field(default_factory=dict)  # the same per CPU-second of the process
    threads: int = 0                     # threads the reduce's GEMMs run on (torch's)
    cores_now: float = 0.0               # cores the process got while its GEMMs were
                                         # measured (CPU-s / wall s, <= threads); 0: the
                                         # wall rates above are used as they are


DEFAULT_RATES = Rates()


# phases of expected_seconds that run on one thread (numpy's normals); the GEMMs, the
# centring and the tile max run on all of the reduce's threads; reads, checkpoints, the
# output and forward passes are timed by their wall rates
SINGLE_THREAD_PHASES = ("rotations", "verify")
CPU_PHASES = ("gemm", "baseline_gemm", "centre", "tile_max", "rotations", "verify")


def expected_seconds(plan: ReducePlan, rates: Rates | None = None,
                     per_cpu: bool = False) -> dict:
    """{phase: seconds} the reduce is expected to take at `rates` (one worker; chains
    on a cluster divide the fold phases), and "total". With `per_cpu`, CPU-seconds of
    the process, from rates.per_cpu_s where measured (disk and reads stay wall time).

    Wall time, when the rates say how many cores the process got while they were
    measured (rates.cores_now, measure_rates): each compute phase's CPU-seconds over
    the cores it can use now, min(its threads, cores_now) (one thread for
    SINGLE_THREAD_PHASES), so the estimate is of this machine as loaded now, not of
    whatever load each short measurement happened to meet; without, the wall rates."""
    rates = rates or DEFAULT_RATES
    if per_cpu:
        return _phase_seconds(plan, replace(rates, **rates.per_cpu_s))
    if not (rates.cores_now > 0 and rates.per_cpu_s):
        return _phase_seconds(plan, rates)
    out = _phase_seconds(plan, replace(rates, **rates.per_cpu_s))
    for name in CPU_PHASES:
        threads = 1 if name in SINGLE_THREAD_PHASES else max(1, rates.threads)
        out[name] /= max(1e-3, min(threads, rates.cores_now))
    out["total"] = sum(v for k, v in out.items() if k != "total")
    return out


def _phase_seconds(plan: ReducePlan, rates: Rates) -> dict:
    """{phase: seconds} at `rates` taken as they are (wall or CPU), and "total"."""
    n, k = plan.n_tokens, plan.baseline_draws
    nb_all = sum(p.n_other for p in plan.pairs)
    chains = max(1, plan.n_chains)
    kinds = plan.flops_by_kind
    base_rate = rates.baseline_flops_per_s or rates.gemm_flops_per_s
    # the rate is measured at whole blocks; the spans snapshot counts cut run slower
    cut = span_efficiency(n, plan.block_tokens, getattr(plan, "snapshot_counts", ()))
    out = {"gemm": (kinds.get("cross", 0.0) / chains + kinds.get("self", 0.0)) * cut
           / rates.gemm_flops_per_s,
           "baseline_gemm": (kinds.get("baseline", 0.0) + kinds.get("scales", 0.0)
                             + kinds.get("snapshot", 0.0)) / base_rate}
    # the others are centred once per panel, and once more by their own self pass unless
    # the fold folds their self co-moments too (stream, one chain)
    centred = n * (plan.n_ref * len(plan.groups)
                   + nb_all * (len(plan.panels) + (0 if plan.self_fused else 1)))
    out["centre"] = centred / rates.centre_elements_per_s / chains
    out["read"] = plan.bytes_read / rates.read_bytes_per_s / chains
    out["tile_max"] = plan.n_ref * nb_all * (1 + plan.snapshots) / rates.tile_elements_per_s
    out["checkpoints"] = _checkpoint_bytes(plan) / rates.disk_bytes_per_s
    out["output"] = plan.output_bytes / rates.disk_bytes_per_s  # the pair files
    widths = {p.d_other: p.n_other // p.d_other for p in plan.pairs}
    out["rotations"] = sum(k * layers * d * d for d, layers in widths.items()) / \
        rates.normals_per_s
    if plan.forward_flops:
        out["forward"] = plan.forward_flops / rates.forward_flops_per_s / chains
    out["verify"] = verify_bytes(plan) / rates.hash_bytes_per_s / chains
    out["total"] = sum(out.values())
    return out


def verify_bytes(plan: ReducePlan) -> int:
    """Bytes the reduce hashes to verify what it reads and writes: each store block once
    per process as it is first read (formats/store.py; a stream reads no store), and
    each pair file twice when it is committed (its sha256, then its per-dataset digests
    read back: formats/reduced.py)."""
    stores = 0 if plan.source == "stream" else \
        plan.n_tokens * 2 * (plan.n_ref + sum(p.n_other for p in plan.pairs))
    return stores + 2 * plan.output_bytes


def _checkpoint_bytes(plan: ReducePlan) -> int:
    """Bytes written and read back through the work dir: each fold segment's
    accumulators (a single chain's last is finalized from memory; several chains are
    written, merged, written and read back), the self co-moments (each segment, and
    read by the scales and the assembly)."""
    rows = plan.panel_rows
    segments = _segments(plan)
    folds = sum(_acc_file_bytes(plan, grp, rows) for grp in plan.groups) * len(plan.panels)
    folds *= segments - 1 if plan.n_chains == 1 else plan.n_chains * (segments + 1) + 2
    self_segments = math.ceil(plan.n_blocks / plan.blocks_per_segment)
    selfs = sum((p.n_other // p.d_other) * p.d_other ** 2 * 8 for p in plan.pairs)
    return folds + selfs * (self_segments + 2)


def describe(plan: ReducePlan, rates: "Rates | float | None" = None) -> str:
    """Human-readable plan for --dry-run. `rates`: measured Rates, or a GEMM rate in
    FLOP/s (the other rates then default), or None (no time estimate)."""
    from ooc_universal.rundir import human_bytes
    kinds = ", ".join(f"{k} {v:.3g}" for k, v in plan.flops_by_kind.items())
    peaks = ", ".join(f"{k} {human_bytes(v)}" for k, v in
                      sorted(plan.task_peaks.items(), key=lambda kv: -kv[1]))
    lines = [
        f"reduce plan: {plan.n_tokens:,} tokens x {plan.n_ref:,} reference neurons, "
        f"{len(plan.pairs)} pair(s), device {plan.device}, precision {plan.precision}"
        + (", blocks from forward passes (stream)" if plan.source == "stream" else ""),
        f"  token block   {plan.block_tokens:,} rows ({plan.n_blocks:,} blocks"
        f"{_cut_text(plan)}; checkpoint every {plan.blocks_per_segment} blocks)",
        f"  groups        {len(plan.groups)} pass(es): {plan.groups}",
        f"  panels        {len(plan.panels)} of ~{plan.panel_rows:,} rows",
        f"  chains        {plan.n_chains} per (group, panel); fold tasks {plan.n_fold_tasks}",
        f"  passes        reference {plan.passes()['reference']:.2f}, others "
        + ", ".join(f"{k}: {v}" for k, v in plan.passes()["others"].items()),
        f"  bytes read    {human_bytes(plan.bytes_read)}" if plan.source != "stream" else
        f"  forwards      {plan.forward_flops:.3g} FLOP: passes "
        + ", ".join(f"{k}: {v}" for k, v in plan.forward_passes.items())
        + f"; models held {human_bytes(plan.stream.resident_bytes)}",
        f"  FLOPs         {plan.flops:.3g} ({kinds})",
        f"  peak memory   {human_bytes(plan.peak_bytes)} per worker, "
        f"{human_bytes(plan.required_bytes)} with the {100 * SAFETY_FRACTION:.0f}% + "
        f"{human_bytes(SCRATCH_BYTES)} margin (budget {human_bytes(plan.memory_bytes)}); "
        f"by task: {peaks}",
        f"  disk          work directory up to {human_bytes(plan.work_disk_bytes)}, "
        f"outputs {human_bytes(plan.output_bytes)}",
    ]
    if rates:
        rates = rates if isinstance(rates, Rates) else Rates(gemm_flops_per_s=float(rates),
                                                             measured=("gemm",))
        secs = expected_seconds(plan, rates)
        parts = ", ".join(f"{k} {_hms(v)}" for k, v in secs.items() if k != "total" and v)
        measured = ", ".join(rates.measured) or "none"
        base = rates.baseline_flops_per_s or rates.gemm_flops_per_s
        fwd = (f", forward passes at {rates.forward_flops_per_s / 1e9:.0f} GFLOP/s"
               if plan.forward_flops else "")
        cores = (f"; {rates.cores_now:.2g} of its {rates.threads} threads' cores free "
                 f"now (CPU-time {_hms(expected_seconds(plan, rates, per_cpu=True)['total'])})"
                 if rates.cores_now > 0 and rates.per_cpu_s else "")
        lines.append(f"  expected time {_hms(secs['total'])} at "
                     f"{rates.gemm_flops_per_s / 1e9:.0f} GFLOP/s ({base / 1e9:.0f} for the "
                     f"baseline{fwd}; {parts}{cores}; measured now: {measured})"
                     + (f" per worker x {plan.n_chains}" if plan.n_chains > 1 else ""))
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the source

@dataclass(frozen=True)
class SourceOption:
    """One way to feed the reduce its blocks, costed: `seconds` wall time expected for
    the reduce and what it needs first (writing stores), `disk_bytes` the disk it needs
    beyond what is used now, `memory_bytes` the budget one worker needs (RAM; device
    memory on a GPU), `parts` {term: seconds}; `unavailable` says why it cannot run."""
    source: str
    seconds: float
    disk_bytes: int
    memory_bytes: int
    parts: dict = field(default_factory=dict)
    unavailable: str = ""


def stream_option(plan: ReducePlan, rates: Rates) -> SourceOption:
    """Forward passes at rates.forward_flops_per_s (every pass of plan.forward_passes)
    plus the reduce's own phases; disk: the work directory and the outputs only."""
    secs = expected_seconds(plan, rates)
    forward = secs.get("forward", 0.0)
    return SourceOption("stream", secs["total"], plan.work_disk_bytes + plan.output_bytes,
                        plan.required_bytes,
                        {"forward": forward, "reduce": secs["total"] - forward})


def store_option(plan: ReducePlan, rates: Rates, *, write_bytes: int = 0,
                 extract_flops: float = 0.0, unavailable: str = "") -> SourceOption:
    """Writing `write_bytes` of stores once (extract: its forward passes, extract_flops
    at rates.forward_flops_per_s, overlap its writes at rates.disk_bytes_per_s, so the
    slower counts) and reading plan.bytes_read back at rates.read_bytes_per_s; 0 and 0
    when the stores are there already. Disk: the stores written, the work directory,
    the outputs."""
    secs = expected_seconds(plan, rates)
    extract = max(extract_flops / rates.forward_flops_per_s,
                  write_bytes / rates.disk_bytes_per_s)
    read = secs.get("read", 0.0)
    return SourceOption("store", extract + secs["total"],
                        write_bytes + plan.work_disk_bytes + plan.output_bytes,
                        plan.required_bytes,
                        {"extract": extract, "read": read, "reduce": secs["total"] - read},
                        unavailable)


def choose_source(options: list, free_disk: int | None = None) -> tuple[SourceOption, str]:
    """(the option chosen, why): the fastest of those available whose disk fits
    `free_disk` (None: no limit). OocError when none can run."""
    from ooc_universal.rundir import human_bytes
    usable = [o for o in options if not o.unavailable]
    fits = [o for o in usable if free_disk is None or o.disk_bytes <= free_disk]
    if not fits:
        why = "; ".join(f"{o.source}: {o.unavailable}" if o.unavailable else
                        f"{o.source} needs {human_bytes(o.disk_bytes)} of disk, "
                        f"{human_bytes(free_disk or 0)} free" for o in options)
        raise OocError(f"no block source can run here ({why}); free disk space, lower the "
                       "token count, or make the stores available")
    best = min(fits, key=lambda o: (o.seconds, o.source != "store"))
    others = [o for o in options if o is not best]
    reasons = []
    for o in others:
        if o.unavailable:
            reasons.append(f"{o.source} cannot run: {o.unavailable}")
        elif o not in fits:
            reasons.append(f"{o.source} needs {human_bytes(o.disk_bytes)} of disk, only "
                           f"{human_bytes(free_disk)} free")
        else:
            reasons.append(f"expected {_hms(best.seconds)} against {_hms(o.seconds)} "
                           f"with {o.source}")
    return best, "; ".join(reasons) or "the only option"


def describe_options(options: list, chosen: SourceOption, reason: str,
                     device: str = "cpu", given: str = "auto") -> str:
    """The dry run's comparison of the sources: time, disk, memory of each, the choice
    (`given`: the --source it was made under)."""
    from ooc_universal.rundir import human_bytes
    where = "device memory" if str(device).startswith("cuda") else "memory"
    lines = [f"block source (--source {given}): both options"]
    for o in options:
        if o.unavailable:
            lines.append(f"  {o.source:<7} not available: {o.unavailable}")
            continue
        parts = ", ".join(f"{k} {_hms(v)}" for k, v in o.parts.items() if v)
        lines.append(f"  {o.source:<7} expected {_hms(o.seconds)} ({parts}); disk "
                     f"{human_bytes(o.disk_bytes)}; {where} {human_bytes(o.memory_bytes)} "
                     "per worker")
    lines.append(f"  chosen: {chosen.source} ({reason})")
    return "\n".join(lines)


def _hms(secs: float) -> str:
    if secs < 120:
        return f"{secs:.1f} s"
    if secs < 7200:
        return f"{secs / 60:.1f} min"
    if secs < 3 * 86400:
        return f"{secs / 3600:.1f} h"
    return f"{secs / 86400:.1f} days"


# --------------------------------------------------------------------------- rates

def gemm_shape(plan: ReducePlan, cap: int = 2048) -> tuple[int, int, int]:
    """(inner, rows, cols) of the reduce's strip GEMM: (block x panel rows)^T (block x d),
    the rows capped so a measurement takes a fraction of a second."""
    d = max(p.d_other for p in plan.pairs)
    return plan.block_tokens, min(plan.panel_rows, cap), min(d, cap)


def baseline_shape(plan: ReducePlan, cap: int = 2048) -> tuple[int, int, int]:
    """(inner, rows, cols) of the baseline's strip GEMM C_strip R'^T: (d, strip, d)."""
    d = max(p.d_other for p in plan.pairs)
    return d, min(BASELINE_ROW_STRIP, plan.panel_rows, cap), d


def measure_gemm_rate(device="cpu", precision="fp32", size=1024, seconds=0.5, *,
                      shape: tuple | None = None) -> float:
    """torch.matmul FLOP/s on this machine, now, for the reduce's dtype, of the product
    (k x m)^T (k x n), shape = (k, m, n) (default (2 size, size, size))."""
    return measure_gemm(device, precision, shape or (2 * size, size, size), seconds)["wall"]


def measure_gemm(device, precision, shape: tuple, seconds: float = 0.5) -> dict:
    """{"wall": FLOP/s, "cpu": FLOP per CPU-second of this process} of torch.matmul(a,
    b), a (m, k), b (k, n) row-major with (k, m, n) = shape (the reduce's (k x m)^T
    (k x n)), in the reduce's dtype, here, now."""
    import time

    import torch
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[precision]
    k, m, n = (int(v) for v in shape)
    a = torch.randn(m, k, device=device).to(dtype)  # row-major operands: the fastest
    b = torch.randn(k, n, device=device).to(dtype)  # layout (bf16 on a CPU: 2x a^T b)
    torch.matmul(a, b)
    synchronize(device)   # the warm-up is not timed
    reps, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        torch.matmul(a, b)
        reps += 1
        synchronize(device)
        if time.perf_counter() - t0 > seconds and reps >= 2:
            break
    flops = reps * 2.0 * k * m * n
    return _rate_dict(flops, time.perf_counter() - t0, time.process_time() - c0)


def _rate_dict(work: float, wall: float, cpu: float) -> dict:
    """{"wall", "cpu"}: work per wall second and per CPU-second of the process, and the
    seconds ("seconds", "cpu_seconds") they were measured over."""
    wall, cpu = max(wall, 1e-9), max(cpu, 1e-9)
    return {"wall": work / wall, "cpu": work / cpu, "seconds": wall, "cpu_seconds": cpu}


def measure_rates(plan: ReducePlan, work_dir=None, seconds: float = 1.0) -> Rates:
    """The rates of expected_seconds, measured now at the plan's own shapes: the fold's
    strip update (its GEMM, as the reduce runs it), the baseline's strip GEMM, centring a
    block strip, the tile max, drawing normals, and (given a directory) writing and
    fsyncing a checkpoint-sized file there."""
    gemm = measure_strip_update(plan, seconds)
    base = measure_gemm(plan.device, plan.precision, baseline_shape(plan), seconds)
    wall = {"gemm_flops_per_s": gemm["wall"], "baseline_flops_per_s": base["wall"]}
    cpu = {"gemm_flops_per_s": gemm["cpu"], "baseline_flops_per_s": base["cpu"]}
    measured = ["strip update", "baseline gemm"]
    threads, cores = _cores_now(plan.device, (gemm, base))
    if cores:
        wall.update(threads=threads, cores_now=cores)
        measured.append("cores")
    try:
        for key, (w, c) in _kernel_rates(plan).items():
            wall[key], cpu[key] = w, c
        measured += ["centring", "tile max", "normals", "sha256"]
    except Exception:  # noqa: BLE001 - a rate that cannot be measured keeps its default
        pass
    if work_dir is not None:
        disk = _disk_rate(work_dir)
        if disk:
            wall["disk_bytes_per_s"] = disk
            measured.append("disk")
    return Rates(**wall, measured=tuple(measured), per_cpu_s=cpu)


def _cores_now(device, measurements) -> tuple[int, float]:
    """(threads the reduce's GEMMs use, cores this process got while they ran: its
    CPU-seconds over the wall seconds of `measurements`, at most the threads); (0, 0.0)
    off the CPU, where CPU-seconds say nothing of the device's speed."""
    if str(device) != "cpu":
        return 0, 0.0
    import torch
    threads = max(1, torch.get_num_threads())
    wall = sum(m["seconds"] for m in measurements)
    cpu = sum(m["cpu_seconds"] for m in measurements)
    return threads, round(min(float(threads), cpu / max(wall, 1e-9)), 3)


def measure_strip_update(plan: ReducePlan, seconds: float = 1.0) -> dict:
    """{"wall", "cpu"} FLOP/s of the fold's own inner step at the plan's strip shape
    (kernels.comoments.comoment_strip_update_: the GEMM, its Chan row and, in bf16, the
    product's addition to the fp32 accumulator), repeated for `seconds`."""
    import time

    import torch

    from ooc_universal.kernels.comoments import (centre_block, comoment_strip_update_,
                                                 empty_comoments, transpose_block)
    k, rows, d = gemm_shape(plan)
    dev, prec = plan.device, plan.precision
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[prec]
    ws = {}
    cx = centre_block(torch.randn(k, rows, device=dev).half(), dtype, workspace=ws,
                      role="x", spare_row=True)
    cy = centre_block(torch.randn(k, d, device=dev).half(), dtype, workspace=ws,
                      role="y", spare_row=True)
    xt = transpose_block(cx, ws) if prec == "bf16" and dev == "cpu" else None
    acc = empty_comoments(rows, d, prec, dev)
    acc["n"] = k  # merge as a later block does

    def step():
        comoment_strip_update_(acc, cx, cy, 0, xt=xt, workspace=ws)
    step()
    synchronize(dev)
    reps, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        step()
        reps += 1
        synchronize(dev)
        if time.perf_counter() - t0 > seconds and reps >= 2:
            break
    flops = reps * 2.0 * k * rows * d
    return _rate_dict(flops, time.perf_counter() - t0, time.process_time() - c0)


def _timed(fn, work: float, device="cpu") -> tuple[float, float]:
    """(work per wall second, work per CPU-second of this process) of one call (on a GPU
    from an idle queue to the end of its kernels: a launch alone is not the work)."""
    import time
    synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return (work / max(time.perf_counter() - t0, 1e-9),
            work / max(time.process_time() - c0, 1e-9))


def _kernel_rates(plan: ReducePlan) -> dict:
    """{rate name: (per wall second, per CPU-second)} of centring a block strip, the tile
    max over a co-moment tile and drawing normals, at the plan's shapes (capped)."""
    import hashlib

    import numpy as np
    import torch

    from ooc_universal.kernels.comoments import centre_block
    from ooc_universal.kernels.tilemax import tile_max
    prec = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
    k, rows, d = gemm_shape(plan, cap=1024)
    x = torch.randn(k, d).half().to(plan.device)
    ws = {}

    def centre():
        centre_block(x, prec[plan.precision], workspace=ws, spare_row=True)
    centre()  # buffers, numba load
    c = np.random.default_rng(0).standard_normal((rows, 4 * d)).astype(np.float32)
    if plan.device.startswith("cuda"):   # the finalize's tile max runs where C is
        c = torch.from_numpy(c).to(plan.device)
    ones = np.ones(rows), np.ones(4 * d)
    tile_max(c[:8, :8], ones[0][:8], ones[1][:8])
    rng = np.random.default_rng(0)
    blob = rng.bytes(16 << 20)
    return {"centre_elements_per_s": _timed(centre, x.numel(), plan.device),
            "tile_elements_per_s": _timed(lambda: tile_max(c, *ones), rows * 4 * d,
                                          plan.device),
            "normals_per_s": _timed(lambda: rng.standard_normal(2_000_000), 2e6),
            "hash_bytes_per_s": _timed(lambda: hashlib.sha256(blob).digest(), len(blob))}


def disk_rates(directory, disk_gbps: float = 0.0) -> tuple[float, float, str]:
    """(write, read) bytes/s of the disk under `directory`, and how they were obtained:
    the stated bandwidth (`disk_gbps` GB/s, both ways) or measured now (a fsynced
    write, then a read with the file's pages dropped from the cache)."""
    if disk_gbps and disk_gbps > 0:
        return disk_gbps * 1e9, disk_gbps * 1e9, f"stated {disk_gbps:g} GB/s"
    write = _disk_rate(directory) or DEFAULT_RATES.disk_bytes_per_s
    read = _disk_read_rate(directory) or DEFAULT_RATES.read_bytes_per_s
    return write, read, "measured"


def _disk_read_rate(directory, nbytes: int = 64 << 20) -> float | None:
    """Bytes/s of reading back `nbytes` written and fsynced in `directory`, its pages
    dropped from the page cache first (POSIX_FADV_DONTNEED); None if it fails."""
    import os
    import tempfile
    import time
    try:
        fd, path = tempfile.mkstemp(prefix=".disk-read-", dir=directory)
    except OSError:
        return None
    try:
        block = os.urandom(1 << 20)
        for _ in range(nbytes >> 20):
            os.write(fd, block)
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.lseek(fd, 0, os.SEEK_SET)
        t0, got = time.perf_counter(), 0
        while got < nbytes:
            chunk = os.read(fd, 8 << 20)
            if not chunk:
                break
            got += len(chunk)
        return got / max(time.perf_counter() - t0, 1e-9)
    except OSError:
        return None
    finally:
        os.close(fd)
        os.unlink(path)


def _disk_rate(directory, nbytes: int = 64 << 20) -> float | None:
    """Bytes/s of writing `nbytes` and fsyncing it in `directory` (None if it fails)."""
    import os
    import tempfile
    import time
    try:
        fd, path = tempfile.mkstemp(prefix=".disk-rate-", dir=directory)
    except OSError:
        return None
    try:
        block = os.urandom(1 << 20)
        t0 = time.perf_counter()
        for _ in range(nbytes >> 20):
            os.write(fd, block)
        os.fsync(fd)
        return nbytes / max(time.perf_counter() - t0, 1e-9)
    except OSError:
        return None
    finally:
        os.close(fd)
        os.unlink(path)
