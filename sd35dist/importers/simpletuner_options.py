"""SimpleTuner's options as this importer knows them: for every option of SimpleTuner's current
parser, where it goes in a recipe (and with which default) or why it goes nowhere.

Derived from SimpleTuner's own source at `SIMPLETUNER_COMMIT` (its configuration field
registry, from which `parse_cmdline_args` builds the parser; its env-file loader; its
data-backend configuration): tests/fixtures/simpletuner/options.json lists what was derived,
and tests/test_import_simpletuner_table.py fails when an option of that list has no entry here.

- `MAPPED`: options a converter in simpletuner.py applies, with SimpleTuner's default, which
  the recipe gets written out when the config leaves the option out;
- `simpletuner_unapplied.NOT_APPLIED`: options with no place here, each with the reason;
- `SAME_HERE`: options whose listed values mean what sd35dist does anyway (nothing to write);
- `RENAMED` / `ENV_NAMES`: older names SimpleTuner's loaders still turn into current ones.

An option in none of these is unknown (a typo) and refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SIMPLETUNER_COMMIT = "bc8e6ab7738ce457a2ed8eb2d26cadd91c6442cb"
"""The bghira/SimpleTuner commit these tables were derived from."""


@dataclass(frozen=True)
class Mapped:
    kind: str
    """Value type: int, float, bool, str, list (a JSON list or comma-separated text)."""
    default: Any
    """SimpleTuner's default (its parser's; None: unset there)."""
    target: str
    """Where it goes in the recipe, for the option table in docs/simpletuner.md."""


MAPPED: dict[str, Mapped] = {
    # model and output
    "pretrained_model_name_or_path": Mapped("str", None, "`model.pretrained` (a Hugging Face id is kept: submit resolves it)"),
    "model_family": Mapped("str", None, "— (must be `sd3`: any other family, or none, is refused)"),
    "model_flavour": Mapped("str", None, "`model.pretrained` when no path is given (SimpleTuner's SD3 flavours)"),
    "model_type": Mapped("str", "full", "`train.lora` (`lora`) or none (`full`)"),
    "revision": Mapped("str", None, "`model.pretrained` as `id@revision`"),
    "pretrained_transformer_model_name_or_path": Mapped("str", None, "`model.pretrained` when it names the same repository"),
    "pretrained_transformer_subfolder": Mapped("str", "transformer", "`model.transformer_subfolder`"),
    "output_dir": Mapped("str", "simpletuner-results", "`output.dir`; `data.cache_url` = `<output_dir>/cache`"),
    "seed": Mapped("int", None, "`seed` (unset there: 0 here)"),
    "data_backend_config": Mapped("str", None, "the datasets file read for `data.datasets`"),
    "tracker_run_name": Mapped("str", "simpletuner-testing", "`name` (sanitised) and `logging.tracker_run_name`"),
    "tracker_project_name": Mapped("str", "simpletuner", "`logging.tracker_project_name`"),
    "report_to": Mapped("str", "none", "`logging.report_to` (wandb or none)"),
    # steps, batch, optimizer
    "train_batch_size": Mapped("int", 4, "`train.train_batch_size`"),
    "gradient_accumulation_steps": Mapped("int", 1, "`train.gradient_accumulation_steps`"),
    "max_train_steps": Mapped("int", None, "`train.max_train_steps` (0: unset)"),
    "num_train_epochs": Mapped("int", 1, "`train.num_train_epochs` (0: unset)"),
    "learning_rate": Mapped("float", 4e-7, "`train.learning_rate`"),
    "lr_scheduler": Mapped("str", "constant_with_warmup", "`train.lr_scheduler` (see below)"),
    "lr_warmup_steps": Mapped("int", 0, "`train.lr_warmup_steps`"),
    "lr_end": Mapped("float", 4e-7, "`train.lr_end` (polynomial)"),
    "lr_power": Mapped("float", 0.8, "`train.lr_power` (polynomial)"),
    "optimizer": Mapped("str", "adamw_bf16", "`train.optimizer` (adamw, adamw_bf16)"),
    "adam_beta1": Mapped("float", 0.9, "`train.adam_beta1`"),
    "adam_beta2": Mapped("float", 0.999, "`train.adam_beta2`"),
    "optimizer_beta1": Mapped("float", None, "`train.adam_beta1` when set (it overrides adam_beta1)"),
    "optimizer_beta2": Mapped("float", None, "`train.adam_beta2` when set (it overrides adam_beta2)"),
    "adam_weight_decay": Mapped("float", 0.01, "`train.adam_weight_decay`"),
    "adam_epsilon": Mapped("float", 1e-8, "`train.adam_epsilon`"),
    "max_grad_norm": Mapped("float", 2.0, "`train.max_grad_norm`"),
    "grad_clip_method": Mapped("str", "value", "`train.grad_clip_method` (value or norm)"),
    "mixed_precision": Mapped("str", "bf16", "`train.mixed_precision` (bf16; no → fp32)"),
    "gradient_checkpointing": Mapped("bool", True, "`train.gradient_checkpointing`"),
    "dynamo_backend": Mapped("str", "no", "`train.compile_blocks` (any backend but no: per-block torch.compile)"),
    "caption_dropout_probability": Mapped("float", 0.1, "`train.caption_dropout_probability`"),
    "checkpoint_step_interval": Mapped("int", 500, "`train.checkpointing_steps`"),
    "checkpoints_total_limit": Mapped("int", 5, "`train.checkpoints_total_limit`"),
    "resume_from_checkpoint": Mapped("str", "latest", "`train.resume` (latest; a SimpleTuner checkpoint is listed)"),
    "use_ema": Mapped("bool", False, "`train.ema.enabled`"),
    "ema_decay": Mapped("float", 0.995, "`train.ema.decay`"),
    "ema_update_interval": Mapped("int", 1, "`train.ema.update_interval`"),
    "ema_warmup_steps": Mapped("int", 0, "`train.ema.start_step` (the EMA copies the weights until then)"),
    # timesteps
    "flow_schedule_shift": Mapped("float", 3.0, "`train.flow_shift` (0: the model's scheduler shift)"),
    "flow_sigmoid_scale": Mapped("float", 1.0, "`train.logit_std` (sigmoid of N(0, scale²): logit-normal)"),
    "flow_use_uniform_schedule": Mapped("bool", False, "`train.weighting_scheme: uniform`"),
    # data
    "resolution": Mapped("float", 1024, "`data.buckets` (the 8 SD3.5 buckets scaled to the area)"),
    "resolution_type": Mapped("str", "pixel_area", "how `resolution` and image sizes are read"),
    "minimum_image_size": Mapped("float", None, "`data.datasets[].minimum_image_size` (shorter side, px)"),
    "maximum_image_size": Mapped("float", None, "— (images go straight to their bucket here; listed when set)"),
    "target_downsample_size": Mapped("float", None, "— (images go straight to their bucket here; listed when set)"),
    "caption_strategy": Mapped("str", "filename", "default of `data.datasets[].caption_strategy`"),
    "instance_prompt": Mapped("str", None, "default of `data.datasets[].instance_prompt`"),
    "only_instance_prompt": Mapped("bool", False, "every dataset's `caption_strategy: instance_prompt`"),
    "vae_batch_size": Mapped("int", 4, "`data.cache_batch_size`"),
    "data_backend_sampling": Mapped("str", "auto-weighting", "`data.dataset_sampling` (auto-weighting, uniform)"),
    "tokenizer_max_length": Mapped("int", None, "`data.max_sequence_length` (unset: 154, SimpleTuner's SD3 limit)"),
    # LoRA
    "lora_rank": Mapped("int", 16, "`train.lora.rank`"),
    "lora_alpha": Mapped("float", None, "`train.lora.alpha` (unset: = rank)"),
    "lora_dropout": Mapped("float", 0.1, "`train.lora.dropout`"),
    "lora_init_type": Mapped("str", "default", "`train.lora.init` (default, gaussian)"),
    "lora_type": Mapped("str", "standard", "`train.lora.type` (standard: `lora`; lycoris: the lycoris_config's algo, `lokr` or `loha`)"),
    "lycoris_config": Mapped(
        "str", "config/lycoris_config.json",
        "`train.lora` type, rank, alpha, factor, full_matrix, decompose_both, preset "
        "(the JSON file's algo, linear_dim, linear_alpha, factor …, apply_preset)",
    ),
    "peft_lora_target_modules": Mapped("list", None, "`train.lora.targets` (unset: `attention_image`, SimpleTuner's SD3 default)"),
    # validation
    "validation_prompt": Mapped("str", None, "`validation.prompts`"),
    "user_prompt_library": Mapped("str", None, "`validation.prompts` (the library's prompts, when the file is found)"),
    "validation_disable_unconditional": Mapped("bool", False, "`validation.prompts` gets the empty prompt unless true"),
    "validation_negative_prompt": Mapped("str", "blurry, cropped, ugly", "`validation.negative_prompt`"),
    "validation_seed": Mapped("int", None, "`validation.seeds` (unset: the seed, else 0, as SimpleTuner)"),
    "validation_step_interval": Mapped("int", 100, "`validation.every_n_steps`"),
    "validation_on_startup": Mapped("bool", False, "`validation.at_start`"),
    "validation_disable": Mapped("bool", False, "no `validation` section"),
    "validation_guidance": Mapped("float", 7.5, "`validation.guidance_scale`"),
    "validation_num_inference_steps": Mapped("int", 30, "`validation.num_inference_steps`"),
    "validation_resolution": Mapped("str", "256", "`validation.resolutions` (`1024`, `1024x768`, comma lists)"),
    "validation_guidance_skip_layers": Mapped("list", None, "`validation.skip_layer_guidance.layers`"),
    "validation_guidance_skip_layers_start": Mapped("float", 0.01, "`validation.skip_layer_guidance.start`"),
    "validation_guidance_skip_layers_stop": Mapped("float", 0.2, "`validation.skip_layer_guidance.stop`"),
    "validation_guidance_skip_scale": Mapped("float", 2.8, "`validation.skip_layer_guidance.scale`"),
}

SD3_FLAVOURS = {"medium": "stabilityai/stable-diffusion-3.5-medium", "large": "stabilityai/stable-diffusion-3.5-large"}
"""SimpleTuner's SD3 HUGGINGFACE_PATHS: the model a config without a path trains (flavour medium by default)."""
SD3_DEFAULT_FLAVOUR = "medium"
SD3_T5_TOKENS = 154
"""SimpleTuner's SD3 check_user_config sets tokenizer_max_length to 154 when unset (and caps it there)."""

