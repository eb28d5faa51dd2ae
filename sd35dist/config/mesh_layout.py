"""Which mesh a job runs: FSDP over all ranks, HSDP (shard in the node, replicate across
nodes) or DeepSpeed's ZeRO over all ranks — decided purely from the recipe's parallel
section and the job's shape (nodes × workers per node).

The launcher calls it with the profile's numbers (dry-run, rendered script's first log
line, `sd35dist plan`); the ranks call it with the torchrun environment's numbers. Both
get the same answer, so what the dry-run says is what runs. No torch here.

Why HSDP by default across nodes: full sharding over N nodes all-gathers every weight
over the inter-node network twice a step (forward, backward) and reduce-scatters every
gradient over it; for SD3.5 Large on 64 nodes that is ~48 GB per GPU per step, well
over a second on a 400 Gb/s NIC. HSDP keeps the all-gathers and reduce-scatters on
NVLink and sends only one all-reduce of the gradient shard across nodes.
"""

from __future__ import annotations

import dataclasses

from sd35dist.config.loading import ConfigError

RECIPE = "recipe"
DEFAULT_ACROSS_NODES = "default across nodes"
ALL_RANKS = "all ranks"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshLayout:
    """How a job's ranks share the model."""

    strategy: str
    world_size: int
    nodes: int
    shard_degree: int
    """Ranks one parameter's shards span; == world_size for plain FSDP and ZeRO."""
    source: str
    """Why this shard degree: set by the recipe, the default across nodes, or all ranks."""

    @property
    def replicas(self) -> int:
        return self.world_size // self.shard_degree

    @property
    def is_hsdp(self) -> bool:
        return self.replicas > 1

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return (self.replicas, self.shard_degree) if self.is_hsdp else (self.world_size,)

    @property
    def recipe_shard_degree(self) -> int | None:
        """What FSDP2 builds from: None (one flat mesh) unless replicas exist."""
        return self.shard_degree if self.is_hsdp else None

    def describe(self) -> str:
        """One line for the dry-run, the job's first log line and the ranks' log."""
        where = f"{self.nodes} node(s)"
        if self.strategy == "fsdp2":
            if self.is_hsdp:
                why = {DEFAULT_ACROSS_NODES: "shard_degree = workers per node, the default across nodes",
                       RECIPE: "parallel.shard_degree of the recipe"}[self.source]
                return (f"fsdp2: HSDP {self.replicas} replicas × {self.shard_degree} shards over {where} "
                        f"(mesh {list(self.mesh_shape)}; {why})")
            return f"fsdp2: FSDP over {self.world_size} ranks on {where} (mesh {list(self.mesh_shape)})"
        sharded = "gradients and optimizer state" if self.strategy == "zero2" else "weights, gradients and optimizer state"
        return f"{self.strategy}: {sharded} sharded over {self.world_size} ranks on {where}"


def resolve_mesh(
    *,
    strategy: str,
    shard_degree: int | None,
    nodes: int,
    procs_per_node: int,
    recipe_file: str = "recipe",
) -> MeshLayout:
    """The layout a job of `nodes` × `procs_per_node` ranks runs.

    fsdp2 with more than one node and more than one worker per node shards inside the node
    (shard_degree = workers per node) unless the recipe sets parallel.shard_degree. One
    worker per node would make HSDP plain replication (no memory saved), so such jobs keep
    FSDP over all ranks.
    """
    if nodes < 1 or procs_per_node < 1:
        raise ValueError(f"nodes and procs_per_node must be ≥ 1, got {nodes} and {procs_per_node}")
    world_size = nodes * procs_per_node
    if shard_degree is not None:
        if shard_degree > world_size or world_size % shard_degree:
            raise ConfigError(recipe_file, "parallel.shard_degree",
                              f"{shard_degree} must divide the world size {world_size}")
        return MeshLayout(strategy=strategy, world_size=world_size, nodes=nodes, shard_degree=shard_degree,
                          source=RECIPE)
    if strategy == "fsdp2" and nodes > 1 and procs_per_node > 1:
        return MeshLayout(strategy=strategy, world_size=world_size, nodes=nodes, shard_degree=procs_per_node,
                          source=DEFAULT_ACROSS_NODES)
    return MeshLayout(strategy=strategy, world_size=world_size, nodes=nodes, shard_degree=world_size, source=ALL_RANKS)


def refuse_zero3_across_gpu_nodes(strategy: str, nodes: int, gpus_per_node: int, recipe_file: str = "recipe") -> None:
    """ZeRO-3 over several GPU nodes all-gathers every weight across the network each step
    (DeepSpeed's hierarchical hpZ/MiCS would fix that but is not wired to our partition
    loading yet): refuse it with the strategy to use instead."""
    if strategy == "zero3" and nodes > 1 and gpus_per_node > 0:
        raise ConfigError(
            recipe_file, "parallel.strategy",
            f"zero3 across {nodes} nodes all-gathers every weight over the inter-node network each step; "
            f"use fsdp2 (HSDP by default across nodes: sharded inside the node, replicated across nodes), "
            f"or zero2",
        )
