"""Which of the server's records each node holds, and messages that send those by reference.

Why: the class targets are the same all run, and the weights of a round's evaluate message are the
next round's train weights; sending them again to a node that kept them (:mod:`client_app.held`)
is pure traffic. Every reply names what its node holds (``held``); the next message to that node
carries, for each record it holds under the same hash, only the hash (``by-reference``). Hashes are
Flower's own content ids of the records (``object_id``).

When a reference fails, and why the round does not lose the node:

* What a node holds is learnt only from its replies to *this* ServerApp (this object lives as long as
  the process): a resumed run starts knowing nothing and sends everything in full until nodes reply.
  Nodes report only records of this run (their state folder is tagged with the run's identity,
  :mod:`client_app.node_state`), so another run of the same name can never vouch for a hash.
* A node may still lose what it reported (a SuperNode restarted without its disk). It then replies
  ``held-missing`` instead of working, and :meth:`NodeHoldings.resend` makes the same message in full,
  which :class:`ResendInFull` (the ServerApp's Grid) sends within the phase's deadline: the node
  completes this round, not the next one. Once per node and phase: a node that asks again gets
  nothing more, and its reply reaches the strategy, which rejects it like any reply without metrics.
* A failed or ``held-missing`` reply forgets what that node held, so its next message is sent in full.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ConfigRecord, Message, Metadata, RecordDict

from common.records import HELD_MISSING
from common.wire import BY_REFERENCE, HASHES, HELD, HELD_RECORDS

log = logging.getLogger(__name__)


def asks_in_full(reply: Message) -> bool:
    """Whether ``reply`` says its node lacks records the message sent by reference (``held-missing``)."""
    return not reply.has_error() and HELD_MISSING in reply.content


def _missing(reply: Message) -> list[str]:
    """The record names a ``held-missing`` reply gives (for the log; a node may send anything)."""
    record = reply.content[HELD_MISSING]
    names = record.get("records", []) if isinstance(record, ConfigRecord) else []
    return [str(n)[:40] for n in (names if isinstance(names, list) else [names])][:len(HELD_RECORDS)]


class NodeHoldings:
    def __init__(self) -> None:
        self.by_node: dict[int, dict[str, str]] = {}
        self._full: list[tuple[Message, RecordDict]] = []  # the latest phase: message sent, its content in full
        self._resent: set[int] = set()  # nodes sent a message again in full in the latest phase

    def update(self, replies: list[Message]) -> None:
        """What each replying node holds now (an error or ``held-missing`` reply: nothing known)."""
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error() or asks_in_full(msg):
                self.by_node.pop(node, None)
            elif HELD in msg.content:
                self.by_node[node] = {str(k): str(v) for k, v in msg.content[HELD].items()}  # type: ignore[union-attr]

    def personalise(self, messages: list[Message]) -> list[Message]:
        """Each message with its own content: the held records' hashes declared, and the records its node
        holds under the same hash left out (named in ``by-reference``). Records are shared, not copied.
        The full content of every message is kept for :meth:`resend` until the next call."""
        hashes: dict[int, dict[str, str]] = {}  # per shared content: name -> hash
        self._full, self._resent = [], set()
        for msg in messages:
            shared = msg.content
            if id(shared) not in hashes:
                hashes[id(shared)] = {name: shared[keys[0]].object_id  # type: ignore[union-attr]
                                      for name, keys in HELD_RECORDS.items() if keys[0] in shared}
            declared = hashes[id(shared)]
            holds = self.by_node.get(int(msg.metadata.dst_node_id), {})
            full = RecordDict(dict(shared.items()))
            full[HASHES] = ConfigRecord(dict(declared))
            content = RecordDict(dict(full.items()))
            refs = {name: h for name, h in declared.items() if holds.get(name) == h}
            for name in refs:
                for key in HELD_RECORDS[name]:
                    if key in content:
                        del content[key]
            if refs:
                content[BY_REFERENCE] = ConfigRecord(refs)
                self._full.append((msg, full))
            msg.content = content
        return messages

    def resend(self, reply: Message) -> Message | None:
        """The message ``reply`` answers, again with every record in full, for a node that replied
        ``held-missing``; ``None`` when there is nothing to resend (the latest phase sent this node no
        record by reference, or already sent it one message again). A phase sends one message per node,
        so the node that replied (set by the SuperLink, not by the node) names the message."""
        if not asks_in_full(reply):
            return None
        node = int(reply.metadata.src_node_id)
        self.by_node.pop(node, None)
        sent = next(((m, full) for m, full in self._full if int(m.metadata.dst_node_id) == node), None)
        if sent is None or node in self._resent:
            log.warning("node %d replied held-missing (%s) to a message this server cannot send again in full",
                        node, _missing(reply))
            return None
        self._resent.add(node)
        original, full = sent
        meta = original.metadata
        log.info("node %d lacks %s that was sent by reference: sent again in full", node, _missing(reply))
        return Message(content=full, metadata=Metadata(
            run_id=meta.run_id, message_id="", src_node_id=meta.src_node_id, dst_node_id=meta.dst_node_id,
            reply_to_message_id="", group_id=meta.group_id, created_at=time.time(), ttl=meta.ttl,
            message_type=meta.message_type))


class ResendInFull:
    """A Grid whose ``send_and_receive`` sends a message again in full to every node that replied
    ``held-missing`` (:meth:`NodeHoldings.resend`), within what is left of the phase's ``timeout``, and
    returns that reply in place of the ``held-missing`` one. Everything else is the wrapped Grid's.

    Why a wrapper around the whole phase (not inside the pull loop): the strategy sees only replies,
    and the Grid's loop (:class:`server_app.grid.PromptGrid`) stays one concern. The price: the messages
    sent again go out once the first ones' replies are in (a lost state is rare; the node still
    completes the round)."""

    def __init__(self, grid: Any, resend: Callable[[Message], Message | None]) -> None:
        self._grid, self._resend = grid, resend

    def __getattr__(self, name: str) -> Any:  # everything but send_and_receive is the wrapped Grid's
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """The wrapped Grid's phase, then one more for the messages sent again in full."""
        start = time.monotonic()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        again = {id(r): m for r in replies if (m := self._resend(r)) is not None}
        if not again:
            return replies
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
        answers = list(self._grid.send_and_receive(list(again.values()), timeout=left))
        node_of = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in again.values()}  # ids set on push
        answered = {node_of.get(a.metadata.reply_to_message_id, int(a.metadata.src_node_id)) for a in answers}
        # a node whose second message got no answer in time keeps its held-missing reply (rejected, counted)
        return [r for r in replies if id(r) not in again or int(r.metadata.src_node_id) not in answered] + answers
