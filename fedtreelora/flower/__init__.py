"""FedTreeLoRA on Flower (flwr >= 1.20, Message API).

For any PEFT Flower app (the FlowerTune LLM template, say):

- `FedTreeLoRA`: a `flwr.serverapp.strategy.Strategy`, the drop-in for `FedAvg` in the ServerApp
  (warm-up, then the global client tree; each node gets its own cluster and external experts);
- `load_experts(model, msg, context)` / `make_reply(model, msg, context, num_examples)`: the two
  client calls around the app's own PEFT training loop; `training_seed(msg, context)`: the seed of
  the node's local run, the one `fedtreelora simulate` gives that client in that round;
- `to_arrayrecord` / `from_arrayrecord`: state dicts <-> ArrayRecords of any floating dtype (bf16);
- `InProcessGrid`: a Grid whose nodes are ClientApps in this process (tests, small runs).

The one round loop under all of it is `strategy.PersonalisedStrategy` (any server rule of
`federation.methods`; `FedTreeLoRA` is it with FedTreeLoRA's rule). This project's own experiment
runs it too, in process (`fedtreelora simulate`) and on Flower, through `experiment.Experiment`:

- `pool_nodes.pool_node(pool)` / `pool_grid(pool)`: the experiment's clients as nodes;
- `client_app.client_app()` / `client_app.app`, `server_app.server_app()` / `server_app.app`: the
  experiment's Flower app (`examples/flower_experiment`).

See docs/flower.md.
"""
from .arrays import from_arrayrecord, to_arrayrecord
from .local_grid import InProcessGrid
from .peft_client import load_experts, make_reply, training_seed
from .strategy import PersonalisedStrategy
from .tree_strategy import FedTreeLoRA

__all__ = ["FedTreeLoRA", "PersonalisedStrategy", "load_experts", "make_reply", "training_seed", "to_arrayrecord",
           "from_arrayrecord", "InProcessGrid"]
