"""LoRA adapters (peft) in the SD3 transformer: which modules, how they start, and their names.

The recipe's `train.lora` section becomes a peft `LoraConfig`, injected into the diffusers
`SD3Transformer2DModel` while it is still on the meta device, before any strategy shards it:

    model = build_on_meta(config, dtype=compute)         # the frozen base, in the compute dtype
    initial = inject_lora(model, lora, dtype=master)     # adapters (fp32 masters), base frozen
    ...shard...
    materialize_and_load(model, model_dir, initial=initial)

`initial` says how each adapter tensor starts (peft's own init, one seeded generator per
layer), so a run starts from the same adapters whatever the world size or strategy.

Names: peft wraps each target Linear, whose weight becomes `X.base_layer.weight` (state_keys
drops `base_layer.` as a wrapper), and adds `X.lora_A.default.weight` / `X.lora_B.default.weight`.
Diffusers' LoRA files name the same tensors `transformer.X.lora_A.weight` (`diffusers_lora_state`).
"""

from __future__ import annotations

import hashlib
import types
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from sd35dist.config.model_size import names_module
from sd35dist.config.recipe import LORA_TARGET_PRESETS, LoraSection, lora_target_modules
from sd35dist.models.state_keys import plain_name

ADAPTER = "default"
"""peft's adapter name; the one adapter sd35dist trains."""
INITS: dict[str, Any] = {"default": True, "gaussian": "gaussian"}
"""The recipe's `init` → peft's init_lora_weights."""
DIFFUSERS_PREFIX = "transformer."


class LoraTargetError(ValueError):
    """A target names no module of the transformer."""


def target_modules(model: nn.Module, targets: str | list[str]) -> list[str]:
    """peft target_modules for the recipe's `targets`; every explicit name must match a Linear."""
    linear = [plain_name(name) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    wanted = lora_target_modules(targets)
    if wanted is None:
        return linear
    for target in wanted:
        if not any(names_module(name, target) for name in linear):
            raise LoraTargetError(f"{target!r} names no Linear module of the transformer "
                                  f"(e.g. attn.to_q, ff.net.2, or a preset: {', '.join(LORA_TARGET_PRESETS)})")
    return list(wanted)


def lora_config(section: LoraSection, modules: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=section.rank, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      init_lora_weights=INITS[section.init], target_modules=modules)


def inject_lora(model: nn.Module, section: LoraSection | None, *, dtype: torch.dtype,
                seed: int = 0) -> dict[str, Callable[[], torch.Tensor]]:
    """Add `section`'s adapters to `model` (on meta, normally) in `dtype`, freeze everything else, and
    return how each adapter tensor starts: state-dict name → a function making the full tensor.

    Returns {} and leaves the model alone when `section` is None (a full fine-tune).
    """
    if section is None:
        return {}
    if section.type != "lora":  # LyCORIS's LoKr/LoHa: sd35dist/models/lycoris.py
        from sd35dist.models.lycoris import LycorisTargetError, inject_lycoris

        try:
            return inject_lycoris(model, section, dtype=dtype, seed=seed)
        except LycorisTargetError as err:
            raise LoraTargetError(str(err)) from None
    from peft import inject_adapter_in_model

    config = lora_config(section, target_modules(model, section.targets))
    # Adapters are made where the base is: on meta (no memory) before sharding, or on the device.
    with torch.device(next(model.parameters()).device):
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_key(name))
        if is_adapter_key(name) and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return initial_adapters(model, section, dtype, seed)


def initial_adapters(model: nn.Module, section: LoraSection, dtype: torch.dtype,
                     seed: int) -> dict[str, Callable[[], torch.Tensor]]:
    """peft's reset_lora_parameters on a CPU stand-in per layer, seeded by (seed, layer name)."""
    from peft.tuners.lora import LoraLayer

    initial: dict[str, Callable[[], torch.Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            layer = plain_name(name)
            a, b = module.lora_A[ADAPTER], module.lora_B[ADAPTER]
            shapes = (a.in_features, section.rank, b.out_features)
            made = _layer_init(shapes, INITS[section.init], dtype, _seed(seed, layer))
            initial[f"{layer}.lora_A.{ADAPTER}.weight"] = lambda made=made: made()[0]
            initial[f"{layer}.lora_B.{ADAPTER}.weight"] = lambda made=made: made()[1]
    return initial


def _layer_init(shapes: tuple[int, int, int], init: Any, dtype: torch.dtype,
                seed: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        fan_in, rank, fan_out = shapes
        stand_in = types.SimpleNamespace(
            lora_A={ADAPTER: nn.Linear(fan_in, rank, bias=False, device="meta")},
            lora_B={ADAPTER: nn.Linear(rank, fan_out, bias=False, device="meta")},
            r={ADAPTER: rank}, lora_bias={ADAPTER: False}, lora_embedding_A={},
            get_base_layer=lambda: None)
        stand_in.lora_A[ADAPTER].to_empty(device="cpu")
        stand_in.lora_B[ADAPTER].to_empty(device="cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.no_grad():
                LoraLayer.reset_lora_parameters(stand_in, ADAPTER, init)
        return stand_in.lora_A[ADAPTER].weight.detach().to(dtype), stand_in.lora_B[ADAPTER].weight.detach().to(dtype)

    return make


def _seed(seed: int, layer: str) -> int:
    digest = hashlib.sha256(f"lora\0{seed}\0{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def is_adapter_key(name: str) -> bool:
    """A LoRA (`.lora_A.`, `.lora_B.`) or LyCORIS (`.lokr_*`, `.hada_*`) adapter tensor."""
    return ".lora_A." in name or ".lora_B." in name or ".lokr_w" in name or ".hada_w" in name


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of what the optimizer updates: every parameter, or only the adapters under LoRA."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a (plain-named) state dict."""
    return {key: tensor for key, tensor in state.items() if is_adapter_key(key)}


def diffusers_lora_state(adapters: dict[str, torch.Tensor], section: LoraSection) -> dict[str, torch.Tensor]:
    """Adapters as a diffusers LoRA file names them (`transformer.X.lora_A.weight`), alpha / rank folded into B.

    With the scale in B the file means the same to every loader: diffusers (which reads alpha
    from metadata) and ComfyUI (which takes alpha = rank when the file has no `.alpha` keys).
    """
    scale = section.alpha / section.rank
    out = {}
    for key, tensor in adapters.items():
        name = DIFFUSERS_PREFIX + key.replace(f".{ADAPTER}.", ".")
        out[name] = (tensor.float() * scale if ".lora_B." in key else tensor.float()).contiguous()
    return out


def adapted_modules(keys: Iterable[str]) -> list[str]:
    """The module names (without `transformer.`) a diffusers LoRA state dict adapts."""
    names = {key.rsplit(".lora_", 1)[0] for key in keys if is_adapter_key(key)}
    return sorted(name[len(DIFFUSERS_PREFIX):] if name.startswith(DIFFUSERS_PREFIX) else name for name in names)


def adapter_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if is_adapter_key(name))
