"""SimpleTuner's options as this importer knows them: each one's type, and where it goes in a
recipe or why it goes nowhere. Pure data and value parsing; simpletuner.py applies them.

An option missing from these tables is refused (a typo must not vanish silently). `MAPPED`
names the options a converter in simpletuner.py handles; `UNMAPPED` the ones with no meaning
here, each with the reason printed to the user.
"""

from __future__ import annotations

from typing import Any

# option → value type ("int", "float", "bool", "str"); converted in simpletuner.py
MAPPED: dict[str, str] = {
    "pretrained_model_name_or_path": "str", "model_family": "str", "model_type": "str",
    "output_dir": "str", "data_backend_config": "str", "seed": "int",
    "train_batch_size": "int", "gradient_accumulation_steps": "int",
    "max_train_steps": "int", "num_train_epochs": "int",
    "learning_rate": "float", "lr_scheduler": "str", "lr_warmup_steps": "int", "lr_end": "float", "lr_power": "float",
    "optimizer": "str", "adam_beta1": "float", "adam_beta2": "float", "adam_weight_decay": "float",
    "adam_epsilon": "float", "max_grad_norm": "float", "mixed_precision": "str",
    "gradient_checkpointing": "bool", "caption_dropout_probability": "float",
    "checkpointing_steps": "int", "checkpoints_total_limit": "int", "resume_from_checkpoint": "str",
    "use_ema": "bool", "ema_decay": "float", "ema_update_interval": "int",
    "report_to": "str", "tracker_project_name": "str", "tracker_run_name": "str",
    "resolution": "float", "resolution_type": "str", "minimum_image_size": "float",
    "instance_prompt": "str", "vae_batch_size": "int", "tokenizer_max_length": "int",
    "weighting_scheme": "str", "logit_mean": "float", "logit_std": "float", "mode_scale": "float",
    "lora_rank": "int", "lora_alpha": "float", "lora_dropout": "float", "lora_init_type": "str", "lora_type": "str",
    "validation_prompt": "str", "validation_negative_prompt": "str", "validation_seed": "int",
    "validation_steps": "int", "validation_resolution": "str", "validation_guidance": "float",
    "validation_num_inference_steps": "int", "data_backend_sampling": "str",
}

NO_VALIDATION = "not a validation setting here (validation: prompts, seeds, steps, scale, resolutions)"
UNMAPPED: dict[str, tuple[str, str]] = {
    # LoRA (rank, alpha, dropout, init and type are MAPPED)
    "use_dora": ("bool", "DoRA is not offered: the recipe trains a plain LoRA (train.lora)"),
    "lycoris_config": ("str", "LyCORIS adapters are not built here: the recipe trains a plain LoRA (train.lora)"),
    "init_lora": ("str", "starting from an existing LoRA is not offered; train.lora starts from peft's init"),
    # validation (prompt, negative prompt, seed, steps, resolution, guidance, inference steps are MAPPED)
    **{key: (kind, NO_VALIDATION) for key, kind in (
        ("validation_guidance_rescale", "float"),
        ("validation_torch_compile", "bool"), ("validation_guidance_real", "float"),
        ("validation_no_cfg_until_timestep", "int"), ("num_validation_images", "int"),
        ("validation_prompt_library", "bool"), ("user_prompt_library", "str"), ("disable_benchmark", "bool"),
        ("evaluation_type", "str"), ("validation_noise_scheduler", "str"))},
    # hub, hardware and housekeeping
    "push_to_hub": ("bool", "no hub upload here: share the single-file export (`sd35dist export --format single-file`)"),
    "push_checkpoints_to_hub": ("bool", "no hub upload here"),
    "hub_model_id": ("str", "no hub upload here"),
    "model_card_safe_for_work": ("bool", "no model card is written"),
    "enable_xformers_memory_efficient_attention": ("bool", "PyTorch's scaled-dot-product attention is always used"),
    "allow_tf32": ("bool", "not a recipe setting here"),
    "metadata_update_interval": ("int", "the cache builder writes its manifest once, when complete"),
    "delete_unwanted_images": ("bool", "images are never deleted: rejects are listed in the cache's report.json"),
    "delete_problematic_images": ("bool", "images are never deleted: rejects are listed in the cache's report.json"),
    "training_scheduler_timestep_spacing": ("str", "training draws σ by train.weighting_scheme; spacing applies to samplers"),
    "inference_scheduler_timestep_spacing": ("str", "validation samples with diffusers' FlowMatchEulerDiscreteScheduler as the SD3 pipeline configures it"),
    "snr_gamma": ("float", "min-SNR weighting is for ε/v models; SD3 flow matching weights by train.weighting_scheme"),
    "aspect_bucket_rounding": ("int", "buckets are an explicit list here (data.buckets)"),
    "base_model_precision": ("str", "full fine-tunes keep the base weights unquantised"),
    "num_processes": ("int", "the cluster profile decides GPUs per node"),
    "num_machines": ("int", "the cluster profile decides the node count"),
    "dynamo_backend": ("str", "per-block torch.compile is train.compile_blocks"),
    "read_batch_size": ("int", "the stream's prefetch is data.stream.prefetch_shards"),
    "write_batch_size": ("int", "cache shards are sized by data.shard_target_mb"),
    "aws_max_pool_connections": ("int", "the stream's threads are data.stream.fetch_threads"),
    "torch_num_threads": ("int", "not a recipe setting here"),
    "image_processing_batch_size": ("int", "the cache builder batches by data.cache_batch_size"),
    "controlnet": ("bool", "ControlNet training is not part of sd35dist"),
    "flux_guidance_value": ("float", "an option of another model family (Flux)"),
    "flux_lora_target": ("str", "an option of another model family (Flux)"),
    "t5_padding": ("str", "T5 padding follows diffusers' SD3 pipeline"),
}

