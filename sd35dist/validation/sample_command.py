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
import sys
from pathlib import Path

import torch

from sd35dist.data.validation_prompts import PromptEmbeddings, encode_validation_prompts
from sd35dist.validation.during_training import save_round
from sd35dist.validation.guidance import GuidanceSettings
from sd35dist.validation.render import Renderer, launched_ranks, validation_pairs
from sd35dist.validation.sampler import SampleSettings, latent_shape_of
from sd35dist.validation.sources import SourceError, load_transformer


def guidance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=28, help="inference steps (default 28)")
    parser.add_argument("--guidance", choices=("cfg", "apg"), default="cfg")
    parser.add_argument("--scale", type=float, default=4.0, help="guidance scale (default 4.0)")
    parser.add_argument("--apg-eta", type=float, default=0.0)
    parser.add_argument("--apg-momentum", type=float, default=-0.5)
    parser.add_argument("--apg-norm-threshold", type=float, default=15.0)


def skip_layer_arguments(parser: argparse.ArgumentParser, default_help: str) -> None:
    parser.add_argument("--skip-layers", type=layer_list, metavar="N,N,…",
                        help=f"skip-layer guidance: blocks left out of a third forward, e.g. 7,8,9 ({default_help})")
    parser.add_argument("--skip-scale", type=float, default=2.8, help="skip-layer guidance scale (default 2.8)")
    parser.add_argument("--skip-start", type=float, default=0.01, help="fraction of the steps it starts after (0.01)")
    parser.add_argument("--skip-stop", type=float, default=0.2, help="fraction of the steps it stops before (0.2)")


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd35dist sample", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("source", type=Path,
                        help="a checkpoint, an output dir (its latest), an export dir or the base model")
    parser.add_argument("--model", type=Path,
                        help="base model directory (VAE, text encoders); default: the checkpoint's recipe")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for more)")
    parser.add_argument("--prompts-file", type=Path, help="one prompt per line")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--seed", type=int, action="append", help="a seed (repeat for more; default 0)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--max-sequence-length", type=int, help="T5 tokens (default: the checkpoint's recipe, else 256)")
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
    args = _parser().parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        print("error: give --prompt or --prompts-file", file=sys.stderr)
        return 2
    problem = earlier_grid(args.out, args.force)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.skip_layers and args.scale == 1.0:
        print("error: --skip-layers needs --scale above 1: skip-layer guidance acts only with classifier-free "
              "guidance", file=sys.stderr)
        return 2
    if args.width % 16 or args.height % 16:
        print(f"error: --width/--height {args.width}x{args.height}: multiples of 16 needed", file=sys.stderr)
        return 2
    with launched_ranks() as world:
        return _sample(args, prompts, world)


def _sample(args: argparse.Namespace, prompts: list[str], world) -> int:
    device = inference_device(world)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        loaded = load_transformer(args.source, use_ema=args.ema, dtype=dtype)
    except (SourceError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    blocks = int(loaded.model.config.num_layers)
    if args.skip_layers and max(args.skip_layers) >= blocks:
        print(f"error: --skip-layers {','.join(map(str, args.skip_layers))}: {loaded.label} has blocks 0–{blocks - 1}",
              file=sys.stderr)
        return 2
    base = args.model or loaded.base_model
    if base is None:
        print(f"error: {args.source} does not say which base model it belongs to: add --model DIR", file=sys.stderr)
        return 2
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
