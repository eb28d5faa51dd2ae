"""`sd35dist export CHECKPOINT --out DIR [--ema] [--dtype bf16|fp32]`: a diffusers `transformer/`
directory (sharded safetensors + config.json) that `SD3Transformer2DModel.from_pretrained`
loads — from an FSDP2 (torch.distributed.checkpoint) or ZeRO (DeepSpeed) checkpoint, in one
process, without GPUs or a process group. The format of the strategy the checkpoint records reads its weights
(checkpoint/weights.py); this module checks them against the model and writes the directory.

`--format single-file` writes one safetensors in Stability's SD3.5 layout instead (single_file.py);
`--format kohya` a LoRA checkpoint's adapters as kohya's sd-scripts loads them (kohya_export.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch

from sd35dist.checkpoint.layout import CHECKPOINTS, COMPLETE, TRANSFORMER_CONFIG, CheckpointDir, CheckpointUnreadable
from sd35dist.checkpoint.lora_export import checkpoint_lora, export_lora
from sd35dist.checkpoint.weights import read_weights
from sd35dist.config.cli_args import CommandLineParser, fail
from sd35dist.models.state_keys import key_mismatch
from sd35dist.runtime.atomic_files import staged_directory, unwritable_reason

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


class ExportError(ValueError):
    """The checkpoint cannot be exported; the message says why."""


def checkpoint_state(checkpoint: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    """Full tensors of `checkpoint`'s weights (or EMA), read in the format of the strategy that wrote it."""
    return read_weights(checkpoint, use_ema)


def export_checkpoint(checkpoint: Path, out: Path, *, use_ema: bool = False, dtype: str = "bf16",
                      max_shard_size: str = "5GB") -> Path:
    """Write `out` (a diffusers transformer directory) completely, or not at all."""
    from diffusers import SD3Transformer2DModel

    if not (checkpoint / COMPLETE).is_file():
        raise ExportError(f"{checkpoint}: not a complete checkpoint (no {COMPLETE})")
    config_file = checkpoint / TRANSFORMER_CONFIG
    if not config_file.is_file():
        raise ExportError(f"{checkpoint}: no {TRANSFORMER_CONFIG}")
    if out.exists():
        raise ExportError(f"{out} already exists: choose another --out")
    state = checkpoint_state(checkpoint, use_ema)
    config = json.loads(config_file.read_text())
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(config)
    problem = key_mismatch(model.state_dict(), state)
    if problem is not None:
        raise ExportError(f"{checkpoint}: keys differ from the model: {problem}")
    model.load_state_dict({k: v.to(DTYPES[dtype]) for k, v in state.items()}, assign=True)
    with staged_directory(out) as staging:
        model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
    return out


def export_lora_checkpoint(checkpoint: Path, out: Path, *, use_ema: bool = False, dtype: str = "bf16",
                           merge: bool = False) -> Path:
    """`pytorch_lora_weights.safetensors` (or with `merge` the fused transformer) in `out`, completely or not at all."""
    if not (checkpoint / COMPLETE).is_file():
        raise ExportError(f"{checkpoint}: not a complete checkpoint (no {COMPLETE})")
    if out.exists():
        raise ExportError(f"{out} already exists: choose another --out")
    return export_lora(checkpoint, out, checkpoint_state(checkpoint, use_ema), dtype=DTYPES[dtype], merge=merge)


def find_checkpoint(path: Path) -> Path:
    """`path` itself when it is a complete checkpoint, else the latest one of the output dir `path`."""
    if (path / COMPLETE).is_file():
        return path
    if not path.is_dir():
        raise ExportError(f"{path}: no such directory")
    latest = CheckpointDir(path).latest()
    if latest is None:
        raise ExportError(f"{path}: neither a complete checkpoint (no {COMPLETE} inside) nor an output "
                          f"directory with one under {CHECKPOINTS}/")
    return latest


def argument_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="sd35dist export", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory (…/checkpoints/step-N) or an output dir")
    parser.add_argument("--out", type=Path, required=True, help="the transformer directory (or single file) to write")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    parser.add_argument("--dtype", choices=[*sorted(DTYPES), "fp8_e4m3fn"], default="bf16",
                        help="fp8_e4m3fn (single-file only): linear weights in fp8 for inference, the rest bf16")
    parser.add_argument("--format", choices=("diffusers", "single-file", "kohya"), default="diffusers",
                        help="single-file: one safetensors in Stability's SD3.5 layout (ComfyUI, Forge, model hubs); "
                             "kohya: a LoRA file as kohya's sd-scripts names it (fused qkv), --out FILE")
    parser.add_argument("--with-vae", action="store_true", help="single-file: add the base model's VAE")
    parser.add_argument("--vae", type=Path, help="single-file: the diffusers VAE folder to add (default: the base model's vae/)")
    parser.add_argument("--title", help="single-file: modelspec.title (default: the file's name)")
    parser.add_argument("--merge", action="store_true",
                        help="LoRA checkpoints: write the transformer with the LoRA fused in instead of the LoRA file")
    return parser


