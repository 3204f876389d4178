"""FedTreeLoRA on Flower (flwr >= 1.20, Message API).

For any PEFT Flower app (the FlowerTune LLM template, say):

- `FedTreeLoRA`: a `flwr.serverapp.strategy.Strategy`, the drop-in for `FedAvg` in the ServerApp
  (warm-up, then the global client tree; each node gets its own cluster and external experts);
- `load_experts(model, msg, context)` / `make_reply(model, msg, context, num_examples)`: the two
  client calls around the app's own PEFT training loop; `training_seed(msg, context)`: the seed of
  the node's local run, the one `fedtreelora simulate` gives that client in that round;
- `to_arrayrecord` / `from_arrayrecord`: state dicts <-> ArrayRecords of any floating dtype (bf16);
- `InProcessGrid`: a Grid whose nodes are ClientApps in this process (tests, small runs).

This project's own experiment on Flower (the federation of `fedtreelora simulate`, all methods):

- `strategy.PersonalisedStrategy`, `client_app.client_app()` / `client_app.app`,
  `server_app.server_app()` / `server_app.app`, `messages` (their wire format);
- `pool_nodes.pool_grid(pool)`: the experiment's clients as nodes for the `FedTreeLoRA` Strategy
  (it then runs the rounds of `fedtreelora simulate --methods fedtreelora`).

See docs/flower.md.
"""
from .arrays import from_arrayrecord, to_arrayrecord
from .local_grid import InProcessGrid
from .peft_client import load_experts, make_reply, training_seed
from .tree_strategy import FedTreeLoRA

__all__ = ["FedTreeLoRA", "load_experts", "make_reply", "training_seed", "to_arrayrecord", "from_arrayrecord", "InProcessGrid"]
