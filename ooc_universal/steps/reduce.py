"""The reduce step: co-moment statistics of a reference store against the other stores.

For a reference store and the other models' stores at one checkpoint it writes, per pair,
RUN/reduce/<ref>__<other>.h5 (formats/reduced.py has the layout): means and variances,
row and column max | argmax of the Pearson correlation over all neurons, the other
model's within-layer self co-moments, the rotation baseline's row maxima for K seeded
draws, and on request the cross co-moment matrix.

The blocks come from a block source (sources.py): the activation stores (--source
store), or forward passes of the models over the run's token set (--source stream: no
store is written or read; each pass over a model's blocks forwards it again, and the
plan counts those passes), or whichever plan.choose_source expects to be faster within
the free disk (--source auto). A stream's forward passes run in fp32 (sources.forward_autocast;
reduce(forward_precision="bf16") runs them in bf16 autocast). Outputs are the same either way (a streamed block equals
the stored block), so the source is not among the settings an output records.

The step validates its inputs, asks plan.make_plan how to cut the work within the
memory budget, builds the task graph below and hands it to graph.execute:

  self(i)            fold other model i's within-layer self co-moments over every token
                     block, once per command (not per panel or pair): its own pass,
                     layer by layer into a preallocated (L, d, d) f64 accumulator.
                     Fused (plan.self_fused: a stream of one chain): no pass of its
                     own; fold(g, 0, 0) folds them from the centred strips of the same
                     forward passes, keeps them in its checkpoints, and writes the self
                     and scales files before it finalizes; self(i) then only waits
                     for it (and makes the file itself if a damaged one was discarded)
  rotations(d)       draw the baseline's rotations of width d once (fp32, to the work dir)
  scales(i)          1/sqrt(diag(R S R^T)) of other model i, once per draw and layer
  fold(g, p, c)      fold the token blocks of chain c into the accumulators of group g,
                     panel p, one layer of each other model at a time (block reads
                     through the source, kernels/comoments.py); checkpoint to the
                     work dir every segment
  merge(g, p)        Chan-merge the chains (only when there are several), pair by pair
  finalize(g, p)     row/col max of the panel (kernels/tilemax.py) and the rotation
                     baseline (kernels/rotation.rotation_baseline_scaled: one GEMM per
                     strip from the precomputed scales), pair by pair; then the panel's
                     fold checkpoints go
  assemble(pair)     stream the panels, and the self co-moments layer by layer, into the
                     pair's file (formats/reduced.py), after its convergence table

Token-count convergence (settings.convergence_first > 0; kernels/convergence.py,
formats/convergence.py): at the doubling counts snapshot_counts(n_tokens,
convergence_first) below the total (a count inside a token block cuts that block's fold
in two there, in the self pass and the folds alike, so each count is exact), the self pass computes the rotated scales of the other model's self co-moments of the
first n tokens (K x L x d, kept in its checkpoint), and chain 0 of every (group, panel)
finalizes its running accumulators for the same n tokens: the row max and the rotation
baseline of all draws (the fold's block buffers are freed first, so the finalize's own
buffers fit where the plan counts them; plan.py counts the snapshot arrays). They go
into the chain's checkpoints, then the panel's final file, so a kill never loses one and
a resumed reduce computes the same numbers. Panels are separate passes over the same
tokens and each holds whole reference rows, so the assembly concatenates the panels'
snapshot rows into the exact full row max and baseline, and writes
RUN/reduce/<ref>__<other>.convergence.csv (summarize() per count, the last row the file's
own numbers, thresholds: the universal step's defaults) before the pair's .h5 is renamed
into place. With several chains (a cluster), only the counts within chain 0's tokens are
exact prefixes and recorded (the later ones would need the chains merged mid-pass); the
table then has those and the total.

Tasks pass file paths, not arrays: a worker of a cluster opens the stores and the
checkpoints itself, and a killed run resumes from the last checkpoint on disk. One
process per output pair (a lock in RUN/reduce/). A re-run after a kill that came between
two pairs' commits finishes from the whole command's work dir. Fault-injection points
(faults.point) mark where the tests kill the process. Memory: every buffer a task
allocates is one plan.task_bytes counts.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ooc_universal import __version__, faults
from ooc_universal.config import NOT_HASHED, ComputeConfig, ReduceConfig, validated
from ooc_universal.devices import device_name
from ooc_universal.errors import OocError, StaleInputError
from ooc_universal.formats.reduced import (LAYOUT_VERSION, PairHeader, WorkDir, create_reduced,
                                           iter_self_layers, load_state, open_reduced,
                                           fold_state_items,
                                           pack_self_state, read_array_item,
                                           read_self_moments, reduced_path,
                                           remove_temporaries, save_array_stream,
                                           state_keys, unpack_fold_state)
from ooc_universal.formats.convergence import (convergence_path, snapshot_rows,
                                               write_convergence)
from ooc_universal.formats.store import open_store
from ooc_universal.kernels.convergence import crossed, summarize
from ooc_universal.graph import (CANCEL, PROGRESS, TIMINGS, Interrupted, TaskFailedError,
                                 TaskGraph, cluster_workers, execute)
from ooc_universal.plan import (BASELINE_ROW_STRIP, PairShape, Rates, ReducePlan, describe,
                                describe_options, gemm_shape, make_plan, measure_gemm,
                                measure_rates, stream_shape)
from ooc_universal.rundir import (check_free_space, config_hash, file_lock, human_bytes,
                                  recorded_sha256, sidecar_path, step_dir)
from ooc_universal.sources import (SourceSpec, open_source, release_sources, store_source,
                                   stream_source)

# Names kept for callers and tests that reach into the module (same objects as graph's).
_CANCEL, _PROGRESS = CANCEL, PROGRESS
ReduceInterrupted = Interrupted
__all__ = ["reduce", "summary_line", "zero_variance_warnings", "store_path", "release_stores", "load_block",
           "TaskFailedError", "ReduceInterrupted"]

# reduce(..., memory=, device=, ...) from before the config sections: keyword -> section
LEGACY_KEYWORDS = {"memory": "compute", "device": "compute", "scheduler": "compute",
                   "precision": "reduce", "baseline_draws": "reduce", "seed": "reduce",
                   "keep_covariance": "reduce"}


@dataclass(frozen=True)
class FoldTask:
    """Everything a worker needs to fold one chain: paths and numbers only (a source is
    a sources.SourceSpec: a store's path or a model to stream)."""
    work_dir: str
    ref_source: SourceSpec
    other_sources: tuple
    group: int
    panel: int
    chain: int
    rows: tuple            # (start, stop) reference neurons of the panel
    blocks: tuple          # block indices of this chain, in order
    block_tokens: int
    n_tokens: int
    blocks_per_segment: int
    precision: str
    device: str
    d_others: tuple
    snapshots: tuple = ()  # token counts at which this chain snapshots (chain 0 only)
    # fused (plan.self_fused: a stream of one chain, the first panel): the indices among
    # the graph's pairs of the group's other models, whose self co-moments this chain
    # folds too, from the same blocks; () otherwise
    self_indices: tuple = ()
    n_draws: int = 0       # fused: the baseline draws (the scales it computes)


@dataclass(frozen=True)
class SelfTask:
    """One other model's self co-moment pass: paths and numbers only."""
    work_dir: str
    other_source: SourceSpec
    index: int             # the other model's index among the graph's pairs
    d: int                 # neurons per layer
    block_tokens: int
    n_tokens: int
    n_blocks: int
    blocks_per_segment: int
    precision: str
    device: str
    snapshots: tuple = ()  # token counts at which to keep the prefix's rotated scales
    n_draws: int = 0       # baseline draws (the snapshots' scales)


@dataclass(frozen=True)
class Job:
    """One validated reduce command: the models (metadata dicts, saved with every
    result: a store's, or sources.stream_meta's), their block sources, the settings and
    where it runs."""
    run_dir: Path
    ref: dict
    others: tuple          # (SourceSpec, meta) of each other model
    settings: ReduceConfig
    compute: ComputeConfig
    device: str            # resolved: cpu, cuda, cuda:N
    source: str = "store"  # resolved: store | stream
    choice: str = ""       # --source auto: the options compared and why (dry run text)
    choice_line: str = ""  # --source auto: the choice in one line
    rates: Rates | None = None  # --source auto: the rates it measured (the dry run's)

    @property
    def settings_dict(self) -> dict:
        """What the numbers depend on: where the blocks come from (source, disk_gbps)
        is not, so a streamed and a stored reduce make interchangeable outputs."""
        return self.settings.model_dump(exclude=set(NOT_HASHED["reduce"]))

    @property
    def ref_source(self) -> SourceSpec:
        return self.source_of(self.ref)

    def source_of(self, meta: dict) -> SourceSpec:
        if meta.get("source") == "stream":
            return stream_source(meta["spec"], meta["label"], self.run_dir,
                                 meta["batch_windows"], self.device,
                                 autocast=meta.get("forward_autocast", ""))
        return store_source(meta["path"])

    def sources(self) -> list:
        return [self.ref_source, *(src for src, _ in self.others)]

    def output(self, meta: dict) -> Path:
        return reduced_path(self.run_dir, self.ref["label"], meta["label"])


# --------------------------------------------------------------------------- the step

def reduce(run_dir, reference: str, others: list, settings: ReduceConfig | None = None,
           compute: ComputeConfig | None = None, *, block_tokens=None, max_panels=None,
           n_workers=None, checkpoint_blocks=None, gemm_rate=None, dry_run=False,
           force=False, progress=True, forward_precision=None, **legacy):
    """Reduce `reference` against each of `others` (store labels, paths or model specs;
    models.ModelSpec objects are named by their labels).

    settings.source: "store" reads the activation stores; "stream" runs forward passes
    of the models (specs: `reference` and `others` are model specs, or labels of stores
    whose recorded spec is used) over the run's token set and writes no store; "auto"
    chooses from the plan (plan.choose_source: expected time, disk) and says why in
    result["source_choice"]. settings.forward_precision (a stream's forward passes,
    sources.forward_autocast; the keyword overrides it): "auto" and "fp32" run them
    in fp32 on every device; "bf16" in bf16 autocast (recorded with the models, as
    forward_autocast in their metadata).

    settings: what the numbers depend on (saved with every result); compute: device,
    memory budget and cluster. The rest only cut the work differently (planner
    overrides: block_tokens, max_panels, n_workers, checkpoint_blocks; gemm_rate for the
    dry run's time estimate). The pre-section keywords (memory=, device=, precision=,
    baseline_draws=, seed=, keep_covariance=, scheduler=) still work and override the
    sections.

    Returns {"outputs": [paths], "plan": ReducePlan, "blocks_folded": int,
    "blocks_resumed": int, "skipped": [paths already complete], "timings": {phase:
    seconds} of this process's tasks and "cpu_timings" (the same in CPU-seconds),
    "zero_variance": {path: (n_ref, n_other) neurons
    of zero variance}, and "rate" (achieved_rate: useful FLOP/s against torch.matmul
    measured at the end; a stream's forward passes are timed apart) when the whole
    reduce ran here; a stream's "forward_passes" {label: passes over the token set
    forwarded in this process} and "forwards" (batches and seconds)}; with dry_run the plan text
    is in "describe", the rates it used (measured now unless gemm_rate is given) in
    "rates", and nothing is computed or written.
    """
    settings, compute = _sections(settings, compute, legacy)
    tuning = dict(block_tokens=block_tokens, max_panels=max_panels, n_workers=n_workers,
                  checkpoint_blocks=checkpoint_blocks)
    from ooc_universal.sources import forward_autocast, forward_counts
    autocast = forward_autocast(device_name(compute.device),
                                forward_precision or settings.forward_precision)
    if settings.source == "auto":
        job = _auto_job(run_dir, reference, others, settings, compute, tuning, gemm_rate,
                        autocast)
    else:
        job = _validated_job(run_dir, reference, others, settings, compute, autocast)
    with contextlib.ExitStack() as locks:
        if not dry_run:
            _lock_outputs(job, locks)
        try:
            result = _reduce_locked(job, tuning, gemm_rate, dry_run, force, progress)
            result.update(source=job.source, source_choice=job.choice_line)
            if job.source == "stream" and not dry_run:
                counts = forward_counts(job.sources())
                result["forwards"] = counts
                result["forward_passes"] = {k: v["passes"] for k, v in counts.items()}
            return result
        finally:
            release_sources(job.sources())


def _sections(settings, compute, legacy: dict) -> tuple[ReduceConfig, ComputeConfig]:
    """The two sections, with the pre-section keywords applied on top."""
    unknown = sorted(set(legacy) - set(LEGACY_KEYWORDS))
    if unknown:
        raise TypeError(f"reduce() got unexpected keyword argument(s) {', '.join(unknown)}")
    settings = settings or ReduceConfig()
    compute = compute or ComputeConfig()
    over = {"reduce": {}, "compute": {}}
    for key, value in legacy.items():
        if value is not None:
            over[LEGACY_KEYWORDS[key]][key] = _legacy_value(key, value)
    if over["reduce"]:
        settings = validated(ReduceConfig, {**settings.model_dump(), **over["reduce"]},
                             "reduce settings")
    if over["compute"]:
        compute = validated(ComputeConfig, {**compute.model_dump(), **over["compute"]},
                            "compute settings")
    return settings, compute


def _legacy_value(key: str, value):
    if key == "memory" and isinstance(value, (int, float)):
        return str(int(value))  # bytes (parse_bytes reads a bare number as bytes)
    if key == "device":
        return str(value)  # "cuda:1" or a torch.device
    if key == "baseline_draws" and int(value) < 1:
        raise OocError(f"--baseline-draws must be >= 1 (draw 0 is the paper's baseline), "
                       f"got {value}")
    return value


def _validated_job(run_dir, reference, others, settings, compute, autocast="") -> Job:
    if not others:
        raise OocError("reduce needs at least one other model besides the reference; "
                       "pass two or more models")
    if settings.source == "stream":
        return _stream_job(run_dir, reference, others, settings, compute, autocast=autocast)
    return _store_job(run_dir, reference, others, settings, compute)


def _store_job(run_dir, reference, others, settings, compute) -> Job:
    device = device_name(compute.device)
    reference, others = _label_of(reference), [_label_of(o) for o in others]
    ref_path = store_path(run_dir, reference)
    other_paths = [store_path(run_dir, o) for o in others]
    if ref_path in other_paths:
        raise OocError(f"the reference {reference!r} is also among the other models; "
                       "correlate a model with other models only")
    if len(set(other_paths)) != len(other_paths):
        raise OocError(f"duplicate models among {list(others)}; name each other model once")
    ref_meta = _store_meta(ref_path)
    metas = [_store_meta(p) for p in other_paths]
    _check_compatible(ref_meta, metas)
    return Job(Path(run_dir), ref_meta, tuple((store_source(p), m)
                                              for p, m in zip(other_paths, metas)),
               settings, compute, device, "store")


def _stream_job(run_dir, reference, others, settings, compute, labels=None,
                autocast="") -> Job:
    """The models named by `reference` and `others` (model specs, or labels of stores
    that record their spec), streamed over the run's token set: no store is opened.
    `labels`: the output labels to use (auto: those of the stores), else
    models.unique_labels'. `autocast`: the forward passes' autocast dtype ("": fp32),
    recorded in each model's metadata as forward_autocast (only when set, so an fp32
    stream's metadata, work key and outputs are as before)."""
    from ooc_universal import models
    from ooc_universal.formats.tokens import load_token_set
    from ooc_universal.sources import stream_meta
    if not others:
        raise OocError("reduce needs at least one other model besides the reference; "
                       "pass two or more models")
    device = device_name(compute.device)
    token_set = load_token_set(run_dir)
    names = [reference, *others]
    specs = models.unique_labels([_spec_text(run_dir, n) for n in names])
    if labels:
        from dataclasses import replace
        specs = [replace(s, label=lab) for s, lab in zip(specs, labels)]
    seen = [s.label for s in specs]
    if seen[0] in seen[1:]:
        raise OocError(f"the reference {_label_of(reference)!r} is also among the other "
                       "models; correlate a model with other models only")
    if len(set(seen)) != len(seen):
        raise OocError(f"duplicate models among {[_label_of(o) for o in others]}; name each "
                       "other model once")
    models.check_same_family(specs)
    token_meta = {"hash": token_set.hash, "n_tokens": token_set.n_tokens,
                  "window": token_set.window, "n_windows": token_set.n_windows}
    metas = [stream_meta(s, token_meta, device) for s in specs]
    if autocast:
        metas = [{**m, "forward_autocast": autocast} for m in metas]
    _check_compatible(metas[0], metas[1:])
    job = Job(Path(run_dir), metas[0], (), settings, compute, device, "stream")
    return Job(job.run_dir, metas[0], tuple((job.source_of(m), m) for m in metas[1:]),
               settings, compute, device, "stream")


def _auto_job(run_dir, reference, others, settings, compute, tuning, gemm_rate,
              autocast="") -> Job:
    """--source auto: both jobs when both can run, each costed from its plan
    (plan.stream_option: forward passes at the rate measured now on the reference
    model; plan.store_option: the stores read back at the disk's measured or stated
    --disk-gbps bandwidth), and the faster that fits the free disk (plan.choose_source).
    Here the stores either exist (then reading them is the store option) or do not (a
    reduce cannot extract: streaming is then the only option)."""
    import shutil
    from dataclasses import replace

    from ooc_universal.plan import choose_source, disk_rates, store_option, stream_option
    from ooc_universal.rundir import existing_parent
    jobs, why = {}, {}
    for name in ("store", "stream"):
        labels = None
        if name == "stream" and "store" in jobs:  # same outputs as the stores would make
            labels = [jobs["store"].ref["label"], *(m["label"] for _, m in jobs["store"].others)]
        try:
            jobs[name] = _validated_job(
                run_dir, reference, others, settings.model_copy(update={"source": name}),
                compute, autocast) if labels is None else _stream_job(
                run_dir, reference, others, settings.model_copy(update={"source": name}),
                compute, labels=labels, autocast=autocast)
        except OocError as exc:
            why[name] = str(exc).rstrip(".")
    if not jobs:
        raise OocError(f"--source auto: no block source can run: stores: {why['store']}; "
                       f"stream: {why['stream']}")
    if len(jobs) == 1:
        (name, job), = jobs.items()
        other = "stream" if name == "store" else "store"
        line = (f"block source (--source auto): {name}, the only one that can run "
                f"({other}: {why[other]})")
        return replace(job, settings=settings, choice=line, choice_line=line)
    n_workers = tuning["n_workers"] or (cluster_workers(compute.scheduler)
                                        if compute.scheduler else 1)
    plans = {k: _plan(j, j.others, n_workers, tuning) for k, j in jobs.items()}
    reduce_dir = step_dir(run_dir, "reduce")
    base = Rates(gemm_flops_per_s=gemm_rate, measured=("given",)) if gemm_rate \
        else measure_rates(plans["store"], reduce_dir)
    write, read, how = disk_rates(reduce_dir, settings.disk_gbps)
    rates = replace(base, read_bytes_per_s=read, disk_bytes_per_s=write,
                    forward_flops_per_s=_forward_rate(jobs["stream"]),
                    measured=base.measured + ("forward", f"disk ({how})"))
    options = [stream_option(plans["stream"], rates), store_option(plans["store"], rates)]
    free = shutil.disk_usage(existing_parent(reduce_dir)).free
    chosen, reason = choose_source(options, free)
    if chosen.source == "store":  # the forward rate's model is not needed
        release_sources(jobs["stream"].sources())
    text = describe_options(options, chosen, reason, jobs[chosen.source].device)
    text += (f"\n  rates: forward {rates.forward_flops_per_s / 1e9:.1f} GFLOP/s (measured "
             f"now on {jobs['stream'].ref['label']}); disk read {read / 1e9:.2f} GB/s, write "
             f"{write / 1e9:.2f} GB/s ({how}); {human_bytes(free)} free")
    return replace(jobs[chosen.source], settings=settings, choice=text, rates=rates,
                   choice_line=f"block source (--source auto): {chosen.source} ({reason})")


def _forward_rate(job: Job) -> float:
    """FLOP/s of the reference model's hooked forward passes, measured now on the token
    set's first batches (the model stays loaded for the reduce)."""
    from ooc_universal.sources import measure_forward
    measured = measure_forward(job.ref_source, seconds=0.5)
    return measured["positions_per_s"] * stream_shape([job.ref]).flops_ref


def _label_of(name):
    """A store is named by its label: a models.ModelSpec (as `run` passes them) by its
    label, anything else as given."""
    return getattr(name, "label", name)


def _spec_text(run_dir, name):
    """A model spec for `name`: itself (a models.ModelSpec keeps its label), unless it
    names a store (a label or an .h5 path) that records the spec it was extracted from."""
    if not isinstance(name, str):
        return name
    direct = Path(name) if str(name).endswith(".h5") else Path(run_dir) / "stores" / f"{name}.h5"
    if direct.exists():
        with contextlib.suppress(OocError), open_store(direct, verify=False) as st:
            spec = st.attrs.get("spec")
            if spec:
                return str(spec)
    return str(name)


def _lock_outputs(job: Job, locks: contextlib.ExitStack) -> None:
    """One writer per pair (other pairs may be reduced in parallel); stale temporaries
    of a killed writer go."""
    step_dir(job.run_dir, "reduce")
    for meta in sorted((m for _, m in job.others), key=lambda m: m["label"]):
        out = job.output(meta)
        locks.enter_context(file_lock(
            out.with_name(f".{out.stem}.lock"), f"reduce output {str(out)!r}",
            "wait for that reduce to finish (or stop it) and run this again"))
        remove_temporaries(out)


def _reduce_locked(job: Job, tuning: dict, gemm_rate, dry_run, force, progress) -> dict:
    todo, skipped = _pairs_to_do(job, dry_run, force)
    n_workers = tuning["n_workers"] or (cluster_workers(job.compute.scheduler)
                                        if job.compute.scheduler else 1)

    def plan_for(pairs):
        return _plan(job, pairs, n_workers, tuning)

    plan = plan_for(todo)
    result = {"outputs": [], "plan": plan, "blocks_folded": 0, "blocks_resumed": 0,
              "skipped": skipped, "timings": {}}
    if dry_run:
        shown = plan if todo else plan_for(job.others)  # all complete: what --force does
        rates = job.rates or _dry_run_rates(job, shown, gemm_rate)
        head = "" if todo else (f"all {len(skipped)} pair(s) are complete; with --force "
                                "the reduce would run this plan:\n")
        text = head + describe(shown, rates)
        if job.choice:
            text = job.choice + "\n" + text
        result.update(plan=shown, describe=text, rates=rates)
        return result
    if not todo:
        result["outputs"] = skipped
        result["zero_variance"] = _zero_variance(skipped)
        # a kill after the last output was committed leaves that command's work dir
        WorkDir.of(job.run_dir, _work_key(job, job.others, plan_for(job.others))).remove()
        return result

    check_free_space(step_dir(job.run_dir, "reduce"), plan.work_disk_bytes + plan.output_bytes,
                     "the reduce's checkpoints and outputs")
    graph_pairs, work = todo, WorkDir.of(job.run_dir, _work_key(job, todo, plan))
    if skipped:
        # A kill after some pairs of this command were written: the work of the whole
        # command is on disk under the key of all its pairs; finish from there.
        plan_all = plan_for(job.others)
        work_all = WorkDir.of(job.run_dir, _work_key(job, job.others, plan_all))
        if work_all.exists():
            graph_pairs, plan, work = job.others, plan_all, work_all
            result["plan"] = plan
    work.create(_manifest(job, graph_pairs, plan, tuning))
    graph, outputs = build_graph(job, plan, work, graph_pairs)
    todo_labels = {m["label"] for _, m in todo}
    outputs = [k for k, label in outputs if label in todo_labels]
    done_before = work.blocks_done()
    t0, c0 = time.perf_counter(), time.process_time()
    result["blocks_folded"] = execute(graph, outputs, total=_total_folds(plan),
                                      done_before=done_before,
                                      scheduler=job.compute.scheduler or None,
                                      progress=progress)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    result["blocks_resumed"] = done_before
    result["timings"] = TIMINGS.snapshot()
    result["cpu_timings"] = TIMINGS.cpu_snapshot()
    result["outputs"] = [job.output(m) for _, m in todo]
    result["zero_variance"] = _zero_variance(result["outputs"])
    work.remove()
    if not done_before and not job.compute.scheduler:
        timings, cpu_timings = result["timings"], result["cpu_timings"]
        result["rate"] = achieved_rate(plan, wall, cpu, *(
            sum(t.get(k, 0.0) for k in FORWARD_PHASES) for t in (timings, cpu_timings)))
    return result


def _dry_run_rates(job: Job, plan: ReducePlan, gemm_rate) -> Rates:
    """The rates the dry run's time estimate uses: measured now at the plan's shapes
    (unless gemm_rate is given), and for a stream the forward rate of its reference."""
    from dataclasses import replace
    rates = Rates(gemm_flops_per_s=gemm_rate, measured=("given",)) if gemm_rate \
        else measure_rates(plan, step_dir(job.run_dir, "reduce"))
    if job.source == "stream":
        rates = replace(rates, forward_flops_per_s=_forward_rate(job),
                        measured=rates.measured + ("forward",))
    return rates


# The timing phases of a stream's forward passes (the folds' and the self pass's)
FORWARD_PHASES = ("forward", "self_forward")


def achieved_rate(plan: ReducePlan, wall: float, cpu: float, forward: float = 0.0,
                  forward_cpu: float = 0.0) -> dict:
    """The reduce's useful FLOP/s (plan.flops: cross, self, baseline, scales) against
    torch.matmul measured now at the plan's strip GEMM shape, per wall and per
    CPU-second of this process (the latter holds on a busy machine). A stream's
    forward passes (`forward` seconds, `forward_cpu` CPU-seconds of the wall) are not
    the reduce's work: its rate is over the rest ("seconds"), the forward passes'
    own (plan.forward_flops over their seconds) beside it."""
    t0, c0 = time.perf_counter(), time.process_time()
    mm = measure_gemm(plan.device, plan.precision, gemm_shape(plan),
                      min(1.0, max(0.05, 0.01 * wall)))  # at most 1% of the reduce
    forward, forward_cpu = min(max(forward, 0.0), wall), min(max(forward_cpu, 0.0), cpu)
    own, own_cpu = wall - forward, cpu - forward_cpu
    gflops, per_cpu = plan.flops / max(own, 1e-9), plan.flops / max(own_cpu, 1e-9)
    return {"flops": plan.flops, "seconds": own, "cpu_seconds": own_cpu,
            "wall_seconds": wall, "wall_cpu_seconds": cpu,
            "forward_seconds": forward, "forward_cpu_seconds": forward_cpu,
            "forward_flops": plan.forward_flops,
            "forward_flops_per_s": plan.forward_flops / forward if forward > 0 else 0.0,
            "flops_per_s": gflops, "flops_per_cpu_s": per_cpu,
            "matmul_flops_per_s": mm["wall"], "matmul_flops_per_cpu_s": mm["cpu"],
            "fraction": gflops / mm["wall"], "fraction_per_cpu_s": per_cpu / mm["cpu"],
            "matmul_shape": list(gemm_shape(plan)),
            "measure_seconds": time.perf_counter() - t0,
            "measure_cpu_seconds": time.process_time() - c0}


def _pairs_to_do(job: Job, dry_run: bool, force: bool) -> tuple[list, list]:
    """(pairs still to reduce, outputs already complete with these settings)."""
    todo, skipped = [], []
    for path, meta in job.others:
        out = job.output(meta)
        if out.exists() and not force:
            try:
                # open_reduced verifies the file against its sidecar: one without a
                # readable sidecar is refused as untrusted (never given one here)
                _check_existing(out, job.ref, meta, job.settings_dict)
                skipped.append(out)
                continue
            except StaleInputError:
                if not dry_run:
                    raise
        todo.append((path, meta))
    return todo, skipped


def _plan(job: Job, pairs, n_workers: int, tuning: dict) -> ReducePlan:
    shapes = [PairShape(m["label"], m["n_neurons"], m["d_mlp"]) for _, m in pairs]
    s = job.settings
    stream = stream_shape([job.ref, *(m for _, m in pairs)]) \
        if job.source == "stream" and pairs else None
    return make_plan(
        job.ref["n_tokens"], job.ref["n_neurons"], shapes or [PairShape("-", 1, 1)],
        memory=job.compute.memory, device=job.device, precision=s.precision,
        n_workers=n_workers, store_chunk_rows=job.ref["block_tokens"],
        block_tokens=tuning["block_tokens"], max_panels=tuning["max_panels"],
        baseline_draws=s.baseline_draws, keep_covariance=s.keep_covariance,
        blocks_per_segment=tuning["checkpoint_blocks"], stream=stream,
        snapshots=_snapshots(s, job.ref["n_tokens"]))


def _snapshots(settings, n_tokens: int, block_tokens: int | None = None) -> tuple:
    """The token counts below the total at which the reduce snapshots: first, 2 first,
    4 first, ... (module docstring); () with convergence_first 0. `settings`: a
    ReduceConfig or its dict. A count inside a block cuts that block there (the folds
    and the self pass alike), so every count is exact whatever the block size."""
    from ooc_universal.kernels.convergence import snapshot_counts
    first = settings["convergence_first"] if isinstance(settings, dict) \
        else settings.convergence_first
    if not first or n_tokens < 2:
        return ()
    return tuple(snapshot_counts(n_tokens, first)[:-1])


def _total_folds(plan: ReducePlan) -> int:
    return plan.n_blocks * len(plan.groups) * len(plan.panels)


def _manifest(job: Job, pairs, plan: ReducePlan, tuning: dict) -> dict:
    """What a work dir is for (read by `status`): the pairs, the totals its progress is
    measured against, and the command that finishes it."""
    return {"reference": job.ref["label"], "others": [m["label"] for _, m in pairs],
            "outputs": [job.output(m).name for _, m in pairs],
            "total_folds": _total_folds(plan),
            "total_panels": len(plan.panels) * len(plan.groups),
            "token_hash": job.ref["token_hash"],
            "settings": job.settings_dict, "config_hash": config_hash(job.settings_dict),
            "command": _command(job, pairs, tuning),
            "toolkit_version": __version__}


def _command(job: Job, pairs, tuning: dict) -> str:
    """The `ooc-universal reduce` command line that resumes this work (same plan)."""
    s = job.settings
    name = (lambda m: m["spec"]) if job.source == "stream" else (lambda m: m["label"])
    parts = ["ooc-universal reduce", "--run-dir", str(job.run_dir), "-r", name(job.ref),
             *(name(m) for _, m in pairs), "--memory", job.compute.memory,
             "--precision", s.precision, "--baseline-draws", str(s.baseline_draws),
             "--seed", str(s.seed)]
    if job.source == "stream":
        parts += ["--source", "stream", "--device", job.device]
        if s.forward_precision != "auto":
            parts += ["--forward-precision", s.forward_precision]
    if s.keep_covariance:
        parts.append("--keep-covariance")
    if tuning.get("block_tokens"):
        parts += ["--block-tokens", str(tuning["block_tokens"])]
    if tuning.get("checkpoint_blocks"):
        parts += ["--checkpoint-every", str(tuning["checkpoint_blocks"])]
    if job.compute.scheduler:
        parts += ["--scheduler", job.compute.scheduler]
    return " ".join(parts)


def _provenance(ref_meta: dict, other_meta: dict, settings: dict) -> dict:
    """What the checksum sidecar of a reduce output records about its making: the
    stores' checksums, or (streamed) the model specs and the token set's hash."""
    record = {"step": "reduce", "token_hash": ref_meta["token_hash"],
              "config_hash": config_hash(settings)}
    if ref_meta.get("source") == "stream":
        return {**record, "source": "stream", "inputs": {},
                "models": {m["label"]: m["spec"] for m in (ref_meta, other_meta)}}

    def name(m):
        p = Path(m["path"])
        return f"stores/{p.name}" if p.parent.name == "stores" else str(p)
    return {**record, "inputs": {name(m): m.get("sha256") for m in (ref_meta, other_meta)}}


def store_path(run_dir, name: str) -> Path:
    """A store by label, by file path, or by model spec (resolved to its label)."""
    p = Path(name)
    if p.suffix == ".h5" and p.exists():
        return p
    direct = Path(run_dir) / "stores" / f"{name}.h5"
    if direct.exists():
        return direct
    from ooc_universal.models import parse_model_spec
    try:
        label = parse_model_spec(name).label
    except OocError:
        label = name
    path = Path(run_dir) / "stores" / f"{label}.h5"
    if not path.exists() and path.with_name(path.name + ".partial").exists():
        open_store(path)  # raises: incomplete, run the same extract again
    if not path.exists():
        raise OocError(f"no activation store for {name!r} at {str(path)!r}; "
                       f"run `ooc-universal extract --run-dir {run_dir} {name}` first")
    return path


def _store_meta(path: Path) -> dict:
    with open_store(path) as st:
        attrs = dict(st.attrs)
        return {"path": str(path), "label": str(attrs.get("label", path.stem)),
                "name": str(attrs.get("name", attrs.get("label", path.stem))),
                "step": int(attrs.get("step", -1)), "model_id": str(attrs.get("model_id", "")),
                "revision": str(attrs.get("revision", "")),
                "token_hash": str(attrs.get("token_hash", "")), "n_tokens": st.n_tokens,
                "n_neurons": st.n_neurons, "n_layers": st.n_layers, "d_mlp": st.d_mlp,
                "block_tokens": st.block_tokens, "sha256": recorded_sha256(path)}


def _check_compatible(ref: dict, others: list) -> None:
    for m in others:
        if m["token_hash"] != ref["token_hash"] or m["n_tokens"] != ref["n_tokens"]:
            raise OocError(
                f"stores were built from different token sets: {ref['label']} has token "
                f"hash {ref['token_hash'][:12]} ({ref['n_tokens']} tokens), {m['label']} has "
                f"{m['token_hash'][:12]} ({m['n_tokens']} tokens); re-extract both from "
                "the same `ooc-universal tokens` output")
        if m["step"] != ref["step"]:
            raise OocError(
                f"checkpoints differ: {ref['label']} is at step {ref['step']}, {m['label']} "
                f"at step {m['step']}; reduce models at the same checkpoint")


def _check_existing(out: Path, ref: dict, other: dict, settings: dict) -> None:
    """Raise StaleInputError when the complete `out` was made from other inputs."""
    with open_reduced(out) as stats:  # one line naming the file if it is unreadable
        token_hash, config = stats.attrs.get("token_hash"), stats.config
    if token_hash != ref["token_hash"]:
        raise StaleInputError(
            f"{str(out)!r} was made from another token set; delete it or pass --force")
    for role, meta in (("reference_store", ref), ("other_store", other)):
        was, now = (config.get(role) or {}).get("sha256"), meta.get("sha256")
        if was and now and was != now:
            raise StaleInputError(
                f"{str(out)!r} was made from another version of activation store "
                f"{meta['label']} (sha256 {was[:12]}, now {now[:12]}); delete it or pass "
                "--force to recompute it")
    made = config.get("settings", {})
    if made != settings:
        raise StaleInputError(
            f"{str(out)!r} exists with other settings {made}, asked for {settings}; "
            "pass --force to recompute it or use another run directory")


def _work_key(job: Job, pairs, plan: ReducePlan) -> str:
    """Content hash of what the work computes: inputs, settings, the plan's cut."""
    ident = {"ref": dict(job.ref), "others": [dict(m) for _, m in pairs],
             "settings": job.settings_dict,
             "block_tokens": plan.block_tokens, "groups": plan.groups, "panels": plan.panels,
             "chains": plan.n_chains, "segment": plan.blocks_per_segment,
             "layout": LAYOUT_VERSION}
    if plan.self_fused:  # another graph: its checkpoints hold the self co-moments
        ident["self_fused"] = True
    for d in [ident["ref"], *ident["others"]]:
        d.pop("path", None)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _blocks_on_disk(work_dir, plan=None) -> int:
    """Block folds held by the chain checkpoints in `work_dir` (see WorkDir.blocks_done)."""
    return WorkDir(work_dir).blocks_done()


def summary_line(result: dict) -> str:
    """What was done, and (a whole reduce in this process) how fast, e.g. "...; achieved
    141 GFLOP/s, 0.91 of torch.matmul's 155 GFLOP/s on the same shapes (0.93 per
    CPU-second)"."""
    plan = result["plan"]
    streamed = " from forward passes" if result.get("source") == "stream" else ""
    line = (f"reduced {len(result['outputs'])} pair(s){streamed}: "
            f"{result['blocks_folded']} block folds computed, "
            f"{result['blocks_resumed']} resumed from checkpoints, "
            f"{len(result['skipped'])} pair(s) already complete; "
            f"peak plan {human_bytes(plan.peak_bytes)}")
    rate = result.get("rate")
    if rate:
        k, m, n = rate["matmul_shape"]
        line += (f"; achieved {_gflops(rate['flops_per_s'])} GFLOP/s in "
                 f"{rate['seconds']:.1f} s, {rate['fraction']:.2f} of torch.matmul's "
                 f"{_gflops(rate['matmul_flops_per_s'])} GFLOP/s on the same shapes "
                 f"({k} x {m} x {n}; {rate['fraction_per_cpu_s']:.2f} per CPU-second)")
        if rate.get("forward_seconds"):
            line += (f"; forward passes {rate['forward_seconds']:.1f} s more, at "
                     f"{_gflops(rate['forward_flops_per_s'])} GFLOP/s")
    return line


def _gflops(flops_per_s: float) -> str:
    """GFLOP/s with 3 significant digits (a small reduce's 0.004 is not '0.0')."""
    g = flops_per_s / 1e9
    return f"{g:.1f}" if g >= 10 else f"{g:.3g}"


def zero_variance_warnings(result: dict) -> list[str]:
    """One warning line per output with zero-variance neurons (result["zero_variance"])."""
    return [f"warning: {path}: {nr} reference and {no} other neurons have zero variance "
            "over the tokens; their correlation is set to 0"
            for path, (nr, no) in result.get("zero_variance", {}).items() if nr or no]


def _zero_variance(paths) -> dict:
    """{path: (reference, other) neurons with zero variance over the tokens}."""
    out = {}
    for path in paths:
        with open_reduced(path) as stats:
            out[str(path)] = (int(stats.attrs.get("n_zero_var_ref", 0)),
                              int(stats.attrs.get("n_zero_var_other", 0)))
    return out


# --------------------------------------------------------------------------- the graph

def build_graph(job: Job, plan: ReducePlan, work: WorkDir, pairs) -> tuple[TaskGraph, list]:
    """self, rotations, scales -> fold -> merge -> finalize -> assemble tasks; returns the
    graph and, per pair, (its assemble key, its other label)."""
    graph = TaskGraph(work.path.name, "reduce")
    rotations = _add_rotations(graph, plan, job, work, pairs)
    selfs, scales = _add_self_tasks(graph, plan, job, work, pairs, rotations)
    outputs = []
    for g, grp in enumerate(plan.groups):
        outputs += _add_group(graph, plan, job, work, pairs, g, grp, selfs, scales, rotations)
    return graph, outputs


def _add_self_tasks(graph, plan, job, work, pairs, rotations) -> tuple[list, list]:
    """Per other model, once for the whole command: its self co-moment pass and its
    rotated scales; returns their keys."""
    selfs, scales = [], []
    snaps = _snapshots(job.settings, plan.n_tokens, plan.block_tokens)
    group_of = {i: g for g, grp in enumerate(plan.groups) for i in grp}
    for i, (source, meta) in enumerate(pairs):
        task = SelfTask(str(work.path), source, i, meta["d_mlp"], plan.block_tokens,
                        plan.n_tokens, plan.n_blocks, plan.blocks_per_segment,
                        plan.precision, plan.device, snaps, job.settings.baseline_draws)
        rot = (rotations[meta["d_mlp"]],) if snaps else ()
        if plan.self_fused:
            # folded by its group's first-panel fold from the same forward passes; this
            # task only waits for it (and makes the file in a pass of its own if a
            # damaged one was discarded after that fold finished)
            fold = _task_key(graph, "fold", (group_of[i], 0, 0))
            selfs.append(graph.add("self", (i,), f"self co-moments ({meta['label']})",
                                   fold_self_after, task, rot[0] if rot else None, fold))
        else:
            selfs.append(graph.add("self", (i,), f"self co-moments ({meta['label']})",
                                   fold_self, task, *rot))
        scales.append(graph.add("scales", (i,), f"rotated scales ({meta['label']})",
                                scales_task, str(work.path), i, selfs[i],
                                rotations[meta["d_mlp"]], job.settings.baseline_draws,
                                plan.device, plan.precision))
    return selfs, scales


def _add_group(graph, plan, job, work, pairs, g, grp, selfs, scales, rotations) -> list:
    """The folds, merges and finalizes of group g's panels and its pairs' assembly;
    returns [(assemble key, other label)]."""
    config = {"settings": job.settings_dict, "plan": plan.to_dict()}
    gsources = tuple(pairs[i][0] for i in grp)
    d_others = tuple(pairs[i][1]["d_mlp"] for i in grp)
    baseline = [[scales[i] for i in grp], [rotations[d] for d in d_others], job.settings_dict]
    gselfs = [selfs[i] for i in grp]
    merged = [_add_folds(graph, plan, job, work, g, p, rows, gsources, d_others, baseline,
                         gselfs, grp)
              for p, rows in enumerate(plan.panels)]
    finals = [graph.add("finalize", (g, p), f"finalize (group {g}, panel {p})",
                        finalize_panel, str(work.path), g, p, tuple(rows), merged[p],
                        *baseline[:2], d_others, job.settings_dict)
              for p, rows in enumerate(plan.panels)]
    outputs = []
    for j, i in enumerate(grp):
        meta = pairs[i][1]
        out = job.output(meta)
        key = graph.add("assemble", (i,), f"assemble ({out.name})", assemble_pair,
                        str(out), j, finals, selfs[i], job.ref, meta, config)
        outputs.append((key, meta["label"]))
    return outputs


def _task_key(graph: TaskGraph, kind: str, index: tuple) -> tuple:
    """The key graph.add gives a task of `kind` and `index` (to depend on a task that is
    added later)."""
    return (f"{kind}-{graph.tag}", *index)


def _add_rotations(graph, plan, job, work, pairs) -> dict:
    """One rotations task per layer width among the other models: {d: its key}."""
    layers = {}
    for _, meta in pairs:
        layers[meta["d_mlp"]] = max(layers.get(meta["d_mlp"], 0), meta["n_layers"])
    seeds = [job.settings.seed + k for k in range(job.settings.baseline_draws)]
    dtype = "float64" if plan.precision == "fp64" else "float32"
    return {d: graph.add("rotations", (d,), f"rotations (d={d})", draw_rotations,
                         str(work.path), d, n_layers, seeds, dtype)
            for d, n_layers in sorted(layers.items())}


def _add_folds(graph, plan, job, work, g, p, rows, gsources, d_others, baseline, gselfs,
               grp=()):
    """The fold tasks of (group g, panel p), one per chain, and their merge; returns the
    merge's key. A single chain finalizes its panel itself (from memory, `baseline`:
    the scales' and rotations' keys and the settings), so its last segment is never
    written out and read back. Chain 0 takes the convergence snapshots that fall in its
    tokens (it starts at token 0; `gselfs`: the self passes' keys, whose files hold the
    prefixes' rotated scales). With plan.self_fused, the fold of panel 0 also folds the
    self co-moments of the group's models `grp` and makes their self and scales files
    itself (their paths are given, not the keys of the tasks that wait for it)."""
    chain_keys = []
    single = plan.n_chains == 1
    snaps = _snapshots(job.settings, plan.n_tokens, plan.block_tokens)
    fused = plan.self_fused and p == 0
    if fused and not single:
        raise ValueError("fused self co-moments need a single chain per panel")
    for c in range(plan.n_chains):
        blocks = tuple(plan.chain_blocks(c))
        if not blocks:
            continue
        mine = tuple(n for n in snaps if n <= plan.block_bounds(blocks[-1])[1]) \
            if c == 0 else ()
        task = FoldTask(str(work.path), job.ref_source, gsources, g, p, c, tuple(rows), blocks,
                        plan.block_tokens, plan.n_tokens, plan.blocks_per_segment,
                        plan.precision, plan.device, d_others, mine,
                        tuple(grp) if fused else (),
                        job.settings.baseline_draws if fused else 0)
        if fused:
            args = [[str(work.scales_path(i)) for i in grp], baseline[1], baseline[2],
                    [str(work.self_path(i)) for i in grp]]
        elif single:
            args = [*baseline, gselfs if mine else None]
        elif mine:
            args = [None, baseline[1], baseline[2], gselfs]
        else:
            args = []
        chain_keys.append(graph.add("fold", (g, p, c), f"fold (group {g}, panel {p}, chain {c})",
                                    fold_chain, task, *args))
    return graph.add("merge", (g, p), f"merge (group {g}, panel {p})", merge_chains,
                     str(work.path), g, p, chain_keys)


# --------------------------------------------------------------------------- block reads

def _cached_store(source):
    """One open block source per worker process (sources.open_source: a store's map, a
    stream's model; h5py objects never cross processes). A string is a store path."""
    return open_source(source if isinstance(source, SourceSpec) else store_source(str(source)))


def release_stores(paths) -> None:
    """Close this process's cached maps of `paths`: a study reduces one checkpoint after
    another in one process, and maps kept open would keep every store's pages resident."""
    release_sources([store_source(str(p)) for p in paths])


def _read_phase(source) -> str:
    """The timing phase of a block load: a store's read, or a stream's forward passes."""
    return "forward" if getattr(source, "streamed", False) else "read"


def _zero_copy_block(store, i: int):
    """Block i as a zero-copy read-only view of the memory map, or None when the store
    cannot hand one out (compressed: its read buffer is reused by the next read)."""
    return store.read_block(i) if store.memory_mapped else None


def _as_tensor(array):
    import torch
    with warnings.catch_warnings():  # read-only memmap: the kernels only read it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def load_block(store, start: int, stop: int, cols: tuple | None, out, allow_view=False):
    """Rows [start, stop) (columns `cols`) of a store as a torch tensor: with
    `allow_view`, a zero-copy view of the memory map when they lie in one chunk (the CPU
    path; the centring kernel reads fp16 itself), else copied into `out` (converted to
    its dtype in the same pass), chunk by chunk."""
    bt = store.block_tokens
    c0, c1 = store.block_bounds(start // bt)
    view = _zero_copy_block(store, start // bt) if allow_view and stop <= c1 else None
    if view is not None:
        view = view[start - c0:stop - c0]
        return _as_tensor(view if cols is None else view[:, cols[0]:cols[1]])
    row = 0
    for ci in range(start // bt, (stop - 1) // bt + 1):
        c0, c1 = store.block_bounds(ci)
        a, b = max(start, c0), min(stop, c1)
        chunk = store.read_block(ci)[a - c0:b - c0]
        if cols is not None:
            chunk = chunk[:, cols[0]:cols[1]]
        out[row:row + (b - a)].copy_(_as_tensor(chunk), non_blocking=True)
        row += b - a
    return out[:row]


class Staging:
    """Where a task's block strips come from. On a CPU, a zero-copy view of the memory
    map when the rows lie in one chunk, else a copy into an fp16 host buffer allocated
    once per (role, width). On a GPU, pinned host buffers, two per role used in turn,
    each refilled only once its previous upload has finished (an event), then copied
    to the device without blocking. A compressed store's block is decoded once, whole,
    and its strips are slices of it (not one decode per strip)."""

    def __init__(self, device: str, block_tokens: int):
        self.device = device
        self.cuda = device.startswith("cuda")
        self.block_tokens = block_tokens
        self._buffers: dict = {}
        self._turn: dict = {}
        self._decoded: dict = {}  # role -> (store path, start, stop, whole block)

    def load(self, store, start: int, stop: int, cols: tuple | None, role: str):
        if getattr(store, "streamed", False):
            whole = self._streamed_block(store, start, stop, role)
            return whole if cols is None else whole[:, cols[0]:cols[1]]
        if not store.memory_mapped and cols is not None:
            whole = self._decoded_block(store, start, stop, role)
            return self._to_device(whole[:, cols[0]:cols[1]], role, cols[1] - cols[0])
        if not self.cuda:
            width = store.n_neurons if cols is None else cols[1] - cols[0]
            return load_block(store, start, stop, cols, self._host(role, width, 0)[0], True)
        return self._upload(store, start, stop, cols, role)

    def _decoded_block(self, store, start: int, stop: int, role: str):
        key = (str(store.path), start, stop)
        cached = self._decoded.get(role)
        if cached is None or cached[0] != key:
            buf = self._host(f"{role}-whole", store.n_neurons, 0, pinned=False)[0]
            cached = self._decoded[role] = (key, load_block(store, start, stop, None, buf))
        return cached[1]

    def _streamed_block(self, source, start: int, stop: int, role: str):
        """A stream's rows [start, stop), all neurons, computed once per (role, block)
        into a buffer on the compute device (on a GPU the rows never visit the host)."""
        import torch
        key = (source.path, source.label, start, stop)
        cached = self._decoded.get(role)
        if cached is None or cached[0] != key:
            bkey = (f"{role}-stream", source.n_neurons, 0)
            if bkey not in self._buffers:
                self._buffers[bkey] = [torch.empty(self.block_tokens, source.n_neurons,
                                                   dtype=torch.float16, device=self.device),
                                       None]
            out = self._buffers[bkey][0][:stop - start]
            source.fill_rows(start, stop, out)
            cached = self._decoded[role] = (key, out)
        return cached[1]

    def _to_device(self, strip, role: str, width: int):
        if not self.cuda:
            return strip
        entry = self._next_slot(role, width)
        entry[0][:strip.shape[0]].copy_(strip)
        return self._send(entry, entry[0][:strip.shape[0]])

    def _host(self, role: str, width: int, slot: int, pinned: bool | None = None):
        """[fp16 buffer, its last upload's event or None], allocated on first use."""
        import torch
        key = (role, width, slot)
        if key not in self._buffers:
            pin = self.cuda if pinned is None else pinned
            self._buffers[key] = [torch.empty(self.block_tokens, width, dtype=torch.float16,
                                              pin_memory=pin), None]
        return self._buffers[key]

    def _next_slot(self, role: str, width: int):
        """The role's other pinned buffer, once its previous upload is done."""
        slot = self._turn[role] = 1 - self._turn.get(role, 1)
        entry = self._host(role, width, slot)
        if entry[1] is not None:
            entry[1].synchronize()  # safe to overwrite
        return entry

    def _send(self, entry, host):
        import torch
        dev = host.to(self.device, non_blocking=True)
        entry[1] = torch.cuda.Event()
        # the copy is queued on the target GPU's stream; the event must be on that one
        # (record() alone takes the thread's current GPU: another one for cuda:N)
        entry[1].record(torch.cuda.current_stream(self.device))
        return dev

    def _upload(self, store, start, stop, cols, role):
        width = store.n_neurons if cols is None else cols[1] - cols[0]
        entry = self._next_slot(role, width)
        return self._send(entry, load_block(store, start, stop, cols, entry[0]))


# --------------------------------------------------------------------------- fold

_COMPUTE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp64": "float64"}


def _compute_dtype(precision: str):
    import torch
    return getattr(torch, _COMPUTE_DTYPES[precision])


def fold_chain(task: FoldTask, scale_paths=None, rotation_paths=None, settings=None,
               self_paths=None) -> str:
    """Fold this chain's token blocks into the group's accumulators, checkpointed every
    segment. Given the baseline's inputs (scale_paths: a single chain), the last segment
    is not checkpointed: the panel is finalized from memory (a kill then loses at most
    that segment, as between any two checkpoints). With task.snapshots (chain 0;
    rotation_paths, settings and the self files `self_paths` given), the convergence
    snapshots (module docstring), kept in every checkpoint after they are taken.

    Fused (task.self_indices): the chain also folds the self co-moments of the group's
    other models from the same centred strips (and, at each snapshot count, their
    rotated scales, from memory), kept in its checkpoints beside the accumulators; at
    the end it writes their self files (`self_paths`) and scales files (`scale_paths`),
    as fold_self and scales_task would, before finalizing."""
    work = WorkDir(task.work_dir)
    path = work.fold_path(task.group, task.panel, task.chain)
    if work.final_path(task.group, task.panel).exists():
        return str(path)  # the panel is finished (its checkpoints are gone)
    state = work.load(path)
    snaps = {}
    fused = _FusedSelf(task) if task.self_indices else None
    if state is not None:
        start_at, n_done = int(state["next_block"]), int(state["n_blocks_done"])
        snaps = {k: v for k, v in state.items() if _SNAP_KEY.fullmatch(k)}
        accs, selfs = _state_to_torch(state, task.device, with_selfs=True)
        if fused is not None:
            fused.restore(selfs, state)
        del state, selfs
    else:
        start_at, n_done, accs = task.blocks[0], 0, []
    finish = (scale_paths, rotation_paths, settings) if scale_paths is not None else None
    snap_inputs = (self_paths, rotation_paths, settings) \
        if task.snapshots and self_paths is not None else None
    if fused is not None and fused.accs is None:  # a fresh chain (or an older checkpoint)
        start_at, n_done, accs, snaps = task.blocks[0], 0, [], {}
        fused.start()
    if start_at > task.blocks[-1]:
        if finish:  # killed between the last checkpoint and the final file
            if fused is not None:
                fused.commit(work, self_paths, scale_paths, rotation_paths)
            _finalize_from_memory(task, work, accs, n_done, finish, snaps)
        return str(path)
    accs = accs or _empty_accumulators(task)
    n_done = _fold_blocks(task, work, path, accs, start_at, n_done, finish is None,
                          snaps, snap_inputs, fused)
    if fused is not None:
        fused.commit(work, self_paths, scale_paths, rotation_paths)
    if finish:
        _finalize_from_memory(task, work, accs, n_done, finish, snaps)
    return str(path)


class _FusedSelf:
    """The self co-moments a fused fold chain folds (fold_chain): one (L, d, d) f64
    accumulator per other model of the group, and the rotated scales of each snapshot
    count, under the keys self<j>_iv_snap_<count>_ of the chain's checkpoints."""

    def __init__(self, task: FoldTask):
        self.task = task
        self.accs = None
        self.snaps: dict = {}

    def start(self) -> None:
        from ooc_universal.kernels.comoments import empty_self_comoments
        with TIMINGS.phase("fold_setup"):
            self.accs = [empty_self_comoments(_cached_store(p).n_neurons, d, self.task.device)
                         for p, d in zip(self.task.other_sources, self.task.d_others)]
        self.snaps = {}

    def restore(self, selfs: list, state: dict) -> None:
        """From a checkpoint; left empty (start() restarts the chain) when it holds no
        self co-moments of this group."""
        if len(selfs) != len(self.task.other_sources):
            return
        self.accs = selfs
        self.snaps = {k: v for k, v in state.items() if _FUSED_IV_KEY.fullmatch(k)}

    @staticmethod
    def key(j: int, count: int) -> str:
        return f"self{j}_{_iv_key(count)}"

    def iv(self, j: int, count: int) -> np.ndarray:
        return self.snaps[self.key(j, count)]

    def snapshot(self, count: int, rotation_paths: list) -> None:
        """The rotated scales of the first `count` tokens of every model of the group."""
        for j, (acc, d) in enumerate(zip(self.accs, self.task.d_others)):
            if int(acc["n"]) != count:
                raise OocError(f"reduce self snapshot at {count} tokens found "
                               f"{int(acc['n'])} folded; delete the reduce's .work "
                               "folder and run the same command again")
            self.snaps[self.key(j, count)] = _self_snapshot_scales(
                acc, rotation_paths[j], d, self.task.n_draws, self.task.device,
                self.task.precision)

    def commit(self, work: WorkDir, self_paths: list, scale_paths: list,
               rotation_paths: list) -> None:
        """Each model's self file (complete: every block) and scales file, one at a time;
        the accumulators are freed first."""
        n_blocks = self.task.blocks[-1] + 1
        for j, i in enumerate(self.task.self_indices):
            snaps = {_iv_key(c): self.iv(j, c) for c in self.task.snapshots
                     if self.key(j, c) in self.snaps}
            _save_self(work, Path(self_paths[j]), self.accs[j], n_blocks, n_blocks, snaps)
            self.accs[j] = None
        self.accs = None
        for j, i in enumerate(self.task.self_indices):
            scales_task(str(work.path), i, self_paths[j], rotation_paths[j],
                        self.task.n_draws, self.task.device, self.task.precision)


def fold_self_after(task: SelfTask, rotations_path, fold_path: str) -> str:
    """The self task of a fused plan: runs once the fold that made its file is done
    (`fold_path`: that fold's result); fold_self finds the file complete and returns
    it, or makes it in a pass of its own when it is gone (a damaged file discarded)."""
    return fold_self(task, rotations_path)


def _empty_accumulators(task: FoldTask) -> list:
    from ooc_universal.kernels.comoments import empty_comoments
    r0, r1 = task.rows
    with TIMINGS.phase("fold_setup"):  # not zeroed: the first block's strips overwrite
        return [empty_comoments(r1 - r0, _cached_store(p).n_neurons, task.precision,
                                task.device, zeroed=False) for p in task.other_sources]


def _fold_blocks(task, work, path, accs, start_at, n_done, save_last: bool, snaps=None,
                 snap_inputs=None, fused=None) -> int:
    """Fold blocks start_at.. of the chain; checkpoint every segment (and after the last
    block when `save_last`); returns the blocks folded in all. A block that reaches a
    snapshot count of task.snapshots adds that snapshot to `snaps` (with snap_inputs).
    `fused`: the chain's _FusedSelf (its self co-moments folded too)."""
    snaps = {} if snaps is None else snaps
    ref = _cached_store(task.ref_source)
    others = [_cached_store(p) for p in task.other_sources]
    staging, workspace = Staging(task.device, task.block_tokens), {}
    compute = _compute_dtype(task.precision)
    seg = 0
    for b in task.blocks:
        if b < start_at:
            continue
        if CANCEL.is_set():
            if seg:
                _checkpoint(task, work, path, accs, b, n_done, snaps, fused)
            raise Interrupted(f"interrupted before block {b}")
        spans = _block_spans(task, b, task.snapshots if snap_inputs else ())
        for s, e in spans:
            _fold_block(task, b, ref, others, staging, accs, compute, workspace, (s, e),
                        fused.accs if fused is not None else None)
            due = crossed(task.snapshots, s, e) if snap_inputs else []
            if due:  # the block buffers go first: the snapshot's finalize needs their room
                workspace.clear()
                staging = None
                if fused is not None:
                    for count in due:
                        fused.snapshot(count, snap_inputs[1])
                _take_snapshots(task, accs, due, snap_inputs, snaps, fused)
                staging = Staging(task.device, task.block_tokens)
        n_done += 1
        seg += 1
        PROGRESS.update(1)
        faults.point("reduce.fold.block")
        _test_hook("OOC_TEST_SLEEP_PER_BLOCK")
        last = b == task.blocks[-1]
        if seg >= task.blocks_per_segment and not last or last and save_last:
            _checkpoint(task, work, path, accs, b + 1, n_done, snaps, fused)
            seg = 0
            _test_hook("OOC_TEST_SLEEP_AFTER_CHECKPOINT")
    if not save_last:
        with TIMINGS.phase("checkpoint"):
            _check_finite(task, accs, task.blocks[-1])
    return n_done


def _block_spans(task, b: int, snapshots) -> list:
    """The token rows of block b, cut at the snapshot counts inside it (a snapshot is
    taken after exactly its count of tokens, whatever the block size)."""
    s, e = b * task.block_tokens, min(task.n_tokens, (b + 1) * task.block_tokens)
    edges = [s, *sorted(c for c in snapshots if s < c < e), e]
    return list(zip(edges[:-1], edges[1:]))


def _fold_block(task, b, ref, others, staging, accs, compute, workspace, span=None,
                self_accs=None) -> None:
    """Fold token block b (or its rows `span`) of the reference panel against every
    other store of the group: the panel's block is centred once for all of them
    (conversion and centring are memory-bound, the GEMMs are not). `self_accs` (a fused
    chain): each other model's self co-moments, from the same centred strips."""
    from ooc_universal.kernels.comoments import centre_block, transpose_block
    s, e = span or (b * task.block_tokens, min(task.n_tokens, (b + 1) * task.block_tokens))
    with TIMINGS.phase(_read_phase(ref)):
        x = staging.load(ref, s, e, task.rows, "x")
    with TIMINGS.phase("centre"):
        cx = centre_block(x, compute, workspace=workspace, role="x", spare_row=True)
        xt = transpose_block(cx, workspace) if _row_major_left(task, compute) else None
    for i, o in enumerate(others):
        _fold_other(o, s, e, task.d_others[i], cx, xt, accs[i], staging, compute, workspace,
                    self_accs[i] if self_accs is not None else None)
    with TIMINGS.phase("release"):
        ref.release_rows(s, e)  # done with these rows: keep RSS flat over the pass


def _row_major_left(task: FoldTask, compute) -> bool:
    """The CPU bf16 GEMM wants its first operand row-major (comoments.transpose_block)."""
    import torch
    return compute == torch.bfloat16 and not task.device.startswith("cuda")


def _fold_other(store, s, e, d, cx, xt, acc, staging, compute, workspace,
                self_acc=None) -> None:
    """One other model's block, layer by layer: a centred (n, d) strip, its GEMM (Chan
    term included) into the accumulator's columns; the moments once at the end. Its
    pages are released before the next model's are read. With `self_acc` (fused), the
    same strip's self co-moment GEMM too, exactly as the self pass does it (_self_block:
    each GEMM writes its own Chan row into the strip's spare row first)."""
    import torch

    from ooc_universal.kernels.comoments import (centre_block, comoment_moments_update_,
                                                 comoment_strip_update_,
                                                 self_comoment_strip_update_,
                                                 self_moments_update_)
    mean_y, m2_y = (torch.empty(store.n_neurons, dtype=torch.float64, device=cx[0].device)
                    for _ in range(2))
    for c0 in range(0, store.n_neurons, d):
        with TIMINGS.phase(_read_phase(store)):
            y = staging.load(store, s, e, (c0, c0 + d), "y")
        with TIMINGS.phase("centre"):
            cy = centre_block(y, compute, workspace=workspace, role="y", spare_row=True)
        with TIMINGS.phase("cross_gemm"):
            comoment_strip_update_(acc, cx, cy, c0, xt=xt, workspace=workspace)
        if self_acc is not None:
            with TIMINGS.phase("self_comoments"):
                self_comoment_strip_update_(self_acc, cy, c0 // d, workspace=workspace)
        mean_y[c0:c0 + d], m2_y[c0:c0 + d] = cy[0], cy[1]
    if self_acc is not None:
        with TIMINGS.phase("self_comoments"):
            self_moments_update_(self_acc, e - s, mean_y, m2_y)
    with TIMINGS.phase("moments"):
        comoment_moments_update_(acc, e - s, cx[0], cx[1], mean_y, m2_y)
    with TIMINGS.phase("release"):
        store.release_rows(s, e)


def _checkpoint(task, work, path, accs, next_block: int, n_done: int, snaps=None,
                fused=None) -> None:
    """One atomic file: the accumulators, the snapshots and (fused) the self
    co-moments with their snapshots' scales, so a resumed chain finds them at the same
    block."""
    with TIMINGS.phase("checkpoint"):
        _check_finite(task, accs, next_block - 1)
        selfs = fused.accs if fused is not None else []
        # one member at a time: on a GPU the host never holds all accumulators at once
        work.save(path, itertools.chain(
            fold_state_items(accs, selfs, next_block, n_done, to_host=_host),
            (snaps or {}).items(), (fused.snaps if fused is not None else {}).items()))


# --------------------------------------------------------------------------- snapshots

_SNAP_KEY = re.compile(r"p\d+_snap\d+_(row_max|baseline)")
_FUSED_IV_KEY = re.compile(r"self\d+_iv_snap_\d+_")


def _snap_key(i: int, count: int, what: str) -> str:
    """A snapshot's member in the fold checkpoints and final files: pair i of the
    group, `count` tokens, row_max (rows,) or baseline (draws, rows)."""
    return f"p{i}_snap{count}_{what}"


def _iv_key(count: int) -> str:
    """The rotated scales (draws, layers, d) of the first `count` tokens in a self file."""
    return f"iv_snap_{count}_"


def _take_snapshots(task: FoldTask, accs: list, due: list, snap_inputs: tuple,
                    snaps: dict, fused=None) -> None:
    """Finalize the running accumulators (the chain's first `count` tokens: chain 0
    starts at token 0) for each count of `due`, pair by pair, into `snaps`: the row max
    and the baseline of every draw, as the panel's finalize computes them. The rotated
    scales come from the self files, or (`fused`) from the chain's own memory."""
    self_paths, rotation_paths, settings = snap_inputs
    for count in due:
        for i, (acc, d) in enumerate(zip(accs, task.d_others)):
            if int(acc["n"]) != count:
                raise OocError(f"reduce snapshot at {count} tokens found {int(acc['n'])} "
                               "folded; delete the reduce's .work folder and run the same "
                               "command again")
            iv = fused.iv(i, count) if fused is not None \
                else _snapshot_scales(self_paths[i], count)
            rec = _for_finalize(acc)
            with TIMINGS.phase("snapshot"):
                row_max, base = _row_max_and_baseline(rec, iv, rotation_paths[i], d, settings)
            snaps[_snap_key(i, count, "row_max")] = row_max
            snaps[_snap_key(i, count, "baseline")] = base
            del rec


def _snapshot_scales(self_path, count: int) -> np.ndarray:
    key = _iv_key(count)
    st = load_state(Path(self_path), (key,))
    if st is None or key not in st:
        raise OocError(f"reduce work file {str(self_path)!r} lacks the rotated scales of "
                       f"the first {count} tokens; delete the reduce's .work folder and run "
                       "the same command again")
    return st[key]


def _self_snapshot_scales(acc: dict, rotations_path: str, d: int, n_draws: int,
                          device: str, precision: str = "fp32") -> np.ndarray:
    """iv (draws, L, d) of the self co-moments folded so far, as scales_task computes
    them from the finished ones."""
    from ooc_universal.kernels.rotation import rotated_scales_fast
    n_layers = acc["s"].shape[0]
    rotations = Rotations(rotations_path, d, _rotation_dtype(rotations_path))
    iv = np.empty((n_draws, n_layers, d))
    with TIMINGS.phase("snapshot_scales"):
        for layer in range(n_layers):
            s_dev = acc["s"][layer]
            for j in range(n_draws):
                iv[j, layer] = rotated_scales_fast(
                    s_dev, _on_device(rotations.get(j, layer), device),
                    dtype=_baseline_dtype(precision))
    return iv


def _host(v):
    """A tensor as a numpy array (a view on the CPU, a copy from a GPU); others as given."""
    return v.detach().cpu().numpy() if hasattr(v, "detach") else v


def _for_finalize(record: dict) -> dict:
    """An accumulator as the finalize reads it: C where it is (on a GPU the tile max and
    the baseline's GEMMs run there, and only their results reach the host; a CPU tensor
    becomes a numpy view, for the numba tile max), the vectors as numpy."""
    return {k: (v if k == "c" and getattr(v, "is_cuda", False) else _host(v))
            for k, v in record.items()}


def _tensors(record: dict, device: str) -> dict:
    """A record of numpy arrays as torch tensors on `device` (no copy on the CPU: the
    arrays were just read from a checkpoint and are owned by nobody else)."""
    import torch
    return {k: (v if k == "n" else torch.from_numpy(np.asarray(v)).to(device))
            for k, v in record.items()}


def _state_to_torch(state: dict, device: str, with_selfs: bool = False):
    """A checkpoint's accumulators as torch records; `with_selfs`: (accs, self
    co-moment records) (a fused chain's; ignored otherwise, as those of older work
    dirs)."""
    accs, selfs = unpack_fold_state(state)
    accs = [_tensors(a, device) for a in accs]
    if not with_selfs:
        return accs
    return accs, [_tensors(r, device) for r in selfs]


def _check_finite(task: FoldTask, accs: list, block: int) -> None:
    """A NaN or Inf activation makes its neuron's running mean non-finite: refuse, naming
    the store and the neurons, before the checkpoint keeps it."""
    import torch
    checks = [(task.ref_source, accs[0]["mean_x"], task.rows[0])] if accs else []
    checks += [(p, a["mean_y"], 0) for p, a in zip(task.other_sources, accs)]
    for source, mean, offset in checks:
        bad = (~torch.isfinite(mean)).nonzero().flatten()
        if len(bad):
            first = ", ".join(str(int(i) + offset) for i in bad[:5])
            what, fix = ((f"streamed model {source.label or source.path}",
                          "check the checkpoint") if source.kind == "stream" else
                         (f"activation store {source.path!r}",
                          "re-extract it from a sound checkpoint"))
            raise OocError(
                f"{what} has NaN or Inf activations in {len(bad)} "
                f"neuron(s) (flat index {first}{' ...' if len(bad) > 5 else ''}) by token "
                f"block {block}; {fix} (Inf means activations beyond the float16 range)")


def _test_hook(env: str) -> None:
    """Fault-injection points for the tests: sleep OOC_TEST_SLEEP_PER_BLOCK seconds after
    each block, OOC_TEST_SLEEP_AFTER_CHECKPOINT after each checkpoint (as in extract)."""
    delay = os.environ.get(env)
    if delay:
        time.sleep(float(delay))


# --------------------------------------------------------------------------- self co-moments

def fold_self(task: SelfTask, rotations_path: str | None = None) -> str:
    """Other model task.index's within-layer self co-moments over every token block,
    into one preallocated (L, d, d) float64 accumulator; checkpointed like a fold (fault
    points reduce.self.*), resumed from its last checkpoint. At each count of
    task.snapshots (with the rotations file), the rotated scales of the tokens folded so
    far, kept in the checkpoints (module docstring)."""
    from ooc_universal.kernels.comoments import empty_self_comoments
    work = WorkDir(task.work_dir)
    path = work.self_path(task.index)
    meta = read_self_moments(path)
    if meta is not None and meta["next_block"] >= task.n_blocks:
        return str(path)
    store = _cached_store(task.other_source)
    acc = empty_self_comoments(store.n_neurons, task.d, task.device)
    start_at, n_done = (0, 0) if meta is None else _restore_self(acc, path, meta)
    snaps = {} if meta is None else (load_state(path, ("iv_snap_",)) or {})
    staging, workspace = Staging(task.device, task.block_tokens), {}
    compute = _compute_dtype(task.precision)
    seg = 0
    for b in range(start_at, task.n_blocks):
        if CANCEL.is_set():
            if seg:
                _save_self(work, path, acc, b, n_done, snaps)
            raise Interrupted(f"interrupted before block {b}")
        cuts = task.snapshots if rotations_path is not None else ()
        for s, e in _block_spans(task, b, cuts):
            _self_block(task, b, store, staging, acc, compute, workspace, (s, e))
            for count in crossed(cuts, s, e):
                if int(acc["n"]) != count:
                    raise OocError(f"reduce self snapshot at {count} tokens found "
                                   f"{int(acc['n'])} folded; delete the reduce's .work "
                                   "folder and run the same command again")
                snaps[_iv_key(count)] = _self_snapshot_scales(
                    acc, rotations_path, task.d, task.n_draws, task.device, task.precision)
        n_done += 1
        seg += 1
        faults.point("reduce.self.block")
        if seg >= task.blocks_per_segment or b == task.n_blocks - 1:
            _save_self(work, path, acc, b + 1, n_done, snaps)
            seg = 0
    return str(path)


def _restore_self(acc: dict, path, meta: dict) -> tuple[int, int]:
    """Load a self checkpoint into the accumulator, one layer at a time."""
    import torch
    acc["n"] = meta["n"]
    acc["mean"].copy_(torch.from_numpy(meta["mean"]))
    acc["m2"].copy_(torch.from_numpy(meta["m2"]))
    for layer, s_layer in iter_self_layers(path, acc["s"].shape[0]):
        acc["s"][layer].copy_(torch.from_numpy(s_layer))
    return meta["next_block"], meta["n_blocks_done"]


def _self_block(task: SelfTask, b, store, staging, acc, compute, workspace,
                span=None) -> None:
    import torch

    from ooc_universal.kernels.comoments import (centre_block, self_comoment_strip_update_,
                                                 self_moments_update_)
    s, e = span or (b * task.block_tokens, min(task.n_tokens, (b + 1) * task.block_tokens))
    d = task.d
    mean, m2 = (torch.empty(store.n_neurons, dtype=torch.float64, device=acc["mean"].device)
                for _ in range(2))
    for layer in range(store.n_neurons // d):
        c0 = layer * d
        with TIMINGS.phase("self_" + _read_phase(store)):
            y = staging.load(store, s, e, (c0, c0 + d), "y")
        with TIMINGS.phase("self_centre"):
            cy = centre_block(y, compute, workspace=workspace, role="y", spare_row=True)
        with TIMINGS.phase("self_comoments"):
            self_comoment_strip_update_(acc, cy, layer, workspace=workspace)
        mean[c0:c0 + d], m2[c0:c0 + d] = cy[0], cy[1]
    with TIMINGS.phase("self_comoments"):
        self_moments_update_(acc, e - s, mean, m2)
    with TIMINGS.phase("self_release"):
        store.release_rows(s, e)


def _save_self(work: WorkDir, path, acc: dict, next_block: int, n_done: int,
               snaps: dict | None = None) -> None:
    with TIMINGS.phase("self_checkpoint"):
        record = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else v)
                  for k, v in acc.items()}
        work.save(path, {**pack_self_state(record, next_block, n_done), **(snaps or {})},
                  "self")


# --------------------------------------------------------------------------- baseline inputs

def draw_rotations(work_dir: str, d: int, n_layers: int, seeds: list, dtype: str) -> str:
    """The baseline's rotations of width d (rotation_matrix(seed, layer, d) in `dtype`),
    drawn once for the whole reduce and written one at a time."""
    from ooc_universal.kernels.rotation import rotation_matrix
    work = WorkDir(work_dir)
    path = work.rotations_path(d)
    if path.exists():
        return str(path)

    def items():
        for seed in seeds:
            for layer in range(n_layers):
                if CANCEL.is_set():
                    raise Interrupted("interrupted while drawing the rotations")
                yield rotation_matrix(seed, layer, d)
    with TIMINGS.phase("rotations"):
        save_array_stream(path, (len(seeds), n_layers, d, d), dtype, items(), "rotations")
    return str(path)


class Rotations:
    """The rotations file of one width, read one (d, d) rotation at a time into one
    buffer (the tensor returned is that buffer: use it before the next get)."""

    def __init__(self, path: str, d: int, dtype: str):
        import torch
        self.path = Path(path)
        self.buffer = np.empty((d, d), dtype)
        self.tensor = torch.from_numpy(self.buffer)

    def get(self, j: int, layer: int):
        read_array_item(self.path, (j, layer), self.buffer)
        return self.tensor


def scales_task(work_dir: str, i: int, self_path: str, rotations_path: str, n_draws: int,
                device: str, precision: str = "fp32") -> str:
    """iv (K, L, d) = 1/sqrt(diag(R S R^T)) of other model i, once per draw and layer
    for the whole reduce: one GEMM R S per (draw, layer), in the rotations' dtype (bf16
    in a bf16 run: _baseline_dtype)."""
    from ooc_universal.kernels.rotation import rotated_scales_fast
    work = WorkDir(work_dir)
    path = work.scales_path(i)
    if path.exists():
        return str(path)
    meta = read_self_moments(self_path)
    if meta is None:
        raise OocError(f"reduce work file {self_path!r} is unreadable; run the same "
                       "command again (it is recomputed)")
    iv = rotations = None
    with TIMINGS.phase("scales"):
        for layer, s_layer in iter_self_layers(self_path, meta["n_layers"]):
            d = s_layer.shape[0]
            if iv is None:
                iv = np.empty((n_draws, meta["n_layers"], d))
                rotations = Rotations(rotations_path, d, _rotation_dtype(rotations_path))
            s_dev = _on_device(s_layer, device)
            for j in range(n_draws):
                iv[j, layer] = rotated_scales_fast(
                    s_dev, _on_device(rotations.get(j, layer), device),
                    dtype=_baseline_dtype(precision))
        work.save(path, {"iv": iv}, "scales")
    return str(path)


def _baseline_dtype(precision: str):
    """The dtype of the baseline's GEMMs (C R'^T, R S): bf16 in a bf16 run, so that they
    run at the bf16 rate like the fold (README "Conventions"); None otherwise (the
    rotations' own fp32/fp64)."""
    import torch
    return torch.bfloat16 if precision == "bf16" else None


def _rotation_dtype(path) -> str:
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        return str(np.lib.format.read_array_header_1_0(f)[2])


def _on_device(array, device: str):
    import torch
    t = torch.as_tensor(array)
    return t if device == "cpu" else t.to(device)


# --------------------------------------------------------------------------- merge, finalize

def merge_chains(work_dir: str, g: int, p: int, chain_paths: list) -> str:
    """Chan-merge the chains of (g, p) into one file (a no-op for one chain), one pair at
    a time: its merged arrays are written before the next pair's are loaded."""
    if len(chain_paths) <= 1:
        return chain_paths[0]
    work = WorkDir(work_dir)
    out = work.merged_path(g, p)
    if out.exists() or work.final_path(g, p).exists():
        return str(out)
    with TIMINGS.phase("chan_merge"):
        keys = state_keys(Path(chain_paths[0]))
        n_pairs = sum(1 for k in keys if k.startswith("acc") and k.endswith("_n"))
        n_done = sum(int(work.load(Path(c), ("n_blocks_done",))["n_blocks_done"])
                     for c in chain_paths)
        work.save(out, _merged_items(work, chain_paths, n_pairs, n_done), "merge")
    return str(out)


def _merged_items(work: WorkDir, chain_paths: list, n_pairs: int, n_done: int):
    """(key, array) of the merged checkpoint, pair by pair (two accumulators in memory)."""
    from ooc_universal.kernels.comoments import comoment_merge_
    from ooc_universal.formats.reduced import ACC_KEYS
    yield "next_block", np.int64(-1)
    yield "n_blocks_done", np.int64(n_done)
    for i in range(n_pairs):
        acc = None
        for c in chain_paths:
            rec = _pair_record(work.load(Path(c), (f"acc{i}_",)), i)
            acc = rec if acc is None else comoment_merge_(acc, rec)
        yield f"acc{i}_n", np.int64(acc["n"])
        for k in ACC_KEYS:
            yield f"acc{i}_{k}", acc[k].numpy()
        del acc


def _pair_record(state: dict, i: int) -> dict:
    """Pair i's accumulator of a checkpoint as a torch record (zero-copy)."""
    import torch
    from ooc_universal.formats.reduced import ACC_KEYS
    return {"n": int(state[f"acc{i}_n"]),
            **{k: torch.from_numpy(state[f"acc{i}_{k}"]) for k in ACC_KEYS}}


def finalize_panel(work_dir, g, p, rows, state_path, scale_paths, rotation_paths, d_others,
                   settings: dict) -> str:
    """Row/col max and the rotation baseline of one panel, pair by pair (one accumulator
    in memory at a time); then the panel's fold checkpoints go (the final file records
    their block folds)."""
    work = WorkDir(work_dir)
    out = work.final_path(g, p)
    if out.exists():
        return str(out)
    counts = work.load(Path(state_path), ("n_blocks_done",))
    res = {"n_blocks_done": np.int64(counts["n_blocks_done"])}
    if Path(state_path) != work.fold_path(g, p, 0):  # several chains: chain 0's snapshots
        snaps = work.load(work.fold_path(g, p, 0), tuple(f"p{i}_snap" for i in
                                                         range(len(d_others)))) or {}
        res.update({k: v for k, v in snaps.items() if _SNAP_KEY.fullmatch(k)})
    for i, d in enumerate(d_others):
        with TIMINGS.phase("finalize_load"):
            acc = _pair_numpy(work.load(Path(state_path), (f"acc{i}_",)), i)
        res.update(_finalize_pair(work, i, rows, acc, scale_paths[i], rotation_paths[i], d,
                                  settings))
        del acc
    _save_final(work, g, p, res)
    return str(out)


def _finalize_from_memory(task: FoldTask, work: WorkDir, accs: list, n_done: int,
                          finish: tuple, snaps: dict | None = None) -> None:
    """finalize_panel for a single chain, from its accumulators in memory (and its
    convergence snapshots)."""
    scale_paths, rotation_paths, settings = finish
    res = {"n_blocks_done": np.int64(n_done), **(snaps or {})}
    for i, (acc, d) in enumerate(zip(map(_for_finalize, accs), task.d_others)):
        res.update(_finalize_pair(work, i, task.rows, acc, scale_paths[i], rotation_paths[i],
                                  d, settings))
    _save_final(work, task.group, task.panel, res)


def _save_final(work: WorkDir, g: int, p: int, res: dict) -> None:
    """Commit the panel's final file; its fold checkpoints are no longer needed."""
    with TIMINGS.phase("finalize_save"):
        work.save(work.final_path(g, p), res, "final")
    work.drop_panel(g, p)


def _pair_numpy(state: dict, i: int) -> dict:
    """Pair i's accumulator of a checkpoint as a record of numpy arrays."""
    from ooc_universal.formats.reduced import ACC_KEYS
    return {"n": int(state[f"acc{i}_n"]), **{k: state[f"acc{i}_{k}"] for k in ACC_KEYS}}


def _baseline(c, m2_x, iv, rotation_path, d: int, n_draws: int,
              precision: str = "fp32") -> np.ndarray:
    """The rotation baseline (n_draws, rows) f64 of co-moments c from the rotated
    scales iv (K, L, d) and the rotations file (one scaled rotation at a time), its
    GEMMs in _baseline_dtype(precision)."""
    import torch

    from ooc_universal.kernels.rotation import rotation_baseline_scaled, scaled_rotation
    reader = Rotations(rotation_path, d, _rotation_dtype(rotation_path))
    device = c.device if isinstance(c, torch.Tensor) else torch.device("cpu")
    scaled = torch.empty_like(reader.tensor, device=device)  # where C's GEMMs run

    def rotations(j, layer):
        return scaled_rotation(reader.get(j, layer).to(device), iv[j, layer], out=scaled)
    return rotation_baseline_scaled(c, m2_x, rotations, n_draws, d,
                                    row_strip=BASELINE_ROW_STRIP,
                                    dtype=_baseline_dtype(precision))


def _row_max_and_baseline(acc: dict, iv, rotation_path, d: int, settings) -> tuple:
    """A snapshot of one pair's accumulator (numpy; read, not changed): the row max and
    the baseline of every draw, in the output dtype, zero-variance rows 0 (as the pair
    file holds them)."""
    from ooc_universal.kernels.tilemax import tile_max
    out_dtype = np.float64 if settings["precision"] == "fp64" else np.float32
    m2_x = np.asarray(acc["m2_x"], np.float64)
    m2_y = np.asarray(acc["m2_y"], np.float64)
    row_max = _host(tile_max(acc["c"], m2_x, m2_y)[0])
    base = _baseline(acc["c"], m2_x, iv, rotation_path, d, settings["baseline_draws"],
                     settings["precision"])
    zero = m2_x <= 0
    row_max = np.where(zero, 0.0, row_max).astype(out_dtype)
    base = base.astype(out_dtype)
    base[:, zero] = 0.0
    return row_max, base


def _finalize_pair(work, i, rows, acc: dict, scale_path, rotation_path, d,
                   settings) -> dict:
    """Row/col max and baseline of pair i of a panel from its accumulator (numpy; C may
    be a CUDA tensor, _for_finalize)."""
    from ooc_universal.kernels.tilemax import tile_max
    out_dtype = np.float64 if settings["precision"] == "fp64" else np.float32
    c = acc["c"]
    m2_x = np.asarray(acc["m2_x"], np.float64)
    m2_y = np.asarray(acc["m2_y"], np.float64)
    with TIMINGS.phase("tile_max"):
        row_max, row_arg, col_max, col_arg = map(_host, tile_max(c, m2_x, m2_y))
    res = {f"p{i}_row_max": np.asarray(row_max, out_dtype),
           f"p{i}_row_arg": np.asarray(row_arg, np.int64),
           f"p{i}_col_max": np.asarray(col_max, out_dtype),
           f"p{i}_col_arg": np.asarray(col_arg, np.int64) + rows[0]}
    for k in ("n", "mean_x", "mean_y", "m2_x", "m2_y"):
        res[f"p{i}_{k}"] = np.asarray(acc[k]) if k != "n" else np.int64(acc[k])
    iv = work.load(Path(scale_path), ("iv",))["iv"]  # (K, L, d)
    with TIMINGS.phase("baseline"):
        base = _baseline(c, m2_x, iv, rotation_path, d, settings["baseline_draws"],
                         settings["precision"])
    res[f"p{i}_baseline"] = base.astype(out_dtype)
    if settings["keep_covariance"]:
        res[f"p{i}_c"] = _host(c).astype(np.float32, copy=False)
    return res


# --------------------------------------------------------------------------- assemble

def assemble_pair(out_path, j, final_paths, self_path, ref_meta, other_meta,
                  config: dict) -> str:
    """Stream the panels of pair j of its group, and the other model's self
    co-moments layer by layer, into the pair's file: one panel's results (or one layer)
    in memory at a time, never all of them."""
    work = WorkDir(Path(final_paths[0]).parent)
    settings = config["settings"]
    with TIMINGS.phase("assemble"):
        first = work.load(Path(final_paths[0]), prefixes=tuple(
            f"p{j}_{k}" for k in ("n", "mean_y", "m2_y")))
        n = int(first[f"p{j}_n"])
        header = PairHeader(
            reference=ref_meta, other=other_meta, token_hash=ref_meta["token_hash"],
            n_tokens=n, precision=settings["precision"],
            baseline_seeds=tuple(settings["seed"] + k for k in range(settings["baseline_draws"])),
            config={**config, "reference_store": ref_meta, "other_store": other_meta})
        with create_reduced(out_path, header, keep_cross=settings["keep_covariance"],
                            record=_provenance(ref_meta, other_meta, settings)) as w:
            zero_y = w.write_moments("other", 0, first[f"p{j}_mean_y"], first[f"p{j}_m2_y"], n)
            for layer, s_layer in iter_self_layers(self_path, int(other_meta["n_layers"])):
                w.write_self_comoment_layer(layer, s_layer)
            col_max, col_arg, final = _write_panels(w, work, j, final_paths, n, settings)
            w.write_cols(col_max, col_arg, zero_y)
            table = convergence_path(Path(out_path).parent.parent, ref_meta["label"],
                                     other_meta["label"])
            if settings.get("convergence_first"):
                # before the .h5 is renamed into place (when the `with` ends)
                _write_convergence_table(out_path, work, j, final_paths, final, n,
                                         ref_meta, other_meta, settings)
            else:  # no snapshots asked for: a table of an earlier reduce is not this one's
                table.unlink(missing_ok=True)
                sidecar_path(table).unlink(missing_ok=True)
    return str(out_path)


def _write_convergence_table(out_path, work: WorkDir, j: int, final_paths: list, final,
                             n: int, ref_meta: dict, other_meta: dict, settings: dict):
    """The pair's convergence table: summarize() of each snapshot count that every panel
    recorded (the panels' rows concatenated: whole reference rows per panel), then of
    the whole token set (`final`: the file's own row max and baseline)."""
    from ooc_universal.config import UniversalConfig
    thresholds = UniversalConfig().thresholds
    pair = {"reference": ref_meta.get("name", ref_meta["label"]),
            "other": other_meta.get("name", other_meta["label"]),
            "ref_label": ref_meta["label"], "other_label": other_meta["label"],
            "checkpoint": int(ref_meta.get("step", -1))}
    pattern = re.compile(rf"p{j}_snap(\d+)_row_max")
    counts = None
    for fp in final_paths:
        keys = {int(m.group(1)) for m in map(pattern.fullmatch, state_keys(Path(fp))) if m}
        counts = keys if counts is None else counts & keys
    rows = []
    with TIMINGS.phase("convergence"):
        for count in sorted(c for c in (counts or ()) if c < n):
            parts = [work.load(Path(fp), (_snap_key(j, count, "row_max"),
                                          _snap_key(j, count, "baseline")))
                     for fp in final_paths]
            row = np.concatenate([np.asarray(q[_snap_key(j, count, "row_max")], np.float64)
                                  for q in parts])
            base = np.concatenate([np.asarray(q[_snap_key(j, count, "baseline")], np.float64)
                                   for q in parts], axis=1)
            rows += snapshot_rows(pair, count, n, summarize(row, base, thresholds))
            del parts
        rows += snapshot_rows(pair, n, n, summarize(*final, thresholds))
    run_dir = Path(out_path).parent.parent
    write_convergence(convergence_path(run_dir, ref_meta["label"], other_meta["label"]),
                      rows, _provenance(ref_meta, other_meta, settings))


def _write_panels(w, work: WorkDir, j: int, final_paths: list, n: int, settings: dict):
    """Each panel's rows of pair j into the file; returns the merged column maxima."""
    from ooc_universal.kernels.tilemax import merge_max
    col_max = col_arg = None
    start = 0
    rows, bases = [], []
    out = np.float64 if settings["precision"] == "fp64" else np.float32
    for k, fp in enumerate(final_paths):
        f = work.load(Path(fp), prefixes=tuple(f"p{j}_{key}" for key in (
            "mean_x", "m2_x", "row_max", "row_arg", "baseline", "c", "col_max", "col_arg")))
        zero_x = w.write_moments("ref", start, f[f"p{j}_mean_x"], f[f"p{j}_m2_x"], n)
        w.write_rows(start, f[f"p{j}_row_max"], f[f"p{j}_row_arg"], f[f"p{j}_baseline"],
                     zero_x)
        # the file's own numbers, for the convergence table's last row
        rows.append(np.where(zero_x, 0.0, f[f"p{j}_row_max"]).astype(out).astype(np.float64))
        base = np.array(f[f"p{j}_baseline"], dtype=out).reshape(-1, len(zero_x))
        base[:, zero_x] = 0.0
        bases.append(base.astype(np.float64))
        if settings["keep_covariance"]:
            w.write_cross_rows(start, f[f"p{j}_c"])
        cm, ca = f[f"p{j}_col_max"], f[f"p{j}_col_arg"]
        col_max, col_arg = (cm, ca) if k == 0 else merge_max(col_max, col_arg, cm, ca)
        start += len(zero_x)
        del f
    return col_max, col_arg, (np.concatenate(rows), np.concatenate(bases, axis=1))
