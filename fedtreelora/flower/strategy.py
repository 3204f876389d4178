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

from ..federation.config import ExperimentConfig
from ..federation.methods import make_method
from ..federation.schedule import Driver, Schedule
from .messages import read_client_reply, server_content

logger = logging.getLogger("flwr").getChild("fedtreelora")


class PersonalisedStrategy(Driver):
    """Runs one method of `methods.py` (default FedTreeLoRA) over a Flower Grid; see the module docstring.

    It is the `federation.schedule.Schedule`'s driver: the schedule (shared with the in-process run)
    decides the rounds, the selection, the aggregation and the checkpoints; this class only carries
    messages to the SuperNodes and back."""

    records_failures = True

    def __init__(self, config: ExperimentConfig, method: str = "fedtreelora", run_dir: str | Path = "runs/flower",
                 *, round_timeout: float | None = 600.0, connect_timeout: float = 300.0, resume: bool = False):
        if make_method(method).fixed_lam is not None:   # also fails on a typo before any node is contacted
            raise ValueError(f"method {method!r} holds lam fixed, which the Flower apps do not carry yet; run it "
                             "with `fedtreelora simulate`")
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

    # -- the schedule's driver --------------------------------------------------------------
    def initial_states(self, n):
        return [None] * n            # round 1: each ClientApp starts from its own initial LoRA

    def train(self, round_, phase, jobs, desc, fixed_lam=None):   # fixed-lam methods are refused in __init__
        contents = {k: server_content(self.config, round_, phase, start, external) for k, (start, external) in jobs.items()}
        return {k: state for k, (_, state) in self._exchange(self._grid, "train", round_, phase, contents).items()}

    def evaluate(self, round_, phase, jobs):
        contents = {k: server_content(self.config, round_, phase, state, external) for k, (state, external) in jobs.items()}
        return {k: metrics for k, (metrics, _) in self._exchange(self._grid, "evaluate", round_, phase, contents).items()}

    def checkpoint_info(self):
        return {"failures": self.failures}

    def restore(self, info):
        self.failures = info.get("failures", self.failures)
        logger.info("resuming from round %d", info["round"])

    def round_done(self, phase, round_in_phase, total, record):
        metric = self.config.metric_name
        logger.info("%s round %d/%d: mean %s %.4f", phase, round_in_phase, total, metric, record[f"mean_{metric}"])

    # -- the run ----------------------------------------------------------------------------
    def start(self, grid: Grid) -> dict:
        """Run warm-up and the method; write the run folder (as `fedtreelora simulate` does) and return its summary."""
        from ..report import write_outputs
        cfg = self.config
        self._connect(grid)
        self._grid = grid
        schedule = Schedule(cfg, self.run_dir, self, self.weights, self.groups, resume=self.resume)
        states, warm_history = schedule.warmup()
        result = schedule.run_method(self.method_name, states, warm_history)
        summary = {"config": cfg.to_dict(), "engine": "flower", "groups": self.groups.tolist(),
                   "weights": self.weights.tolist(), "warmup_wall_s": schedule.warmup_wall_s, "failures": self.failures,
                   "methods": {self.method_name: result}}
        method = schedule.methods[self.method_name]
        write_outputs(self.run_dir, summary, tree=getattr(method, "tree", None))
        self.states, self.experts, self.method = schedule.states, schedule.experts, method
        return summary
