"""The order in which `make test`'s two workers take the suite's modules: the longest first.

xdist hands a module (our scheduling unit, conftest.py) to whichever worker is free, in the order
of its queue. Its default queue puts the modules with the most tests first; ours with the most
tests are quick unit modules, and the ones that run for minutes hold one or two tests (the ZeRO
driver, the demo, the compiled-path check), so they came last and one worker ran alone for minutes
at the end. Longest first (LPT) leaves the short modules to fill the gaps at the end.

MODULE_SECONDS is what each module took, fixtures included, on the 2-core machine (`make test`'s
--durations, docs/benchmarks.md); a stale figure only moves a module in the queue. A module not in
it goes after those that are, launching tiers before in-process ones.
"""

from __future__ import annotations

SLURM_UNIT = "slurm-cluster"
"""The Slurm test files are one unit: they share one cluster on fixed ports (conftest.py)."""

MODULE_SECONDS = {
    SLURM_UNIT: 630,
    "tests/test_train_zero.py": 640,
    "tests/test_train.py": 290,
    "tests/test_dataset_formats.py": 260,
    "tests/test_demo.py": 230,
    "tests/test_fast_path_dist.py": 180,
    "tests/test_gpu_check.py": 105,
    "tests/test_numerics_timestep.py": 80,
    "tests/test_nonfinite.py": 65,
    "tests/test_hsdp.py": 62,
    "tests/test_rank_errors.py": 60,
    "tests/test_lora.py": 50,
    "tests/test_lycoris.py": 47,
    "tests/test_fp8.py": 47,
    "tests/test_cache_build.py": 46,
    "tests/test_numerics_optimizer.py": 45,
    "tests/test_stop_and_save.py": 44,
    "tests/test_resume_recipe.py": 37,
    "tests/test_grad_clip.py": 35,
    "tests/test_cache_s3.py": 34,
    "tests/test_large_model.py": 29,
    "tests/test_transformer_build.py": 26,
    "tests/test_hub_datasets.py": 25,
}

TIER_ORDER = ("slurm", "dist", "s3", "process", "gpu", "unit")


def unit_of(path: str, slurm_files: str) -> str:
    """The scheduling unit of a test file: its path, or the one Slurm unit."""
    return SLURM_UNIT if path.startswith(slurm_files) else path


def longest_first(units: list[tuple[str, str]]) -> list[str]:
    """Units in the order workers should take them. `units`: (unit, its first test's tier), in
    collection order; known units by MODULE_SECONDS, longest first, then the others by TIER_ORDER,
    each group keeping collection order (sorted() is stable)."""
    def key(entry: tuple[int, tuple[str, str]]) -> tuple[int, float, int, int]:
        index, (unit, tier) = entry
        seconds = MODULE_SECONDS.get(unit)
        if seconds is not None:
            return (0, -seconds, 0, index)
        return (1, 0, TIER_ORDER.index(tier) if tier in TIER_ORDER else len(TIER_ORDER), index)

    return [unit for _, (unit, _) in sorted(enumerate(units), key=key)]
