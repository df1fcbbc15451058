"""A Grid whose ``send_and_receive`` notices replies within a fraction of a second.

Why: Flower 1.41's deployment Grid (``flwr/superlink/grid/http_grid.py``) sleeps 3 s between two
pulls of replies, so every train and evaluate phase ends up to 3 s after its last reply arrived
(1.5 s on average, twice per round). This wrapper does the same push-then-pull with Flower's own
``push_messages`` / ``pull_messages``, polling every ``reply-poll-interval`` seconds; everything
else is the wrapped Grid's. The loop is bounded by the phase's ``timeout`` (``round-timeout``),
exactly as Flower's is; with no timeout it waits for every reply, as Flower's does.

It also times each message's trip: a node stamps its handler's wall-clock entry and exit in the
reply's metrics (:data:`~common.metrics.resources.ENTRY_UNIX`, ``EXIT_UNIX``); here they become
``dispatch_seconds`` (push done -> handler entry: the SuperNode's and SuperExec's polling, transfer,
and in deployment the fresh ClientApp process's start, which ``process_age_seconds`` tells apart)
and ``return_seconds`` (handler exit -> reply pulled here). Both clocks are the same on one host;
across hosts they are as close as the hosts' clocks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message

from common.deploy.prompt_timing import prompt_pulls
from common.metrics.resources import ENTRY_UNIX, EXIT_UNIX
from common.records import METRICS

log = logging.getLogger(__name__)


class PromptGrid:
    """Delegates to ``grid``; only ``send_and_receive`` polls every ``interval`` seconds."""

    def __init__(self, grid: Any, interval: float) -> None:
        if interval <= 0:
            raise ValueError(f"reply-poll-interval must be > 0, got {interval}")
        self._grid, self.interval = grid, float(interval)
        prompt_object_pulls()

    def __getattr__(self, name: str) -> Any:  # everything but send_and_receive is the wrapped Grid's
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull their replies until all arrived or ``timeout`` seconds passed."""
        pending = set(self._grid.push_messages(messages))
        pushed = time.time()
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            arrived = time.time()
            for reply in got:
                trip_times(reply, pushed, arrived)
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending:
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            time.sleep(self.interval if left is None else min(self.interval, left))
        return replies


def trip_times(reply: Message, pushed: float, arrived: float) -> None:
    """Replace a reply's handler entry/exit stamps by ``dispatch_seconds`` and ``return_seconds``."""
    if reply.has_error() or METRICS not in reply.content:
        return
    metrics = reply.content[METRICS]
    entry, exit_ = metrics.pop(ENTRY_UNIX, None), metrics.pop(EXIT_UNIX, None)
    if entry is not None:
        metrics["dispatch_seconds"] = max(0.0, float(entry) - pushed)
    if exit_ is not None:
        metrics["return_seconds"] = max(0.0, arrived - float(exit_))


def prompt_object_pulls() -> bool:
    """Make the deployment Grid retry a reply's not-yet-uploaded objects within 0.05-0.5 s, not 1-10 s.

    Why: a reply becomes pullable at the SuperLink before its SuperNode finished uploading the
    reply's objects (the weights). Flower 1.41's Grid then retries each missing object after 1 s,
    2 s, 4 s ... (``HttpGrid.pull_messages``), so an upload that takes 1.1 s costs 3 s; polling for
    replies every 0.1 s makes such early pulls the rule. Only this process (the ServerApp) is
    affected (:func:`common.deploy.prompt_timing.prompt_pulls`). Returns whether the Grid module was
    found (an unknown Flower version is left alone and logged).
    """
    try:
        from flwr.superlink.grid import http_grid
    except ImportError:
        log.info("flwr.superlink.grid.http_grid not found: the deployment Grid's object pulls keep Flower's backoff")
        return False
    return prompt_pulls(http_grid)
