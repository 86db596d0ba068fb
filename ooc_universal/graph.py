"""The one Dask driver: task graphs built from named tasks, run locally or on a cluster.

A step describes its work as tasks (TaskGraph.add: a kind, an index, a name for
messages, a function and its arguments, where an argument may be another task's key) and
hands the graph to `execute`, which runs it

  locally        dask's threaded scheduler with ONE worker thread (the kernels are
                 multi-threaded inside torch and numba already), a tqdm bar fed by
                 PROGRESS, and Ctrl-C turned into CANCEL so the running task can
                 checkpoint what it has before the KeyboardInterrupt propagates;
  on a cluster   dask.distributed at `scheduler` (workers must see the same paths).

Keys are (f"{kind}-{tag}", *index) with `tag` a content hash of what the graph computes
(the reduce's work key), so graphs of different inputs never share a key on a cluster
and the same command always rebuilds the same keys.

Every task runs under run_task: retried TASK_RETRIES times when it raises (a task resumes
from its own checkpoint), then one line naming it; user-fixable errors (OocError) and a
full disk are not retried. Tasks record where their time goes in TIMINGS (local runs),
which the caller reads after execute (the bench's breakdown comes from there).

Memory: tasks are planned to fit a budget one at a time, so what a finished task freed
must leave the process. With glibc, execute fixes malloc's mmap threshold at 1 MiB
(by default it grows to 32 MiB after a large free, and freed heap blocks below it stay
resident) and every task ends with malloc_trim (trim_heap).
"""
from __future__ import annotations

import functools
import sys
import threading
import time
from contextlib import contextmanager

from ooc_universal.errors import OocError
from ooc_universal.rundir import disk_full, is_disk_full

TASK_RETRIES = 1  # a task that raises is run again this many times (it resumes from its
                  # checkpoint); then the step fails with one line naming the task


class TaskFailedError(OocError):
    """A task of a graph failed after its retries."""


class Interrupted(KeyboardInterrupt):
    """Raised in a local task after Ctrl-C, once its progress is checkpointed."""


CANCEL = threading.Event()  # set on Ctrl-C: local tasks checkpoint and stop


class ProgressHook:
    """Thread-safe handle to the local run's progress bar (None on a cluster), and the
    count of units (block folds) computed in this process since reset()."""

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


PROGRESS = ProgressHook()


class Timings:
    """Seconds per named phase, summed over the tasks of this process (thread-safe).
    Tasks wrap their phases in `with TIMINGS.phase("read"):`; the cost is four clock
    reads per phase. Wall seconds, and the process's CPU-seconds (all its threads: a
    local graph runs one task at a time, so they are the phase's; on a busy machine the
    CPU-seconds are what a phase cost). On a GPU the phases are not synchronised: times
    are launch times except where a phase waits for its result."""

    def __init__(self):
        self._lock = threading.Lock()
        self._seconds: dict = {}
        self._cpu: dict = {}
        self._calls: dict = {}

    def reset(self) -> None:
        with self._lock:
            self._seconds.clear()
            self._cpu.clear()
            self._calls.clear()

    def add(self, name: str, seconds: float, cpu_seconds: float = 0.0) -> None:
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds
            self._cpu[name] = self._cpu.get(name, 0.0) + cpu_seconds
            self._calls[name] = self._calls.get(name, 0) + 1

    @contextmanager
    def phase(self, name: str):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0, time.process_time() - c0)

    def snapshot(self) -> dict:
        """{phase: seconds} so far."""
        with self._lock:
            return dict(self._seconds)

    def cpu_snapshot(self) -> dict:
        """{phase: CPU-seconds of the process} so far."""
        with self._lock:
            return dict(self._cpu)

    def calls(self) -> dict:
        with self._lock:
            return dict(self._calls)


TIMINGS = Timings()


class TaskGraph:
    """A Dask graph (a plain dict) of named tasks, each run under run_task."""

    def __init__(self, tag: str, what: str):
        self.tag = tag      # content hash shared by every key of this graph
        self.what = what    # the step, for messages ("reduce task fold (...) failed")
        self.tasks: dict = {}

    def add(self, kind: str, index: tuple, name: str, fn, *args) -> tuple:
        """Add a task; returns its key. Keys of other tasks among `args` (also inside
        lists) are replaced by their results when it runs."""
        key = (f"{kind}-{self.tag}", *index)
        self.tasks[key] = (run_task, self.what, name, fn, *args)
        return key

    def keys(self, kind: str) -> list:
        return [k for k in self.tasks if k[0] == f"{kind}-{self.tag}"]


