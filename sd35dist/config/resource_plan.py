"""Per-GPU memory, per-step communication and step time of a recipe on a profile: pure arithmetic.

`sd35dist plan` prints it and `submit` refuses a recipe that cannot fit, before anything
waits in a queue. Inputs are numbers only (parameter counts from `model_size`, the mesh
from `mesh_layout`, the GPU's declared peak and link bandwidths); no torch.

Memory, per GPU, in two phases whose larger one is the peak:
- backward: sharded state (weights, gradients, optimizer state, EMA) + weights gathered
  for compute + activations kept for backward + one block's working set;
- optimizer step: the sharded state + the optimizer's temporaries (torch's foreach AdamW
  allocates one sqrt(v) the size of all its parameters; fused and per-parameter ones ~0).
On top: allocator fragmentation (HEADROOM_FRACTION) and a fixed reserve (CUDA/NCCL).

Activations, in bf16 elements of the hidden size d per token (image + text tokens):
per-block activation checkpointing keeps only each block's inputs (1·d) and recomputes
one block at a time (BLOCK_WORKING_D); without it every block keeps BLOCK_ACTIVATION_D;
selective policies (every N-th block, attention or MLPs only) keep what
sd35dist/config/activation_policy.py counts, and `choose_checkpointing` picks the one with the
least recomputation that fits. These constants are calibrated on two H100 measurements of SD3.5 Large (1024 px, batch 4,
per-block checkpointing, pure-bf16 weights and AdamW states on one GPU): 76.2 GiB with
eager foreach AdamW, 67.2 GiB with per-block compile and fused AdamW; a unit test holds
the model to both within PEAK_TOLERANCE.

Communication, bytes each GPU sends per micro-step (ring collectives: (n−1)/n of the
buffer for all-gather and reduce-scatter, 2(n−1)/n for all-reduce); gradients are reduced
in fp32 (FSDP2's reduce_dtype, DeepSpeed's communication_data_type):
- FSDP / ZeRO-3 over n ranks: all-gather weights in forward and again in backward, reduce-scatter gradients;
- HSDP (s shards × r replicas): those three inside the node, plus an all-reduce of the
  fp32 gradient shard (P/s) across the r replicas;
- ZeRO-2 over n ranks: reduce-scatter gradients, all-gather the updated bf16 weights.
A flat ring over several nodes moves its whole volume at the NIC's pace, so it counts as
inter-node traffic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sd35dist.config.activation_policy import CheckpointingPolicy, candidate_policies, parse_policy
from sd35dist.config.mesh_layout import MeshLayout
from sd35dist.config.model_flops import mmdit_train_flops_per_sample
from sd35dist.config.model_size import TransformerSize, adapter_parameters, image_tokens, transformer_size
from sd35dist.config.recipe import Recipe

GIB = 1024**3
BLOCK_WORKING_D = 32
"""One block recomputed in backward plus its gradient temporaries, per token."""
HEADROOM_FRACTION = 0.01
"""Allocator fragmentation, as a share of the peak."""
RESERVE_GIB = 0.5
"""CUDA context and workspaces the allocator does not count."""
NCCL_RESERVE_GIB = 0.5
"""NCCL's buffers and channels, once there is more than one rank."""
PEAK_TOLERANCE = 0.03
"""The memory model's stated accuracy against the measured H100 peaks."""
TEXT_TOKENS_CLIP = 77


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hardware:
    """One GPU and its links, as a cluster profile declares them."""

    name: str
    memory_gib: float
    """Memory the GPU offers (what nvidia-smi reports as total)."""
    peak_bf16_tflops: float
    """Dense bf16 tensor-core peak from the data sheet."""
    matmul_efficiency: float
    """Share of the peak the training kernels reach (hardware FLOPs utilisation)."""
    intra_node_gb_s: float
    """Collective bus bandwidth per GPU inside a node (NVLink), GB/s."""
    inter_node_gb_s: float
    """Network bandwidth per GPU between nodes (one NIC per GPU), GB/s."""
    fp8: bool = True
    """Whether the GPU has FP8 tensor cores (Hopper, Ada, Blackwell: yes; A100: no)."""


