"""`sd35dist export --format single-file`: Stability's SD3.5 layout, read back by diffusers' own
`from_single_file`, equal tensor for tensor to the diffusers folder; dtypes, fp8, the VAE,
metadata, the streaming writer. (The checkpoints of every strategy: test_train_zero.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sd35dist.checkpoint.fsdp2_files import DcpTensors
from sd35dist.checkpoint.original_layout import VAE_PREFIX, LayoutMismatch, transformer_plan
from sd35dist.checkpoint.safetensors_stream import TensorSpec, write_streaming
from sd35dist.checkpoint.single_file import Part, peak_bytes
from sd35dist.checkpoint.tensor_sources import block_group
from sd35dist.cli import main as cli_main

pytestmark = pytest.mark.unit


def export(capsys, *argv: str) -> tuple[int, str]:
    code = cli_main(["export", *argv])
    return code, capsys.readouterr().err


def load_single_file(path: Path, model_dir: Path, dtype: torch.dtype = torch.float32):
    """The file through diffusers' loader, offline: the configs come from the tiny model's folders."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_single_file(str(path), config=str(model_dir / "transformer"),
                                                         local_files_only=True, dtype=dtype)
    vae = AutoencoderKL.from_single_file(str(path), config=str(model_dir), subfolder="vae", local_files_only=True,
                                         dtype=dtype)
    return transformer.state_dict(), vae.state_dict()


@pytest.fixture(scope="module")
def reference(tiny_model):
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    return (SD3Transformer2DModel.from_pretrained(tiny_model / "transformer").state_dict(),
            AutoencoderKL.from_pretrained(tiny_model / "vae").state_dict())


def test_diffusers_reads_the_single_file_back_equal_to_the_folder(tiny_model, reference, tmp_path, capsys):
    out = tmp_path / "tiny-ft.safetensors"
    code, err = export(capsys, str(tiny_model / "transformer"), "--format", "single-file", "--out", str(out),
                       "--dtype", "fp32", "--with-vae", "--title", "tiny fine-tune")
    assert code == 0, err
    with safe_open(str(out), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    # Every key family of the original layout is there (the tiny model has them all).
    for key in ("model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight",
                "model.diffusion_model.joint_blocks.1.x_block.attn.ln_q.weight",
                "model.diffusion_model.joint_blocks.1.context_block.attn.ln_k.weight",
                "model.diffusion_model.final_layer.adaLN_modulation.1.weight",
                "first_stage_model.decoder.mid.attn_1.q.weight"):
        assert key in keys, key
    assert "model.diffusion_model.joint_blocks.1.context_block.mlp.fc1.weight" not in keys, "context_pre_only"
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys)
    assert metadata["modelspec.sai_model_spec"] == "1.0.0" and metadata["modelspec.title"] == "tiny fine-tune"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v3.5-medium"  # dual attention: MMDiT-X
    assert metadata["modelspec.resolution"] == "256x256" and metadata["sd35dist.ema"] == "false"
    transformer, vae = load_single_file(out, tiny_model)
    want_transformer, want_vae = reference
    assert transformer.keys() == want_transformer.keys() and vae.keys() == want_vae.keys()
    assert all(torch.equal(transformer[k], want_transformer[k]) for k in want_transformer)
    assert all(torch.equal(vae[k], want_vae[k]) for k in want_vae)
    code, err = export(capsys, str(tiny_model / "transformer"), "--format", "single-file", "--out", str(out))
    assert code == 2 and "already exists" in err


