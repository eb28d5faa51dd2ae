"""SimpleTuner options and dataset keys with no place in a recipe, each with the reason the
importer prints (and docs/simpletuner.md lists). Pure data; simpletuner_options.py holds the
mapped ones. Grouped by reason: one reason, the options it covers (SimpleTuner's names).
"""

from __future__ import annotations

_OTHER_FAMILY = "an option of another model family; sd35dist trains SD3/SD3.5 only"
_LAUNCH = "a launch setting: the cluster profile and torchrun decide processes, nodes, addresses and compilation here"
_SHARDING = "how SimpleTuner shards with accelerate: parallel.strategy (fsdp2, zero2, zero3) decides it here"
_QUANTISED = "the base model is not quantised here: it trains in bf16/fp32 (weights sharded by parallel.strategy)"
_OFFLOAD = "memory savers of SimpleTuner's single-box training; here sharding (parallel.*) and train.gradient_checkpointing save memory"
_CACHE = "SimpleTuner's own caches and loaders: `sd35dist cache` builds one latent and text-embedding cache at data.cache_url"
_HUB = "no hub upload or model card here: share what `sd35dist export` writes"
_HOUSEKEEPING = "SimpleTuner's own logging, hooks and housekeeping; sd35dist logs to its run directory (and wandb)"
_CHECKPOINTS = "checkpoints are written every train.checkpointing_steps, atomically, and rotated by checkpoints_total_limit"
_OBJECTIVE = "a training objective or regulariser not offered: the loss is SD3's rectified flow matching (train.weighting_scheme)"
_TIMESTEPS = "a timestep schedule not offered: σ is drawn logit-normal (train.logit_mean/logit_std) or uniform, shifted by train.flow_shift"
_TEXT_ENCODERS = "the text encoders are frozen and run once, by `sd35dist cache`"
_OPTIMIZER = "an optimizer setting not offered: AdamW (train.optimizer adamw or adamw_bf16) with the recipe's betas, eps and decay"
_ADAPTER = "an adapter feature not offered: train.lora trains a peft LoRA or a LyCORIS LoKr/LoHa from scratch"
_CONTROLNET = "ControlNet training is not offered by sd35dist"
_VALIDATION = "a validation setting not offered: validation renders its prompts × seeds × resolutions with cfg or apg (and SLG)"
_EVALUATION = "no evaluation metrics here: validation renders images"
_UI = "a SimpleTuner web UI or safety switch, not a training setting"

