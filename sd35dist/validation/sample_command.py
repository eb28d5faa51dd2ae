"""`sd35dist sample SOURCE --prompt P [--seed N …] --out DIR`: images from a checkpoint, an export or the
base model, with the sampler validation uses (CFG or APG): in one process, or under torchrun, where
every rank loads the transformer, renders its share of the images and rank 0 writes them.

Ad-hoc prompts need the text encoders: they are loaded from the base model directory (the
checkpoint's recipe names it, or --model does). Without --prompt/--prompts-file the recipe's
validation prompts are taken from the cache, as training renders them.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from sd35dist.config.cli_args import (
    CommandLineParser,
    bounded_float,
    bounded_int,
    fail,
    finite_float,
    fraction,
    image_side,
    non_negative_float,
    positive_int,
    seed,
)
from sd35dist.config.input_checks import size_problem
from sd35dist.config.validation_section import PromptsFileError, read_prompts_file
from sd35dist.data.validation_prompts import PromptEmbeddings, encode_validation_prompts
from sd35dist.validation.during_training import save_round
from sd35dist.validation.guidance import GuidanceSettings
from sd35dist.validation.render import Renderer, launched_ranks, validation_pairs
from sd35dist.validation.sampler import SampleSettings, latent_shape_of
from sd35dist.validation.sources import (
    SourceError,
    base_model_of,
    check_base_model,
    check_has_ema,
    load_transformer,
    source_config,
    vae_scale_of,
)


def guidance_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampler's options, with the bounds of the recipe's validation section (config/validation_section.py)."""
    parser.add_argument("--steps", type=positive_int, default=28, help="inference steps (default 28)")
    parser.add_argument("--guidance", choices=("cfg", "apg"), default="cfg")
    parser.add_argument("--scale", type=bounded_float(1.0, what="a guidance scale"), default=4.0,
                        help="guidance scale, ≥ 1 (default 4.0)")
    parser.add_argument("--apg-eta", type=non_negative_float, default=0.0)
    parser.add_argument("--apg-momentum", type=finite_float, default=-0.5)
    parser.add_argument("--apg-norm-threshold", type=non_negative_float, default=15.0)


def skip_layer_arguments(parser: argparse.ArgumentParser, default_help: str) -> None:
    parser.add_argument("--skip-layers", type=layer_list, metavar="N,N,…",
                        help=f"skip-layer guidance: blocks left out of a third forward, e.g. 7,8,9 ({default_help})")
    parser.add_argument("--skip-scale", type=non_negative_float, default=2.8, help="skip-layer guidance scale (default 2.8)")
    parser.add_argument("--skip-start", type=fraction, default=0.01, help="fraction of the steps it starts after (0.01)")
    parser.add_argument("--skip-stop", type=fraction, default=0.2, help="fraction of the steps it stops before (0.2)")


def layer_list(text: str) -> tuple[int, ...]:
    """`7,8,9` → (7, 8, 9); `none` → () (no skip-layer guidance)."""
    if text.strip().lower() == "none":
        return ()
    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected block numbers such as 7,8,9, or none") from None
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected block numbers (0 or more) such as 7,8,9, or none")
    return layers


def skip_layers_of(args: argparse.Namespace) -> dict:
    """GuidanceSettings' skip-layer fields from the flags ({} when --skip-layers is not given)."""
    if args.skip_layers is None:
        return {}
    return {"skip_layers": args.skip_layers, "skip_scale": args.skip_scale, "skip_start": args.skip_start,
            "skip_stop": args.skip_stop}


def guidance_of(args: argparse.Namespace, kind: str | None = None) -> GuidanceSettings:
    return GuidanceSettings(kind=kind or args.guidance, scale=args.scale, eta=args.apg_eta,
                            momentum=args.apg_momentum, norm_threshold=args.apg_norm_threshold, **skip_layers_of(args))


