"""The reduce step: co-moment statistics of a reference store against the other stores.

For a reference store and the other models' stores at one checkpoint it writes, per pair,
RUN/reduce/<ref>__<other>.h5 (formats/reduced.py has the layout): means and variances,
row and column max | argmax of the Pearson correlation over all neurons, the other
model's within-layer self co-moments, the rotation baseline's row maxima for K seeded
draws, and on request the cross co-moment matrix.

The step validates its inputs, asks plan.make_plan how to cut the work within the
memory budget, builds the task graph below and hands it to graph.execute:

  fold(g, p, c)      fold the token blocks of chain c into the accumulators of group g,
                     panel p (block reads through the store's API, the kernels of
                     kernels/comoments.py); checkpoint to the work dir every segment
  merge(g, p)        Chan-merge the chains (only when there are several)
  finalize(g, p)     row/col max of the panel (kernels/tilemax.py) and the rotation
                     baseline (kernels/rotation.rotation_baseline), from the accumulators
  assemble(pair)     stream the panels into the pair's file (formats/reduced.py)

Tasks pass file paths, not arrays: a worker of a cluster opens the stores and the
checkpoints itself, and a killed run resumes from the last checkpoint on disk. One
process per output pair (a lock in RUN/reduce/). A re-run after a kill that came between
two pairs' commits finishes from the whole command's work dir. Fault-injection points
(faults.point) mark where the tests kill the process.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ooc_universal import __version__, faults
from ooc_universal.config import ComputeConfig, ReduceConfig, validated
from ooc_universal.devices import device_name
from ooc_universal.errors import OocError, StaleInputError
from ooc_universal.formats.reduced import (LAYOUT_VERSION, PairHeader, WorkDir, create_reduced,
                                           open_reduced, pack_fold_state, reduced_path,
                                           remove_temporaries, unpack_fold_state)
from ooc_universal.formats.store import open_store
from ooc_universal.graph import (CANCEL, PROGRESS, TIMINGS, Interrupted, TaskFailedError,
                                 TaskGraph, cluster_workers, execute)
from ooc_universal.plan import PairShape, ReducePlan, describe, make_plan, measure_gemm_rate
from ooc_universal.rundir import (check_free_space, config_hash, ensure_sidecar, file_lock,
                                  human_bytes, recorded_sha256, step_dir)

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
    """Everything a worker needs to fold one chain: paths and numbers only."""
    work_dir: str
    ref_path: str
    other_paths: tuple
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
    with_self: bool        # panel 0 also accumulates the others' self co-moments
    d_others: tuple


@dataclass(frozen=True)
class Job:
    """One validated reduce command: the stores (metadata dicts, saved with every result),
    the settings and where it runs."""
    run_dir: Path
    ref: dict
    others: tuple          # (path, meta) of each other store
    settings: ReduceConfig
    compute: ComputeConfig
    device: str            # resolved: cpu, cuda, cuda:N

    @property
    def settings_dict(self) -> dict:
        return self.settings.model_dump()

    def output(self, meta: dict) -> Path:
        return reduced_path(self.run_dir, self.ref["label"], meta["label"])


# --------------------------------------------------------------------------- the step

def reduce(run_dir, reference: str, others: list, settings: ReduceConfig | None = None,
           compute: ComputeConfig | None = None, *, block_tokens=None, max_panels=None,
           n_workers=None, checkpoint_blocks=None, gemm_rate=None, dry_run=False,
           force=False, progress=True, **legacy):
    """Reduce `reference` against each of `others` (store labels, paths or model specs).

    settings: what the numbers depend on (saved with every result); compute: device,
    memory budget and cluster. The rest only cut the work differently (planner
    overrides: block_tokens, max_panels, n_workers, checkpoint_blocks; gemm_rate for the
    dry run's time estimate). The pre-section keywords (memory=, device=, precision=,
    baseline_draws=, seed=, keep_covariance=, scheduler=) still work and override the
    sections.

    Returns {"outputs": [paths], "plan": ReducePlan, "blocks_folded": int,
    "blocks_resumed": int, "skipped": [paths already complete], "timings": {phase:
    seconds} of this process's tasks, "zero_variance": {path: (n_ref, n_other) neurons
    of zero variance}}; with dry_run the plan text is in "describe" and
    nothing is computed or written.
    """
    settings, compute = _sections(settings, compute, legacy)
    job = _validated_job(run_dir, reference, others, settings, compute)
    tuning = dict(block_tokens=block_tokens, max_panels=max_panels, n_workers=n_workers,
                  checkpoint_blocks=checkpoint_blocks)
    paths = [Path(job.ref["path"]), *(p for p, _ in job.others)]
    with contextlib.ExitStack() as locks:
        if not dry_run:
            _lock_outputs(job, locks)
        try:
            return _reduce_locked(job, tuning, gemm_rate, dry_run, force, progress)
        finally:
            release_stores(paths)


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


def _validated_job(run_dir, reference, others, settings, compute) -> Job:
    if not others:
        raise OocError("reduce needs at least one other model besides the reference; "
                       "pass two or more models")
    device = device_name(compute.device)
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
    return Job(Path(run_dir), ref_meta, tuple(zip(other_paths, metas)), settings, compute,
               device)


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
        rate = gemm_rate or measure_gemm_rate(job.device, job.settings.precision)
        result["describe"] = describe(plan, rate)
        return result
    if not todo:
        result["outputs"] = skipped
        result["zero_variance"] = _zero_variance(skipped)
        # a kill after the last output was committed leaves that command's work dir
        WorkDir.of(job.run_dir, _work_key(job, job.others, plan_for(job.others))).remove()
        return result

    check_free_space(step_dir(job.run_dir, "reduce"), _output_bytes(plan, job.settings) * 2,
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
    work.create(_manifest(job, graph_pairs, plan))
    graph, outputs = build_graph(job, plan, work, graph_pairs)
    todo_labels = {m["label"] for _, m in todo}
    outputs = [k for k, label in outputs if label in todo_labels]
    done_before = work.blocks_done()
    result["blocks_folded"] = execute(graph, outputs, total=_total_folds(plan),
                                      done_before=done_before,
                                      scheduler=job.compute.scheduler or None,
                                      progress=progress)
    result["blocks_resumed"] = done_before
    result["timings"] = TIMINGS.snapshot()
    result["outputs"] = [job.output(m) for _, m in todo]
    result["zero_variance"] = _zero_variance(result["outputs"])
    work.remove()
    return result


def _pairs_to_do(job: Job, dry_run: bool, force: bool) -> tuple[list, list]:
    """(pairs still to reduce, outputs already complete with these settings)."""
    todo, skipped = [], []
    for path, meta in job.others:
        out = job.output(meta)
        if out.exists() and not force:
            try:
                _check_existing(out, job.ref, meta, job.settings_dict)
                skipped.append(out)
                if not dry_run:
                    ensure_sidecar(out, _provenance(job.ref, meta, job.settings_dict))
                continue
            except StaleInputError:
                if not dry_run:
                    raise
        todo.append((path, meta))
    return todo, skipped


def _plan(job: Job, pairs, n_workers: int, tuning: dict) -> ReducePlan:
    shapes = [PairShape(m["label"], m["n_neurons"], m["d_mlp"]) for _, m in pairs]
    s = job.settings
    return make_plan(
        job.ref["n_tokens"], job.ref["n_neurons"], shapes or [PairShape("-", 1, 1)],
        memory=job.compute.memory, device=job.device, precision=s.precision,
        n_workers=n_workers, store_chunk_rows=job.ref["block_tokens"],
        block_tokens=tuning["block_tokens"], max_panels=tuning["max_panels"],
        baseline_draws=s.baseline_draws, keep_covariance=s.keep_covariance,
        blocks_per_segment=tuning["checkpoint_blocks"])


def _total_folds(plan: ReducePlan) -> int:
    return plan.n_blocks * len(plan.groups) * len(plan.panels)


def _manifest(job: Job, pairs, plan: ReducePlan) -> dict:
    """What a work dir is for (read by `status`)."""
    return {"reference": job.ref["label"], "others": [m["label"] for _, m in pairs],
            "outputs": [job.output(m).name for _, m in pairs],
            "total_folds": _total_folds(plan), "token_hash": job.ref["token_hash"],
            "settings": job.settings_dict, "config_hash": config_hash(job.settings_dict),
            "toolkit_version": __version__}


def _provenance(ref_meta: dict, other_meta: dict, settings: dict) -> dict:
    """What the checksum sidecar of a reduce output records about its making."""
    def name(m):
        p = Path(m["path"])
        return f"stores/{p.name}" if p.parent.name == "stores" else str(p)
    return {"step": "reduce", "token_hash": ref_meta["token_hash"],
            "config_hash": config_hash(settings),
            "inputs": {name(m): m.get("sha256") for m in (ref_meta, other_meta)}}


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
    for d in [ident["ref"], *ident["others"]]:
        d.pop("path", None)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _output_bytes(plan: ReducePlan, settings: ReduceConfig) -> int:
    acc = 8 if plan.precision == "fp64" else 4
    total = 0
    for p in plan.pairs:
        total += plan.n_ref * p.n_other * acc  # accumulator checkpoints
        if settings.keep_covariance:
            total += plan.n_ref * p.n_other * 4
    return total


def _blocks_on_disk(work_dir, plan=None) -> int:
    """Block folds held by the chain checkpoints in `work_dir` (see WorkDir.blocks_done)."""
    return WorkDir(work_dir).blocks_done()


def summary_line(result: dict) -> str:
    plan = result["plan"]
    return (f"reduced {len(result['outputs'])} pair(s): {result['blocks_folded']} block folds "
            f"computed, {result['blocks_resumed']} resumed from checkpoints, "
            f"{len(result['skipped'])} pair(s) already complete; "
            f"peak plan {human_bytes(plan.peak_bytes)}")


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
    """fold -> merge -> finalize -> assemble tasks; returns the graph and, per pair,
    (its assemble key, its other label)."""
    graph = TaskGraph(work.path.name, "reduce")
    config = {"settings": job.settings_dict, "plan": plan.to_dict()}
    outputs = []
    for g, grp in enumerate(plan.groups):
        gpaths = tuple(str(pairs[i][0]) for i in grp)
        d_others = tuple(pairs[i][1]["d_mlp"] for i in grp)
        merged = [_add_folds(graph, plan, job, work, g, p, rows, gpaths, d_others)
                  for p, rows in enumerate(plan.panels)]
        finals = [graph.add("finalize", (g, p), f"finalize (group {g}, panel {p})",
                            finalize_panel, str(work.path), g, p, tuple(rows), merged[p],
                            merged[0], d_others, job.settings_dict)
                  for p, rows in enumerate(plan.panels)]
        for j, i in enumerate(grp):
            meta = pairs[i][1]
            out = job.output(meta)
            key = graph.add("assemble", (i,), f"assemble ({out.name})", assemble_pair,
                            str(out), j, finals, merged[0], job.ref, meta, config)
            outputs.append((key, meta["label"]))
    return graph, outputs


def _add_folds(graph, plan, job, work, g, p, rows, gpaths, d_others):
    """The fold tasks of (group g, panel p), one per chain, and their merge; returns the
    merge's key."""
    chain_keys = []
    for c in range(plan.n_chains):
        blocks = tuple(plan.chain_blocks(c))
        if not blocks:
            continue
        task = FoldTask(str(work.path), job.ref["path"], gpaths, g, p, c, tuple(rows), blocks,
                        plan.block_tokens, plan.n_tokens, plan.blocks_per_segment,
                        plan.precision, plan.device, p == 0, d_others)
        chain_keys.append(graph.add("fold", (g, p, c), f"fold (group {g}, panel {p}, chain {c})",
                                    fold_chain, task))
    return graph.add("merge", (g, p), f"merge (group {g}, panel {p})", merge_chains,
                     str(work.path), g, p, chain_keys)


