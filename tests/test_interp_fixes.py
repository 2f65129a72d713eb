"""The test aid that makes Triton's interpreter compute as a GPU does (interp_fixes.py)."""
import os

import numpy as np
import pytest
import torch

import interp_fixes


def _edge_values() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ulp = 2.0 ** -7
    special = [0.0, -0.0, 1.0 + ulp / 2, 1.0 + 3 * ulp / 2, -(1.0 + ulp / 2), 1.0 + ulp / 2 + 2 ** -20,
               float("inf"), float("-inf"), float("nan"), -float("nan"),
               torch.finfo(torch.float32).max, 3.3895e38, torch.finfo(torch.float32).tiny,
               1e-40, -3e-42, 2.0 ** -133]
    return torch.cat([torch.tensor(special), torch.randn(4096, generator=g) * 10,
                      torch.randn(1024, generator=g) * 1e-39])


def test_conversions_match_torch():
    f = _edge_values()
    bits = interp_fixes.f32_to_bf16_bits(f.numpy())
    want = f.bfloat16()
    got = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
    assert bool(same.all()), f"first mismatch at {int((~same).nonzero()[0])}"
    assert bool((got.isnan() == f.isnan()).all())
    back = interp_fixes.bf16_bits_to_f32(bits)
    assert torch.equal(torch.from_numpy(back)[~f.isnan()], want.float()[~f.isnan()])


@pytest.mark.triton
def test_interpreter_self_check_passes():
    """In the interpreter (every CPU test run), the patched bf16 dot, casts and elementwise ops
    agree with torch bit for bit and a loop over a computed scalar bound runs; the suite's
    Triton cases depend on it."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs on a GPU here, not in the interpreter")
    assert interp_fixes.check() is None, interp_fixes.check()
