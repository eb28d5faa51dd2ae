"""SimpleTuner's mapped options → the recipe's model, output, train, logging and validation keys.

Each converter takes the options it owns from `values` (typed by simpletuner_options.parse_value)
and puts their recipe keys; an option the config leaves out gets SimpleTuner's default, written
into the recipe with a comment saying so, because ours differ (lr, batch, weight decay, clipping,
EMA decay, LoRA dropout and targets, caption dropout …). The dataset options are returned for
simpletuner_datasets.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd35dist.config.hub_ids import hub_id_of
from sd35dist.config.loading import ConfigError
from sd35dist.importers.simpletuner_datasets import NAME_PATTERN
from sd35dist.importers.simpletuner_options import MAPPED, SD3_DEFAULT_FLAVOUR, SD3_FLAVOURS, SD3_T5_TOKENS
from sd35dist.importers.simpletuner_reading import find_beside, read_prompt_library

DEFAULT = "SimpleTuner's default"
ADAMW_FAMILY = {"adamw": "adamw", "adamw_bf16": "adamw_bf16", "optimi-adamw": "adamw", "adamw8bit": "adamw",
                "ao-adamw8bit": "adamw", "ao-adamw4bit": "adamw", "ao-adamwfp8": "adamw", "adam": "adamw",
                "deepspeed-adamw": "adamw", "adamw_torch": "adamw"}
"""SimpleTuner optimizers that are AdamW with another state storage: AdamW here."""
MAY_BE_NEGATIVE = frozenset({"seed", "validation_seed"})


@dataclass
class DatasetSettings:
    resolution: float
    resolution_type: str
    caption_strategy: str
    instance_prompt: str | None
    only_instance_prompt: bool
    minimum_image_size: float | None


class _Options:
    """The config's values with SimpleTuner's defaults behind them; `given` says which the config set."""

    def __init__(self, values: dict[str, Any], source: str) -> None:
        self.values, self.source = values, source
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0 and key not in MAY_BE_NEGATIVE:
                raise ConfigError(source, f"--{key}", f"{value:g} is negative")

    def given(self, key: str) -> bool:
        return key in self.values

    def __getitem__(self, key: str) -> Any:
        return self.values[key] if key in self.values else MAPPED[key].default

    def comment(self, key: str) -> str | None:
        """The comment a value taken from SimpleTuner's defaults gets."""
        return None if self.given(key) else f"{DEFAULT} ({key} {json.dumps(self[key])})"


def convert_settings(values: dict[str, Any], out: Any, source: str, config_path: Path | None) -> DatasetSettings:
    options = _Options(values, source)
    _model(options, out, source, config_path.parent if config_path else None)
    _training(options, out, source)
    _schedule(options, out)
    _lora(options, out, source, config_path)
    _logging(options, out)
    _validation(options, out, source, config_path)
    return DatasetSettings(
        resolution=options["resolution"], resolution_type=options["resolution_type"],
        caption_strategy=options["caption_strategy"], instance_prompt=options["instance_prompt"],
        only_instance_prompt=options["only_instance_prompt"], minimum_image_size=options["minimum_image_size"])


