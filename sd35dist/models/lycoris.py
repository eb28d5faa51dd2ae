"""LyCORIS adapters (LoKr, LoHa) in the SD3 transformer: LyCORIS's meaning, peft's layers, LyCORIS's file.

`train.lora.type: lokr | loha` trains what SimpleTuner's `lora_type: lycoris` trains: the same
modules (LycorisNetwork's apply_preset rules, or our target presets), the same tensor layout and
scale (config/adapter_layout.py), the same initialisation (LyCORIS zeroes w2 of a LoKr and
w2_a of a LoHa). The layers are peft's LoKr/LoHa (peft's own port of LyCORIS's algorithms):
they are ordinary modules whose tensors are Parameters inside the Linear they adapt, so they go
through the same path as our LoRA — injected on the meta device, sharded with their block by
fully_shard, saved and resharded by DCP, partitioned by ZeRO-2, averaged by the EMA. LyCORIS's
own modules are not: they live outside the model (`org_module` is held in a list and its
forward is replaced), their `state_dict()` returns computed tensors (`lokr_w1 * scalar`, which a
DTensor shard cannot give), and their presets are class attributes shared by the process.

The file we write is LyCORIS's (`LycorisNetwork.save_weights`, which SimpleTuner ships):
`lycoris_<module path with _>.<tensor>` and `.alpha`. lycoris-lora's `create_lycoris_from_weights`
loads it, and ComfyUI maps `lycoris_*` keys onto SD3's MMDiT (comfy/lora.py, "simpletuner
lycoris format"; tests/comfy_lora_keys.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from sd35dist.config.adapter_layout import AdapterLayout, adapter_layout
from sd35dist.config.model_size import names_module
from sd35dist.config.recipe import LoraSection
from sd35dist.models.state_keys import plain_name

ADAPTER = "default"
LYCORIS_PREFIX = "lycoris_"
ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "hada_w1_a", "hada_w1_b",
         "hada_w2_a", "hada_w2_b")
"""LyCORIS's tensor names (peft's LoKr/LoHa ParameterDicts carry the same names)."""
_ROLE = re.compile(r"^(?P<module>.+)\.(?P<role>" + "|".join(ROLES) + r")(?:\.default)?(?:\.weight)?$")


class LycorisTargetError(ValueError):
    """The recipe's targets or preset name no Linear, or a module LyCORIS would adapt that we cannot."""


@dataclasses.dataclass(frozen=True)
class AdaptedLinear:
    """One Linear of the transformer and the LyCORIS adapter it gets."""

    module: str
    in_dim: int
    out_dim: int
    algo: str
    rank: int
    alpha: float
    factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False

    @property
    def layout(self) -> AdapterLayout:
        return adapter_layout(self.algo, self.in_dim, self.out_dim, rank=self.rank, alpha=self.alpha,
                              factor=self.factor, decompose_both=self.decompose_both, full_matrix=self.full_matrix)

    @property
    def lycoris_name(self) -> str:
        """LycorisNetwork's name for the module: `lycoris_transformer_blocks_0_attn_to_q`."""
        return LYCORIS_PREFIX + self.module.replace(".", "_")


def adapted_linears(model: nn.Module, section: LoraSection) -> list[AdaptedLinear]:
    """Which Linears get which adapter: LyCORIS's apply_preset rules with `section.preset`, else
    `section.targets` by peft's name rule. Order: the model's module order."""
    modules = {plain_name(name): module for name, module in model.named_modules()}
    linears = {name: module for name, module in modules.items() if isinstance(module, nn.Linear)}
    chosen: dict[str, dict] = {}
    if section.preset is None:
        wanted = section.target_modules()
        for target in wanted or ():
            if not any(names_module(name, target) for name in linears):
                raise LycorisTargetError(f"{target!r} names no Linear module of the transformer")
        chosen = {name: {} for name in linears if wanted is None or any(names_module(name, t) for t in wanted)}
    else:
        chosen = _preset_choice(modules, section)
    out = []
    for name, options in chosen.items():
        linear = linears[name]
        out.append(AdaptedLinear(
            module=name, in_dim=linear.in_features, out_dim=linear.out_features,
            algo=options.get("algo") or section.type, rank=options.get("dim") or section.rank,
            alpha=options.get("alpha") or section.alpha,
            factor=options["factor"] if options.get("factor") is not None else section.factor,
            decompose_both=section.decompose_both, full_matrix=section.full_matrix))
    return out


