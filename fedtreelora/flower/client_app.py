"""The experiment's ClientApp: client `partition-id` of the experiment, serving `pool_nodes.pool_node`.

Every message of the experiment's Strategy carries the experiment config (ConfigRecord "config",
entry "experiment"), from which the node builds the same `ClientPool` as `fedtreelora simulate`
(`runtime.client_pool`, cached per process), then answers exactly as the in-process node does.
The node keeps nothing the server needs: it reports its upload and mixing logits, and the server
sends them back, so a restarted SuperNode loses nothing.
"""
from __future__ import annotations

import json

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ..federation.config import ExperimentConfig
from .experiment import EXPERIMENT_KEY
from .pool_nodes import pool_node
from .runtime import DatasetSource, client_pool, num_partitions


def client_app(dataset_fn: DatasetSource = None, mods: list | None = None) -> ClientApp:
    """A ClientApp; `dataset_fn` ("module:function" or a function of the config returning a
    `TextDataset`) replaces the config's dataset, otherwise the run config's "dataset-fn" or the
    config's own `dataset` is used. `mods` are Flower client mods (middleware)."""
    app = ClientApp(mods=list(mods or []))

    def serve(message: Message, context: Context) -> Message:
        config = message.content.config_records.get("config")
        if config is None or EXPERIMENT_KEY not in config:
            raise KeyError(f'the message lacks the experiment config ("config" record, entry {EXPERIMENT_KEY!r})')
        experiment = ExperimentConfig.from_dict(json.loads(str(config[EXPERIMENT_KEY])))
        n = num_partitions(context.node_config)
        if n is not None and n != experiment.num_clients:
            raise ValueError(f"this SuperNode has num-partitions={n} but the experiment has "
                             f"num_clients={experiment.num_clients}")
        source = dataset_fn if dataset_fn is not None else context.run_config.get("dataset-fn") or None
        return pool_node(client_pool(experiment, source))(message, context)

    app.train()(serve)
    app.evaluate()(serve)
    return app


# `flwr run` entry point (pyproject: clientapp = "fedtreelora.flower.client_app:app")
app = client_app()