def _model(o: _Options, out: Any, source: str, config_dir: Path | None) -> None:
    if not o.given("model_family"):
        raise ConfigError(source, "--model_family", "missing: SimpleTuner needs it, and this importer reads SD3 "
                                                    "configs only (model_family sd3)")
    family = o["model_family"].strip().lower()
    if family != "sd3":
        raise ConfigError(source, "--model_family", f"{family}: sd35dist trains SD3/SD3.5 only (model_family sd3)")
    if o["model_type"] not in ("full", "lora"):
        raise ConfigError(source, "--model_type", f"{o['model_type']}: expected full or lora")
    flavour = o["model_flavour"] or SD3_DEFAULT_FLAVOUR
    if o.given("pretrained_model_name_or_path"):
        pretrained, comment = o["pretrained_model_name_or_path"], None
    elif flavour in SD3_FLAVOURS:
        pretrained = SD3_FLAVOURS[flavour]
        comment = f"no pretrained_model_name_or_path: SimpleTuner trains its SD3 flavour {flavour}"
    else:
        raise ConfigError(source, "--model_flavour", f"{flavour}: SimpleTuner's SD3 flavours are {', '.join(SD3_FLAVOURS)}")
    transformer = o["pretrained_transformer_model_name_or_path"]
    if transformer not in (None, pretrained):
        out.skip("pretrained_transformer_model_name_or_path", transformer,
                 "a transformer from another repository is not offered: model.pretrained holds every part")
    if o["revision"]:
        pretrained = f"{pretrained}@{o['revision']}"
    is_hub_id = hub_id_of(pretrained, config_dir) is not None
    out.put(("model", "pretrained"), pretrained, comment or ("a Hugging Face id: `sd35dist submit` downloads what the "
                                                             "job opens into the profile's hf_home, once" if is_hub_id
                                                             else None))
    if o["pretrained_transformer_subfolder"] != "transformer":
        out.put(("model", "transformer_subfolder"), o["pretrained_transformer_subfolder"])
    output_dir = o["output_dir"]
    run_name = o["tracker_run_name"]
    out.recipe = {"name": NAME_PATTERN.sub("-", run_name).strip("-._") or "simpletuner-import", **out.recipe}
    seed = o["seed"]
    out.put(("seed",), seed if seed is not None and seed >= 0 else 0,
            None if seed is not None and seed >= 0 else "SimpleTuner's seed is unset (or -1): a random run; "
                                                         "here runs repeat from seed 0")
    out.put(("output", "dir"), output_dir, o.comment("output_dir"))
    out.put(("data", "cache_url"), f"{output_dir.rstrip('/')}/cache",
            "one latent + text-embedding cache, built by `sd35dist cache` (SimpleTuner's caches are not reused)")
    tokens = o["tokenizer_max_length"] or SD3_T5_TOKENS
    out.put(("data", "max_sequence_length"), min(tokens, SD3_T5_TOKENS),
            None if o.given("tokenizer_max_length") and tokens <= SD3_T5_TOKENS else
            f"T5 tokens per caption: SimpleTuner's SD3 limit {SD3_T5_TOKENS} (sd35dist's own default is 256)")
    out.put(("data", "cache_batch_size"), o["vae_batch_size"], o.comment("vae_batch_size"))
    sampling = o["data_backend_sampling"]
    if sampling not in ("auto-weighting", "uniform"):
        raise ConfigError(source, "--data_backend_sampling", f"{sampling!r}: SimpleTuner knows uniform and auto-weighting")
    out.put(("data", "dataset_sampling"), sampling, o.comment("data_backend_sampling"))


