"""One message from the server, parsed once: round, run name and identity, whether a global model exists, codec.

Why: every step of a node's handler needs these few facts; reading them from the records in each step
parsed ``server-round`` several times per message and left each step to re-check the run name. Here the
run name is refused, before any folder is built from it, unless it is one plain folder name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, RecordDict

from client_app.held import by_reference
from common.names import folder_name_problem
from common.records import ARRAYS, CONFIG, GLOBAL_MODEL, RUN_IDENTITY, RUN_NAME, RecordError
from common.wire import WIRE, codec_of, decode

__all__ = ["NodeMessage", "checked_run_name"]


def checked_run_name(value: object) -> str:
    """The run name the server sent (``run-name`` in the round config), refused unless it is one plain
    folder name (:func:`common.names.folder_name_problem`, the rule the server's own config obeys).

    Why: the node builds its state and image folders from it; a name such as ``..`` or ``/etc`` from a
    buggy or hostile server would make the node write outside the directories its operator gave it."""
    name = str(value)
    problem = folder_name_problem(name) if name else None
    if problem:
        raise RecordError(f"{RUN_NAME} {name[:80]!r} in the server's round config is refused: {problem}")
    return name


@dataclass(frozen=True)
class NodeMessage:
    """What a train or evaluate message says, besides its records (``content``)."""

    content: RecordDict
    server_round: int
    run_name: str  # checked: one plain folder name, or "" when the server sent none
    run_identity: str  # the run's identity (``run-identity``; empty from a server that sends none)
    global_model: bool  # False: standalone nodes, each continues its own adapters
    codec: str  # the server's weight codec (common.wire); read from the completed content (see completed)
    wire: bool  # the server encodes weights (and accepts a difference back)
    by_reference: bool  # the server named some records by hash (client_app.held)

    @classmethod
    def parse(cls, msg: Message) -> "NodeMessage":
        config = msg.content[CONFIG] if CONFIG in msg.content else ConfigRecord()
        return cls(
            content=msg.content,
            server_round=int(config.get("server-round", 0)),  # type: ignore[arg-type]
            run_name=checked_run_name(config.get(RUN_NAME, "")),
            run_identity=str(config.get(RUN_IDENTITY, "")),
            global_model=bool(config.get(GLOBAL_MODEL, True)),
            codec=codec_of(msg.content),
            wire=WIRE in msg.content,
            by_reference=by_reference(msg.content),
        )

    def completed(self, content: RecordDict) -> "NodeMessage":
        """The message once the records the server sent by reference are filled in from what the node holds
        (:func:`client_app.held.resolve`): the codec travels with the weights (their ``wire`` record), so it
        is read from the completed content, never from the message as it arrived."""
        return dataclasses.replace(self, content=content, codec=codec_of(content), wire=WIRE in content)

    def global_weights(self) -> dict:
        """The global adapters' weights as the server sent them (decoded): the base of a train reply sent as
        a difference."""
        return decode(self.content[ARRAYS])  # type: ignore[arg-type]
