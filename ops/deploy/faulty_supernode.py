"""A deliberately faulty SuperNode, for fault drills only (``bench/faults.py``, the deployment tests).

Never run it for a real site. It is ``flower-supernode`` (same arguments) that registers its replies
at the SuperLink and then never uploads their objects (the weights), for the message types named by
``--withhold-replies`` (default ``train``)::

    python -m ops.deploy.faulty_supernode --withhold-replies=train --insecure --superlink H:P ...

Why: the ServerApp must keep each phase's deadline when a node does exactly this (a crash or a
stalled upload between Flower's two steps, or a site that wants to hold the federation up); see
:mod:`server_app.grid`. The fault is injected in Flower 1.41's SuperNode loop
(``flwr/supernode/start_client_internal.py``: ``_push_messages`` first sends the reply with its object
tree, then pushes each object with ``push_object``): the reply is sent, its objects are not.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("flwr.drill")  # Flower's logger prints it in the SuperNode's own log

MODULE = "ops.deploy.faulty_supernode"
WITHHOLD_FLAG = "--withhold-replies"
DEFAULT_WITHHELD = ("train",)


def command(message_types: Sequence[str] = DEFAULT_WITHHELD) -> list[str]:
    """The program part of a faulty node's command line (the SuperNode's own arguments follow)."""
    return [sys.executable, "-m", MODULE, f"{WITHHOLD_FLAG}={','.join(message_types)}"]


def split_args(argv: Sequence[str]) -> tuple[set[str], list[str]]:
    """``--withhold-replies=a,b`` (anywhere in ``argv``) and the remaining arguments, for flower-supernode."""
    withheld, rest = set(DEFAULT_WITHHELD), []
    for arg in argv:
        if arg.startswith(WITHHOLD_FLAG + "="):
            withheld = {t.strip() for t in arg.split("=", 1)[1].split(",") if t.strip()}
        else:
            rest.append(arg)
    return withheld, rest


def withholding(push_messages: Callable[..., Any], withheld: set[str]) -> Callable[..., Any]:
    """``_push_messages`` whose replies of the ``withheld`` types are sent without their objects."""

    @functools.wraps(push_messages)
    def push(*, state: Any, object_store: Any, send: Callable[..., Any], push_object: Callable[..., Any]) -> Any:
        sessions: set[str] = set()

        def send_only(message: Any, object_tree: Any, runtime: float) -> Any:
            to_push, session_id = send(message, object_tree, runtime)
            if message.metadata.message_type in withheld:
                log.warning("drill: reply %s (%s) registered; its %d objects will never be uploaded",
                            message.metadata.message_id, message.metadata.message_type, len(to_push))
                sessions.add(session_id)
            return to_push, session_id

        def push_unless_withheld(run_id: int, session_id: str, object_id: str, contents: bytes) -> None:
            if session_id not in sessions:
                push_object(run_id, session_id, object_id, contents)

        return push_messages(state=state, object_store=object_store, send=send_only, push_object=push_unless_withheld)

    return push


def main() -> None:
    """Run flower-supernode with the fault injected (arguments as for flower-supernode, plus the flag)."""
    from flwr.supernode import start_client_internal as loop
    from flwr.supernode.cli import flower_supernode

    withheld, rest = split_args(sys.argv[1:])
    if not hasattr(loop, "_push_messages"):
        raise SystemExit("faulty_supernode: this Flower version has no _push_messages to inject the fault into")
    loop._push_messages = withholding(loop._push_messages, withheld)  # noqa: SLF001 - the drill's fault
    log.warning("drill SuperNode: replies of type %s are registered but their objects never uploaded",
                sorted(withheld))
    sys.argv = [sys.argv[0], *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