def _preset_choice(modules: Mapping[str, nn.Module], section: LoraSection) -> dict[str, dict]:
    """LycorisNetwork.create_modules: a module of a targeted class adapts every Linear inside it, a
    class of module_algo_map nested inside overrides the options of what it holds; a targeted name
    adapts that module; exclude_name skips a module matched at the top level only (as LyCORIS does)."""
    preset = section.preset
    assert preset is not None
    algo_map = {cls: options.model_dump(exclude_none=True) for cls, options in preset.module_algo_map.items()}
    classes = set(preset.target_module) | set(algo_map)
    chosen: dict[str, dict] = {}

    def take(name: str, module: nn.Module, options: dict) -> None:
        if name in chosen:
            return
        if isinstance(module, nn.Linear):
            chosen[name] = options
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise LycorisTargetError(f"{name}: LyCORIS adapters on convolutions are not offered; "
                                     "exclude it (preset.exclude_name) or target Linear modules only")

    def inside(prefix: str, root: nn.Module, options: dict) -> None:
        for sub, module in root.named_modules():
            name = plain_name(f"{prefix}.{sub}" if sub else prefix)
            if sub and type(module).__name__ in algo_map:
                inside(name, module, algo_map[type(module).__name__])
            take(name, module, options)

    for name, module in modules.items():
        if not name or any(re.match(pattern, name) for pattern in preset.exclude_name) or name in preset.exclude_name:
            continue
        cls = type(module).__name__
        if cls in classes:
            inside(name, module, algo_map.get(cls, {}))
        elif name in preset.target_name or any(re.match(pattern, name) for pattern in preset.target_name):
            take(name, module, algo_map.get(cls, {}))
    if not chosen:
        raise LycorisTargetError(f"the preset adapts no Linear module (target_module {preset.target_module}, "
                                 f"target_name {preset.target_name})")
    return chosen


def inject_lycoris(model: nn.Module, section: LoraSection, *, dtype: torch.dtype,
                   seed: int = 0) -> dict[str, Callable[[], torch.Tensor]]:
    """peft LoKr/LoHa layers on the targets (on meta, normally), everything else frozen; returns how
    each adapter tensor starts (state-dict name → a function making the full tensor)."""
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model

    targets = adapted_linears(model, section)
    groups: dict[tuple, list[str]] = {}
    for target in targets:
        groups.setdefault((target.algo, target.rank, target.alpha, target.factor), []).append(target.module)
    device = next(model.parameters()).device
    with torch.device(device), warnings.catch_warnings():
        # One peft config per (algo, rank, alpha, factor) group; peft warns at the second that a model has several.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for (algo, rank, alpha, factor), names in groups.items():
            config = (LoKrConfig(r=rank, alpha=alpha, decompose_factor=factor, target_modules=names) if algo == "lokr"
                      else LoHaConfig(r=rank, alpha=alpha, target_modules=names))
            inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    layers = {plain_name(name): module for name, module in model.named_modules() if hasattr(module, "scaling")}
    for target in targets:
        _lycoris_tensors(layers[target.module], target.layout, device)
    for name, param in model.named_parameters():
        param.requires_grad_(is_lycoris_key(name))
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
    initial: dict[str, Callable[[], torch.Tensor]] = {}
    for target in targets:
        made = _layer_init(target, dtype, _seed(seed, target.module))
        for role in target.layout.shapes:
            initial[f"{target.module}.{role}.{ADAPTER}"] = lambda made=made, role=role: made()[role]
    return initial


