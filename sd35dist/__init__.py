"""sd35dist: SD3.5 Large full fine-tunes on Slurm. Rank side and CLI; imports nothing heavy at top level."""

import logging as _logging

__version__ = "0.1.0"

# torchao (train.fp8) ships CUDA kernels and registers its enums with torch's pytree; diffusers imports it
# whenever it is installed. On a CPU-only torch that logs, on every diffusers import, that the kernels do
# not load, two deprecation notes and that diffusers' torchao quantizer misses classes. FP8 training needs
# none of it: keep these warnings (errors still show) out of every rank's log.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