# --------------------------------------------------------------------------- block reads

_STORE_CACHE: dict = {}
_STORE_LOCK = threading.Lock()


def _cached_store(path: str):
    """One open store per path per worker process (h5py objects never cross processes)."""
    with _STORE_LOCK:
        st = _STORE_CACHE.get(path)
        if st is None:
            st = _STORE_CACHE[path] = open_store(path)
        return st


def release_stores(paths) -> None:
    """Close this process's cached maps of `paths`: a study reduces one checkpoint after
    another in one process, and maps kept open would keep every store's pages resident."""
    with _STORE_LOCK:
        for p in paths:
            st = _STORE_CACHE.pop(str(p), None)
            if st is not None:
                st.close()


def _zero_copy_block(store, i: int):
    """Block i as a zero-copy read-only view of the memory map, or None when the store
    cannot hand one out (compressed: its read buffer is reused by the next read)."""
    return store.read_block(i) if store.memory_mapped else None


def load_block(store, start: int, stop: int, cols: tuple | None, out, allow_view=False):
    """Rows [start, stop) (columns `cols`) of a store as a torch tensor: with
    `allow_view`, a zero-copy view of the memory map when they lie in one chunk (the CPU
    path; the centring kernel reads fp16 itself), else copied into `out` (converted to
    its dtype in the same pass), chunk by chunk."""
    import torch
    bt = store.block_tokens
    c0, c1 = store.block_bounds(start // bt)
    view = _zero_copy_block(store, start // bt) if allow_view and stop <= c1 else None
    if view is not None:
        view = view[start - c0:stop - c0]
        if cols is not None:
            view = view[:, cols[0]:cols[1]]
        with warnings.catch_warnings():  # read-only memmap: the kernels only read it
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(view)
    row = 0
    for ci in range(start // bt, (stop - 1) // bt + 1):
        c0, c1 = store.block_bounds(ci)
        a, b = max(start, c0), min(stop, c1)
        chunk = store.read_block(ci)[a - c0:b - c0]
        if cols is not None:
            chunk = chunk[:, cols[0]:cols[1]]
        with warnings.catch_warnings():  # read-only memmap: torch only reads it here
            warnings.simplefilter("ignore", UserWarning)
            src = torch.from_numpy(chunk)
        out[row:row + (b - a)].copy_(src, non_blocking=True)
        row += b - a
    return out[:row]


# --------------------------------------------------------------------------- tasks

_COMPUTE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp64": "float64"}


def fold_chain(task: FoldTask) -> str:
    """Fold this chain's token blocks into the group's accumulators; checkpointed."""
    import torch
    work = WorkDir(task.work_dir)
    path = work.fold_path(task.group, task.panel, task.chain)
    state = work.load(path)
    if state is not None:
        start_at, n_done = int(state["next_block"]), int(state["n_blocks_done"])
        accs, selfs = _state_to_torch(state, task.device)
    else:
        start_at, n_done, accs, selfs = task.blocks[0], 0, [], []
    if start_at > task.blocks[-1]:
        return str(path)  # finished on an earlier run

    ref = _cached_store(task.ref_path)
    others = [_cached_store(p) for p in task.other_paths]
    compute = getattr(torch, _COMPUTE_DTYPES[task.precision])
    xbuf, ybufs = _block_buffers(task, others)
    if not accs:
        from ooc_universal.kernels.comoments import empty_comoments
        r0, r1 = task.rows
        accs = [empty_comoments(r1 - r0, o.n_neurons, task.precision, task.device)
                for o in others]
    workspace = {}  # the kernels' reusable centring buffers, one set per task
    seg = 0
    for b in task.blocks:
        if b < start_at:
            continue
        if CANCEL.is_set():
            if seg:
                _checkpoint(task, work, path, accs, selfs, b, n_done)
            raise Interrupted(f"interrupted before block {b}")
        _fold_block(task, b, ref, others, xbuf, ybufs, accs, selfs, compute, workspace)
        n_done += 1
        seg += 1
        PROGRESS.update(1)
        faults.point("reduce.fold.block")
        _test_hook("OOC_TEST_SLEEP_PER_BLOCK")
        if seg >= task.blocks_per_segment or b == task.blocks[-1]:
            _checkpoint(task, work, path, accs, selfs, b + 1, n_done)
            seg = 0
            _test_hook("OOC_TEST_SLEEP_AFTER_CHECKPOINT")
    return str(path)


def _block_buffers(task: FoldTask, others):
    """fp16 gather buffers, allocated once per task: blocks go to a GPU through pinned
    buffers (half the bytes over the bus); on a CPU a block that lies in one chunk is
    read straight from the memory map (the centring kernel converts), else gathered."""
    import torch
    pin = task.device.startswith("cuda")
    r0, r1 = task.rows
    xbuf = torch.empty(task.block_tokens, r1 - r0, dtype=torch.float16, pin_memory=pin)
    ybufs = [torch.empty(task.block_tokens, o.n_neurons, dtype=torch.float16, pin_memory=pin)
             for o in others]
    return xbuf, ybufs


def _fold_block(task, b, ref, others, xbuf, ybufs, accs, selfs, compute, workspace) -> None:
    """Fold token block b of the reference panel against every other store of the group."""
    from ooc_universal.kernels.comoments import (centre_block, comoment_update_centred_,
                                                 self_comoment_centred, self_comoment_combine)
    view = not task.device.startswith("cuda")
    s, e = b * task.block_tokens, min(task.n_tokens, (b + 1) * task.block_tokens)
    with TIMINGS.phase("read"):
        x = load_block(ref, s, e, task.rows, xbuf, view).to(task.device, non_blocking=True)
    # centred once per block, whatever the number of pairs (and reused by the self
    # co-moments): conversion and centring are memory-bound, the GEMMs are not
    with TIMINGS.phase("centre"):
        cx = centre_block(x, compute, workspace=workspace, role="x")
    for i, o in enumerate(others):
        with TIMINGS.phase("read"):
            y = load_block(o, s, e, None, ybufs[i], view).to(task.device, non_blocking=True)
        with TIMINGS.phase("centre"):
            cy = centre_block(y, compute, workspace=workspace, role="y")
        with TIMINGS.phase("cross_gemm"):
            comoment_update_centred_(accs[i], cx, cy)
        if task.with_self:
            with TIMINGS.phase("self_comoments"):
                sc = self_comoment_centred(cy, task.d_others[i])
                if i < len(selfs):
                    selfs[i] = self_comoment_combine(selfs[i], sc)
                else:
                    selfs.append(sc)
    with TIMINGS.phase("release"):
        for st in (ref, *others):  # done with these rows: keep RSS flat over the pass
            st.release_rows(s, e)


def _checkpoint(task, work, path, accs, selfs, next_block: int, n_done: int) -> None:
    with TIMINGS.phase("checkpoint"):
        _check_finite(task, accs, next_block - 1)
        work.save(path, pack_fold_state(_numpy(accs), _numpy(selfs), next_block, n_done))


def _numpy(records: list) -> list:
    return [{k: (v.detach().cpu().numpy() if hasattr(v, "detach") else v)
             for k, v in r.items()} for r in records]


def _state_to_torch(state: dict, device: str) -> tuple[list, list]:
    import torch
    accs, selfs = unpack_fold_state(state)

    def tensors(r):
        return {k: (v if k == "n" else torch.from_numpy(np.array(v)).to(device))
                for k, v in r.items()}
    return [tensors(a) for a in accs], [tensors(s) for s in selfs]


def _check_finite(task: FoldTask, accs: list, block: int) -> None:
    """A NaN or Inf activation makes its neuron's running mean non-finite: refuse, naming
    the store and the neurons, before the checkpoint keeps it."""
    import torch
    checks = [(task.ref_path, accs[0]["mean_x"], task.rows[0])] if accs else []
    checks += [(p, a["mean_y"], 0) for p, a in zip(task.other_paths, accs)]
    for path, mean, offset in checks:
        bad = (~torch.isfinite(mean)).nonzero().flatten()
        if len(bad):
            first = ", ".join(str(int(i) + offset) for i in bad[:5])
            raise OocError(
                f"activation store {str(path)!r} has NaN or Inf activations in {len(bad)} "
                f"neuron(s) (flat index {first}{' ...' if len(bad) > 5 else ''}) by token "
                f"block {block}; re-extract it from a sound checkpoint (Inf means "
                "activations beyond the float16 range)")


def _test_hook(env: str) -> None:
    """Fault-injection points for the tests: sleep OOC_TEST_SLEEP_PER_BLOCK seconds after
    each block, OOC_TEST_SLEEP_AFTER_CHECKPOINT after each checkpoint (as in extract)."""
    delay = os.environ.get(env)
    if delay:
        import time
        time.sleep(float(delay))


def merge_chains(work_dir: str, g: int, p: int, chain_paths: list) -> str:
    """Chan-merge the chains of (g, p) into one file (a no-op for one chain)."""
    if len(chain_paths) <= 1:
        return chain_paths[0]
    from ooc_universal.kernels.comoments import comoment_combine, self_comoment_combine
    work = WorkDir(work_dir)
    out = work.merged_path(g, p)
    if out.exists():
        return str(out)
    with TIMINGS.phase("chan_merge"):
        states = [work.load(Path(c)) for c in chain_paths]
        accs, selfs = _state_to_torch(states[0], "cpu")
        n_done = int(states[0]["n_blocks_done"])
        for st in states[1:]:
            a2, s2 = _state_to_torch(st, "cpu")
            accs = [comoment_combine(a, b) for a, b in zip(accs, a2)]
            selfs = [self_comoment_combine(a, b) for a, b in zip(selfs, s2)]
            n_done += int(st["n_blocks_done"])
        work.save(out, pack_fold_state(_numpy(accs), _numpy(selfs), -1, n_done), "merge")
    return str(out)


def finalize_panel(work_dir, g, p, rows, state_path, self_state_path, d_others,
                   settings: dict) -> str:
    """Row/col max and the rotation baseline of one panel, for each pair of the group."""
    from ooc_universal.kernels.rotation import rotation_baseline
    from ooc_universal.kernels.tilemax import tile_max
    work = WorkDir(work_dir)
    out = work.final_path(g, p)
    if out.exists():
        return str(out)
    st = work.load(Path(state_path))
    self_st = work.load(Path(self_state_path), prefixes=("self",))
    seeds = [settings["seed"] + j for j in range(settings["baseline_draws"])]
    out_dtype = np.float64 if settings["precision"] == "fp64" else np.float32
    res = {}
    for i, d in enumerate(d_others):
        c = st[f"acc{i}_c"]
        m2_x = st[f"acc{i}_m2_x"].astype(np.float64)
        m2_y = st[f"acc{i}_m2_y"].astype(np.float64)
        with TIMINGS.phase("tile_max"):
            row_max, row_arg, col_max, col_arg = tile_max(c, m2_x, m2_y)
        res[f"p{i}_row_max"] = np.asarray(row_max, out_dtype)
        res[f"p{i}_row_arg"] = np.asarray(row_arg, np.int64)
        res[f"p{i}_col_max"] = np.asarray(col_max, out_dtype)
        res[f"p{i}_col_arg"] = np.asarray(col_arg, np.int64) + rows[0]
        for k in ("n", "mean_x", "mean_y", "m2_x", "m2_y"):
            res[f"p{i}_{k}"] = st[f"acc{i}_{k}"]
        with TIMINGS.phase("baseline"):
            base = rotation_baseline(c, m2_x, self_st[f"self{i}_s"], seeds, d)
        res[f"p{i}_baseline"] = base.astype(out_dtype)
        if settings["keep_covariance"]:
            res[f"p{i}_c"] = c.astype(np.float32, copy=False)
    with TIMINGS.phase("finalize_save"):
        work.save(out, res, "final")
    return str(out)


def assemble_pair(out_path, j, final_paths, self_state_path, ref_meta, other_meta,
                  config: dict) -> str:
    """Stream the panels of pair j of its group into the pair's file: one panel's
    results in memory at a time, never all of them."""
    from ooc_universal.kernels.tilemax import merge_max
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
            w.write_self_comoment(
                work.load(Path(self_state_path), prefixes=(f"self{j}_s",))[f"self{j}_s"])
            col_max = col_arg = None
            start = 0
            for k, fp in enumerate(final_paths):
                f = work.load(Path(fp), prefixes=(f"p{j}_",))
                zero_x = w.write_moments("ref", start, f[f"p{j}_mean_x"], f[f"p{j}_m2_x"], n)
                w.write_rows(start, f[f"p{j}_row_max"], f[f"p{j}_row_arg"],
                             f[f"p{j}_baseline"], zero_x)
                if settings["keep_covariance"]:
                    w.write_cross_rows(start, f[f"p{j}_c"])
                cm, ca = f[f"p{j}_col_max"], f[f"p{j}_col_arg"]
                col_max, col_arg = (cm, ca) if k == 0 else merge_max(col_max, col_arg, cm, ca)
                start += len(zero_x)
                del f
            w.write_cols(col_max, col_arg, zero_y)
    return str(out_path)
