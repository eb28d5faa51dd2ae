"""Driver for the HSDP test; every rank of 4 gloo ranks started as 2 nodes × 2 runs it.

    torchrun --nnodes=2 --nproc-per-node=2 --rdzv-backend=c10d ... -m tests.hsdp_check MODEL_DIR OUT_DIR
    (twice, one agent per pretend node)

Builds the FSDP2 strategy with `parallel.shard_degree` unset, so the default across nodes
(HSDP, shards inside the node) decides the mesh, in fp32 so gradients compare exactly,
and records, from every rank, into OUT_DIR/result.json (written by rank 0):

- layout: each parameter's mesh shape, placements, local and full element counts;
- collectives: every all-gather, reduce-scatter and all-reduce of one forward + backward,
  as (operation, ranks of its group, bytes), to show which runs inside a node and which across;
- grad_error: the largest gap between its gradients after one backward on this rank's
  own batch and the mean of the four ranks' gradients computed on plain unsharded models;
- bytes: this rank's bytes of weights, Adam moments and EMA, for the memory plan;
- weights_sha256: a hash of the full weights after one optimizer step (replicas agree);
- resumed_equal: the HSDP checkpoint loaded under plain FSDP (shard_degree 4) holds
  the same weights and Adam moments, and after an FSDP step and save, a fresh HSDP
  strategy loads those back equal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.numerics_check import fixed_batch

LEARNING_RATE = 1e-3
TRACED = {"all_gather_single": "all_gather", "reduce_scatter_single": "reduce_scatter", "all_reduce": "all_reduce"}


class CollectiveLog:
    """Wraps torch.distributed's collectives (FSDP2 calls them through the module) to record each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int], int]] = []
        self._originals = {}

    def __enter__(self) -> CollectiveLog:
        for attr, op in TRACED.items():
            original = getattr(dist, attr)
            self._originals[attr] = original

            def traced(*args, _op=op, _original=original, **kwargs):
                group = kwargs.get("group")
                tensor = kwargs.get("input", args[1] if _op != "all_reduce" and len(args) > 1 else args[0] if args else None)
                ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
                self.calls.append((_op, ranks, tensor.numel() * tensor.element_size() if tensor is not None else 0))
                return _original(*args, **kwargs)

            setattr(dist, attr, traced)
        return self

    def __exit__(self, *exc) -> None:
        for attr, original in self._originals.items():
            setattr(dist, attr, original)


def recipe_for(model_dir: Path, out_dir: Path, shard_degree: int | None):
    from sd35dist.config.recipe import Recipe

    return Recipe.model_validate({
        "name": "hsdp", "model": {"pretrained": str(model_dir)}, "data": {"cache_url": str(out_dir)},
        "parallel": {"strategy": "fsdp2", "shard_degree": shard_degree},
        "train": {"optimizer": "adamw", "mixed_precision": "fp32", "gradient_checkpointing": False,
                  "ema": {"enabled": True}},
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
    from sd35dist.parallel.fsdp2 import FSDP2Strategy
    from sd35dist.parallel.process_group import destroy, init_process_group_from_env

    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)

    world = init_process_group_from_env(timeout_s=300)
    try:
        hsdp = FSDP2Strategy(recipe_for(args.model_dir, args.out_dir, None), world)
        layout = {name: {"mesh": list(p.device_mesh.shape), "placements": [str(x) for x in p.placements],
                         "local": p.to_local().numel(), "full": p.numel()}
                  for name, p in hsdp.model.named_parameters()}

        with CollectiveLog() as log:
            hsdp.backward(loss_on(hsdp.forward, args.model_dir, hsdp.model.config, seed=world.rank))
        expected = mean_plain_gradients(args.model_dir, world.rank, world.world_size)
        grad_error = max(float((p.grad.full_tensor() - expected[name]).abs().max() / expected[name].abs().max().clamp(min=1e-12))
                         for name, p in hsdp.model.named_parameters())
        hsdp.step(LEARNING_RATE, 1.0)
        local_bytes = shard_bytes(hsdp)
        stepped = full_state(hsdp)
        digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in stepped.values())).hexdigest()

        hsdp_checkpoint, fsdp_checkpoint = args.out_dir / "hsdp-checkpoint", args.out_dir / "fsdp-checkpoint"
        hsdp.save(hsdp_checkpoint)
        fsdp = FSDP2Strategy(recipe_for(args.model_dir, args.out_dir, world.world_size), world)
        fsdp.load(hsdp_checkpoint)
        to_fsdp = states_equal(full_state(fsdp), stepped)
        fsdp.backward(loss_on(fsdp.forward, args.model_dir, fsdp.model.config, seed=10 + world.rank))
        fsdp.step(LEARNING_RATE, 1.0)
        fsdp.save(fsdp_checkpoint)
        again = FSDP2Strategy(recipe_for(args.model_dir, args.out_dir, None), world)
        again.load(fsdp_checkpoint)
        back = states_equal(full_state(again), full_state(fsdp))

        mine = {"layout": layout, "grad_error": grad_error, "weights_sha256": digest,
                "resumed_equal": {"hsdp_to_fsdp": to_fsdp, "fsdp_to_hsdp": back},
                "meshes": [describe(s) for s in (hsdp, fsdp, again)], "collectives": log.calls, "bytes": local_bytes,
                "node_rank": int(os.environ["GROUP_RANK"]), "local_world_size": world.local_world_size}
        gathered = [None] * world.world_size
        dist.all_gather_object(gathered, mine)
        if world.is_main:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            (args.out_dir / "result.json").write_text(json.dumps({"ranks": gathered}))
        dist.barrier()  # leave together (gloo aborts a rank whose peers have gone)
    finally:
        destroy()
    return 0


def shard_bytes(strategy) -> dict[str, int]:
    """Bytes this rank holds of the weights, the Adam moments and the EMA (what `sd35dist plan` predicts)."""
    def size(tensor) -> int:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return local.numel() * local.element_size()

    return {
        "weights": sum(size(p) for p in strategy.model.parameters()),
        "optimizer": sum(size(v) for state in strategy.optimizer.state.values() for k, v in state.items()
                         if k in ("exp_avg", "exp_avg_sq")),
        "ema": sum(size(t) for t in strategy.ema.shadow.values()),
        "tensors": sum(1 for _ in strategy.model.parameters()),
    }


def describe(strategy) -> list[int]:
    return list(strategy.mesh.shape)


if __name__ == "__main__":
    raise SystemExit(main())
