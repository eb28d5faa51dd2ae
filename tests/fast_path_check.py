"""Driver for tests/test_fast_path_dist.py; every rank runs it under torchrun (gloo on CPU).

    python -m torch.distributed.run --standalone --nproc-per-node=2 \\
        -m tests.fast_path_check MODEL_DIR OUT_DIR STRATEGY:PRECISION:FP8:COMPILE[@CASE_MODEL_DIR] …

Each case builds its strategy through the real `make_strategy` path — `train.mixed_precision` PRECISION,
`train.fp8` FP8 (none | tensorwise | rowwise), `train.compile_blocks` on with `train.compile_backend`
COMPILE, or off — with `every_2` activation checkpointing and EMA, then trains two optimizer steps on two
bucket shapes (different token counts; rank r on its own batches) and runs a no-grad forward as a
validation round does, on MODEL_DIR or the case's own model after `@`. One process group serves every
case (one start-up, one DeepSpeed import). Rank 0 writes OUT_DIR/result.json: per case the losses, the
no-grad output, the EMA weights' sum of squares, how many graphs dynamo had made after each step and in
all, how many AOT autograd and inductor compiled, and the case's seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(8, 8), (6, 10)]
"""Latent (height, width) per step: two buckets with different token counts (16 and 15)."""


def run_check(model_dir: Path, out: Path, *cases: str) -> dict:
    """This driver on 2 gloo ranks (DeepSpeed on its CPU accelerator); rank 0's result.json."""
    from tests.rank_runs import run_driver

    run_driver("tests.fast_path_check", str(model_dir), str(out), *cases, timeout=900)
    return json.loads((out / "result.json").read_text())


def like_block_model(tiny_model: Path, out: Path, blocks: int) -> Path:
    """A copy of the tiny model folder whose transformer has `blocks` like blocks (no dual attention; the last
    one context-pre-only, as in SD3.5 Large): what a compiled case traces, one graph per block, and with three
    blocks the middle one whose Linears fp8 runs in fp8 (it keeps the first and last blocks bf16)."""
    import shutil

    from diffusers import SD3Transformer2DModel

    from sd35dist.models.tiny_sd3 import TRANSFORMER_SIZES

    shutil.copytree(tiny_model, out, ignore=shutil.ignore_patterns("transformer"))
    torch.manual_seed(0)
    SD3Transformer2DModel(**{**TRANSFORMER_SIZES, "num_layers": blocks, "dual_attention_layers": ()}).save_pretrained(
        out / "transformer")
    return out


def three_block_model(tiny_model: Path, out: Path) -> Path:
    """The like-block model of three blocks: fp8's middle block."""
    return like_block_model(tiny_model, out, 3)


def recipe_for(model_dir: Path, out_dir: Path, strategy: str, precision: str, fp8: str, compile_backend: str):
    from sd35dist.config.recipe import Recipe

    compiled = compile_backend != "off"
    return Recipe.model_validate({
        "name": "fast-path", "seed": 0, "model": {"pretrained": str(model_dir)}, "data": {"cache_url": str(out_dir)},
        "parallel": {"strategy": strategy},
        "train": {"optimizer": "adamw", "mixed_precision": precision, "learning_rate": 1e-3, "max_grad_norm": 1.0,
                  "gradient_checkpointing": "every_2", "compile_blocks": compiled,
                  "compile_backend": compile_backend if compiled else "inductor", "fp8": fp8,
                  "ema": {"enabled": True, "decay": 0.5}},
        "logging": {"report_to": "none"}, "output": {"dir": str(out_dir / f"output-{strategy}")},
    })


def batch(config, rank: int, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * rank + step)
    height, width = SHAPES[step % len(SHAPES)]
    inputs = {"hidden_states": torch.randn(2, config.in_channels, height, width, generator=generator),
              "encoder_hidden_states": torch.randn(2, 7, config.joint_attention_dim, generator=generator),
              "pooled_projections": torch.randn(2, config.pooled_projection_dim, generator=generator),
              "timestep": torch.rand(2, generator=generator) * 1000}
    return inputs, torch.randn(2, config.out_channels, height, width, generator=generator)


def one_run(strategy, world) -> dict:
    from torch._dynamo.utils import counters

    losses, graphs_per_step = [], []
    for step in range(len(SHAPES)):
        inputs, target = batch(strategy.model.config, world.rank, step)
        loss = F.mse_loss(strategy.forward(**inputs).float(), target)
        strategy.backward(loss)
        strategy.step(1e-3, 1.0)
        strategy.update_ema(0.5)
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(total.item() / world.world_size)
        graphs_per_step.append(int(counters["stats"]["unique_graphs"]))
    with torch.no_grad():
        inputs, _ = batch(strategy.model.config, world.rank, 99)
        rendered = strategy.forward(**inputs).float()
    ema = strategy.full_state_dict(use_ema=True)
    return {"losses": losses, "rendered": rendered.flatten()[:64].tolist(),
            "ema_sq": float(sum((t.float() ** 2).sum() for t in ema.values())) if world.is_main else None,
            "graphs_per_step": graphs_per_step, "graphs": int(counters["stats"]["unique_graphs"]),
            "aot_graphs": int(counters["aot_autograd"]["total"]), "inductor": int(sum(counters["inductor"].values()))}


def main(argv: list[str] | None = None) -> int:
    from sd35dist.parallel.process_group import destroy, init_process_group_from_env
    from sd35dist.parallel.strategy import make_strategy

    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("cases", nargs="+", help="STRATEGY:PRECISION:FP8:COMPILE[@MODEL_DIR] (COMPILE: off or a backend)")
    args = parser.parse_args(argv)
    world = init_process_group_from_env(timeout_s=900)
    results: dict[str, dict] = {}
    try:
        for argument in args.cases:
            case, _, case_model = argument.partition("@")
            started = time.perf_counter()
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            torch.manual_seed(0)
            model_dir = Path(case_model) if case_model else args.model_dir
            strategy = make_strategy(recipe_for(model_dir, args.out_dir, *case.split(":")), world)
            results[case] = {**one_run(strategy, world), "seconds": time.perf_counter() - started}
            del strategy
            torch.distributed.barrier()  # gloo aborts a rank whose peer tore the group down first
        if world.is_main:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            (args.out_dir / "result.json").write_text(json.dumps(results))
        torch.distributed.barrier()  # leave together (gloo)
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
