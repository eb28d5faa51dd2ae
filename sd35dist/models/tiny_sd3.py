"""A tiny SD3.5-Large-shaped model on disk, for tests and the demo.

Real diffusers/transformers classes at toy sizes, saved with `save_pretrained` in exactly the
layout of a user's SD3.5 Large directory (model_index.json, transformer/ with sharded
safetensors and an index, vae/, text_encoder{,_2,_3}/, tokenizer{,_2,_3}/, scheduler/), so it
is loaded by the same `from_pretrained(local_dir)` code. Everything is built offline: the
tokenizers come from hand-made vocabularies, the weights from a seeded initialisation.

    python -m sd35dist.models.tiny_sd3 OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from sd35dist.models.sd3_components import ModelDirectoryIncomplete, check_model_dir
from sd35dist.runtime.atomic_files import staged_directory

# The transformer is split into several files so tests walk the same index-json path as the
# 8B checkpoint; the T5 encoder is sharded too, like SD3.5 Large's text_encoder_3.
TRANSFORMER_SHARD_SIZE = "250KB"
T5_SHARD_SIZE = "100KB"

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512

# The sizes obey SD3's wiring: CLIP-L + CLIP-G hidden sizes (8 + 16) fit into the T5 width
# (32 = joint_attention_dim), and their projections (24 + 40) add up to pooled_projection_dim.
# SD3's shape at depth 2: ComfyUI builds an SD3 MMDiT from its width alone — depth = width / 64,
# `depth` heads of 64 and `depth` blocks (comfy/model_detection.py, MMDiT's num_blocks default in
# comfy/ldm/modules/diffusionmodules/mmdit.py) — so the tiny model has as many 64-wide heads as
# blocks, as SD3.5 Large (38 × 38) does, and its exports open there.
TRANSFORMER_SIZES = dict(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=64,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=128,
    pooled_projection_dim=64,
    pos_embed_max_size=32,
    qk_norm="rms_norm",
    # SD3.5 Medium's MMDiT-X second attention in the first block: every key family of the
    # original single-file layout appears (attn2, ln_q/ln_k, the context_pre_only last block).
    dual_attention_layers=(0,),
)
CLIP_L_SIZES = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, projection_dim=24, hidden_act="quick_gelu")
CLIP_G_SIZES = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, projection_dim=40, hidden_act="gelu")
T5_SIZES = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")

# SD3's VAE constants: 16 latent channels, 8x downsampling, and the real scale/shift.
VAE_SIZES = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=16,
    sample_size=256,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# The VAE at SD3's own shape, for the demo, whose files must open in ComfyUI: ComfyUI builds every SD
# VAE of a single file with SD3's encoder (128 wide, ch_mult 1, 2, 4, 4, two res blocks: comfy/sd.py
# `VAE.__init__`) and reads only the decoder's width from the file, so a VAE it loads without size
# mismatches has this shape: 83,819,683 parameters, 320 MiB in fp32. Too big for every test's copy.
SD3_VAE_SIZES = dict(VAE_SIZES, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)

# Words that get whole-word tokens; anything else still tokenizes, character by character.
COMMON_WORDS = (
    "a an the of and in on at with to for from by is are photo picture image painting drawing "
    "portrait landscape cat dog bird horse car house tree flower sky sea mountain city street "
    "man woman person child red green blue yellow black white small large old new bright dark"
).split()


def build_tiny_sd3(out_dir: Path, seed: int = 0, vae_sizes: dict = VAE_SIZES) -> Path:
    """Build the tiny model, its VAE of `vae_sizes`, into `out_dir` atomically; a complete `out_dir`
    with such a VAE is returned untouched."""
    out_dir = Path(out_dir)
    if _is_complete(out_dir):
        if not has_vae_sizes(out_dir, vae_sizes):
            raise FileExistsError(f"{out_dir}: a tiny SD3 with another VAE shape; remove it or pick another path")
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: exists but is not a complete SD3 model directory; remove it or pick another path")
    try:
        with staged_directory(out_dir) as staging:
            _save_pipeline(tiny_sd3_pipeline(seed, vae_sizes), staging)
    except OSError:
        if not _is_complete(out_dir):
            raise
        # Another process (e.g. a second rank) finished the same build first.
    return out_dir


def tiny_sd3_pipeline(seed: int = 0, vae_sizes: dict = VAE_SIZES):
    """An in-memory StableDiffusion3Pipeline at toy size, identical for identical seeds."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=_seeded(seed, 0, _tiny_transformer),
        vae=_seeded(seed, 1, _vae, vae_sizes),
        text_encoder=_seeded(seed, 2, _tiny_clip, CLIP_L_SIZES),
        text_encoder_2=_seeded(seed, 3, _tiny_clip, CLIP_G_SIZES),
        text_encoder_3=_seeded(seed, 4, _tiny_t5),
        tokenizer=clip_tokenizer(pad_token="<|endoftext|>"),
        # SD3's CLIP-G tokenizer pads with "!" rather than end-of-text; keep that difference.
        tokenizer_2=clip_tokenizer(pad_token="!"),
        tokenizer_3=t5_tokenizer(),
        scheduler=_scheduler(),
        image_encoder=None,
        feature_extractor=None,
    )


