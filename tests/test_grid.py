"""The server's prompt reply polling: all replies gathered, the loop ends with the last reply or at the
deadline, and every other Grid call goes to Flower's Grid unchanged."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from flwr.app import MetricRecord

from common.metrics.resources import ENTRY_UNIX, EXIT_UNIX
from common.records import METRICS
from server_app.grid import PromptGrid


class FakeGrid:
    """Replies to message i become pullable at ``ready[i]`` seconds after the push."""

    def __init__(self, ready: list[float]) -> None:
        self.ready, self.pulls, self.t0, self.wall0 = ready, 0, 0.0, 0.0

    def push_messages(self, messages):
        self.t0, self.wall0 = time.monotonic(), time.time()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        now = time.monotonic() - self.t0
        # the node's handler ran from 0.1 s after the push until 0.1 s before its reply was ready
        stamps = lambda at: MetricRecord({"x": 1.0, ENTRY_UNIX: self.wall0 + 0.1, EXIT_UNIX: self.wall0 + at - 0.1})  # noqa: E731
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}"), has_error=lambda: False,
                                content={METRICS: stamps(at)})
                for i, at in enumerate(self.ready) if f"m{i}" in ids and at <= now]

    def get_node_ids(self):
        return [1, 2]


def test_replies_are_gathered_as_soon_as_the_last_one_arrives():
    fake = FakeGrid([0.0, 0.3])
    grid = PromptGrid(fake, interval=0.05)
    replies = grid.send_and_receive(["a", "b"], timeout=10)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    # it pulled again and again while waiting (Flower's deployment Grid sleeps 3 s after each pull) and
    # stopped pulling once nothing was pending
    pulls = fake.pulls
    assert pulls >= 3
    assert grid.get_node_ids() == [1, 2]  # delegated
    assert fake.pulls == pulls


def test_each_reply_says_how_long_it_took_to_reach_the_node_and_to_come_back():
    replies = PromptGrid(FakeGrid([0.5]), interval=0.05).send_and_receive(["a"], timeout=10)
    metrics = dict(replies[0].content[METRICS])
    assert ENTRY_UNIX not in metrics and EXIT_UNIX not in metrics and metrics["x"] == 1.0
    assert 0.0 <= metrics["dispatch_seconds"] <= 0.1 + 1e-3  # push done -> handler entry
    assert 0.1 - 1e-3 <= metrics["return_seconds"] < 5.0  # handler exit -> pulled (one poll interval late at most)


def test_the_wait_ends_at_the_deadline_with_the_replies_it_has():
    fake = FakeGrid([0.0, 3600.0])  # the second node never replies in time
    replies = PromptGrid(fake, interval=0.05).send_and_receive(["a", "b"], timeout=0.3)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert fake.pulls >= 2


def test_a_non_positive_interval_is_refused():
    with pytest.raises(ValueError, match="reply-poll-interval"):
        PromptGrid(FakeGrid([]), interval=0)


def test_the_deployment_grid_retries_objects_still_in_flight_promptly(monkeypatch):
    from flwr.superlink.grid import http_grid

    from common.deploy.prompt_timing import PULL_BACKOFF, PULL_BACKOFF_CAP
    from server_app.grid import prompt_object_pulls

    calls = []
    monkeypatch.setattr(http_grid, "pull_objects", lambda ids, fn, **kw: calls.append(kw) or {i: fn(i) for i in ids})
    PromptGrid(FakeGrid([]), interval=0.1)  # installs it
    assert prompt_object_pulls()  # and a second time does not wrap twice
    http_grid.pull_objects(["a"], lambda i: b"x")
    assert calls == [{"initial_backoff": PULL_BACKOFF, "backoff_cap": PULL_BACKOFF_CAP, "max_tries_per_object": None}]
