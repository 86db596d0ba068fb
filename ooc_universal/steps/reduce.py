"""The reduce: a Dask graph of blockwise co-moment tasks over activation stores.

For a reference store and the other models' stores at one checkpoint it writes, per pair,
RUN/reduce/<ref>__<other>.h5 (layout in the README): means and variances, row and column
max |argmax of the Pearson correlation over all neurons, the other model's within-layer
self co-moments, the rotation baseline's row maxima for K seeded draws, and on request
the cross co-moment matrix.

Graph (one driver, pure kernels):
  fold(g, p, c)      fold the token blocks of chain c into the accumulators of group g,
                     panel p; checkpoint the accumulator to .work/ every segment
  merge(g, p)        Chan-merge the chains (only when there are several)
  finalize(g, p)     row/col max of the panel and the baseline, from the accumulators
  assemble(pair)     gather the panels, write the pair's file (temp name + rename)
Tasks pass file paths, not arrays: a worker of a cluster opens the stores and the
checkpoints itself, and a killed run resumes from the last checkpoint on disk.

Failures: every task runs under run_task (one retry from its checkpoint, then one line
naming the task; a full disk is not retried). Ctrl-C makes the running fold checkpoint
what it has and stop. One process per output pair (a lock in RUN/reduce/). A re-run after
a kill that came between two pairs' commits finishes from the whole command's work dir.
Fault-injection points (faults.point) mark where the tests kill the process.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ooc_universal import __version__, faults
from ooc_universal.errors import OocError, StaleInputError
from ooc_universal.plan import PairShape, ReducePlan, describe, make_plan, measure_gemm_rate
from ooc_universal.rundir import (atomic_path, check_free_space, config_hash, disk_full, ensure_sidecar,
                     file_lock, human_bytes, is_disk_full, recorded_sha256, step_dir,
                     write_json_atomic)
from ooc_universal.formats.store import open_store

LAYOUT_VERSION = 1
MANIFEST = "manifest.json"  # in RUN/reduce/.work/<key>/: the pairs and folds of that work
ROW_STRIP = 4096  # rows per baseline GEMM strip: bounds the finalize's temporaries
TASK_RETRIES = 1  # a task that raises is run again this many times (it resumes from its
                  # checkpoint); then the step fails with one line naming the task


class TaskFailedError(OocError):
    """A task of the reduce graph failed after its retries."""


class ReduceInterrupted(KeyboardInterrupt):
    """Raised in a local task after Ctrl-C, once its progress is checkpointed."""


_CANCEL = threading.Event()  # set on Ctrl-C: local fold tasks checkpoint and stop


@dataclass(frozen=True)
class ReduceSettings:
    """What the numbers depend on; saved with every result (config_json)."""
    precision: str = "fp32"        # GEMM inputs: fp32 | bf16 (fp32 accumulation) | fp64
    baseline_draws: int = 1        # K seeded rotations of the other model
    seed: int = 0                  # draw j uses seed + j
    keep_covariance: bool = False  # also store the cross co-moment matrix (fp32)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + j for j in range(self.baseline_draws)]


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


def _torch():
    import torch
    return torch


def resolve_device(device: str) -> str:
    torch = _torch()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise OocError("--device cuda was asked for but torch sees no CUDA device; "
                       "use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise OocError(f"unknown device {device!r}; expected auto, cpu or cuda")
    return device


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


def output_path(run_dir, ref_label: str, other_label: str) -> Path:
    return Path(run_dir) / "reduce" / f"{ref_label}__{other_label}.h5"


# --------------------------------------------------------------------------- driver

def reduce(run_dir, reference: str, others: list, *, memory="4GB", device="auto",
           precision="fp32", baseline_draws=1, seed=0, keep_covariance=False,
           scheduler=None, block_tokens=None, max_panels=None, n_workers=None,
           checkpoint_blocks=None, dry_run=False, force=False, progress=True,
           gemm_rate=None):
    """Reduce `reference` against each of `others` (store labels, paths or model specs).

    Returns {"outputs": [paths], "plan": ReducePlan, "blocks_folded": int,
    "blocks_resumed": int, "skipped": [paths already complete]}; with dry_run the
    plan text is in "describe" and nothing is computed or written.
    """
    if not others:
        raise OocError("reduce needs at least one other model besides the reference; "
                       "pass two or more models")
    if baseline_draws < 0:
        raise OocError(f"--baseline-draws must be >= 0, got {baseline_draws}")
    device = resolve_device(device)
    settings = ReduceSettings(precision, int(baseline_draws), int(seed), bool(keep_covariance))
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

    out_dir = step_dir(run_dir, "reduce")
    with contextlib.ExitStack() as locks:
        if not dry_run:  # one writer per pair (other pairs may be reduced in parallel)
            for meta in sorted(metas, key=lambda m: m["label"]):
                out = output_path(run_dir, ref_meta["label"], meta["label"])
                locks.enter_context(file_lock(
                    out.with_name(f".{out.stem}.lock"), f"reduce output {str(out)!r}",
                    "wait for that reduce to finish (or stop it) and run this again"))
                for stale in out.parent.glob(f"{out.name}.tmp-*"):  # left by a kill
                    stale.unlink(missing_ok=True)
        try:
            return _reduce_locked(run_dir, out_dir, ref_path, ref_meta, other_paths, metas,
                                  settings, memory, device, precision, scheduler,
                                  block_tokens, max_panels, n_workers, checkpoint_blocks,
                                  dry_run, force, progress, gemm_rate)
        finally:
            release_stores([ref_path, *other_paths])


def _reduce_locked(run_dir, out_dir, ref_path, ref_meta, other_paths, metas, settings,
                   memory, device, precision, scheduler, block_tokens, max_panels, n_workers,
                   checkpoint_blocks, dry_run, force, progress, gemm_rate):
    todo, skipped = [], []
    for path, meta in zip(other_paths, metas):
        out = output_path(run_dir, ref_meta["label"], meta["label"])
        if out.exists() and not force:
            try:
                _check_existing(out, ref_meta, meta, settings)
                skipped.append(out)
                if not dry_run:
                    ensure_sidecar(out, _provenance(ref_meta, meta, settings))
                continue
            except StaleInputError:
                if not dry_run:
                    raise
            todo.append((path, meta))
        else:
            todo.append((path, meta))

    n_workers = n_workers or (_cluster_workers(scheduler) if scheduler else 1)

    def plan_for(pair_list):
        pairs = [PairShape(m["label"], m["n_neurons"], m["d_mlp"]) for _, m in pair_list]
        return make_plan(
            ref_meta["n_tokens"], ref_meta["n_neurons"], pairs or [PairShape("-", 1, 1)],
            memory=memory, device=device, precision=precision, n_workers=n_workers,
            store_chunk_rows=ref_meta["block_tokens"], block_tokens=block_tokens,
            max_panels=max_panels, baseline_draws=settings.baseline_draws,
            keep_covariance=settings.keep_covariance, blocks_per_segment=checkpoint_blocks)

    plan = plan_for(todo)
    result = {"outputs": [], "plan": plan, "blocks_folded": 0, "blocks_resumed": 0,
              "skipped": skipped}
    if dry_run:
        rate = gemm_rate or measure_gemm_rate(device, precision)
        result["describe"] = describe(plan, rate)
        return result
    if not todo:
        result["outputs"] = skipped
        # a kill after the last output was committed leaves that command's work dir
        leftover = out_dir / ".work" / _work_key(ref_meta, metas, plan_for(
            list(zip(other_paths, metas))), settings)
        shutil.rmtree(leftover, ignore_errors=True)
        return result

    need = _output_bytes(plan, settings) * 2  # checkpoints + final files
    check_free_space(out_dir, need, "the reduce's checkpoints and outputs")
    graph_pairs = todo
    key = _work_key(ref_meta, [m for _, m in todo], plan, settings)
    if skipped:
        # A kill after some pairs of this command were written: the work of the whole
        # command is on disk under the key of all its pairs; finish from there.
        every = list(zip(other_paths, metas))
        plan_all = plan_for(every)
        key_all = _work_key(ref_meta, metas, plan_all, settings)
        if (out_dir / ".work" / key_all).is_dir():
            graph_pairs, plan, key = every, plan_all, key_all
            result["plan"] = plan
    work_dir = out_dir / ".work" / key
    work_dir.mkdir(parents=True, exist_ok=True)
    for stale in work_dir.glob("*.tmp-*"):  # checkpoints half-written by a kill
        stale.unlink(missing_ok=True)
    if not (work_dir / MANIFEST).exists():  # what this work is for (read by `status`)
        write_json_atomic(work_dir / MANIFEST, {
            "reference": ref_meta["label"], "others": [m["label"] for _, m in graph_pairs],
            "outputs": [output_path(run_dir, ref_meta["label"], m["label"]).name
                        for _, m in graph_pairs],
            "total_folds": plan.n_blocks * len(plan.groups) * len(plan.panels),
            "token_hash": ref_meta["token_hash"], "settings": asdict(settings),
            "config_hash": config_hash(asdict(settings)), "toolkit_version": __version__})
    graph, fold_keys, out_keys = build_graph(
        plan, settings, work_dir, ref_path, [p for p, _ in graph_pairs], ref_meta,
        [m for _, m in graph_pairs], run_dir)
    todo_labels = {m["label"] for _, m in todo}
    out_keys = [k for k in out_keys if graph_pairs[k[1]][1]["label"] in todo_labels]
    counts = _execute(graph, out_keys, plan, scheduler, progress, work_dir)
    result["blocks_folded"], result["blocks_resumed"] = counts
    result["outputs"] = [output_path(run_dir, ref_meta["label"], m["label"]) for _, m in todo]
    shutil.rmtree(work_dir, ignore_errors=True)
    return result


def _provenance(ref_meta: dict, other_meta: dict, settings: "ReduceSettings") -> dict:
    """What the checksum sidecar of a reduce output records about its making."""
    def name(m):
        p = Path(m["path"])
        return f"stores/{p.name}" if p.parent.name == "stores" else str(p)
    return {"step": "reduce", "token_hash": ref_meta["token_hash"],
            "config_hash": config_hash(asdict(settings)),
            "inputs": {name(m): m.get("sha256") for m in (ref_meta, other_meta)}}


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


def _check_existing(out: Path, ref: dict, other: dict, settings: ReduceSettings) -> None:
    import h5py
    try:
        with h5py.File(out, "r") as f:
            attrs = dict(f.attrs)
    except OSError as exc:
        raise OocError(f"{str(out)!r} is not a readable HDF5 file ({exc}); delete it and "
                       "run the reduce again") from None
    if attrs.get("token_hash") != ref["token_hash"]:
        raise StaleInputError(
            f"{str(out)!r} was made from another token set; delete it or pass --force")
    config = json.loads(attrs.get("config_json", "{}"))
    for role, meta in (("reference_store", ref), ("other_store", other)):
        was, now = (config.get(role) or {}).get("sha256"), meta.get("sha256")
        if was and now and was != now:
            raise StaleInputError(
                f"{str(out)!r} was made from another version of activation store "
                f"{meta['label']} (sha256 {was[:12]}, now {now[:12]}); delete it or pass "
                "--force to recompute it")
    made = config.get("settings", {})
    if made != asdict(settings):
        raise StaleInputError(
            f"{str(out)!r} exists with other settings {made}, asked for {asdict(settings)}; "
            "pass --force to recompute it or use another run directory")


def _cluster_workers(scheduler: str) -> int:
    from distributed import Client
    with Client(scheduler, timeout="10s") as client:
        return max(1, len(client.scheduler_info().get("workers", {})))


def _work_key(ref: dict, others: list, plan: ReducePlan, settings: ReduceSettings) -> str:
    ident = {"ref": dict(ref), "others": [dict(o) for o in others],
             "settings": asdict(settings),
             "block_tokens": plan.block_tokens, "groups": plan.groups, "panels": plan.panels,
             "chains": plan.n_chains, "segment": plan.blocks_per_segment,
             "layout": LAYOUT_VERSION}
    for d in [ident["ref"], *ident["others"]]:
        d.pop("path", None)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _output_bytes(plan: ReducePlan, settings: ReduceSettings) -> int:
    acc = 8 if plan.precision == "fp64" else 4
    total = 0
    for p in plan.pairs:
        total += plan.n_ref * p.n_other * acc  # accumulator checkpoints
        if settings.keep_covariance:
            total += plan.n_ref * p.n_other * 4
    return total


def build_graph(plan: ReducePlan, settings: ReduceSettings, work_dir: Path, ref_path: Path,
                other_paths: list, ref_meta: dict, other_metas: list, run_dir):
    """The Dask graph (a plain dict) of fold -> merge -> finalize -> assemble tasks."""
    tag = work_dir.name
    graph, fold_keys = {}, []
    final_keys = {}
    for g, grp in enumerate(plan.groups):
        gpaths = tuple(str(other_paths[i]) for i in grp)
        d_others = tuple(other_metas[i]["d_mlp"] for i in grp)
        merged = {}
        for p, rows in enumerate(plan.panels):
            chain_keys = []
            for c in range(plan.n_chains):
                blocks = tuple(plan.chain_blocks(c))
                if not blocks:
                    continue
                task = FoldTask(str(work_dir), str(ref_path), gpaths, g, p, c, tuple(rows),
                                blocks, plan.block_tokens, plan.n_tokens,
                                plan.blocks_per_segment, plan.precision, plan.device,
                                p == 0, d_others)
                k = (f"fold-{tag}", g, p, c)
                graph[k] = (run_task, f"fold (group {g}, panel {p}, chain {c})",
                            fold_chain, task)
                chain_keys.append(k)
                fold_keys.append(k)
            mk = (f"merge-{tag}", g, p)
            graph[mk] = (run_task, f"merge (group {g}, panel {p})", merge_chains,
                         str(work_dir), g, p, chain_keys)
            merged[p] = mk
        for p, rows in enumerate(plan.panels):
            fk = (f"finalize-{tag}", g, p)
            graph[fk] = (run_task, f"finalize (group {g}, panel {p})", finalize_panel,
                         str(work_dir), g, p, tuple(rows), merged[p], merged[0], d_others,
                         settings, plan.device)
            final_keys[(g, p)] = fk
    out_keys = []
    for g, grp in enumerate(plan.groups):
        for j, i in enumerate(grp):
            ak = (f"assemble-{tag}", i)
            deps = [final_keys[(g, p)] for p in range(len(plan.panels))]
            out = output_path(run_dir, ref_meta["label"], other_metas[i]["label"])
            graph[ak] = (run_task, f"assemble ({out.name})", assemble_pair, str(out), j,
                         deps, ref_meta, other_metas[i], plan.to_dict(), settings,
                         plan.n_ref)
            out_keys.append(ak)
    return graph, fold_keys, out_keys


def _execute(graph, out_keys, plan, scheduler, progress, work_dir):
    """Run the graph locally (threads) or on a dask.distributed cluster.

    Returns (block folds computed by this run, block folds found checkpointed on disk).
    Locally the first number is counted fold by fold (work redone after a kill counts);
    on a cluster it is the total minus what was on disk."""
    total = plan.n_blocks * len(plan.groups) * len(plan.panels)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="block", desc="reduce", dynamic_ncols=True)
    done_before = _blocks_on_disk(work_dir, plan)
    if bar is not None:
        bar.update(done_before)
    _PROGRESS.reset()
    try:
        if scheduler:
            from distributed import Client
            with Client(scheduler) as client:
                if progress:
                    print(f"dask dashboard: {client.dashboard_link}")
                futures = client.get(graph, out_keys, sync=False)
                try:
                    for fut in futures:
                        fut.result()
                        if bar is not None:
                            bar.update(0)
                except Exception as exc:
                    if type(exc).__name__ == "KilledWorker":
                        first = (str(exc).strip().splitlines() or [""])[0]
                        raise TaskFailedError(
                            f"dask workers kept dying while running the reduce ({first}); "
                            "check the workers' memory limit and logs, then run the same "
                            "command again to resume from the checkpoints") from None
                    raise
            folded = total - done_before
        else:
            import dask
            import dask.threaded
            _PROGRESS.set(bar)
            _CANCEL.clear()
            # One worker thread: the GEMM is already multi-threaded inside torch.
            try:
                with dask.config.set(scheduler="threads"):
                    dask.threaded.get(graph, out_keys, num_workers=1)
            except KeyboardInterrupt:
                # Ctrl-C: the running fold checkpoints what it has and stops at its next
                # block, instead of the process waiting for the whole chain
                _CANCEL.set()
                raise
            folded = _PROGRESS.count
    finally:
        _PROGRESS.set(None)
        if bar is not None:
            bar.close()
    return folded, done_before


class _ProgressHook:
    """Thread-safe handle to the local run's progress bar (None on a cluster), and the
    count of block folds computed in this process since reset()."""

    def __init__(self):
        self._bar = None
        self._lock = threading.Lock()
        self.count = 0

    def set(self, bar):
        self._bar = bar

    def reset(self):
        with self._lock:
            self.count = 0

    def update(self, n=1):
        with self._lock:
            self.count += n
            if self._bar is not None:
                self._bar.update(n)


_PROGRESS = _ProgressHook()
_FOLD_FILE = re.compile(r"fold_g\d+_p\d+_c\d+\.npz")


def _blocks_on_disk(work_dir: Path, plan: ReducePlan) -> int:
    """Block folds held by the chain checkpoints in `work_dir` (temporaries excluded)."""
    n = 0
    for f in Path(work_dir).glob("fold_g*_p*_c*.npz"):
        if not _FOLD_FILE.fullmatch(f.name):
            continue
        try:
            with np.load(f) as z:
                n += int(z["n_blocks_done"])
        except Exception:
            pass
    return n


def run_task(name: str, fn, *args):
    """Run one task of the graph: retried TASK_RETRIES times when it raises (each task
    resumes from its own checkpoint); then one line naming the task. A full disk and
    user-fixable errors are not retried."""
    for attempt in range(TASK_RETRIES + 1):
        try:
            return fn(*args)
        except OocError:
            raise
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full(exc, f"reduce task {name}") from None
            err = exc
        except Exception as exc:  # noqa: BLE001 - reported below, with the task's name
            err = exc
        first = (str(err).strip().splitlines() or [""])[0]
        if attempt < TASK_RETRIES:
            print(f"warning: reduce task {name} failed ({type(err).__name__}: {first}); "
                  "retrying it from its last checkpoint", file=sys.stderr)
            continue
        raise TaskFailedError(
            f"reduce task {name} failed {attempt + 1} times ({type(err).__name__}: {first});"
            " its finished blocks are checkpointed: run the same command again to resume"
        ) from err


# --------------------------------------------------------------------------- tasks

def _fold_path(work_dir, g, p, c) -> Path:
    return Path(work_dir) / f"fold_g{g}_p{p}_c{c}.npz"


def _save_state(path: Path, state: dict, kind: str = "checkpoint") -> None:
    """Atomic: write beside, fsync, rename (a kill never leaves half a checkpoint).
    `kind` (checkpoint, merge, final) names its fault-injection points."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}-{threading.get_ident()}.npz")
    try:
        faults.point(f"reduce.{kind}.write")
        with open(tmp, "wb") as f:
            np.savez(f, **state)
            f.flush()
            faults.point(f"reduce.{kind}.mid_write",
                         torn=lambda: os.truncate(tmp, os.path.getsize(tmp) // 2))
            os.fsync(f.fileno())
        faults.point(f"reduce.{kind}.before_rename")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    faults.point(f"reduce.{kind}.after_rename")


def _load_state(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except Exception:
        return None  # an unreadable checkpoint is recomputed, never trusted


def _to_state(accs: list, selfs: list, next_block: int, n_done: int) -> dict:
    st = {"next_block": np.int64(next_block), "n_blocks_done": np.int64(n_done)}
    for i, a in enumerate(accs):
        st[f"acc{i}_n"] = np.int64(a["n"])
        for k in ("mean_x", "mean_y", "m2_x", "m2_y", "c"):
            st[f"acc{i}_{k}"] = _np(a[k])
    for i, s in enumerate(selfs):
        st[f"self{i}_n"] = np.int64(s["n"])
        for k in ("mean", "m2", "s"):
            st[f"self{i}_{k}"] = _np(s[k])
    return st


def _from_state(st: dict, n_pairs: int, with_self: bool, device: str):
    torch = _torch()
    accs, selfs = [], []
    for i in range(n_pairs):
        a = {"n": int(st[f"acc{i}_n"])}
        for k in ("mean_x", "mean_y", "m2_x", "m2_y", "c"):
            a[k] = torch.from_numpy(np.array(st[f"acc{i}_{k}"])).to(device)
        accs.append(a)
    if with_self:
        for i in range(n_pairs):
            s = {"n": int(st[f"self{i}_n"])}
            for k in ("mean", "m2", "s"):
                s[k] = torch.from_numpy(np.array(st[f"self{i}_{k}"])).to(device)
            selfs.append(s)
    return accs, selfs


def _np(t):
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


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


def load_block(store, start: int, stop: int, cols: tuple | None, out, allow_view=False):
    """Rows [start, stop) (columns `cols`) of a store as a torch tensor: with
    `allow_view`, a zero-copy view of the memory map when they lie in one chunk (the CPU
    path; the centring kernel reads fp16 itself), else copied into `out` (converted to
    its dtype in the same pass), chunk by chunk."""
    torch = _torch()
    bt = store.block_tokens
    c0, c1 = store.block_bounds(start // bt)
    if allow_view and stop <= c1 and store._mm is not None:
        view = store.read_block(start // bt)[start - c0:stop - c0]
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


def fold_chain(task: FoldTask) -> str:
    """Fold this chain's token blocks into the group's accumulators; checkpointed."""
    from ooc_universal.kernels.comoments import (centre_block, comoment_update_centred_, empty_comoments,
                                    self_comoment_centred, self_comoment_combine)
    torch = _torch()
    path = _fold_path(task.work_dir, task.group, task.panel, task.chain)
    n_pairs = len(task.other_paths)
    state = _load_state(path)
    if state is not None:
        start_at = int(state["next_block"])
        n_done = int(state["n_blocks_done"])
        accs, selfs = _from_state(state, n_pairs, task.with_self, task.device)
    else:
        start_at, n_done = task.blocks[0], 0
        accs, selfs = [], []
    if start_at > task.blocks[-1]:
        return str(path)  # finished on an earlier run

    ref = _cached_store(task.ref_path)
    others = [_cached_store(p) for p in task.other_paths]
    compute = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[task.precision]
    r0, r1 = task.rows
    # fp16 blocks, as stored: on a GPU through pinned buffers (half the bytes over the
    # bus); on a CPU straight from the memory map when a block lies in one chunk (the
    # centring kernel converts), else gathered into these buffers, allocated once
    pin = task.device == "cuda"
    xbuf = torch.empty(task.block_tokens, r1 - r0, dtype=torch.float16, pin_memory=pin)
    ybufs = [torch.empty(task.block_tokens, o.n_neurons, dtype=torch.float16,
                         pin_memory=pin) for o in others]
    if not accs:
        accs = [empty_comoments(r1 - r0, o.n_neurons, task.precision, task.device)
                for o in others]
    workspace = {}  # the kernels' reusable centring buffers, one set per task
    seg = 0
    for b in task.blocks:
        if b < start_at:
            continue
        if _CANCEL.is_set():
            if seg:
                _check_finite(task, accs, b - 1)
                _save_state(path, _to_state(accs, selfs, b, n_done))
            raise ReduceInterrupted(f"interrupted before block {b}")
        s, e = b * task.block_tokens, min(task.n_tokens, (b + 1) * task.block_tokens)
        x = load_block(ref, s, e, (r0, r1), xbuf, not pin).to(task.device, non_blocking=True)
        # centred once per block, whatever the number of pairs (and reused by the self
        # co-moments): conversion and centring are memory-bound, the GEMMs are not
        cx = centre_block(x, compute, workspace=workspace, role="x")
        for i, o in enumerate(others):
            y = load_block(o, s, e, None, ybufs[i], not pin).to(task.device, non_blocking=True)
            cy = centre_block(y, compute, workspace=workspace, role="y")
            comoment_update_centred_(accs[i], cx, cy)
            if task.with_self:
                sc = self_comoment_centred(cy, task.d_others[i])
                selfs_i = selfs[i] if len(selfs) > i else None
                merged = sc if selfs_i is None else self_comoment_combine(selfs_i, sc)
                if len(selfs) > i:
                    selfs[i] = merged
                else:
                    selfs.append(merged)
        for st in (ref, *others):  # done with these rows: keep RSS flat over the pass
            st.release_rows(s, e)
        n_done += 1
        seg += 1
        _PROGRESS.update(1)
        faults.point("reduce.fold.block")
        _test_hook_after_block()
        last = b == task.blocks[-1]
        if seg >= task.blocks_per_segment or last:
            _check_finite(task, accs, b)
            _save_state(path, _to_state(accs, selfs, b + 1, n_done))
            seg = 0
            _test_hook_after_checkpoint()
    return str(path)


def _check_finite(task: FoldTask, accs: list, block: int) -> None:
    """A NaN or Inf activation makes its neuron's running mean non-finite: refuse, naming
    the store and the neurons, before the checkpoint keeps it."""
    torch = _torch()
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


def _test_hook_after_block():
    """Fault-injection point for the tests (env OOC_TEST_SLEEP_PER_BLOCK, as in extract)."""
    delay = os.environ.get("OOC_TEST_SLEEP_PER_BLOCK")
    if delay:
        import time
        time.sleep(float(delay))


def _test_hook_after_checkpoint():
    """Fault-injection point for the tests (env OOC_TEST_SLEEP_AFTER_CHECKPOINT)."""
    delay = os.environ.get("OOC_TEST_SLEEP_AFTER_CHECKPOINT")
    if delay:
        import time
        time.sleep(float(delay))


def merge_chains(work_dir: str, g: int, p: int, chain_paths: list) -> str:
    """Chan-merge the chains of (g, p) into chain 0's file (a no-op for one chain)."""
    if len(chain_paths) <= 1:
        return chain_paths[0]
    from ooc_universal.kernels.comoments import comoment_combine, self_comoment_combine
    out = Path(work_dir) / f"merged_g{g}_p{p}.npz"
    if out.exists():
        return str(out)
    states = [_load_state(Path(c)) for c in chain_paths]
    n_pairs = sum(1 for k in states[0] if k.endswith("_n") and k.startswith("acc"))
    with_self = any(k.startswith("self") for k in states[0])
    accs, selfs = _from_state(states[0], n_pairs, with_self, "cpu")
    n_done = int(states[0]["n_blocks_done"])
    for st in states[1:]:
        a2, s2 = _from_state(st, n_pairs, with_self, "cpu")
        accs = [comoment_combine(a, b) for a, b in zip(accs, a2)]
        selfs = [self_comoment_combine(a, b) for a, b in zip(selfs, s2)]
        n_done += int(st["n_blocks_done"])
    _save_state(out, _to_state(accs, selfs, -1, n_done), "merge")
    return str(out)


def finalize_panel(work_dir, g, p, rows, state_path, self_state_path, d_others,
                   settings: ReduceSettings, device):
    """Row/col max and the rotation baseline of one panel, for each pair of the group."""
    from ooc_universal.kernels.rotation import rotated_row_max, rotation_matrix
    from ooc_universal.kernels.tilemax import tile_max
    out = Path(work_dir) / f"final_g{g}_p{p}.npz"
    if out.exists():
        return str(out)
    st = _load_state(Path(state_path))
    self_st = _load_state(Path(self_state_path))
    n_pairs = len(d_others)
    out_dtype = np.float64 if settings.precision == "fp64" else np.float32
    res = {}
    for i in range(n_pairs):
        c = st[f"acc{i}_c"]
        m2_x = st[f"acc{i}_m2_x"].astype(np.float64)
        m2_y = st[f"acc{i}_m2_y"].astype(np.float64)
        row_max, row_arg, col_max, col_arg = tile_max(c, m2_x, m2_y)
        res[f"p{i}_row_max"] = np.asarray(row_max, out_dtype)
        res[f"p{i}_row_arg"] = np.asarray(row_arg, np.int64)
        res[f"p{i}_col_max"] = np.asarray(col_max, out_dtype)
        res[f"p{i}_col_arg"] = np.asarray(col_arg, np.int64) + rows[0]
        for k in ("n", "mean_x", "mean_y", "m2_x", "m2_y"):
            res[f"p{i}_{k}"] = st[f"acc{i}_{k}"]
        s_all = self_st[f"self{i}_s"]
        res[f"p{i}_self_s"] = s_all
        d = d_others[i]
        n_layers = c.shape[1] // d
        base = np.full((settings.baseline_draws, c.shape[0]), -np.inf)
        for j, seed in enumerate(settings.seeds):
            for layer in range(n_layers):
                r = rotation_matrix(seed, layer, d)
                for a in range(0, c.shape[0], ROW_STRIP):
                    b = min(c.shape[0], a + ROW_STRIP)
                    m = rotated_row_max(c[a:b, layer * d:(layer + 1) * d], m2_x[a:b],
                                        s_all[layer], r)
                    np.maximum(base[j, a:b], m, out=base[j, a:b])
        base[~np.isfinite(base)] = 0.0
        res[f"p{i}_baseline"] = base.astype(out_dtype)
        if settings.keep_covariance:
            res[f"p{i}_c"] = c.astype(np.float32, copy=False)
    _save_state(out, res, "final")
    return str(out)


def assemble_pair(out_path, j, final_paths, ref_meta, other_meta, plan_dict,
                  settings: ReduceSettings, n_ref):
    """Gather panel results for pair j of its group into the pair's HDF5 file."""
    import h5py

    from ooc_universal.kernels.tilemax import merge_max
    finals = [_load_state(Path(f)) for f in final_paths]
    n = int(finals[0][f"p{j}_n"])
    mean_x = np.concatenate([f[f"p{j}_mean_x"] for f in finals]).astype(np.float64)
    m2_x = np.concatenate([f[f"p{j}_m2_x"] for f in finals]).astype(np.float64)
    mean_y = finals[0][f"p{j}_mean_y"].astype(np.float64)
    m2_y = finals[0][f"p{j}_m2_y"].astype(np.float64)
    row_max = np.concatenate([f[f"p{j}_row_max"] for f in finals])
    row_arg = np.concatenate([f[f"p{j}_row_arg"] for f in finals])
    col_max, col_arg = finals[0][f"p{j}_col_max"], finals[0][f"p{j}_col_arg"]
    for f in finals[1:]:
        col_max, col_arg = merge_max(col_max, col_arg, f[f"p{j}_col_max"], f[f"p{j}_col_arg"])
    baseline = np.concatenate([f[f"p{j}_baseline"] for f in finals], axis=1)
    zero_x, zero_y = m2_x <= 0, m2_y <= 0
    out_dtype = row_max.dtype  # float32, or float64 for fp64 reference runs
    row_max = np.where(zero_x, 0.0, row_max).astype(out_dtype)
    row_arg = np.where(zero_x, -1, row_arg).astype(np.int64)
    col_max = np.where(zero_y, 0.0, col_max).astype(out_dtype)
    col_arg = np.where(zero_y, -1, col_arg).astype(np.int64)
    baseline[:, zero_x] = 0.0

    config = {"settings": asdict(settings), "plan": _jsonable(plan_dict),
              "reference_store": ref_meta, "other_store": other_meta}
    with atomic_path(out_path, record=_provenance(ref_meta, other_meta, settings),
                     fault="reduce.assemble") as tmp:
        with h5py.File(tmp, "w") as f:
            a = f.attrs
            a["ref_label"], a["other_label"] = ref_meta["label"], other_meta["label"]
            a["ref_name"], a["other_name"] = ref_meta["name"], other_meta["name"]
            a["ref_step"], a["other_step"] = ref_meta["step"], other_meta["step"]
            a["ref_model_id"], a["other_model_id"] = ref_meta["model_id"], other_meta["model_id"]
            a["ref_revision"], a["other_revision"] = ref_meta["revision"], other_meta["revision"]
            a["token_hash"], a["n_tokens"] = ref_meta["token_hash"], n
            a["n_layers_ref"], a["d_mlp_ref"] = ref_meta["n_layers"], ref_meta["d_mlp"]
            a["n_layers_other"], a["d_mlp_other"] = other_meta["n_layers"], other_meta["d_mlp"]
            a["precision"] = settings.precision
            a["baseline_seeds"] = np.asarray(settings.seeds, dtype=np.int64)
            a["n_zero_var_ref"], a["n_zero_var_other"] = int(zero_x.sum()), int(zero_y.sum())
            a["config_json"] = json.dumps(config, sort_keys=True)
            a["toolkit_version"] = __version__
            a["layout_version"] = LAYOUT_VERSION
            f["ref/mean"], f["ref/var"], f["ref/zero_var"] = mean_x, m2_x / n, zero_x
            f["other/mean"], f["other/var"], f["other/zero_var"] = mean_y, m2_y / n, zero_y
            f["other/self_comoment"] = finals[0][f"p{j}_self_s"].astype(np.float64)
            faults.point("reduce.assemble.h5")  # the output's HDF5 file is open here
            f["row_max"], f["row_argmax"] = row_max, row_arg
            f["col_max"], f["col_argmax"] = col_max, col_arg
            f["baseline/row_max"] = baseline.astype(out_dtype)
            if settings.keep_covariance:
                c = np.concatenate([fi[f"p{j}_c"] for fi in finals], axis=0)
                f.create_dataset("cross_comoment", data=c.astype(np.float32),
                                 chunks=(min(c.shape[0], 1024), min(c.shape[1], 1024)))
    return str(out_path)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.__dict__ if hasattr(o, "__dict__")
                                 else str(o)))


def summary_line(result: dict) -> str:
    plan = result["plan"]
    return (f"reduced {len(result['outputs'])} pair(s): {result['blocks_folded']} block folds "
            f"computed, {result['blocks_resumed']} resumed from checkpoints, "
            f"{len(result['skipped'])} pair(s) already complete; "
            f"peak plan {human_bytes(plan.peak_bytes)}")