_GROUPS: dict[str, str] = {
    _OTHER_FAMILY: """
        acestep_lora_target audio_channels audio_duration_interval audio_flow_schedule_shift audio_max_duration_seconds
        audio_min_duration_seconds audio_truncation_mode cosmos3_generator_component cosmos3_reasoner_component
        deepfloyd_validation_pipeline_mode deepfloyd_validation_stage1_guidance deepfloyd_validation_stage1_model
        deepfloyd_validation_stage1_num_inference_steps deepfloyd_validation_stage2_guidance
        deepfloyd_validation_stage2_model deepfloyd_validation_stage2_num_inference_steps
        deepfloyd_validation_stage3_guidance deepfloyd_validation_stage3_mode deepfloyd_validation_stage3_model
        deepfloyd_validation_stage3_noise_level flux_attention_masked_training flux_fast_schedule flux_guidance_max
        flux_guidance_min flux_guidance_mode flux_guidance_value flux_lora_target framerate
        hidream_load_balancing_loss_weight hidream_use_load_balancing_loss ideogram_auto_json ideogram_fp8_base_upcast
        ideogram_load_unconditional_transformer ideogram_prompt_enhancer_head_id ideogram_prompt_upsample
        ideogram_schedule_mu ideogram_schedule_std ideogram_uncond_ramtorch ideogram_validation krea2_reference_latents
        ltx2_first_frame_conditioning_probability ltx2_intrinsic_conditioning ltx2_mask_conditioning_probability
        ltx2_prefix_conditioning_frames ltx2_prefix_conditioning_probability ltx2_reference_spatial_scale_factor
        ltx2_reference_temporal_scale_factor ltx2_suffix_conditioning_frames ltx2_suffix_conditioning_probability
        ltx2_validation_audio_guidance ltx2_validation_pipeline_mode ltx2_validation_spatial_upsampler_filename
        ltx2_validation_spatial_upsampler_model ltx_i2v_prob ltx_partial_noise_fraction ltx_protect_first_frame
        ltx_train_mode lyrics_embedder_lr lyrics_embedder_lr_scheduler lyrics_embedder_optimizer lyrics_embedder_train
        max_grounding_entities minimax_h3_reference_mode minimax_h3_sparse_attention minimax_h3_sparse_block_shape
        minimax_h3_sparse_share_heads minimax_h3_sparse_start_layer minimax_h3_sparse_video_kv_fraction
        minimax_h3_target_mode minimax_music_lm_adapter minimax_music_lm_adapter_strength minimax_music_lm_max_frames
        minimax_music_lm_precache_mode minimax_music_train_component pixart_validation_pipeline_mode
        pixart_validation_stage1_model pixart_validation_stage2_model pretrained_gemma_model_name_or_path
        pretrained_grounding_model_name_or_path pretrained_t5_model_name_or_path pretrained_unet_model_name_or_path
        pretrained_unet_subfolder qwen_text_encoder_model_name_or_path refiner_training refiner_training_invert_schedule
        refiner_training_strength sana_complex_human_instruction sdxl_refiner_uses_full_range
        sdxl_validation_pipeline_mode sdxl_validation_stage1_model sdxl_validation_stage2_model unet_attention_slice
        validation_audio_duration validation_audio_only validation_ltx2_video_conditioning validation_lyrics
        validation_num_video_frames wan_force_2_1_time_embedding wan_validation_load_other_stage
        text_encoder_4_precision
    """,
    "min-SNR weighting and ε/v-prediction settings are for DDPM models: SD3's flow matching weights by "
    "train.weighting_scheme": """
        prediction_type rescale_betas_zero_snr snr_gamma snr_weight use_soft_min_snr soft_min_snr_sigma_data
    """,
    _LAUNCH: """
        accelerate_config accelerate_extra_args num_processes num_machines machine_rank main_process_ip
        main_process_port local_rank same_network dynamo_dynamic dynamo_fullgraph dynamo_mode
        dynamo_use_regional_compilation torch_num_threads enable_multiprocessing disable_tf32 disable_benchmark
        find_unused_parameters seed_for_each_device
    """,
    _SHARDING: """
        fsdp_activation_checkpointing fsdp_auto_wrap_policy fsdp_cpu_offload fsdp_cpu_ram_efficient_loading
        fsdp_limit_all_gathers fsdp_reshard_after_forward fsdp_state_dict_type fsdp_transformer_layer_cls_to_wrap
        fsdp_version deepspeed_config context_parallel_comm_strategy context_parallel_size
    """,
    _QUANTISED: """
        base_model_default_dtype quantize_activations quantization_config sdnq_compile_mode sdnq_dequantize_fp32
        sdnq_group_size sdnq_hadamard_group_size sdnq_modules_dtype_dict sdnq_modules_quant_config
        sdnq_modules_to_not_convert sdnq_modules_to_not_use_matmul sdnq_quantized_matmul_dtype sdnq_svd_rank
        sdnq_svd_steps sdnq_use_hadamard sdnq_use_quantized_matmul sdnq_use_static_quantization
        sdnq_use_stochastic_rounding sdnq_use_svd sdnq_weights_dtype
    """,
    _OFFLOAD: """
        enable_group_offload group_offload_blocks_per_group group_offload_text_encoder group_offload_to_disk_path
        group_offload_type group_offload_use_stream group_offload_vae ramtorch ramtorch_controlnet
        ramtorch_disable_extensions ramtorch_disable_sync_hooks ramtorch_target_modules ramtorch_text_encoder
        ramtorch_text_encoder_percent ramtorch_transformer_percent ramtorch_vae musubi_block_swap_device
        musubi_blocks_to_swap offload_during_save offload_during_startup offload_param_path
        gradient_checkpointing_backend gradient_checkpointing_interval gradient_checkpointing_offload_attention
        gradient_checkpointing_offload_pin_memory_max_buckets gradient_checkpointing_offload_prefetch
        gradient_checkpointing_segment_stride enable_chunked_feed_forward feed_forward_chunk_size
        vae_enable_patch_conv vae_enable_slicing vae_enable_temporal_roll vae_enable_tiling fuse_qkv_projections
        sageattention_usage sla_config keep_vae_loaded fully_unload_text_encoder delete_model_after_load
        accelerator_cache_clear_interval set_grads_to_none ema_cpu_only ema_device ema_foreach_disable
    """,
    _CACHE: """
        cache_dir cache_dir_text cache_dir_vae compress_disk_cache vae_cache_scan_behaviour vae_dtype
        text_cache_disable text_cache_ondemand text_embed_full_cache text_encoder_batch_size write_batch_size
        read_batch_size image_processing_batch_size max_workers aws_max_pool_connections metadata_update_interval
        aspect_bucket_worker_count aspect_bucket_disable_rebuild preserve_data_backend_cache skip_file_discovery
        override_dataset_config ignore_missing_files delete_unwanted_images delete_problematic_images
        delete_nsfw_images enable_nsfw_check nsfw_check_backend_types nsfw_check_min_votes nsfw_check_models
        nsfw_check_sample_types nsfw_check_video_frame_count nsfw_check_video_frame_selection
        nsfw_check_video_min_flagged_frames data_aesthetic_score allow_dataset_oversubscription
        dataloader_prefetch dataloader_prefetch_qlen conditioning_multidataset_sampling disable_bucket_pruning
        aspect_bucket_alignment aspect_bucket_rounding max_upscale_threshold parquet_caption_column
        parquet_filename_column
    """,
    _HUB: """
        push_to_hub_background hub_model_id model_card_note model_card_private model_card_safe_for_work
        modelspec_comment publishing_config post_upload_script
    """,
    _HOUSEKEEPING: """
        logging_dir tracker_image_layout custom_tracker webhook_config print_filenames print_sampler_statistics
        debug_aspect_buckets debug_dataset_loader disk_low_action disk_low_script disk_low_threshold
        post_checkpoint_script
    """,
    _CHECKPOINTS: """
        checkpoint_epoch_interval checkpointing_rolling_steps checkpoints_rolling_total_limit checkpointing_use_tempdir
        delete_invalid_checkpoints strict_epoch_limit
    """,
    _OBJECTIVE: """
        huber_c huber_schedule masked_loss_probability input_perturbation_steps noise_offset noise_offset_probability
        timestep_bias_begin timestep_bias_end timestep_bias_multiplier timestep_bias_portion crepa_adjacent_distance
        crepa_adjacent_tau crepa_block_index crepa_cutoff_step crepa_decay_steps crepa_drop_vae_encoder crepa_enabled
        crepa_encoder crepa_encoder_frames_batch_size crepa_encoder_image_size crepa_feature_source crepa_lambda
        crepa_lambda_end crepa_normalize_by_frames crepa_normalize_neighbour_sum crepa_power crepa_scheduler
        crepa_self_flow crepa_self_flow_mask_ratio crepa_similarity_ema_decay crepa_similarity_threshold
        crepa_spatial_align crepa_teacher_block_index crepa_threshold_mode crepa_use_backbone_features crepa_use_tae
        crepa_warmup_steps urepa_cutoff_step urepa_decay_steps urepa_enabled urepa_encoder_image_size urepa_lambda
        urepa_lambda_end urepa_manifold_weight urepa_model urepa_power urepa_scheduler urepa_similarity_ema_decay
        urepa_similarity_threshold urepa_threshold_mode urepa_use_tae urepa_warmup_steps irepa_enabled
        irepa_projector_kernel_size irepa_spatial_norm_alpha layersync_enabled layersync_lambda layersync_student_block
        layersync_teacher_block nextlat_block_index nextlat_enabled nextlat_kl_weight nextlat_state_loss nextlat_weight
        xm_block_size xm_candidate_count xm_enabled xm_selection_scope xm_training_target twinflow_enabled
        twinflow_target_step_count internal_guidance_block_index internal_guidance_enabled internal_guidance_loss_weight
        mixflow_enabled mixflow_gamma diff2flow_enabled diff2flow_loss scheduled_sampling_max_step_offset
        scheduled_sampling_order scheduled_sampling_prob_end scheduled_sampling_prob_start
        scheduled_sampling_probability scheduled_sampling_ramp_shape scheduled_sampling_ramp_steps
        scheduled_sampling_reflexflow scheduled_sampling_reflexflow_alpha scheduled_sampling_reflexflow_beta1
        scheduled_sampling_reflexflow_beta2 scheduled_sampling_sampler scheduled_sampling_start_step
        scheduled_sampling_strategy distillation_config distillation_method tread_config diffusion_blocks_config
        layer_freeze_strategy
    """,
    _TIMESTEPS: """
        flow_beta_schedule_alpha flow_beta_schedule_beta flow_cubic_schedule_weights flow_custom_timesteps
        flow_timesteps_mode disable_segmented_timestep_sampling training_scheduler_timestep_spacing
        inference_scheduler_timestep_spacing
    """,
    _TEXT_ENCODERS: """
        freeze_encoder_after freeze_encoder_before freeze_encoder_strategy text_encoder_lr save_text_encoder
        text_encoder_limit custom_text_encoder_intermediary_layers
    """,
    _OPTIMIZER: """
        optimizer_config optimizer_cpu_offload_method optimizer_offload_gradients optimizer_release_gradients
        fuse_optimizer prodigy_steps lr_num_cycles lr_scale lr_scale_sqrt gradient_precision
    """,
    _ADAPTER: """
        init_lokr_norm init_lora init_lora_ema init_lora_step singlora_ramp_up_steps slider_lora_target
        assistant_lora_inference_strength assistant_lora_path assistant_lora_strength disable_assistant_lora
        validation_lycoris_strength
    """,
    _CONTROLNET: "controlnet_custom_config controlnet_model_name_or_path",
    _VALIDATION: """
        validation_adapter_config validation_adapter_mode validation_adapter_name validation_adapter_path
        validation_adapter_strength validation_epoch_interval validate_after_epoch validate_after_step
        validation_external_background validation_external_script validation_method validation_guidance_real
        validation_image_format validation_image_quality validation_input validation_internal_guidance_scale
        validation_no_cfg_until_timestep validation_preview validation_preview_steps validation_prompt_library
        validation_randomize validation_seed_source validation_stitch_input_location validation_using_datasets
        ema_validation
    """,
    _EVALUATION: """
        evaluation_type eval_dataset_id eval_dataset_pooling eval_epoch_interval eval_loss_disable eval_steps_interval
        eval_timesteps num_eval_images pretrained_evaluation_model_name_or_path
    """,
    _UI: "i_know_what_i_am_doing trust_remote_code enable_watermark variant pretrained_vae_model_name_or_path",
}

