"""Leftovers of interrupted or superseded work, and their removal (`ooc-universal clean`).

A reduce keeps its checkpoints in RUN/reduce/.work/<key>/ until its pairs are written;
a reduce re-run with other settings (or over other stores) starts a new key and the old
one is left behind (23 GB for one pair at the paper's width). Killed writers also leave
`*.tmp-*` files and `report.tmp-*` folders. `leftovers()` lists them with their sizes;
`clean()` removes them, each under the lock its writer holds, so nothing that is being
written right now is touched.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ooc_universal.errors import OocError
from ooc_universal.formats.reduced import list_work, reduced_path
from ooc_universal.rundir import file_lock, human_bytes, writer_alive


@dataclass
class Leftover:
    path: Path          # what would be removed
    size: int           # bytes on disk
    kind: str           # "reduce work" | "temporary"
    why: str            # in words: why it is not needed, or what it still holds
    outputs: tuple = ()  # the reduce outputs it was for (their locks guard it)
    in_progress: bool = False  # a partial reduce that the same command can finish

    def describe(self, run_dir) -> str:
        return f"{_rel(self.path, run_dir)} ({human_bytes(self.size)}): {self.why}"


def leftovers(run_dir) -> list[Leftover]:
    """Everything in `run_dir` that no finished output needs (reads only)."""
    run = Path(run_dir)
    return _work_leftovers(run) + _temporaries(run)


def clean(run_dir, *, include_partial: bool = False, dry_run: bool = False) -> list[Leftover]:
    """Remove the leftovers of `run_dir` (partial reduces too when `include_partial`);
    returns what was (or, with dry_run, would be) removed."""
    run = Path(run_dir)
    if not run.is_dir():
        raise OocError(f"run directory {str(run)!r} does not exist; give the --run-dir of a run")
    gone = []
    for item in leftovers(run):
        if item.in_progress and not include_partial:
            continue
        if not dry_run:
            _remove(run, item)
        gone.append(item)
    return gone


def _work_leftovers(run: Path) -> list[Leftover]:
    work = list_work(run)
    newest = {}  # output name -> newest work dir for it that is still missing
    for wd, m in work:
        for out in m.get("outputs", []):
            if not (run / "reduce" / out).exists():
                prev = newest.get(out)
                if prev is None or _mtime(wd.path) > _mtime(prev.path):
                    newest[out] = wd
    items = []
    for wd, m in work:
        outs = tuple(m.get("outputs", []))
        done = [o for o in outs if (run / "reduce" / o).exists()]
        size = _size(wd.path)
        if len(done) == len(outs):
            why = "checkpoints of a reduce whose outputs are all complete"
            items.append(Leftover(wd.path, size, "reduce work", why, outs))
        elif any(newest.get(o) is wd for o in outs if o not in done):
            why = (f"partial reduce of {', '.join(o for o in outs if o not in done)}: "
                   f"{wd.blocks_done()}/{m.get('total_folds')} block folds")
            items.append(Leftover(wd.path, size, "reduce work", why, outs, in_progress=True))
        else:
            why = "superseded: a newer reduce of the same outputs (other settings or inputs)"
            items.append(Leftover(wd.path, size, "reduce work", why, outs))
    return items


def _temporaries(run: Path) -> list[Leftover]:
    items = []
    for p in sorted(run.rglob("*.tmp-*")):
        if ".work" in p.parts or writer_alive(p.name):  # a work dir goes whole
            continue
        items.append(Leftover(p, _size(p), "temporary", "left by a killed writer"))
    return items


def _remove(run: Path, item: Leftover) -> None:
    locks = [reduced_path(run, *Path(o).stem.split("__", 1)) for o in item.outputs]
    from contextlib import ExitStack
    with ExitStack() as stack:
        for out in locks:  # the reduce's own per-output lock: never under a live reduce
            stack.enter_context(file_lock(out.with_name(f".{out.stem}.lock"),
                                          f"reduce output {str(out)!r}",
                                          "stop that reduce first, or wait for it"))
        if item.path.is_dir():
            shutil.rmtree(item.path, ignore_errors=True)
        else:
            item.path.unlink(missing_ok=True)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _mtime(path: Path) -> float:
    try:
        return (path / "manifest.json").stat().st_mtime
    except OSError:
        return 0.0


def _rel(path: Path, run_dir) -> str:
    try:
        return str(Path(path).relative_to(run_dir))
    except ValueError:
        return str(path)
