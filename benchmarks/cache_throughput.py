"""Cache-building throughput, images/s per GPU, with SD3.5 Large-shaped encoders at random init.

    .venv/bin/python benchmarks/cache_throughput.py                      # SD3.5 Large shapes, 1024 px, cuda if present
    .venv/bin/python benchmarks/cache_throughput.py --size tiny --device cpu   # tiny_sd3 shapes, 64 px: a CPU proof

For each batch size, after warm-up iterations, each figure is batch size / median seconds of a timed iteration of:
  vae       encode_images(vae, pixels) on pixels already on the device (fp32 VAE, as `sd35dist cache`);
  text      encode_prompts(...) through CLIP-L, CLIP-G and T5 (bf16 on cuda, fp32 on cpu, as `sd35dist cache`);
  combined  Encoders.encode(...) -- host->device pixels, VAE, the three text encoders, per-sample copies
            back to the host -- then encode_shard(..., "bf16") into memory: one batch of `sd35dist cache`
            minus reading/decoding/resizing images and writing shards to storage.
Token ids are random and full length (77 for CLIP, --max-sequence-length for T5): a stand-in tokenizer
feeds the project's own encode_prompts, so tokenization is not timed. Weights are random: throughput
depends on shapes, not values. Prints markdown rows to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))  # run from a checkout without installing

from bench_report import device_name, typed_command

from sd35dist.data.buckets import FitPlan, bucket_name
from sd35dist.data.cache_builder import Encoders, WorkItem
from sd35dist.data.image_source import PreparedImage, SourceImage
from sd35dist.data.shard_format import encode_shard
from sd35dist.models import tiny_sd3
from sd35dist.models.prompt_encoding import DEFAULT_MAX_SEQUENCE_LENGTH, encode_prompts
from sd35dist.models.sd3_components import TextEncoders
from sd35dist.models.vae_encoding import encode_images

CLIP_LENGTH = 77
CLIP_VOCAB, CLIP_BOS, CLIP_EOS, CLIP_PAD = 49408, 49406, 49407, 1
T5_VOCAB, T5_PAD, T5_EOS = 32128, 0, 1

# stabilityai/stable-diffusion-3.5-large vae/config.json (the same VAE as SD3 Medium).
LARGE_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
    latent_channels=16,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# text_encoder/ = CLIP ViT-L/14 text tower, text_encoder_2/ = OpenCLIP bigG/14 text tower.
LARGE_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    projection_dim=768, hidden_act="quick_gelu")
LARGE_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    projection_dim=1280, hidden_act="gelu")
# text_encoder_3/ = T5 v1.1 XXL encoder.
LARGE_T5 = dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6)

SHAPES = {
    "large": dict(vae=LARGE_VAE, clip_l=LARGE_CLIP_L, clip_g=LARGE_CLIP_G, t5=LARGE_T5),
    "tiny": dict(
        vae=tiny_sd3.VAE_SIZES, clip_l=tiny_sd3.CLIP_L_SIZES, clip_g=tiny_sd3.CLIP_G_SIZES, t5=tiny_sd3.T5_SIZES
    ),
}
DEFAULTS = {
    "large": dict(resolution=1024, batch_sizes="1,4,8,16", warmup=2, iterations=10),
    "tiny": dict(resolution=64, batch_sizes="1,4", warmup=2, iterations=10),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class RandomTokens:
    """Stands in for a tokenizer: every caption becomes full-length random ids, BOS/EOS in place."""

    def __init__(self, vocab_size: int, model_max_length: int, bos: int | None, eos: int, generator: torch.Generator):
        self.vocab_size = vocab_size
        self.model_max_length = model_max_length
        self.bos, self.eos = bos, eos
        self.generator = generator

    def __call__(self, prompts: list[str], max_length: int | None = None, return_tensors: str | None = None, **_):
        length = max_length or self.model_max_length
        ids = torch.randint(2, self.vocab_size - 2, (len(prompts), length), generator=self.generator)
        if self.bos is not None:
            ids[:, 0] = self.bos
        ids[:, -1] = self.eos
        # encode_prompts also calls the tokenizer untruncated to count over-long captions: give it lists.
        return SimpleNamespace(input_ids=ids if return_tensors == "pt" else ids.tolist())


def build_encoders(size: str, device: torch.device, text_dtype: torch.dtype, max_sequence_length: int) -> Encoders:
    """VAE (fp32) and the three text encoders at random init, allocated directly on `device`."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    shapes = SHAPES[size]

    def clip(sizes: dict) -> torch.nn.Module:
        config = CLIPTextConfig(vocab_size=CLIP_VOCAB, max_position_embeddings=CLIP_LENGTH, bos_token_id=CLIP_BOS,
                                eos_token_id=CLIP_EOS, pad_token_id=CLIP_PAD, **sizes)
        return CLIPTextModelWithProjection._from_config(config, dtype=text_dtype)

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    with torch.device(device):  # no full CPU copy first: T5-XXL alone is 19 GB in fp32
        vae = AutoencoderKL(**shapes["vae"])
        clip_l, clip_g = clip(shapes["clip_l"]), clip(shapes["clip_g"])
        t5_config = T5Config(vocab_size=T5_VOCAB, pad_token_id=T5_PAD, eos_token_id=T5_EOS,
                             decoder_start_token_id=T5_PAD, **shapes["t5"])
        t5 = T5EncoderModel._from_config(t5_config, dtype=text_dtype)
    for model in (vae, clip_l, clip_g, t5):
        model.requires_grad_(False).eval()
    text = TextEncoders(
        clip_l_tokenizer=RandomTokens(CLIP_VOCAB, CLIP_LENGTH, CLIP_BOS, CLIP_EOS, generator),
        clip_l=clip_l,
        clip_g_tokenizer=RandomTokens(CLIP_VOCAB, CLIP_LENGTH, CLIP_BOS, CLIP_EOS, generator),
        clip_g=clip_g,
        t5_tokenizer=RandomTokens(T5_VOCAB, max_sequence_length, None, T5_EOS, generator),
        t5=t5,
    )
    return Encoders(vae=vae, text=text, max_sequence_length=max_sequence_length)


