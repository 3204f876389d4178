"""What travels between the ServerApp and a ClientApp: one RecordDict layout, both directions.

Server -> client ("query", "train", "evaluate"): ConfigRecord "config" with the experiment config as
JSON (clients need no config of their own beyond their partition id), the round and the phase;
ArrayRecords "adapter" (the cluster expert + head to start from; absent in the first warm-up round:
the client starts from its own initial LoRA), "mixing" (its mixing logits) and "external" (its
frozen external expert; absent when it has none).
Client -> server: the same "adapter"/"mixing" records (train) and a MetricRecord "metrics".
"""
from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ..client.trainer import ClientState
from ..federation.config import ExperimentConfig


def to_arrays(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def from_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def server_content(config: ExperimentConfig, round_: int, phase: str, state: ClientState | None = None,
                   external: dict[str, torch.Tensor] | None = None) -> RecordDict:
    content = RecordDict({"config": ConfigRecord({"experiment": json.dumps(config.to_dict()),
                                                  "round": int(round_), "phase": phase})})
    _put_state(content, state)
    if external is not None:
        content["external"] = to_arrays(external)
    return content


def _put_state(content: RecordDict, state: ClientState | None) -> None:
    if state is not None:
        content["adapter"] = to_arrays(state.adapter)
        content["mixing"] = to_arrays({g: v.reshape(1) for g, v in state.logits.items()})


def _get_state(content: RecordDict) -> ClientState | None:
    if "adapter" not in content.array_records:
        return None
    logits = {g: v.reshape(()) for g, v in from_arrays(content.array_records["mixing"]).items()}
    return ClientState(from_arrays(content.array_records["adapter"]), logits)


def read_server_content(content: RecordDict) -> tuple[ExperimentConfig, int, str, ClientState | None, dict | None]:
    """(config, round, phase, start state or None, external expert or None)."""
    if "config" not in content.config_records:
        raise KeyError('message from the server lacks its "config" record')
    cfg = content.config_records["config"]
    config = ExperimentConfig.from_dict(json.loads(str(cfg["experiment"])))
    state = _get_state(content)
    external = from_arrays(content.array_records["external"]) if "external" in content.array_records else None
    return config, int(cfg["round"]), str(cfg["phase"]), state, external


def client_reply_content(metrics: dict, state: ClientState | None = None) -> RecordDict:
    content = RecordDict({"metrics": MetricRecord({k: v for k, v in metrics.items()})})
    _put_state(content, state)
    return content


def read_client_reply(content: RecordDict) -> tuple[dict, ClientState | None]:
    metrics = dict(content.metric_records["metrics"]) if "metrics" in content.metric_records else {}
    return metrics, _get_state(content)
