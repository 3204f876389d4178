"""The experiment's clients as Flower nodes: `pool_node(pool)` serves the messages of
`strategy.PersonalisedStrategy` for client `partition-id` of a `federation.pool.ClientPool`.

It is the one ClientApp of the experiment: `fedtreelora simulate` connects its clients as nodes of
an `InProcessGrid` (`pool_grid(pool)`, node k = client k), and the experiment's Flower ClientApp
(`client_app.py`) serves the same function on each SuperNode. A train message is the pool's local
run of that client and round (`pool.train(k, ..., server_round - 1)`, seeded from (seed, round,
client)) from the cluster expert under "arrays" (empty: the client's own initial adapter, round 1)
with the frozen external expert under "external"; an evaluate message scores what it is sent.

Mixing logits: the client reports its lam (ConfigRecord `strategy.MIXING_RECORD`, so that the
server's checkpoint holds it and the record shows it) and starts from what the server sends back,
else from its `context.state` (what a drop-in FedTreeLoRA client keeps), else from the initial
logits. "fixed-lam" in the config holds lam there, untrained (the mixing ablation). Every reply's
MetricRecord carries "partition-id" and "group" (the strategy names clients and gives the oracle
its groups by them) and "num-examples" (train: the training split, evaluate: the test split).
"""
from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from tqdm.auto import tqdm

from ..client.trainer import ClientState
from .arrays import from_arrayrecord, to_arrayrecord
from .local_grid import InProcessGrid
from .peft_client import MIXING_STATE
from .runtime import partition_id
from .strategy import MIXING_RECORD

__all__ = ["pool_node", "pool_grid", "PoolGrid"]


def _logits(pool, content: RecordDict, context: Context, fixed_lam: float | None) -> dict[str, torch.Tensor]:
    """This round's mixing logits: held at `fixed_lam`, or the server's, the node's own, the initial ones."""
    initial = pool.initial.logits
    if fixed_lam is not None:
        return {g: torch.logit(torch.tensor(float(fixed_lam))) for g in initial}
    if MIXING_RECORD in content.config_records:
        return {g: torch.tensor(float(v), dtype=initial[g].dtype) for g, v in content.config_records[MIXING_RECORD].items()}
    saved = context.state.array_records.get(MIXING_STATE)
    return {g: t.reshape(()) for g, t in saved.to_torch_state_dict().items()} if saved is not None else initial


def pool_node(pool):
    """A ClientApp function (message, context) -> reply serving client `context.node_config["partition-id"]`
    of `pool` (a `federation.pool.ClientPool`)."""
    metric = pool.config.metric_name

    def serve(msg: Message, context: Context) -> Message:
        k = partition_id(context.node_config)
        client = pool.client(k)
        content = msg.content
        config = content.config_records["config"]
        fixed_lam = float(config["fixed-lam"]) if "fixed-lam" in config else None
        adapter = from_arrayrecord(content.array_records["arrays"]) or pool.initial.adapter
        external = from_arrayrecord(content.array_records["external"]) if "external" in content.array_records else None
        state = ClientState(adapter, _logits(pool, content, context, fixed_lam))
        ids = {"partition-id": k, "group": int(client.group)}
        if msg.metadata.message_type == "train":
            upload, info = pool.train(k, state, external, int(config["server-round"]) - 1, fixed_lam=fixed_lam)
            context.state[MIXING_STATE] = ArrayRecord(
                torch_state_dict={g: v.detach().float().reshape(1) for g, v in upload.logits.items()})
            reply = RecordDict({"arrays": to_arrayrecord(upload.adapter), "metrics": MetricRecord(
                {"train-loss": float(info["train_loss"]), "num-examples": int(client.num_train), **ids}),
                MIXING_RECORD: ConfigRecord({g: float(v) for g, v in upload.logits.items()})})
        else:
            result = pool.evaluate(k, state, external)
            reply = RecordDict({"metrics": MetricRecord({metric: float(result[metric]), "loss": float(result["loss"]),
                                                         "num-examples": int(len(client.test_idx)), **ids})})
        return Message(reply, reply_to=msg)

    return serve


class PoolGrid(InProcessGrid):
    """An `InProcessGrid` over a pool's clients, with a progress bar per exchange when `progress` is on."""

    def __init__(self, apps, node_configs, progress: bool = False):
        super().__init__(apps, node_configs=node_configs)
        self.progress = progress

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if not self.progress or not messages:
            return super().send_and_receive(messages, timeout=timeout)
        config = messages[0].content.config_records["config"]
        desc = f"round {config['server-round']} ({config['phase']}): {messages[0].metadata.message_type}"
        replies = []
        for message in tqdm(messages, desc=desc, leave=False, dynamic_ncols=True):
            replies += super().send_and_receive([message], timeout=timeout)
        return replies


def pool_grid(pool, progress: bool = False) -> PoolGrid:
    """A Grid whose node k (partition-id k) is client k of `pool`."""
    serve = pool_node(pool)
    n = len(pool.clients)
    return PoolGrid({k: serve for k in range(n)}, {k: {"partition-id": k, "num-partitions": n} for k in range(n)},
                    progress)
