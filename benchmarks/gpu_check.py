"""The GPU check: in one run on one GPU, the diffusers-example loop against our step eager, compiled and
compiled + FP8, at SD3.5 Large width; img/s, MFU, peak GiB and `sd35dist plan`'s predicted peak for each.

    bash benchmarks/gpu_check.sh            # one H100/H200: SD3.5 Large width, 16 of its 38 blocks, 1024 px, batch 4
    bash benchmarks/gpu_check.sh --smoke    # the same code on CPU at tiny size (a test in make test)

Every loop trains SD3Transformer2DModel at SD3.5 Large's width (38 heads × 64 = 2432, joint 4096, pooled
2048, qk RMS norm) with `--depth` of its 38 blocks (the whole model with bf16 AdamW needs ~82 GiB: more
than one H100), random init in bf16 (speed depends on shapes, not weights), on the same synthetic batches
and the same SD3 flow-matching loss (benchmarks/train_step.py):
  diffusers   the diffusers SD3 example's loop: eager, its gradient checkpointing, torch AdamW (foreach)
              on pure bf16 weights and states;
  eager       our FSDP2Strategy on a one-rank group: per-block activation checkpointing, Kahan bf16 AdamW;
  compiled    the same with per-block torch.compile (dynamic shapes), as `compile_blocks: auto` does on CUDA;
  fp8         compiled + `fp8: tensorwise` (torchao float8; fp8 all-gather; first/last blocks bf16).
img/s = batch / median step time after warm-up (steps end with a device synchronize); MFU = model FLOPs
(sd35dist/config/model_flops.py, recomputation not counted) × img/s / the GPU's dense bf16 peak (also for
fp8, so it shows the gain); peak GiB = torch.cuda.max_memory_allocated over build and steps; plan GiB =
sd35dist/config/resource_plan.py's peak for the same workload (its 0.5 GiB CUDA-context reserve,
which max_memory_allocated does not see, taken off), and their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from bench_report import device_name, typed_command
from train_step import LARGE, build_model, our_loop, plain_loop, synthetic_steps

from sd35dist.config.mesh_layout import resolve_mesh
from sd35dist.config.model_flops import mfu, mmdit_train_flops_per_sample, peak_bf16_flops
from sd35dist.config.model_size import transformer_size
from sd35dist.config.recipe import Recipe
from sd35dist.config.resource_plan import GIB, RESERVE_GIB, Workload, memory_plan
from sd35dist.models import tiny_sd3
from sd35dist.parallel.fsdp2 import FSDP2Strategy
from sd35dist.parallel.process_group import World

LOOPS = ("diffusers", "eager", "compiled", "fp8")
SMOKE_LOOPS = ("diffusers", "eager", "fp8")
"""On CPU the compiled loop would repeat the fp8 loop's code at twice its compile time (a minute on 2 cores)."""
CLIP_TOKENS = 77
FULL = dict(depth=16, resolution=1024, max_sequence_length=256, batch=4, warmup=3, steps=8)
SMOKE = dict(depth=3, resolution=64, max_sequence_length=16, batch=2, warmup=1, steps=1)
DESCRIPTIONS = {
    "diffusers": "diffusers example loop (eager, its GC, foreach AdamW, pure bf16)",
    "eager": "ours eager (FSDP2, per-block AC, Kahan bf16 AdamW)",
    "compiled": "ours compiled (+ per-block torch.compile, dynamic shapes)",
    "fp8": "ours compiled + fp8 tensorwise (torchao)",
}


def shapes(args: argparse.Namespace) -> dict:
    base = dict(tiny_sd3.TRANSFORMER_SIZES, dual_attention_layers=()) if args.smoke else dict(LARGE)
    return {**base, "num_layers": args.depth}


def recipe_for(loop: str, compile_backend: str = "inductor") -> Recipe:
    """The recipe `sd35dist train` would run for one of our loops (paths unused)."""
    return Recipe(name="gpu-check", model={"pretrained": "unused"}, data={"cache_url": "unused"},
                  output={"dir": "unused"},
                  train={"optimizer": "adamw_bf16", "mixed_precision": "bf16", "gradient_checkpointing": True,
                         "compile_blocks": loop in ("compiled", "fp8"), "compile_backend": compile_backend,
                         "fp8": "tensorwise" if loop == "fp8" else "none"})