def _training(o: _Options, out: Any, source: str) -> None:
    train = ("train",)
    for key, name in (("train_batch_size", "train_batch_size"), ("gradient_accumulation_steps", "gradient_accumulation_steps"),
                      ("learning_rate", "learning_rate"), ("adam_weight_decay", "adam_weight_decay"),
                      ("adam_epsilon", "adam_epsilon"), ("max_grad_norm", "max_grad_norm"),
                      ("grad_clip_method", "grad_clip_method"), ("gradient_checkpointing", "gradient_checkpointing"),
                      ("caption_dropout_probability", "caption_dropout_probability"),
                      ("checkpoint_step_interval", "checkpointing_steps"),
                      ("checkpoints_total_limit", "checkpoints_total_limit")):
        out.put(train + (name,), o[key], o.comment(key))
    for beta in ("1", "2"):
        override = o[f"optimizer_beta{beta}"]
        out.put(train + (f"adam_beta{beta}",), override if override is not None else o[f"adam_beta{beta}"],
                f"optimizer_beta{beta} overrides adam_beta{beta} in SimpleTuner" if override is not None
                else o.comment(f"adam_beta{beta}"))
    if o["grad_clip_method"] not in ("value", "norm"):
        raise ConfigError(source, "--grad_clip_method", f"{o['grad_clip_method']}: SimpleTuner knows value and norm")
    if o["train_batch_size"] < 1 or o["gradient_accumulation_steps"] < 1 or o["learning_rate"] <= 0:
        raise ConfigError(source, "--train_batch_size/--gradient_accumulation_steps/--learning_rate",
                          "must be positive")
    steps, epochs = o["max_train_steps"], o["num_train_epochs"]
    if steps:
        out.put(train + ("max_train_steps",), steps)
    if epochs and not steps:
        out.put(train + ("num_train_epochs",), epochs, o.comment("num_train_epochs"))
    if not steps and not epochs:
        raise ConfigError(source, "--max_train_steps/--num_train_epochs", "both 0: nothing to train")
    optimizer = str(o["optimizer"])
    if optimizer not in ADAMW_FAMILY:
        raise ConfigError(source, "--optimizer", f"{optimizer}: not offered here (adamw, adamw_bf16); its learning "
                                                 "rate would mean something else under AdamW")
    out.put(train + ("optimizer",), ADAMW_FAMILY[optimizer], (
        "SimpleTuner's adamw_bf16 rounds bf16 updates stochastically; here bf16 weights take Kahan-compensated "
        "updates: same intent (no update lost to rounding), not the same bits" if optimizer == "adamw_bf16" else
        f"SimpleTuner {optimizer}: AdamW with fp32 master weights and states here") + (
        f" ({DEFAULT})" if not o.given("optimizer") else ""))
    precision = o["mixed_precision"]
    mapped = {"bf16": "bf16", "no": "fp32", "fp32": "fp32", "fp16": "bf16", "fp8": "bf16"}.get(precision)
    if mapped is None:
        raise ConfigError(source, "--mixed_precision", f"{precision}: SimpleTuner knows no, fp16, bf16, fp8")
    out.put(train + ("mixed_precision",), mapped, None if precision in ("bf16", "no", "fp32") else
            f"SimpleTuner {precision}: bf16 compute here (the nearest offered)")
    if o["dynamo_backend"] not in ("no", None):
        out.put(train + ("compile_blocks",), True, f"SimpleTuner dynamo_backend {o['dynamo_backend']}: per-block "
                                                   "torch.compile here")
    resume = o["resume_from_checkpoint"]
    out.put(train + ("resume",), "latest", o.comment("resume_from_checkpoint"))
    if resume not in ("latest",):
        out.skip("resume_from_checkpoint", resume, "SimpleTuner checkpoints do not resume here; train.resume latest "
                                                   "continues sd35dist's own")
    ema = train + ("ema",)
    out.put(ema + ("enabled",), o["use_ema"], o.comment("use_ema"))
    out.put(ema + ("decay",), o["ema_decay"], o.comment("ema_decay"))
    out.put(ema + ("update_interval",), max(1, o["ema_update_interval"]), o.comment("ema_update_interval"))
    out.put(ema + ("start_step",), o["ema_warmup_steps"], "ema_warmup_steps: the EMA copies the weights until this step")
    shift = o["flow_schedule_shift"]
    if shift:
        out.put(train + ("flow_shift",), shift, "SimpleTuner's flow_schedule_shift: a static shift of the training "
                                                "timesteps" + (f" ({DEFAULT} 3.0, for SD3)" if not o.given("flow_schedule_shift") else ""))
    out.put(train + ("weighting_scheme",), "uniform" if o["flow_use_uniform_schedule"] else "logit_normal",
            "SimpleTuner draws σ = sigmoid(flow_sigmoid_scale · N(0, 1)), a logit-normal, unless flow_use_uniform_schedule")
    out.put(train + ("logit_std",), o["flow_sigmoid_scale"], o.comment("flow_sigmoid_scale"))


