"""The library `import fedtreelora` exposes: torch and numpy only (scipy inside the reference ops).

- `ops`: the native ops (torch.ops.fedtreelora.*), their checks and fake kernels;
- `reference`: slow float64 versions of every op (what the kernels are tested against);
- `build`: the JIT build of the native core, on the first op call;
- `adapters`: PEFT LoRA state dicts <-> packed client rows [N, P] + layer offsets;
- `tree`: the global client tree and its layer-wise cuts (in memory or streamed layer by layer);
- `extend`: late clients placed into a stored tree (`extend_tree`);
- `aggregation`: cluster and external experts per client;
- `synthetic`: client adapters with a planted group structure (examples, tests, benchmarks);
- `files`: atomic file writes.
"""
from . import ops
from .aggregation import AggregationResult, aggregate, group_experts
from .extend import extend_tree
from .tree import AggregationTree, TreeConfig, build_tree, choose_cuts, client_distances

__all__ = ["ops", "TreeConfig", "AggregationTree", "build_tree", "choose_cuts", "client_distances", "extend_tree", "aggregate",
           "group_experts", "AggregationResult"]