# config.env variable → option (SimpleTuner's env_file.py table, and the older train.sh names the
# seed tutorial's config.env still uses)
ENV_NAMES: dict[str, str] = {
    "RESUME_CHECKPOINT": "resume_from_checkpoint", "DATALOADER_CONFIG": "data_backend_config",
    "ASPECT_BUCKET_ROUNDING": "aspect_bucket_rounding", "TRAINING_SEED": "seed", "USE_EMA": "use_ema",
    "EMA_DECAY": "ema_decay", "USE_XFORMERS": "enable_xformers_memory_efficient_attention",
    "MINIMUM_RESOLUTION": "minimum_image_size", "OUTPUT_DIR": "output_dir", "USE_DORA": "use_dora",
    "LORA_TYPE": "lora_type", "LYCORIS_CONFIG": "lycoris_config", "PUSH_TO_HUB": "push_to_hub",
    "PUSH_CHECKPOINTS": "push_checkpoints_to_hub", "MAX_NUM_STEPS": "max_train_steps", "NUM_EPOCHS": "num_train_epochs",
    "CHECKPOINTING_STEPS": "checkpointing_steps", "CHECKPOINTING_LIMIT": "checkpoints_total_limit",
    "HUB_MODEL_NAME": "hub_model_id", "MODEL_CARD_SAFE_FOR_WORK": "model_card_safe_for_work",
    "TRACKER_PROJECT_NAME": "tracker_project_name", "TRACKER_RUN_NAME": "tracker_run_name",
    "MODEL_TYPE": "model_type", "MODEL_NAME": "pretrained_model_name_or_path", "MODEL_FAMILY": "model_family",
    "TRAIN_BATCH_SIZE": "train_batch_size", "USE_GRADIENT_CHECKPOINTING": "gradient_checkpointing",
    "CAPTION_DROPOUT_PROBABILITY": "caption_dropout_probability", "RESOLUTION_TYPE": "resolution_type",
    "RESOLUTION": "resolution", "VALIDATION_SEED": "validation_seed", "VALIDATION_STEPS": "validation_steps",
    "VALIDATION_RESOLUTION": "validation_resolution", "VALIDATION_GUIDANCE": "validation_guidance",
    "VALIDATION_GUIDANCE_RESCALE": "validation_guidance_rescale",
    "VALIDATION_NUM_INFERENCE_STEPS": "validation_num_inference_steps", "VALIDATION_PROMPT": "validation_prompt",
    "VALIDATION_NEGATIVE_PROMPT": "validation_negative_prompt", "ALLOW_TF32": "allow_tf32",
    "MIXED_PRECISION": "mixed_precision", "OPTIMIZER": "optimizer", "LEARNING_RATE": "learning_rate",
    "LR_SCHEDULE": "lr_scheduler", "LR_WARMUP_STEPS": "lr_warmup_steps", "LR_END": "lr_end",
    "BASE_MODEL_PRECISION": "base_model_precision", "TRAINING_NUM_PROCESSES": "num_processes",
    "TRAINING_NUM_MACHINES": "num_machines", "VALIDATION_TORCH_COMPILE": "validation_torch_compile",
    "TRAINER_DYNAMO_BACKEND": "dynamo_backend", "TRAINING_DYNAMO_BACKEND": "dynamo_backend",
    "VALIDATION_GUIDANCE_REAL": "validation_guidance_real",
    "VALIDATION_NO_CFG_UNTIL_TIMESTEP": "validation_no_cfg_until_timestep",
    "TRAINING_SCHEDULER_TIMESTEP_SPACING": "training_scheduler_timestep_spacing",
    "INFERENCE_SCHEDULER_TIMESTEP_SPACING": "inference_scheduler_timestep_spacing",
    "GRADIENT_ACCUMULATION_STEPS": "gradient_accumulation_steps", "FLUX_GUIDANCE_VALUE": "flux_guidance_value",
    "FLUX_LORA_TARGET": "flux_lora_target", "METADATA_UPDATE_INTERVAL": "metadata_update_interval",
    "READ_BATCH_SIZE": "read_batch_size", "WRITE_BATCH_SIZE": "write_batch_size",
    "AWS_MAX_POOL_CONNECTIONS": "aws_max_pool_connections", "TORCH_NUM_THREADS": "torch_num_threads",
    "IMAGE_PROCESSING_BATCH_SIZE": "image_processing_batch_size", "INSTANCE_PROMPT": "instance_prompt",
    "VAE_BATCH_SIZE": "vae_batch_size", "DELETE_ERRORED_IMAGES": "delete_problematic_images",
    "DELETE_SMALL_IMAGES": "delete_unwanted_images", "MIN_SNR_GAMMA": "snr_gamma", "CONTROLNET": "controlnet",
}
ENV_ARGUMENT_LISTS = ("TRAINER_EXTRA_ARGS", "DEBUG_EXTRA_ARGS")
"""config.env variables holding command-line options (`--lora_rank=768 --report_to=wandb`)."""
ENV_IGNORED: dict[str, str] = {
    "ACCELERATE_EXTRA_ARGS": "accelerate's launch options: the cluster profile and torchrun launch here",
    "PURE_BF16": "weights are bf16 with train.optimizer adamw_bf16 (mapped from OPTIMIZER)",
    "STABLE_DIFFUSION_3": "an old SD3 switch: the model family is SD3 here",
    "TOKENIZERS_PARALLELISM": "an environment setting, not a training option",
    "CONFIG_BACKEND": "SimpleTuner's own config switch", "ENV": "SimpleTuner's own config switch",
}

