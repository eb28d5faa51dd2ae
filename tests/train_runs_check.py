"""Driver for tests/train_runs.train_in_one_group: several training runs one after another in one process
group; every rank runs it under torchrun (gloo on CPU).

    python -m torch.distributed.run --standalone --nproc-per-node=2 \\
        -m tests.train_runs_check RECIPE RUN_DIR [RECIPE RUN_DIR …]

Each run goes as `sd35dist train --recipe RECIPE --run-dir RUN_DIR` goes on a rank (sd35dist/jobs/train.py):
the recipe read and checked, the run directory made, the training loop (sd35dist/trainer/loop.py), a
barrier; a run reads what the runs before it wrote (a checkpoint to resume from), nothing else of theirs.
What the runs share is the start-up: the imports, the process group, DeepSpeed's import (about 15 s of CPU
a run on the 2-core test machine). Rank 0 prints `RUN_MARK RUN_DIR` before each run's output; a failed
run is a traceback and a non-zero exit.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

RUN_MARK = "=== train_runs_check run:"


def main(argv: list[str]) -> int:
    import torch.distributed as dist

    from sd35dist.jobs.rank_inputs import check_pretrained, check_rank_inputs, load_rank_recipe, train_model_parts
    from sd35dist.jobs.train import COLLECTIVE_TIMEOUT_S
    from sd35dist.parallel.process_group import destroy, init_process_group_from_env
    from sd35dist.trainer.loop import run

    if not argv or len(argv) % 2:
        raise SystemExit("usage: python -m tests.train_runs_check RECIPE RUN_DIR [RECIPE RUN_DIR …]")
    world = init_process_group_from_env(COLLECTIVE_TIMEOUT_S)
    try:
        for recipe_file, run_dir in zip(map(Path, argv[0::2]), map(Path, argv[1::2])):
            if world.is_main:
                print(f"{RUN_MARK} {run_dir}", flush=True)
            recipe = load_rank_recipe(recipe_file)
            check_pretrained(recipe, recipe_file.name, train_model_parts(recipe.model))
            check_rank_inputs(recipe, "train", recipe_file.name, run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            if run(recipe, world, run_dir, recipe_file.name) != 0:
                raise RuntimeError(f"{recipe_file}: the training loop returned non-zero")
            gc.collect()  # the run's model, optimizer and engine go before the next one builds its own
            dist.barrier()  # the next run may read this one's checkpoints
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
