"""FedTreeLoRA on Flower (flwr >= 1.20, Message API): the same federation as `fedtreelora simulate`,
run by a Flower ServerApp over ClientApps on the simulation engine or across machines.

- `strategy.PersonalisedStrategy`: warm-up, then the method's server rule (for FedTreeLoRA: build
  the tree once, then every round each client gets its *own* cluster and external experts);
- `client_app.client_app()` / `client_app.app`: the ClientApp, wrapping `client.LocalTrainer`;
- `server_app.server_app()` / `server_app.app`: the ServerApp, config from the Flower run config;
- `messages`: the wire format (PEFT state dicts and mixing logits as ArrayRecords).

See docs/flower.md for `flwr run` on the simulation engine and on SuperLink/SuperNodes.
"""