_MMAP_THRESHOLD = 1 << 20   # allocations of this size or more are mapped on their own
_M_MMAP_THRESHOLD = -3      # glibc's mallopt parameter number


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes
    import ctypes.util
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def fix_mmap_threshold() -> None:
    """glibc: map allocations of >= 1 MiB on their own, returned to the OS when freed
    (no effect elsewhere)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


def trim_heap() -> None:
    """glibc: give the heap's free memory back to the OS (no effect elsewhere)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def run_task(what: str, name: str, fn, *args):
    """Run one task: retried TASK_RETRIES times when it raises; then one line naming the
    task. A full disk and user-fixable errors are not retried. The heap is trimmed after
    each (the next task's budget starts from what is really held)."""
    fix_mmap_threshold()  # here too: on a cluster, tasks run in the workers
    try:
        return _run_with_retries(what, name, fn, *args)
    finally:
        trim_heap()


def _run_with_retries(what: str, name: str, fn, *args):
    for attempt in range(TASK_RETRIES + 1):
        try:
            return fn(*args)
        except OocError:
            raise
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full(exc, f"{what} task {name}") from None
            err = exc
        except Exception as exc:  # noqa: BLE001 - reported below, with the task's name
            err = exc
        first = (str(err).strip().splitlines() or [""])[0]
        if attempt < TASK_RETRIES:
            print(f"warning: {what} task {name} failed ({type(err).__name__}: {first}); "
                  "retrying it from its last checkpoint", file=sys.stderr)
            continue
        raise TaskFailedError(
            f"{what} task {name} failed {attempt + 1} times ({type(err).__name__}: {first});"
            " its finished blocks are checkpointed: run the same command again to resume"
        ) from err


def cluster_workers(scheduler: str) -> int:
    """Workers of the dask.distributed cluster at `scheduler` (at least 1)."""
    from distributed import Client
    with Client(scheduler, timeout="10s") as client:
        return max(1, len(client.scheduler_info().get("workers", {})))


def execute(graph: TaskGraph, outputs: list, *, total: int, done_before: int,
            scheduler: str | None = None, progress: bool = True, unit: str = "block") -> int:
    """Run the tasks `outputs` (and what they need). Returns the units computed by this
    run: locally counted as tasks report them through PROGRESS (work redone after a
    kill counts); on a cluster, `total - done_before`. The bar starts at done_before."""
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit=unit, desc=graph.what, dynamic_ncols=True)
        bar.update(done_before)
    PROGRESS.reset()
    TIMINGS.reset()
    fix_mmap_threshold()
    trim_heap()
    try:
        if scheduler:
            _run_on_cluster(graph, outputs, scheduler, progress)
            return total - done_before
        PROGRESS.set(bar)
        _run_locally(graph, outputs)
        return PROGRESS.count
    finally:
        PROGRESS.set(None)
        if bar is not None:
            bar.close()


def _run_locally(graph: TaskGraph, outputs: list) -> None:
    import dask
    import dask.threaded
    CANCEL.clear()
    try:
        with dask.config.set(scheduler="threads"):
            dask.threaded.get(graph.tasks, outputs, num_workers=1)
    except KeyboardInterrupt:
        # Ctrl-C: the running task checkpoints what it has and stops at its next
        # block, instead of the process waiting for the whole chain
        CANCEL.set()
        raise


def _run_on_cluster(graph: TaskGraph, outputs: list, scheduler: str, progress: bool) -> None:
    from distributed import Client
    with Client(scheduler) as client:
        if progress:
            print(f"dask dashboard: {client.dashboard_link}", file=sys.stderr)
        futures = client.get(graph.tasks, outputs, sync=False)
        try:
            for fut in futures:
                fut.result()
        except Exception as exc:
            if type(exc).__name__ == "KilledWorker":
                first = (str(exc).strip().splitlines() or [""])[0]
                raise TaskFailedError(
                    f"dask workers kept dying while running the {graph.what} ({first}); "
                    "check the workers' memory limit and logs, then run the same "
                    "command again to resume from the checkpoints") from None
            raise