GPU_PRESETS: dict[str, Hardware] = {
    # SXM5 80 GB: 989 TFLOP/s dense bf16; NVLink 4 at 450 GB/s per direction, of which NCCL's
    # all-gather reaches about 80%; one 400 Gb/s NIC (50 GB/s) per GPU.
    "h100": Hardware(name="h100", memory_gib=79.6, peak_bf16_tflops=989.0, matmul_efficiency=0.6,
                     intra_node_gb_s=360.0, inter_node_gb_s=50.0),
    # H200 SXM 141 GB: H100's compute and links, more and faster memory.
    "h200": Hardware(name="h200", memory_gib=140.4, peak_bf16_tflops=989.0, matmul_efficiency=0.6,
                     intra_node_gb_s=360.0, inter_node_gb_s=50.0),
    # A100 SXM 80 GB: 312 TFLOP/s dense bf16, NVLink 3 at 300 GB/s per direction, no FP8.
    "a100": Hardware(name="a100", memory_gib=79.2, peak_bf16_tflops=312.0, matmul_efficiency=0.6,
                     intra_node_gb_s=240.0, inter_node_gb_s=25.0, fp8=False),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Workload:
    """What one rank trains, in the numbers memory and time depend on."""

    strategy: str
    master_bytes: int
    """Bytes per master weight (4: fp32 adamw; 2: adamw_bf16)."""
    state_bytes: int
    """Optimizer state bytes per parameter (8: fp32 m, v; 6: bf16 m, v + Kahan buffer; 4: bf16 m, v)."""
    compute_bytes: int
    """Bytes per value in forward/backward (2: bf16)."""
    optimizer_impl: str
    """foreach (one sqrt(v) temporary of all parameters), fused or per_parameter."""
    batch: int
    gradient_accumulation: int
    tokens: int
    """Image + text tokens of one sample at the largest bucket."""
    activation_checkpointing: bool | CheckpointingPolicy
    """True: every block; False: none; or a selective policy (activation_policy.py)."""
    ema: bool
    offload_optimizer: bool = False
    offload_params: bool = False
    trainable: int | None = None
    """LoRA: the adapter parameters, the only ones with gradients, fp32 masters and optimizer state
    (the base is frozen in the compute dtype); None: a full fine-tune, every parameter trains."""
    fp8: str = "none"
    """train.fp8: tensorwise all-gathers the blocks' Linear weights in fp8 (1 B); torchao keeps the
    bf16 inputs for backward, so activations count as without fp8."""

    @property
    def policy(self) -> CheckpointingPolicy:
        if isinstance(self.activation_checkpointing, CheckpointingPolicy):
            return self.activation_checkpointing
        return CheckpointingPolicy("full" if self.activation_checkpointing else "none")


def largest_bucket(recipe: Recipe, config: Mapping[str, Any]) -> tuple[int, int, int]:
    """(width, height, tokens) of the recipe's bucket with the most tokens (image + CLIP + T5)."""
    text = TEXT_TOKENS_CLIP + recipe.data.max_sequence_length
    width, height = max(recipe.data.buckets, key=lambda b: image_tokens(config, *b))
    return width, height, image_tokens(config, width, height) + text


def workload_from_recipe(recipe: Recipe, config: Mapping[str, Any], *, on_gpus: bool) -> Workload:
    """The Workload the recipe trains: dtypes and optimizer as sd35dist/parallel/optimizer.py picks them.
    `gradient_checkpointing: auto` is planned as full per-block checkpointing; `choose_checkpointing` resolves it."""
    train, parallel = recipe.train, recipe.parallel
    bf16_masters = train.optimizer == "adamw_bf16"
    master = 2 if bf16_masters else 4
    if parallel.strategy != "fsdp2":
        impl = "per_parameter" if parallel.offload_optimizer or not on_gpus else "fused"  # DeepSpeed's (CPU) Adam
    elif bf16_masters:
        impl = "per_parameter"  # optimi's Kahan AdamW runs its per-parameter loop on DTensors
    else:
        impl = "fused" if on_gpus else "per_parameter"  # torch AdamW(fused=True) on CUDA; CPU tensors take the loop
    return Workload(
        strategy=parallel.strategy, master_bytes=master, state_bytes=6 if bf16_masters else 8,
        compute_bytes=2 if train.mixed_precision == "bf16" else master, optimizer_impl=impl,
        batch=train.train_batch_size, gradient_accumulation=train.gradient_accumulation_steps,
        tokens=largest_bucket(recipe, config)[2],
        activation_checkpointing=parse_policy(train.gradient_checkpointing) or CheckpointingPolicy("full"),
        ema=train.ema.enabled, offload_optimizer=parallel.offload_optimizer, offload_params=parallel.offload_params,
        trainable=None if train.lora is None else adapter_parameters(config, train.lora),
        fp8=train.fp8,
    )


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    rows: tuple[tuple[str, float], ...]
    """(what, bytes per GPU) of everything counted."""
    backward_bytes: float
    step_bytes: float
    peak_bytes: float
    """The larger phase plus fragmentation and reserves."""
    phase: str

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


def memory_plan(size: TransformerSize, work: Workload, mesh: MeshLayout) -> MemoryPlan:
    """Bytes per GPU of `work` on `mesh` (see the module docstring)."""
    p, shards, cb = size.total, mesh.shard_degree, work.compute_bytes
    d, layers = size.hidden_size, len(size.blocks)
    trained = p if work.trainable is None else work.trainable
    rows: list[tuple[str, float]] = []
    if work.trainable is not None:
        _lora_state(rows, size, work, shards)
    elif work.strategy == "fsdp2":
        rows.append(("weights (sharded master)", p * work.master_bytes / shards))
        if shards > 1 or cb != work.master_bytes:
            # The root stays gathered through forward; one block computes while the next is prefetched.
            block_bytes = 1 if work.fp8 == "tensorwise" else cb  # torchao's fp8 all-gather of the Linear weights
            rows.append(("weights gathered for compute", size.root * cb + 2 * size.largest_block * block_bytes))
        rows.append(("gradients (sharded)", p * work.master_bytes / shards))
        if shards > 1:
            rows.append(("gradient reduce buffer (one block, fp32)", size.largest_block * (cb + 4)))
        rows.append(("optimizer state (sharded)", p * work.state_bytes / shards))
    else:
        zero3 = work.strategy == "zero3"
        weight_bytes = p * cb / shards if zero3 else p * cb
        rows.append((f"weights, {'sharded' if zero3 else 'whole'}", 0.0 if work.offload_params else weight_bytes))
        if zero3:
            rows.append(("weights gathered for compute", (size.root + 2 * size.largest_block) * cb))
        on_gpu = 0.0 if work.offload_optimizer else 1.0
        rows.append(("master weights, fp32 (sharded)", on_gpu * p * 4 / shards))
        rows.append(("gradients, fp32 (sharded)", on_gpu * p * 4 / shards))
        rows.append(("gradient reduce buckets", 2 * d * d * cb))
        rows.append(("optimizer state, fp32 (sharded)", on_gpu * p * 8 / shards))
    if work.ema:
        rows.append(("EMA, fp32 (sharded like the optimizer)", trained * 4 / shards))
    state = sum(b for _, b in rows)

    per_block_token = d * cb * work.batch * work.tokens
    policy = work.policy
    kept = {"full": "block inputs", "none": "every block"}.get(policy.kind, f"checkpointing {policy.name}")
    activations = (f"activations kept ({kept})", policy.kept_d(layers) * per_block_token)
    working = ("one block's backward working set", BLOCK_WORKING_D * per_block_token)
    gathered = sum(b for name, b in rows if "gathered" in name or "buffer" in name or "buckets" in name)
    temporaries = 0.0
    if work.optimizer_impl == "foreach" and not work.offload_optimizer:
        master = work.master_bytes if work.strategy == "fsdp2" and work.trainable is None else 4
        temporaries = trained * master / shards
    rows += [activations, working, (f"optimizer temporaries ({work.optimizer_impl})", temporaries)]
    backward = state + activations[1] + working[1]
    step = state - gathered + temporaries
    phase = "backward" if backward >= step else "optimizer step"
    reserve = (RESERVE_GIB + (NCCL_RESERVE_GIB if mesh.world_size > 1 else 0.0)) * GIB
    peak = max(backward, step) * (1 + HEADROOM_FRACTION) + reserve
    rows.append(("allocator and CUDA/NCCL headroom", peak - max(backward, step)))
    return MemoryPlan(tuple(rows), backward, step, peak, phase)


def _lora_state(rows: list[tuple[str, float]], size: TransformerSize, work: Workload, shards: int) -> None:
    """A LoRA's state: the frozen base in the compute dtype (sharded by fsdp2, whole on every GPU under
    zero2) and the adapters with fp32 masters, gradients and Adam moments, sharded."""
    p, t, cb = size.total, work.trainable or 0, work.compute_bytes
    if work.strategy == "fsdp2":
        rows.append(("base weights, frozen (sharded)", p * cb / shards))
        if shards > 1:
            rows.append(("weights gathered for compute", (size.root + 2 * size.largest_block) * cb))
    else:
        rows.append(("base weights, frozen (whole)", p * cb))
    rows.append(("adapter weights, fp32 (sharded)", t * 4 / shards))
    rows.append(("adapter gradients, fp32 (sharded)", t * 4 / shards))
    rows.append(("adapter optimizer state, fp32 (sharded)", t * 8 / shards))


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Bytes one GPU sends per micro-step, inside its node and across nodes."""

    strategy: str
    intra_bytes: float
    inter_bytes: float


def _ring(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def traffic(strategy: str, params: int, *, world_size: int, nodes: int, shard_degree: int | None = None,
            compute_bytes: int = 2, reduce_bytes: int = 4, trainable: int | None = None) -> Traffic:
    """Per-GPU bytes per micro-step of one strategy (`hsdp` needs shard_degree; see the module docstring).
    A LoRA (`trainable` adapter parameters) gathers the whole base but reduces only the adapters' gradients."""
    gather, reduce = params * compute_bytes, (params if trainable is None else trainable) * reduce_bytes
    if strategy == "hsdp":
        shards = shard_degree or world_size // nodes
        replicas = world_size // shards
        inside = _ring(shards) * (2 * gather + reduce)
        across = 2 * _ring(replicas) * reduce / shards
        return Traffic(strategy, inside, across)
    if strategy in ("fsdp", "zero3"):
        volume = _ring(world_size) * (2 * gather + reduce)
    elif strategy == "zero2":
        volume = _ring(world_size) * (reduce + (gather if trainable is None else reduce / reduce_bytes * compute_bytes))
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    return Traffic(strategy, volume if nodes == 1 else 0.0, volume if nodes > 1 else 0.0)


def traffic_table(params: int, *, world_size: int, nodes: int, compute_bytes: int = 2,
                  trainable: int | None = None) -> list[Traffic]:
    """FSDP, HSDP (shards = GPUs per node; only with several nodes of several GPUs), ZeRO-2 and ZeRO-3."""
    kinds = ["fsdp"] + (["hsdp"] if nodes > 1 and world_size > nodes else []) + ["zero2", "zero3"]
    return [traffic(k, params, world_size=world_size, nodes=nodes, shard_degree=world_size // nodes,
                    compute_bytes=compute_bytes, trainable=trainable) for k in kinds]


@dataclasses.dataclass(frozen=True)
class StepTime:
    compute_s: float
    intra_s: float
    inter_s: float
    overlapped_s: float
    """Communication hidden behind compute as far as it goes: the slowest of the three."""
    serial_s: float
    """Nothing overlapped: their sum."""
    mfu_overlapped: float
    mfu_serial: float


def step_time(train_flops_per_sample: float, hardware: Hardware, link: Traffic, *, batch: int,
              activation_checkpointing: bool, micro_steps: int = 1, recomputed_flops_per_sample: float | None = None
              ) -> StepTime:
    """Optimizer-step time from the declared peak and links; MFU counts model FLOPs only (no recompute).
    `recomputed_flops_per_sample` (a selective policy's recomputation) replaces the bool's full or none."""
    model_flops = train_flops_per_sample * batch
    if recomputed_flops_per_sample is None:
        # Per-block checkpointing runs every block's forward twice: 4/3 of the model FLOPs.
        hardware_flops = model_flops * (4 / 3 if activation_checkpointing else 1)
    else:
        hardware_flops = model_flops + recomputed_flops_per_sample * batch
    peak = hardware.peak_bf16_tflops * 1e12
    compute = micro_steps * hardware_flops / (peak * hardware.matmul_efficiency)
    intra = micro_steps * link.intra_bytes / (hardware.intra_node_gb_s * 1e9)
    inter = micro_steps * link.inter_bytes / (hardware.inter_node_gb_s * 1e9)
    overlapped, serial = max(compute, intra, inter), compute + intra + inter
    useful = micro_steps * model_flops
    return StepTime(compute, intra, inter, overlapped, serial, useful / (overlapped * peak), useful / (serial * peak))


def largest_batch_that_fits(size: TransformerSize, work: Workload, mesh: MeshLayout, memory_gib: float) -> int:
    """The largest per-GPU batch whose predicted peak fits (0 if not even one sample does)."""
    best = 0
    for batch in range(1, 257):
        if memory_plan(size, dataclasses.replace(work, batch=batch), mesh).peak_gib > memory_gib:
            break
        best = batch
    return best


def fit_advice(size: TransformerSize, work: Workload, mesh: MeshLayout, plan: MemoryPlan,
               memory_gib: float) -> tuple[str, str]:
    """(recipe key, what to do) for a plan whose peak exceeds `memory_gib`: the knob that helps most."""
    kept = next(b for name, b in plan.rows if name.startswith("activations kept"))
    state = sum(b for name, b in plan.rows if "sharded" in name or "whole" in name or name.startswith("EMA"))
    budget = memory_gib * GIB
    if work.policy.kind != "full" and kept > 0.25 * budget:
        return "train.gradient_checkpointing", (f"set it to auto or true (keeps {kept / GIB:.1f} GiB of activations "
                                                f"now with {work.policy.name})")
    if state > 0.6 * budget:
        if work.strategy == "zero2":
            return "parallel.strategy", "use fsdp2 or zero3: zero2 keeps whole bf16 weights on every GPU"
        if work.strategy == "zero3":
            return "parallel.offload_optimizer", "set it to true (fp32 master weights and Adam moments to CPU memory)"
        if work.master_bytes == 4 and work.trainable is None:
            return "train.optimizer", ("use adamw_bf16 (10 B per parameter instead of 16), or shard over more GPUs "
                                       f"(parallel.shard_degree, now {mesh.shard_degree})")
        return "parallel.shard_degree", f"shard over more GPUs (now {mesh.shard_degree})"
    fits = largest_batch_that_fits(size, work, mesh, memory_gib)
    if fits:
        return "train.train_batch_size", f"at most {fits} fits (now {work.batch})"
    return "parallel.strategy", "nothing fits one sample: shard over more GPUs or offload (zero3 with offload_optimizer)"


def train_flops_per_sample(config: Mapping[str, Any], width: int, height: int, text_tokens: int) -> float:
    """Model FLOPs of training on one sample (sd35dist/config/model_flops.py's count; torch-free)."""

    return mmdit_train_flops_per_sample(config, height, width, text_tokens)


@dataclasses.dataclass(frozen=True)
class CheckpointingChoice:
    """The activation checkpointing policy `auto` resolves to, and what it costs."""

    policy: CheckpointingPolicy
    plan: MemoryPlan
    recomputed_share: float
    """Recomputed forward FLOPs over the model FLOPs of a training step (full per-block: about 1/3)."""
    fits: bool


def recomputed_share(policy: CheckpointingPolicy, size: TransformerSize, tokens: int, train_flops: float) -> float:
    """The policy's recomputed FLOPs per sample over the model FLOPs of training one sample."""
    return policy.recomputed_flops(size.hidden_size, tokens, len(size.blocks)) / train_flops if train_flops else 0.0


def choose_checkpointing(size: TransformerSize, work: Workload, mesh: MeshLayout, memory_gib: float,
                         train_flops: float) -> CheckpointingChoice:
    """The policy with the least recomputation whose predicted peak fits `memory_gib` (ties: the smaller
    peak); full per-block checkpointing, marked as not fitting, when none does."""
    layers = len(size.blocks)
    options = []
    for policy in candidate_policies(layers):
        plan = memory_plan(size, dataclasses.replace(work, activation_checkpointing=policy), mesh)
        options.append((policy.recomputed_flops(size.hidden_size, work.tokens, layers), plan.peak_bytes, policy, plan))
    options.sort(key=lambda o: (o[0], o[1]))
    for _, peak, policy, plan in options:
        if peak <= memory_gib * GIB:
            return CheckpointingChoice(policy, plan, recomputed_share(policy, size, work.tokens, train_flops), True)
    full = CheckpointingPolicy("full")
    plan = memory_plan(size, dataclasses.replace(work, activation_checkpointing=full), mesh)
    return CheckpointingChoice(full, plan, recomputed_share(full, size, work.tokens, train_flops), False)


def resolve_checkpointing(recipe: Recipe, config: Mapping[str, Any], mesh: MeshLayout,
                          memory_gib: float | None) -> CheckpointingPolicy:
    """The policy a rank applies: the recipe's, or for `auto` `choose_checkpointing`'s on a GPU of
    `memory_gib` (None, no GPU: full per-block checkpointing, the safe choice)."""
    forced = parse_policy(recipe.train.gradient_checkpointing)
    if forced is not None:
        return forced
    if memory_gib is None:
        return CheckpointingPolicy("full")
    width, height, _ = largest_bucket(recipe, config)
    flops = train_flops_per_sample(config, width, height, TEXT_TOKENS_CLIP + recipe.data.max_sequence_length)
    work = workload_from_recipe(recipe, config, on_gpus=True)
    return choose_checkpointing(transformer_size(config), work, mesh, memory_gib, flops).policy