def test_a_vae_of_sd3_s_shape_comes_out_as_the_vae_comfyui_builds(tiny_model, tmp_path, capsys):
    """ComfyUI builds the VAE of a single file with SD3's 128-wide encoder whatever the file holds
    (tests/comfy_vae_rule.py, from comfy/sd.py `VAE.__init__`): the demo's VAE of SD3's shape must be
    exported with exactly the keys and shapes of that model, and the tests' toy VAE fails the same rule."""
    from diffusers import AutoencoderKL

    from sd35dist.models.tiny_sd3 import SD3_VAE_SIZES
    from tests.comfy_vae_rule import comfy_vae_configs, comfy_vae_problems, single_file_vae_shapes, to_diffusers_names

    with torch.device("meta"):  # no random init of 84M parameters: tensor i holds the value i, in bf16
        sd3_vae = AutoencoderKL(**SD3_VAE_SIZES)
    sd3_vae = sd3_vae.to(torch.bfloat16).to_empty(device="cpu")
    with torch.no_grad():
        for index, tensor in enumerate(sd3_vae.state_dict().values(), 1):
            tensor.fill_(index)
    sd3_vae.save_pretrained(tmp_path / "vae")
    for name, vae_dir in (("sd3", tmp_path / "vae"), ("toy", tiny_model / "vae")):
        code, err = export(capsys, str(tiny_model / "transformer"), "--format", "single-file", "--dtype", "bf16",
                           "--with-vae", "--vae", str(vae_dir), "--out", str(tmp_path / f"{name}.safetensors"))
        assert code == 0, err
    sd3, toy = single_file_vae_shapes(tmp_path / "sd3.safetensors"), single_file_vae_shapes(tmp_path / "toy.safetensors")

    assert comfy_vae_problems(sd3) == []
    encoder, decoder = comfy_vae_configs(sd3)
    assert encoder == decoder and not encoder["use_post_quant_conv"], "one AutoencodingEngine, SD3's: no quant convs"
    with torch.device("meta"):
        comfy_vae = AutoencoderKL(**encoder)
    # diffusers' own LDM converter, then strict: a missing, leftover or differently shaped key raises.
    comfy_vae.load_state_dict(to_diffusers_names(sd3), strict=True, assign=True)
    assert sum(p.numel() for p in comfy_vae.parameters()) == 83_819_683
    assert sd3["decoder.mid.attn_1.q.weight"] == (512, 512, 1, 1), "ComfyUI's attention is 1x1 convolutions"
    with safe_open(str(tmp_path / "sd3.safetensors"), framework="pt") as handle:  # up blocks run reversed
        stored = handle.get_tensor(VAE_PREFIX + "decoder.up.0.block.0.conv1.weight")
    assert stored.dtype == torch.bfloat16 and torch.equal(stored, sd3_vae.decoder.up_blocks[3].resnets[0].conv1.weight)

    refused = comfy_vae_problems(toy)
    assert any("size mismatches" in p for p in refused) and any("missing VAE keys" in p for p in refused), refused


@pytest.mark.parametrize("dtype, stored", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                           ("fp8_e4m3fn", torch.float8_e4m3fn)])
def test_each_dtype_loads_back_as_the_rounded_weights(tiny_model, reference, tmp_path, capsys, dtype, stored):
    out = tmp_path / f"tiny-{dtype}.safetensors"
    code, err = export(capsys, str(tiny_model / "transformer"), "--format", "single-file", "--out", str(out),
                       "--dtype", dtype, "--with-vae")
    assert code == 0, err
    with safe_open(str(out), framework="pt") as handle:
        qkv = handle.get_tensor("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight")
        bias = handle.get_tensor("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.bias")
        conv = handle.get_tensor("first_stage_model.encoder.conv_in.weight")
    assert qkv.dtype == stored
    # fp8 is for the linear weights only: biases, norms and the VAE stay bf16.
    assert bias.dtype == conv.dtype == (torch.bfloat16 if dtype == "fp8_e4m3fn" else stored)
    transformer, vae = load_single_file(out, tiny_model)
    want_transformer, want_vae = reference
    for key, want in want_transformer.items():
        rounded = want.to(stored if want.ndim == 2 else bias.dtype).float()
        assert torch.equal(transformer[key], rounded), key
    assert all(torch.equal(vae[k], want_vae[k].to(conv.dtype).float()) for k in want_vae)


