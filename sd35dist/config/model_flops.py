"""Model FLOPs utilisation (MFU) of SD3 MMDiT training: pure arithmetic, no torch.

The usual convention (PaLM, Megatron, torchtitan): count the matmul FLOPs the model needs,
2 per multiply-add; a training step costs 3× the forward (backward = 2× forward);
activation recomputation is not counted, so recomputing blocks lowers MFU. Norms,
activations, softmax and other elementwise work are left out (a fraction of a percent).

Forward FLOPs of one sample, with d = heads · head_dim, p = patch size,
N = (H/8/p)·(W/8/p) image tokens and T text tokens (77 CLIP + the T5 length):

    per joint block (diffusers' JointTransformerBlock):
        image stream     2·12d²·N      q, k, v, out (4d²) + MLP d→4d→d (8d²)
        context stream   2·12d²·T      the same weights for the text tokens, except
                         2·3d²·T       in the last block (`context_pre_only`): only its
                                       q, k, v are used; no out projection, no MLP
        joint attention  4·d·(N+T)²    QKᵀ and AV over image and text tokens together
        dual attention   2·4d²·N + 4·d·N²    image-only second attention (SD3.5 Medium's
                                       `dual_attention_layers`; none in SD3.5 Large)
        adaLN modulation 2·d·6d per stream per sample (9d for dual blocks, 2d for the last
                                       context norm): per sample, not per token
    outside the blocks:
        patch embedding  2·(C_in·p²)·d·N      (the p×p stride-p conv)
        context embedder 2·J·C·T              J = joint_attention_dim, C = caption_projection_dim
        time + pooled    2·(256·d + d² + P·d + d²) per sample, P = pooled_projection_dim
        output head      2·d·2d + 2·d·(p²·C_out)·N

SD3.5 Large at 1024² with T = 333: ≈ 3.11e13 forward, ≈ 9.33e13 per trained sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sd35dist.config.model_size import TIMESTEP_CHANNELS, TransformerShape

LATENT_DOWNSCALE = 8
"""The SD3 VAE maps H×W pixels to H/8 × W/8 latents."""
TRAIN_TO_FORWARD = 3
"""Forward + backward (grads of activations and of weights) = 3× forward."""

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendor's data sheets. Checked
# in order against the upper-cased torch.cuda.get_device_name(); None = refuse to guess
# (the NVL cards share names with SXM ones but run slower clocks).
PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], float | None], ...] = (
    (("H100", "PCIE"), 756e12),
    (("H100", "NVL"), None),
    (("H100",), 989e12),  # SXM5 / "NVIDIA H100 80GB HBM3"
    (("H200", "NVL"), None),
    (("H200",), 989e12),  # H200 SXM and GH200: same compute as H100 SXM
    (("A100",), 312e12),
    (("L40S",), 362e12),
)


def mmdit_forward_flops_per_sample(config: Mapping[str, Any], height: int, width: int, text_tokens: int) -> float:
    """Matmul FLOPs of one forward pass of one sample (see the module docstring for the terms).

    `config` is an SD3Transformer2DModel config (its config.json or `model.config`);
    missing keys take diffusers' defaults. `height`/`width` are in pixels.
    """
    shape = TransformerShape.from_config(config)
    patch, layers, d, dual_layers = shape.patch, shape.layers, shape.dim, shape.dual_layers
    in_channels, out_channels, joint, caption, pooled = (shape.in_channels, shape.out_channels, shape.joint,
                                                         shape.caption, shape.pooled)
    if height <= 0 or width <= 0 or text_tokens < 0:
        raise ValueError(f"height and width must be positive and text_tokens ≥ 0, got {height}, {width}, {text_tokens}")
    n = (height // LATENT_DOWNSCALE // patch) * (width // LATENT_DOWNSCALE // patch)
    t = text_tokens

    flops = 0.0
    for index in range(layers):
        last = index == layers - 1
        flops += 2 * 12 * d * d * n
        flops += 2 * (3 if last else 12) * d * d * t
        flops += 4 * d * (n + t) ** 2
        dual = index in dual_layers
        if dual:
            flops += 2 * 4 * d * d * n + 4 * d * n * n
        flops += 2 * d * (9 if dual else 6) * d + 2 * d * (2 if last else 6) * d
    flops += 2 * in_channels * patch * patch * d * n
    flops += 2 * joint * caption * t
    flops += 2 * (TIMESTEP_CHANNELS * d + d * d + pooled * d + d * d)
    flops += 2 * d * 2 * d + 2 * d * patch * patch * out_channels * n
    return float(flops)


def mmdit_train_flops_per_sample(config: Mapping[str, Any], height: int, width: int, text_tokens: int) -> float:
    """Model FLOPs of training on one sample: 3× the forward, recomputation not counted."""
    return TRAIN_TO_FORWARD * mmdit_forward_flops_per_sample(config, height, width, text_tokens)


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of one GPU named as torch.cuda.get_device_name() names it; None if unknown."""
    name = device_name.upper()
    for needles, peak in PEAK_BF16_FLOPS:
        if all(needle in name for needle in needles):
            return peak
    return None


def mfu(flops_per_sample: float, samples_per_second: float, peak: float) -> float:
    """Achieved model FLOP/s over the peak: a fraction (0.23 is 23%)."""
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return flops_per_sample * samples_per_second / peak
