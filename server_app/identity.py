"""Who may reply for a partition.

A node states its partition id in its own metrics, so without a record of owners any node could reply
for another site's partition (its data, its class means, its place in the quorum). Two modes:

* **pinned** (``robust.pin-partitions = true``, for deployments with SuperNode authentication, where a
  Flower node id is bound to the key the operator registered and survives a node restart): a
  partition belongs to the node that first claimed it, or to the node the operator assigned
  (:mod:`common.owners`, ``feda2v owners``). The record lives in the run folder, so it persists across
  resume; a different node claiming the partition is rejected and named, whether the owner is online
  or not; only the operator moves it.
* **unpinned** (simulation, insecure loopback: node ids change when a node restarts): a partition
  belongs to the Flower node that first replied for it while that node is connected; a restarted
  SuperNode, back under a new id, takes it over once the old one is gone. The run warns once that a
  node may then take over a disconnected node's partition.
"""

from __future__ import annotations

import logging
from pathlib import Path

from common.owners import load_owners, save_owners

log = logging.getLogger(__name__)


class PartitionOwners:
    def __init__(self, path: Path | None = None, pinned: bool = False, assigned: dict[int, int] | None = None) -> None:
        """``path``: the run's owners file (pinned mode reads it back and records first claims in it);
        ``assigned``: the operator's mapping (``robust.partition-owners``), which wins over the file and pins."""
        self.path, self.pinned = path, pinned or bool(assigned)
        self.owner_of: dict[int, int] = load_owners(path) if self.pinned and path is not None else {}
        if assigned:
            self.owner_of = {p: n for p, n in self.owner_of.items() if p not in assigned and n not in assigned.values()}
            self.owner_of.update(assigned)
            if path is not None:
                save_owners(path, self.owner_of)
        if not self.pinned:
            log.warning("partitions are not pinned to node keys (robust.pin-partitions = false): a node may take "
                        "over the partition of a node that disconnected; pin them in deployments with SuperNode "
                        "authentication")

    def check(self, node_id: int, partition_id: int, connected: set[int] | None = None) -> str | None:
        """The reason ``node_id`` may not reply for ``partition_id``, or ``None``."""
        held = [p for p, n in self.owner_of.items() if n == node_id and p != partition_id]
        if held:
            return f"Flower node {node_id} reported partition id {held[0]} before, now {partition_id}"
        owner = self.owner_of.get(partition_id)
        if owner is None or owner == node_id:
            return None
        if self.pinned:
            return (f"partition id {partition_id} is pinned to Flower node {owner} (its registered key), not "
                    f"{node_id}; `feda2v owners` moves it")
        if connected is None or owner in connected:
            return f"partition id {partition_id} belongs to Flower node {owner}"
        return None  # unpinned: the old node left, a restart, not a spoof (remember() moves it)

    def remember(self, node_id: int, partition_id: int) -> None:
        """``node_id`` owns ``partition_id`` (pinned: recorded in the run's owners file on first claim)."""
        if self.owner_of.get(partition_id) == node_id:
            return
        if self.pinned and partition_id in self.owner_of:
            return  # check() refused it already; only the operator moves a pinned partition
        self.owner_of[partition_id] = node_id
        if self.pinned and self.path is not None:
            save_owners(self.path, self.owner_of)
            log.info("partition %d pinned to Flower node %d (%s)", partition_id, node_id, self.path)
