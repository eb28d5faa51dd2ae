"""APG against the paper's formula on fixed tensors, and its reduction to classic CFG."""

from __future__ import annotations

import pytest
import torch

from sd35dist.validation.guidance import Guidance, GuidanceSettings

pytestmark = pytest.mark.unit


def _tensors(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    latents, v_cond, v_uncond = (torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    return latents.to(dtype), v_cond.to(dtype), v_uncond.to(dtype)


def _apg_by_hand(x0_cond, x0_uncond, scale, eta, threshold, previous=None, momentum=None):
    """Sadat et al. 2024, Algorithm 1, per image: momentum, norm cap, parallel/orthogonal split."""
    out, running = [], []
    for i in range(x0_cond.shape[0]):
        diff = (x0_cond[i] - x0_uncond[i]).double()
        if momentum is not None:
            diff = diff + (momentum * previous[i] if previous is not None else 0)
            running.append(diff)
        if threshold > 0:
            diff = diff * min(1.0, threshold / float(diff.norm()))
        unit = x0_cond[i].double() / x0_cond[i].double().norm()
        parallel = (diff * unit).sum() * unit
        orthogonal = diff - parallel
        out.append(x0_uncond[i].double() + scale * (orthogonal + eta * parallel))
    return torch.stack(out), running


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apg_equals_the_formula_with_momentum_threshold_and_eta(dtype):
    latents, v_cond, v_uncond = _tensors(dtype)
    sigma, scale, eta, threshold, momentum = 0.7, 5.0, 0.3, 2.5, -0.5
    guidance = Guidance(GuidanceSettings(kind="apg", scale=scale, eta=eta, momentum=momentum, norm_threshold=threshold))
    x0_c, x0_u = latents.double() - sigma * v_cond.double(), latents.double() - sigma * v_uncond.double()
    expected_x0, running = _apg_by_hand(x0_c, x0_u, scale, eta, threshold, momentum=momentum)
    got = guidance(v_cond, v_uncond, latents, sigma)
    tol = 1e-5 if dtype == torch.float32 else 8e-2
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), (latents.double() - expected_x0) / sigma, rtol=tol, atol=tol)
    # Second step: the momentum buffer carries the first update.
    v_cond2 = v_cond.flip(0)
    x0_c2 = latents.double() - sigma * v_cond2.double()
    expected2, _ = _apg_by_hand(x0_c2, x0_u, scale, eta, threshold, previous=running, momentum=momentum)
    got2 = guidance(v_cond2, v_uncond, latents, sigma)
    torch.testing.assert_close(got2.double(), (latents.double() - expected2) / sigma, rtol=tol, atol=tol)
    # The cap and eta < 1 both change the result: the test can fail.
    plain = Guidance(GuidanceSettings(kind="cfg", scale=scale))(v_cond, v_uncond, latents, sigma)
    assert (got.double() - plain.double()).abs().max() > 0.1


def test_apg_with_eta_one_no_momentum_no_threshold_is_cfg():
    latents, v_cond, v_uncond = _tensors()
    for scale in (1.5, 4.0, 9.0):
        apg = Guidance(GuidanceSettings(kind="apg", scale=scale, eta=1.0, momentum=None, norm_threshold=0.0))
        cfg = Guidance(GuidanceSettings(kind="cfg", scale=scale))
        expected = v_uncond + scale * (v_cond - v_uncond)
        torch.testing.assert_close(cfg(v_cond, v_uncond, latents, 0.4), expected, rtol=0, atol=0)
        torch.testing.assert_close(apg(v_cond, v_uncond, latents, 0.4), expected, rtol=1e-5, atol=1e-5)


def test_scale_one_is_the_conditional_prediction_alone():
    latents, v_cond, v_uncond = _tensors()
    for kind in ("cfg", "apg"):
        guidance = Guidance(GuidanceSettings(kind=kind, scale=1.0))
        assert not guidance.needs_uncond
        assert torch.equal(guidance(v_cond, v_uncond, latents, 0.5), v_cond)
