"""`train.grad_clip_method: value` (SimpleTuner's default) reaches the optimizer step on every
strategy: one step on two gloo ranks (tests/grad_clip_check.py) moves the weights exactly as
AdamW on the rank-averaged gradient clamped to ±max_grad_norm does, and not as the unclipped
or norm-clipped gradient would."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.grad_clip_check import ADAM_EPSILON, LEARNING_RATE
from tests.numerics_check import fixed_batch
from tests.rank_runs import run_driver

pytestmark = pytest.mark.dist

# (strategy, method, compute precision); bf16 once on the default SD3.5 path (FSDP2). Norm clipping
# on every strategy is compared with FSDP2 by tests/test_train_zero.py (max_grad_norm 0.6).
CASES = [("fsdp2", "value", "fp32"), ("zero2", "value", "fp32"), ("zero3", "value", "fp32"),
         ("fsdp2", "value", "bf16")]


@pytest.fixture(scope="module")
def reference(tiny_model):
    """The rank-averaged fp32 gradient of the two ranks' batches, and the AdamW step from it."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(tiny_model / "transformer")
    initial = {name: param.detach().clone() for name, param in model.named_parameters()}
    for rank in (0, 1):
        inputs, target = fixed_batch(tiny_model, model.config, seed=100 + rank)
        (F.mse_loss(model(**inputs, return_dict=False)[0], target) / 2).backward()
    grads = {name: param.grad.detach().clone() for name, param in model.named_parameters()}

    def stepped(clipped: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        params = {name: torch.nn.Parameter(initial[name].clone()) for name in initial}
        for name, param in params.items():
            param.grad = clipped[name].clone()
        torch.optim.AdamW(list(params.values()), lr=LEARNING_RATE, eps=ADAM_EPSILON, weight_decay=0.0).step()
        return {name: param.detach() for name, param in params.items()}

    flat = torch.cat([g.flatten() for g in grads.values()])
    value_limit = float(flat.abs().median())  # half the elements get clamped
    norm = float(flat.norm())
    norm_limit = norm / 2
    return {
        "limits": {"value": value_limit, "norm": norm_limit},
        "value": stepped({n: g.clamp(-value_limit, value_limit) for n, g in grads.items()}),
        "norm": stepped({n: g * (norm_limit / (norm + 1e-6)) for n, g in grads.items()}),
        "unclipped": stepped(grads),
        "initial": initial,
    }


@pytest.fixture(scope="module")
def stepped(reference, tiny_model, tmp_path_factory):
    """Every case's weights after one step, from one torchrun (one start-up, one DeepSpeed import)."""
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("clip")
    cases = [f"{s}:{m}:{reference['limits'][m]!r}:{p}" for s, m, p in CASES]
    run_driver("tests.grad_clip_check", str(tiny_model), str(out), *cases, timeout=1200)
    return {case: load_file(out / "-".join(case) / "weights.safetensors") for case in CASES}


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(((a[n].float() - b[n].float()) ** 2).sum() for n in b)))


@pytest.mark.parametrize("strategy,method,precision", CASES, ids=["-".join(c) for c in CASES])
def test_the_clip_method_reaches_the_optimizer_step(strategy, method, precision, reference, stepped):
    got = stepped[strategy, method, precision]
    assert set(reference["initial"]) <= set(got)  # full_state_dict adds the pos_embed buffer
    expected, other = reference[method], reference["norm"]
    moved = distance(expected, reference["initial"])
    assert distance(reference["unclipped"], expected) > 0.2 * moved, "the limit really clips"
    assert distance(other, expected) > 0.2 * moved, "value and norm clipping move the weights differently"
    # fp32: the same numbers up to summation order; bf16 compute: within a few % of the step.
    tolerance = 1e-4 if precision == "fp32" else 0.05
    assert distance(got, expected) < tolerance * moved
    assert distance(got, reference["unclipped"]) > 0.2 * moved