def inference_device(world) -> torch.device:  # world: a World, or None in one process
    """This rank's GPU under torchrun, the GPU in one process, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(world.device) if world is not None else torch.device("cuda")


def renderer_for(model: torch.nn.Module, base_model: Path, device: torch.device, world=None) -> Renderer:
    """A renderer of `model` with the base model's VAE and scheduler; under torchrun (`world`) this rank's share."""
    from sd35dist.models.sd3_components import load_vae

    vae = load_vae(base_model, device, torch.float32)
    config = json.loads((base_model / "scheduler" / "scheduler_config.json").read_text())
    model.to(device)
    dtype = next(model.parameters()).dtype

    def forward(**inputs: torch.Tensor) -> torch.Tensor:
        # As the pipeline: inputs in the transformer's dtype, the timestep as given.
        cast = {k: v.to(dtype) if torch.is_tensor(v) and k != "timestep" and v.is_floating_point() else v
                for k, v in inputs.items()}
        return model(**cast, return_dict=False)[0]

    rank, world_size = (world.rank, world.world_size) if world is not None else (0, 1)
    return Renderer(forward=forward, vae=vae, scheduler_config=config, latent_shape=latent_shape_of(model.config, vae),
                    device=device, rank=rank, world_size=world_size)


def argument_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="sd35dist sample", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("source", type=Path,
                        help="a checkpoint, an output dir (its latest), an export dir or the base model")
    parser.add_argument("--model", type=Path,
                        help="base model directory (VAE, text encoders); default: the checkpoint's recipe")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for more)")
    parser.add_argument("--prompts-file", type=Path, help="one prompt per line (UTF-8)")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--seed", type=seed, action="append", help="a seed, 0 … 2^64-1 (repeat for more; default 0)")
    parser.add_argument("--width", type=image_side, default=1024, help="a multiple of 16 the model's position embedding covers")
    parser.add_argument("--height", type=image_side, default=1024)
    parser.add_argument("--max-sequence-length", type=bounded_int(1, 512, what="a T5 token count"),
                        help="T5 tokens, 1 … 512 (default: the checkpoint's recipe, else 256)")
    parser.add_argument("--ema", action="store_true", help="a checkpoint's EMA weights")
    parser.add_argument("--out", type=Path, required=True, help="directory for the images and grid.png")
    parser.add_argument("--force", action="store_true", help="let --out replace an earlier sample's images")
    guidance_arguments(parser)
    skip_layer_arguments(parser, "default: none")
    return parser


def earlier_grid(out: Path, force: bool) -> str | None:
    """Why `--out` may not be written: an earlier sample's or sweep's grid.png that only --force replaces."""
    if (out / "grid.png").exists() and not force:
        return f"--out {out}: holds an earlier grid.png: pass --force to replace it, or choose another --out"
    return None


def main(argv: list[str]) -> int:
    args = argument_parser().parse_args(argv)
    prompts = list(args.prompt)
    try:
        if args.prompts_file:
            try:
                prompts += read_prompts_file(args.prompts_file)
            except PromptsFileError as err:
                raise SourceError(f"--prompts-file: {err}") from None
        if not prompts:
            raise SourceError("give --prompt or --prompts-file")
        if args.skip_layers and args.scale == 1.0:
            raise SourceError("--skip-layers needs --scale above 1: skip-layer guidance acts only with classifier-free "
                              "guidance")
        if args.skip_start >= args.skip_stop:
            raise SourceError(f"--skip-start {args.skip_start:g} must be below --skip-stop {args.skip_stop:g}")
        check_out_dir(args.out)
        problem = earlier_grid(args.out, args.force)
        if problem:
            raise SourceError(problem)
        # Everything the render needs, checked before a weight is read or an image allocated.
        config = source_config(args.source)
        blocks = int(config.get("num_layers") or 0)
        if args.skip_layers and blocks and max(args.skip_layers) >= blocks:
            raise SourceError(f"--skip-layers {','.join(map(str, args.skip_layers))}: {args.source} has blocks "
                              f"0–{blocks - 1}")
        if args.ema:
            check_has_ema(args.source)
        base = args.model or base_model_of(args.source)
        if base is None:
            raise SourceError(f"{args.source} does not say which base model it belongs to: add --model DIR")
        check_base_model(base, "--model" if args.model else "the checkpoint's model.pretrained")
        problem = size_problem(args.width, args.height, config, vae_scale_of(base))
        if problem:
            raise SourceError(f"--width/--height {problem}")
    except SourceError as err:
        return fail(str(err))
    with launched_ranks() as world:
        return _sample(args, prompts, base, world)


def check_out_dir(out: Path) -> None:
    """The output directory is one (or can be made): not a file, not under a file, writable."""
    for candidate in (out, *out.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise SourceError(f"--out {out}: {candidate} is a file: name a directory")
            if not os.access(candidate, os.W_OK):
                raise SourceError(f"--out {out}: {candidate} is not writable: choose another directory")
            return


def _sample(args: argparse.Namespace, prompts: list[str], base: Path, world) -> int:
    device = inference_device(world)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        loaded = load_transformer(args.source, use_ema=args.ema, dtype=dtype)
    except (SourceError, ValueError, FileNotFoundError) as err:
        return fail(str(err))
    length = args.max_sequence_length or (loaded.recipe.data.max_sequence_length if loaded.recipe else 256)
    embeddings = _encode(base, prompts, args.negative_prompt, length, device)
    renderer = renderer_for(loaded.model, base, device, world)
    pairs = validation_pairs(len(prompts), args.seed or [0], [(args.width, args.height)])
    images = renderer.render(pairs, embeddings, SampleSettings(steps=args.steps, guidance=guidance_of(args)))
    if world is not None and world.rank != 0:
        return 0
    slg = f" + SLG {','.join(map(str, args.skip_layers))}" if args.skip_layers else ""
    title = f"{loaded.label} · {args.guidance} {args.scale:g}{slg} · {args.steps} steps"
    grid = save_round(args.out, images, pairs, embeddings.prompts, ["sample"], title)
    print(f"{len(images)} images from {loaded.label} in {args.out} (grid {grid})")
    return 0


def _encode(base: Path, prompts: list[str], negative: str, length: int, device: torch.device) -> PromptEmbeddings:
    from sd35dist.models.sd3_components import load_text_encoders

    text = load_text_encoders(base, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    embeddings = encode_validation_prompts(text, prompts, negative, length)
    del text  # T5-XXL is 4.7 B parameters: free it before the transformer runs
    return embeddings
