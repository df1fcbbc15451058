"""How many nodes a round needs, and what happens when they are not there.

Flower waits forever for nodes to connect and aggregates whatever replies arrive, even none. Here a
run waits a bounded time (``connect-timeout``) for ``min-nodes`` nodes and fails with the count,
and every phase of a round needs ``min-replies`` valid replies (a count, or a fraction of the nodes
asked): below it the run stops with an error that names who replied, who failed and who was
rejected, instead of training on one node or on none. A failed run is not retried automatically:
resume it (``resume = true``) once the nodes are back.
"""

from __future__ import annotations

import logging
import math
import time

from common.errors import FedA2VError

log = logging.getLogger(__name__)


class QuorumError(FedA2VError):
    """Too few nodes connected, or too few valid replies in a phase of a round."""


def required_replies(min_replies: float, asked: int) -> int:
    """``min-replies`` as a count: >= 1 is a count, < 1 a fraction of ``asked`` (at least 1)."""
    if min_replies >= 1:
        return int(min_replies)
    return max(1, math.ceil(min_replies * asked))


def check_quorum(server_round: int, phase: str, replied: list[int], asked: int, min_replies: float,
                 failures: list[str], rejected: list[str]) -> None:
    need = required_replies(min_replies, asked)
    if len(replied) >= need:
        return
    raise QuorumError(
        f"round {server_round} {phase}: {len(replied)} valid replies of {asked} nodes asked, quorum is {need} "
        f"(min-replies={min_replies:g}); replied: {sorted(replied) or 'none'}; failed: {failures or 'none'}; "
        f"rejected: {rejected or 'none'}"
    )


def wait_for_nodes(grid, needed: int, timeout_s: float, poll_s: float = 1.0) -> list[int]:
    """The connected node ids once at least ``needed`` are connected; :class:`QuorumError` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    logged = -1
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= needed:
            return nodes
        if time.monotonic() >= deadline:
            raise QuorumError(
                f"{len(nodes)} node(s) connected after {timeout_s:g}s, min-nodes is {needed}: start more SuperNodes "
                "(or lower min-nodes) and resume the run"
            )
        if len(nodes) != logged:
            log.info("waiting for nodes: %d connected, %d needed (connect-timeout %gs)", len(nodes), needed, timeout_s)
            logged = len(nodes)
        time.sleep(poll_s)