def planned_peak_gib(config: dict, loop: str, batch: int, tokens: int, on_gpu: bool) -> float:
    """resource_plan's predicted peak for the loop's workload on one GPU, less the CUDA-context reserve."""
    if loop == "diffusers":  # pure bf16 weights and moments, torch's foreach AdamW
        work = Workload(strategy="fsdp2", master_bytes=2, state_bytes=4, compute_bytes=2, optimizer_impl="foreach",
                        batch=batch, gradient_accumulation=1, tokens=tokens, activation_checkpointing=True, ema=False)
    else:  # adamw_bf16: bf16 masters, moments and Kahan buffer; optimi's per-parameter loop
        work = Workload(strategy="fsdp2", master_bytes=2, state_bytes=6, compute_bytes=2,
                        optimizer_impl="per_parameter", batch=batch, gradient_accumulation=1, tokens=tokens,
                        activation_checkpointing=True, ema=False, fp8="tensorwise" if loop == "fp8" else "none")
    one_gpu = resolve_mesh(strategy="fsdp2", shard_degree=None, nodes=1, procs_per_node=1)
    plan = memory_plan(transformer_size(config), dataclasses.replace(work), one_gpu)
    return plan.peak_gib - RESERVE_GIB if on_gpu else plan.peak_gib


def run_loop(loop: str, args: argparse.Namespace, world: World, config: dict) -> dict:
    """Build, warm up, time, free: img/s and peak GiB of one loop."""
    from torch._dynamo.utils import counters

    device = args.device
    counters.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(config, device)
    if loop == "diffusers":
        step = plain_loop(model, recipe_for("eager"), foreach=None)
    else:
        recipe = recipe_for(loop, args.compile_backend)
        strategy = FSDP2Strategy.from_model(model, recipe, world)
        step = our_loop(strategy, recipe)
    data = synthetic_steps(config, args.batch, args.resolution, CLIP_TOKENS + args.max_sequence_length,
                           args.warmup + args.steps, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds, losses = [], []
    started = time.perf_counter()
    try:
        for index, inputs in enumerate(data):
            begin = time.perf_counter()
            losses.append(step(inputs))
            sync()
            if index >= args.warmup:
                seconds.append(time.perf_counter() - begin)
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"{loop}: loss {losses[-1]} at step {index}")
    finally:
        del step, model, data
        gc.collect()
        torch._dynamo.reset()
    result = {"img_s": args.batch / statistics.median(seconds), "losses": losses,
              "wall_s": time.perf_counter() - started, "graphs": int(counters["stats"]["unique_graphs"]),
              "aot_graphs": int(counters["aot_autograd"]["total"])}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        torch.cuda.empty_cache()
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, aot_eager compile: proves the script")
    parser.add_argument("--device", help="default: cuda (cpu with --smoke)")
    parser.add_argument("--depth", type=int, help="transformer blocks (default 16 of SD3.5 Large's 38; 3 with --smoke)")
    parser.add_argument("--batch", type=int, help="samples per step (default 4; 2 with --smoke)")
    parser.add_argument("--resolution", type=int, help="square side in pixels (default 1024; 64 with --smoke)")
    parser.add_argument("--max-sequence-length", type=int, help="T5 tokens after the 77 CLIP ones (default 256)")
    parser.add_argument("--warmup", type=int, help="untimed steps per loop, compile included (default 3)")
    parser.add_argument("--steps", type=int, help="timed steps per loop (default 8)")
    parser.add_argument("--loops", help=f"comma-separated, from {', '.join(LOOPS)} (default all; with --smoke "
                        f"{','.join(SMOKE_LOOPS)}: compiled + fp8 runs the compiled loop's code and its bf16 blocks)")
    parser.add_argument("--compile-backend", choices=("inductor", "aot_eager", "eager"),
                        help="torch.compile backend (default inductor; aot_eager with --smoke)")
    args = parser.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.compile_backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    args.device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    args.loops = (args.loops or ",".join(SMOKE_LOOPS if args.smoke else LOOPS)).split(",")
    if not set(args.loops) <= set(LOOPS):
        parser.exit(2, f"error: --loops {','.join(args.loops)}: choose from {', '.join(LOOPS)}\n")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "error: no CUDA device visible: run on a GPU machine, or --smoke on CPU\n")
    if args.depth < 3:
        parser.exit(2, "error: --depth must be ≥ 3 (fp8 keeps the first and last blocks in bf16)\n")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import diffusers
    import torchao

    device = args.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1, device_id=device if device.type == "cuda" else None)
    world = World(0, 1, 0, 1, platform.node(), "nccl" if device.type == "cuda" else "gloo")
    config = shapes(args)
    image = (args.resolution // 8 // config["patch_size"]) ** 2
    tokens = image + CLIP_TOKENS + args.max_sequence_length
    flops = mmdit_train_flops_per_sample(config, args.resolution, args.resolution, CLIP_TOKENS + args.max_sequence_length)
    peak = peak_bf16_flops(device_name(device)) if device.type == "cuda" else None
    size = transformer_size(config)
    versions = (f"torch {torch.__version__}, diffusers {diffusers.__version__}, torchao {torchao.__version__}, "
                f"Python {platform.python_version()}")
    print(f"# GPU check {datetime.date.today()} on {device_name(device)}; {versions}")
    print(f"# {'tiny' if args.smoke else 'SD3.5 Large'} width {size.hidden_size}, {args.depth} blocks "
          f"({size.total / 1e9:.2f}e9 parameters), {args.resolution} px ({tokens} tokens), batch {args.batch}, "
          f"warm-up {args.warmup} + {args.steps} timed steps per loop, compile backend {args.compile_backend}; "
          f"{flops:.3g} model FLOPs per sample; `{typed_command()}`", flush=True)
    started = time.perf_counter()
    print("| loop | img/s | vs diffusers | MFU | peak GiB | plan GiB | measured / plan | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    results: dict[str, dict] = {}
    failed: list[str] = []
    try:
        for loop in args.loops:
            try:
                r = results[loop] = run_loop(loop, args, world, config)
            except Exception as error:  # noqa: BLE001 — one loop failing must not cost the others' figures
                failed.append(loop)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                reason = "OOM" if isinstance(error, torch.OutOfMemoryError) else f"failed: {type(error).__name__}"
                print(f"| {DESCRIPTIONS[loop]} | {reason} | | | | | | |", flush=True)
                traceback.print_exc()
                continue
            base = results.get("diffusers")
            planned = planned_peak_gib(config, loop, args.batch, tokens, device.type == "cuda")
            measured = r.get("peak_gib")
            cells = [f"{r['img_s']:.3g}", f"{r['img_s'] / base['img_s']:.2f}×" if base else "—",
                     "n/a" if peak is None else f"{mfu(flops, r['img_s'], peak):.1%}",
                     "n/a (cpu)" if measured is None else f"{measured:.1f}", f"{planned:.1f}",
                     "n/a" if measured is None else f"{measured / planned:.3f}", f"{r['wall_s']:.0f}"]
            print(f"| {DESCRIPTIONS[loop]} | {' | '.join(cells)} |", flush=True)
    finally:
        dist.destroy_process_group()
    compiled = [loop for loop in ("compiled", "fp8") if loop in results]
    if compiled:
        print("# graphs per loop (dynamo/AOT autograd): " + ", ".join(
            f"{loop} {results[loop]['graphs']}/{results[loop]['aot_graphs']}" for loop in compiled))
    if "eager" in results:
        for loop in ("compiled", "fp8"):
            if loop in results:
                last = results[loop]["losses"][-1], results["eager"]["losses"][-1]
                print(f"# {loop} vs eager, last loss: {last[0]:.4f} vs {last[1]:.4f}")
    print("# targets: compiled ≥ 1.45× and fp8 ≥ 1.8× the diffusers loop; peaks within 5 % of plan")
    print(f"# total {time.perf_counter() - started:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
