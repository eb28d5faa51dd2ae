"""Driver for the dist test of the FSDP2 transformer build; every rank runs it under torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node=2 \\
        -m tests.dist_transformer_check MODEL_DIR OUT_DIR

Loads the tiny SD3 transformer with `load_transformer` (fp32 parameters so results are
exact, activation checkpointing on), then writes from rank 0:

- OUT_DIR/result.json: the forward output on `fixed_inputs` (every rank runs the full
  batch), sha256 of every tensor of the gathered full state dict, the training loss;
- OUT_DIR/stepped.safetensors: the full state dict after one backward + SGD step in which
  rank r trained on sample r of the batch (real data parallelism: gradients are averaged).

The test replays both on one unsharded `from_pretrained` model and compares.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

SGD_LR = 0.5


def fixed_inputs(config: dict, batch: int = 2, seed: int = 1234) -> dict[str, torch.Tensor]:
    """A deterministic SD3 forward batch (fp32) plus a regression target, from the transformer config."""
    generator = torch.Generator().manual_seed(seed)
    side = 8  # latent pixels; 4×4 patches of size 2

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    return {
        "hidden_states": randn(batch, config["in_channels"], side, side),
        "encoder_hidden_states": randn(batch, 7, config["joint_attention_dim"]),
        "pooled_projections": randn(batch, config["pooled_projection_dim"]),
        "timestep": torch.tensor([250.0, 750.0][:batch]),
        "target": randn(batch, config["out_channels"], side, side),
    }


def forward(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    kwargs = {key: value for key, value in inputs.items() if key != "target"}
    return model(**kwargs, return_dict=False)[0]


def sgd_step(model, inputs: dict[str, torch.Tensor]) -> float:
    """One MSE backward + plain SGD step; returns the loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR)
    loss = F.mse_loss(forward(model, inputs), inputs["target"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def tensor_sha256(tensor: torch.Tensor) -> str:
    tensor = tensor.detach().cpu().contiguous()
    return hashlib.sha256(tensor.view(torch.uint8).numpy().tobytes()).hexdigest() + f":{tensor.dtype}:{tuple(tensor.shape)}"


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The gathered, unsharded state dict (on rank 0; empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file

    from sd35dist.models.transformer_build import transformer_config
    from sd35dist.parallel.fsdp2_sharding import load_transformer
    from sd35dist.parallel.process_group import destroy, init_process_group_from_env

    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)

    world = init_process_group_from_env(timeout_s=120)
    try:
        model = load_transformer(
            args.model_dir, world=world, param_dtype=torch.float32, reduce_dtype=torch.float32,
            activation_checkpointing=True,
        )
        inputs = fixed_inputs(transformer_config(args.model_dir))
        with torch.no_grad():
            output = forward(model, inputs)
        loaded = full_state_dict(model)

        mine = {key: value[world.rank : world.rank + 1] for key, value in inputs.items()}
        loss = sgd_step(model, mine)
        losses = [None] * world.world_size
        torch.distributed.all_gather_object(losses, loss)
        stepped = full_state_dict(model)

        if world.is_main:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            save_file({key: value.contiguous() for key, value in stepped.items()}, args.out_dir / "stepped.safetensors")
            result = {
                "world_size": world.world_size,
                "output": output.tolist(),
                "state_sha256": {key: tensor_sha256(value) for key, value in loaded.items()},
                "sharded_params": sum(type(p).__name__ == "DTensor" for p in model.parameters()),
                "losses": losses,
            }
            (args.out_dir / "result.json").write_text(json.dumps(result))
        # gloo aborts ("terminate called without an active exception") when one rank tears
        # its group down while the other still works: leave together.
        torch.distributed.barrier()
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