# multidatabackend.json entry keys: mapped ones, and why the others are not
BACKEND_MAPPED = frozenset({"id", "type", "instance_data_dir", "caption_strategy", "instance_prompt", "repeats", "crop",
                            "crop_style", "minimum_image_size", "resolution", "resolution_type", "dataset_type",
                            "only_instance_prompt", "disabled", "aws_bucket_name", "aws_data_prefix", "aws_endpoint_url",
                            "aws_region_name", "probability", "parquet", "csv_file", "csv_caption_column",
                            "csv_url_column"})
BACKEND_UNMAPPED: dict[str, str] = {
    "cache_dir_vae": "the VAE latents go into the one cache at data.cache_url (`sd35dist cache`); SimpleTuner's are not reused",
    "cache_dir": "text embeddings go into the one cache at data.cache_url; SimpleTuner's are not reused",
    "crop_aspect": "images are center-cropped to the nearest of data.buckets",
    "crop_aspect_buckets": "data.buckets lists every bucket",
    "maximum_image_size": "images are resized straight to their bucket (data.datasets[].max_upscale limits enlarging)",
    "target_downsample_size": "images are resized straight to their bucket",
    "skip_file_discovery": "the cache builder always lists the dataset once",
    "metadata_backend": "the cache's manifest.json holds the metadata (parquet: the table becomes a parquet dataset)",
    "write_batch_size": "cache shards are sized by data.shard_target_mb",
    "default": "one cache holds the text embeddings of every dataset",
    "prepend_instance_prompt": "captions are used as written (put the trigger word in them)",
    "vae_cache_clear_each_epoch": "the latent cache is built once",
    "csv_cache_dir": "a CSV list's images are read from their URLs by `sd35dist cache`; only the latent cache is kept",
    "ignore_epochs": "every dataset is in every epoch",
    "aws_access_key_id": "credentials come from the environment here, never from files",
    "aws_secret_access_key": "credentials come from the environment here, never from files",
    "max_upscale_threshold": "see data.datasets[].max_upscale (a ratio, not a fraction over 1)",
    "hash_filenames": "cache entries are named by the cache builder",
    "preserve_data_backend_cache": "the cache is built once and kept",
    "vae_cache_scan_behaviour": "the cache is built once and verified by sha256",
    "caption_filter_list": "captions are used as written",
}


class OptionError(ValueError):
    """A value of the wrong type; the message says what was expected."""


def parse_value(kind: str, value: Any) -> Any:
    """A SimpleTuner value (JSON types, or the strings config.env and configure.py write) as `kind`."""
    if kind == "str":
        if isinstance(value, (dict, list)):
            raise OptionError(f"expected text, got {type(value).__name__}")
        return str(value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        raise OptionError(f"expected true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, bool):
            raise OptionError(f"expected an integer, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise OptionError(f"expected an integer, got {value!r}") from None
        if not isinstance(number, (int, float)) or number != int(number):
            raise OptionError(f"expected an integer, got {value!r}")
        return int(number)
    if kind == "float":
        if isinstance(value, bool):
            raise OptionError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise OptionError(f"expected a number, got {value!r}") from None
    raise AssertionError(kind)


def option_kind(option: str) -> str | None:
    """The value type of a known option, None for an unknown one."""
    if option in MAPPED:
        return MAPPED[option]
    if option in UNMAPPED:
        return UNMAPPED[option][0]
    return None