_SAME_HERE_OTHERWISE: dict[str, str] = {
    "t5_padding": "T5 padding is left as the SD3 pipeline leaves it (unmodified)",
    "sd3_clip_uncond_behaviour": "caption dropout and the negative prompt use the encoded empty string (empty_string)",
    "sd3_t5_uncond_behaviour": "caption dropout and the negative prompt use the encoded empty string (empty_string)",
    "attention_mechanism": "PyTorch's scaled-dot-product attention through diffusers is used (diffusers)",
    "base_model_precision": _QUANTISED, "text_encoder_1_precision": _QUANTISED, "text_encoder_2_precision": _QUANTISED,
    "text_encoder_3_precision": _QUANTISED, "quantize_via": _QUANTISED,
    "vae_cache_ondemand": "latents are computed once, ahead of training, by `sd35dist cache`",
    "vae_cache_disable": "latents are computed once, ahead of training, by `sd35dist cache`",
    "validation_multigpu": "every rank renders its share of the validation images",
    "fsdp_enable": _SHARDING,
    "controlnet": _CONTROLNET, "control": _CONTROLNET,
    "use_dora": "DoRA is not offered: train.lora trains a plain peft LoRA",
    "offset_noise": _OBJECTIVE, "input_perturbation": _OBJECTIVE, "loss_type": "only the L2 (MSE) loss here",
    "flow_schedule_auto_shift": "a resolution-dependent shift is not offered: train.flow_shift is one static shift "
                                "(set it, or leave it to the model's scheduler)",
    "flow_use_beta_schedule": _TIMESTEPS,
    "validation_guidance_rescale": _VALIDATION, "validation_noise_scheduler": "validation samples with SD3's "
                                                                             "flow-matching Euler scheduler",
    "num_validation_images": "one image per prompt × seed × resolution here: list more seeds",
    "train_text_encoder": _TEXT_ENCODERS,
    "prepend_instance_prompt": "captions are used as written: put the trigger word into them",
    "timestep_bias_strategy": _OBJECTIVE,
    "lora_format": "`sd35dist export` writes diffusers' LoRA format, which ComfyUI loads too",
    "push_to_hub": _HUB, "push_checkpoints_to_hub": _HUB,
    "peft_lora_mode": _ADAPTER,
}
"""Why a SAME_HERE option with another value is not applied."""

