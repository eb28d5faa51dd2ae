"""`sd35dist inspect PATH [--diff BASE] [--png FILE]`: what a model file holds, and what training changed.

PATH is a checkpoint (or an output directory: its latest), a diffusers folder (or a whole
pipeline directory: its transformer/), a single file in Stability's SD3.5 layout, or a LoRA
file. Keys are printed grouped by block (joint block N: attention / MLP / adaLN / norm) with
shapes, dtypes, parameter counts, and the metadata the format carries.

`--diff BASE` gives each block's relative weight change ‖Δ‖/‖W_base‖ (Frobenius norms over
the block's tensors) as a table and a bar plot; for a LoRA, Δ is the effective ΔW = B·A·α/r, for a
LyCORIS file (LoKr, LoHa) the ΔW its loaders apply (models/lycoris.py `delta_weight`).
Everything is read one tensor at a time (tensor_sources.py): no process group, no GPU, and
memory bounded by the largest tensor, whatever the checkpoint's size or sharding.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sd35dist.checkpoint.layout import COMPLETE, CheckpointDir, CheckpointUnreadable, read_info
from sd35dist.checkpoint.original_layout import TRANSFORMER_PREFIX, LayoutMismatch
from sd35dist.checkpoint.tensor_sources import OriginalLayoutView, SafetensorsFiles, TensorSource
from sd35dist.checkpoint.weights import open_weights
from sd35dist.config.cli_args import CommandLineParser

LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.")
LORA_PREFIXES = ("base_model.model.", "transformer.", "unet.")
LYCORIS_MARKERS = (".lokr_w", ".hada_w")
FLAT_PREFIXES = ("lycoris_", "lora_unet_")
"""Module paths with `_` for `.` (LyCORIS's and kohya's names): grouped by their block number."""
METADATA_SHOWN = 120  # characters of a metadata value printed


@dataclass
class Opened:
    """A model file or directory, detected and opened."""

    kind: str
    source: TensorSource
    """Tensors under the names diffs compare (diffusers' names for the MMDiT)."""
    metadata: dict[str, str] = field(default_factory=dict)
    stored: TensorSource | None = None
    """Tensors under the names the file stores them by, when those differ (the original layout)."""


def open_checkpoint(checkpoint: Path, use_ema: bool) -> TensorSource:
    """A complete checkpoint's weights (or EMA), read lazily in the format COMPLETE records."""
    return open_weights(checkpoint, use_ema)


def _is_lora(keys: Iterable[str]) -> bool:
    return any(marker in key for key in keys for marker in LORA_MARKERS)


def _is_lycoris(keys: Iterable[str]) -> bool:
    return any(marker in key for key in keys for marker in LYCORIS_MARKERS)


def open_path(path: Path, use_ema: bool = False) -> Opened:
    """Detect what `path` is and open it lazily; CheckpointUnreadable says why not."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointUnreadable(f"{path}: not a .safetensors file (pickled .ckpt/.bin files are not read)")
        source = SafetensorsFiles([path])
        keys = source.specs()
        if _is_lora(keys):
            return Opened("LoRA file", source, source.metadata)
        if _is_lycoris(keys):
            return Opened("LyCORIS file", source, source.metadata)
        if any(key.startswith(TRANSFORMER_PREFIX) for key in keys):
            return Opened("single file (Stability's SD3.5 layout)", OriginalLayoutView(source), source.metadata, source)
        return Opened("safetensors file", source, source.metadata)
    if not path.is_dir():
        raise CheckpointUnreadable(f"{path}: no such file or directory")
    checkpoint = path if (path / COMPLETE).is_file() else CheckpointDir(path).latest()
    if checkpoint is not None:
        info = read_info(checkpoint)
        metadata = {key: str(value) for key, value in info.items()}
        return Opened(f"checkpoint ({info.get('strategy', 'fsdp2')}{', EMA' if use_ema else ''}) {checkpoint}",
                      open_checkpoint(checkpoint, use_ema), metadata)
    if (path / "model_index.json").is_file():
        path = path / "transformer"
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
            if not isinstance(config, dict):
                raise ValueError(f"a {type(config).__name__}")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CheckpointUnreadable(f"{path / 'config.json'}: not a readable JSON config ({type(exc).__name__})") from None
        metadata = {key: json.dumps(value) for key, value in config.items()}
        return Opened(f"diffusers folder ({config.get('_class_name', 'model')}) {path}", SafetensorsFiles.folder(path),
                      metadata)
    raise CheckpointUnreadable(f"{path}: not a checkpoint, output directory, diffusers folder or safetensors file")


# ---- grouping ------------------------------------------------------------------------------

_BLOCK = re.compile(r"^(?:transformer_blocks|joint_blocks)[._](\d+)[._](.*)$")
_NORM = re.compile(r"(^|[._])(norm_q|norm_k|norm_added_q|norm_added_k|ln_q|ln_k)($|[._])")
_EMBEDDERS = ("pos_embed", "context_embedder", "time_text_embed", "x_embedder", "t_embedder", "y_embedder")


def lora_module(key: str) -> str:
    """The module a LoRA key adapts, in the model's own names (`transformer_blocks.0.attn.to_q`)."""
    for prefix in LORA_PREFIXES:
        key = key.removeprefix(prefix)
    for marker in (*LORA_MARKERS, ".alpha"):
        if marker.rstrip(".") in key:
            return key.split(marker.rstrip("."))[0].rstrip(".")
    return key


def block_of(key: str) -> tuple[str, str]:
    """(group, part): ("joint block 3", "attention"), ("embedders", "pos_embed"), ("vae", "decoder") …"""
    key = lora_module(key) if _is_lora([key]) or key.endswith(".alpha") else key
    key = key.removeprefix(TRANSFORMER_PREFIX)
    for prefix in FLAT_PREFIXES:
        key = key.removeprefix(prefix)
    match = _BLOCK.match(key)
    if match:
        number, rest = int(match.group(1)), match.group(2)
        flat = rest.replace(".", "_")
        if _NORM.search(rest):
            part = "norm"
        elif flat.startswith(("norm1", "x_block_adaLN", "context_block_adaLN")):
            part = "adaLN"
        elif flat.startswith(("ff", "x_block_mlp", "context_block_mlp")):
            part = "MLP"
        else:
            part = "attention"
        return f"joint block {number}", part
    head = key.split(".")[0]
    head = next((e for e in (*_EMBEDDERS, "norm_out", "proj_out", "final_layer") if key.startswith(e + "_")), head)
    if head in _EMBEDDERS:
        return "embedders", head
    if head in ("norm_out", "proj_out", "final_layer"):
        return "final layer", head
    if head == "first_stage_model":
        return "vae", key.split(".")[1]
    if head == "text_encoders":
        return "text encoders", key.split(".")[1]
    return "other", head


def group_order(group: str) -> tuple[int, int]:
    if group.startswith("joint block "):
        return 1, int(group.rsplit(" ", 1)[1])
    return {"embedders": (0, 0), "final layer": (2, 0), "vae": (3, 0), "text encoders": (4, 0)}.get(group, (5, 0))


def _numel(shape: Iterable[int]) -> int:
    return math.prod(shape)


def summarize(specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]], show_keys: bool) -> list[str]:
    """Lines: each group with its parameter count per part, then (with `show_keys`) its keys."""
    groups: dict[str, list[str]] = {}
    for key in sorted(specs):
        groups.setdefault(block_of(key)[0], []).append(key)
    lines = []
    total = 0
    for group in sorted(groups, key=group_order):
        parts: dict[str, int] = {}
        for key in groups[group]:
            part = block_of(key)[1]
            parts[part] = parts.get(part, 0) + _numel(specs[key][0])
        count = sum(parts.values())
        total += count
        dtypes = sorted({str(specs[key][1]).removeprefix("torch.") for key in groups[group]})
        by_part = ", ".join(f"{part} {_human(n)}" for part, n in parts.items())
        lines.append(f"{group}: {len(groups[group])} tensors, {_human(count)} params ({by_part}) [{', '.join(dtypes)}]")
        if show_keys:
            for key in groups[group]:
                shape, dtype = specs[key]
                lines.append(f"    {key:<70} {str(list(shape)):<22} {str(dtype).removeprefix('torch.')}")
    lines.append(f"total: {len(specs)} tensors, {total:,} parameters ({_human(total)})")
    return lines


