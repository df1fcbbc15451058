"""The server's prompt reply polling: all replies gathered, the loop ends with the last reply or at the
deadline, and every other Grid call goes to Flower's Grid unchanged."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from server_app.grid import PromptGrid


class FakeGrid:
    """Replies to message i become pullable at ``ready[i]`` seconds after the push."""

    def __init__(self, ready: list[float]) -> None:
        self.ready, self.pulls, self.t0 = ready, 0, 0.0

    def push_messages(self, messages):
        self.t0 = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        now = time.monotonic() - self.t0
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}"))
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


def test_the_wait_ends_at_the_deadline_with_the_replies_it_has():
    fake = FakeGrid([0.0, 3600.0])  # the second node never replies in time
    replies = PromptGrid(fake, interval=0.05).send_and_receive(["a", "b"], timeout=0.3)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert fake.pulls >= 2


def test_a_non_positive_interval_is_refused():
    with pytest.raises(ValueError, match="reply-poll-interval"):
        PromptGrid(FakeGrid([]), interval=0)
