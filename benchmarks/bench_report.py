"""What every benchmark row says about where and how it was measured."""

from __future__ import annotations

import os
import platform
import shlex
import sys

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def typed_command() -> str:
    """The command line as the user typed it (the interpreter relative to the checkout when inside it)."""
    python = os.path.relpath(sys.executable)
    return shlex.join([sys.executable if python.startswith("..") else python, *sys.argv])
