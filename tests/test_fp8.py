"""`train.fp8` through the training job on 2 CPU ranks (FSDP2, gloo; a straight run and a branch in one
torchrun: tests/trainings_check.py), with torchao's float8 emulation:
validation rounds render, a branch from a mid-run checkpoint resumes exactly, checkpoints hold the fp32
masters only and exports are in the asked dtype with the plain diffusers keys.

fp8's losses against bf16 (tensorwise and rowwise) are compared in tests/test_fast_path_dist.py, in one
process group with the compile cases; fp8 composed with compile runs in tests/test_gpu_check.py."""

from __future__ import annotations

import pytest
import torch

from sd35dist.checkpoint.layout import CheckpointDir
from tests.cli_runs import sd35dist_in_process
from tests.fast_path_check import three_block_model
from tests.train_runs import losses, train_in_one_group, train_recipe

pytestmark = pytest.mark.dist

FP8 = {"mixed_precision": "bf16", "max_train_steps": 3, "checkpointing_steps": 2, "gradient_checkpointing": "every_2",
       "fp8": "tensorwise"}


def test_fp8_run_validates_resumes_exactly_and_exports_plain_weights(cache, tmp_path):
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    from sd35dist.checkpoint.export import checkpoint_state
    from tests.validation_check import cache_validation_prompts, with_validation

    # The tiny model with three blocks: fp8 keeps the first and last in bf16, the middle one runs in fp8.
    cache = (three_block_model(cache[0], tmp_path / "tiny-sd3-3"), cache[1])
    # Straight fp8 run, with validation rounds at the start and at step 3 (the sharded fp8 model renders);
    # checkpoints at steps 2 and 3.
    # Then a branch from step 2's checkpoint into a new directory; both runs in one torchrun.
    straight = tmp_path / "straight"
    recipe = train_recipe(tmp_path / "fp8.yaml", cache, straight, **FP8)
    cache_validation_prompts(recipe)
    middle = CheckpointDir(straight).path(2)
    branch = train_recipe(tmp_path / "branch.yaml", cache, tmp_path / "branch", **{**FP8, "resume": str(middle)})
    output = train_in_one_group((with_validation(recipe), tmp_path / "run-fp8"), (branch, tmp_path / "run-branch"))
    assert "fp8: tensorwise" in output[tmp_path / "run-fp8"], output[tmp_path / "run-fp8"][-2000:]
    reference = losses(tmp_path / "run-fp8")
    assert sorted(reference) == [1, 2, 3]
    assert len(list((tmp_path / "run-fp8" / "validation").iterdir())) >= 2

    # The branch: the same step-3 loss and the same final weights and EMA (fp8 scales are recomputed, not stored).
    assert losses(tmp_path / "run-branch") == {3: reference[3]}
    for use_ema in (False, True):
        resumed = checkpoint_state(CheckpointDir(tmp_path / "branch").latest(), use_ema)
        uninterrupted = checkpoint_state(CheckpointDir(straight).latest(), use_ema)
        assert resumed.keys() == uninterrupted.keys()
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), "final weights (and EMA) equal"
        assert {t.dtype for t in resumed.values()} <= {torch.float32}, "fp32 masters: no fp8 tensor in a checkpoint"

    # Exports (`sd35dist export --dtype`, in this process) hold the plain diffusers keys in the asked dtype.
    plain = SD3Transformer2DModel.from_pretrained(cache[0], subfolder="transformer").state_dict()
    for dtype, flag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        out = tmp_path / f"export-{flag}"
        assert sd35dist_in_process("export", str(tmp_path / "branch"), "--out", str(out), "--dtype", flag)[0] == 0
        files = {}
        for path in out.glob("*.safetensors"):
            files.update(load_file(path))
        assert files.keys() == plain.keys() and {t.dtype for t in files.values()} == {dtype}