def fake_batch(batch: int, resolution: int) -> tuple[dict[tuple[str, str], PreparedImage], list[WorkItem]]:
    """`batch` prepared images (random pixels in [-1, 1]) with one caption each, as _encode_plan hands over."""
    prepared, items = {}, []
    side = (resolution, resolution)
    fit = FitPlan(bucket=side, original_size=side, resized=side, crop_box=(0, 0, resolution, resolution))
    for i in range(batch):
        source = SourceImage(dataset="bench", path=f"{i:06d}.png", url="", caption_file=None)
        pixels = torch.rand(3, resolution, resolution) * 2 - 1
        prepared[(source.dataset, source.path)] = PreparedImage(source, fit, pixels, ("a photo",))
        items.append(WorkItem(source, 0))
    return prepared, items


def images_per_second(step: Callable[[], object], batch: int, warmup: int, iterations: int,
                      device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = []
    with torch.no_grad():
        for _ in range(warmup):
            step()
        sync()
        for _ in range(iterations):
            start = time.perf_counter()
            step()
            sync()
            seconds.append(time.perf_counter() - start)
    # The median, not the mean: one iteration slowed by a neighbour on a shared machine should not count.
    return batch / statistics.median(seconds)


def measure(encoders: Encoders, batch: int, resolution: int, warmup: int, iterations: int,
            device: torch.device) -> dict:
    prepared, items = fake_batch(batch, resolution)
    pixels = torch.stack([p.pixels for p in prepared.values()]).to(device)
    captions = ["a photo"] * batch
    bucket = bucket_name((resolution, resolution))

    def combined():
        return encode_shard(encoders.encode(prepared, items), bucket, "bf16")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = {
        "vae": images_per_second(lambda: encode_images(encoders.vae, pixels), batch, warmup, iterations, device),
        "text": images_per_second(lambda: encode_prompts(encoders.text, captions, encoders.max_sequence_length),
                                  batch, warmup, iterations, device),
        "combined": images_per_second(combined, batch, warmup, iterations, device),
    }
    result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="large", help="encoder shapes (default large)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, help="square image side in pixels (default 1024 large, 64 tiny)")
    parser.add_argument("--batch-sizes", help="comma-separated (default 1,4,8,16 large; 1,4 tiny)")
    parser.add_argument("--warmup", type=int, help="untimed iterations per measurement (default 2)")
    parser.add_argument("--iterations", type=int, help="timed iterations per measurement (default 10)")
    parser.add_argument("--text-dtype", choices=sorted(DTYPES),
                        help="text encoders' dtype (default bf16 on cuda, fp32 on cpu, as sd35dist cache)")
    parser.add_argument("--max-sequence-length", type=int, default=DEFAULT_MAX_SEQUENCE_LENGTH,
                        help="T5 tokens (default 256)")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.exit(2, f"error: --batch-sizes {args.batch_sizes!r}: give comma-separated integers, e.g. 1,4,8\n")
    if min(args.batch_sizes) < 1 or args.iterations < 1 or args.warmup < 0:
        parser.exit(2, "error: batch sizes and --iterations must be >= 1, --warmup >= 0\n")
    if args.resolution < 8 or args.resolution % 8:
        parser.exit(2, f"error: --resolution {args.resolution}: must be a multiple of 8 (the VAE downsamples 8x)\n")
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "error: --device cuda: no CUDA device visible; use --device cpu\n")
    if args.text_dtype is None:
        args.text_dtype = "bf16" if args.device.type == "cuda" else "fp32"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import diffusers
    import transformers

    command = typed_command()
    start = time.perf_counter()
    encoders = build_encoders(args.size, args.device, DTYPES[args.text_dtype], args.max_sequence_length)
    built_s = time.perf_counter() - start
    text = encoders.text
    parts = {"vae": encoders.vae, "clip_l": text.clip_l, "clip_g": text.clip_g, "t5": text.t5}
    counts = ", ".join(f"{name} {sum(p.numel() for p in m.parameters()) / 1e6:.2f} M" for name, m in parts.items())
    versions = f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    print(f"# {args.size} shapes on {device_name(args.device)}; built in {built_s:.1f} s; parameters: {counts}")
    # The fp32 VAE's convolutions run in TF32 on Ampere+ unless this is off (torch's default is on).
    tf32 = f", cuDNN TF32 {'on' if torch.backends.cudnn.allow_tf32 else 'off'}" if args.device.type == "cuda" else ""
    print(f"# VAE fp32{tf32}, text {args.text_dtype}, {args.resolution} px, CLIP {CLIP_LENGTH} + "
          f"T5 {args.max_sequence_length} tokens, warm-up {args.warmup}, timed {args.iterations}; {versions}")
    print("| date | device | versions | shapes | px | batch | VAE img/s | text img/s | combined img/s | peak GiB "
          "| command |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for batch in args.batch_sizes:
        try:
            r = measure(encoders, batch, args.resolution, args.warmup, args.iterations, args.device)
            cells = [f"{r['vae']:.3g}", f"{r['text']:.3g}", f"{r['combined']:.3g}"]
            peak = "n/a (cpu)" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            cells, peak = ["OOM"] * 3, "OOM"
        print(f"| {datetime.date.today()} | {device_name(args.device)} | {versions} | {args.size} "
              f"| {args.resolution} | {batch} | {' | '.join(cells)} | {peak} | `{command}` |", flush=True)


if __name__ == "__main__":
    main()
