"""Caption -> SD3 text conditioning, exactly as diffusers' StableDiffusion3Pipeline computes it.

This is `StableDiffusion3Pipeline.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
num_images_per_prompt=1, do_classifier_free_guidance=False, clip_skip=None)` written out
without the pipeline, so the cache builder never has to hold the 8B transformer:

- each CLIP (L, then G) tokenizes to the CLIP-L tokenizer's model_max_length (77), padding
  and truncating; its penultimate hidden state is the per-token embedding and its projected
  end-of-text state (`text_embeds`) the pooled one;
- T5 tokenizes to `max_sequence_length` (with </s>) and its last hidden state is used;
- the two CLIP sequences are concatenated along features, zero-padded to T5's width, and
  put before the T5 sequence: prompt_embeds is [B, 77 + max_sequence_length, d_T5];
- pooled_prompt_embeds is [pooled CLIP-L, pooled CLIP-G]: [B, proj_L + proj_G].

A test checks equality (torch.equal) against the pipeline itself on the tiny model.
"""

from __future__ import annotations

import logging

import torch

from sd35dist.models.sd3_components import TextEncoders

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQUENCE_LENGTH = 256  # diffusers' default T5 length for SD3


@torch.no_grad()
def encode_prompts(
    encoders: TextEncoders, prompts: list[str], max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B, 77 + max_sequence_length, d_T5], pooled_prompt_embeds [B, proj_L + proj_G])."""
    if isinstance(prompts, str):
        raise TypeError("encode_prompts takes a list of captions, not a single string")
    prompts = list(prompts)
    # The pipeline uses the first tokenizer's length for both CLIPs.
    clip_length = encoders.clip_l_tokenizer.model_max_length
    clip_l_embeds, clip_l_pooled = _clip_embeddings(encoders.clip_l_tokenizer, encoders.clip_l, prompts, clip_length, encoders)
    clip_g_embeds, clip_g_pooled = _clip_embeddings(encoders.clip_g_tokenizer, encoders.clip_g, prompts, clip_length, encoders)
    t5_embeds = _t5_embeddings(encoders, prompts, max_sequence_length)

    clip_embeds = torch.cat([clip_l_embeds, clip_g_embeds], dim=-1)
    clip_embeds = torch.nn.functional.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
    prompt_embeds = torch.cat([clip_embeds, t5_embeds], dim=-2)
    pooled_prompt_embeds = torch.cat([clip_l_pooled, clip_g_pooled], dim=-1)
    return prompt_embeds, pooled_prompt_embeds


def empty_prompt_embeddings(
    encoders: TextEncoders, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoding of the empty caption "" (batch of one), which caption dropout substitutes."""
    return encode_prompts(encoders, [""], max_sequence_length)


def _clip_embeddings(tokenizer, encoder, prompts: list[str], max_length: int, encoders: TextEncoders):
    input_ids = _token_ids(tokenizer, prompts, max_length, "CLIP")
    output = encoder(input_ids.to(encoders.device), output_hidden_states=True)
    pooled = output[0]
    # clip_skip=None in the pipeline means the penultimate layer, cast to CLIP-L's dtype.
    per_token = output.hidden_states[-2].to(dtype=encoders.clip_l.dtype, device=encoders.device)
    return per_token, pooled


def _t5_embeddings(encoders: TextEncoders, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
    input_ids = _token_ids(encoders.t5_tokenizer, prompts, max_sequence_length, "T5")
    hidden = encoders.t5(input_ids.to(encoders.device))[0]
    return hidden.to(dtype=encoders.t5.dtype, device=encoders.device)


def _token_ids(tokenizer, prompts: list[str], max_length: int, encoder_name: str) -> torch.Tensor:
    tokens = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True, return_tensors="pt"
    )
    _warn_if_truncated(tokenizer, prompts, max_length, encoder_name)
    return tokens.input_ids


def _warn_if_truncated(tokenizer, prompts: list[str], max_length: int, encoder_name: str) -> None:
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True).input_ids]
    truncated = sum(length > max_length for length in lengths)
    if truncated:
        log.warning(
            "%d of %d captions exceed %s's %d tokens (longest %d) and were truncated, as diffusers does",
            truncated, len(prompts), encoder_name, max_length, max(lengths),
        )
