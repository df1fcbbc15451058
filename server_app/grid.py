"""A Grid whose ``send_and_receive`` notices replies within a fraction of a second.

Why: Flower 1.41's deployment Grid (``flwr/superlink/grid/http_grid.py``) sleeps 3 s between two
pulls of replies, so every train and evaluate phase ends up to 3 s after its last reply arrived
(1.5 s on average, twice per round). This wrapper does the same push-then-pull with Flower's own
``push_messages`` / ``pull_messages``, polling every ``reply-poll-interval`` seconds; everything
else is the wrapped Grid's. The loop is bounded by the phase's ``timeout`` (``round-timeout``),
exactly as Flower's is; with no timeout it waits for every reply, as Flower's does.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message


class PromptGrid:
    """Delegates to ``grid``; only ``send_and_receive`` polls every ``interval`` seconds."""

    def __init__(self, grid: Any, interval: float) -> None:
        if interval <= 0:
            raise ValueError(f"reply-poll-interval must be > 0, got {interval}")
        self._grid, self.interval = grid, float(interval)

    def __getattr__(self, name: str) -> Any:  # everything but send_and_receive is the wrapped Grid's
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull their replies until all arrived or ``timeout`` seconds passed."""
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending:
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            time.sleep(self.interval if left is None else min(self.interval, left))
        return replies