def main(argv: list[str]) -> int:
    args = argument_parser().parse_args(argv)
    # Export reads local files only: a base model that moved must not turn into a Hub download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.format != "single-file" and (args.dtype == "fp8_e4m3fn" or args.with_vae or args.vae or args.title):
        return fail("--dtype fp8_e4m3fn, --with-vae, --vae and --title need --format single-file")
    try:
        check_export_arguments(args)
        if args.format == "single-file":
            return _export_single_file(args)
        if args.format == "kohya":
            return _export_kohya(args)
        checkpoint = find_checkpoint(args.checkpoint)
        if checkpoint_lora(checkpoint) is not None:  # a LoRA checkpoint: sd35dist/checkpoint/lora_export.py
            out = export_lora_checkpoint(checkpoint, args.out, use_ema=args.ema, dtype=args.dtype, merge=args.merge)
        elif args.merge:
            raise ExportError(f"{checkpoint}: --merge needs a LoRA checkpoint; this one is a full fine-tune")
        else:
            out = export_checkpoint(checkpoint, args.out, use_ema=args.ema, dtype=args.dtype)
    except (ExportError, CheckpointUnreadable) as err:
        return fail(str(err))
    except OSError as err:  # the disk filled, the directory went away: the staged output is gone already
        return fail(f"--out {args.out}: cannot write: {err.strerror or err}")
    print(f"exported {'EMA of ' if args.ema else ''}{checkpoint} → {out} ({args.dtype})")
    return 0


def check_export_arguments(args: argparse.Namespace) -> None:
    """What can be known before a tensor is read: the output can be created, --vae is a VAE."""
    if args.out.exists():
        raise ExportError(f"{args.out} already exists: choose another --out")
    if args.format == "single-file" and not args.out.parent.is_dir():
        raise ExportError(f"--out {args.out}: no such directory {args.out.parent}")
    problem = unwritable_reason(args.out)
    if problem:
        raise ExportError(f"--out {args.out}: {problem}")
    if args.vae is not None:
        check_vae_dir(args.vae)


def check_vae_dir(vae: Path) -> None:
    """A diffusers VAE folder: config.json of an AutoencoderKL (not a transformer's, say) and its weights."""
    try:
        config = json.loads((vae / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise ExportError(f"--vae {vae}: no readable config.json: name a diffusers VAE folder (the base model's vae/)") from None
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind != "AutoencoderKL":
        raise ExportError(f"--vae {vae}: holds a {kind or 'model of unknown class'}, not a VAE (AutoencoderKL): "
                          "name the base model's vae/ folder")


def _export_single_file(args: argparse.Namespace) -> int:
    from sd35dist.checkpoint.single_file import export_single_file

    # A diffusers transformer folder (a merged LoRA's, say) is exported as it is.
    source = args.checkpoint if (args.checkpoint / "config.json").is_file() else find_checkpoint(args.checkpoint)
    with contextlib.ExitStack() as scratch:
        use_ema, weights = args.ema, source
        if source is not args.checkpoint and checkpoint_lora(source) is not None:
            if not args.merge:
                raise ExportError(f"{source}: a LoRA checkpoint is one file only when merged: add --merge")
            merged = Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="sd35dist-merge-",
                                                                             dir=args.out.parent)))
            weights = export_lora_checkpoint(source, merged / "transformer", use_ema=args.ema, dtype="fp32", merge=True)
            use_ema = False  # the merged folder already holds the chosen weights
        size = export_single_file(weights, args.out, use_ema=use_ema, dtype=args.dtype,
                                  with_vae=args.with_vae or args.vae is not None, vae_dir=args.vae, title=args.title)
    print(f"exported {'EMA of ' if args.ema else ''}{source} → {args.out} "
          f"(single file, SD3.5 layout, {args.dtype}, {size / 2**20:.1f} MiB)")
    return 0


def _export_kohya(args: argparse.Namespace) -> int:
    from sd35dist.checkpoint.kohya_export import export_kohya

    checkpoint = find_checkpoint(args.checkpoint)
    section = checkpoint_lora(checkpoint)
    if section is None:
        raise ExportError(f"{checkpoint}: --format kohya writes a LoRA; this checkpoint is a full fine-tune "
                          "(--format single-file writes its weights for ComfyUI and kohya's tools)")
    if section.type != "lora":
        raise ExportError(f"{checkpoint}: a {section.type} (LyCORIS) checkpoint has no kohya LoRA form (sd-scripts' "
                          "lora_sd3 loads LoRA only): export it without --format, LyCORIS's file, which ComfyUI loads")
    if args.merge:
        raise ExportError("--merge writes a transformer, not a kohya LoRA: drop --merge or --format kohya")
    if args.out.exists():
        raise ExportError(f"{args.out} already exists: choose another --out")
    if not args.out.parent.is_dir():
        raise ExportError(f"{args.out.parent}: no such directory for --out")
    state = checkpoint_state(checkpoint, args.ema)
    export_kohya(checkpoint, args.out, state, section, dtype=DTYPES[args.dtype])
    print(f"exported {'EMA of ' if args.ema else ''}{checkpoint} → {args.out} (kohya sd-scripts LoRA, {args.dtype})")
    return 0
