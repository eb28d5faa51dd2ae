"""SimpleTuner's `lora_type: lycoris` + `lycoris_config` JSON → `train.lora` (type lokr | loha).

How SimpleTuner reads the file (bghira/SimpleTuner at bc8e6ab, helpers/training/trainer.py and
helpers/configuration/cmd_args.py): `algo` and `multiplier` are required, `linear_dim` too unless
`full_matrix` is true, `linear_alpha` always; it takes `int(multiplier)`, `int(linear_dim)`
(default 4), `int(linear_alpha)` (default 1), hands `apply_preset` to LycorisNetwork.apply_preset
and every remaining key to LyCORIS's create_lycoris. LyCORIS reads an alpha of 0 as the rank.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sd35dist.config.loading import ConfigError

ALGOS = {"lokr": "lokr", "loha": "loha", "lora": "lora", "locon": "lora"}
"""LyCORIS algo → train.lora.type; its LoRA (LoCon on Linears) is a plain LoRA, trained by peft."""
PRESET_KEYS = ("target_module", "target_name", "module_algo_map", "exclude_name")
MODULE_KEYS = ("algo", "factor", "dim", "alpha")
LOKR_KEYS = ("factor", "full_matrix", "decompose_both")
IGNORED = {
    "bypass_mode": "the adapter's output is added to the layer's here always (peft's forward); the same "
                   "function as LyCORIS's rebuild mode, without rounding ΔW into the base weight's dtype",
    "preset": "LyCORIS's named presets choose UNet and text-encoder classes; apply_preset chooses here",
    "dropout": "LyCORIS's LoKr/LoHa ignore dropout (it warns that they have none)",
}
"""Keys with no effect on what trains; listed as not applied with why."""
REFUSED = ("rank_dropout", "module_dropout", "use_tucker", "use_scalar", "dora_wd", "rs_lora", "train_norm",
           "unbalanced_factorization", "constraint", "rescaled", "weight_decompose", "wd_on_output", "conv_dim",
           "conv_alpha", "block_size", "tlora_min_rank", "tlora_alpha")
"""LyCORIS options that change what trains and that train.lora does not offer."""


def read_lycoris_config(path: Path, named: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(named, "", f"cannot read the lycoris_config JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(named, "", "expected a JSON object (algo, multiplier, linear_dim, linear_alpha …)")
    return data


def lycoris_section(config: dict[str, Any], named: str, skip: Any) -> dict[str, Any]:
    """train.lora for a lycoris_config, as SimpleTuner would build it; `skip(key, value, why)` lists what
    is not applied. A user mistake (unknown algo, a key SimpleTuner requires missing) is a ConfigError."""
    for key in ("algo", "multiplier", "linear_alpha"):
        if key not in config:
            raise ConfigError(named, key, "missing: SimpleTuner requires it in lycoris_config")
    algo = str(config["algo"]).lower()
    if algo not in ALGOS:
        raise ConfigError(named, "algo", f"{config['algo']!r} is not offered: lokr, loha (or lora/locon, a plain LoRA)")
    if "linear_dim" not in config and config.get("full_matrix") is not True:
        raise ConfigError(named, "linear_dim", "missing: SimpleTuner requires it unless full_matrix is true")
    if _int(config, "multiplier", named) != 1:
        raise ConfigError(named, "multiplier", f"{config['multiplier']}: only 1 trains what it saves (set 1.0)")
    for key in REFUSED:
        if config.get(key) not in (None, False, 0, 0.0):
            raise ConfigError(named, key, f"{config[key]!r}: this LyCORIS option is not offered; remove it")
    rank = _int(config, "linear_dim", named, default=4)
    alpha = _int(config, "linear_alpha", named, default=1)
    section: dict[str, Any] = {"type": ALGOS[algo], "rank": rank, "alpha": float(alpha or rank)}
    if algo in ("lora", "locon"):
        skip("lycoris_config.algo", algo, "LyCORIS's LoRA on Linear layers is a plain LoRA: train.lora type lora "
                                          "(peft), exported in diffusers' format")
    if ALGOS[algo] == "lokr":
        for key in LOKR_KEYS:
            if key in config:
                section[key] = _int(config, key, named) if key == "factor" else bool(config[key])
    known = {"algo", "multiplier", "linear_dim", "linear_alpha", "apply_preset", *LOKR_KEYS, *IGNORED, *REFUSED}
    for key, value in config.items():
        if key in IGNORED:
            skip(f"lycoris_config.{key}", value, IGNORED[key])
        elif key not in known:
            raise ConfigError(named, key, "not a lycoris_config key this importer knows; remove it")
        elif key in LOKR_KEYS and ALGOS[algo] != "lokr":
            skip(f"lycoris_config.{key}", value, f"a LoKr option; algo is {algo}")
    preset = config.get("apply_preset")
    if preset:
        section["preset"] = _preset(preset, named)
    else:
        section["targets"] = "all_linear"
        skip("lycoris_config.apply_preset", None, "unset: LyCORIS adapts every Linear and convolution; here every "
                                                  "Linear (train.lora.targets all_linear), not the patch-embedding conv")
    return section


def _preset(preset: Any, named: str) -> dict[str, Any]:
    if not isinstance(preset, dict):
        raise ConfigError(named, "apply_preset", "expected an object (target_module, module_algo_map …)")
    out: dict[str, Any] = {}
    for key, value in preset.items():
        if key not in PRESET_KEYS:
            raise ConfigError(named, f"apply_preset.{key}", f"not offered here ({', '.join(PRESET_KEYS)})")
        if key == "module_algo_map":
            out[key] = {cls: _module_options(options, f"apply_preset.module_algo_map.{cls}", named)
                        for cls, options in (value or {}).items()}
        else:
            out[key] = [str(name) for name in (value or [])]
    return out


def _module_options(options: Any, where: str, named: str) -> dict[str, Any]:
    if not isinstance(options, dict):
        raise ConfigError(named, where, "expected an object (algo, factor, dim, alpha)")
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key not in MODULE_KEYS:
            raise ConfigError(named, f"{where}.{key}", f"not offered here ({', '.join(MODULE_KEYS)})")
        if key == "algo":
            if str(value).lower() not in ("lokr", "loha"):
                raise ConfigError(named, f"{where}.algo", f"{value!r} is not offered: lokr or loha")
            out[key] = str(value).lower()
        else:
            out[key] = float(value) if key == "alpha" else int(value)
    return out


def _int(config: dict[str, Any], key: str, named: str, default: int | None = None) -> int:
    value = config.get(key, default)
    try:
        return int(value)  # SimpleTuner's own int(): 1.0 → 1, "16" → 16
    except (TypeError, ValueError):
        raise ConfigError(named, key, f"{value!r}: expected a number") from None
