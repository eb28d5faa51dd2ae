"""fp32 timesteps reach SD3's time projection whatever the compute dtype, under FSDP2 and ZeRO.

In bf16 a timestep loses all but 8 significant bits (928.35 → 928, 566.0 → 568); the
diffusers pipeline and training example pass fp32 and let the sinusoidal projection run
in fp32 before casting. Two ranks on gloo run `tests/numerics_check.py`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.numerics_check import LEARNING_RATE, fixed_batch, run_check

pytestmark = pytest.mark.dist

STEPS = 20
# Sharded bf16 training against the unsharded fp32-timestep reference below, measured on
# the tiny model: per-step losses within 1.9e-4 (9.5e-4 with bf16 timesteps), final weights
# off by 0.5 % of how far training moved them (17 % with bf16 timesteps).
LOSS_RTOL = 5e-4
WEIGHT_DEVIATION = 0.02


@pytest.mark.parametrize("strategy", ["fsdp2", "zero2"])
def test_time_projection_receives_the_fp32_sampled_timesteps(strategy, tiny_model, tmp_path):
    result = run_check("timestep", tiny_model, tmp_path, "--strategy", strategy)
    for rank in result["ranks"]:
        assert rank["received_dtype"] == "torch.float32"
        assert rank["received"] == rank["sent"], "bit-equal to the sampled timesteps"
        assert any(t != round(t) for t in rank["sent"]), "the sample holds timesteps bf16 cannot represent"


def reference_training(model_dir: Path, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """diffusers-style bf16 training on one unsharded model: fp32 master weights, a bf16 copy
    for forward and backward, fp32 timesteps, each of the two ranks' batches backpropagated
    on its own and the fp32 gradients averaged (what FSDP2's reduce does), torch AdamW."""
    from diffusers import SD3Transformer2DModel

    master = SD3Transformer2DModel.from_pretrained(model_dir / "transformer")
    optimizer = torch.optim.AdamW(master.parameters(), lr=LEARNING_RATE, weight_decay=1e-4, eps=1e-8)
    batches = {rank: [fixed_batch(model_dir, master.config, seed=1000 * rank + i) for i in range(2)] for rank in (0, 1)}
    losses = []
    for step in range(steps):
        compute = copy.deepcopy(master)
        for param in compute.parameters():  # what FSDP2 all-gathers: the masters rounded to bf16
            param.data = param.data.to(torch.bfloat16)
        step_losses = []
        for rank in (0, 1):
            inputs, target = batches[rank][step % 2]
            inputs = {k: v if k == "timestep" else v.to(torch.bfloat16) for k, v in inputs.items()}
            loss = F.mse_loss(compute(**inputs, return_dict=False)[0].float(), target)
            loss.backward()
            step_losses.append(loss.item())
        for param, bf16 in zip(master.parameters(), compute.parameters()):
            param.grad = bf16.grad.float() / 2
        torch.nn.utils.clip_grad_norm_(master.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(sum(step_losses) / 2)
    return losses, master.state_dict()


def test_twenty_bf16_steps_follow_the_fp32_timestep_reference(tiny_model, tmp_path):
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    sharded = run_check("train", tiny_model, tmp_path, "--strategy", "fsdp2", "--steps", str(STEPS))
    got, weights = sharded["ranks"][0]["losses"], load_file(tmp_path / "weights.safetensors")
    expected, reference = reference_training(tiny_model, STEPS)
    initial = SD3Transformer2DModel.from_pretrained(tiny_model / "transformer").state_dict()
    assert len(got) == STEPS and got == pytest.approx(expected, rel=LOSS_RTOL)
    names = [name for name in reference if name in weights]
    deviation = sum(float((weights[n] - reference[n]).pow(2).sum()) for n in names) ** 0.5
    moved = sum(float((reference[n] - initial[n]).pow(2).sum()) for n in names) ** 0.5
    assert moved > 0 and deviation / moved < WEIGHT_DEVIATION, f"{deviation / moved:.3f} of the distance trained"