SAME_HERE: dict[str, tuple[Any, ...]] = {
    "t5_padding": ("unmodified",),
    "sd3_clip_uncond_behaviour": ("empty_string",),
    "sd3_t5_uncond_behaviour": (None, "empty_string"),
    "attention_mechanism": ("diffusers",),
    "base_model_precision": ("no_change",),
    "text_encoder_1_precision": ("no_change",),
    "text_encoder_2_precision": ("no_change",),
    "text_encoder_3_precision": ("no_change",),
    "quantize_via": ("accelerator", "cpu", "pipeline"),
    "vae_cache_ondemand": (False,),
    "vae_cache_disable": (False,),
    "validation_multigpu": ("batch-parallel",),
    "fsdp_enable": (True, False),
    "controlnet": (False,),
    "control": (False,),
    "use_dora": (False,),
    "offset_noise": (False,),
    "input_perturbation": (0, 0.0),
    "loss_type": ("l2",),
    "flow_schedule_auto_shift": (False,),
    "flow_use_beta_schedule": (False,),
    "validation_guidance_rescale": (0, 0.0),
    "validation_noise_scheduler": (None,),
    "num_validation_images": (1,),
    "train_text_encoder": (False,),
    "prepend_instance_prompt": (False,),
    "snr_gamma": (None,),
    "timestep_bias_strategy": (None, "none"),
    "lora_format": ("diffusers", "comfyui"),
    "push_to_hub": (False,),
    "push_checkpoints_to_hub": (False,),
    "peft_lora_mode": ("standard",),
}
"""Options whose listed values ask for what sd35dist does anyway: imported without a note.
Other values of these options are listed like NOT_APPLIED ones (simpletuner_unapplied.py)."""

