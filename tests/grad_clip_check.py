"""Driver for the gradient-clipping test; every rank runs it under torchrun (gloo on CPU).

    python -m torch.distributed.run --standalone --nproc-per-node=2 \\
        -m tests.grad_clip_check MODEL_DIR OUT_DIR STRATEGY:METHOD:LIMIT:PRECISION …

For each case, one optimizer step through the real `make_strategy` path: rank r computes the
MSE of the transformer on its own fixed batch (tests/numerics_check.fixed_batch, seed 100 + r),
the strategy reduces, clips (`train.grad_clip_method` METHOD at `max_grad_norm` LIMIT) and
steps AdamW. Rank 0 writes OUT_DIR/CASE/weights.safetensors (the whole transformer after the
step) and OUT_DIR/CASE/result.json (the loss and the gradient norm the strategy reported),
CASE being STRATEGY-METHOD-PRECISION. One process group serves every case (one start-up).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

LEARNING_RATE = 1e-3
# A large epsilon makes AdamW's first step depend on the gradient's size, not only its sign,
# so clipping (which keeps signs) shows in the weights.
ADAM_EPSILON = 1e-2


def recipe_for(model_dir: Path, out_dir: Path, strategy: str, method: str, limit: float, precision: str):
    from sd35dist.config.recipe import Recipe

    return Recipe.model_validate({
        "name": "clip", "seed": 0, "model": {"pretrained": str(model_dir)}, "data": {"cache_url": str(out_dir)},
        "parallel": {"strategy": strategy},
        "train": {"optimizer": "adamw", "mixed_precision": precision, "learning_rate": LEARNING_RATE,
                  "adam_epsilon": ADAM_EPSILON, "adam_weight_decay": 0.0, "gradient_checkpointing": False,
                  "max_grad_norm": limit, "grad_clip_method": method},
        "logging": {"report_to": "none"}, "output": {"dir": str(out_dir / "output")},
    })


def main(argv: list[str] | None = None) -> int:
    from sd35dist.parallel.process_group import destroy, init_process_group_from_env
    from sd35dist.parallel.strategy import make_strategy
    from tests.numerics_check import fixed_batch

    parser = argparse.ArgumentParser()
    for name in ("model_dir", "out_dir"):
        parser.add_argument(name, type=Path)
    parser.add_argument("cases", nargs="+", help="STRATEGY:METHOD:LIMIT:PRECISION")
    args = parser.parse_args(argv)

    world = init_process_group_from_env(timeout_s=900)  # four strategy builds on a shared 2-core machine
    try:
        for case in args.cases:
            strategy_name, method, limit, precision = case.split(":")
            out = args.out_dir / f"{strategy_name}-{method}-{precision}"
            recipe = recipe_for(args.model_dir, out, strategy_name, method, float(limit), precision)
            strategy = make_strategy(recipe, world)
            inputs, target = fixed_batch(args.model_dir, strategy.model.config, seed=100 + world.rank)
            pred = strategy.forward(**{k: v.to(world.device) for k, v in inputs.items()})
            loss = F.mse_loss(pred.float(), target.to(world.device))
            strategy.backward(loss)
            grad_norm = strategy.step(LEARNING_RATE, float(limit))
            weights = strategy.full_state_dict()
            if world.is_main:
                from safetensors.torch import save_file

                out.mkdir(parents=True, exist_ok=True)
                save_file({k: v.float().contiguous() for k, v in weights.items()}, out / "weights.safetensors")
                (out / "result.json").write_text(json.dumps({"loss": loss.item(), "grad_norm": grad_norm}))
            del strategy, weights
            torch.distributed.barrier()  # gloo aborts a rank whose peer tore the group down first
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
