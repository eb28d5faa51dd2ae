"""`sd35dist inspect`: format detection, keys by block, and `--diff` (table + PNG) on full weights
in any two formats and on a LoRA's effective ΔW. (A real 2-rank sharded checkpoint: test_train_zero.py.)"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import save_file

from sd35dist.checkpoint.inspect import block_of, diff
from sd35dist.cli import main as cli_main

pytestmark = pytest.mark.unit

MLP_KEY = "transformer_blocks.1.ff.net.0.proj.weight"
LORA_TARGET = "transformer_blocks.0.attn.to_q"


def inspect(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(["inspect", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def block_norm_sq(state: dict[str, torch.Tensor], block: str) -> float:
    return sum(float(v.double().square().sum()) for k, v in state.items() if block_of(k)[0] == block)


@pytest.fixture(scope="module")
def fine_tuned(tiny_model, tmp_path_factory):
    """A copy of the tiny transformer with one MLP weight of joint block 1 moved, in two formats."""
    from diffusers import SD3Transformer2DModel

    root = tmp_path_factory.mktemp("inspect")
    model = SD3Transformer2DModel.from_pretrained(tiny_model / "transformer")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.get_parameter(MLP_KEY).add_(0.01)
    model.save_pretrained(root / "tuned")
    assert cli_main(["export", str(root / "tuned"), "--format", "single-file", "--out", str(root / "tuned.safetensors"),
                     "--dtype", "fp32"]) == 0
    return root, base, model.state_dict()


def test_inspect_lists_keys_by_block_with_shapes_dtypes_counts_and_metadata(fine_tuned, capsys):
    root, base, _ = fine_tuned
    code, out, err = inspect(capsys, str(root / "tuned.safetensors"))
    assert code == 0, err
    assert "single file (Stability's SD3.5 layout)" in out
    assert "modelspec.architecture: stable-diffusion-v3.5-medium" in out
    block0 = next(line for line in out.splitlines() if line.startswith("joint block 0:"))
    assert "attention" in block0 and "MLP" in block0 and "adaLN" in block0 and "norm" in block0
    assert "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in out  # the file's own names
    total = sum(v.numel() for v in base.values())
    assert "total: " in out and f"{total:,} parameters" in out
    code, out, _ = inspect(capsys, str(root / "tuned"), "--summary")
    assert code == 0 and "diffusers folder (SD3Transformer2DModel)" in out and f"{total:,} parameters" in out
    assert MLP_KEY not in out, "--summary lists no keys"


def test_diff_shows_the_block_training_moved_across_formats(fine_tuned, tiny_model, capsys, tmp_path):
    root, base, tuned = fine_tuned
    want = math.sqrt(float((tuned[MLP_KEY] - base[MLP_KEY]).double().square().sum()) / block_norm_sq(base, "joint block 1"))
    for path in (root / "tuned", root / "tuned.safetensors"):  # diffusers folder and single file, against the pipeline dir
        changes = {c.group: c.relative for c in diff(path, tiny_model)[0]}
        assert changes["joint block 1"] == pytest.approx(want, rel=1e-9)
        assert all(value == 0 for group, value in changes.items() if group != "joint block 1")
    png = tmp_path / "diff.png"
    code, out, err = inspect(capsys, str(root / "tuned.safetensors"), "--diff", str(tiny_model), "--png", str(png), "--summary")
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("joint block 1 "))
    assert f"{want:.3e}" in row
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lora_diff_is_the_effective_delta_w(tiny_model, tmp_path, capsys):
    from safetensors import safe_open

    torch.manual_seed(0)
    rank, alpha = 4, 8.0
    width = json.loads((tiny_model / "transformer" / "config.json").read_text())["caption_projection_dim"]
    down, up = torch.randn(rank, width), torch.randn(width, rank) * 0.01
    save_file({f"transformer.{LORA_TARGET}.lora_A.weight": down, f"transformer.{LORA_TARGET}.lora_B.weight": up},
              str(tmp_path / "lora.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"transformer.r": rank, "transformer.lora_alpha": alpha})})
    base = {}
    for shard in sorted((tiny_model / "transformer").glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            base.update({k: handle.get_tensor(k) for k in handle.keys()})
    delta = (up.double() @ down.double()) * alpha / rank
    want = math.sqrt(float(delta.square().sum()) / block_norm_sq(base, "joint block 0"))
    changes, notes = diff(tmp_path / "lora.safetensors", tiny_model)
    assert {c.group: c.relative for c in changes}["joint block 0"] == pytest.approx(want, rel=1e-9)
    assert sum(c.delta_sq for c in changes if c.group != "joint block 0") == 0
    assert "lora_adapter_metadata" in notes[0]
    code, out, _ = inspect(capsys, str(tmp_path / "lora.safetensors"))
    assert code == 0 and "LoRA file" in out and "joint block 0: 2 tensors" in out


def test_bad_paths_are_one_line_with_exit_2(tiny_model, tmp_path, capsys):
    code, out, err = inspect(capsys, str(tmp_path / "nope"))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    code, _, err = inspect(capsys, str(tmp_path / "model.ckpt"))
    assert code == 2 and "not a .safetensors file" in err
    shutil.copytree(tiny_model / "vae", tmp_path / "vae")
    code, _, err = inspect(capsys, str(tmp_path / "vae"), "--diff", str(tiny_model), "--png", str(tmp_path / "p.png"))
    assert code == 2 and "no tensor names in common" in err and not (tmp_path / "p.png").exists()
