"""LoRA at SD3.5 Large shape, counted exactly on the meta-built model (no memory, no GPU):
trainable parameters per rank and target preset, and the per-GPU bytes of what training keeps
(weights, gradients, optimizer state, EMA) under fsdp2 and zero2. Activations are not counted:
they depend on resolution and batch, and need a GPU to measure (benchmarks/train_step.py --lora).

    .venv/bin/python benchmarks/lora_params.py [--gpus 8] [--ranks 16,64,256]

Prints markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))  # run from a checkout without installing

from train_step import LARGE

from sd35dist.config.recipe import LoraSection
from sd35dist.models.lora import adapter_parameter_count, inject_lora
from sd35dist.models.transformer_build import build_on_meta

GIB = 2**30


def counts(rank: int, targets: str) -> tuple[int, int]:
    """(base parameters, adapter parameters) of SD3.5 Large with a LoRA of `rank` on `targets`."""
    model = build_on_meta({"_class_name": "SD3Transformer2DModel", **LARGE}, dtype=torch.bfloat16)
    inject_lora(model, LoraSection(rank=rank, alpha=rank, targets=targets), dtype=torch.float32)
    adapters = adapter_parameter_count(model)
    return sum(p.numel() for p in model.parameters()) - adapters, adapters


def per_gpu_gib(base: int, adapters: int, gpus: int, strategy: str, ema: bool) -> float:
    """Bytes each GPU keeps for weights, gradients, AdamW state (and EMA), in GiB.

    fsdp2: bf16 base sharded (2 B / N); adapters fp32 master + fp32 grad + 2 fp32 moments sharded (16 B / N).
    zero2: bf16 base whole on every GPU (2 B); adapters bf16 whole (2 B) + bf16 grad (2 B), fp32 master and
    2 moments sharded (12 B / N). EMA: fp32 adapters, sharded like the masters (4 B / N).
    """
    extra = 4 * adapters / gpus if ema else 0
    if strategy == "fsdp2":
        return (2 * base / gpus + 16 * adapters / gpus + extra) / GIB
    return (2 * base + 4 * adapters + 12 * adapters / gpus + extra) / GIB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--ranks", default="16,64,256")
    args = parser.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    print("| targets | rank | trainable parameters | share of the base | adapter checkpoint (fp32 weights, AdamW, EMA) |")
    print("|---|---|---|---|---|")
    rows = {}
    for targets in ("attention", "attention_ff", "all_linear"):
        for rank in ranks:
            base, adapters = counts(rank, targets)
            rows[targets, rank] = base, adapters
            print(f"| {targets} | {rank} | {adapters:,} | {100 * adapters / base:.2f}% | {16 * adapters / 2**20:,.0f} MiB |")
    print(f"\nbase (frozen) parameters: {base:,}; a full fine-tune's checkpoint (fp32 weights, AdamW, EMA): "
          f"{16 * base / GIB:,.0f} GiB\n")
    print("| strategy | GPUs | targets | rank | per-GPU weights + grads + AdamW + EMA (GiB) | full fine-tune, adamw + EMA (GiB) |")
    print("|---|---|---|---|---|---|")
    for strategy in ("fsdp2", "zero2"):
        for gpus in (1, args.gpus):
            for rank in ranks:
                base, adapters = rows["attention", rank]
                full = (16 + 4) * base / gpus / GIB if strategy == "fsdp2" else float("nan")
                print(f"| {strategy} | {gpus} | attention | {rank} | {per_gpu_gib(base, adapters, gpus, strategy, True):.2f} "
                      f"| {'n/a' if full != full else f'{full:.1f}'} |")


if __name__ == "__main__":
    main()
