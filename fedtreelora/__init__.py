"""fedtreelora: personalised federated LoRA fine-tuning with a layer-wise client tree (FedTreeLoRA).

    import fedtreelora as ftl
    tree = ftl.build_tree(client_states)            # one global client tree, cut deeper at deeper layers
    res = ftl.aggregate(client_states, tree=tree)   # per client: cluster expert and external expert

The native ops live in `fedtreelora.ops` (torch.ops.fedtreelora.*), JIT-built on first import. The
federated loop (transformers + PEFT) is in fedtreelora.federation, Flower apps in fedtreelora.flower;
neither is imported here, so `import fedtreelora` stays light.
"""
from . import ops
from .ops import native_available
from .tree import AggregationTree, TreeConfig, build_tree
# Imported after its submodule on purpose: the package attribute `aggregate` ends as the function.
from .aggregate import AggregationResult, aggregate

__version__ = "0.1.0"

__all__ = ["ops", "native_available", "TreeConfig", "AggregationTree", "build_tree", "aggregate",
           "AggregationResult", "__version__"]