NOT_APPLIED: dict[str, str] = {
    **{name: reason for reason, names in _GROUPS.items() for name in names.split()},
    **_SAME_HERE_OTHERWISE,
}
"""option → why it has no place in a recipe."""


# ---- multidatabackend.json entries ---------------------------------------------------------

DATASET_MAPPED: dict[str, str] = {
    "id": "`id` (sanitised to [A-Za-z0-9._-])",
    "type": "`source`: local → the folder; aws → s3://bucket/prefix; huggingface → hf://datasets/… (format parquet); "
            "others are listed with why",
    "instance_data_dir": "`source` (local)",
    "aws_bucket_name": "`source` s3://bucket/…", "aws_data_prefix": "`source` s3://…/prefix",
    "aws_endpoint_url": "`data.storage_options.endpoint_url`",
    "aws_region_name": "`data.storage_options.client_kwargs.region_name`",
    "dataset_type": "image datasets are read; text_embeds and image_embeds entries are SimpleTuner's caches",
    "disabled": "a disabled dataset is left out", "disable": "a disabled dataset is left out",
    "caption_strategy": "`caption_strategy` (textfile, filename, instanceprompt/instance_prompt)",
    "instance_prompt": "`instance_prompt`", "only_instance_prompt": "`caption_strategy: instance_prompt`",
    "repeats": "`repeats` + 1 (SimpleTuner's 0 means seen once)",
    "crop": "`crop` (SimpleTuner's default: false)", "crop_style": "`crop_style` (default random; centre = center)",
    "crop_aspect": "square/closest/preserve/random: here the crop takes the nearest bucket's shape",
    "resolution": "must give the same buckets as the global resolution", "resolution_type": "how resolution is read",
    "minimum_image_size": "`minimum_image_size` (shorter side in pixels)",
    "maximum_image_size": "— (listed when set: images go straight to their bucket)",
    "target_downsample_size": "— (listed when set: images go straight to their bucket)",
    "probability": "`probability` (SimpleTuner's meaning: how often a step draws the dataset while it has samples "
                   "left; 0 leaves it out)",
    "parquet": "a parquet caption table: `format: parquet` with its columns (ids must name the file)",
    "csv_file": "a CSV URL list: `format: parquet`, from the list written as parquet beside the recipe",
    "csv_caption_column": "`caption_column` of the parquet written from the CSV list",
    "csv_url_column": "`image_column` of the parquet written from the CSV list (default url)",
    "dataset_name": "huggingface: `source` hf://datasets/NAME[@revision]/data/SPLIT-*.parquet (format parquet)",
    "split": "huggingface: the split whose parquet files are read (default train; a slice is listed)",
    "revision": "huggingface: the @revision of the hf:// source", "image_column": "huggingface: `image_column` (default image)",
    "huggingface": "its caption_column (default caption), width_column, height_column; the rest is listed with why",
    "default": "marks SimpleTuner's default text-embed cache",
    "cache_dir": "SimpleTuner's text-embedding cache (not reused)", "cache_dir_vae": "SimpleTuner's VAE cache (not reused)",
}
"""Dataset keys the importer reads (and what they become)."""

