"""The experiment's clients as nodes of an `InProcessGrid`, for the drop-in `FedTreeLoRA` Strategy.

`pool_grid(pool)` connects client k of a `federation.pool.ClientPool` as node k. Each node is a
FedTreeLoRA ClientApp in the sense of `fedtreelora.flower.peft_client`: it trains the cluster expert
it is sent (under "arrays") with the frozen external expert (under "external") and its own lam,
which it keeps in `context.state` between rounds and never uploads, and it replies one ArrayRecord
and a MetricRecord with "num-examples". Its local run is the ClientPool's, the one
`fedtreelora simulate` runs for client k in that round (`pool.train(k, ..., server_round - 1)`,
seeded from (seed, round, client)). So

    FedTreeLoRA(tree_config=config.tree_config(), warmup_rounds=config.warmup_rounds, min_*_nodes=N)
        .start(grid=pool_grid(pool), initial_arrays=to_arrayrecord(pool.initial.adapter),
               num_rounds=config.warmup_rounds + config.rounds)

runs the rounds of `fedtreelora simulate --methods fedtreelora` through flwr's `Strategy.start`: the
same tree and, from the first federated round on, the same per-client metrics
(`tests/test_flower_strategy.py::test_strategy_on_the_experiments_clients_matches_fedtreelora_simulate`).
The one difference is the last warm-up round's evaluation: the Strategy builds the tree in that
round and evaluates the clients' experts, the schedule evaluates their own warm-up adapters.
"""
from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from ..client.trainer import ClientState
from .arrays import from_arrayrecord, to_arrayrecord
from .local_grid import InProcessGrid
from .peft_client import MIXING_STATE

__all__ = ["pool_node", "pool_grid"]


def pool_node(pool):
    """A ClientApp function (message, context) -> reply serving client `context.node_config["partition-id"]`
    of `pool` (a `federation.pool.ClientPool`)."""
    metric = pool.config.metric_name

    def serve(msg: Message, context: Context) -> Message:
        k = int(context.node_config["partition-id"])
        content = msg.content
        server_round = int(content.config_records["config"]["server-round"])
        external = from_arrayrecord(content.array_records["external"]) if "external" in content.array_records else None
        saved = context.state.array_records.get(MIXING_STATE)
        logits = ({g: t.reshape(()) for g, t in saved.to_torch_state_dict().items()} if saved is not None
                  else pool.initial.logits)
        state = ClientState(from_arrayrecord(content.array_records["arrays"]), logits)
        client = pool.client(k)
        if msg.metadata.message_type == "train":
            upload, info = pool.train(k, state, external, server_round - 1)
            context.state[MIXING_STATE] = ArrayRecord(
                torch_state_dict={g: v.detach().float().reshape(1) for g, v in upload.logits.items()})
            reply = RecordDict({"arrays": to_arrayrecord(upload.adapter), "metrics": MetricRecord(
                {"train-loss": float(info["train_loss"]), "num-examples": int(client.num_train)})})
        else:
            result = pool.evaluate(k, state, external)
            reply = RecordDict({"metrics": MetricRecord({metric: float(result[metric]), "loss": float(result["loss"]),
                                                         "num-examples": int(len(client.test_idx))})})
        return Message(reply, reply_to=msg)

    return serve


def pool_grid(pool) -> InProcessGrid:
    """An `InProcessGrid` whose node k (partition-id k) is client k of `pool`."""
    serve = pool_node(pool)
    n = len(pool.clients)
    return InProcessGrid({k: serve for k in range(n)},
                         node_configs={k: {"partition-id": k, "num-partitions": n} for k in range(n)})
