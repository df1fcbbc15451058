"""A Grid whose ``send_and_receive`` notices replies within a fraction of a second and keeps its deadline.

Why: Flower 1.41's deployment Grid (``flwr/superlink/grid/http_grid.py``) sleeps 3 s between two
pulls of replies, so every train and evaluate phase ends up to 3 s after its last reply arrived
(twice per round). This wrapper does the same push-then-pull with Flower's own
``push_messages`` / ``pull_messages``, polling every ``reply-poll-interval`` seconds; everything
else is the wrapped Grid's. The loop is bounded by the phase's ``timeout`` (``round-timeout``),
exactly as Flower's is; with no timeout it waits for every reply, as Flower's does.

The deadline also holds *inside* one pull. A node registers its reply at the SuperLink before it
uploads the reply's objects (the weights), and Flower's Grid retries a missing object for up to
``PULL_MAX_TIME`` (7,200 s) within a single ``pull_messages`` call. So a node that registers a reply
and never uploads it would stall the phase far past its deadline. :func:`prompt_object_pulls`
bounds every object pull of the ServerApp by the time left to the phase deadline
(:data:`_PULL_DEADLINE`, set around each pull); a reply whose objects are not there by then is left
out of the phase, as if the node had never replied, and logged with the node's id.

It also times each message's trip: a node stamps its handler's wall-clock entry and exit in the
reply's metrics (:data:`~common.metrics.resources.ENTRY_UNIX`, ``EXIT_UNIX``); here they become
``dispatch_seconds`` (push done -> handler entry: the SuperNode's and SuperExec's polling, transfer,
and in deployment the fresh ClientApp process's start, which ``process_age_seconds`` tells apart)
and ``return_seconds`` (handler exit -> reply pulled here). Both clocks are the same on one host;
across hosts they are as close as the hosts' clocks.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from types import ModuleType
from typing import Any

from flwr.app import Message
from flwr.common.constant import ErrorCode

from common.flower_compat import flower_version_mismatch, keyword_mismatch, mismatches
from common.metrics.resources import ENTRY_UNIX, EXIT_UNIX
from common.records import METRICS

log = logging.getLogger(__name__)

# Backoff of the ServerApp's retries of reply objects still in flight (seconds): first retry, and the
# largest wait between two (Flower: 1 s and 10 s)
PULL_BACKOFF, PULL_BACKOFF_CAP = 0.05, 0.5
# The monotonic-clock deadline of the phase whose replies this thread is pulling (None: no deadline)
_PULL_DEADLINE: ContextVar[float | None] = ContextVar("feda2v_pull_deadline", default=None)


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
        messages = list(messages)
        node_of = pushed_to(messages, self._grid.push_messages(messages))
        pending = set(node_of)
        pushed = time.time()
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        late: list[str] = []  # replies registered, objects not uploaded by the deadline
        final = False
        while pending:
            # a pull that started before the deadline may have waited on one node's missing objects until the
            # deadline: replies registered meanwhile get one last pull (their objects tried once, not waited for)
            final = deadline is not None and time.monotonic() >= deadline
            got = self._pull(pending, deadline)
            arrived = time.time()
            for reply in got:
                message_id = reply.metadata.reply_to_message_id
                pending.discard(message_id)
                if objects_missed_deadline(reply, deadline):
                    log.warning("node %s registered its reply but did not upload it before the phase deadline: "
                                "left out of this phase", node_of.get(message_id, "?"))
                    late.append(message_id)
                    continue
                trip_times(reply, pushed, arrived)
                replies.append(reply)
            if not pending:
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0 and final:
                break
            if left is not None and left <= 0:
                continue  # the last pull, for replies that arrived while the previous one waited
            time.sleep(self.interval if left is None else min(self.interval, left))
        if deadline is not None and (pending or late):
            log.warning("phase ended %.2f s after its deadline without replies from nodes %s",
                        time.monotonic() - deadline, sorted(node_of[m] for m in [*pending, *late]))
        return replies

    def _pull(self, pending: set[str], deadline: float | None) -> list[Message]:
        """One ``pull_messages``, its object pulls bounded by ``deadline`` (see :func:`prompt_object_pulls`)."""
        token = _PULL_DEADLINE.set(deadline)
        try:
            return list(self._grid.pull_messages(pending))
        finally:
            _PULL_DEADLINE.reset(token)


def pushed_to(messages: list[Message], message_ids: Iterable[str | None]) -> dict[str, int]:
    """Message id -> destination node id of every pushed message (Flower gives None for one it could not push)."""
    node_of: dict[str, int] = {}
    for message, message_id in zip(messages, message_ids):
        if message_id:
            node_of[message_id] = message.metadata.dst_node_id
        else:
            log.warning("the message to node %s could not be pushed to the SuperLink", message.metadata.dst_node_id)
    return node_of


def objects_missed_deadline(reply: Message, deadline: float | None) -> bool:
    """The Grid's stand-in error for a reply whose objects could not be pulled, once the deadline passed.

    Flower's Grid turns a reply whose objects stay unavailable into an error message with
    ``MESSAGE_UNAVAILABLE``; with object pulls bounded by the deadline that happens at the deadline.
    """
    return (deadline is not None and reply.has_error() and reply.error.code == ErrorCode.MESSAGE_UNAVAILABLE
            and time.monotonic() >= deadline)


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


def deadline_bounded(pull_objects: Callable[..., Any]) -> Callable[..., Any]:
    """``pull_objects`` with a short backoff, no try limit, and no retry past the phase deadline.

    Explicit keyword arguments of a caller win, except that ``max_time`` never reaches past the
    deadline in :data:`_PULL_DEADLINE`. Every object is tried at least once, so a reply that is
    complete at the deadline is still collected.
    """

    @functools.wraps(pull_objects)
    def pull(object_ids: Any, pull_object_fn: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("initial_backoff", PULL_BACKOFF)
        kwargs.setdefault("backoff_cap", PULL_BACKOFF_CAP)
        kwargs.setdefault("max_tries_per_object", None)
        deadline = _PULL_DEADLINE.get()
        if deadline is not None:
            left = max(0.0, deadline - time.monotonic())
            limit = kwargs.get("max_time")
            kwargs["max_time"] = left if limit is None else min(float(limit), left)
        return pull_objects(object_ids, pull_object_fn, **kwargs)

    pull.feda2v_deadline = True  # type: ignore[attr-defined]
    return pull


def bound_pulls(module: ModuleType) -> bool:
    """Replace ``module.pull_objects`` by :func:`deadline_bounded` (idempotent); False when it has none."""
    original = getattr(module, "pull_objects", None)
    if original is None:
        log.info("%s has no pull_objects: its object pulls keep Flower's timing", module.__name__)
        return False
    if not getattr(original, "feda2v_deadline", False):
        module.pull_objects = deadline_bounded(original)  # type: ignore[attr-defined]
    return True


PULL_KEYWORDS = ("initial_backoff", "backoff_cap", "max_tries_per_object", "max_time")  # what deadline_bounded sets


def flower_mismatches() -> list[str]:
    """What :func:`prompt_object_pulls` and :class:`PromptGrid` assume of the installed Flower and is not so."""
    try:
        from flwr.serverapp import Grid
        from flwr.superlink.grid import http_grid
    except ImportError as err:
        return [f"Flower's Grid modules cannot be imported ({err})"]
    return mismatches(
        flower_version_mismatch(),
        keyword_mismatch(getattr(http_grid, "pull_objects", None), "flwr.superlink.grid.http_grid.pull_objects",
                         PULL_KEYWORDS),
        *(None if callable(getattr(Grid, name, None)) else f"flwr.serverapp.Grid has no {name}"
          for name in ("push_messages", "pull_messages")),
    )


def prompt_object_pulls() -> bool:
    """Make the deployment Grid retry a reply's not-yet-uploaded objects within 0.05-0.5 s, not 1-10 s, and
    never past the phase deadline.

    Why: a reply becomes pullable at the SuperLink before its SuperNode finished uploading the
    reply's objects (the weights). Flower 1.41's Grid then retries each missing object after 1 s,
    2 s, 4 s ... (``HttpGrid.pull_messages``), so an upload that takes 1.1 s costs 3 s; polling for
    replies every 0.1 s makes such early pulls the rule. Only this process (the ServerApp) is
    affected. Returns whether it applied: an installed Flower that does not match what the patch
    assumes (:func:`flower_mismatches`) is left alone, with a warning.
    """
    problems = flower_mismatches()
    if problems:
        log.warning("the deployment Grid keeps Flower's object pulls (no deadline inside a pull): %s",
                    "; ".join(problems))
        return False
    from flwr.superlink.grid import http_grid

    return bound_pulls(http_grid)
