"""`InProcessGrid`: a Flower Grid whose nodes are ClientApps called in this process.

No SuperLink, no Ray, no network: `send_and_receive` hands every message to its node's ClientApp
(or any function (message, context) -> reply Message) with that node's persistent `Context`, one
after the other, and returns the replies. A ClientApp that raises gives an error reply, as a
SuperNode does. Any Flower Strategy runs on it unchanged (`strategy.start(grid=InProcessGrid(...))`),
which makes it the quick way to test a strategy or to run a small federation in one process
(`fedtreelora simulate` runs on it). Outside a ServerApp process, run the strategy inside
`in_process_server()`, which gives this process the server identity that Flower's messages need.
"""
from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
try:   # flwr releases whose Messages carry their sender's identity need the server's set in-process
    from flwr.supercore.task_identity import TaskIdentity
except ImportError:   # older flwr (>= 1.20): no such identity, nothing to set
    TaskIdentity = None

__all__ = ["InProcessGrid", "in_process_server"]

ClientFn = Callable[[Message, Context], Message]
CLIENT_APP_EXCEPTION = 1   # the error code a SuperNode uses for a ClientApp that raised


@contextmanager
def in_process_server(quiet: bool = True) -> Iterator[None]:
    """Run a Strategy in this process: the server identity a ServerApp process has (where none is
    set yet) and, with `quiet`, flwr's INFO lines off (its warnings stay). Restores both after.

    Examples
    --------
    >>> from fedtreelora.flower.local_grid import in_process_server
    >>> with in_process_server():
    ...     pass
    """
    names = ("_run_id", "_task_id", "_node_id") if TaskIdentity is not None else ()
    saved = {name: getattr(TaskIdentity, name) for name in names}
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    for name, value in zip(names, (1, 1, 0)):   # node 0: the SuperLink's node id
        if saved[name] is None:
            setattr(TaskIdentity, name, value)
    if quiet:
        flwr_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)
        flwr_logger.setLevel(level)


class InProcessGrid(Grid):
    """A Grid over in-process nodes.

    An app that returns None sends no reply (the server sees a node that timed out).

    Parameters
    ----------
    apps : mapping of int to ClientApp or callable
        Node id -> the ClientApp (or function (message, context) -> reply) that serves it.
    node_configs : mapping of int to dict, optional
        Node id -> its node config (`context.node_config`), e.g. {"partition-id": 0, "num-partitions": 4}.
    run_config : dict, optional
        Every node's `context.run_config`.
    run_id : int
        The run id of the messages' replies and the contexts.

    Attributes
    ----------
    contexts : dict of int to flwr.app.Context
        Each node's context; `context.state` persists across messages, as on a SuperNode.

    Examples
    --------
    ::

        grid = InProcessGrid({node: client_app for node in (1, 2, 3, 4)},
                             node_configs={node: {"partition-id": node - 1} for node in (1, 2, 3, 4)})
        result = FedTreeLoRA(warmup_rounds=1).start(grid=grid, initial_arrays=arrays, num_rounds=3)
    """

    def __init__(self, apps: Mapping[int, ClientFn], node_configs: Mapping[int, dict] | None = None,
                 run_config: dict | None = None, run_id: int = 1):
        self.apps: dict[int, ClientFn] = {}
        self.contexts: dict[int, Context] = {}
        self.run_id = int(run_id)
        self._run_config = dict(run_config or {})
        self._replies: dict[str, Message] = {}
        self._run = None
        for node, app in apps.items():
            self.add_node(node, app, (node_configs or {}).get(node))

    def add_node(self, node_id: int, app: ClientFn, node_config: dict | None = None) -> None:
        """Connect a node (it is in `get_node_ids()` from now on)."""
        node_id = int(node_id)
        if node_id in self.apps:
            raise ValueError(f"node {node_id} is already connected")
        if not callable(app):
            raise TypeError(f"node {node_id}: app must be a ClientApp or a callable, got {type(app).__name__}")
        self.apps[node_id] = app
        self.contexts[node_id] = Context(run_id=self.run_id, node_id=node_id, node_config=dict(node_config or {}),
                                         state=RecordDict(), run_config=dict(self._run_config))

    def remove_node(self, node_id: int) -> None:
        """Disconnect a node (its context is kept, as a SuperNode keeps its state)."""
        self.apps.pop(int(node_id))

    # -- the Grid interface ----------------------------------------------------------------------
    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.apps)

    def deliver(self, message: Message) -> Message | None:
        """One message to its node; the reply (an error reply when the app raised), None for no reply."""
        node = int(message.metadata.dst_node_id)
        if node not in self.apps:
            return None
        try:
            reply = self.apps[node](message, self.contexts[node])
        except Exception as exc:   # noqa: BLE001 - a SuperNode turns any ClientApp exception into an error reply
            reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
            return Message(Error(code=CLIENT_APP_EXCEPTION, reason=reason), reply_to=message)
        if reply is None:
            return None            # the app answered nothing: to the server, a node that timed out
        if not isinstance(reply, Message):
            return Message(Error(code=CLIENT_APP_EXCEPTION, reason=f"node {node}'s app returned "
                                 f"{type(reply).__name__}, not a Message"), reply_to=message)
        return reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            reply = self.deliver(message)
            if reply is not None:
                self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Deliver every message and return the replies (a node that gives none simply has none)."""
        return list(self.pull_messages(self.push_messages(messages)))
