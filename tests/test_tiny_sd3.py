"""The tiny SD3 model on disk, its loaders, and our prompt/VAE encoding against diffusers' own."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from sd35dist.models import tiny_sd3
from sd35dist.models.prompt_encoding import empty_prompt_embeddings, encode_prompts
from sd35dist.models.sd3_components import (
    ModelDirectoryIncomplete,
    TextEncoders,
    encoder_identity,
    load_text_encoders,
    load_vae,
)
from sd35dist.models.tiny_sd3 import build_tiny_sd3, has_vae_sizes
from sd35dist.models.vae_encoding import encode_images, sample_latents, scale_latents

pytestmark = pytest.mark.unit

CAPTIONS = [
    "a cat",
    "Café au lait on a small table, ☕, naïve watercolour painting of a bright street in the old city",
    # Longer than CLIP's 77 tokens: exercises truncation exactly as the pipeline does it.
    " ".join(["a red house with a green tree and a blue sky over the mountain"] * 8),
]
LAYOUT = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")


@pytest.fixture(scope="module")
def model_dir(tiny_model: Path) -> Path:
    """The session's tiny SD3 (seed 0)."""
    return tiny_model


@pytest.fixture(scope="module")
def encoders(model_dir: Path) -> TextEncoders:
    return load_text_encoders(model_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def pipeline(model_dir: Path):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(model_dir, local_files_only=True)


def _pipeline_encode(pipeline, **kwargs):
    # As the pipeline's own __call__ runs it: under no_grad (T5 differs by ~1e-5 with autograd on).
    with torch.no_grad():
        return pipeline.encode_prompt(**kwargs)


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_saved_in_sd35_large_layout_with_sharded_transformer(model_dir: Path) -> None:
    model_index = json.loads((model_dir / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusion3Pipeline"
    for part in LAYOUT:
        assert (model_dir / part).is_dir(), part
    index = json.loads((model_dir / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert all((model_dir / "transformer" / shard).is_file() for shard in shards)
    transformer_config = json.loads((model_dir / "transformer" / "config.json").read_text())
    assert transformer_config["qk_norm"] == "rms_norm"
    assert not list(model_dir.parent.glob(".sd3.*")), "staging directory left behind"


def test_loaders_return_frozen_components(encoders: TextEncoders, model_dir: Path) -> None:
    for model in (encoders.clip_l, encoders.clip_g, encoders.t5):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
    assert encoders.clip_l_tokenizer.model_max_length == 77
    vae = load_vae(model_dir, device="cpu", dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16 and not vae.training
    assert vae.config.latent_channels == 16


def test_encode_prompts_equals_pipeline_encode_prompt(encoders: TextEncoders, pipeline) -> None:
    for max_sequence_length in (256, 40):
        ours = encode_prompts(encoders, CAPTIONS, max_sequence_length=max_sequence_length)
        theirs = _pipeline_encode(
            pipeline,
            prompt=CAPTIONS, prompt_2=None, prompt_3=None, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
        )
        assert ours[0].shape == (3, 77 + max_sequence_length, 32)
        assert ours[1].shape == (3, 24 + 40)
        assert torch.equal(ours[0], theirs[0])
        assert torch.equal(ours[1], theirs[2])
    # Different captions give different conditioning (the test above would pass on constants otherwise).
    assert not torch.equal(ours[0][0], ours[0][1]) and not torch.equal(ours[1][0], ours[1][1])


def test_empty_prompt_equals_pipeline(encoders: TextEncoders, pipeline) -> None:
    embeds, pooled = empty_prompt_embeddings(encoders)
    theirs = _pipeline_encode(pipeline, prompt="", prompt_2=None, prompt_3=None, do_classifier_free_guidance=False)
    assert embeds.shape == (1, 77 + 256, 32)
    assert torch.equal(embeds, theirs[0]) and torch.equal(pooled, theirs[2])


def test_clip_tokenizers_are_byte_level(encoders: TextEncoders) -> None:
    caption = "café au lait, ☕ naïve résumé"
    ids = encoders.clip_l_tokenizer(caption).input_ids
    assert encoders.clip_l_tokenizer.decode(ids, skip_special_tokens=True) == "café au lait , ☕ naïve résumé"


def test_vae_round_trip_shapes_and_sampling(model_dir: Path) -> None:
    vae = load_vae(model_dir)
    pixels = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = encode_images(vae, pixels)
    assert mean.shape == std.shape == (2, 16, 8, 6)
    assert bool((std > 0).all())

    latents = sample_latents(mean, std, torch.Generator().manual_seed(7))
    expected = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(7))
    assert torch.equal(latents, expected)
    assert not torch.equal(latents, sample_latents(mean, std, torch.Generator().manual_seed(8)))

    with torch.no_grad():
        decoded = vae.decode(latents).sample
    assert decoded.shape == pixels.shape


def test_scale_and_shift_come_from_the_vae_config(model_dir: Path) -> None:
    config = json.loads((model_dir / "vae" / "config.json").read_text())
    assert (config["scaling_factor"], config["shift_factor"]) == (1.5305, 0.0609)
    latents = torch.tensor([0.0, 1.0, -2.0])
    scaled = scale_latents(latents, config)
    assert torch.allclose(scaled, (latents - 0.0609) * 1.5305)
    other = {"scaling_factor": 2.0, "shift_factor": 0.5}
    assert torch.equal(scale_latents(latents, other), torch.tensor([-1.0, 1.0, -5.0]))


def test_missing_text_encoder_3_is_one_clear_error(model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    shutil.rmtree(broken / "text_encoder_3")
    with pytest.raises(ModelDirectoryIncomplete, match=r"missing subfolder text_encoder_3/"):
        load_text_encoders(broken, device="cpu", dtype=torch.float32)
    with pytest.raises(ModelDirectoryIncomplete, match=r"text_encoder_3/"):
        encoder_identity(broken)
    assert load_vae(broken).config.latent_channels == 16  # the VAE alone is still loadable


def test_missing_shard_is_named(model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "text_encoder_3" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelDirectoryIncomplete, match=r"text_encoder_3/ lacks shard\(s\) model-00002-of-00002"):
        load_text_encoders(broken)


def test_build_is_deterministic_and_idempotent(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    again = tmp_path / "again"
    assert tiny_sd3.main([str(again), "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip() == str(again)
    assert _file_bytes(again) == _file_bytes(model_dir)
    assert encoder_identity(again) == encoder_identity(model_dir)

    before = {p: p.stat().st_mtime_ns for p in model_dir.rglob("*")}
    assert build_tiny_sd3(model_dir, seed=123) == model_dir  # complete: untouched, even with another seed
    assert has_vae_sizes(model_dir, tiny_sd3.VAE_SIZES) and not has_vae_sizes(model_dir, tiny_sd3.SD3_VAE_SIZES)
    with pytest.raises(FileExistsError, match="another VAE shape"):  # the demo's VAE is not this one
        build_tiny_sd3(model_dir, vae_sizes=tiny_sd3.SD3_VAE_SIZES)
    assert {p: p.stat().st_mtime_ns for p in model_dir.rglob("*")} == before

    other_seed = build_tiny_sd3(tmp_path / "seed1", seed=1)
    index = json.loads((model_dir / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = Path("transformer") / index["weight_map"]["transformer_blocks.0.attn.to_q.weight"]  # seeded weights
    assert (other_seed / shard).read_bytes() != (model_dir / shard).read_bytes()
    identity, other_identity = encoder_identity(model_dir), encoder_identity(other_seed)
    assert identity["text_encoder_3"]["weights_sha256"] != other_identity["text_encoder_3"]["weights_sha256"]
    assert identity["tokenizer_3"] == other_identity["tokenizer_3"]


def test_refuses_to_overwrite_a_non_model_directory(tmp_path: Path) -> None:
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a complete SD3 model directory"):
        build_tiny_sd3(occupied)
    assert (occupied / "notes.txt").read_text() == "mine"


def test_encoder_identity_records_classes_and_hashes(model_dir: Path) -> None:
    identity = encoder_identity(model_dir)
    assert set(identity) == {"vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"}
    assert identity["text_encoder_3"]["class"] == "T5EncoderModel"
    assert identity["vae"]["class"] == "AutoencoderKL"
    vae_config_sha = hashlib.sha256((model_dir / "vae" / "config.json").read_bytes()).hexdigest()
    assert identity["vae"]["config_sha256"] == vae_config_sha
    assert identity["text_encoder"]["weights_sha256"] != identity["text_encoder_2"]["weights_sha256"]
    json.dumps(identity)  # goes into a JSON manifest as is


def test_the_transformer_is_the_mmdit_comfyui_builds_for_it(model_dir: Path, tmp_path: Path) -> None:
    """ComfyUI builds an SD3 MMDiT from the single file's x_embedder width alone: depth = width / 64,
    `depth` heads of 64 and `depth` joint blocks (comfy/model_detection.py d415a44, comfy/ldm/modules/
    diffusionmodules/mmdit.py 03925bd). The tiny model must be that model, or its exports fail there
    on size mismatches and leftover blocks."""
    from safetensors import safe_open

    from sd35dist.checkpoint.original_layout import TRANSFORMER_PREFIX
    from sd35dist.checkpoint.single_file import export_single_file
    from tests.comfy_lora_keys import comfy_sd3_loads, comfy_sd3_unet_config

    out = tmp_path / "tiny.safetensors"
    export_single_file(model_dir / "transformer", out, use_ema=False, dtype="fp32", with_vae=False)
    with safe_open(str(out), framework="pt") as handle:
        width = handle.get_slice(TRANSFORMER_PREFIX + "x_embedder.proj.weight").get_shape()[0]
        qkv = handle.get_slice(TRANSFORMER_PREFIX + "joint_blocks.0.x_block.attn.qkv.weight").get_shape()
        blocks = {int(k.split(".")[3]) for k in handle.keys() if ".joint_blocks." in k}
        pre_only = not any(k.startswith(f"{TRANSFORMER_PREFIX}joint_blocks.{max(blocks)}.context_block.mlp") for k in handle.keys())
    config = json.loads((model_dir / "transformer" / "config.json").read_text())
    unet = comfy_sd3_unet_config(config)
    assert width == 64 * unet["depth"] and sorted(blocks) == list(range(unet["num_blocks"])), "ComfyUI's block count"
    assert qkv == [3 * width, width] and pre_only, "its fused qkv and its pre-only last block"
    assert comfy_sd3_loads(config) == [] and comfy_sd3_loads({**config, "num_layers": 4})  # the rule can fail
