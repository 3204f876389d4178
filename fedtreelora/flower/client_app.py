"""The ClientApp: one FedTreeLoRA client (`client.LocalTrainer` via `runtime.ClientRuntime`).

Handles three message types: "query" (partition id, sample count, group), "train" (load the cluster
expert, mixing logits and external expert it was sent, train locally, upload) and "evaluate" (its
personalised model on its test split). It keeps nothing between messages: the server sends each
client its own state every round, so a restarted SuperNode loses nothing.
"""
from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from .messages import client_reply_content, read_server_content
from .runtime import ClientRuntime, DatasetSource, num_partitions, partition_id


def _runtime(message: Message, context: Context, dataset_source: DatasetSource):
    config, round_, phase, state, external = read_server_content(message.content)
    k = partition_id(context.node_config)
    n = num_partitions(context.node_config)
    if n is not None and n != config.num_clients:
        raise ValueError(f"this SuperNode has num-partitions={n} but the experiment has num_clients={config.num_clients}")
    source = dataset_source if dataset_source is not None else context.run_config.get("dataset-fn") or None
    return ClientRuntime.get(config, source), k, round_, state, external


def client_app(dataset_fn: DatasetSource = None, mods: list | None = None) -> ClientApp:
    """A ClientApp; `dataset_fn` ("module:function" or a function of the config returning a
    `TextDataset`) replaces the config's dataset, otherwise the run config's "dataset-fn" or the
    config's own `dataset` is used. `mods` are Flower client mods (middleware)."""
    app = ClientApp(mods=list(mods or []))

    @app.query()
    def query(message: Message, context: Context) -> Message:
        runtime, k, _, _, _ = _runtime(message, context, dataset_fn)
        return Message(client_reply_content({"partition-id": k, **runtime.describe(k)}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        runtime, k, round_, state, external = _runtime(message, context, dataset_fn)
        new_state, info = runtime.train(k, state, external, round_)
        metrics = {"partition-id": k, "train-loss": info["train_loss"], "steps": info["steps"],
                   "num-examples": info["num_samples"]}
        return Message(client_reply_content(metrics, new_state), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        runtime, k, _, state, external = _runtime(message, context, dataset_fn)
        if state is None:
            raise ValueError("an evaluate message must carry the client's adapter")
        result = runtime.evaluate(k, state, external)
        metrics = {"partition-id": k, "accuracy": result["accuracy"], "loss": result["loss"],
                   "num-examples": result["num_samples"]}
        return Message(client_reply_content(metrics), reply_to=message)

    return app


# `flwr run` entry point (pyproject: clientapp = "fedtreelora.flower.client_app:app")
app = client_app()
