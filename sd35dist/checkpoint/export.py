"""`sd35dist export CHECKPOINT --out DIR [--ema] [--dtype bf16|fp32]`: a diffusers `transformer/`
directory (sharded safetensors + config.json) that `SD3Transformer2DModel.from_pretrained`
loads — from an FSDP2 (torch.distributed.checkpoint) or ZeRO (DeepSpeed) checkpoint, in one
process, without GPUs or a process group.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from sd35dist.checkpoint.layout import COMPLETE, read_info

TRANSFORMER_CONFIG = "transformer_config.json"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


class ExportError(ValueError):
    """The checkpoint cannot be exported; the message says why."""


def clean_name(name: str) -> str:
    """Parameter names as the plain diffusers model has them (no AC / compile wrappers)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def dcp_state(directory: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor saved under `prefix` (model or ema) in a DCP checkpoint, as full tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from sd35dist.checkpoint.dcp_reader import MetadataCheckedReader, UnsafeMetadata

    if not (directory / ".metadata").is_file():
        raise ExportError(f"{directory.parent}: no {directory.name}/.metadata: the checkpoint's weights are missing "
                          "(copied without its dcp/ directory?)")
    reader = MetadataCheckedReader(str(directory))
    try:
        metadata = reader.read_metadata()
    except (UnsafeMetadata, pickle.UnpicklingError, EOFError) as err:
        raise ExportError(f"{directory / '.metadata'}: not readable as DCP metadata ({err})") from None
    targets = {
        key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix + ".") and isinstance(meta, TensorStorageMetadata)
    }
    if not targets:
        raise ExportError(f"{directory}: no '{prefix}' tensors in this checkpoint")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process is the point
        try:
            dcp.load(targets, storage_reader=reader, no_dist=True)
        except CheckpointException as err:
            # DCP keeps (exception, traceback) per rank
            errors = [f[0] if isinstance(f, tuple) else f for f in err.failures.values()]
            causes = {type(e).__name__: e for e in errors}
            missing = causes.get("FileNotFoundError")
            why = f"{missing.filename} is missing" if missing is not None else "; ".join(map(str, causes.values()))
            raise ExportError(f"{directory.parent}: weights unreadable: {why}") from None
    return {clean_name(key[len(prefix) + 1 :]): tensor for key, tensor in targets.items()}


def checkpoint_state(checkpoint: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    info = read_info(checkpoint)
    strategy = info.get("strategy", "fsdp2")
    if strategy == "fsdp2":
        state = dcp_state(checkpoint / "dcp", "model")
        if use_ema:  # the EMA covers parameters; buffers (pos_embed) come from the model
            state.update(dcp_state(checkpoint / "dcp", "ema"))
        return state
    from sd35dist.parallel.zero import zero_checkpoint_state

    return zero_checkpoint_state(checkpoint, use_ema)


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
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ExportError(f"{checkpoint}: keys differ from the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict({k: v.to(DTYPES[dtype]) for k, v in state.items()}, assign=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        staging.chmod(0o755)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def find_checkpoint(path: Path) -> Path:
    """`path` itself when it is a complete checkpoint, else the latest one of the output dir `path`."""
    from sd35dist.checkpoint.layout import CHECKPOINTS, CheckpointDir

    if (path / COMPLETE).is_file():
        return path
    if not path.is_dir():
        raise ExportError(f"{path}: no such directory")
    latest = CheckpointDir(path).latest()
    if latest is None:
        raise ExportError(f"{path}: neither a complete checkpoint (no {COMPLETE} inside) nor an output "
                          f"directory with one under {CHECKPOINTS}/")
    return latest


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sd35dist export", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory (…/checkpoints/step-N) or an output dir")
    parser.add_argument("--out", type=Path, required=True, help="the transformer directory to write")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args(argv)
    try:
        checkpoint = find_checkpoint(args.checkpoint)
        out = export_checkpoint(checkpoint, args.out, use_ema=args.ema, dtype=args.dtype)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {'EMA of ' if args.ema else ''}{checkpoint} → {out} ({args.dtype})")
    return 0
