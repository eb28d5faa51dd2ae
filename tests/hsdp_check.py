"""Driver for the HSDP test; every rank of a 4-rank torchrun runs it (gloo on CPU).

    python -m torch.distributed.run --standalone --nproc-per-node=4 -m tests.hsdp_check MODEL_DIR OUT_DIR

Builds the FSDP2 strategy with `parallel.shard_degree: 2` (fp32, so gradients compare
exactly) and records, from every rank, into OUT_DIR/result.json (written by rank 0):

- layout: each parameter's mesh shape, placements, local and full element counts;
- grad_error: the largest gap between its gradients after one backward on this rank's
  own batch and the mean of the four ranks' gradients computed on plain unsharded models;
- weights_sha256: a hash of the full weights after one optimizer step (replicas agree);
- resumed_equal: the HSDP checkpoint loaded under plain FSDP (shard_degree None) holds
  the same weights and Adam moments, and after an FSDP step and save, a fresh HSDP
  strategy loads those back equal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.numerics_check import fixed_batch

LEARNING_RATE = 1e-3


def recipe_for(model_dir: Path, out_dir: Path, shard_degree: int | None):
    from sd35dist.config.recipe import Recipe

    return Recipe.model_validate({
        "name": "hsdp", "model": {"pretrained": str(model_dir)}, "data": {"cache_url": str(out_dir)},
        "parallel": {"strategy": "fsdp2", "shard_degree": shard_degree},
        "train": {"optimizer": "adamw", "mixed_precision": "fp32", "gradient_checkpointing": False},
        "logging": {"report_to": "none"}, "output": {"dir": str(out_dir / "output")},
    })


def loss_on(model_forward, model_dir: Path, config, seed: int) -> torch.Tensor:
    inputs, target = fixed_batch(model_dir, config, seed)
    return F.mse_loss(model_forward(**inputs).float(), target)


def full_state(strategy) -> dict[str, torch.Tensor]:
    """Every parameter and both Adam moments, gathered whole on every rank."""
    state = {}
    for name, param in strategy.model.named_parameters():
        state[name] = param.detach().full_tensor()
        for key in ("exp_avg", "exp_avg_sq"):
            moment = strategy.optimizer.state.get(param, {}).get(key)
            if moment is not None:
                state[f"{name}/{key}"] = moment.full_tensor()
    return state


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and any("exp_avg" in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)


def mean_plain_gradients(model_dir: Path, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    from diffusers import SD3Transformer2DModel

    plain = SD3Transformer2DModel.from_pretrained(model_dir / "transformer")
    loss_on(lambda **inputs: plain(**inputs, return_dict=False)[0], model_dir, plain.config, seed=rank).backward()
    grads = {}
    for name, param in plain.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad)
        grads[name] = grad / world_size
    return grads


def main(argv: list[str] | None = None) -> int:
    from sd35dist.parallel.process_group import destroy, init_process_group_from_env
    from sd35dist.parallel.fsdp2 import FSDP2Strategy

    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)

    world = init_process_group_from_env(timeout_s=300)
    try:
        hsdp = FSDP2Strategy(recipe_for(args.model_dir, args.out_dir, 2), world)
        layout = {name: {"mesh": list(p.device_mesh.shape), "placements": [str(x) for x in p.placements],
                         "local": p.to_local().numel(), "full": p.numel()}
                  for name, p in hsdp.model.named_parameters()}

        hsdp.backward(loss_on(hsdp.forward, args.model_dir, hsdp.model.config, seed=world.rank))
        expected = mean_plain_gradients(args.model_dir, world.rank, world.world_size)
        grad_error = max(float((p.grad.full_tensor() - expected[name]).abs().max() / expected[name].abs().max().clamp(min=1e-12))
                         for name, p in hsdp.model.named_parameters())
        hsdp.step(LEARNING_RATE, 1.0)
        stepped = full_state(hsdp)
        digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in stepped.values())).hexdigest()

        hsdp_checkpoint, fsdp_checkpoint = args.out_dir / "hsdp-checkpoint", args.out_dir / "fsdp-checkpoint"
        hsdp.save(hsdp_checkpoint)
        fsdp = FSDP2Strategy(recipe_for(args.model_dir, args.out_dir, None), world)
        fsdp.load(hsdp_checkpoint)
        to_fsdp = states_equal(full_state(fsdp), stepped)
        fsdp.backward(loss_on(fsdp.forward, args.model_dir, fsdp.model.config, seed=10 + world.rank))
        fsdp.step(LEARNING_RATE, 1.0)
        fsdp.save(fsdp_checkpoint)
        again = FSDP2Strategy(recipe_for(args.model_dir, args.out_dir, 2), world)
        again.load(fsdp_checkpoint)
        back = states_equal(full_state(again), full_state(fsdp))

        mine = {"layout": layout, "grad_error": grad_error, "weights_sha256": digest,
                "resumed_equal": {"hsdp_to_fsdp": to_fsdp, "fsdp_to_hsdp": back},
                "meshes": [describe(s) for s in (hsdp, fsdp, again)]}
        gathered = [None] * world.world_size
        dist.all_gather_object(gathered, mine)
        if world.is_main:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            (args.out_dir / "result.json").write_text(json.dumps({"ranks": gathered}))
        dist.barrier()  # leave together (gloo aborts a rank whose peers have gone)
    finally:
        destroy()
    return 0


def describe(strategy) -> list[int]:
    return list(strategy.mesh.shape)


if __name__ == "__main__":
    raise SystemExit(main())
