"""ComfyUI's sizing rule for the VAE of a single file, reimplemented from its public source for the tests
(no package carries ComfyUI's loader; tests/comfy_lora_keys.py does the same for its LoRA and MMDiT rules).

Read from comfyanonymous/ComfyUI as the public code index held it in December 2026 (comfy/sd.py in the
version with `decoder_ch = sd['decoder.conv_in.weight'].shape[0] // ddconfig['ch_mult'][-1]`; the
index did not name its commit; the stored comfy/sd.py at 0920e0e is older and lacks that line):
- comfy/sd.py `load_state_dict_guess_config` (Load Checkpoint, through `load_checkpoint_guess_config`): the
  VAE gets the file's tensors under the model config's `vae_key_prefix`, prefix removed. SD3
  (comfy/supported_models.py `SD3`) keeps `first_stage_model.` from comfy/supported_models_base.py `BASE`.
- comfy/sd.py `VAE.__init__`, the default "SD1.x/SD2.x VAE parameters" branch (a file with
  `decoder.conv_in.weight` that is not 64 latent channels wide nor a 3-D convolution): diffusers names
  (`decoder.up_blocks.0.resnets.0.norm1.weight` present) are converted to LDM names first. The encoder
  is always ch 128, ch_mult (1, 2, 4, 4) — (1, 2, 4) when neither `encoder.down.2.downsample` nor
  `decoder.up.3.upsample` is there —, 2 res blocks, double_z. z_channels = decoder.conv_in.weight.shape[1];
  the decoder's ch = decoder.conv_in.weight.shape[0] // ch_mult[-1], the only width read from the file.
  With `post_quant_conv.weight`: AutoencoderKL (quant convs); without: AutoencodingEngine (none, as SD3).
  Then `load_state_dict(sd, strict=False)`: missing and leftover keys are logged, a shape that differs
  raises (torch's "size mismatch").
- comfy/ldm/modules/diffusionmodules/model.py `AttnBlock`: q, k, v and proj_out are 1x1 Conv2d.
ComfyUI's Encoder/Decoder are the LDM modules that diffusers' `convert_ldm_vae_checkpoint` maps onto its
AutoencoderKL: so the model ComfyUI builds is, under diffusers' names, an AutoencoderKL with
block_out_channels = ch * ch_mult and layers_per_block = 2, which is what the expected keys and shapes
are taken from. Only the rule is reimplemented; no ComfyUI code is copied.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

SD3_VAE_PREFIX = "first_stage_model."  # supported_models_base.BASE.vae_key_prefix, which SD3 keeps
COMFY_ENCODER_CH = 128
COMFY_CH_MULT = (1, 2, 4, 4)
COMFY_RES_BLOCKS = 2
COMFY_NORM_GROUPS = 32  # model.py `Normalize`: GroupNorm(32, channels), so every width is a multiple of 32
ATTENTION_CONV = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def single_file_vae_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """A single file's VAE tensors as Load Checkpoint hands them to ComfyUI's VAE: `first_stage_model.` removed."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key.removeprefix(SD3_VAE_PREFIX): tuple(handle.get_slice(key).get_shape())
                for key in handle.keys() if key.startswith(SD3_VAE_PREFIX)}


