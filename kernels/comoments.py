"""Mergeable co-moment summaries of token blocks (torch; the same code on CPU and CUDA).

A block of n tokens is summarised as the record

    {"n": n, "mean_x": (Na,) f64, "mean_y": (Nb,) f64,
     "m2_x": (Na,) f64, "m2_y": (Nb,) f64, "c": (Na, Nb) accumulator dtype}

with m2 = sum over tokens of squared deviations from the block mean and
c = (X - mean_x)^T (Y - mean_y) (co-moment SUMS, not divided by n). Two records merge by
the Chan-Golub-LeVeque rule (see ../shared/design.md, "The math"); the merge is
associative, so blocks can be reduced in any order or tree. An n = 0 record is the
identity of the merge.

Centring (per block, per model):
  1. shift every column by its first row (so a constant column centres to exact zeros),
  2. sum the shifted values (fp32 chunks into f64) -> provisional mean mu,
  3. write x - mu into the GEMM buffer and, from the same rows while they are in cache,
     the residual sum r and the sum of squares q (f64 across chunks);
  mean = mu + r / n and m2 = q - r^2 / n (the corrected two-pass formula).
The GEMM then runs on the data centred at mu; the difference from centring at the exact
mean is the second-order term r_x r_y / n, of relative size (eps * |mean| / std)^2.
fp16 input (the store's dtype) is converted once here, chunk by chunk.

Precision (`compute_dtype`): float32 (default; fp32 GEMM, fp32 accumulator), bfloat16
(centred in fp32, rounded once to bf16, bf16 GEMM with fp32 accumulation; fp32
accumulator), float64 (reference runs; f64 everywhere). On CUDA the bf16 GEMM writes an
fp32 result (`torch.mm(..., out_dtype=torch.float32)`); on CPU torch has no such GEMM, so
its bf16 result is rounded to bf16 before it is cast to fp32: a relative error of at most
2^-8 on each block's c (|delta rho| <= 2^-8 |rho| per block, shrinking about as
1/sqrt(blocks) when many blocks are merged). Means and m2 are exact to fp32 in every
mode (they never pass through bf16). The CPU's bf16 product is widened (exactly) and
added to the fp32/f64 accumulator by one fused numba pass (_widen_add_: the same sums
as torch's promoting add_, at about a third of its CPU time on a strided accumulator).

`workspace`: optional dict the caller keeps between calls (one per thread) so the
centred GEMM inputs reuse their buffers instead of fresh, page-faulting allocations. A
returned record never aliases workspace memory.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

_COMPUTE = {torch.float32: torch.float32, torch.bfloat16: torch.float32,
            torch.float64: torch.float64}  # compute dtype -> accumulator dtype
_PRECISION = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
_CHUNK_BYTES = 1 << 20  # CPU centring works on ~1 MiB row chunks (stays in L2)
GPU_CHUNK_BYTES = 128 << 20  # and on a GPU on chunks of at most this (plan._fold_bytes)


def _compute_dtype(compute_dtype) -> torch.dtype:
    if isinstance(compute_dtype, str):
        if compute_dtype not in _PRECISION:
            raise ValueError(f"precision {compute_dtype!r} is not one of {sorted(_PRECISION)}")
        return _PRECISION[compute_dtype]
    if compute_dtype not in _COMPUTE:
        raise ValueError(f"compute_dtype {compute_dtype} is not one of "
                         "torch.float32, torch.bfloat16, torch.float64")
    return compute_dtype


def _as_tensor(x, name: str) -> torch.Tensor:
    x = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (tokens, neurons), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def _buffer(ws, key, rows: int, cols: int, dtype, device) -> torch.Tensor:
    """A (rows, cols) tensor, taken from the workspace when one is given and big enough."""
    if ws is None:
        return torch.empty(rows, cols, dtype=dtype, device=device)
    key = (key, cols, dtype, str(device))
    buf = ws.get(key)
    if buf is None or buf.shape[0] < rows:
        buf = ws[key] = torch.empty(rows, cols, dtype=dtype, device=device)
    return buf[:rows]


def _chunk_rows(n: int, cols: int, device, itemsize: int = 4) -> int:
    """Rows per centring chunk: cache-sized on a CPU; on a GPU large (cache size does
    not matter there) but bounded, since its two scratch buffers (tmp, sq) of this many
    rows are device memory the planner counts (GPU_CHUNK_BYTES each, per role)."""
    if device.type == "cpu":   # cache-sized in fp32 terms, whatever the work dtype
        return max(1, min(n, _CHUNK_BYTES // (4 * max(cols, 1))))
    return max(1, min(n, GPU_CHUNK_BYTES // (itemsize * max(cols, 1))))


_NUMBA_INPUTS = (torch.float16, torch.float32, torch.float64)


def centre_block(x: torch.Tensor, compute_dtype=torch.float32, *, workspace=None,
                 role: str = "x", impl: str = "auto", spare_row: bool = False):
    """Centre a token block for the GEMM.

    x: (n, N) any float dtype, n >= 1 (a column slice of a larger array is fine).
    Returns (mean (N,) f64, m2 (N,) f64, xg (n, N) compute dtype), xg = x - mu with mu
    the block mean rounded to the working precision (f64 for float64, else fp32).
    `role` keys the workspace buffer (two blocks centred for one GEMM need different
    roles). `impl`: "numba" (two fused passes, kernels/centring.py; the CPU default for
    fp16/fp32/fp64 input), "torch" (chunked torch ops; any device, the CUDA path) or
    "auto". With `spare_row`, xg has n + 1 rows: the last (zeros here) is where
    comoment_strip_update_ puts the Chan merge term (mean and m2 are of the n rows).
    """
    compute = _compute_dtype(compute_dtype)
    work = torch.float64 if compute == torch.float64 else torch.float32
    n, cols = x.shape
    dev = x.device
    full = _buffer(workspace, role, n + 1 if spare_row else n, cols, compute, dev)
    if spare_row:
        full[n].zero_()
    mean, m2 = _centre_into(x, full[:n], compute, work, workspace, impl)
    return mean, m2, full


def _centre_into(x, xg, compute, work, workspace, impl) -> tuple:
    """Write x - mu into xg (n, N); returns (mean, m2) f64."""
    if impl == "numba" or (impl == "auto" and x.device.type == "cpu"
                           and x.dtype in _NUMBA_INPUTS):
        return _centre_numba(x, xg, compute, work)
    return _centre_torch(x, xg, compute, work, workspace)


def _centre_numba(x, xg, compute, work) -> tuple:
    from .centring import centre_numpy
    out = xg.view(torch.int16).numpy().view("uint16") if compute == torch.bfloat16 \
        else xg.numpy()
    mean, m2 = centre_numpy(x.numpy(), out, "float64" if work == torch.float64 else "float32")
    return torch.from_numpy(mean), torch.from_numpy(m2)


def _centre_torch(x, xg, compute, work, workspace) -> tuple:
    n, cols = x.shape
    dev = x.device
    k = _chunk_rows(n, cols, dev, torch.empty((), dtype=work).element_size())
    tmp = _buffer(workspace, "tmp", k, cols, work, dev)
    sq = _buffer(workspace, "sq", k, cols, work, dev)

    x0 = x[0].to(work)  # shift: a constant column centres to exact zeros
    s = torch.zeros(cols, dtype=torch.float64, device=dev)
    for a in range(0, n, k):
        b = min(n, a + k)
        t = tmp[:b - a]
        t.copy_(x[a:b])
        t.sub_(x0)
        s += t.sum(0)
    mu = (x0.double() + s / n).to(work)

    r = torch.zeros(cols, dtype=torch.float64, device=dev)
    q = torch.zeros(cols, dtype=torch.float64, device=dev)
    for a in range(0, n, k):
        b = min(n, a + k)
        t = xg[a:b] if compute == work else tmp[:b - a]
        t.copy_(x[a:b])
        t.sub_(mu)
        r += t.sum(0)
        q += torch.mul(t, t, out=sq[:b - a]).sum(0)
        if compute != work:
            xg[a:b].copy_(t)  # the single rounding to bf16
    mean = mu.double() + r / n
    m2 = (q - r * r / n).clamp_min_(0.0)
    return mean, m2


@numba.njit(parallel=True, cache=True)
def _widen_add_bits(out, bits):
    """out += the bf16 values whose bit patterns are `bits` (uint16, out's shape),
    widened exactly (a bf16 is the upper half of an fp32's bits); rows over threads."""
    rows, cols = bits.shape
    for i in numba.prange(rows):
        for j in range(cols):
            out[i, j] += np.uint32(np.uint32(bits[i, j]) << np.uint32(16)).view(np.float32)


def _widen_add_(out: torch.Tensor, prod: torch.Tensor, overwrite: bool = False) -> None:
    """out += prod (or out = prod) for a bf16 prod and an fp32/f64 out of its shape (a
    strided view such as an accumulator's column strip is fine). On the CPU the add is
    one numba pass (torch's promoting add_ on a strided fp32 out takes ~3x the CPU
    time); the values are the same: bf16 -> fp32 is exact, then one fp32 (or f64) add."""
    if overwrite:
        out.copy_(prod)
        return
    if (out.device.type == "cpu" and prod.dtype == torch.bfloat16 and prod.is_contiguous()
            and out.dtype in (torch.float32, torch.float64) and out.stride(-1) == 1
            and out.shape == prod.shape and prod.numel()):
        _widen_add_bits(out.numpy(), prod.view(torch.int16).numpy().view(np.uint16))
        return
    out.add_(prod)


def _gemm_tn(a: torch.Tensor, b: torch.Tensor, acc_dtype) -> torch.Tensor:
    """a^T b with the result in acc_dtype (fp32 output of a bf16 GEMM where supported)."""
    if a.dtype == torch.bfloat16:
        if a.device.type == "cuda":
            try:
                return torch.mm(a.T, b, out_dtype=acc_dtype)
            except (TypeError, RuntimeError, NotImplementedError):
                pass  # older torch: fall through to the bf16-output GEMM
        return torch.mm(a.T, b).to(acc_dtype)
    return torch.mm(a.T, b)


_HUGE_PAGE = 1 << 21
_HUGE_MIN_BYTES = 64 << 20


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux to back a large, not yet touched CPU tensor with 2 MiB pages
    (madvise MADV_HUGEPAGE, for machines whose transparent huge pages are 'madvise'):
    first touching a (36,864 x 36,864) fp32 accumulator took 13 CPU-s in 4 KiB pages
    against 8.6 in huge pages on a 2-core VM, and the strided strip writes miss the TLB
    less. Values are unaffected; False (nothing done) off Linux, on a GPU, when small."""
    import ctypes
    import sys
    n = t.numel() * t.element_size()
    if t.device.type != "cpu" or n < _HUGE_MIN_BYTES or not sys.platform.startswith("linux"):
        return False
    global _MADVISE
    if _MADVISE is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _MADVISE = libc.madvise
        except (OSError, AttributeError):
            _MADVISE = False
    if not _MADVISE:
        return False
    p = t.data_ptr()
    a, e = -(-p // _HUGE_PAGE) * _HUGE_PAGE, (p + n) // _HUGE_PAGE * _HUGE_PAGE
    return e > a and _MADVISE(a, e - a, 14) == 0  # 14: MADV_HUGEPAGE


_MADVISE = None


def empty_comoments(na: int, nb: int, precision=torch.float32, device="cpu", *,
                    zeroed: bool = True) -> dict:
    """The n = 0 record (identity of the merge) with an allocated c, zeroed unless
    `zeroed=False`: then c holds garbage until the first block's strips
    (comoment_strip_update_, which overwrites at n = 0) have covered every column; a
    (Na, Nb) accumulator is then written once instead of twice.

    precision: a compute dtype or "fp32" | "bf16" | "fp64"; c gets its accumulator dtype.
    """
    acc = _COMPUTE[_compute_dtype(precision)]
    f64 = dict(dtype=torch.float64, device=device)
    c = torch.empty(na, nb, dtype=acc, device=device)
    advise_huge_pages(c)  # before its first touch
    if zeroed:
        c.zero_()
    return {"n": 0, "mean_x": torch.zeros(na, **f64), "mean_y": torch.zeros(nb, **f64),
            "m2_x": torch.zeros(na, **f64), "m2_y": torch.zeros(nb, **f64), "c": c}


@torch.no_grad()
def comoment_chunk(x, y, compute_dtype=torch.float32, *, workspace=None) -> dict:
    """Co-moment record of one token block: x (n, Na), y (n, Nb) on one device."""
    compute = _compute_dtype(compute_dtype)
    x, y = _as_tensor(x, "x"), _as_tensor(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} tokens but y has {y.shape[0]}; "
                         "pass the same token block of both models")
    n = x.shape[0]
    if n == 0:
        return empty_comoments(x.shape[1], y.shape[1], compute, x.device)
    mean_x, m2_x, xg = centre_block(x, compute, workspace=workspace, role="x")
    mean_y, m2_y, yg = centre_block(y, compute, workspace=workspace, role="y")
    c = _gemm_tn(xg, yg, _COMPUTE[compute])
    return {"n": n, "mean_x": mean_x, "mean_y": mean_y, "m2_x": m2_x, "m2_y": m2_y, "c": c}


@torch.no_grad()
def comoment_update_(acc: dict, x, y, compute_dtype=torch.float32, *, workspace=None) -> dict:
    """Fold one token block into `acc` in place (comoment_chunk + comoment_merge_, fused).

    For fp32/fp64 the block's GEMM adds straight into acc["c"] (addmm, beta=1), so no
    (Na, Nb) temporary is made; bf16 makes one (its GEMM has a bf16 or fp32 output).
    """
    compute = _compute_dtype(compute_dtype)
    x, y = _as_tensor(x, "x"), _as_tensor(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} tokens but y has {y.shape[0]}; "
                         "pass the same token block of both models")
    if x.shape[0] == 0:
        return acc
    cx = centre_block(x, compute, workspace=workspace, role="x")
    cy = centre_block(y, compute, workspace=workspace, role="y")
    return comoment_update_centred_(acc, cx, cy)


@torch.no_grad()
def comoment_update_centred_(acc: dict, cx: tuple, cy: tuple) -> dict:
    """comoment_update_ for blocks already centred by centre_block (its (mean, m2, xg)
    outputs), so a block shared by several pairs (the reference's, against every other
    model; the other's, for its self co-moments too) is converted and centred once."""
    mean_x, m2_x, xg = cx
    mean_y, m2_y, yg = cy
    if xg.shape[0] != yg.shape[0]:
        raise ValueError(f"x has {xg.shape[0]} tokens but y has {yg.shape[0]}; "
                         "pass the same token block of both models")
    nb = xg.shape[0]
    if nb == 0:
        return acc
    c = acc["c"]
    first = acc["n"] == 0
    if xg.dtype == torch.bfloat16:
        # CPU: the bf16 product is added to the fp32 accumulator as it is (add_ promotes
        # in place), without an fp32 copy of the (Na, Nb) product first
        cb = torch.mm(xg.T, yg) if xg.device.type == "cpu" else _gemm_tn(xg, yg, c.dtype)
        _widen_add_(c, cb, overwrite=first)
    else:
        c.addmm_(xg.T.to(c.dtype), yg.to(c.dtype), beta=0.0 if first else 1.0)
    block = {"n": nb, "mean_x": mean_x, "mean_y": mean_y, "m2_x": m2_x, "m2_y": m2_y}
    _merge_moments_(acc, block, c_of_b=None)
    return acc


# ------------------------------------------------------------- column strips, spare row
# The reduce folds a block strip by strip (one layer of the other model at a time, so
# the centred block of that model is (n, d), not (n, N)). The Chan merge term
# f dx dy^T (f = n_acc n / (n_acc + n), dx = block mean - running mean) rides along in
# the strip's GEMM as one extra row of each centred operand, sqrt(f) dx and sqrt(f) dy:
# no separate pass over the accumulator per block. The running moments are merged once
# per block, after its last strip (comoment_moments_update_).

def _chan_scale(n_acc: int, n: int) -> float:
    """sqrt(n_acc n / (n_acc + n)): 0 for the first block."""
    return (n_acc * n / (n_acc + n)) ** 0.5 if n_acc else 0.0


def _set_spare_row_(g: torch.Tensor, mean_block, mean_acc, scale: float) -> None:
    g[-1].copy_((mean_block - mean_acc).mul_(scale))


def _add_product_(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                  overwrite: bool = False, workspace=None) -> None:
    """out += left @ right, or out = left @ right (out fp32/fp64; left, right of out's
    dtype or bf16; left may be a transposed view). A CPU bf16 product goes through one
    reused workspace buffer."""
    if left.dtype == out.dtype:
        out.addmm_(left, right, beta=0.0 if overwrite else 1.0)  # beta 0: out is not read
        return
    if left.device.type == "cpu":
        prod = torch.mm(left, right, out=_buffer(workspace, "product", left.shape[0],
                                                 right.shape[1], left.dtype, left.device))
    else:
        prod = _gemm_tn(left.T, right, out.dtype)
    _widen_add_(out, prod, overwrite)  # a CPU bf16 product: widened as it is added


def transpose_block(cx: tuple, workspace=None) -> torch.Tensor:
    """xt (N, n + 1) row-major: a spare-row centred block (centre_block's cx) copied
    transposed, once per block. For the CPU bf16 GEMM, whose kernels run at about twice
    the rate with their first operand row-major (854 against 436 GFLOP per CPU-second
    measured at 12,288 x 4,032 x 3,072); pass it to comoment_strip_update_(xt=...)."""
    xg = cx[2]
    xt = _buffer(workspace, "xt", xg.shape[1], xg.shape[0], xg.dtype, xg.device)
    return xt.copy_(xg.T)


@torch.no_grad()
def comoment_strip_update_(acc: dict, cx: tuple, cy: tuple, col0: int, *,
                           xt: torch.Tensor | None = None, workspace=None) -> dict:
    """acc["c"][:, col0:col0 + w] += Xg^T Yg + f dx dy^T for one column strip of y (at
    n = 0, c's columns are overwritten: an unzeroed accumulator is fine).

    cx = (mean_x, m2_x, xg (n + 1, Na)) and cy = (mean_y, m2_y, yg (n + 1, w)) from
    centre_block(..., spare_row=True); their spare rows (xt's last column, when the
    transposed block is given) are overwritten here. acc's moments are left as they
    were (the next strip needs them): call comoment_moments_update_ once the block's
    last strip is in. `workspace`: where a bf16 product's buffer is kept."""
    mean_x, _, xg = cx
    mean_y, _, yg = cy
    w = yg.shape[1]
    scale = _chan_scale(acc["n"], xg.shape[0] - 1)
    left = xg.T if xt is None else xt
    left[:, -1].copy_((mean_x - acc["mean_x"]).mul_(scale))
    _set_spare_row_(yg, mean_y, acc["mean_y"][col0:col0 + w], scale)
    _add_product_(acc["c"][:, col0:col0 + w], left, yg, overwrite=acc["n"] == 0,
                  workspace=workspace)
    return acc


@torch.no_grad()
def comoment_moments_update_(acc: dict, n: int, mean_x, m2_x, mean_y, m2_y) -> dict:
    """Chan merge of a block's moments into acc; acc["c"] is not touched (its strips,
    merge term included, were added by comoment_strip_update_)."""
    block = {"n": n, "mean_x": mean_x, "mean_y": mean_y, "m2_x": m2_x, "m2_y": m2_y}
    return _merge_moments_(acc, block, c_of_b=None, outer=False)


def empty_self_comoments(n_neurons: int, d: int, device="cpu") -> dict:
    """The n = 0 self co-moment record: {"n", "mean", "m2" (N,) f64, "s" (L, d, d) f64}."""
    if d <= 0 or n_neurons % d:
        raise ValueError(f"{n_neurons} neurons are not a whole number of layers of d={d}")
    f64 = dict(dtype=torch.float64, device=device)
    s = torch.empty(n_neurons // d, d, d, **f64)
    advise_huge_pages(s)
    return {"n": 0, "mean": torch.zeros(n_neurons, **f64), "m2": torch.zeros(n_neurons, **f64),
            "s": s.zero_()}


@torch.no_grad()
def self_comoment_strip_update_(acc: dict, cy: tuple, layer: int, *, workspace=None) -> dict:
    """acc["s"][layer] += Yg^T Yg + f dy dy^T for layer `layer`'s strip of a block.

    cy = (mean, m2, yg (n + 1, d)) from centre_block(..., spare_row=True). The float64
    accumulator is preallocated (empty_self_comoments); an fp32 block product goes
    through one reused (d, d) fp32 buffer, a CPU bf16 one through reused (d, n + 1)
    (its row-major transposed strip) and (d, d) bf16 buffers, widened as it is added.
    Moments: self_moments_update_ after the last layer of the block."""
    mean, _, yg = cy
    d = yg.shape[1]
    cols = slice(layer * d, (layer + 1) * d)
    _set_spare_row_(yg, mean, acc["mean"][cols], _chan_scale(acc["n"], yg.shape[0] - 1))
    s = acc["s"][layer]
    if yg.dtype == torch.float64:
        s.addmm_(yg.T, yg)
        return acc
    if yg.dtype == torch.bfloat16 and yg.device.type == "cpu":
        # a row-major first operand (transpose_block) and the bf16 product in reused
        # buffers, widened into the f64 accumulator as it is added
        yt = _buffer(workspace, "self_t", d, yg.shape[0], yg.dtype, yg.device)
        yt.copy_(yg.T)
        prod = _buffer(workspace, "self_product", d, d, yg.dtype, yg.device)
        _widen_add_(s, torch.mm(yt, yg, out=prod))
        return acc
    prod = _buffer(workspace, "self_product", d, d, torch.float32, yg.device)
    if yg.dtype == torch.float32:
        torch.mm(yg.T, yg, out=prod)
    else:
        prod.copy_(_gemm_tn(yg, yg, torch.float32))
    s.add_(prod)
    return acc


@torch.no_grad()
def self_moments_update_(acc: dict, n: int, mean, m2) -> dict:
    """Chan merge of a block's (N,) moments into a self co-moment record (s untouched)."""
    na = acc["n"]
    if n == 0:
        return acc
    if na == 0:
        acc["mean"].copy_(mean)
        acc["m2"].copy_(m2)
    else:
        dy = mean - acc["mean"]
        f = na * n / (na + n)
        acc["mean"].add_(dy, alpha=n / (na + n))
        acc["m2"].add_(m2).addcmul_(dy, dy, value=f)
    acc["n"] = na + n
    return acc


def _merge_moments_(acc: dict, b: dict, c_of_b, outer: bool = True):
    """Chan merge of b into acc in place; c_of_b (or None if already added) is b's c;
    outer=False when the f dx dy^T term is in acc["c"] already (a spare row)."""
    na, nb = acc["n"], b["n"]
    if nb == 0:
        return acc
    if na == 0:
        for k in ("mean_x", "mean_y", "m2_x", "m2_y"):
            acc[k].copy_(b[k])
        if c_of_b is not None:
            acc["c"].copy_(c_of_b)
        acc["n"] = nb
        return acc
    n = na + nb
    f = na * nb / n
    dx = b["mean_x"] - acc["mean_x"]
    dy = b["mean_y"] - acc["mean_y"]
    c = acc["c"]
    if c_of_b is not None:
        c.add_(c_of_b)
    if outer:
        c.addr_(dx.to(c.dtype), dy.to(c.dtype), alpha=f)
    acc["mean_x"].add_(dx, alpha=nb / n)
    acc["mean_y"].add_(dy, alpha=nb / n)
    acc["m2_x"].add_(b["m2_x"]).addcmul_(dx, dx, value=f)
    acc["m2_y"].add_(b["m2_y"]).addcmul_(dy, dy, value=f)
    acc["n"] = n
    return acc


@torch.no_grad()
def comoment_merge_(acc: dict, b: dict) -> dict:
    """Chan-merge record b into acc in place (acc["c"] updated with add_ and addr_)."""
    return _merge_moments_(acc, b, c_of_b=b["c"])


@torch.no_grad()
def comoment_combine(a: dict, b: dict) -> dict:
    """Chan merge of two records into a new one (inputs untouched)."""
    if a["n"] == 0:
        a, b = b, a
    out = {"n": a["n"], "c": a["c"].clone(),
           **{k: a[k].clone() for k in ("mean_x", "mean_y", "m2_x", "m2_y")}}
    return _merge_moments_(out, b, c_of_b=b["c"])


@torch.no_grad()
def self_comoment_chunk(y, d: int, compute_dtype=torch.float32, *, workspace=None) -> dict:
    """Within-layer co-moment record of one block of a model: y (n, L*d).

    Returns {"n", "mean": (L*d,) f64, "m2": (L*d,) f64, "s": (L, d, d) f64}, where
    s[l] = Yc_l^T Yc_l is the co-moment sum of layer l's d neurons.
    """
    compute = _compute_dtype(compute_dtype)
    y = _as_tensor(y, "y")
    n, cols = y.shape
    if d <= 0 or cols % d:
        raise ValueError(f"y has {cols} neurons, not a whole number of layers of d={d}")
    if n == 0:
        f64 = dict(dtype=torch.float64, device=y.device)
        return {"n": 0, "mean": torch.zeros(cols, **f64), "m2": torch.zeros(cols, **f64),
                "s": torch.zeros(cols // d, d, d, **f64)}
    return self_comoment_centred(centre_block(y, compute, workspace=workspace, role="self"), d)


@torch.no_grad()
def self_comoment_centred(cy: tuple, d: int) -> dict:
    """self_comoment_chunk for a block already centred by centre_block ((mean, m2, yg))."""
    mean, m2, yg = cy
    n, cols = yg.shape
    if d <= 0 or cols % d:
        raise ValueError(f"y has {cols} neurons, not a whole number of layers of d={d}")
    layers = cols // d
    acc = _COMPUTE[yg.dtype]
    s = torch.empty(layers, d, d, dtype=torch.float64, device=yg.device)
    for layer in range(layers):  # column slices with lda = L*d: no copies (a strided
        blk = yg[:, layer * d:(layer + 1) * d]  # bmm over layers copies, and is slower)
        s[layer] = _gemm_tn(blk, blk, acc)
    return {"n": n, "mean": mean, "m2": m2, "s": s}


@torch.no_grad()
def self_comoment_combine(a: dict, b: dict) -> dict:
    """Chan merge of two self co-moment records (new record; n = 0 is the identity)."""
    if a["n"] == 0:
        a, b = b, a
    if b["n"] == 0:
        return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    na, nb = a["n"], b["n"]
    n = na + nb
    f = na * nb / n
    dy = b["mean"] - a["mean"]
    layers, d = a["s"].shape[0], a["s"].shape[1]
    dl = dy.view(layers, d)
    s = torch.baddbmm(a["s"] + b["s"], dl[:, :, None], dl[:, None, :], alpha=f)
    return {"n": n, "mean": a["mean"] + dy * (nb / n),
            "m2": a["m2"] + b["m2"] + dy * dy * f, "s": s}


def correlation_from_comoments(c, m2_x, m2_y, zero_tol: float = 0.0):
    """rho = (c / sqrt(m2_x)) / sqrt(m2_y) in float64; m2 <= zero_tol gives 0, not NaN.

    numpy arrays or torch tensors (returns the same kind). The scales are computed on the
    host with numpy, the same expression tilemax.tile_max evaluates, so both agree.
    """
    import numpy as np

    from ooc_universal.kernels.tilemax import inv_sqrt
    ix, iy = inv_sqrt(m2_x, zero_tol), inv_sqrt(m2_y, zero_tol)
    if isinstance(c, torch.Tensor):
        ix = torch.from_numpy(ix).to(c.device)
        iy = torch.from_numpy(iy).to(c.device)
        return (c.double() * ix[:, None]) * iy[None, :]
    return (np.asarray(c, dtype=np.float64) * ix[:, None]) * iy[None, :]
