"""The training recipe: *what* to run (model, data, parallelism, optimisation, output).

Where it runs is the cluster profile's business (launcher/profile.py). Every field has a
docstring; names follow what SD3.5 fine-tuners know from SimpleTuner and the diffusers
examples. Later stages read more of these fields; the schema rejects unknown keys now so
a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import pydantic
from pydantic import Field

from sd35dist.config.activation_policy import parse_policy
from sd35dist.config.credentials import first_credential, looks_secret  # noqa: F401 (preflight redacts with it)
from sd35dist.config.hf_datasets import is_hf_dataset_url, parse_hf_dataset_url
from sd35dist.config.hub_ids import hub_id_of
from sd35dist.config.loading import StrictModel, YamlTuple, dump_yaml, load_model
from sd35dist.config.validation_section import ValidationSection


class ModelSection(StrictModel):
    pretrained: str
    """The base model: a local diffusers directory (SD3.5 Large's layout: transformer/, vae/, text_encoder*/ …)
    or a Hugging Face id `org/name[@revision]`, which `sd35dist submit` downloads once into the profile's
    hf_home (only what the job opens) and hands to the ranks as that local snapshot."""
    transformer_subfolder: str = "transformer"
    """Subfolder of `pretrained` holding the MMDiT (config.json + sharded safetensors)."""


DatasetFormat = Literal["folder", "webdataset", "parquet"]
PARQUET_KEYS = ("image_column", "caption_column", "width_column", "height_column", "image_root")
"""Keys only a parquet dataset reads."""


class DatasetSection(StrictModel):
    """One image dataset (like an entry of SimpleTuner's multidatabackend.json)."""

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    source: str
    """Where the dataset is, a local path or any fsspec URL (s3://bucket/images): folder: a directory of images;
    webdataset: tar shards (a brace pattern shards-{00000..00099}.tar, a glob, a directory of .tar or one file);
    parquet: .parquet files (a directory, a glob, a brace pattern or one file), or a Hugging Face dataset's
    parquet files as `hf://datasets/ORG/NAME[@REVISION][/PATH-GLOB]` (the URL form of huggingface_hub's
    HfFileSystem; no path: every .parquet file), which `sd35dist submit` downloads once into the profile's
    hf_home (only the matching files) and hands to the ranks as that local snapshot."""
    format: DatasetFormat = Field("folder", validate_default=True)
    """folder: images with NAME.txt captions; webdataset: tar shards of samples (image + .txt, .json allowed);
    parquet: rows with an image column (bytes or a path) and a caption column."""
    image_column: str = "image"
    """parquet: the column holding the image: its bytes, a {bytes, path} struct (Hugging Face datasets), or a path/URL."""
    caption_column: str = "caption"
    """parquet: the column holding the caption (caption_strategy textfile)."""
    width_column: str | None = None
    """parquet: a column with each image's width; with height_column, images are bucketed without decoding them."""
    height_column: str | None = None
    """parquet: a column with each image's height (with width_column)."""
    image_root: str | None = None
    """parquet: what relative paths in image_column are relative to (default: the parquet file's directory)."""
    probability: float = 1.0
    """SimpleTuner's probability: the weight with which a training step draws from this dataset while it has
    samples left in the epoch (× its size under data.dataset_sampling auto-weighting). An epoch still holds
    every sample `repeats` times: probability decides the order, repeats the amount."""
    caption_strategy: Literal["textfile", "filename", "instance_prompt"] = "textfile"
    """textfile: the caption that comes with the image (folder: NAME.txt beside NAME.png; webdataset: the sample's
    .txt, else its .json "caption"; parquet: caption_column); filename: the file name (webdataset: the sample key);
    instance_prompt: a fixed prompt."""
    instance_prompt: str | None = None
    """The trigger prompt (e.g. k4s4) for caption_strategy instance_prompt."""
    repeats: int = Field(1, ge=1)
    """Times each image appears per epoch; each repeat gets its own caption variant."""
    shuffle_captions: bool = False
    """Shuffle comma-separated caption tokens in repeats after the first (SimpleTuner's duplicate_shuffle)."""
    keep_tokens: int = Field(2, ge=0)
    """Leading comma-separated tokens that stay in place when shuffling (trigger word + first phrase)."""
    crop: bool = True
    """Crop to the nearest bucket; false rejects images whose shape does not fit a bucket."""
    crop_style: Literal["center", "random", "corner"] = "center"
    """Where the crop sits: the middle, a random place drawn once per image (from data.shuffle_seed
    and the image's path, so a rebuilt cache is the same), or the top-left corner (SimpleTuner's styles)."""
    minimum_image_size: int = Field(0, ge=0)
    """Images whose shorter side is smaller are rejected."""
    max_upscale: float = Field(2.0, ge=1)
    """Images enlarged more than this to cover their bucket are rejected (2: a 1024² bucket needs ≥ 512 px)."""
    max_crop_fraction: float = Field(0.5, ge=0, le=1)
    """Images whose center crop would cut away more than this share of their area are rejected."""
    alpha_background: Annotated[tuple[int, int, int], YamlTuple] = (255, 255, 255)
    """Colour transparent pixels are composited on: [r, g, b] (0–255), "#rrggbb" or a CSS name such as white."""

    @pydantic.field_validator("source")
    @classmethod
    def _hub_dataset(cls, value: str) -> str:
        if is_hf_dataset_url(value):
            parse_hf_dataset_url(value)  # its ValueError says what is wrong
        return value

    @pydantic.field_validator("format")
    @classmethod
    def _hub_dataset_is_parquet(cls, value: str, info: pydantic.ValidationInfo) -> str:
        if value != "parquet" and is_hf_dataset_url(info.data.get("source", "")):
            raise ValueError(f"{value}: a Hugging Face dataset (hf://datasets/…) is read as its parquet files: "
                             "set format: parquet")
        return value

    @pydantic.field_validator("alpha_background", mode="before")
    @classmethod
    def _colour(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        from PIL import ImageColor  # only when a recipe names a colour: the launcher rarely needs Pillow

        try:
            rgb = ImageColor.getrgb(value)
        except ValueError:
            raise ValueError(f"unknown colour {value!r}: use [r, g, b], #rrggbb or a name such as white") from None
        if len(rgb) != 3:
            raise ValueError(f"colour {value!r} has an alpha part: the background must be opaque")
        return rgb

    @pydantic.field_validator("alpha_background")
    @classmethod
    def _channels(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if not all(0 <= channel <= 255 for channel in value):
            raise ValueError(f"{list(value)}: each channel must be 0–255")
        return value

    @pydantic.field_validator("probability")
    @classmethod
    def _weight(cls, value: float, info: pydantic.ValidationInfo) -> float:
        if not value > 0 or value == float("inf"):
            name = info.data.get("id", "?")
            raise ValueError(f"dataset {name}: must be a finite weight > 0 (1 is the default), got {value!r}")
        return value

    @pydantic.model_validator(mode="after")
    def _prompt(self) -> DatasetSection:
        if self.caption_strategy == "instance_prompt" and not self.instance_prompt:
            raise ValueError("caption_strategy instance_prompt needs instance_prompt")
        if (self.width_column is None) != (self.height_column is None):
            raise ValueError(f"dataset {self.id}: width_column and height_column go together (set both or neither)")
        if self.format != "parquet":
            changed = [key for key in PARQUET_KEYS if getattr(self, key) != DatasetSection.model_fields[key].default]
            if changed:
                raise ValueError(f"dataset {self.id}: {changed[0]} is a key of format parquet, not {self.format}")
        return self


class StreamSection(StrictModel):
    """How every rank reads the cache while training (sd35dist/data/latent_stream.py)."""

    block_shards: int = Field(2, ge=1)
    """Samples are shuffled within blocks of this many shards (more: better mixing, more RAM)."""
    prefetch_shards: int = Field(8, ge=0)
    """Shards fetched ahead of the one being read."""
    fetch_threads: int = Field(4, ge=1)
    disk_cache_dir: str | None = None
    """Local directory for a least-recently-used copy of fetched shards (node-local NVMe)."""
    disk_cache_gb: float = Field(0.0, ge=0)
    on_corrupt: Literal["error", "skip"] = "error"
    """A shard whose sha256 differs from the manifest: stop naming it, or skip it and report."""
    retry_budget_s: float = Field(120.0, gt=0)
    """How long transient storage errors are retried (with backoff) before the job stops."""


DEFAULT_BUCKETS = [[1024, 1024], [1152, 896], [896, 1152], [1216, 832], [832, 1216], [1344, 768], [768, 1344], [1472, 704]]


class DataSection(StrictModel):
    cache_url: str
    """Where the latent/text-embedding cache lives: a local path, file://… or s3://bucket/prefix."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """fsspec storage options (e.g. endpoint_url). Credentials come from the environment, never from here."""
    datasets: list[DatasetSection] = Field(default_factory=list)
    """Image datasets the cache is built from (`sd35dist cache`)."""
    buckets: list[Annotated[tuple[int, int], YamlTuple]] = Field(default_factory=lambda: [tuple(b) for b in DEFAULT_BUCKETS])
    """Aspect buckets as [width, height]; the default is the SD3.5 tutorial's 8 one-megapixel buckets."""
    shard_target_mb: float = Field(256.0, gt=0)
    """Approximate size of one cache shard."""
    cache_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """dtype of cached latents and embeddings."""
    cache_batch_size: int = Field(4, ge=1)
    """Images per VAE/text-encoder batch while building the cache."""
    max_sequence_length: int = Field(256, ge=1, le=512)
    """T5 tokens per caption (SD3's default 256)."""
    shuffle_seed: int = 0
    """Seed of caption shuffles (independent of the training seed so a cache is reusable)."""
    dataset_sampling: Literal["auto-weighting", "uniform"] = "auto-weighting"
    """SimpleTuner's data_backend_sampling: a step draws a dataset with weight probability × its samples per epoch
    (auto-weighting) or probability alone (uniform), among the datasets with samples left in the epoch."""
    stream: StreamSection = Field(default_factory=StreamSection)

    @pydantic.field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Files are checked whole by the loader; this covers recipes built in code.
        found = first_credential(value)
        if found is not None:
            raise ValueError(f"{found.path}: {found.reason}")
        return value

    @pydantic.field_validator("buckets")
    @classmethod
    def _buckets(cls, value: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if not value:
            raise ValueError("at least one bucket is needed")
        for width, height in value:
            if width % 16 or height % 16 or width <= 0 or height <= 0:
                raise ValueError(f"bucket {width}x{height}: sides must be positive multiples of 16 (VAE /8, patch 2)")
        if len(set(value)) != len(value):
            raise ValueError("buckets must be distinct")
        return value

    @pydantic.model_validator(mode="after")
    def _unique_ids(self) -> DataSection:
        ids = [d.id for d in self.datasets]
        if len(set(ids)) != len(ids):
            raise ValueError(f"dataset ids must be unique, got {ids}")
        return self


class ParallelSection(StrictModel):
    strategy: Literal["fsdp2", "zero2", "zero3"] = "fsdp2"
    """How parameters, gradients and optimizer state are sharded across ranks."""
    min_gpus: int = Field(0, ge=0)
    """GPUs the recipe needs at least (memory); 0 runs anywhere, CPU included."""
    shard_degree: int | None = Field(None, ge=1)
    """Ranks one parameter shard group spans (HSDP when < world size); None = all ranks."""
    offload_optimizer: bool = False
    """ZeRO: keep the optimizer state and fp32 master weights in CPU memory (DeepSpeed's CPU Adam)."""
    offload_params: bool = False
    """ZeRO-3: keep the parameters in CPU memory between uses."""

    @pydantic.model_validator(mode="after")
    def _offload(self) -> ParallelSection:
        if (self.offload_optimizer or self.offload_params) and self.strategy == "fsdp2":
            raise ValueError("offload_optimizer/offload_params need strategy zero2 or zero3")
        if self.offload_params and self.strategy != "zero3":
            raise ValueError("offload_params needs strategy zero3 (ZeRO-2 keeps whole parameters on every rank)")
        if self.shard_degree is not None and self.strategy != "fsdp2":
            raise ValueError("shard_degree (HSDP) needs strategy fsdp2")
        return self


class EmaSection(StrictModel):
    enabled: bool = False
    decay: float = Field(0.999, gt=0, lt=1)
    update_interval: int = Field(1, ge=1)
    start_step: int = Field(0, ge=0)


LoraPreset = Literal["attention", "attention_image", "attention_ff", "all_linear"]
LORA_TARGET_PRESETS: tuple[str, ...] = get_args(LoraPreset)
_LORA_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                   "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
# SimpleTuner's SD3 default (DEFAULT_LORA_TARGET): peft suffixes, so attn2 of SD3.5 Medium's dual blocks too.
_LORA_ATTENTION_IMAGE = ("to_q", "to_k", "to_v", "to_out.0")
_LORA_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
LORA_PRESET_MODULES: dict[str, tuple[str, ...]] = {"attention": _LORA_ATTENTION,
                                                   "attention_image": _LORA_ATTENTION_IMAGE,
                                                   "attention_ff": _LORA_ATTENTION + _LORA_FEED_FORWARD}
"""Module-name suffixes (peft target_modules) of each preset; all_linear is every nn.Linear."""


def lora_target_modules(targets: str | list[str]) -> tuple[str, ...] | None:
    """The peft target_modules a recipe's `train.lora.targets` stands for; None: every Linear (all_linear)."""
    if targets == "all_linear":
        return None
    return LORA_PRESET_MODULES[targets] if isinstance(targets, str) else tuple(targets)


LoraType = Literal["lora", "lokr", "loha"]
LORA_TYPES: tuple[str, ...] = get_args(LoraType)
LycorisAlgo = Literal["lokr", "loha"]


class LycorisModuleOptions(StrictModel):
    """One entry of LyCORIS's module_algo_map: what the Linears inside modules of that class get."""

    algo: LycorisAlgo | None = None
    """lokr or loha for these modules; None: train.lora.type."""
    factor: int | None = None
    """lokr's Kronecker factor for these modules; None: train.lora.factor."""
    dim: int | None = Field(None, ge=1)
    """Their rank (LyCORIS's dim); None: train.lora.rank."""
    alpha: float | None = Field(None, gt=0)
    """Their alpha; None: train.lora.alpha."""


class LycorisPreset(StrictModel):
    """LyCORIS's apply_preset (the `apply_preset` of SimpleTuner's lycoris_config): modules chosen by class.

    Every Linear inside a module whose class is named in target_module (or module_algo_map) is
    adapted, as LycorisNetwork does; target_name adds single modules by name (a regular expression
    matched from the start, LyCORIS's default), exclude_name leaves modules out."""

    target_module: list[str] = Field(default_factory=list)
    """Class names, e.g. [Attention, FeedForward] (diffusers' classes in the SD3 transformer)."""
    target_name: list[str] = Field(default_factory=list)
    """Module names or patterns (re.match), e.g. [norm_out.linear]."""
    module_algo_map: dict[str, LycorisModuleOptions] = Field(default_factory=dict)
    """Class name → algo, factor, dim or alpha for the Linears inside modules of that class."""
    exclude_name: list[str] = Field(default_factory=list)
    """Module names or patterns (re.match) never adapted."""


class LoraSection(StrictModel):
    """An adapter fine-tune: the base transformer stays frozen, only the adapters train.

    type lora is peft's LoRA; lokr and loha are LyCORIS's Kronecker and Hadamard products (what
    SimpleTuner's `lora_type: lycoris` trains), built as peft's LoKr/LoHa layers with LyCORIS's
    initialisation and scale (sd35dist/models/lycoris.py)."""

    type: LoraType = "lora"
    """lora (peft LoRA, exported in diffusers' format) | lokr | loha (LyCORIS, exported in LyCORIS's format)."""
    rank: int = Field(16, ge=1)
    """r: the adapters' inner dimension (LyCORIS's linear_dim)."""
    alpha: float = Field(16.0, gt=0)
    """lora_alpha (LyCORIS's linear_alpha): the update is scaled by alpha / rank (a LoKr whose two
    Kronecker factors are both whole matrices is scaled by 1, as LyCORIS does)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """lora_dropout on the adapters' input (type lora only: LyCORIS's LoKr/LoHa have none)."""
    init: Literal["default", "gaussian"] = "default"
    """peft's init_lora_weights: default (A Kaiming-uniform, B zero) or gaussian (A normal, std 1/rank).
    Inits that rewrite the base weights or need data (pissa, olora, loftq, eva, corda) are not offered.
    lokr/loha start as LyCORIS starts them (type lora only)."""
    targets: LoraPreset | list[str] = "attention"
    """attention: joint-attention projections of both streams; attention_image: the image stream's
    to_q/to_k/to_v/to_out.0 only (SimpleTuner's SD3 default); attention_ff: attention and the MLPs;
    all_linear: every Linear; or a list of module names (peft target_modules: a name or its suffix)."""
    factor: int = -1
    """lokr: the Kronecker factor (LyCORIS's factor): each weight is kron(w1, w2) with w1 about
    factor × factor; -1: the most balanced split."""
    full_matrix: bool = False
    """lokr: keep both Kronecker factors whole matrices whatever the rank (LyCORIS's full_matrix)."""
    decompose_both: bool = False
    """lokr: factor the smaller Kronecker factor into a rank-r product too (LyCORIS's decompose_both)."""
    preset: LycorisPreset | None = None
    """lokr/loha: choose modules by class as LyCORIS's apply_preset does (targets then stays at its default)."""

    def target_modules(self) -> tuple[str, ...] | None:
        """The peft target_modules the targets stand for; None: every Linear (all_linear)."""
        return lora_target_modules(self.targets)

    @pydantic.field_validator("targets")
    @classmethod
    def _targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError(f"an empty list trains nothing: name modules or a preset ({', '.join(LORA_TARGET_PRESETS)})")
        return value

    @pydantic.model_validator(mode="after")
    def _fits_type(self) -> LoraSection:
        lycoris = self.type != "lora"
        if not lycoris:
            for key, unset in (("factor", -1), ("full_matrix", False), ("decompose_both", False), ("preset", None)):
                if getattr(self, key) != unset:
                    raise ValueError(f"{key} is a LyCORIS option: set type lokr or loha, or remove {key}")
            return self
        if self.dropout:
            raise ValueError(f"type {self.type}: LyCORIS's LoKr/LoHa have no input dropout; set dropout 0")
        if self.init != "default":
            raise ValueError(f"type {self.type}: adapters start as LyCORIS starts them; remove init")
        if self.type == "loha" and (self.factor != -1 or self.full_matrix or self.decompose_both):
            raise ValueError("factor, full_matrix and decompose_both are lokr options; remove them for type loha")
        if self.factor == 0 or self.factor < -1:
            raise ValueError(f"factor {self.factor}: a positive Kronecker factor, or -1 for the most balanced split")
        if self.preset is not None:
            # The default stays in frozen recipes (every field is written out), so only another value conflicts.
            if self.targets != LoraSection.model_fields["targets"].default:
                raise ValueError("targets and preset both choose modules: keep one")
            if not (self.preset.target_module or self.preset.target_name or self.preset.module_algo_map):
                raise ValueError("preset names no modules: give target_module, target_name or module_algo_map")
        return self


class TrainSection(StrictModel):
    train_batch_size: int = Field(1, ge=1)
    """Samples per GPU per micro-step."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_train_steps: int | None = Field(None, ge=1)
    """Optimizer steps; when None, num_train_epochs decides."""
    stop_at_step: int | None = Field(None, ge=1)
    """This submission ends after this step as at the end of a run (checkpoint, validation round, report)
    while the learning-rate schedule keeps max_train_steps as its horizon; `resume: latest` continues."""
    num_train_epochs: int | None = Field(None, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine", "polynomial"] = "constant"
    """Every schedule warms up linearly over lr_warmup_steps first (constant too: diffusers' constant_with_warmup)."""
    lr_warmup_steps: int = Field(0, ge=0)
    lr_end: float = Field(1e-7, ge=0)
    """polynomial: the learning rate it decays to (diffusers' get_scheduler default)."""
    lr_power: float = Field(1.0, gt=0)
    """polynomial: the decay's exponent (1: linear to lr_end)."""
    optimizer: Literal["adamw", "adamw_bf16"] = "adamw"
    """adamw: fp32 master weights and states; adamw_bf16 (fsdp2): bf16 weights and states, Kahan-compensated updates."""
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-4, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    mixed_precision: Literal["bf16", "fp32"] = "bf16"
    max_grad_norm: float = Field(1.0, ge=0)
    """The clipping threshold (0: no clipping); grad_clip_method says how it is applied."""
    grad_clip_method: Literal["norm", "value"] = "norm"
    """norm: scale all gradients so their global L2 norm is at most max_grad_norm; value: clamp each
    gradient element to ±max_grad_norm (SimpleTuner's default), after the gradients are reduced."""
    gradient_checkpointing: bool | str = "auto"
    """Activation checkpointing (sd35dist/config/activation_policy.py): true (every block), false, every_N
    (every N-th block), attention or mlp (that part of every block), or auto: on a GPU the policy with the
    least recomputation whose predicted peak fits its memory (what `sd35dist plan` prints); without a GPU, true."""
    compile_blocks: bool | Literal["auto"] = "auto"
    """torch.compile each transformer block (the sequence length dynamic: no recompile per aspect bucket);
    auto: on with CUDA, off on CPU."""
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    """torch.compile's backend for compile_blocks. inductor generates fused kernels (the speed); aot_eager
    traces forward and backward as inductor does but runs torch's own kernels, eager only captures graphs:
    the ways to tell a numerical difference that compile makes from one inductor's kernels make (and the
    CPU tests' quick compile)."""
    fp8: Literal["none", "tensorwise", "rowwise"] = "none"
    """FP8 matmuls in the transformer blocks' Linears (torchao float8 training; fsdp2 only): tensorwise (one
    scale per tensor; FSDP2 all-gathers the weights in fp8) or rowwise (one scale per row: more accurate,
    bf16 all-gathers). The first and last blocks, the embedders and the output head stay bf16. Needs a GPU
    with FP8 (H100/H200: the profile's hardware.gpu); on CPU it runs torchao's emulation (tests)."""
    weighting_scheme: Literal["logit_normal", "mode", "cosmap", "uniform", "none"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    flow_shift: float | None = Field(None, gt=0)
    """Shift of the training timestep schedule (σ' = sσ / (1 + (s − 1)σ)); None: the model's
    scheduler config (3.0 for SD3.5). SimpleTuner's flow_schedule_shift."""
    caption_dropout_probability: float = Field(0.0, ge=0, le=1)
    ema: EmaSection = Field(default_factory=EmaSection)
    checkpointing_steps: int = Field(400, ge=1)
    checkpoints_total_limit: int = Field(2, ge=1)
    async_checkpointing: bool = False
    """FSDP2: write checkpoints in the background while training goes on (published when complete)."""
    resume: str = "latest"
    """latest | none | a checkpoint path."""
    resume_allow_changes: list[str] = Field(default_factory=list)
    """Keys (model.pretrained), sections (data) or `*` whose change since the checkpoint's recipe resume accepts."""
    lora: LoraSection | None = None
    """An adapter fine-tune (LoRA, LoKr, LoHa); absent: a full fine-tune (sd35dist/models/lora.py)."""

    @pydantic.field_validator("gradient_checkpointing")
    @classmethod
    def _checkpointing(cls, value: bool | str) -> bool | str:
        parse_policy(value)
        return value

    @pydantic.model_validator(mode="after")
    def _polynomial_end(self) -> TrainSection:
        if self.lr_scheduler == "polynomial" and not self.lr_end < self.learning_rate:
            raise ValueError(f"lr_end {self.lr_end:g} must be below learning_rate {self.learning_rate:g} "
                             "(the polynomial schedule decays from one to the other)")
        return self


class LoggingSection(StrictModel):
    report_to: Literal["wandb", "none"] = "wandb"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    tracker_project_name: str = "sd35dist"
    tracker_run_name: str | None = None


class OutputSection(StrictModel):
    dir: str
    """Checkpoints and exports go here (local path, or a shared filesystem on a cluster)."""


class Recipe(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Short name; the Slurm job name and run directory start with it."""
    seed: int = 0
    model: ModelSection
    data: DataSection
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    output: OutputSection
    validation: ValidationSection = Field(default_factory=ValidationSection)
    """Images rendered while training, by `sd35dist sample` and `sd35dist sweep` (config/validation_section.py)."""

    @pydantic.model_validator(mode="after")
    def _optimizer_fits_strategy(self) -> Recipe:
        if self.train.optimizer == "adamw_bf16" and self.parallel.strategy != "fsdp2":
            # DeepSpeed has no compensated or stochastically rounded bf16 Adam: its pure-bf16
            # mode drops every update below half a bf16 ulp (docs/numerics.md).
            raise _error_at(("train", "optimizer"), "adamw_bf16",
                            f"adamw_bf16 runs on strategy fsdp2 only; with {self.parallel.strategy} use adamw")
        if self.train.fp8 != "none" and self.parallel.strategy != "fsdp2":
            # torchao's float8 training composes with FSDP2 (fp8 all-gather); DeepSpeed's partitioning is untested with it.
            raise _error_at(("train", "fp8"), self.train.fp8,
                            f"fp8 runs on strategy fsdp2 only; with {self.parallel.strategy} use fp8: none")
        if self.train.fp8 != "none" and self.train.lora is not None:
            raise _error_at(("train", "fp8"), self.train.fp8, "fp8 trains full fine-tunes; with train.lora use fp8: none")
        if self.train.lora is not None and self.parallel.strategy == "zero3":
            # ZeRO-3 partitions every parameter, frozen or not; its checkpoints then hold the whole base model.
            raise _error_at(("train", "lora"), "zero3", "LoRA runs on strategy fsdp2 or zero2, not zero3")
        weights = self.validation.weights
        if weights != "model" and not self.train.ema.enabled:
            raise _error_at(("validation", "weights"), weights,
                            f"{weights} renders the EMA weights, but train.ema.enabled is false: "
                            "set train.ema.enabled: true or use weights: model")
        if weights != "model" and self.parallel.strategy != "fsdp2":
            # ZeRO's EMA is kept as fragments of the fp32 master weights, not a model to render with.
            raise _error_at(("validation", "weights"), weights,
                            f"{weights} needs strategy fsdp2 (with {self.parallel.strategy} the EMA is not "
                            "renderable while training): use weights: model")
        return self


def _error_at(loc: tuple[str, ...], value: Any, message: str) -> pydantic.ValidationError:
    """A validation error at `loc` (a model validator's own errors would point at the recipe's root)."""
    from pydantic_core import InitErrorDetails, PydanticCustomError

    error = PydanticCustomError("value_error", "{error}", {"error": message})
    return pydantic.ValidationError.from_exception_data("Recipe", [InitErrorDetails(type=error, loc=loc, input=value)])


RECIPE_KEYS = frozenset(Recipe.model_fields)


def load_recipe(path: Path, overrides: list[tuple[list[str], Any]] = ()) -> Recipe:  # type: ignore[assignment]
    return load_model(Recipe, path, overrides)


def is_url(text: str) -> bool:
    return "://" in text and text.split("://", 1)[0].isidentifier()


def _absolute(path_or_url: str, base: Path) -> str:
    if is_url(path_or_url):
        return path_or_url
    return str((base / os.path.expanduser(path_or_url)).resolve())


def resolve_paths(recipe: Recipe, base: Path, recipe_dir: Path | None = None) -> Recipe:
    """Relative local paths → absolute against `base` (the working directory), so a frozen recipe
    means the same anywhere; `validation.prompts_file` is relative to `recipe_dir`, the recipe
    file's directory (docs/validation.md), when it is given."""
    prompts_base = base if recipe_dir is None else recipe_dir
    return recipe.model_copy(
        update={
            "model": recipe.model.model_copy(update={"pretrained": (
                recipe.model.pretrained if hub_id_of(recipe.model.pretrained, base) else
                _absolute(recipe.model.pretrained, base))}),
            "data": recipe.data.model_copy(
                update={
                    "cache_url": _absolute(recipe.data.cache_url, base),
                    "datasets": [d.model_copy(update={"source": _absolute(d.source, base),
                                                      "image_root": _absolute(d.image_root, base) if d.image_root else None})
                                 for d in recipe.data.datasets],
                }
            ),
            "output": recipe.output.model_copy(update={"dir": _absolute(recipe.output.dir, base)}),
            "validation": recipe.validation.model_copy(update={"prompts_file": (
                _absolute(recipe.validation.prompts_file, prompts_base) if recipe.validation.prompts_file else None)}),
        }
    )


def recipe_hash(recipe: Recipe) -> str:
    """sha256 of the canonical JSON form: equal recipes hash equal whatever their YAML layout."""
    canonical = json.dumps(recipe.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def recipe_yaml(recipe: Recipe) -> str:
    return dump_yaml(recipe)