def comfy_vae_configs(ldm_shapes: dict[str, tuple[int, ...]]) -> tuple[dict, dict]:
    """The encoder's and the decoder's AutoencoderKL kwargs of the VAE ComfyUI builds for these LDM-named
    tensors (first_stage_model. removed)."""
    ch_mult = COMFY_CH_MULT
    if "encoder.down.2.downsample.conv.weight" not in ldm_shapes and "decoder.up.3.upsample.conv.weight" not in ldm_shapes:
        ch_mult = (1, 2, 4)
    decoder_in = ldm_shapes["decoder.conv_in.weight"]
    common = dict(
        down_block_types=("DownEncoderBlock2D",) * len(ch_mult),
        up_block_types=("UpDecoderBlock2D",) * len(ch_mult),
        layers_per_block=COMFY_RES_BLOCKS,
        latent_channels=decoder_in[1],
        norm_num_groups=COMFY_NORM_GROUPS,
        use_quant_conv="post_quant_conv.weight" in ldm_shapes,
        use_post_quant_conv="post_quant_conv.weight" in ldm_shapes,
    )
    decoder_ch = decoder_in[0] // ch_mult[-1]
    encoder = dict(common, block_out_channels=tuple(COMFY_ENCODER_CH * m for m in ch_mult))
    decoder = dict(common, block_out_channels=tuple(decoder_ch * m for m in ch_mult))
    return encoder, decoder


def comfy_vae_diffusers_shapes(ldm_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The tensors of the VAE ComfyUI builds for these LDM-named tensors, under diffusers' names and shapes."""
    from diffusers import AutoencoderKL

    encoder_config, decoder_config = comfy_vae_configs(ldm_shapes)
    with torch.device("meta"):  # one norm group: any width builds, and groups change no shape
        encoder = AutoencoderKL(**dict(encoder_config, norm_num_groups=1))
        decoder = encoder if decoder_config == encoder_config else AutoencoderKL(**dict(decoder_config, norm_num_groups=1))
    shapes = {k: tuple(v.shape) for k, v in encoder.state_dict().items() if not k.startswith(("decoder.", "post_quant_conv."))}
    shapes.update({k: tuple(v.shape) for k, v in decoder.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))})
    return shapes


def to_diffusers_names(ldm_shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The LDM-named tensors (as meta tensors of their shapes) under diffusers' names, by diffusers' own
    `convert_ldm_vae_checkpoint` (which also makes the 1x1-conv attention weights linear)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    blocks = 4 if "encoder.down.3.block.0.conv1.weight" in ldm_shapes else 3
    config = {"down_block_types": ("DownEncoderBlock2D",) * blocks, "up_block_types": ("UpDecoderBlock2D",) * blocks}
    tensors = {key: torch.empty(shape, device="meta") for key, shape in ldm_shapes.items()}
    return convert_ldm_vae_checkpoint(tensors, config)


def comfy_vae_problems(ldm_shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Why ComfyUI's Load Checkpoint / Load VAE would not load this VAE cleanly ([] when it does): keys its
    model lacks or misses, and shapes that differ (an error there)."""
    converted = to_diffusers_names(ldm_shapes)
    expected = comfy_vae_diffusers_shapes(ldm_shapes)
    problems = []
    widths = comfy_vae_configs(ldm_shapes)[1]["block_out_channels"]
    if any(width % COMFY_NORM_GROUPS for width in widths):
        problems.append(f"decoder widths {widths}: ComfyUI's GroupNorm({COMFY_NORM_GROUPS}, ...) cannot be built")
    if len(converted) != len(ldm_shapes):
        problems.append(f"{len(ldm_shapes) - len(converted)} file keys have no LDM VAE name")
    missing, leftover = sorted(set(expected) - set(converted)), sorted(set(converted) - set(expected))
    if missing:
        problems.append(f"{len(missing)} missing VAE keys ({', '.join(missing[:3])})")
    if leftover:
        problems.append(f"{len(leftover)} leftover VAE keys ({', '.join(leftover[:3])})")
    mismatched = [f"{key} {tuple(converted[key].shape)} vs {expected[key]}" for key in sorted(set(expected) & set(converted))
                  if tuple(converted[key].shape) != expected[key]]
    if mismatched:
        problems.append(f"{len(mismatched)} size mismatches ({'; '.join(mismatched[:3])})")
    flat = [key for key, shape in ldm_shapes.items() if ATTENTION_CONV.search(key) and len(shape) != 4]
    if flat:
        problems.append(f"attention weights not 1x1 convolutions: {', '.join(sorted(flat))}")
    return problems
