"""Stability's original SD3.5 single-file layout, as the inverse of diffusers' own conversion.

diffusers reads `sd3.5_large.safetensors` with `convert_sd3_transformer_checkpoint_to_diffusers`
and `convert_ldm_vae_checkpoint` (diffusers/loaders/single_file_utils.py). The plans here run
those conversions backwards: each original tensor is named with the diffusers tensors it is made
of and how (copied; q, k, v concatenated; the two halves of an adaLN projection swapped; a VAE
attention matrix made a 1x1 convolution). Pure functions of key names, configs and shapes; the
writer (single_file.py) executes a plan one output tensor at a time.

Every diffusers key must be used exactly once: a key the plan does not know (a new diffusers
module, a LoRA left unmerged) is an error, never a silently dropped tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

Op = Literal["copy", "qkv", "swap_halves", "conv1x1"]


@dataclass(frozen=True)
class OriginalTensor:
    """One tensor of the single file: its name, the diffusers tensors it comes from, and how."""

    name: str
    sources: tuple[str, ...]
    op: Op = "copy"


class LayoutMismatch(ValueError):
    """The diffusers keys do not fit the SD3 layout the plan expects; the message says which."""


def output_shape(tensor: OriginalTensor, source_shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The shape the op gives, from its sources' shapes (the header is written before any data)."""
    first = tuple(source_shapes[0])
    if tensor.op == "qkv":
        return (sum(shape[0] for shape in source_shapes), *first[1:])
    if tensor.op == "conv1x1":
        return (*first, 1, 1) if len(first) == 2 else first
    return first


def _block_plan(i: int, last: bool, dual: bool, qk_norm: bool) -> list[OriginalTensor]:
    ours, theirs = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
    x, ctx = ours + "x_block.", ours + "context_block."
    plan: list[OriginalTensor] = []

    def copy(name: str, source: str) -> None:
        plan.append(OriginalTensor(name, (theirs + source,)))

    for kind in ("weight", "bias"):
        plan.append(OriginalTensor(f"{x}attn.qkv.{kind}", tuple(f"{theirs}attn.to_{p}.{kind}" for p in "qkv"), "qkv"))
        plan.append(OriginalTensor(f"{ctx}attn.qkv.{kind}", tuple(f"{theirs}attn.add_{p}_proj.{kind}" for p in "qkv"), "qkv"))
        copy(f"{x}attn.proj.{kind}", f"attn.to_out.0.{kind}")
        copy(f"{x}adaLN_modulation.1.{kind}", f"norm1.linear.{kind}")
        copy(f"{x}mlp.fc1.{kind}", f"ff.net.0.proj.{kind}")
        copy(f"{x}mlp.fc2.{kind}", f"ff.net.2.{kind}")
        if last:
            # The context stream's last block only feeds attention (context_pre_only): no proj, no
            # MLP, and its adaLN is diffusers' AdaLayerNormContinuous, whose halves run (scale, shift).
            plan.append(OriginalTensor(f"{ctx}adaLN_modulation.1.{kind}", (f"{theirs}norm1_context.linear.{kind}",),
                                       "swap_halves"))
        else:
            copy(f"{ctx}attn.proj.{kind}", f"attn.to_add_out.{kind}")
            copy(f"{ctx}adaLN_modulation.1.{kind}", f"norm1_context.linear.{kind}")
            copy(f"{ctx}mlp.fc1.{kind}", f"ff_context.net.0.proj.{kind}")
            copy(f"{ctx}mlp.fc2.{kind}", f"ff_context.net.2.{kind}")
        if dual:  # SD3.5 Medium's second self-attention on the image stream (MMDiT-X)
            plan.append(OriginalTensor(f"{x}attn2.qkv.{kind}", tuple(f"{theirs}attn2.to_{p}.{kind}" for p in "qkv"), "qkv"))
            copy(f"{x}attn2.proj.{kind}", f"attn2.to_out.0.{kind}")
    if qk_norm:
        copy(f"{x}attn.ln_q.weight", "attn.norm_q.weight")
        copy(f"{x}attn.ln_k.weight", "attn.norm_k.weight")
        copy(f"{ctx}attn.ln_q.weight", "attn.norm_added_q.weight")
        copy(f"{ctx}attn.ln_k.weight", "attn.norm_added_k.weight")
        if dual:
            copy(f"{x}attn2.ln_q.weight", "attn2.norm_q.weight")
            copy(f"{x}attn2.ln_k.weight", "attn2.norm_k.weight")
    return plan


