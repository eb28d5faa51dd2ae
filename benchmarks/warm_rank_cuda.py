"""Run by benchmarks/gpu_check.sh as a warm rank (`sd35dist torchrun --start-method=forkserver -m
benchmarks.warm_rank_cuda`): the rank was forked from a fork server that imported torch, diffusers,
transformers, peft and torchao, and must still be able to use CUDA (none of them may have
initialised it in the fork server). Fails with the rank's error otherwise; on CPU it says so."""

import sys

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: warm rank: no CUDA here; forked from the fork server and ran on CPU")
        return 0
    product = (torch.ones(1024, device="cuda") * 2).sum().item()
    assert product == 2048.0, product
    print(f"gpu_check: warm rank: CUDA works after the fork ({torch.cuda.get_device_name()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
