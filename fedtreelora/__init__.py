"""fedtreelora: personalised federated LoRA fine-tuning with a layer-wise client tree (FedTreeLoRA).

    import fedtreelora as ftl
    tree = ftl.build_tree(client_states)            # one global client tree, cut deeper at deeper layers
    res = ftl.aggregate(client_states, tree=tree)   # per client: cluster expert and external expert
    tree = ftl.extend_tree(tree, client_states, late_states)  # late clients placed, no rebuild

`import fedtreelora` loads the core library only (torch + numpy; `fedtreelora.core`). The native
ops (`fedtreelora.ops`, torch.ops.fedtreelora.*) are JIT-built on their first call. The federated
loop (transformers + PEFT) lives in `fedtreelora.federation` and `fedtreelora.client`, the Flower
apps in `fedtreelora.flower`; none of them is imported here.
"""
import sys as _sys

from .core import AggregationResult, AggregationTree, TreeConfig, aggregate, build_tree, extend_tree, ops
from .core.ops import native_available

_sys.modules[__name__ + ".ops"] = ops   # `import fedtreelora.ops` names the same module as `fedtreelora.ops`

__version__ = "0.1.0"

__all__ = ["ops", "native_available", "TreeConfig", "AggregationTree", "build_tree", "extend_tree", "aggregate",
           "AggregationResult", "__version__"]