def transformer_plan(config: Mapping, diffusers_keys: Iterable[str] | None) -> list[OriginalTensor]:
    """The MMDiT's original tensors (with TRANSFORMER_PREFIX) from an SD3Transformer2DModel's config and keys
    (None: the keys are not known yet, as when reading an original file, and are not checked)."""
    qk_norm = config.get("qk_norm")
    if qk_norm not in (None, "rms_norm"):
        raise LayoutMismatch(f"qk_norm {qk_norm!r}: the original SD3 layout has RMS q/k norms (rms_norm) or none")
    dual = set(config.get("dual_attention_layers") or ())
    layers = int(config["num_layers"])
    plan = [
        OriginalTensor("pos_embed", ("pos_embed.pos_embed",)),
        OriginalTensor("x_embedder.proj.weight", ("pos_embed.proj.weight",)),
        OriginalTensor("x_embedder.proj.bias", ("pos_embed.proj.bias",)),
        OriginalTensor("context_embedder.weight", ("context_embedder.weight",)),
        OriginalTensor("context_embedder.bias", ("context_embedder.bias",)),
    ]
    for ours, theirs in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
        for index, linear in (("0", "linear_1"), ("2", "linear_2")):
            for kind in ("weight", "bias"):
                plan.append(OriginalTensor(f"{ours}.mlp.{index}.{kind}", (f"time_text_embed.{theirs}.{linear}.{kind}",)))
    for i in range(layers):
        plan += _block_plan(i, last=i == layers - 1, dual=i in dual, qk_norm=qk_norm is not None)
    for kind in ("weight", "bias"):
        plan.append(OriginalTensor(f"final_layer.linear.{kind}", (f"proj_out.{kind}",)))
        plan.append(OriginalTensor(f"final_layer.adaLN_modulation.1.{kind}", (f"norm_out.linear.{kind}",), "swap_halves"))
    plan = [OriginalTensor(TRANSFORMER_PREFIX + t.name, t.sources, t.op) for t in plan]
    if diffusers_keys is not None:
        check_covers(plan, diffusers_keys, "transformer")
    return plan


def config_from_original_keys(keys: Iterable[str]) -> dict:
    """What transformer_plan needs to know of the model, read off an original file's key names."""
    blocks: set[int] = set()
    dual: set[int] = set()
    qk_norm = None
    for key in keys:
        parts = key.removeprefix(TRANSFORMER_PREFIX).split(".")
        if parts[0] == "joint_blocks":
            blocks.add(int(parts[1]))
            if "attn2" in parts:
                dual.add(int(parts[1]))
            if parts[-2] in ("ln_q", "ln_k"):
                qk_norm = "rms_norm"
    if not blocks:
        raise LayoutMismatch("no joint_blocks keys: not an SD3 MMDiT in the original layout")
    return {"num_layers": max(blocks) + 1, "dual_attention_layers": sorted(dual), "qk_norm": qk_norm}


# diffusers' VAE names → the original (LDM) ones: exact names first, then name fragments.
_VAE_EXACT = {"conv_norm_out": "norm_out"}
_VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))


def vae_original_name(key: str, num_up_blocks: int) -> tuple[str, Op]:
    """One AutoencoderKL key → its original name (with VAE_PREFIX) and op; inverse of convert_ldm_vae_checkpoint."""
    parts = key.split(".")
    side = parts[0]
    if side in ("quant_conv", "post_quant_conv"):
        return VAE_PREFIX + key, "copy"
    if side not in ("encoder", "decoder") or len(parts) < 3:
        raise LayoutMismatch(f"vae key {key}: not part of an SD3 AutoencoderKL")
    rest = parts[1:]
    op: Op = "copy"
    if rest[0] in _VAE_EXACT:
        rest = [_VAE_EXACT[rest[0]], *rest[1:]]
    elif rest[0] in ("down_blocks", "up_blocks"):
        block = int(rest[1])
        ldm_block = block if rest[0] == "down_blocks" else num_up_blocks - 1 - block  # up blocks run reversed
        stem = ["down" if rest[0] == "down_blocks" else "up", str(ldm_block)]
        if rest[2] == "resnets":
            rest = [*stem, "block", rest[3], *rest[4:]]
        elif rest[2] in ("downsamplers", "upsamplers"):
            rest = [*stem, "downsample" if rest[2] == "downsamplers" else "upsample", *rest[4:]]
        else:
            raise LayoutMismatch(f"vae key {key}: unknown block part {rest[2]}")
    elif rest[0] == "mid_block":
        if rest[1] == "resnets":
            rest = ["mid", f"block_{int(rest[2]) + 1}", *rest[3:]]
        elif rest[1] == "attentions":
            tail = ".".join(rest[3:]) + "."
            for theirs, ours in _VAE_ATTENTION:
                if tail.startswith(theirs):
                    tail = ours + tail[len(theirs):]
                    break
            rest = ["mid", "attn_1", *tail.rstrip(".").split(".")]
            op = "conv1x1" if rest[-1] == "weight" and rest[-2] in ("q", "k", "v", "proj_out") else "copy"
        else:
            raise LayoutMismatch(f"vae key {key}: unknown mid-block part {rest[1]}")
    name = ".".join([side, *rest]).replace("conv_shortcut", "nin_shortcut")
    return VAE_PREFIX + name, op


def vae_plan(config: Mapping, diffusers_keys: Iterable[str]) -> list[OriginalTensor]:
    """The VAE's original tensors (with VAE_PREFIX) from an AutoencoderKL's config and keys."""
    num_up_blocks = len(config["up_block_types"])
    plan = []
    for key in sorted(diffusers_keys):
        name, op = vae_original_name(key, num_up_blocks)
        plan.append(OriginalTensor(name, (key,), op))
    return plan


def check_covers(plan: Sequence[OriginalTensor], diffusers_keys: Iterable[str], what: str) -> None:
    """Every diffusers key is the source of exactly one original tensor, and every source exists."""
    have = set(diffusers_keys)
    used = [source for tensor in plan for source in tensor.sources]
    missing = sorted(set(used) - have)
    unused = sorted(have - set(used))
    if missing or unused or len(used) != len(set(used)):
        detail = "; ".join(filter(None, [
            missing and f"{len(missing)} expected {what} keys absent ({', '.join(missing[:5])})",
            unused and f"{len(unused)} {what} keys the SD3 layout has no place for ({', '.join(unused[:5])})",
        ])) or f"a {what} key used twice"
        raise LayoutMismatch(detail)