def _human(count: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(int(count))


# ---- diff ----------------------------------------------------------------------------------


@dataclass
class BlockChange:
    group: str
    tensors: int = 0
    delta_sq: float = 0.0
    base_sq: float = 0.0

    @property
    def relative(self) -> float:
        return math.sqrt(self.delta_sq / self.base_sq) if self.base_sq else float("nan")


def _add(changes: dict[str, BlockChange], key: str, delta: torch.Tensor | None, base: torch.Tensor) -> None:
    change = changes.setdefault(block_of(key)[0], BlockChange(block_of(key)[0]))
    change.tensors += 1
    change.base_sq += float(base.detach().double().square().sum())
    if delta is not None:
        change.delta_sq += float(delta.detach().double().square().sum())


def full_diff(source: TensorSource, base: TensorSource) -> tuple[list[BlockChange], list[str]]:
    """Per-block ‖Δ‖² and ‖W_base‖² over the keys both hold; and notes on keys only one holds."""
    ours, theirs = source.specs(), base.specs()
    shared = sorted(set(ours) & set(theirs))
    if not shared:
        raise CheckpointUnreadable("no tensor names in common with the base: is it the same kind of model?")
    changes: dict[str, BlockChange] = {}
    for key in shared:
        if ours[key][0] != theirs[key][0]:
            raise CheckpointUnreadable(f"{key}: shape {list(ours[key][0])} here, {list(theirs[key][0])} in the base")
        mine, reference = source.get(key).double(), base.get(key).double()
        _add(changes, key, mine - reference, reference)
    notes = [f"{len(only)} tensors only in {where} (not compared): {', '.join(only[:3])}{' …' if len(only) > 3 else ''}"
             for where, only in (("PATH", sorted(set(ours) - set(theirs))), ("BASE", sorted(set(theirs) - set(ours))))
             if only]
    return sorted(changes.values(), key=lambda c: group_order(c.group)), notes


def lora_scales(source: SafetensorsFiles, metadata: Mapping[str, str]) -> tuple[dict[str, tuple[str, str, float]], str]:
    """module → (A key, B key, α/r), and where α came from."""
    keys = source.specs()
    adapter = json.loads(metadata.get("lora_adapter_metadata", "{}") or "{}")
    adapter = {k.removeprefix("transformer."): v for k, v in adapter.items()}
    modules: dict[str, dict[str, str]] = {}
    for key in keys:
        role = next((m.strip(".") for m in LORA_MARKERS if m in key), "alpha" if key.endswith(".alpha") else None)
        if role is not None:
            modules.setdefault(lora_module(key), {})[role.replace("lora_down", "lora_A").replace("lora_up", "lora_B")] = key
    found, origin = {}, "α = r (no alpha stored; scale 1)"
    for module, roles in modules.items():
        if "lora_A" not in roles or "lora_B" not in roles:
            raise CheckpointUnreadable(f"LoRA module {module}: has {sorted(roles)}, needs both A (down) and B (up)")
        rank = keys[roles["lora_A"]][0][0]
        if "alpha" in roles:
            alpha, origin = float(source.get(roles["alpha"])), "α from the file's .alpha tensors"
        elif module in adapter.get("alpha_pattern", {}) or "lora_alpha" in adapter:
            alpha = float(adapter.get("alpha_pattern", {}).get(module, adapter.get("lora_alpha")))
            origin = "α from lora_adapter_metadata"
        else:
            alpha = float(rank)
        found[module] = (roles["lora_A"], roles["lora_B"], alpha / rank)
    return found, origin


def lora_diff(source: SafetensorsFiles, metadata: Mapping[str, str], base: TensorSource) -> tuple[list[BlockChange], list[str]]:
    """Per-block ‖ΔW‖² (ΔW = B·A·α/r) against the base's ‖W‖² over every base tensor of the block."""
    modules, origin = lora_scales(source, metadata)
    theirs = base.specs()
    deltas: dict[str, tuple[str, str, float]] = {}
    for module, entry in modules.items():
        if module + ".weight" not in theirs:
            raise CheckpointUnreadable(f"LoRA module {module}: the base has no {module}.weight")
        deltas[module + ".weight"] = entry
    changes: dict[str, BlockChange] = {}
    for key in sorted(theirs):
        reference = base.get(key)
        delta = None
        if key in deltas:
            a_key, b_key, scale = deltas[key]
            down, up = source.get(a_key).double(), source.get(b_key).double()
            delta = (up.flatten(1) @ down.flatten(1)).reshape(reference.shape) * scale
        _add(changes, key, delta, reference)
    return sorted(changes.values(), key=lambda c: group_order(c.group)), [origin]


def lycoris_diff(source: SafetensorsFiles, base: TensorSource) -> tuple[list[BlockChange], list[str]]:
    """Per-block ‖ΔW‖² of a LyCORIS file (`lycoris_<module>.lokr_w1 …`, `.alpha`) against the base's ‖W‖²."""
    from sd35dist.models.lycoris import delta_weight, split_key

    theirs = base.specs()
    # LyCORIS names a module by its path with "_" for "."; the base's names say where the dots were.
    by_flat = {"lycoris_" + key.removesuffix(".weight").replace(".", "_"): key
               for key in theirs if key.endswith(".weight")}
    modules: dict[str, dict[str, str]] = {}
    alphas: dict[str, str] = {}
    for key in source.specs():
        if key.endswith(".alpha"):
            alphas[key.removesuffix(".alpha")] = key
        elif (parts := split_key(key)) is not None:
            modules.setdefault(parts[0], {})[parts[1]] = key
    deltas: dict[str, tuple[dict[str, str], str | None]] = {}
    for module, roles in modules.items():
        if module not in by_flat:
            raise CheckpointUnreadable(f"LyCORIS module {module}: the base has no such weight")
        deltas[by_flat[module]] = (roles, alphas.get(module))
    changes: dict[str, BlockChange] = {}
    for key in sorted(theirs):
        reference = base.get(key)
        delta = None
        if key in deltas:
            roles, alpha_key = deltas[key]
            alpha = float(source.get(alpha_key)) if alpha_key else None
            delta = delta_weight({role: source.get(k) for role, k in roles.items()}, alpha, tuple(reference.shape))
        _add(changes, key, delta, reference)
    return sorted(changes.values(), key=lambda c: group_order(c.group)), [
        "ΔW as LyCORIS and ComfyUI apply it: LoKr kron(w1, w2), LoHa (w1_a·w1_b)⊙(w2_a·w2_b), scaled by .alpha / rank"]


def diff_table(changes: list[BlockChange]) -> list[str]:
    lines = [f"{'block':<16}{'tensors':>8}{'‖Δ‖':>12}{'‖W_base‖':>12}{'‖Δ‖/‖W_base‖':>15}"]
    for change in changes:
        lines.append(f"{change.group:<16}{change.tensors:>8}{math.sqrt(change.delta_sq):>12.4g}"
                     f"{math.sqrt(change.base_sq):>12.4g}{change.relative:>15.3e}")
    total = BlockChange("all", sum(c.tensors for c in changes), sum(c.delta_sq for c in changes),
                        sum(c.base_sq for c in changes))
    lines.append(f"{'all':<16}{total.tensors:>8}{math.sqrt(total.delta_sq):>12.4g}{math.sqrt(total.base_sq):>12.4g}"
                 f"{total.relative:>15.3e}")
    return lines


def diff(path: Path, base_path: Path, use_ema: bool = False) -> tuple[list[BlockChange], list[str]]:
    """The per-block change of `path` against `base_path` (any two formats `open_path` reads)."""
    return diff_opened(open_path(path, use_ema), base_path)


def diff_opened(opened: Opened, base_path: Path) -> tuple[list[BlockChange], list[str]]:
    """`diff` of a file or checkpoint already opened (inspect prints it first)."""
    base = open_path(base_path)
    if base.kind in ("LoRA file", "LyCORIS file"):
        raise CheckpointUnreadable(f"{base_path}: an adapter cannot be the base; diff the adapter against its base model")
    if opened.kind == "LoRA file":
        assert isinstance(opened.source, SafetensorsFiles)
        return lora_diff(opened.source, opened.metadata, base.source)
    if opened.kind == "LyCORIS file":
        assert isinstance(opened.source, SafetensorsFiles)
        return lycoris_diff(opened.source, base.source)
    return full_diff(opened.source, base.source)


def argument_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="sd35dist inspect", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("path", type=Path, help="checkpoint, output dir, diffusers folder, single file or LoRA file")
    parser.add_argument("--ema", action="store_true", help="a checkpoint's EMA weights instead of the raw ones")
    parser.add_argument("--diff", type=Path, metavar="BASE", help="per-block relative change against BASE")
    parser.add_argument("--png", type=Path, help="the bar plot of --diff (default: ./<name>-diff.png)")
    parser.add_argument("--summary", action="store_true", help="group totals only, no key list")
    return parser


def main(argv: list[str]) -> int:
    args = argument_parser().parse_args(argv)
    try:
        if args.png is not None and args.diff is None:
            raise CheckpointUnreadable(f"--png {args.png}: the bar plot is of --diff BASE: add it")
        if args.png is not None and (args.png.is_dir() or not args.png.parent.is_dir()):
            raise CheckpointUnreadable(f"--png {args.png}: name a file in an existing directory")
        if args.diff is not None and not args.diff.exists():
            raise CheckpointUnreadable(f"--diff {args.diff}: no such file or directory")
        opened = open_path(args.path, args.ema)
        print(f"{args.path}: {opened.kind}")
        for key, value in sorted(opened.metadata.items()):
            value = value if len(value) <= METADATA_SHOWN else value[:METADATA_SHOWN] + " …"
            print(f"  {key}: {value}")
        print("\n".join(summarize((opened.stored or opened.source).specs(), show_keys=not args.summary)))
        if args.diff is not None:
            from sd35dist.checkpoint.diff_plot import plot_changes

            changes, notes = diff_opened(opened, args.diff)
            print(f"\nchange against {args.diff}:")
            print("\n".join(diff_table(changes)))
            for note in notes:
                print(f"  note: {note}")
            png = args.png or Path.cwd() / f"{args.path.name.removesuffix('.safetensors')}-diff.png"
            plot_changes(changes, png, title=f"{args.path.name} vs {args.diff.name}")
            print(f"bar plot: {png}")
    except (CheckpointUnreadable, LayoutMismatch) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
