"""The SD3 transformer built on meta, sharded with FSDP2 and loaded file by file.

unit: meta build costs no memory (even at SD3.5 Large's 8B size); loading into an unsharded
model gives exactly `from_pretrained`'s weights, buffers and outputs; a checkpoint that does
not fit fails with one message naming the keys. dist: 2 gloo ranks under torchrun load the
sharded model, and its full state dict, forward output and one data-parallel SGD step (with
activation checkpointing) match the unsharded model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sd35dist.models.transformer_build import (
    WEIGHTS_INDEX_NAME,
    CheckpointMismatch,
    build_on_meta,
    materialize_and_load,
    transformer_config,
)
from sd35dist.parallel.fsdp2_sharding import fsdp_mesh_shape
from tests.cli_runs import PROJECT, venv_env
from tests.dist_transformer_check import fixed_inputs, forward, sgd_step, tensor_sha256
from tests.rank_runs import WARM_TORCHRUN

RUN_TIMEOUT_S = 180

# SD3.5 Large's transformer/config.json, minus the diffusers bookkeeping keys.
SD35_LARGE_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm", dual_attention_layers=[],
)


@pytest.fixture(scope="module")
def model_dir(tiny_model: Path) -> Path:
    """The session's tiny SD3 (seed 0)."""
    return tiny_model


@pytest.fixture(scope="module")
def reference(model_dir: Path):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(model_dir / "transformer", local_files_only=True)


def load_unsharded(model_dir: Path):
    model = build_on_meta(transformer_config(model_dir))
    return materialize_and_load(model, model_dir)