def _schedule(o: _Options, out: Any) -> None:
    train = ("train",)
    scheduler, warmup = o["lr_scheduler"], o["lr_warmup_steps"]
    out.put(train + ("lr_warmup_steps",), warmup, o.comment("lr_warmup_steps"))
    note = o.comment("lr_scheduler")
    if scheduler in ("constant", "constant_with_warmup"):
        out.put(train + ("lr_scheduler",), "constant", (note or "") + (
            "; " if note else "") + f"SimpleTuner's {scheduler}: constant after a linear warmup of lr_warmup_steps "
                                    "(its constant with warmup becomes constant_with_warmup)")
    elif scheduler in ("linear", "polynomial"):
        out.put(train + ("lr_scheduler",), scheduler, note)
    elif scheduler in ("cosine", "cosine_with_warmup"):
        out.put(train + ("lr_scheduler",), "cosine",
                f"SimpleTuner's cosine restarts every lr_warmup_steps × GPUs ({warmup} × GPUs) steps down to lr_end, "
                "without warmup; here cosine is one decay to 0 over the run, after a linear warmup of lr_warmup_steps")
    else:
        out.put(train + ("lr_scheduler",), "constant", f"SimpleTuner's {scheduler} is not offered: constant here")
        out.skip("lr_scheduler", scheduler, "no such schedule here (constant, linear, cosine, polynomial); the recipe "
                                            "uses constant")
    if scheduler == "polynomial" or o.given("lr_end") or o.given("lr_power"):
        out.put(train + ("lr_end",), o["lr_end"], o.comment("lr_end"))
        out.put(train + ("lr_power",), o["lr_power"], o.comment("lr_power"))


def _lora(o: _Options, out: Any, source: str, config_path: Path | None) -> None:
    lora_keys = ("lora_rank", "lora_alpha", "lora_dropout", "lora_init_type", "lora_type", "peft_lora_target_modules",
                 "lycoris_config")
    if o["model_type"] != "lora":
        for key in lora_keys:
            if o.given(key):
                out.skip(key, o[key], "model_type is full: LoRA options have no effect")
        return
    lora_type = str(o["lora_type"]).lower()
    if lora_type == "lycoris":
        _lycoris(o, out, source, config_path)
        return
    if lora_type != "standard":
        raise ConfigError(source, "--lora_type", f"{o['lora_type']}: expected standard (a peft LoRA) or lycoris")
    if o.given("lycoris_config"):
        out.skip("lycoris_config", o["lycoris_config"], "lora_type is standard: the LyCORIS config has no effect")
    lora = ("train", "lora")
    rank = o["lora_rank"]
    out.put(lora + ("rank",), rank, o.comment("lora_rank"))
    alpha = o["lora_alpha"]
    out.put(lora + ("alpha",), float(alpha if alpha is not None else rank), None if alpha is not None else
            "SimpleTuner's lora_alpha defaults to lora_rank (a scale of 1); sd35dist's own default is 16")
    out.put(lora + ("dropout",), o["lora_dropout"], o.comment("lora_dropout"))
    init = o["lora_init_type"]
    out.put(lora + ("init",), init if init in ("default", "gaussian") else "default")
    if init not in ("default", "gaussian"):
        out.skip("lora_init_type", init, "only peft's default or gaussian init here (train.lora.init)")
    targets = o["peft_lora_target_modules"]
    out.put(lora + ("targets",), [str(t) for t in targets] if targets else "attention_image",
            None if targets else "SimpleTuner's SD3 default targets: to_q, to_k, to_v, to_out.0 of the image stream")


def _lycoris(o: _Options, out: Any, source: str, config_path: Path | None) -> None:
    from sd35dist.importers.simpletuner_lycoris import lycoris_section, read_lycoris_config

    named = o["lycoris_config"]
    if not named:
        raise ConfigError(source, "--lycoris_config", "missing: lora_type lycoris needs the LyCORIS JSON file")
    path = find_beside(str(named), config_path) if config_path else (Path(named) if Path(named).is_file() else None)
    if path is None:
        raise ConfigError(source, "--lycoris_config", f"{named}: no such file (looked as given and beside the config)")
    section = lycoris_section(read_lycoris_config(path, path.name), path.name, out.skip)
    for key in ("lora_rank", "lora_alpha", "lora_init_type", "peft_lora_target_modules"):
        if o.given(key):
            out.skip(key, o[key], "lora_type lycoris: the lycoris_config decides the adapters")
    if o["lora_dropout"]:
        out.skip("lora_dropout", o["lora_dropout"], "lora_type lycoris: LyCORIS's LoKr/LoHa have no input dropout")
    for key, value in section.items():
        out.put(("train", "lora", key), value)
    out.note(("train", "lora"), f"SimpleTuner's lora_type lycoris, from {path.name} (algo {section['type']})")