RENAMED: dict[str, str] = {
    "checkpointing_steps": "checkpoint_step_interval",
    "validation_steps": "validation_step_interval",
    "save_total_limit": "checkpoints_total_limit",
    "fused_qkv_projections": "fuse_qkv_projections",
    "vae_cache_preprocess": "vae_cache_ondemand",  # negated: preprocess false = on demand
    "ignore_final_epochs": "strict_epoch_limit",  # negated
}
"""Old option names SimpleTuner's loaders still accept (cli_utils' legacy handlers, parser aliases)."""
NEGATED_RENAMES = frozenset({"vae_cache_preprocess", "ignore_final_epochs"})
DROPPED_BY_SIMPLETUNER = {
    "aspect_ratio_bucketing": "a dataset-only setting SimpleTuner's loader drops from the options",
    "aspect_ratio_bucket_min": "a dataset-only setting SimpleTuner's loader drops from the options",
    "aspect_ratio_bucket_max": "a dataset-only setting SimpleTuner's loader drops from the options",
    "repeats": "a dataset setting (multidatabackend.json); SimpleTuner's loader drops it from the options",
    "ez_model_type": "a web UI field SimpleTuner's loader drops",
    "__disabled_fields__": "a web UI field SimpleTuner's loader drops",
    "__active_tab__": "a web UI field SimpleTuner's loader drops",
}
"""Names SimpleTuner's loaders read and throw away (cli_utils' legacy handlers without a target)."""

