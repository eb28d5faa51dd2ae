"""Driver for tests/test_compile_strategies.py; every rank runs it under torchrun (gloo on CPU).

    python -m torch.distributed.run --standalone --nproc-per-node=2 \\
        -m tests.compile_check MODEL_DIR OUT_DIR STRATEGY [STRATEGY …]

For each strategy, twice through the real `make_strategy` path — blocks eager, then compiled per block
(dynamic shapes, `train.compile_backend: aot_eager`: dynamo and AOT autograd trace forward and backward
as for inductor, without inductor's minutes of C++ compile per rank on CPU) — with `every_2` activation
checkpointing and EMA: three optimizer steps on two bucket shapes (rank r on its own batches), then a
no-grad forward as a validation round makes it. Rank 0 writes OUT_DIR/result.json: per strategy and mode
the losses, the no-grad output, the EMA weights' sum of squares, how many graphs dynamo made and how
many AOT autograd and inductor compiled.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(8, 8), (6, 10), (8, 8)]
"""Latent (height, width) per step: two buckets, the first again."""


def run_check(model_dir: Path, out: Path, *strategies: str) -> dict:
    import subprocess
    import sys

    from tests.cli_runs import PROJECT, torch_extensions_dir, venv_env

    env = venv_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=torch_extensions_dir())
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "tests.compile_check", str(model_dir), str(out), *strategies],
        capture_output=True, text=True, cwd=PROJECT, env=env, timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "result.json").read_text())


def recipe_for(model_dir: Path, out_dir: Path, strategy: str, compiled: bool):
    from sd35dist.config.recipe import Recipe

    return Recipe.model_validate({
        "name": "compile", "seed": 0, "model": {"pretrained": str(model_dir)}, "data": {"cache_url": str(out_dir)},
        "parallel": {"strategy": strategy},
        "train": {"optimizer": "adamw", "mixed_precision": "fp32", "learning_rate": 1e-3, "max_grad_norm": 1.0,
                  "gradient_checkpointing": "every_2", "compile_blocks": compiled,
                  "compile_backend": "aot_eager",
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

    losses = []
    for step in range(len(SHAPES)):
        inputs, target = batch(strategy.model.config, world.rank, step)
        loss = F.mse_loss(strategy.forward(**inputs).float(), target)
        strategy.backward(loss)
        strategy.step(1e-3, 1.0)
        strategy.update_ema(0.5)
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(total.item() / world.world_size)
    with torch.no_grad():
        inputs, _ = batch(strategy.model.config, world.rank, 99)
        rendered = strategy.forward(**inputs).float()
    ema = strategy.full_state_dict(use_ema=True)
    return {"losses": losses, "rendered": rendered.flatten()[:64].tolist(),
            "ema_sq": float(sum((t.float() ** 2).sum() for t in ema.values())) if world.is_main else None,
            "graphs": int(counters["stats"]["unique_graphs"]),
            "aot_graphs": int(counters["aot_autograd"]["total"]), "inductor": int(sum(counters["inductor"].values()))}


def main(argv: list[str] | None = None) -> int:
    from sd35dist.parallel.process_group import destroy, init_process_group_from_env
    from sd35dist.parallel.strategy import make_strategy

    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("strategies", nargs="+")
    args = parser.parse_args(argv)
    world = init_process_group_from_env(timeout_s=1200)
    results: dict[str, dict] = {}
    try:
        for name in args.strategies:
            for compiled in (False, True):
                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
                torch.manual_seed(0)
                strategy = make_strategy(recipe_for(args.model_dir, args.out_dir, name, compiled), world)
                results[f"{name}-{'compiled' if compiled else 'eager'}"] = one_run(strategy, world)
                del strategy
        if world.is_main:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            (args.out_dir / "result.json").write_text(json.dumps(results))
        torch.distributed.barrier()  # leave together (gloo)
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
