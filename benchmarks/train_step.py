"""One GPU, SD3.5 Large shapes: our trainer's step vs a plain diffusers-example-style loop, in one run.

    .venv/bin/python benchmarks/train_step.py --compile                  # SD3.5 Large, 1024 px, batch 4, cuda
    .venv/bin/python benchmarks/train_step.py --size tiny --device cpu    # tiny_sd3 shapes on CPU: a proof
    .venv/bin/python benchmarks/train_step.py --compile --lora 256       # the same with a rank-256 LoRA (recipes/sd35l-lora-fsdp2.yaml)

Both loops train the same model (SD3Transformer2DModel at random init, built directly on the device
in bf16: throughput depends on shapes, not weights) on the same synthetic batches (latents
16×H/8×W/8, prompt embeddings (77 + T5 length)×4096, pooled 2048; per step fresh noise and
logit-normal timesteps) with the same SD3 flow-matching loss (sd35dist.trainer.flow_matching):
  plain  the diffusers SD3 example's loop: eager, model.enable_gradient_checkpointing(), bf16 inputs,
         loss.backward(), clip_grad_norm_, torch.optim.AdamW with torch's default implementation (not
         fused), pure bf16 weights and states (fp32 master weights + AdamW for 8B parameters do not fit 80 GB);
  ours   the trainer's FSDP2Strategy (from_model) forward/backward/step on a 1-process group: FSDP2 with
         bf16 parameters ("adamw_bf16"), per-block activation checkpointing, per-block torch.compile with
         --compile, fused AdamW on CUDA; fp32 inputs cast by FSDP's mixed-precision policy, as in training.
Per loop: warm-up steps, then timed steps, each ended by a device synchronize. img/s = batch / median
step time; MFU from sd35dist.config.model_flops (3× forward FLOPs, recomputation not counted) over the GPU's
dense bf16 peak; peak GiB = torch.cuda.max_memory_allocated over build and steps. Prints markdown rows
for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))  # run from a checkout without installing

from bench_report import device_name, typed_command

from sd35dist.config.model_flops import mfu, mmdit_train_flops_per_sample, peak_bf16_flops
from sd35dist.config.recipe import Recipe
from sd35dist.models import tiny_sd3
from sd35dist.models.lora import inject_lora
from sd35dist.parallel.fsdp2 import FSDP2Strategy
from sd35dist.parallel.process_group import World
from sd35dist.trainer.flow_matching import (
    FlowMatchSchedule,
    flow_matching_loss_sum_and_count,
    loss_weighting,
    noisy_input_and_target,
    sample_timestep_indices,
)

CLIP_TOKENS = 77
# stabilityai/stable-diffusion-3.5-large transformer/config.json (about 8.06e9 parameters).
LARGE = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm",
)
SHAPES = {"large": LARGE, "tiny": tiny_sd3.TRANSFORMER_SIZES}
DEFAULTS = {
    "large": dict(resolution=1024, max_sequence_length=256, warmup=3, steps=10),
    "tiny": dict(resolution=64, max_sequence_length=16, warmup=2, steps=5),
}
SCHEDULE = FlowMatchSchedule.build(1000, shift=3.0)  # SD3.5 Large's scheduler_config.json


def bench_recipe(compile_blocks: bool, lora_rank: int | None = None) -> Recipe:
    """The recipe `sd35dist train` would run: pure bf16 AdamW, bf16 compute, per-block AC; paths unused.
    With `lora_rank`: recipes/sd35l-lora-fsdp2.yaml's LoRA (attention, alpha = rank), AdamW on fp32 adapters."""
    lora = None if lora_rank is None else {"rank": lora_rank, "alpha": lora_rank, "targets": "attention"}
    return Recipe(name="bench", model={"pretrained": "unused"}, data={"cache_url": "unused"},
                  output={"dir": "unused"},
                  train={"optimizer": "adamw_bf16" if lora is None else "adamw", "mixed_precision": "bf16",
                         "gradient_checkpointing": True, "compile_blocks": compile_blocks, "lora": lora})


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(config: dict, device: torch.device) -> torch.nn.Module:
    """SD3Transformer2DModel at random init, allocated in bf16 on `device` (never a full CPU or fp32 copy)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    with torch.device(device), default_dtype(torch.bfloat16):
        model = SD3Transformer2DModel(**config)
    # PatchEmbed makes its pos_embed buffer float32 explicitly; the trainer keeps the whole model in one dtype.
    # nn.Module.to, not ModelMixin.to: the latter warns on every dtype cast.
    return torch.nn.Module.to(model, torch.bfloat16).train()


def synthetic_steps(config: dict, batch: int, resolution: int, tokens: int, count: int,
                    device: torch.device) -> list[dict[str, torch.Tensor]]:
    """`count` steps of fp32 inputs on `device`: fixed latents and embeddings, fresh noise and timesteps per step."""
    generator = torch.Generator().manual_seed(1234)
    side = resolution // 8
    x0 = torch.randn((batch, config["in_channels"], side, side), generator=generator)
    prompt = torch.randn((batch, tokens, config["joint_attention_dim"]), generator=generator).to(device)
    pooled = torch.randn((batch, config["pooled_projection_dim"]), generator=generator).to(device)
    steps = []
    for _ in range(count):
        noise = torch.randn(x0.shape, generator=generator)
        indices = sample_timestep_indices("logit_normal", batch, generator, logit_mean=0.0, logit_std=1.0,
                                          mode_scale=1.29)
        sigmas = SCHEDULE.sigmas_at(indices, ndim=x0.ndim)
        noisy, target = noisy_input_and_target(x0, noise, sigmas)
        steps.append({"hidden_states": noisy.to(device), "timestep": SCHEDULE.timesteps_at(indices).to(device),
                      "encoder_hidden_states": prompt, "pooled_projections": pooled, "target": target.to(device),
                      "weighting": loss_weighting("logit_normal", sigmas).to(device)})
    return steps


def plain_loop(model: torch.nn.Module, recipe: Recipe, foreach: bool | None) -> Callable[[dict], float]:
    """One step of the diffusers SD3 example, bf16 weights, no accelerate wrapper (one GPU, nothing to sync)."""
    train = recipe.train
    model.enable_gradient_checkpointing()
    trained = [p for p in model.parameters() if p.requires_grad]  # all, or the LoRA adapters
    optimizer = torch.optim.AdamW(trained, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                                  weight_decay=train.adam_weight_decay, eps=train.adam_epsilon, foreach=foreach)

    def step(data: dict) -> float:
        pred = model(hidden_states=data["hidden_states"].bfloat16(), timestep=data["timestep"],
                     encoder_hidden_states=data["encoder_hidden_states"].bfloat16(),
                     pooled_projections=data["pooled_projections"].bfloat16(), return_dict=False)[0]
        loss_sum, count = flow_matching_loss_sum_and_count(pred.float(), data["target"], data["weighting"])
        loss = loss_sum / count  # the example's loss.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach().item()

    return step


def our_loop(strategy: FSDP2Strategy, recipe: Recipe) -> Callable[[dict], float]:
    """One step as Trainer.train_step does it (one micro-step, one rank): count, forward, loss, backward, step."""
    train = recipe.train
    device = strategy.world.device

    def step(data: dict) -> float:
        batch = data["hidden_states"].shape[0]
        count = torch.tensor(float(batch), device=device)
        dist.all_reduce(count)
        inputs = {k: data[k] for k in ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")}
        pred = strategy.forward(**inputs)
        part_sum, _ = flow_matching_loss_sum_and_count(pred.float(), data["target"], data["weighting"])
        strategy.backward(part_sum * strategy.world.world_size / count)
        strategy.step(train.learning_rate, train.max_grad_norm)
        totals = torch.stack([part_sum.detach(), count])
        dist.all_reduce(totals)
        return float(totals[0] / totals[1])

    return step


def time_steps(step: Callable[[dict], float], data: list[dict], warmup: int, device: torch.device) -> list[float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = []
    for index, inputs in enumerate(data):
        start = time.perf_counter()
        loss = step(inputs)
        sync()
        if index >= warmup:
            seconds.append(time.perf_counter() - start)
        if math.isnan(loss):
            raise FloatingPointError(f"loss is NaN at step {index}")
    return seconds


def measure(loop: str, args: argparse.Namespace, world: World, batch: int) -> dict:
    """Build the model, run warm-up + timed steps of `loop`, free everything; img/s and peak memory."""
    config, device = SHAPES[args.size], args.device
    tokens = CLIP_TOKENS + args.max_sequence_length
    recipe = bench_recipe(args.compile, args.lora)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(config, device)
    # LoRA: peft adapters (fp32, peft's init) on the frozen bf16 base, for both loops.
    inject_lora(model, recipe.train.lora, dtype=torch.float32)
    if loop == "plain":
        step = plain_loop(model, recipe, foreach=False if args.plain_no_foreach else None)
    else:
        step = our_loop(FSDP2Strategy.from_model(model, recipe, world), recipe)
    data = synthetic_steps(config, batch, args.resolution, tokens, args.warmup + args.steps, device)
    try:
        seconds = time_steps(step, data, args.warmup, device)
    finally:
        del step, model, data
        gc.collect()
        torch._dynamo.reset()
    result = {"img_s": batch / statistics.median(seconds)}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.empty_cache()
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="large", help="transformer shapes (default large)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="4", help="comma-separated samples per step (default 4)")
    parser.add_argument("--resolution", type=int, help="square image side in pixels (default 1024 large, 64 tiny)")
    parser.add_argument("--max-sequence-length", type=int, help="T5 tokens after the 77 CLIP ones (default 256 large, 16 tiny)")
    parser.add_argument("--warmup", type=int, help="untimed steps per loop (default 3 large, 2 tiny)")
    parser.add_argument("--steps", type=int, help="timed steps per loop (default 10 large, 5 tiny)")
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile each transformer block")
    parser.add_argument("--loops", default="plain,ours", help="which loops to run, comma-separated (default plain,ours)")
    parser.add_argument("--lora", type=int, metavar="RANK",
                        help="train a LoRA of this rank (attention, alpha = rank) instead of the full model")
    parser.add_argument("--plain-no-foreach", action="store_true",
                        help="plain: per-tensor AdamW (foreach=False), when the default one's temporaries do not fit")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.exit(2, f"error: --batch-sizes {args.batch_sizes!r}: give comma-separated integers, e.g. 1,4,8\n")
    args.loops = args.loops.split(",")
    if not set(args.loops) <= {"plain", "ours"}:
        parser.exit(2, f"error: --loops {','.join(args.loops)}: choose from plain, ours\n")
    if min(args.batch_sizes) < 1 or args.steps < 1 or args.warmup < 0:
        parser.exit(2, "error: batch sizes and --steps must be >= 1, --warmup >= 0\n")
    patch = SHAPES[args.size]["patch_size"]
    if args.resolution % (8 * patch):
        parser.exit(2, f"error: --resolution {args.resolution}: must be a multiple of {8 * patch} (VAE 8x, patch {patch})\n")
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "error: --device cuda: no CUDA device visible; use --device cpu\n")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import diffusers

    command = typed_command()
    device = args.device
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # A one-process group on an in-memory store, as `sd35dist train` makes without torchrun.
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)
    world = World(0, 1, 0, 1, platform.node(), backend)
    config = SHAPES[args.size]
    tokens = CLIP_TOKENS + args.max_sequence_length
    flops = mmdit_train_flops_per_sample(config, args.resolution, args.resolution, tokens)
    peak = peak_bf16_flops(device_name(device)) if device.type == "cuda" else None
    versions = f"torch {torch.__version__}, diffusers {diffusers.__version__}"
    print(f"# {args.size} shapes on {device_name(device)}; {args.resolution} px, {tokens} text tokens; "
          f"{flops:.3g} model FLOPs per trained sample; peak bf16 {'unknown' if peak is None else f'{peak:.3g}'}; "
          f"warm-up {args.warmup}, timed {args.steps}; ours compile {'on' if args.compile else 'off'}; {versions}")
    print("| date | device | versions | shapes | px | batch | loop | img/s | model TFLOP/s | MFU | peak GiB | command |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    names = {"plain": "plain (eager, diffusers GC, AdamW bf16)",
             "ours": f"ours (FSDP2 1 rank, AC{', per-block compile' if args.compile else ''}, "
                     f"{'fused ' if device.type == 'cuda' else ''}AdamW bf16)"}
    if args.lora:
        names = {loop: f"{name.replace('AdamW bf16', 'AdamW fp32 adapters')}, LoRA r{args.lora}"
                 for loop, name in names.items()}
    try:
        for batch in args.batch_sizes:
            for loop in args.loops:
                try:
                    r = measure(loop, args, world, batch)
                    cells = [f"{r['img_s']:.3g}", f"{flops * r['img_s'] / 1e12:.3g}",
                             "n/a" if peak is None else f"{100 * mfu(flops, r['img_s'], peak):.1f}%",
                             f"{r['peak_gib']:.1f}" if "peak_gib" in r else "n/a (cpu)"]
                except torch.OutOfMemoryError:
                    gc.collect()
                    torch.cuda.empty_cache()
                    cells = ["OOM", "", "", "OOM"]
                print(f"| {datetime.date.today()} | {device_name(device)} | {versions} | {args.size} "
                      f"| {args.resolution} | {batch} | {names[loop]} | {' | '.join(cells)} | `{command}` |", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
