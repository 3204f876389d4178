"""Two calls that turn any PEFT ClientApp (the FlowerTune template, say) into a FedTreeLoRA client.

    @app.train()
    def train(msg, context):
        model = get_peft_model(base_model(), lora_config)
        load_experts(model, msg, context)                 # instead of set_peft_model_state_dict(...)
        ...  # the app's own training loop: torch.optim.AdamW(model.parameters()), HF Trainer, SFTTrainer
        return make_reply(model, msg, context, num_examples=len(train_set), metrics={"train-loss": loss})

`load_experts` loads the cluster expert the server sent under "arrays" into PEFT's adapter, installs
the frozen external expert ("external", absent where the client's cluster is everyone) through an
`ExpertMixer` registered on the model (its lam logits are model parameters, so any optimiser over
`model.parameters()` trains them), and restores this client's lam from `context.state`.
`make_reply` answers with exactly one ArrayRecord (the trained adapter, PEFT's keys) and one
MetricRecord with "num-examples", so the reply also passes FedAvg's checks, and keeps lam in
`context.state`: lam never leaves the client.
"""
from __future__ import annotations

from numbers import Real

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from ..client.mixing import MIXER_ATTRIBUTE, ExpertMixer, attach_mixer
from ..federation.draws import derived_seed
from .arrays import DTYPE_RECORD, dtype_record, from_arrayrecord, to_arrayrecord

__all__ = ["load_experts", "make_reply", "training_seed", "MIXING_STATE"]

MIXING_STATE = "fedtreelora-mixing"   # context.state ArrayRecord: {layer group: lam logit}


def _content_keys(msg: Message) -> list[str]:
    return sorted(msg.content.array_records)


