"""Per-block torch.compile with inductor on CPU: one graph per distinct block over all eight aspect buckets
of the default recipe (no recompile per bucket), and compiled training steps equal eager ones.

Process tier: inductor compiles its kernels with the system's C++ compiler (child processes). Its
first run on a machine compiles for minutes on two cores; later runs read inductor's on-disk cache."""

from __future__ import annotations

import pytest
import torch

from sd35dist.config.activation_policy import parse_policy
from sd35dist.config.recipe import DEFAULT_BUCKETS

pytestmark = pytest.mark.process

# The default recipe's eight one-megapixel buckets at a quarter of their side: the same aspect ratios and
# latent shapes, small enough for CPU (247–256 image tokens each).
BUCKETS = [(width // 4, height // 4) for width, height in DEFAULT_BUCKETS]
LOSS_RTOL = 1e-4
"""fp32: inductor fuses and reorders float operations; a few steps stay within 1e-4 relative of eager."""


def _model():
    from diffusers import SD3Transformer2DModel

    from sd35dist.models.tiny_sd3 import TRANSFORMER_SIZES

    torch.manual_seed(0)
    # Three blocks without SD3.5 Medium's dual attention: two distinct block graphs (a middle block, the last).
    return SD3Transformer2DModel(**{**TRANSFORMER_SIZES, "num_layers": 3, "dual_attention_layers": ()})


def _batch(width: int, height: int, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    latents = (2, 16, height // 8, width // 8)
    inputs = {"hidden_states": torch.randn(latents, generator=generator),
              "encoder_hidden_states": torch.randn(2, 7, 32, generator=generator),
              "pooled_projections": torch.randn(2, 64, generator=generator),
              "timestep": torch.rand(2, generator=generator) * 1000}
    return inputs, torch.randn(latents, generator=generator)


def _train(model, steps: list[tuple[int, int]]) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step, (width, height) in enumerate(steps):
        inputs, target = _batch(width, height, step)
        loss = torch.nn.functional.mse_loss(model(**inputs, return_dict=False)[0], target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_one_graph_per_block_over_the_eight_buckets_and_compiled_steps_equal_eager():
    from torch._dynamo.utils import counters

    from sd35dist.parallel.compute_path import apply_checkpointing, compile_each_block

    # Eight latent shapes; a bucket and its transpose have the same token count: four counts reach the blocks.
    assert len(set(BUCKETS)) == 8 and len({(w // 16) * (h // 16) for w, h in BUCKETS}) == 4
    policy = parse_policy("every_2")  # blocks 0 and 2 checkpointed inside their compiled graphs, block 1 not
    eager = _model()
    apply_checkpointing(eager.transformer_blocks, policy)
    expected = _train(eager, BUCKETS)

    torch._dynamo.reset()
    counters.clear()
    compiled = _model()
    apply_checkpointing(compiled.transformer_blocks, policy)
    compile_each_block(compiled.transformer_blocks)
    graphs_after_bucket: list[int] = []
    compiled.transformer_blocks[-1].register_forward_hook(
        lambda *_: graphs_after_bucket.append(counters["stats"]["unique_graphs"]))
    losses = _train(compiled, BUCKETS)
    # Three blocks, three graphs (checkpointed middle, plain middle, checkpointed last), all made at the
    # first bucket: the other seven reuse them.
    assert graphs_after_bucket == [3] * 8, f"graphs after each bucket: {graphs_after_bucket}"
    assert losses == pytest.approx(expected, rel=LOSS_RTOL)
    assert losses[-1] != losses[0]
