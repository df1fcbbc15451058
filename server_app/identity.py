"""Who may reply for a partition: a partition belongs to the node that first replied for it.

Why: a node states its partition id in its own metrics, so without a record of owners any node could
reply for another site's partition (its data, its class means, its place in the quorum). The owner of
a partition is the Flower node id that first replied for it; a second node claiming it while the
owner is still connected is rejected and named. A restarted SuperNode comes back under a new Flower
node id: it takes its partition over once the old node is gone (no longer connected).
"""

from __future__ import annotations


class PartitionOwners:
    def __init__(self) -> None:
        self.partition_of: dict[int, int] = {}  # Flower node id -> the partition id it reported first

    def check(self, node_id: int, partition_id: int, connected: set[int] | None = None) -> str | None:
        """The reason ``node_id`` may not reply for ``partition_id``, or ``None``."""
        known = self.partition_of.get(node_id)
        if known is not None and known != partition_id:
            return f"Flower node {node_id} reported partition id {known} before, now {partition_id}"
        owner = next((n for n, p in self.partition_of.items() if p == partition_id and n != node_id), None)
        if owner is not None and (connected is None or owner in connected):
            return f"partition id {partition_id} belongs to Flower node {owner}"
        return None  # no owner, or the old node left: a restart, not a spoof (remember() moves it)

    def remember(self, node_id: int, partition_id: int) -> None:
        """``node_id`` owns ``partition_id`` (a restarted node takes it over)."""
        for other in [n for n, p in self.partition_of.items() if p == partition_id and n != node_id]:
            del self.partition_of[other]
        self.partition_of.setdefault(node_id, partition_id)
