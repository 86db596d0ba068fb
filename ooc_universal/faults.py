"""Fault-injection points for the test suite (inert unless an OOC_TEST_* variable is set).

The library calls `point("store.block.before_ledger")` at the places where a crash or a
full disk matters. A test sets, in the environment of the process under test:

  OOC_TEST_KILL_AT=LABEL:N[,LABEL:N...]     SIGKILL this process at the N-th hit of LABEL
  OOC_TEST_ENOSPC_AT=LABEL:N[,...]          raise OSError(ENOSPC) at the N-th hit
  OOC_TEST_FAIL_AT=LABEL:N[,...]            raise RuntimeError at the N-th hit
  OOC_TEST_FAULT_ONCE=PATH                  act only if PATH can be created (so exactly
                                            one process of a cluster acts, once)

N may be "*" (every hit). Hits are counted per process and per label; counting starts
afresh when the variable's value changes. A point may take `torn`, a callable run just
before a kill (it writes half of something, to leave a torn record behind).
"""
from __future__ import annotations

import errno
import os
import signal
import threading

KILL_ENV = "OOC_TEST_KILL_AT"
ENOSPC_ENV = "OOC_TEST_ENOSPC_AT"
FAIL_ENV = "OOC_TEST_FAIL_AT"
ONCE_ENV = "OOC_TEST_FAULT_ONCE"
_ENVS = (KILL_ENV, ENOSPC_ENV, FAIL_ENV)

_lock = threading.Lock()
_counts: dict = {}
_seen: dict = {}


class InjectedFailure(RuntimeError):
    """The error OOC_TEST_FAIL_AT raises."""


def _armed(env: str, label: str) -> bool:
    spec = os.environ.get(env)
    if not spec:
        return False
    with _lock:
        if _seen.get(env) != spec:
            _seen[env] = spec
            for key in [k for k in _counts if k[0] == env]:
                del _counts[key]
        wanted = [n for lab, _, n in (p.strip().rpartition(":") for p in spec.split(","))
                  if lab == label]
        if not wanted:
            return False
        n = _counts[(env, label)] = _counts.get((env, label), 0) + 1
    if not any(w == "*" or (w.isdigit() and int(w) == n) for w in wanted):
        return False
    once = os.environ.get(ONCE_ENV)
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False
    return True


def point(label: str, torn=None) -> None:
    """A named fault-injection point (no-op unless a test armed it)."""
    if not (os.environ.get(KILL_ENV) or os.environ.get(ENOSPC_ENV)
            or os.environ.get(FAIL_ENV)):
        return
    if _armed(KILL_ENV, label):
        if torn is not None:
            torn()
        os.kill(os.getpid(), signal.SIGKILL)
    if _armed(ENOSPC_ENV, label):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected at {label})")
    if _armed(FAIL_ENV, label):
        raise InjectedFailure(f"injected failure at {label}")


def hits(label: str, env: str = KILL_ENV) -> int:
    """How often `label` was hit in this process while `env` was set (for tests)."""
    return _counts.get((env, label), 0)
