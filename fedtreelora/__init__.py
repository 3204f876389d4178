"""fedtreelora: personalised federated LoRA fine-tuning with a layer-wise client tree (FedTreeLoRA).

    import fedtreelora as ftl
    tree = ftl.build_tree(client_states)            # one global client tree, cut deeper at deeper layers
    res = ftl.aggregate(client_states, tree=tree)   # per client: cluster expert and external expert

The native ops live in `fedtreelora.ops` (torch.ops.fedtreelora.*), JIT-built on first import.
"""
from importlib import import_module

from . import ops
from .ops import native_available

__version__ = "0.1.0"

# Public names and the module that defines each; imported on first use so that `import fedtreelora`
# stays light (the federated parts pull in transformers and peft).
_EXPORTS = {
    "TreeConfig": "tree",
    "AggregationTree": "tree",
    "build_tree": "tree",
    "aggregate": "aggregate",
    "AggregationResult": "aggregate",
}


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedtreelora' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = ["ops", "native_available", "__version__", *_EXPORTS]
