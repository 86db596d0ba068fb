"""The run's disk budget: whether the study's activation stores fit at once or one
checkpoint at a time, and releasing a checkpoint's stores once every step that reads them
is complete.

In store mode the stores dominate the disk (paper: 15 stores of 369 GB). When all of them
do not fit in the budget (`--disk`, default: the free space under the run directory plus
what the run's stores already hold, minus a margin), `run` processes one checkpoint at a
time: extract its models, reduce its pairs, then delete its stores (unless
`--keep-stores`), so the peak is one checkpoint's stores plus every checkpoint's reduce
outputs and the largest work directory. The reduce is the only step that reads stores;
a store is released only after its checkpoint's pair files are complete. With `--source
stream` there are no stores: the plan counts the reduce outputs and work directory only.

RUN/stores/released.json records each released store ({label: {sha256, bytes,
checkpoint, read_by, released_at}}), so a resumed run does not extract it again and
`status` can say where it went.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ooc_universal.errors import OocError, UsageError
from ooc_universal.rundir import (existing_parent, human_bytes, read_json_document,
                                  read_sidecar, sidecar_path, step_dir, write_json_atomic)

MARGIN_FRACTION = 0.02     # of the budget, kept free for logs, the HF cache's growth, ...
MARGIN_MIN = 1 << 30       # at least 1 GiB
RELEASED = "released.json"


@dataclass(frozen=True)
class DiskPlan:
    budget: int             # bytes the run may occupy under its directory
    budget_from: str        # "--disk 2TB" or "free space under /x (+ stores already there)"
    store_bytes: int        # one store
    n_models: int
    n_checkpoints: int
    output_bytes: int       # one checkpoint's reduce outputs
    work_bytes: int         # the largest reduce work directory
    mode: str               # "all" (every store at once) | "per-checkpoint"

    @property
    def all_at_once(self) -> int:
        return self.n_checkpoints * (self.n_models * self.store_bytes + self.output_bytes) \
            + self.work_bytes

    @property
    def per_checkpoint(self) -> int:
        return self.n_models * self.store_bytes + self.n_checkpoints * self.output_bytes \
            + self.work_bytes

    @property
    def peak(self) -> int:
        return self.all_at_once if self.mode == "all" else self.per_checkpoint

    def describe(self) -> str:
        if not self.store_bytes:
            return (f"peak {human_bytes(self.peak)} of a {human_bytes(self.budget)} budget "
                    f"({self.budget_from}): no activation stores (--source stream), the "
                    "reduce outputs and one work directory only")
        if self.mode == "all":
            how = "every checkpoint's stores at once"
        else:
            how = (f"one checkpoint at a time (all at once would need "
                   f"{human_bytes(self.all_at_once)}); a checkpoint's stores are deleted "
                   "once its reduce is complete, unless --keep-stores")
        return (f"peak {human_bytes(self.peak)} of a {human_bytes(self.budget)} budget "
                f"({self.budget_from}): {how}")


def margin(n_bytes: int) -> int:
    return max(MARGIN_MIN, int(n_bytes * MARGIN_FRACTION))


def disk_budget(run_dir, stated: str = "") -> tuple[int, str]:
    """(bytes, where they come from): `stated` (a size such as 2TB) as given, else the free
    space under the run directory plus the bytes its stores already occupy, less a margin."""
    from ooc_universal.plan import parse_bytes
    if stated:
        return parse_bytes(stated), f"--disk {stated}"
    root = existing_parent(run_dir)
    free = shutil.disk_usage(root).free
    held = stores_bytes(run_dir)
    budget = max(0, free + held - margin(free + held))
    return budget, (f"free space under {str(root)!r}" + (f" + {human_bytes(held)} of stores "
                                                         "already there" if held else "")
                    + f", less a {human_bytes(margin(free + held))} margin")


def stores_bytes(run_dir) -> int:
    """Bytes of the stores (finished and partial) already in RUN/stores."""
    folder = Path(run_dir) / "stores"
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.is_file() and (p.suffix == ".h5" or p.name.endswith(".h5.partial")))


def plan_disk(n_models: int, n_checkpoints: int, store_bytes: int, output_bytes: int,
              work_bytes: int, budget: int, budget_from: str,
              keep_stores: bool = False) -> DiskPlan:
    """How the study's stores fit the budget; one line when not even one checkpoint's do."""
    plan = DiskPlan(budget, budget_from, store_bytes, n_models, n_checkpoints, output_bytes,
                    work_bytes, "all")
    if plan.all_at_once <= budget:
        return plan
    if not store_bytes:  # streamed: nothing to make one checkpoint at a time
        raise UsageError(
            f"not enough disk for the reduce outputs: needs {human_bytes(plan.all_at_once)}, "
            f"the budget is {human_bytes(budget)} ({budget_from}); give a larger --disk, "
            "fewer models or checkpoints, or a run directory on a larger disk")
    if keep_stores and n_checkpoints > 1:
        raise UsageError(
            f"--keep-stores needs {human_bytes(plan.all_at_once)} for every checkpoint's "
            f"stores, more than the disk budget {human_bytes(budget)} ({budget_from}); drop "
            "--keep-stores, give a larger --disk or a run directory on a larger disk")
    plan = DiskPlan(budget, budget_from, store_bytes, n_models, n_checkpoints, output_bytes,
                    work_bytes, "per-checkpoint")
    if plan.per_checkpoint > budget:
        raise UsageError(
            f"not enough disk for one checkpoint's {n_models} stores of "
            f"{human_bytes(store_bytes)}: needs {human_bytes(plan.per_checkpoint)}, the budget "
            f"is {human_bytes(budget)} ({budget_from}); use --source stream (no stores), "
            "fewer --n-tokens, or a run directory on a larger disk")
    return plan


# ------------------------------------------------------------------- released stores

def released(run_dir) -> dict:
    """{label: record} of the stores this run has deleted after their readers finished."""
    path = Path(run_dir) / "stores" / RELEASED
    if not path.exists():
        return {}
    doc = read_json_document(path, "run")
    if not isinstance(doc, dict) or not isinstance(doc.get("stores"), dict):
        raise OocError(f"{str(path)!r} is not a record of released stores; delete it and "
                       "run the same command again (its stores are then extracted again)")
    return doc["stores"]


def release_stores(run_dir, labels: list, checkpoint, read_by: list) -> int:
    """Delete the stores of `labels` (and their sidecars) after recording them; the
    caller has checked that every file in `read_by` (their readers' outputs) is complete.
    Returns the bytes freed."""
    missing = [str(p) for p in read_by if not Path(p).exists() or read_sidecar(p) is None]
    if missing:
        raise OocError(f"refusing to delete the stores of checkpoint {checkpoint}: their "
                       f"readers' outputs are not complete ({', '.join(missing)})")
    folder = step_dir(run_dir, "stores")
    record = released(run_dir)
    paths = [folder / f"{label}.h5" for label in labels]
    for label, path in zip(labels, paths):
        if path.exists():
            side = read_sidecar(path) or {}
            record[label] = {"sha256": side.get("sha256"), "bytes": path.stat().st_size,
                             "checkpoint": checkpoint,
                             "read_by": [Path(p).name for p in read_by],
                             "released_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    # the record first, for all of them: a kill before the deletions are done leaves
    # stores marked released that are still there (harmless), never a deleted store
    # without its record
    write_json_atomic(folder / RELEASED, {"stores": record})
    freed = 0
    for path in paths:
        if path.exists():
            freed += path.stat().st_size
            path.unlink()
            sidecar_path(path).unlink(missing_ok=True)
    return freed