def edit_checkpoint(model_dir: Path, dest: Path, *, drop: str | None = None, add: str | None = None) -> Path:
    """A copy of the model directory whose transformer checkpoint lacks `drop` and/or has an extra `add`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, dest)
    folder = dest / "transformer"
    index = json.loads((folder / WEIGHTS_INDEX_NAME).read_text())
    file = index["weight_map"][drop] if drop else sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(folder / file)
    if drop:
        del tensors[drop], index["weight_map"][drop]
    if add:
        tensors[add] = torch.zeros(3)
        index["weight_map"][add] = file
    save_file(tensors, folder / file, metadata={"format": "pt"})
    (folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index))
    return dest


def assert_state_dicts_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    different = [key for key in want if not torch.equal(got[key], want[key])]
    assert not different, f"tensors differ: {different[:5]}"


# ---- unit --------------------------------------------------------------------------------


@pytest.mark.unit
def test_meta_build_of_sd35_large_allocates_nothing() -> None:
    model = build_on_meta(SD35_LARGE_CONFIG)

    tensors = list(model.parameters()) + list(model.buffers())
    assert all(tensor.is_meta for tensor in tensors)
    assert len(model.transformer_blocks) == 38
    assert abs(sum(p.numel() for p in model.parameters()) - 8.06e9) < 0.01e9


@pytest.mark.unit
def test_meta_build_follows_config_json(model_dir: Path, reference) -> None:
    model = build_on_meta(transformer_config(model_dir))

    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()
    }
    assert build_on_meta(transformer_config(model_dir), dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.unit
def test_loaded_model_equals_from_pretrained(model_dir: Path, reference) -> None:
    model = load_unsharded(model_dir)

    assert_state_dicts_equal(model.state_dict(), reference.state_dict())
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    inputs = fixed_inputs(transformer_config(model_dir))
    with torch.no_grad():
        assert torch.equal(forward(model, inputs), forward(reference, inputs))


@pytest.mark.unit
def test_pos_embed_is_recomputed_when_the_checkpoint_lacks_it(model_dir: Path, reference, tmp_path: Path) -> None:
    # to_empty leaves garbage in buffers; the sin-cos table must come back bit-exact anyway.
    edited = edit_checkpoint(model_dir, tmp_path / "sd3", drop="pos_embed.pos_embed")

    model = load_unsharded(edited)

    assert_state_dicts_equal(model.state_dict(), reference.state_dict())


@pytest.mark.unit
@pytest.mark.parametrize(
    "edit, expected",
    [
        (dict(drop="transformer_blocks.1.attn.to_q.weight"), "1 model keys not in the checkpoint (transformer_blocks.1.attn.to_q.weight)"),
        (dict(add="lora_unet.extra"), "1 checkpoint keys the model does not have (lora_unet.extra)"),
    ],
    ids=["missing", "unexpected"],
)
def test_mismatched_checkpoint_names_the_keys(model_dir: Path, tmp_path: Path, edit: dict, expected: str) -> None:
    edited = edit_checkpoint(model_dir, tmp_path / "sd3", **edit)
    model = build_on_meta(transformer_config(edited))

    with pytest.raises(CheckpointMismatch) as raised:
        materialize_and_load(model, edited)

    message = str(raised.value)
    assert expected in message and str(edited / "transformer") in message and "\n" not in message
    assert all(t.is_meta for t in model.parameters()), "nothing is materialised before the keys are checked"


@pytest.mark.unit
def test_model_built_in_another_dtype_is_refused(model_dir: Path) -> None:
    model = build_on_meta(transformer_config(model_dir), dtype=torch.bfloat16)

    with pytest.raises(ValueError, match=r"build_on_meta\(config, dtype=torch.float32\)"):
        materialize_and_load(model, model_dir, dtype=torch.float32)


@pytest.mark.unit
def test_fsdp_mesh_shape() -> None:
    assert fsdp_mesh_shape(8) == (8,)
    assert fsdp_mesh_shape(32, replicas=4) == (4, 8)
    with pytest.raises(ValueError, match="must divide the world size 8"):
        fsdp_mesh_shape(8, replicas=3)


# ---- dist --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp2_run(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("fsdp2")
    proc = subprocess.run(
        [
            *WARM_TORCHRUN, "--standalone", "--nnodes=1", "--nproc-per-node=2",
            "-m", "tests.dist_transformer_check", str(model_dir), str(out_dir),
        ],
        capture_output=True, text=True, cwd=PROJECT, timeout=RUN_TIMEOUT_S, env=venv_env(OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out_dir


@pytest.mark.dist
def test_sharded_load_gathers_to_the_pretrained_state_dict(fsdp2_run: Path, reference) -> None:
    result = json.loads((fsdp2_run / "result.json").read_text())

    want = {key: tensor_sha256(value) for key, value in reference.state_dict().items()}
    assert result["state_sha256"] == want
    # Every parameter really was sharded: a replicated model would also gather correctly.
    assert result["sharded_params"] == len(list(reference.parameters()))


@pytest.mark.dist
def test_sharded_forward_matches_unsharded(fsdp2_run: Path, model_dir: Path, reference) -> None:
    result = json.loads((fsdp2_run / "result.json").read_text())

    with torch.no_grad():
        want = forward(reference, fixed_inputs(transformer_config(model_dir)))
    torch.testing.assert_close(torch.tensor(result["output"]), want, rtol=0, atol=1e-6)


@pytest.mark.dist
def test_data_parallel_step_with_activation_checkpointing_matches_one_process(
    fsdp2_run: Path, model_dir: Path, reference
) -> None:
    from safetensors.torch import load_file

    # Rank r trained on sample r; FSDP2 averages gradients, so this equals one step on both samples.
    result = json.loads((fsdp2_run / "result.json").read_text())
    model = load_unsharded(model_dir)
    loss = sgd_step(model, fixed_inputs(transformer_config(model_dir)))

    assert sum(result["losses"]) / 2 == pytest.approx(loss, rel=1e-6)
    stepped = load_file(fsdp2_run / "stepped.safetensors")
    want = model.state_dict()
    assert sorted(stepped) == sorted(want)
    unchanged = sorted(key for key in want if torch.equal(want[key], reference.state_dict()[key]))
    # Only what gets no gradient in SD3 may stay: the fixed position table (a buffer) and the last
    # block's context-query path, whose output that block (context_pre_only) discards.
    last = f"transformer_blocks.{model.config.num_layers - 1}.attn"
    assert unchanged == ["pos_embed.pos_embed", f"{last}.add_q_proj.bias", f"{last}.add_q_proj.weight",
                         f"{last}.norm_added_q.weight"], "the SGD step should move every trained parameter"
    for key in want:
        torch.testing.assert_close(stepped[key], want[key], rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
