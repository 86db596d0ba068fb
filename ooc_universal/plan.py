"""Block and tile sizes for the reduce, from shapes, the memory budget and the device.

The reduce keeps one co-moment accumulator (rows of the reference x all neurons of the
other model) per pair. A *group* is a set of pairs reduced in one pass over the token
blocks (the reference block is read and converted once for all of them); a *panel* is a
range of reference rows (used only when a full-width accumulator does not fit). Total
bytes read = passes * (reference panel + the group's other stores), so the planner picks
the (group size, panel count) with the fewest bytes read that fits the budget.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from ooc_universal.errors import OocError

OVERHEAD_BYTES = 600 * 10**6  # interpreter, torch, numba, dask: measured RSS before work
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


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


@dataclass
class ReducePlan:
    n_tokens: int
    n_ref: int
    pairs: list                 # [PairShape]
    device: str
    precision: str
    memory_bytes: int
    block_tokens: int           # token rows per GEMM (a multiple of the store chunk rows)
    store_chunk_rows: int
    groups: list                # [[pair index, ...]] reduced together in one pass
    panels: list                # [(row start, row stop)] over reference neurons
    n_chains: int               # token ranges reduced in parallel per (group, panel)
    blocks_per_segment: int     # blocks between on-disk checkpoints of an accumulator
    baseline_draws: int
    keep_covariance: bool
    peak_bytes: int = 0
    bytes_read: int = 0
    flops: float = 0.0
    notes: list = field(default_factory=list)

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.n_tokens / self.block_tokens)

    def block_bounds(self, b: int) -> tuple[int, int]:
        return b * self.block_tokens, min(self.n_tokens, (b + 1) * self.block_tokens)

    def chain_blocks(self, chain: int) -> range:
        """The contiguous range of blocks that chain `chain` folds."""
        per = math.ceil(self.n_blocks / self.n_chains)
        return range(chain * per, min(self.n_blocks, (chain + 1) * per))

    @property
    def n_fold_tasks(self) -> int:
        return len(self.groups) * len(self.panels) * self.n_chains

    def passes(self) -> dict:
        """Passes over each store (a panel pass over the reference counts its fraction)."""
        ref = sum((b - a) / self.n_ref for a, b in self.panels) * len(self.groups)
        other = {self.pairs[i].other_label: len(self.panels) for g in self.groups for i in g}
        return {"reference": ref, "others": other}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["n_blocks"] = self.n_blocks
        d["n_fold_tasks"] = self.n_fold_tasks
        d["passes"] = self.passes()
        return d


def _acc_bytes(precision: str) -> int:
    return 8 if precision == "fp64" else 4


def _peak(rows, n_others, n_ref, block, precision, d_others, draws, n_chains) -> int:
    """Peak bytes of one (group, panel) fold on one worker."""
    acc = _acc_bytes(precision)
    accum = sum(rows * nb * acc for nb in n_others) * (2 if n_chains > 1 else 1)
    if precision == "bf16":  # the CPU bf16 GEMM has no fp32 output: one block product
        accum += rows * max(n_others) * 4
    # fp32 block buffers (+ centred copies, + bf16 copies) for the panel and each other.
    # fp32 load buffers (panel + each other) and the kernels' centring workspace.
    buffers = 4 * block * (2 * rows + (len(n_others) + 2) * max(n_others))
    # self co-moments (f64): accumulator, block record and the merge's temporaries
    selfm = sum((nb // d) * d * d * 8 * 3 for nb, d in zip(n_others, d_others))
    finalize = min(rows, 4096) * max(d_others) * 8 * 3 + draws * n_ref * 4
    return OVERHEAD_BYTES + accum + buffers + selfm + finalize


def make_plan(n_tokens: int, n_ref: int, pairs: list, *, memory="4GB", device="cpu",
              precision="fp32", n_workers: int = 1, store_chunk_rows: int = 64,
              block_tokens: int | None = None, max_panels: int | None = None,
              baseline_draws: int = 1, keep_covariance: bool = False,
              blocks_per_segment: int | None = None) -> ReducePlan:
    """Choose groups, panels, block size and chains for `pairs` (list of PairShape).

    `n_workers` > 1 (a cluster) splits the tokens into that many chains per
    (group, panel), each on its own worker, merged at the end (Chan merge).
    `max_panels` forces more panels (tests, and 'memory halved' in the bench).
    """
    if n_tokens < 2:
        raise OocError(f"need at least 2 token positions to correlate, got {n_tokens}")
    if precision not in ("fp32", "bf16", "fp64"):
        raise OocError(f"unknown precision {precision!r}; expected fp32, bf16 or fp64")
    memory_bytes = parse_bytes(memory)
    n_others = [p.n_other for p in pairs]
    d_others = [p.d_other for p in pairs]
    chunk = max(1, int(store_chunk_rows))
    n_chains = max(1, int(n_workers))

    if block_tokens is not None:
        blocks = [max(chunk, (int(block_tokens) // chunk) * chunk)]
    else:
        # Big blocks keep the GEMM efficient; smaller ones leave room for accumulators.
        top = 8192 if str(device).startswith("cuda") else 4096
        blocks = sorted({max(chunk, (b // chunk) * chunk) for b in (top, top // 2, top // 4,
                                                                    top // 8)}, reverse=True)
    cap = math.ceil(n_tokens / chunk) * chunk
    blocks = [min(b, cap) for b in blocks]

    best = None
    n_pairs = len(pairs)
    panel_options = [max_panels] if max_panels else _panel_counts(n_ref)
    for n_panels in panel_options:
        rows = math.ceil(n_ref / n_panels)
        found = None
        for g in range(n_pairs, 0, -1):
            groups = [list(range(i, min(n_pairs, i + g))) for i in range(0, n_pairs, g)]
            for block in blocks:
                peak = max(_peak(rows, [n_others[i] for i in grp], n_ref, block, precision,
                                 [d_others[i] for i in grp], baseline_draws, n_chains)
                           for grp in groups)
                if peak <= memory_bytes:
                    found = (groups, block, peak)
                    break
            if found:
                break  # the largest group that fits is always best at this panel count
        if found is None:
            continue
        groups, block, peak = found
        reads = len(groups) + n_panels * n_pairs  # in store passes
        key = (reads, n_panels, -block)
        if best is None or key < best[0]:
            best = (key, groups, n_panels, peak, block)
        if n_panels == 1:
            break
    if best is None:
        min_peak = _peak(1, [max(n_others)], n_ref, chunk, precision, d_others,
                         baseline_draws, n_chains)
        raise OocError(
            f"memory budget {memory} is too small for one block of the reduce "
            f"(needs at least {min_peak / 1e9:.2f} GB); raise --memory")
    _, groups, n_panels, peak, block_tokens = best
    rows = math.ceil(n_ref / n_panels)
    panels = [(s, min(n_ref, s + rows)) for s in range(0, n_ref, rows)]

    plan = ReducePlan(
        n_tokens=n_tokens, n_ref=n_ref, pairs=pairs, device=device, precision=precision,
        memory_bytes=memory_bytes, block_tokens=block_tokens, store_chunk_rows=chunk,
        groups=groups, panels=panels, n_chains=n_chains, blocks_per_segment=1,
        baseline_draws=baseline_draws, keep_covariance=keep_covariance, peak_bytes=peak)
    plan.blocks_per_segment = blocks_per_segment or _segment_blocks(plan)
    plan.bytes_read = _bytes_read(plan)
    plan.flops = _flops(plan)
    if len(groups) > 1:
        plan.notes.append(f"{len(groups)} passes over the reference: not all pairs' "
                          "accumulators fit at once")
    if n_panels > 1:
        plan.notes.append(f"{n_panels} row panels: a full-width accumulator does not fit; "
                          "each other store is read once per panel")
    return plan


def _panel_counts(n_ref: int):
    """Panel counts to try, in order: 1, 2, 3, 4, 6, 8, ... (bounded list)."""
    seen, k = [], 1
    while k <= n_ref:
        seen.append(k)
        k = k + 1 if k < 4 else int(k * 1.5)
    return seen


def _segment_blocks(plan: ReducePlan) -> int:
    """Checkpoint an accumulator about every 2e13 FLOP (minutes on a CPU) or 8 blocks,
    whichever comes later, so saving it costs a small fraction of the work."""
    rows = plan.panels[0][1] - plan.panels[0][0]
    per_block = 2.0 * plan.block_tokens * rows * sum(p.n_other for p in plan.pairs)
    return max(1, min(max(8, int(2e13 / max(per_block, 1.0))), plan.n_blocks))


def _bytes_read(plan: ReducePlan) -> int:
    row_bytes_ref = plan.n_ref * 2
    total = 0
    for grp in plan.groups:
        for a, b in plan.panels:
            total += plan.n_tokens * (b - a) * 2
            total += sum(plan.n_tokens * plan.pairs[i].n_other * 2 for i in grp)
    del row_bytes_ref
    return total


def _flops(plan: ReducePlan) -> float:
    """Useful FLOPs: 2 n Na Nb per pair, the self co-moments and the baseline GEMMs."""
    n, na = plan.n_tokens, plan.n_ref
    f = 0.0
    for p in plan.pairs:
        f += 2.0 * n * na * p.n_other
        f += 2.0 * n * p.n_other * p.d_other                  # within-layer self co-moments
        f += plan.baseline_draws * 2.0 * na * p.n_other * p.d_other  # C_l R_l^T per draw
    return f


def describe(plan: ReducePlan, gemm_flops_per_s: float | None = None) -> str:
    """Human-readable plan for --dry-run."""
    from ooc_universal.rundir import human_bytes
    lines = [
        f"reduce plan: {plan.n_tokens:,} tokens x {plan.n_ref:,} reference neurons, "
        f"{len(plan.pairs)} pair(s), device {plan.device}, precision {plan.precision}",
        f"  token block   {plan.block_tokens:,} rows ({plan.n_blocks:,} blocks; "
        f"checkpoint every {plan.blocks_per_segment} blocks)",
        f"  groups        {len(plan.groups)} pass(es): {plan.groups}",
        f"  panels        {len(plan.panels)} of ~{plan.panels[0][1] - plan.panels[0][0]:,} rows",
        f"  chains        {plan.n_chains} per (group, panel); fold tasks {plan.n_fold_tasks}",
        f"  passes        reference {plan.passes()['reference']:.2f}, others "
        + ", ".join(f"{k}: {v}" for k, v in plan.passes()["others"].items()),
        f"  bytes read    {human_bytes(plan.bytes_read)}",
        f"  FLOPs         {plan.flops:.3g}",
        f"  peak memory   {human_bytes(plan.peak_bytes)} per worker "
        f"(budget {human_bytes(plan.memory_bytes)})",
    ]
    if gemm_flops_per_s:
        secs = plan.flops / gemm_flops_per_s / max(1, plan.n_chains)
        lines.append(f"  expected time {_hms(secs)} at the measured GEMM rate "
                     f"{gemm_flops_per_s / 1e9:.0f} GFLOP/s"
                     + (f" per worker x {plan.n_chains}" if plan.n_chains > 1 else ""))
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _hms(secs: float) -> str:
    if secs < 120:
        return f"{secs:.1f} s"
    if secs < 7200:
        return f"{secs / 60:.1f} min"
    if secs < 3 * 86400:
        return f"{secs / 3600:.1f} h"
    return f"{secs / 86400:.1f} days"


def measure_gemm_rate(device="cpu", precision="fp32", size=1024, seconds=0.5) -> float:
    """torch.matmul FLOP/s on this machine, now, for the reduce's dtype (the peak)."""
    import time

    import torch
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[precision]
    a = torch.randn(size * 2, size, device=device).to(dtype)
    b = torch.randn(size * 2, size, device=device).to(dtype)
    torch.matmul(a.T, b)
    reps, t0 = 0, time.perf_counter()
    while True:
        torch.matmul(a.T, b)
        reps += 1
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        if time.perf_counter() - t0 > seconds:
            break
    return reps * 2.0 * (2 * size) * size * size / (time.perf_counter() - t0)
