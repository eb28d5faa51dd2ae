"""The optimizer and the dtypes every strategy trains in, from the recipe's `train` section.

Shared by FSDP2 and ZeRO, so both train the same numbers: master weights in fp32 (`adamw`)
or bf16 with Kahan-summed updates (`adamw_bf16`), compute in bf16 or the master dtype.
"""

from __future__ import annotations

from typing import Any

import torch

from sd35dist.config.recipe import Recipe


def master_and_compute_dtypes(recipe: Recipe) -> tuple[torch.dtype, torch.dtype]:
    """(master weight dtype, compute dtype) from the recipe's optimizer and precision."""
    master = torch.bfloat16 if recipe.train.optimizer == "adamw_bf16" else torch.float32
    compute = torch.bfloat16 if recipe.train.mixed_precision == "bf16" else master
    return master, compute


def make_optimizer(parameters, recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    """torch AdamW on fp32 masters (`adamw`), or torch-optimi's AdamW with Kahan summation on bf16 (`adamw_bf16`).

    Plain AdamW on bf16 weights rounds away every update below half a bf16 ulp (at lr 5e-5,
    any |w| ≥ 0.0156 never moves). optimi keeps a bf16 compensation buffer per weight that
    carries what rounding dropped into the next step; measured against fp32 masters it moves
    the same weights, deterministically (docs/numerics.md).
    """
    train = recipe.train
    options = dict(lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                   weight_decay=train.adam_weight_decay, eps=train.adam_epsilon)
    if train.optimizer == "adamw_bf16":
        return kahan_adamw(parameters, **options)
    return torch.optim.AdamW(parameters, **options, fused=device.type == "cuda")


def kahan_adamw(parameters, **options: Any) -> torch.optim.Optimizer:
    import optimi

    # The per-parameter loop: FSDP2's DTensor shards have no sharding rule for the
    # _foreach_copy_ that optimi's foreach path uses, and its Triton kernels take plain tensors.
    return optimi.AdamW(parameters, **options, kahan_sum=True, foreach=False, triton=False)
