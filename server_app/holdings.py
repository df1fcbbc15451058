"""Which of the server's records each node holds, and messages that send those by reference.

Why: the class targets are the same all run, and the weights of a round's evaluate message are the
next round's train weights; sending them again to a node that kept them (:mod:`client_app.held`)
is pure traffic. Every reply names what its node holds (``held``); the next message to that node
carries, for each record it holds under the same hash, only the hash (``by-reference``). A failed
reply (e.g. the node lost its state) forgets what that node held, so its next message is sent in
full. Hashes are Flower's own content ids of the records (``object_id``).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict

from common.wire import BY_REFERENCE, HASHES, HELD, HELD_RECORDS


class NodeHoldings:
    def __init__(self) -> None:
        self.by_node: dict[int, dict[str, str]] = {}

    def update(self, replies: list[Message]) -> None:
        """What each replying node holds now (an error reply: nothing known)."""
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                self.by_node.pop(node, None)
            elif HELD in msg.content:
                self.by_node[node] = {str(k): str(v) for k, v in msg.content[HELD].items()}  # type: ignore[union-attr]

    def personalise(self, messages: list[Message]) -> list[Message]:
        """Each message with its own content: the held records' hashes declared, and the records its node
        holds under the same hash left out (named in ``by-reference``). Records are shared, not copied."""
        hashes: dict[int, dict[str, str]] = {}  # per shared content: name -> hash
        for msg in messages:
            shared = msg.content
            if id(shared) not in hashes:
                hashes[id(shared)] = {name: shared[keys[0]].object_id  # type: ignore[union-attr]
                                      for name, keys in HELD_RECORDS.items() if keys[0] in shared}
            declared = hashes[id(shared)]
            holds = self.by_node.get(int(msg.metadata.dst_node_id), {})
            content = RecordDict(dict(shared.items()))
            content[HASHES] = ConfigRecord(dict(declared))
            refs = {name: h for name, h in declared.items() if holds.get(name) == h}
            for name in refs:
                for key in HELD_RECORDS[name]:
                    if key in content:
                        del content[key]
            if refs:
                content[BY_REFERENCE] = ConfigRecord(refs)
            msg.content = content
        return messages
