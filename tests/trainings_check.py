"""Driver: several `sd35dist train` runs one after another in one torchrun (gloo on CPU), one process group.

    python -m torch.distributed.run --standalone --nproc-per-node=2 \\
        -m tests.trainings_check RESULT_JSON RECIPE=RUN_DIR [RECIPE=RUN_DIR …]

Each run is what `sd35dist train --recipe RECIPE --run-dir RUN_DIR` does once its rank has joined the
group (jobs/train.py): the recipe loaded and checked as a rank loads it, then the training loop
(trainer/loop.run) with a fresh trainer, stream, strategy and checkpoint manager. A torchrun start
costs ~15 s of imports and teardown against ~4 s of tiny training, so a test module's runs share one.
What this does not prove — the CLI's own start, a resume in a fresh process, the exit status and the
one line a user sees — each module proves with `sd35dist train` itself at least once.

Between runs the driver undoes what a run leaves in the process: DeepSpeed's ZeRO-3 replaces
torch.nn.functional.linear for good ("this will persist unless manually reset"), and a later run
computing with it would differ from `sd35dist train` in a fresh process (~1e-7) — which the resumes
the tests run through `sd35dist train` itself compare against.

Runs go in order, so a run may resume from a checkpoint an earlier one wrote. A run a mistake stops
(a non-finite loss) records the line a user would see and the next run starts; a bug fails the driver.
Rank 0 writes RESULT_JSON: per run (in order) {"run_dir": RUN_DIR, "outcomes": each rank's outcome, "done" or the `error: …`
line; "stdout": what rank 0 printed (the run's `sd35dist:` notes)}.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import torch
import torch.distributed as dist


def run_trainings(result: Path, *runs: tuple[Path, Path], timeout: float = 900) -> list[dict]:
    """This driver on 2 gloo ranks (DeepSpeed on its CPU accelerator) over (recipe, run_dir) pairs, in
    order; per run, each rank's outcome and rank 0's output."""
    from tests.rank_runs import run_driver

    run_driver("tests.trainings_check", str(result), *(f"{recipe}={run_dir}" for recipe, run_dir in runs),
               timeout=timeout)
    return json.loads(result.read_text())


def one_run(recipe_file: Path, run_dir: Path, world, stdout: io.StringIO) -> str:
    from sd35dist.jobs.rank_failure import failure_line, is_mistake
    from sd35dist.jobs.rank_inputs import check_pretrained, check_rank_inputs, load_rank_recipe, train_model_parts
    from sd35dist.trainer.loop import run

    recipe = load_rank_recipe(recipe_file)
    check_pretrained(recipe, recipe_file.name, train_model_parts(recipe.model))
    check_rank_inputs(recipe, "train", recipe_file.name, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.redirect_stdout(stdout):
            code = run(recipe, world, run_dir, recipe_file.name)
    except Exception as err:
        if not is_mistake(err):
            raise
        return failure_line(err)
    assert code == 0, code
    return "done"


def main(argv: list[str] | None = None) -> int:
    from sd35dist.parallel.process_group import destroy, init_process_group_from_env

    parser = argparse.ArgumentParser()
    parser.add_argument("result", type=Path)
    parser.add_argument("runs", nargs="+", help="RECIPE=RUN_DIR")
    args = parser.parse_args(argv)
    world = init_process_group_from_env(timeout_s=900)
    linear = torch.nn.functional.linear
    outcomes = []
    try:
        for pair in args.runs:
            recipe_file, run_dir = pair.split("=", 1)
            stdout = io.StringIO()
            outcome = one_run(Path(recipe_file), Path(run_dir), world, stdout)
            torch.nn.functional.linear = linear
            gathered = [None] * world.world_size
            dist.all_gather_object(gathered, outcome)  # also: no rank starts the next run before all have ended
            outcomes.append({"run_dir": run_dir, "outcomes": gathered, "stdout": stdout.getvalue()})
        if world.is_main:
            args.result.write_text(json.dumps(outcomes))
        dist.barrier()  # leave together (gloo aborts a rank whose peer tore the group down first)
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
