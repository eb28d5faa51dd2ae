"""Per-block torch.compile in one process: no recompile per aspect bucket over all eight buckets of the
default recipe, and compiled training steps equal eager ones — dynamo's count over a whole model with
backend `eager` (dynamo makes and guards the graphs whatever the backend), inductor's numbers on one
block's attention.

Process tier: inductor compiles its kernels with the system's C++ compiler (child processes). Its first
run on a machine compiles for a minute or two on two cores; later runs read inductor's on-disk cache."""

from __future__ import annotations

import pytest
import torch

from sd35dist.config.activation_policy import parse_policy
from sd35dist.config.recipe import DEFAULT_BUCKETS
from sd35dist.parallel.compute_path import apply_checkpointing

pytestmark = pytest.mark.process

# The default recipe's eight one-megapixel buckets at a quarter of their side: the same aspect ratios and
# latent shapes, small enough for CPU (247–256 image tokens each).
BUCKETS = [(width // 4, height // 4) for width, height in DEFAULT_BUCKETS]
EAGER_RTOL = 1e-6
"""fp32, backend eager: dynamo's graph runs torch's own kernels in the traced order."""
POLICY = parse_policy("every_2")
INDUCTOR_RTOL = 1e-4
"""fp32: inductor fuses and reorders float operations; eight steps stay within 1e-4 relative of eager."""


def _model(layers: int):
    from diffusers import SD3Transformer2DModel

    from sd35dist.models.tiny_sd3 import TRANSFORMER_SIZES

    torch.manual_seed(0)
    return SD3Transformer2DModel(**{**TRANSFORMER_SIZES, "num_layers": layers, "dual_attention_layers": ()})


def _batch(width: int, height: int, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    latents = (2, 16, height // 8, width // 8)
    inputs = {"hidden_states": torch.randn(latents, generator=generator),
              "encoder_hidden_states": torch.randn(2, 7, 32, generator=generator),
              "pooled_projections": torch.randn(2, 64, generator=generator),
              "timestep": torch.rand(2, generator=generator) * 1000}
    return inputs, torch.randn(latents, generator=generator)


def _train(model, graphs_after_bucket: list[int] | None = None) -> list[float]:
    """One AdamW step per bucket; with `graphs_after_bucket`, dynamo's graph count after each."""
    from torch._dynamo.utils import counters

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step, (width, height) in enumerate(BUCKETS):
        inputs, target = _batch(width, height, step)
        loss = torch.nn.functional.mse_loss(model(**inputs, return_dict=False)[0], target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if graphs_after_bucket is not None:
            graphs_after_bucket.append(int(counters["stats"]["unique_graphs"]))
    return losses


@pytest.fixture(scope="module")
def eager_losses() -> list[float]:
    """The three-block model with `every_2` checkpointing (blocks 0 and 2), eager, over the eight buckets."""
    model = _model(3)
    apply_checkpointing(model.transformer_blocks, POLICY)
    return _train(model)


def _compiled(modules: list[torch.nn.Module], backend: str, model) -> tuple[list[float], list[int], int]:
    """Losses, graphs after each bucket and inductor's count of compiles (and cache hits), with `modules`
    of `model` compiled as the strategies compile blocks (dynamic shapes, in place)."""
    from torch._dynamo.utils import counters

    from sd35dist.parallel.compute_path import compile_each_block

    torch._dynamo.reset()
    counters.clear()
    compile_each_block(torch.nn.ModuleList(modules), backend)
    graphs: list[int] = []
    try:
        losses = _train(model, graphs)
    finally:
        torch._dynamo.reset()
    return losses, graphs, sum(counters["inductor"].values())


def test_one_graph_per_block_kind_over_the_eight_buckets(eager_losses):
    # Eight latent shapes; a bucket and its transpose have the same token count: four counts reach the blocks.
    assert len(set(BUCKETS)) == 8 and len({(w // 16) * (h // 16) for w, h in BUCKETS}) == 4
    model = _model(3)
    apply_checkpointing(model.transformer_blocks, POLICY)
    losses, graphs, inductor = _compiled(list(model.transformer_blocks), "eager", model)
    # Three blocks, three graphs (checkpointed middle, plain middle, checkpointed last), all made at the
    # first bucket: the other seven reuse them.
    assert graphs == [3] * 8, f"graphs after each bucket: {graphs}"
    assert inductor == 0
    assert losses == pytest.approx(eager_losses, rel=EAGER_RTOL)
    assert losses[-1] != losses[0]


def test_inductor_attention_trains_like_eager_over_the_eight_buckets_without_recompiling(eager_losses):
    # Inductor compiles the first block's joint attention (projections, RMS qk-norm, SDPA over a symbolic
    # token count), forward and backward, also re-run by the block's checkpoint in backward. The rest stays
    # eager: inductor's CPU compile costs seconds per kernel. Inductor's own shape guards would show as a
    # second graph.
    model = _model(3)
    apply_checkpointing(model.transformer_blocks, POLICY)
    losses, graphs, inductor = _compiled([model.transformer_blocks[0].attn], "inductor", model)
    assert graphs == [1] * 8, f"graphs after each bucket: {graphs}"
    assert inductor > 0, "inductor compiled the attention (or read it from its cache)"
    assert losses == pytest.approx(eager_losses, rel=INDUCTOR_RTOL)
