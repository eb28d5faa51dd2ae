"""Parameter counts of diffusers' SD3Transformer2DModel from its config alone: pure arithmetic.

The launcher plans memory and communication before any process exists and never imports
torch, so it cannot build the model, not even on the meta device. These formulas follow
diffusers' module tree (transformer_sd3.py, attention.py); a unit test checks them against
the meta-built model for the tiny and the SD3.5 Large configs, parameter for parameter.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

SD35_LARGE_CONFIG: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 38,
    "attention_head_dim": 64, "num_attention_heads": 38, "joint_attention_dim": 4096,
    "caption_projection_dim": 2432, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
    "qk_norm": "rms_norm", "dual_attention_layers": [],
}
"""SD3.5 Large's transformer/config.json without diffusers' bookkeeping keys (8.06e9 parameters)."""
TIMESTEP_CHANNELS = 256
"""Sinusoidal timestep features fed to the time embedder (diffusers' Timesteps(256))."""
BLOCK_PREFIX = "transformer_blocks."


def _linear(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def _get(config: Mapping[str, Any], key: str, default: Any) -> Any:
    value = config.get(key, default)
    return default if value is None else value


@dataclasses.dataclass(frozen=True)
class TransformerShape:
    """The widths and depths of an SD3 MMDiT config that its parameters and FLOPs follow from."""

    patch: int
    layers: int
    head_dim: int
    dim: int
    in_channels: int
    out_channels: int
    joint: int
    caption: int
    pooled: int
    dual_layers: frozenset[int]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TransformerShape:
        """Missing (or null) keys take diffusers' SD3Transformer2DModel defaults."""
        head_dim = int(_get(config, "attention_head_dim", 64))
        in_channels = int(_get(config, "in_channels", 16))
        return cls(patch=int(_get(config, "patch_size", 2)), layers=int(_get(config, "num_layers", 18)),
                   head_dim=head_dim, dim=int(_get(config, "num_attention_heads", 18)) * head_dim,
                   in_channels=in_channels, out_channels=int(_get(config, "out_channels", in_channels)),
                   joint=int(_get(config, "joint_attention_dim", 4096)),
                   caption=int(_get(config, "caption_projection_dim", 1152)),
                   pooled=int(_get(config, "pooled_projection_dim", 2048)),
                   dual_layers=frozenset(_get(config, "dual_attention_layers", ())))


@dataclasses.dataclass(frozen=True)
class TransformerSize:
    """Parameters of an SD3 MMDiT, grouped the way FSDP2 shards it (one unit per block, then the root)."""

    blocks: tuple[int, ...]
    """Parameters of each JointTransformerBlock, in order."""
    root: int
    """Everything outside the blocks: patch, time, pooled and caption embedders, output norm and head."""
    hidden_size: int

    @property
    def total(self) -> int:
        return self.root + sum(self.blocks)

    @property
    def largest_block(self) -> int:
        return max(self.blocks, default=0)


def transformer_size(config: Mapping[str, Any]) -> TransformerSize:
    """Parameter counts of `SD3Transformer2DModel.from_config(config)`; missing keys take diffusers' defaults.

    Every Linear as `linear_layers` lists it, plus what is not a Linear: the RMSNorms over one
    head that qk_norm adds to each attention stream, and the patch embedding's convolution."""
    shape = TransformerShape.from_config(config)
    qk_norm = _get(config, "qk_norm", None)
    if qk_norm not in (None, "rms_norm"):
        raise ValueError(f"qk_norm {qk_norm!r}: only None and 'rms_norm' are counted")
    blocks = [0] * shape.layers
    root = shape.in_channels * shape.patch * shape.patch * shape.dim + shape.dim  # pos_embed.proj (a patch×patch conv)
    for name, fan_in, fan_out in linear_layers(config):
        if name.startswith(BLOCK_PREFIX):
            blocks[int(name[len(BLOCK_PREFIX):].split(".", 1)[0])] += _linear(fan_in, fan_out)
        else:
            root += _linear(fan_in, fan_out)
    if qk_norm == "rms_norm":
        for index in range(shape.layers):
            # norm_q/norm_k of the image stream and of the text stream, and attn2's pair in a dual block.
            streams = 3 if index in shape.dual_layers else 2
            blocks[index] += streams * 2 * shape.head_dim
    return TransformerSize(blocks=tuple(blocks), root=root, hidden_size=shape.dim)


def linear_layers(config: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """(module name, fan_in, fan_out) of every nn.Linear of the transformer, named as diffusers names them."""
    shape = TransformerShape.from_config(config)
    d = shape.dim
    out: list[tuple[str, int, int]] = []
    for index in range(shape.layers):
        last, dual = index == shape.layers - 1, index in shape.dual_layers
        block = f"{BLOCK_PREFIX}{index}."
        out.append((block + "norm1.linear", d, (9 if dual else 6) * d))
        out.append((block + "norm1_context.linear", d, (2 if last else 6) * d))
        names = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj"] + ([] if last else ["attn.to_add_out"])
        names += ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"] if dual else []
        out += [(block + name, d, d) for name in names]
        for stream in ("ff",) if last else ("ff", "ff_context"):
            out += [(f"{block}{stream}.net.0.proj", d, 4 * d), (f"{block}{stream}.net.2", 4 * d, d)]
    out += [("time_text_embed.timestep_embedder.linear_1", TIMESTEP_CHANNELS, d),
            ("time_text_embed.timestep_embedder.linear_2", d, d),
            ("time_text_embed.text_embedder.linear_1", shape.pooled, d), ("time_text_embed.text_embedder.linear_2", d, d),
            ("context_embedder", shape.joint, shape.caption), ("norm_out.linear", d, 2 * d),
            ("proj_out", d, shape.patch * shape.patch * shape.out_channels)]
    return out


def names_module(name: str, target: str) -> bool:
    """peft's target_modules rule: `target` is the module's name or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def lora_parameters(config: Mapping[str, Any], modules: Sequence[str] | None, rank: int) -> int:
    """Adapter parameters of a rank-`rank` LoRA on the Linears that `modules` names (peft's rule,
    `names_module`); None: every Linear."""
    return sum(rank * (fan_in + fan_out) for name, fan_in, fan_out in linear_layers(config)
               if modules is None or any(names_module(name, m) for m in modules))


SD3_MODULE_CLASSES: tuple[tuple[str, str], ...] = (
    (r"transformer_blocks\.\d+\.attn2?\.", "Attention"),
    (r"transformer_blocks\.\d+\.ff(_context)?\.", "FeedForward"),
    (r"transformer_blocks\.\d+\.norm1(_context)?\.", "AdaLayerNormZero"),
    (r"transformer_blocks\.\d+\.", "JointTransformerBlock"),
    (r"time_text_embed\.", "CombinedTimestepTextProjEmbeddings"),
    (r"norm_out\.", "AdaLayerNormContinuous"),
)
"""Which of diffusers' SD3 module classes hold a Linear, by its name (innermost first), for LyCORIS's
class presets. The last block's norm1_context is an AdaLayerNormContinuous; presets that tell them
apart are not planned (adapted_linears on the model is what trains)."""


def adapter_parameters(config: Mapping[str, Any], section: Any) -> int:
    """Adapter parameters of a recipe's `train.lora` (LoRA, LoKr, LoHa) on the transformer `config`."""
    from sd35dist.config.adapter_layout import adapter_layout

    if section.type == "lora":
        return lora_parameters(config, section.target_modules(), section.rank)
    total = 0
    for name, fan_in, fan_out in linear_layers(config):
        options = _lycoris_options(name, section)
        if options is None:
            continue
        algo = options.get("algo") or section.type
        total += adapter_layout(algo, fan_in, fan_out, rank=options.get("dim") or section.rank,
                                alpha=options.get("alpha") or section.alpha,
                                factor=options.get("factor", section.factor), decompose_both=section.decompose_both,
                                full_matrix=section.full_matrix).parameters
    return total


def _lycoris_options(name: str, section: Any) -> dict | None:
    """The module_algo_map options a Linear gets from a LyCORIS preset (None: not adapted)."""
    if section.preset is None:
        wanted = section.target_modules()
        return {} if wanted is None or any(names_module(name, t) for t in wanted) else None
    preset = section.preset
    classes = [cls for pattern, cls in SD3_MODULE_CLASSES if re.match(pattern, name)] + ["Linear"]
    algo_map = {cls: options.model_dump(exclude_none=True) for cls, options in preset.module_algo_map.items()}
    targeted = set(preset.target_module) | set(algo_map)
    if not any(cls in targeted for cls in classes) and not any(re.match(p, name) for p in preset.target_name):
        return None
    return next((algo_map[cls] for cls in classes if cls in algo_map), {})


def image_tokens(config: Mapping[str, Any], width: int, height: int) -> int:
    """Image tokens of one sample at width × height pixels (VAE /8, then patch × patch)."""
    patch = int(_get(config, "patch_size", 2))
    return (width // 8 // patch) * (height // 8 // patch)
