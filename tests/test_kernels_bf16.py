"""The CPU bf16 product's widening add (kernels.comoments._widen_add_) against float64."""
import numpy as np
import pytest
import torch

from ooc_universal.kernels import comoments as cm


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64])
def test_widen_add_into_a_column_strip_equals_float64_sum(out_dtype):
    """out[:, strip] += bf16 product: every element the float64 sum of the two values
    rounded once to out's dtype; the columns either side are untouched."""
    gen = torch.Generator().manual_seed(3)
    rows, cols, w, c0 = 37, 50, 19, 13
    acc = torch.randn(rows, cols, generator=gen, dtype=torch.float64).mul_(100).to(out_dtype)
    prod = torch.randn(rows, w, generator=gen).mul_(1e3).to(torch.bfloat16)
    prod[0, 0], prod[1, 1] = 0.0, -0.0
    before = acc.clone()
    cm._widen_add_(acc[:, c0:c0 + w], prod)
    # independent reference: each bf16 value in float64 (exact), summed in float64
    want = (before[:, c0:c0 + w].double().numpy()
            + np.array(prod.tolist(), dtype=np.float64)).astype(acc.numpy().dtype)
    np.testing.assert_array_equal(acc[:, c0:c0 + w].numpy(), want)
    np.testing.assert_array_equal(acc[:, :c0].numpy(), before[:, :c0].numpy())
    np.testing.assert_array_equal(acc[:, c0 + w:].numpy(), before[:, c0 + w:].numpy())


def test_widen_add_overwrite_and_non_contiguous_fall_back():
    prod = torch.tensor([[1.5, -2.25], [3.0, 1e-3]], dtype=torch.bfloat16)
    out = torch.full((2, 2), 7.0)
    cm._widen_add_(out, prod, overwrite=True)
    np.testing.assert_array_equal(out.numpy(), np.array(prod.tolist(), np.float32))
    out = torch.ones(2, 2)
    cm._widen_add_(out, prod.T)  # a transposed product: torch's add_, same sums
    np.testing.assert_array_equal(out.numpy(),
                                  (1.0 + np.array(prod.T.tolist())).astype(np.float32))