def _logging(o: _Options, out: Any) -> None:
    tracker = o["report_to"]
    out.put(("logging", "report_to"), tracker if tracker in ("wandb", "none") else "none",
            "wandb runs offline by default here: set logging.wandb_mode online to upload" if tracker == "wandb" else
            o.comment("report_to"))
    if tracker not in ("wandb", "none"):
        out.skip("report_to", tracker, "only wandb (or none) here")
    out.put(("logging", "tracker_project_name"), o["tracker_project_name"], o.comment("tracker_project_name"))
    out.put(("logging", "tracker_run_name"), o["tracker_run_name"], o.comment("tracker_run_name"))


def _resolutions(text: str, source: str) -> list[list[int]]:
    sizes = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            width, height = (int(float(x)) for x in (part.split("x") if "x" in part else (part, part)))
        except ValueError:
            raise ConfigError(source, "--validation_resolution", f"{part}: expected 1024, 1024x768 or a comma list") from None
        if not (64 <= width <= 3072 and 64 <= height <= 3072) or width % 16 or height % 16:
            raise ConfigError(source, "--validation_resolution", f"{width}x{height}: sides must be multiples of 16 "
                                                                 "between 64 and 3072")
        sizes.append([width, height])
    return sizes


def _validation(o: _Options, out: Any, source: str, config_path: Path | None) -> None:
    prompts = [o["validation_prompt"]] if o["validation_prompt"] else []
    library = o["user_prompt_library"]
    if library:
        found = find_beside(library, config_path) if config_path else None
        if found is None:
            out.skip("user_prompt_library", library, "file not found beside the config: its prompts are not imported")
        else:
            prompts += read_prompt_library(found)
    if o["validation_disable"] or not prompts:
        if not prompts and not o["validation_disable"]:
            out.notes.append("no validation_prompt: no validation images (SimpleTuner renders none either)")
        return
    if not o["validation_disable_unconditional"]:
        prompts.append("")
    validation = ("validation",)
    out.put(validation + ("prompts",), prompts, "encoded by `sd35dist cache` with the dataset (cache --validation-only "
                                                "after editing)" + ("; the empty prompt: SimpleTuner's unconditional "
                                                                    "image (validation_disable_unconditional false)"
                                                                    if not o["validation_disable_unconditional"] else ""))
    out.put(validation + ("negative_prompt",), o["validation_negative_prompt"], o.comment("validation_negative_prompt"))
    seed = o["validation_seed"] if o["validation_seed"] is not None else (o["seed"] or 0)
    out.put(validation + ("seeds",), [max(seed, 0)], None if o.given("validation_seed") else
            "SimpleTuner's validation seed: validation_seed, else seed, else 0")
    out.put(validation + ("every_n_steps",), o["validation_step_interval"], o.comment("validation_step_interval"))
    out.put(validation + ("at_start",), o["validation_on_startup"], o.comment("validation_on_startup"))
    scale = o["validation_guidance"]
    if scale < 1:
        raise ConfigError(source, "--validation_guidance", f"{scale:g}: guidance below 1 is not offered")
    out.put(validation + ("guidance_scale",), scale, o.comment("validation_guidance"))
    out.put(validation + ("num_inference_steps",), o["validation_num_inference_steps"],
            o.comment("validation_num_inference_steps"))
    out.put(validation + ("resolutions",), _resolutions(o["validation_resolution"], source),
            o.comment("validation_resolution"))
    layers = o["validation_guidance_skip_layers"]
    if layers:
        try:
            indices = [int(layer) for layer in layers]
        except (TypeError, ValueError):
            raise ConfigError(source, "--validation_guidance_skip_layers", "expected block numbers such as [7, 8, 9]") from None
        if scale == 1.0:
            out.skip("validation_guidance_skip_layers", indices, "validation_guidance 1.0 renders without classifier-free "
                                                                  "guidance, where SimpleTuner's pipeline skips SLG too")
        else:
            out.put(validation + ("skip_layer_guidance",), {
                "layers": indices, "scale": o["validation_guidance_skip_scale"],
                "start": o["validation_guidance_skip_layers_start"], "stop": o["validation_guidance_skip_layers_stop"]},
                "skip-layer guidance (SimpleTuner's validation_guidance_skip_*, diffusers' skip_guidance_layers)")