RETIRED: dict[str, str] = {
    "enable_xformers_memory_efficient_attention": "gone from SimpleTuner's parser (attention_mechanism replaced it); "
                                                  "PyTorch's scaled-dot-product attention is used here",
    "allow_tf32": "gone from SimpleTuner's parser (TF32 is on unless disable_tf32); not a recipe setting here",
    "validation_torch_compile": "gone from SimpleTuner's parser; validation renders with the training model here",
}
"""Options older SimpleTuner configs (the SD3.5 tutorial's) carry that today's parser no longer has."""

# config.env variable → option: SimpleTuner's env_file.env_to_args_map at SIMPLETUNER_COMMIT
ENV_NAMES: dict[str, str] = {
    "RESUME_CHECKPOINT": "resume_from_checkpoint", "DATALOADER_CONFIG": "data_backend_config",
    "ASPECT_BUCKET_ROUNDING": "aspect_bucket_rounding", "TRAINING_SEED": "seed", "ACCELERATE_CONFIG_PATH": "accelerate_config",
    "ACCELERATE_EXTRA_ARGS": "accelerate_extra_args", "USE_EMA": "use_ema",
    "USE_XFORMERS": "enable_xformers_memory_efficient_attention", "MINIMUM_RESOLUTION": "minimum_image_size",
    "OUTPUT_DIR": "output_dir", "USE_DORA": "use_dora", "USE_BITFIT": "layer_freeze_strategy", "LORA_TYPE": "lora_type",
    "LYCORIS_CONFIG": "lycoris_config", "PUSH_TO_HUB": "push_to_hub", "PUSH_TO_HUB_BACKGROUND": "push_to_hub_background",
    "PUSH_CHECKPOINTS": "push_checkpoints_to_hub", "PUBLISHING_CONFIG": "publishing_config", "MAX_NUM_STEPS": "max_train_steps",
    "NUM_EPOCHS": "num_train_epochs", "CHECKPOINTING_STEPS": "checkpoint_step_interval",
    "CHECKPOINT_STEP_INTERVAL": "checkpoint_step_interval", "CHECKPOINT_EPOCH_INTERVAL": "checkpoint_epoch_interval",
    "CHECKPOINTING_LIMIT": "checkpoints_total_limit", "HUB_MODEL_NAME": "hub_model_id",
    "MODEL_CARD_SAFE_FOR_WORK": "model_card_safe_for_work", "TRACKER_PROJECT_NAME": "tracker_project_name",
    "TRACKER_RUN_NAME": "tracker_run_name", "MODEL_TYPE": "model_type", "MODEL_NAME": "pretrained_model_name_or_path",
    "MODEL_FAMILY": "model_family", "QWEN_TEXT_ENCODER_MODEL_NAME_OR_PATH": "qwen_text_encoder_model_name_or_path",
    "TRAIN_BATCH_SIZE": "train_batch_size", "USE_GRADIENT_CHECKPOINTING": "gradient_checkpointing",
    "GRADIENT_CHECKPOINTING_OFFLOAD_ATTENTION": "gradient_checkpointing_offload_attention",
    "GRADIENT_CHECKPOINTING_OFFLOAD_PREFETCH": "gradient_checkpointing_offload_prefetch",
    "GRADIENT_CHECKPOINTING_OFFLOAD_PIN_MEMORY_MAX_BUCKETS": "gradient_checkpointing_offload_pin_memory_max_buckets",
    "GRADIENT_CHECKPOINTING_SEGMENT_STRIDE": "gradient_checkpointing_segment_stride",
    "ENABLE_CHUNKED_FEED_FORWARD": "enable_chunked_feed_forward", "FEED_FORWARD_CHUNK_SIZE": "feed_forward_chunk_size",
    "CAPTION_DROPOUT_PROBABILITY": "caption_dropout_probability", "RESOLUTION_TYPE": "resolution_type",
    "RESOLUTION": "resolution", "VALIDATION_SEED": "validation_seed", "VALIDATION_STEPS": "validation_step_interval",
    "VALIDATION_STEP_INTERVAL": "validation_step_interval", "VALIDATION_EPOCH_INTERVAL": "validation_epoch_interval",
    "VALIDATE_AFTER_STEP": "validate_after_step", "VALIDATE_AFTER_EPOCH": "validate_after_epoch",
    "VALIDATION_RESOLUTION": "validation_resolution", "VALIDATION_GUIDANCE": "validation_guidance",
    "VALIDATION_METHOD": "validation_method", "VALIDATION_EXTERNAL_SCRIPT": "validation_external_script",
    "VALIDATION_EXTERNAL_BACKGROUND": "validation_external_background",
    **{f"DEEPFLOYD_VALIDATION_{n.upper()}": f"deepfloyd_validation_{n}" for n in (
        "pipeline_mode", "stage1_model", "stage2_model", "stage3_mode", "stage3_model", "stage1_num_inference_steps",
        "stage2_num_inference_steps", "stage1_guidance", "stage2_guidance", "stage3_guidance", "stage3_noise_level")},
    "WAN_VALIDATION_LOAD_OTHER_STAGE": "wan_validation_load_other_stage",
    "SDXL_VALIDATION_PIPELINE_MODE": "sdxl_validation_pipeline_mode", "SDXL_VALIDATION_STAGE1_MODEL": "sdxl_validation_stage1_model",
    "SDXL_VALIDATION_STAGE2_MODEL": "sdxl_validation_stage2_model",
    "PIXART_VALIDATION_PIPELINE_MODE": "pixart_validation_pipeline_mode",
    "PIXART_VALIDATION_STAGE1_MODEL": "pixart_validation_stage1_model",
    "PIXART_VALIDATION_STAGE2_MODEL": "pixart_validation_stage2_model",
    "LTX2_VALIDATION_PIPELINE_MODE": "ltx2_validation_pipeline_mode",
    "LTX2_VALIDATION_SPATIAL_UPSAMPLER_MODEL": "ltx2_validation_spatial_upsampler_model",
    "LTX2_VALIDATION_SPATIAL_UPSAMPLER_FILENAME": "ltx2_validation_spatial_upsampler_filename",
    "LTX2_VALIDATION_AUDIO_GUIDANCE": "ltx2_validation_audio_guidance",
    "POST_CHECKPOINT_SCRIPT": "post_checkpoint_script", "POST_UPLOAD_SCRIPT": "post_upload_script",
    "VALIDATION_GUIDANCE_RESCALE": "validation_guidance_rescale",
    "VALIDATION_NUM_INFERENCE_STEPS": "validation_num_inference_steps", "VALIDATION_PROMPT": "validation_prompt",
    "VALIDATION_INPUT": "validation_input", "ALLOW_TF32": "allow_tf32", "MIXED_PRECISION": "mixed_precision",
    "OPTIMIZER": "optimizer", "LEARNING_RATE": "learning_rate", "LR_SCHEDULE": "lr_scheduler",
    "LR_WARMUP_STEPS": "lr_warmup_steps", "BASE_MODEL_PRECISION": "base_model_precision", "QUANTIZE_VIA": "quantize_via",
    "QUANTIZATION_CONFIG": "quantization_config",
    **{f"SDNQ_{n.upper()}": f"sdnq_{n}" for n in (
        "weights_dtype", "quantized_matmul_dtype", "group_size", "use_quantized_matmul", "compile_mode",
        "use_static_quantization", "use_stochastic_rounding", "dequantize_fp32", "use_svd", "svd_rank", "svd_steps",
        "use_hadamard", "hadamard_group_size", "modules_to_not_convert", "modules_to_not_use_matmul",
        "modules_dtype_dict", "modules_quant_config")},
    "TRAINING_NUM_PROCESSES": "num_processes", "TRAINING_NUM_MACHINES": "num_machines",
    "TRAINER_DYNAMO_BACKEND": "dynamo_backend", "TRAINING_DYNAMO_BACKEND": "dynamo_backend",
    "VALIDATION_GUIDANCE_REAL": "validation_guidance_real", "VALIDATION_NO_CFG_UNTIL_TIMESTEP": "validation_no_cfg_until_timestep",
    "TRAINING_SCHEDULER_TIMESTEP_SPACING": "training_scheduler_timestep_spacing",
    "INFERENCE_SCHEDULER_TIMESTEP_SPACING": "inference_scheduler_timestep_spacing",
    "GRADIENT_ACCUMULATION_STEPS": "gradient_accumulation_steps", "LR_END": "lr_end",
    "FLUX_GUIDANCE_VALUE": "flux_guidance_value", "FLUX_LORA_TARGET": "flux_lora_target",
    "VALIDATION_NEGATIVE_PROMPT": "validation_negative_prompt", "METADATA_UPDATE_INTERVAL": "metadata_update_interval",
    "READ_BATCH_SIZE": "read_batch_size", "WRITE_BATCH_SIZE": "write_batch_size",
    "TEXT_ENCODER_BATCH_SIZE": "text_encoder_batch_size", "TEXT_CACHE_ONDEMAND": "text_cache_ondemand",
    "TEXT_CACHE_DISABLE": "text_cache_disable", "AWS_MAX_POOL_CONNECTIONS": "aws_max_pool_connections",
    "TORCH_NUM_THREADS": "torch_num_threads", "IMAGE_PROCESSING_BATCH_SIZE": "image_processing_batch_size",
    "DISABLE_BENCHMARK": "disable_benchmark",
}
ENV_BITFIT = "USE_BITFIT"  # env_file maps it to --layer_freeze_strategy=bitfit, whatever its value
ENV_ARGUMENT_LISTS = ("TRAINER_EXTRA_ARGS", "DEBUG_EXTRA_ARGS")
"""config.env variables holding command-line options (`--lora_rank=768 --report_to=wandb`);
DEBUG_EXTRA_ARGS is the older train.sh's second list, which the SD3.5 tutorial uses."""
LEGACY_ENV_NAMES: dict[str, str] = {
    "INSTANCE_PROMPT": "instance_prompt", "VAE_BATCH_SIZE": "vae_batch_size", "EMA_DECAY": "ema_decay",
    "DELETE_ERRORED_IMAGES": "delete_problematic_images", "DELETE_SMALL_IMAGES": "delete_unwanted_images",
    "MIN_SNR_GAMMA": "snr_gamma", "CONTROLNET": "controlnet", "VALIDATION_TORCH_COMPILE": "validation_torch_compile",
}
"""Variables of the older train.sh (the SD3.5 tutorial's config.env) that today's env loader no
longer reads; imported as that SimpleTuner meant them, with a note."""
ENV_NOT_OPTIONS: dict[str, str] = {
    "PURE_BF16": "an older train.sh switch: bf16 weights are train.optimizer adamw_bf16 here (mapped from OPTIMIZER)",
    "STABLE_DIFFUSION_3": "an older train.sh switch for SD3: the model family is SD3 here",
    "TOKENIZERS_PARALLELISM": "an environment setting for the tokenizers library, not a training option",
    "CONFIG_BACKEND": "SimpleTuner's own switch between config files", "ENV": "SimpleTuner's own config folder switch",
    "SIMPLETUNER_ENV": "SimpleTuner's own config folder switch", "HF_HOME": "the Hugging Face cache: the profile's hf_home here",
}


class OptionError(ValueError):
    """A value of the wrong type; the message says what was expected."""


def parse_value(kind: str, value: Any) -> Any:
    """A SimpleTuner value (JSON types, or the strings config.env and configure.py write) as `kind`.

    Numbers must be finite: SimpleTuner would train on inf or nan and fail much later.
    """
    if value is None:
        raise OptionError("is null: give a value or leave the option out (SimpleTuner's default applies)")
    if kind == "str":
        if isinstance(value, (dict, list)):
            raise OptionError(f"expected text, got {type(value).__name__}")
        return str(value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.strip().lower() in ("true", "1", "yes", "on")
        raise OptionError(f"expected true or false, got {value!r}")
    if kind == "list":
        if isinstance(value, list):
            return value
        text = str(value).strip().strip("[]")
        return [part.strip().strip("'\"") for part in text.split(",") if part.strip()]
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise OptionError(f"expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"expected {'an integer' if kind == 'int' else 'a number'}, got {value!r}") from None
    if not math.isfinite(number):
        raise OptionError(f"{value!r} is not a finite number")
    if kind == "int":
        if number != int(number):
            raise OptionError(f"expected an integer, got {value!r}")
        return int(number)
    if kind == "float":
        return number
    raise AssertionError(kind)
