"""Driver for the FSDP2 LoRA world-size test: tests/test_lora.py calls `main` in its own process (world size
1: a one-process group on an in-memory store); under torchrun (gloo on CPU) it runs on any world size:

    python -m torch.distributed.run --standalone --nproc-per-node=1 \\
        -m tests.lora_reshard_check RECIPE CHECKPOINT OUT_DIR

Builds the recipe's strategy on this world size, loads CHECKPOINT (written on another world
size) into it and saves it again to OUT_DIR: what a resume on another world size starts from.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(recipe_file: str, checkpoint: str, out_dir: str) -> int:
    from sd35dist.config.recipe import load_recipe
    from sd35dist.parallel.process_group import destroy, init_process_group_from_env
    from sd35dist.parallel.strategy import make_strategy

    world = init_process_group_from_env(timeout_s=300)
    try:
        strategy = make_strategy(load_recipe(Path(recipe_file)), world)
        strategy.load(Path(checkpoint))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        strategy.save(Path(out_dir))
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