DATASET_SOURCE_REASON = ("a source sd35dist cannot read yet (local folders, S3, parquet tables, CSV lists and "
                         "Hugging Face datasets only)")
_DATASET_GROUPS: dict[str, str] = {
    DATASET_SOURCE_REASON: """
        subfolder webshart source metadata hf_token webshart_optimize_captions
        webshart_optimise_captions buffer_size max_file_size parallel_downloads shard_cache_gb aws
    """,
    "submit downloads a Hugging Face dataset's parquet files once; the cache reads them by row group": """
        auto_load streaming num_proc
    """,
    "composite (grid) images are not split here": "composite_image_column split_composite_images",
    "a CSV list's images are read from their URLs by `sd35dist cache`; nothing is downloaded ahead": """
        csv csv_cache_dir csv_hash_filenames csv_shorten_filenames
    """,
    "credentials come from the environment (the profile's env.passthrough), never from files": """
        aws_access_key_id aws_secret_access_key aws_session_token
    """,
    "conditioning inputs (ControlNet, edit or reference datasets) are not trained from here": """
        conditioning conditioning_config conditioning_data conditioning_type source_dataset_id
        conditioning_image_embeds cache_dir_conditioning_image_embeds conditioning_image_embed_batch_size
        grounding grounding_data image_embeds s2v_datasets
    """,
    "SimpleTuner's text-embedding caches: `sd35dist cache` encodes the captions into its own": """
        text_embeds text_embed_cache text_cache_disable text_cache_ondemand text_encoder_batch_size
    """,
    _CACHE: """
        metadata_backend compress_cache vae_cache_clear_each_epoch vae_cache_ondemand vae_cache_disable
        vae_cache_scan_behaviour skip_file_discovery preserve_data_backend_cache hash_filenames shorten_filenames
        write_batch_size read_batch_size vae_batch_size image_processing_batch_size max_workers metadata_update_interval
        aws_max_pool_connections delete_unwanted_images delete_problematic_images delete_nsfw_images filter_func
        scan_for_errors cache_file_suffix config instance_data_root
    """,
    "captions are used as written (one per image: the first line of its .txt)": """
        prepend_instance_prompt caption_filter_list caption_shuffle caption_file_extensions disable_multiline_split
    """,
    "every image of a dataset is used, every epoch, with the recipe's batch size": """
        max_num_samples minimum_aspect_ratio maximum_aspect_ratio crop_aspect_buckets ignore_epochs start_epoch
        start_step end_epoch end_step disable_after_epoch_step train_batch_size timestep_sampling_offset
        is_regularisation_data is_regularization_data slider_strength disable_validation shuffle
    """,
    "an audio or video setting: sd35dist trains on images": """
        video audio audio_column video_column
    """,
    "distillation data are not trained from here": "distillation_cache distillation_type",
    "marks a dataset SimpleTuner generated itself": "auto_generated",
    "removed from SimpleTuner, which refuses it (its vae_cache_disable replaced it)": "disable_vae_cache",
}
DATASET_NOT_APPLIED: dict[str, str] = {name: reason for reason, names in _DATASET_GROUPS.items() for name in names.split()}
"""Dataset key → why it has no place in `data.datasets[]`."""
DATASET_NOT_APPLIED_DEFAULTS: dict[str, tuple] = {
    "metadata_backend": ("discovery", "json", "parquet", "huggingface"), "vae_cache_clear_each_epoch": (False,),
    "skip_file_discovery": ("",), "preserve_data_backend_cache": (False, True), "hash_filenames": (False, True),
    "compress_cache": (True, False), "write_batch_size": (), "prepend_instance_prompt": (False,),
    "is_regularisation_data": (False,), "is_regularization_data": (False,), "ignore_epochs": (False,),
    "disable_validation": (False,), "vae_cache_ondemand": (False,), "vae_cache_disable": (False,),
    "streaming": (False,), "auto_load": (False,), "split_composite_images": (False,), "video_column": ("video",),
    "composite_image_column": ("image",),
}
"""Dataset keys whose listed values change nothing (noted in the YAML's list, not on the terminal)."""