def test_fp8_and_vae_options_need_single_file(tiny_model, tmp_path, capsys):
    code, err = export(capsys, str(tiny_model / "transformer"), "--out", str(tmp_path / "x"), "--dtype", "fp8_e4m3fn")
    assert code == 2 and err.count("\n") == 1 and "--format single-file" in err
    assert not (tmp_path / "x").exists()


def test_reads_a_dcp_checkpoint_tensor_by_tensor(tiny_model, reference, tmp_path):
    import torch.distributed.checkpoint as dcp

    want, _ = reference
    ema = {k: v + 1 for k, v in want.items() if k != "pos_embed.pos_embed"}
    state = {**{f"model.{k}": v for k, v in want.items()}, **{f"ema.{k}": v for k, v in ema.items()}}
    dcp.save(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    raw, averaged = DcpTensors(tmp_path / "dcp", use_ema=False), DcpTensors(tmp_path / "dcp", use_ema=True)
    assert raw.specs().keys() == averaged.specs().keys() == want.keys()
    assert all(torch.equal(raw.get(k), want[k]) for k in want)
    assert all(torch.equal(averaged.get(k), ema.get(k, want[k])) for k in want), "EMA over the model's buffers"


def test_the_plan_covers_sd35_large_and_states_its_peak(tmp_path):
    from diffusers import SD3Transformer2DModel

    config = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm")
    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    specs = {k: (tuple(v.shape), torch.float32) for k, v in model.state_dict().items()}

    class MetaSource:
        def specs(self):
            return specs

    plan = transformer_plan(config, specs)
    # In 38 blocks × 2 streams, q, k and v (weights and biases) become one qkv: 2 keys fewer each.
    assert len(plan) == len(specs) - 38 * 2 * 2 * 2
    peak = peak_bytes([Part(MetaSource(), plan)], "bf16")
    pos_embed = 192 * 192 * 2432
    assert peak == pos_embed * (4 + 2), "the largest output (pos_embed) read in fp32 and stored in bf16"
    by_block = peak_bytes([Part(MetaSource(), plan)], "bf16", group_of=block_group)
    block = sum(4 * math.prod(shape) for key, (shape, _) in specs.items() if key.startswith("transformer_blocks.0."))
    assert block < by_block < block + 2**30, "an FSDP2 checkpoint is read a block at a time"
    print(f"SD3.5 Large single-file bf16 export from fp32: peak {peak / 2**20:.0f} MiB tensor by tensor, "
          f"{by_block / 2**20:.0f} MiB block by block")
    with pytest.raises(LayoutMismatch, match="no place for"):
        transformer_plan(config, [*specs, "transformer_blocks.0.attn.to_q.lora_A.weight"])


def test_streaming_writer_output_is_read_by_safetensors_and_a_failure_leaves_nothing(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(3, dtype=torch.bfloat16),
               "c": torch.tensor([1.5, -2.0]).to(torch.float8_e4m3fn)}
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    write_streaming(tmp_path / "ok.safetensors", specs, lambda s: tensors[s.name], {"k": "v"})
    with safe_open(str(tmp_path / "ok.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"k": "v"}
        assert all(torch.equal(handle.get_tensor(k).float(), v.float()) for k, v in tensors.items())

    def broken(spec: TensorSpec) -> torch.Tensor:
        return torch.zeros(1) if spec.name == "c" else tensors[spec.name]

    with pytest.raises(ValueError, match="c: made"):
        write_streaming(tmp_path / "bad.safetensors", specs, broken, {})
    assert list(tmp_path.iterdir()) == [tmp_path / "ok.safetensors"]


def test_tiny_model_config_has_every_key_family(tiny_model):
    config = json.loads((tiny_model / "transformer" / "config.json").read_text())
    assert config["qk_norm"] == "rms_norm" and list(config["dual_attention_layers"]) == [0]
