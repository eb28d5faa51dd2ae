"""Driver for the numerics tests; every rank runs it under torchrun (gloo on CPU).

    python -m torch.distributed.run --standalone --nproc-per-node=2 \\
        -m tests.numerics_check MODE MODEL_DIR OUT_DIR [STRATEGY]

Modes, each through the real `make_strategy` path (FSDP2 or ZeRO on the recipe's dtypes):

- timestep: one forward in bf16 compute; records what `time_text_embed.time_proj` receives
  next to the fp32 timesteps sampled from the model's schedule.
- train: STEPS optimizer steps at lr 5e-5 in bf16 compute, rank r on its own fixed batch;
  records the losses and (rank 0) the final weights, for `optimizer` adamw or adamw_bf16.

Rank 0 writes OUT_DIR/result.json (and OUT_DIR/weights.safetensors for train). `--optimizer` given
more than once trains each in turn in the same process group (one start-up), each from the same
weights, into OUT_DIR/OPTIMIZER/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

LEARNING_RATE = 5e-5
BATCH = 2
LATENT_SIDE = 8
TEXT_TOKENS = 7


def run_check(mode: str, model_dir: Path, out: Path, *args: str) -> dict:
    """This driver in MODE on 2 gloo ranks (DeepSpeed on its CPU accelerator); rank 0's result.json."""
    from tests.rank_runs import run_driver

    run_driver("tests.numerics_check", mode, str(model_dir), str(out), *args, timeout=600)
    return json.loads((out / "result.json").read_text())


def recipe_for(model_dir: Path, out_dir: Path, strategy: str, optimizer: str):
    from sd35dist.config.recipe import Recipe

    return Recipe.model_validate({
        "name": "numerics", "seed": 0, "model": {"pretrained": str(model_dir)}, "data": {"cache_url": str(out_dir)},
        "parallel": {"strategy": strategy},
        "train": {"optimizer": optimizer, "mixed_precision": "bf16", "learning_rate": LEARNING_RATE,
                  "gradient_checkpointing": False, "max_grad_norm": 1.0},
        "logging": {"report_to": "none"}, "output": {"dir": str(out_dir / "output")},
    })


def sampled_timesteps(model_dir: Path, generator: torch.Generator) -> torch.Tensor:
    """fp32 timesteps drawn as the trainer draws them (logit-normal over the shifted schedule)."""
    from sd35dist.trainer.flow_matching import FlowMatchSchedule, sample_timestep_indices

    config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    schedule = FlowMatchSchedule.from_scheduler_config(config)
    indices = sample_timestep_indices("logit_normal", BATCH, generator, logit_mean=0.0, logit_std=1.0,
                                      mode_scale=1.29, num_train_timesteps=schedule.num_train_timesteps)
    return schedule.timesteps_at(indices)


def fixed_batch(model_dir: Path, config, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(fp32 transformer inputs, target) for one rank, the same on every call with the same seed."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    inputs = {
        "hidden_states": randn(BATCH, config.in_channels, LATENT_SIDE, LATENT_SIDE),
        "encoder_hidden_states": randn(BATCH, TEXT_TOKENS, config.joint_attention_dim),
        "pooled_projections": randn(BATCH, config.pooled_projection_dim),
        "timestep": sampled_timesteps(model_dir, generator),
    }
    return inputs, randn(BATCH, config.out_channels, LATENT_SIDE, LATENT_SIDE)


def check_timestep(strategy, model_dir: Path, rank: int) -> dict:
    received: list[torch.Tensor] = []
    module = strategy.model.get_submodule("time_text_embed.time_proj")
    handle = module.register_forward_pre_hook(lambda _module, args: received.append(args[0].detach().clone()))
    inputs, _ = fixed_batch(model_dir, strategy.model.config, seed=100 + rank)
    with torch.no_grad():
        strategy.forward(**{k: v.to(strategy.world.device) for k, v in inputs.items()})
    handle.remove()
    return {"sent": inputs["timestep"].tolist(), "received": received[0].float().tolist(),
            "received_dtype": str(received[0].dtype)}


def train(strategy, model_dir: Path, rank: int, steps: int) -> dict:
    batches = [fixed_batch(model_dir, strategy.model.config, seed=1000 * rank + i) for i in range(2)]
    losses = []
    for step in range(steps):
        inputs, target = batches[step % len(batches)]
        pred = strategy.forward(**{k: v.to(strategy.world.device) for k, v in inputs.items()})
        loss = F.mse_loss(pred.float(), target)
        strategy.backward(loss)
        strategy.step(LEARNING_RATE, 1.0)
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(total.item() / torch.distributed.get_world_size())
    return {"losses": losses}


def main(argv: list[str] | None = None) -> int:
    from sd35dist.parallel.process_group import destroy, init_process_group_from_env
    from sd35dist.parallel.strategy import make_strategy

    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("timestep", "train"))
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--strategy", default="fsdp2")
    parser.add_argument("--optimizer", action="append", help="adamw (the default) or adamw_bf16; repeatable")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    optimizers = args.optimizer or ["adamw"]

    world = init_process_group_from_env(timeout_s=300)
    try:
        for optimizer in optimizers:
            out_dir = args.out_dir if len(optimizers) == 1 else args.out_dir / optimizer
            torch.manual_seed(0)
            strategy = make_strategy(recipe_for(args.model_dir, out_dir, args.strategy, optimizer), world)
            if args.mode == "timestep":
                result = check_timestep(strategy, args.model_dir, world.rank)
            else:
                result = train(strategy, args.model_dir, world.rank, args.steps)
            gathered = [None] * world.world_size
            torch.distributed.all_gather_object(gathered, result)
            weights = strategy.full_state_dict() if args.mode == "train" else {}
            if world.is_main:
                from safetensors.torch import save_file

                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / "result.json").write_text(json.dumps({"ranks": gathered}))
                if weights:
                    save_file({k: v.float().contiguous() for k, v in weights.items()}, out_dir / "weights.safetensors")
            del strategy, weights
            # gloo aborts when one rank tears its group down while another still works: leave together.
            torch.distributed.barrier()
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
