"""The ServerApp side: warm-up, the method's server rule, personalised messages, failures survived.

`PersonalisedStrategy.start(grid)` runs exactly the rounds of `federation.Federation` (same client
selection, seeds, method objects from `methods.py`, `aggregate()` for FedTreeLoRA, checkpoints and
output files), with the clients on Flower SuperNodes instead of in this process:

1. query every node for its partition id (= client index), sample count and planted group;
2. warm-up: every client trains its own LoRA (no sharing), then is evaluated;
3. `method.setup()` on the warm-up uploads (FedTreeLoRA: `build_tree`, once), then every round the
   selected clients each receive their *own* cluster expert, external expert and mixing logits,
   train and upload; the server aggregates (same tree and cuts) and every client is evaluated on
   the pair it gets.

A client that fails (its ClientApp raised) or does not reply within `round_timeout` does not stop
the run: the failure is logged, the round aggregates what arrived, and the server keeps that
client's previous upload. That stale upload stands in for it in the aggregation exactly like the
upload of a client not selected in a partial-participation round of the in-process federation
(the tree is over all N clients), and it gets its experts again next round.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from ..client.trainer import ClientState
from ..federation.checkpoints import load_checkpoint, save_checkpoint
from ..federation.config import ExperimentConfig
from ..federation.methods import make_method
from ..federation.schedule import WARMUP, evaluation_record, method_result, select_clients
from .messages import read_client_reply, server_content

logger = logging.getLogger("flwr").getChild("fedtreelora")


class PersonalisedStrategy:
    """Runs one method of `methods.py` (default FedTreeLoRA) over a Flower Grid; see the module docstring."""

    def __init__(self, config: ExperimentConfig, method: str = "fedtreelora", run_dir: str | Path = "runs/flower",
                 *, round_timeout: float | None = 600.0, connect_timeout: float = 300.0, resume: bool = False):
        make_method(method)           # fail on a typo before any node is contacted
        config.validate()
        self.config = config
        self.method_name = method
        self.run_dir = Path(run_dir)
        self.round_timeout = round_timeout
        self.connect_timeout = connect_timeout
        self.resume = resume
        self.failures: list[dict] = []

    # -- messaging ------------------------------------------------------------------------
    def _connect(self, grid: Grid) -> None:
        n = self.config.num_clients
        deadline = time.monotonic() + self.connect_timeout
        node_ids = list(grid.get_node_ids())
        while len(node_ids) < n and time.monotonic() < deadline:
            time.sleep(1.0)
            node_ids = list(grid.get_node_ids())
        if len(node_ids) < n:
            raise RuntimeError(f"only {len(node_ids)} SuperNode(s) connected within {self.connect_timeout:.0f} s; "
                               f"the experiment has num_clients={n}")
        content = server_content(self.config, 0, "query")
        messages = [Message(content=content, dst_node_id=node, message_type="query") for node in node_ids]
        replies = list(grid.send_and_receive(messages, timeout=self.round_timeout))
        self.node_of: dict[int, int] = {}
        info: dict[int, dict] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                logger.warning("node %s failed the query: %s", node, reply.error.reason)
                continue
            metrics, _ = read_client_reply(reply.content)
            k = int(metrics["partition-id"])
            if k in self.node_of:
                raise RuntimeError(f"nodes {self.node_of[k]} and {node} both claim partition-id {k}")
            self.node_of[k], info[k] = node, metrics
        missing = sorted(set(range(n)) - set(self.node_of))
        if missing:
            raise RuntimeError(f"no SuperNode answered for client(s) {missing} (partition-id); every client "
                               f"0..{n - 1} must be served by one node")
        self.weights = np.array([info[k]["num-train"] for k in range(n)], dtype=np.float64)
        self.groups = np.array([int(info[k]["group"]) for k in range(n)])
        logger.info("%d clients connected; sample counts %s", n, self.weights.astype(int).tolist())

    def _exchange(self, grid: Grid, kind: str, round_: int, phase: str, contents: dict) -> dict[int, tuple]:
        """Send each client k its content; return {k: (metrics, state)} of the replies that arrived and log the rest."""
        messages = [Message(content=content, dst_node_id=self.node_of[k], message_type=kind, group_id=f"{phase}-{round_}")
                    for k, content in contents.items()]
        client_of = {node: k for k, node in self.node_of.items()}
        arrived, reasons = {}, {}
        for reply in grid.send_and_receive(messages, timeout=self.round_timeout):
            k = client_of.get(reply.metadata.src_node_id)
            if k is None:
                continue
            if reply.has_error():
                reasons[k] = reply.error.reason
            else:
                arrived[k] = read_client_reply(reply.content)
        for k in sorted(set(contents) - set(arrived)):
            reason = reasons.get(k, f"no reply within {self.round_timeout} s")
            logger.warning("client %d (node %d) failed to %s in round %d (%s): %s; the round goes on without it "
                           "and the server keeps its previous upload", k, self.node_of[k], kind, round_ + 1, phase, reason)
            self.failures.append({"round": round_ + 1, "phase": phase, "kind": kind, "client": k, "reason": str(reason)})
        return arrived

    def _train(self, grid, round_, phase, states, experts, selected) -> list[int]:
        contents = {}
        for k in selected:
            start = states[k] if experts is None else ClientState(experts[k][0], states[k].logits)
            contents[k] = server_content(self.config, round_, phase, start, None if experts is None else experts[k][1])
        arrived = self._exchange(grid, "train", round_, phase, contents)
        for k, (_, state) in arrived.items():
            states[k] = state
        return sorted(set(selected) - set(arrived))

    def _evaluate(self, grid, round_, phase, states, experts) -> tuple[dict, list[int]]:
        contents = {}
        for k, state in enumerate(states):
            if state is None:
                continue            # never uploaded (failed in the first warm-up round): nothing to evaluate
            cluster, external = (state.adapter, None) if experts is None else experts[k]
            contents[k] = server_content(self.config, round_, phase, ClientState(cluster, state.logits), external)
        arrived = self._exchange(grid, "evaluate", round_, phase, contents)
        failed = sorted(set(range(len(states))) - set(arrived))
        return evaluation_record({k: m for k, (m, _) in arrived.items()}, len(states)), failed

    def _checkpoint(self, folder: Path, round_: int, states, history, wall) -> None:
        if any(s is None for s in states):
            logger.warning("round %d: no checkpoint (client(s) %s have not uploaded yet)", round_,
                           [k for k, s in enumerate(states) if s is None])
            return
        save_checkpoint(folder, round_, states, {"history": history, "wall_s": wall, "failures": self.failures})

    def _resume(self, folder: Path, states, history, wall):
        loaded = load_checkpoint(folder) if self.resume else None
        if not loaded:
            return states, history, 0, wall
        info, states = loaded
        self.failures = info.get("failures", self.failures)
        logger.info("resuming %s from round %d", folder.name, info["round"])
        return states, info["history"], info["round"], info["wall_s"]

    # -- the run ----------------------------------------------------------------------------
    def start(self, grid: Grid) -> dict:
        """Run warm-up and the method; write the run folder (as `fedtreelora simulate` does) and return its summary."""
        from ..report import write_outputs
        cfg, n = self.config, self.config.num_clients
        self._connect(grid)
        checkpoints = self.run_dir / "checkpoints"

        # warm-up: local training of every client, no sharing
        states, warm_history, start, warm_wall = self._resume(checkpoints / WARMUP, [None] * n, [], 0.0)
        for r in range(start, cfg.warmup_rounds):
            t0 = time.perf_counter()
            failed_train = self._train(grid, r, WARMUP, states, None, range(n))
            metrics, failed_eval = self._evaluate(grid, r, WARMUP, states, None)
            warm_wall += time.perf_counter() - t0
            warm_history.append({"round": r + 1, "phase": WARMUP, **metrics,
                                 "failed": {"train": failed_train, "evaluate": failed_eval}})
            logger.info("warm-up round %d/%d: mean accuracy %.4f", r + 1, cfg.warmup_rounds, metrics["mean_accuracy"])
            self._checkpoint(checkpoints / WARMUP, r + 1, states, warm_history, warm_wall)
        never = [k for k, s in enumerate(states) if s is None]
        if never:
            raise RuntimeError(f"client(s) {never} uploaded nothing during warm-up; the tree needs every client's "
                               "LoRA (raise warmup_rounds or fix those SuperNodes)")

        # the method: setup on the warm-up uploads (the tree), then personalised rounds
        method = make_method(self.method_name)
        method.setup([s.adapter for s in states], self.weights, cfg, self.groups)
        name = self.method_name
        states, history, start, wall = self._resume(checkpoints / name, list(states), [], 0.0)
        t0 = time.perf_counter()
        experts = method.aggregate([s.adapter for s in states], self.weights)
        wall += time.perf_counter() - t0
        for r in range(start, cfg.rounds):
            t0 = time.perf_counter()
            global_round = cfg.warmup_rounds + r
            selected = select_clients(cfg, global_round, n)
            failed_train = self._train(grid, global_round, name, states, experts, selected)
            experts = method.aggregate([s.adapter for s in states], self.weights)
            metrics, failed_eval = self._evaluate(grid, global_round, name, states, experts)
            wall += time.perf_counter() - t0
            history.append({"round": global_round + 1, "phase": name, "selected": selected, **metrics,
                            "failed": {"train": failed_train, "evaluate": failed_eval}})
            logger.info("%s round %d/%d: mean accuracy %.4f", name, r + 1, cfg.rounds, metrics["mean_accuracy"])
            self._checkpoint(checkpoints / name, r + 1, states, history, wall)

        result = method_result(method, cfg, warm_history, history, states, experts, wall)
        summary = {"config": cfg.to_dict(), "engine": "flower", "groups": self.groups.tolist(),
                   "weights": self.weights.tolist(), "warmup_wall_s": warm_wall, "failures": self.failures,
                   "methods": {name: result}}
        write_outputs(self.run_dir, summary, tree=getattr(method, "tree", None))
        self.states, self.experts, self.method = states, experts, method
        return summary
