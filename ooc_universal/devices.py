"""One device syntax for every step: auto | cpu | cuda | cuda:N."""
from __future__ import annotations

from ooc_universal.errors import OocError, UsageError

DEVICE_HELP = "auto (CUDA when torch sees a GPU, else cpu), cpu, cuda or cuda:N"


def resolve_device(device="auto"):
    """The torch.device for `device`; one line naming the value and the fix otherwise."""
    import torch
    text = "auto" if device is None else str(device).strip()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise UsageError(f"--device {text!r} is not a device; expected {DEVICE_HELP}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise OocError(f"--device {text!r}: torch sees no CUDA GPU; use --device cpu "
                           "or install a CUDA build of torch")
        if index and int(index) >= torch.cuda.device_count():
            raise OocError(f"--device {text!r}: only {torch.cuda.device_count()} CUDA "
                           f"device(s) visible; use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return torch.device(text)


def device_name(device="auto") -> str:
    """The resolved device as text ("cpu", "cuda", "cuda:1"), for plans and records."""
    return str(resolve_device(device))


def synchronize(device) -> None:
    """Wait for `device`'s queued work (nothing on a CPU): GPU timings and host reads of
    device results are taken after it. The device is named, so that cuda:N waits for
    GPU N and not for the calling thread's current GPU."""
    if str(device).startswith("cuda"):
        import torch
        torch.cuda.synchronize(device)


# --------------------------------------------------------------- the process's memory

def memory_limits() -> dict:
    """What caps this process's memory, in bytes: the address-space limit left
    (RLIMIT_AS, `ulimit -v`, less what is mapped now) and the cgroup's memory.max left
    (less its current usage); a key is absent where there is no such limit."""
    import resource
    out = {}
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        out["address space (ulimit -v)"] = max(0, soft - _mapped_bytes())
    for base in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(base).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):
            used = _cgroup_usage(base)
            out["cgroup memory limit"] = max(0, int(text) - used)
        break
    return out


def _mapped_bytes() -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cgroup_usage(limit_file: str) -> int:
    name = "memory.current" if limit_file.endswith("memory.max") else "memory.usage_in_bytes"
    try:
        return int(open(limit_file.rsplit("/", 1)[0] + "/" + name).read().strip())
    except (OSError, ValueError):
        return 0


def check_memory_limit(need_bytes: int, what: str, limits: dict | None = None) -> None:
    """One line when `need_bytes` (a plan's peak) exceeds a limit on this process."""
    from ooc_universal.rundir import human_bytes
    for name, left in (memory_limits() if limits is None else limits).items():
        if need_bytes > left:
            raise UsageError(
                f"{what} needs {human_bytes(need_bytes)} of memory, but the {name} leaves "
                f"this process {human_bytes(left)}; raise the limit, or lower --memory so "
                "the plan fits")