def _lycoris_tensors(layer: nn.Module, layout: AdapterLayout, device: torch.device) -> None:
    """Give peft's layer LyCORIS's tensors and scale. peft decides the LoKr layout with its own copy of
    `factorization`, which leaves (factor, width / factor) unsorted when factor² > width (LyCORIS
    sorts: a 64-wide layer with factor 16 is kron(4×4, 16×16) there, kron(16×16, 4×4) in peft); it
    has no full_matrix; and it scales a LoKr of two whole matrices by alpha / r where LyCORIS scales
    it by 1. peft's forward and merge read only which tensors exist and `scaling`: both are set here."""
    for role in ROLES:
        tensors = getattr(layer, role, None)
        if tensors is not None and ADAPTER in tensors:
            del tensors[ADAPTER]
    for role, shape in layout.shapes.items():
        getattr(layer, role)[ADAPTER] = nn.Parameter(torch.empty(shape, device=device))
    layer.scaling[ADAPTER] = layout.scale


def _layer_init(target: AdaptedLinear, dtype: torch.dtype, seed: int) -> Callable[[], dict[str, torch.Tensor]]:
    """LyCORIS's init (modules/lokr.py, modules/loha.py; use_scalar off): LoKr w1 (or w1_a, w1_b) and
    w2_a Kaiming-uniform, w2 (or w2_b) zero; LoHa w1_a N(0, 0.1²), w1_b and w2_b N(0, 1), w2_a zero."""

    def make() -> dict[str, torch.Tensor]:
        shapes = target.layout.shapes
        tensors = {role: torch.empty(shape) for role, shape in shapes.items()}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.no_grad():
                if target.algo == "lokr":
                    for role in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a"):
                        if role in tensors:
                            nn.init.kaiming_uniform_(tensors[role], a=5 ** 0.5)
                    for role in ("lokr_w2", "lokr_w2_b"):
                        if role in tensors:
                            nn.init.zeros_(tensors[role])
                else:
                    nn.init.normal_(tensors["hada_w1_b"], std=1.0)
                    nn.init.normal_(tensors["hada_w1_a"], std=0.1)
                    nn.init.normal_(tensors["hada_w2_b"], std=1.0)
                    nn.init.zeros_(tensors["hada_w2_a"])
        return {role: tensor.to(dtype) for role, tensor in tensors.items()}

    return make


def _seed(seed: int, layer: str) -> int:
    digest = hashlib.sha256(f"lycoris\0{seed}\0{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def is_lycoris_key(name: str) -> bool:
    return _ROLE.match(plain_name(name)) is not None


def split_key(name: str) -> tuple[str, str] | None:
    """(module, role) of a LyCORIS tensor name in any of our spellings; None for other keys."""
    match = _ROLE.match(plain_name(name))
    return None if match is None else (match["module"], match["role"])


def lycoris_file_state(adapters: Mapping[str, torch.Tensor], targets: Iterable[AdaptedLinear]) -> dict[str, torch.Tensor]:
    """The checkpoint's adapters (`X.lokr_w1.default`) as LyCORIS's save_weights names them
    (`lycoris_X.lokr_w1`), with each module's `.alpha`."""
    by_module = {target.module: target for target in targets}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in adapters.items():
        parts = split_key(key)
        if parts is None:
            continue
        module, role = parts
        target = by_module[module]
        out[f"{target.lycoris_name}.{role}"] = tensor.float().contiguous()
    for target in by_module.values():
        out[f"{target.lycoris_name}.alpha"] = torch.tensor(target.layout.stored_alpha)
    return out


def delta_weight(tensors: Mapping[str, torch.Tensor], alpha: float | None, shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW of one LyCORIS module from its tensors (role → tensor) and stored `.alpha`, by the rule its
    loaders apply (LyCORIS's and ComfyUI's): LoKr kron(w1, w2), scale 1 when both halves are whole,
    else alpha / the factored half's rank; LoHa (w1_a·w1_b)⊙(w2_a·w2_b)·alpha/rank."""
    t = {role: value.double() for role, value in tensors.items()}
    if "hada_w1_a" in t:
        rank = t["hada_w1_b"].shape[0]
        diff = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return (diff * ((alpha if alpha is not None else rank) / rank)).reshape(shape)
    rank = None
    w1 = t.get("lokr_w1")
    if w1 is None:
        w1, rank = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
    w2 = t.get("lokr_w2")
    if w2 is None:
        w2, rank = t["lokr_w2_a"] @ t["lokr_w2_b"], t["lokr_w2_b"].shape[0]
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    return (torch.kron(w1, w2) * scale).reshape(shape)
