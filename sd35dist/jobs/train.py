"""`sd35dist train --recipe R --run-dir D`: what every rank runs under torchrun.

Read the recipe and check the pretrained model (a mistake is one line, before any process
group), join the process group, run the training loop (train/loop.py), leave together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

from sd35dist.config.loading import ConfigError
from sd35dist.jobs.rank_failure import rank_from_env, report_before_group, report_failure
from sd35dist.jobs.rank_inputs import check_pretrained, check_rank_inputs, load_rank_recipe, train_model_parts
from sd35dist.parallel.process_group import destroy, init_process_group_from_env
from sd35dist.trainer.loop import run

COLLECTIVE_TIMEOUT_S = 1800


def main(args: Any) -> int:
    recipe_file = Path(args.recipe)
    try:
        recipe = load_rank_recipe(recipe_file)
        check_pretrained(recipe, recipe_file.name, train_model_parts(recipe.model))
        run_dir = Path(args.run_dir or recipe.output.dir)
        check_rank_inputs(recipe, "train", recipe_file.name, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        world = init_process_group_from_env(COLLECTIVE_TIMEOUT_S)
    except ConfigError as err:
        return report_before_group(err, rank_from_env())
    except OSError as err:  # the run directory cannot be created (permissions, a read-only mount)
        return report_before_group(ConfigError("--run-dir", str(args.run_dir or recipe.output.dir),
                                               f"cannot be created: {err.strerror or err}"), rank_from_env())
    try:
        code = run(recipe, world, run_dir, recipe_file.name)
        # Leave together: gloo can abort a rank that destroys its group while a peer still works.
        dist.barrier()
        return code
    except Exception as err:  # noqa: BLE001 — one line once for a mistake; a bug is re-raised
        return report_failure(err, world.rank, run_dir)
    finally:
        destroy()