def clip_tokenizer(pad_token: str):
    """A byte-level BPE CLIPTokenizer: every byte has a token, so any caption encodes without <unk>."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer():
    """A Unigram T5 tokenizer: whole common words, then single characters, then <unk>."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -4.0) for word in COMMON_WORDS]
    pieces += [(char, -8.0) for char in _printable_ascii()]
    pieces += [("\u2581" + char, -9.0) for char in _printable_ascii()]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    # Same id order as OpenAI's CLIP vocab: bytes, bytes+</w>, merged tokens, then the two specials.
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [char + "</w>" for char in byte_chars]
    merges: list[tuple[str, str]] = []
    for word in COMMON_WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            if (merged, symbol) not in merges:
                merges.append((merged, symbol))
                tokens.append(merged + symbol)
            merged += symbol
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level mapping: printable bytes map to themselves, the rest to 256+n.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + shifted)
            shifted += 1
    return {byte: chr(code) for byte, code in zip(printable, codes)}


def _printable_ascii() -> list[str]:
    return [chr(code) for code in range(ord("!"), ord("~") + 1)]


def _seeded(seed: int, component_index: int, build, *args):
    # Each component gets its own seed so its weights do not depend on build order.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + component_index)
        return build(*args)


def _tiny_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**TRANSFORMER_SIZES)


def _vae(sizes: dict):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**sizes)


def _tiny_clip(sizes: dict):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    vocab, _ = _clip_vocab_and_merges()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **sizes,
    )
    return CLIPTextModelWithProjection(config).eval()


def _tiny_t5():
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(t5_tokenizer()), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **T5_SIZES)
    return T5EncoderModel(config).eval()


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def _save_pipeline(pipeline, model_dir: Path) -> None:
    pipeline.save_pretrained(model_dir)
    for subfolder, shard_size in (("transformer", TRANSFORMER_SHARD_SIZE), ("text_encoder_3", T5_SHARD_SIZE)):
        shutil.rmtree(model_dir / subfolder)
        getattr(pipeline, subfolder).save_pretrained(model_dir / subfolder, max_shard_size=shard_size)


def has_vae_sizes(model_dir: Path, vae_sizes: dict) -> bool:
    """Whether the model directory's VAE config has these sizes (lists and tuples alike)."""
    config = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
    return all(json.loads(json.dumps(value)) == config.get(key) for key, value in vae_sizes.items())


def _is_complete(model_dir: Path) -> bool:
    try:
        check_model_dir(model_dir)
    except ModelDirectoryIncomplete:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd35dist.models.tiny_sd3", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="where to write the model directory")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (same seed, same weights)")
    args = parser.parse_args(argv)
    try:
        print(build_tiny_sd3(args.out_dir, seed=args.seed))
    except FileExistsError as error:
        print(f"error: {error}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