def load_experts(model, msg: Message, context: Context, *, adapter_name: str = "default", init_lam: float = 0.8,
                 arrayrecord_key: str = "arrays", external_key: str = "external") -> ExpertMixer:
    """Load the server's experts into a PEFT model; return its `ExpertMixer`.

    Parameters
    ----------
    model : peft.PeftModel
        The client's LoRA model (built anew for every message, or kept: both work).
    msg : flwr.app.Message
        The server's train or evaluate message: the cluster expert under `arrayrecord_key` (every
        adapter key of the model, as `get_peft_model_state_dict` names them) and, where the client
        has one, the frozen external expert under `external_key` (its LoRA factors).
    context : flwr.app.Context
        The node's context; `context.state[MIXING_STATE]` holds lam between rounds.
    adapter_name : str
        The PEFT adapter that is the cluster expert.
    init_lam : float
        lam in (0, 1) of a client that has none saved yet (its first round).
    arrayrecord_key, external_key : str
        The message's record names (the strategy's `arrayrecord_key` and `external_key`).

    Returns
    -------
    ExpertMixer
        Registered on the model as `model.expert_mixer`: its logits are in `model.parameters()`.
        Layers without an external expert stay plain LoRA (their lam has no effect).

    Raises
    ------
    KeyError
        The message lacks `arrayrecord_key`, or its adapter lacks or adds a key of the model (the
        message names the key).
    ValueError
        An external expert whose shapes differ from the model's adapter (names the module).

    Examples
    --------
    In a ClientApp's train function, where FlowerTune calls `set_peft_model_state_dict`::

        @app.train()
        def train(msg, context):
            model = get_peft_model(load_base_model(), lora_config)
            mixer = load_experts(model, msg, context)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)   # lam trains too
            ...
            return make_reply(model, msg, context, num_examples=len(dataset), metrics={"train-loss": loss})

    `mixer.lams()` gives lam per layer; `mixer.active_groups` the layers with an external expert.
    `tests/test_flower_strategy.py` runs this on a tiny PEFT model.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    content = msg.content
    if arrayrecord_key not in content.array_records:
        raise KeyError(f"the {msg.metadata.message_type!r} message has no ArrayRecord {arrayrecord_key!r} "
                       f"(it has {_content_keys(msg)})")
    state = from_arrayrecord(content.array_records[arrayrecord_key])
    expected = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if unexpected:
        raise KeyError(f"ArrayRecord {arrayrecord_key!r} has key {unexpected[0]!r} that the model's adapter "
                       f"{adapter_name!r} does not have ({len(unexpected)} such key(s))")
    if missing:
        raise KeyError(f"ArrayRecord {arrayrecord_key!r} lacks the model's adapter key {missing[0]!r} "
                       f"({len(missing)} missing)")
    set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    mixer = attach_mixer(model, adapter_name=adapter_name, init_lam=init_lam)
    if MIXING_STATE in context.state.array_records:
        saved = from_arrayrecord(context.state.array_records[MIXING_STATE])
        mixer.load_logits({g: v.reshape(()) for g, v in saved.items()})
    external = (from_arrayrecord(content.array_records[external_key])
                if external_key in content.array_records else None)
    mixer.set_external(external)
    return mixer


def make_reply(model, msg: Message, context: Context, num_examples: int, metrics: dict | None = None, *,
               arrays: bool | None = None, arrayrecord_key: str = "arrays", weighted_by_key: str = "num-examples") -> Message:
    """The reply to a train (or evaluate) message of `FedTreeLoRA`; keeps lam in `context.state`.

    Parameters
    ----------
    model : peft.PeftModel
        The trained model (its mixer, if `load_experts` attached one, is found on it).
    msg : flwr.app.Message
        The message being answered.
    context : flwr.app.Context
        The node's context; lam is saved to `context.state[MIXING_STATE]` after training.
    num_examples : int
        The training (or test) examples behind this reply, > 0: the aggregation weight.
    metrics : dict of str to int or float, optional
        More metrics for the MetricRecord ("train-loss", say).
    arrays : bool, optional
        Whether to send the adapter; default True for train messages, False for evaluate messages
        (an evaluation reply carries metrics only).
    arrayrecord_key, weighted_by_key : str
        The reply's ArrayRecord name and the weight's metric name (the strategy's settings).

    Returns
    -------
    flwr.app.Message
        Content: exactly one ArrayRecord (the adapter, PEFT's keys; bf16 tensors as float32), one
        MetricRecord "metrics" with `weighted_by_key`, and, when a tensor had to be cast, a
        ConfigRecord `DTYPE_RECORD` naming the original dtypes.

    Raises
    ------
    ValueError
        `num_examples` not a positive integer, a metric that is not a number or clashes with
        `weighted_by_key` (named).

    Examples
    --------
    ::

        reply = make_reply(model, msg, context, num_examples=32, metrics={"train-loss": 0.5})
        list(reply.content.array_records)                # ['arrays']
        dict(reply.content.metric_records["metrics"])    # {'train-loss': 0.5, 'num-examples': 32}

    For an evaluate message (no adapter in the reply)::

        return make_reply(model, msg, context, num_examples=len(test_set), metrics={"accuracy": acc})
    """
    from peft import get_peft_model_state_dict
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, Real)) or not num_examples > 0 \
            or int(num_examples) != num_examples:
        raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}")
    values = {}
    for key, value in (metrics or {}).items():
        if key == weighted_by_key:
            raise ValueError(f"metric {key!r} clashes with the weight {weighted_by_key!r}: pass it as num_examples")
        if isinstance(value, bool) or not isinstance(value, (int, float, Real)):
            raise ValueError(f"metric {key!r} must be an int or a float, got {type(value).__name__}")
        values[key] = value if isinstance(value, int) else float(value)
    values[weighted_by_key] = int(num_examples)
    content = RecordDict({"metrics": MetricRecord(values)})
    is_train = str(msg.metadata.message_type).split(".")[0] != "evaluate"
    mixer = model._modules.get(MIXER_ATTRIBUTE)
    if arrays if arrays is not None else is_train:
        state = get_peft_model_state_dict(model, adapter_name=mixer.adapter_name if mixer is not None else "default")
        content[arrayrecord_key] = to_arrayrecord(state)
        cast = dtype_record(state)
        if cast is not None:
            content[DTYPE_RECORD] = cast
    if mixer is not None and is_train:
        context.state[MIXING_STATE] = ArrayRecord(
            torch_state_dict={g: p.detach().float().cpu().reshape(1) for g, p in mixer.logits.items()})
    return Message(content, reply_to=msg)


def training_seed(msg: Message, context: Context, *, configrecord_key: str = "config") -> int:
    """The seed of this node's local run in this round: `derived_seed(run-seed, server-round - 1, partition)`.

    The same seed `fedtreelora simulate` gives client `partition` in that round (its ClientPool
    seeds every local run with `derived_seed(seed, round, client)`), so a ClientApp that seeds its
    batches and dropout with it trains from the draws of the in-process run.

    Parameters
    ----------
    msg : flwr.app.Message
        The strategy's message; its ConfigRecord (`configrecord_key`) carries "server-round" and,
        from `FedTreeLoRA`, "run-seed" (0 when absent).
    context : flwr.app.Context
        The node's context: `node_config["partition-id"]` is the client index (the node id where
        the node config has none).

    Examples
    --------
    In a ClientApp's train function, before the batches are drawn::

        seed = training_seed(msg, context)   # the in-process run's seed for this client and round
        torch.manual_seed(seed)
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
    """
    config = msg.content.config_records.get(configrecord_key)
    if config is None or "server-round" not in config:
        raise ValueError(f"the message has no ConfigRecord {configrecord_key!r} with 'server-round' "
                         "(is it a FedTreeLoRA strategy's message? pass configrecord_key=...)")
    partition = context.node_config.get("partition-id", context.node_id)
    return derived_seed(int(config.get("run-seed", 0)), int(config["server-round"]) - 1, int(partition))
