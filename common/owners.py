"""``<run>/partition_owners.json``: which Flower node owns which partition of a run (one save/load pair).

Why a file: with SuperNode authentication a Flower node id is bound to the key the operator registered
(``flwr supernode register``), and a node that restarts with its key keeps its id. Pinning partitions
to node ids therefore pins them to keys. The file is written when a partition is first claimed, read
back when the run resumes, and changed only by the operator (``feda2v owners``), so no node can take
over another site's partition, even while that site is offline.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.atomic import atomic_write_json
from common.errors import FedA2VError

OWNERS_FILE = "partition_owners.json"


class OwnersError(FedA2VError, ValueError):
    """An owners file that cannot be read (names the file and the entry)."""


def load_owners(path: Path) -> dict[int, int]:
    """partition id -> Flower node id (empty when the file does not exist)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        owners = data["owners"]
        return {int(pid): int(node) for pid, node in owners.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise OwnersError(f"'{path}': not a partition owners file ({type(err).__name__}: {err})") from None


def save_owners(path: Path, owners: dict[int, int]) -> None:
    atomic_write_json(path, {"owners": {str(pid): int(node) for pid, node in sorted(owners.items())}})
