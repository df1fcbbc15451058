"""The server's prompt reply polling: all replies gathered, the loop ends with the last reply or at the
deadline (also when a node registered a reply and never uploads its objects), and every other Grid
call goes to Flower's Grid unchanged."""

from __future__ import annotations

import functools
import inspect
import time
from types import SimpleNamespace

import numpy
import pytest
from flwr.app import Array, Message, MessageType, MetricRecord, RecordDict

from common.metrics.resources import ENTRY_UNIX, EXIT_UNIX
from common.records import METRICS
from server_app.grid import PromptGrid


def sent(n: int) -> list[SimpleNamespace]:
    """``n`` outgoing messages as the Grid sees them (only the destination node matters here)."""
    return [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=100 + i)) for i in range(n)]


def spy_pulls(http_grid, calls: list, result=None):
    """A stand-in for Flower's ``pull_objects`` with its signature (the patch checks it) that records the
    keyword arguments it gets."""
    @functools.wraps(inspect.unwrap(http_grid.pull_objects))  # Flower's own, not an earlier patch's wrapper
    def pull(ids, fn, **kw):
        calls.append(kw)
        return {i: fn(i) for i in ids} if result is None else result

    return pull


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
    replies = grid.send_and_receive(sent(2), timeout=10)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    # it pulled again and again while waiting (Flower's deployment Grid sleeps 3 s after each pull) and
    # stopped pulling once nothing was pending
    pulls = fake.pulls
    assert pulls >= 3
    assert grid.get_node_ids() == [1, 2]  # delegated
    assert fake.pulls == pulls


def test_each_reply_says_how_long_it_took_to_reach_the_node_and_to_come_back():
    replies = PromptGrid(FakeGrid([0.5]), interval=0.05).send_and_receive(sent(1), timeout=10)
    metrics = dict(replies[0].content[METRICS])
    assert ENTRY_UNIX not in metrics and EXIT_UNIX not in metrics and metrics["x"] == 1.0
    assert 0.0 <= metrics["dispatch_seconds"] <= 0.1 + 1e-3  # push done -> handler entry
    assert 0.1 - 1e-3 <= metrics["return_seconds"] < 5.0  # handler exit -> pulled (one poll interval late at most)


def test_the_wait_ends_at_the_deadline_with_the_replies_it_has():
    fake = FakeGrid([0.0, 3600.0])  # the second node never replies in time
    replies = PromptGrid(fake, interval=0.05).send_and_receive(sent(2), timeout=0.3)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert fake.pulls >= 2


def test_a_non_positive_interval_is_refused():
    with pytest.raises(ValueError, match="reply-poll-interval"):
        PromptGrid(FakeGrid([]), interval=0)


def test_the_deployment_grid_retries_objects_still_in_flight_promptly(monkeypatch):
    from flwr.superlink.grid import http_grid

    from server_app.grid import PULL_BACKOFF, PULL_BACKOFF_CAP, prompt_object_pulls

    calls = []
    monkeypatch.setattr(http_grid, "pull_objects", spy_pulls(http_grid, calls))
    PromptGrid(FakeGrid([]), interval=0.1)  # installs it
    assert prompt_object_pulls()  # and a second time does not wrap twice
    http_grid.pull_objects(["a"], lambda i: b"x")
    assert calls == [{"initial_backoff": PULL_BACKOFF, "backoff_cap": PULL_BACKOFF_CAP, "max_tries_per_object": None}]


# ------------------------------------------------------------------ a reply whose objects never come
class FakeRuntime:
    """The SuperLink's Runtime API as Flower's ``HttpGrid`` calls it, in memory.

    Every pushed message gets a reply at once; the objects of the replies from ``withheld`` nodes are
    registered but never uploaded (``object_available`` stays false), as when a node registers its
    reply and then never uploads it. Bounded: after ``give_up`` pulls of a withheld object past the
    deadline the object is reported as not found, so a Grid that ignores the deadline fails the test
    instead of hanging it.
    """

    def __init__(self, withheld: set[int], give_up: int = 20, registers_at: dict[int, float] | None = None) -> None:
        self.withheld, self.give_up = withheld, give_up
        self.registers_at = registers_at or {}  # node -> monotonic time its reply becomes pullable
        self.node_of: dict[str, int] = {}
        self.replies: dict[str, Message] = {}
        self.objects: dict[str, bytes] = {}
        self.unavailable: set[str] = set()
        self.deadline: float | None = None
        self.pulls_past_deadline = 0

    def PushMessages(self, request):  # noqa: N802 - Flower's API name
        from flwr.app import ArrayRecord, RecordDict
        from flwr.common.serde import message_from_proto
        from flwr.proto.runtime_pb2 import PushAppMessagesResponse
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

        ids = []
        for proto in request.messages_list:
            sent_msg = message_from_proto(proto)
            node = sent_msg.metadata.dst_node_id
            reply = Message(RecordDict({"arrays": ArrayRecord({"w": Array(numpy.full(3, float(node)))})}),
                            reply_to=sent_msg)
            reply.metadata.__dict__["_message_id"] = reply.object_id
            objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(reply).items()}
            self.objects.update(objects)
            if node in self.withheld:
                self.unavailable.update(oid for oid in objects if oid != reply.object_id)
            self.replies[sent_msg.metadata.message_id] = reply
            self.node_of[sent_msg.metadata.message_id] = node
            ids.append(sent_msg.metadata.message_id)
        return PushAppMessagesResponse(message_ids=ids, objects_to_push=[], session_id="s")

    def PullMessages(self, request):  # noqa: N802
        from flwr.app.message import remove_content_from_message
        from flwr.common.serde import message_to_proto
        from flwr.proto.runtime_pb2 import PullAppMessagesResponse
        from flwr.supercore.inflatable.inflatable_object import get_object_tree

        found = [self.replies[i] for i in request.message_ids if i in self.replies
                 and time.monotonic() >= self.registers_at.get(self.node_of[i], 0.0)]
        return PullAppMessagesResponse(
            messages_list=[message_to_proto(remove_content_from_message(r)) for r in found],
            message_object_trees=[get_object_tree(r) for r in found])

    def PullObject(self, request):  # noqa: N802
        from flwr.proto.message_pb2 import PullObjectResponse

        oid = request.object_id
        if oid not in self.unavailable:
            return PullObjectResponse(object_found=True, object_available=True, object_content=self.objects[oid])
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.pulls_past_deadline += 1
            if self.pulls_past_deadline > self.give_up:
                return PullObjectResponse(object_found=False, object_available=False)
        return PullObjectResponse(object_found=True, object_available=False)

    def PushObject(self, request):  # noqa: N802 - never called: no object is asked for in PushMessages
        raise AssertionError("the Grid pushed an object nobody asked for")

    def ConfirmMessageReceived(self, request):  # noqa: N802
        from flwr.proto.message_pb2 import ConfirmMessageReceivedResponse

        return ConfirmMessageReceivedResponse()


def test_a_reply_whose_objects_never_arrive_is_left_out_at_the_deadline(caplog, monkeypatch):
    """Flower's own HttpGrid.pull_messages, against a node that registered its reply but never uploads it:
    the phase ends at its deadline with the other node's reply, and the log names the missing node."""
    from flwr.superlink.grid.http_grid import HttpGrid
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):  # what a ServerApp process has
        monkeypatch.setattr(TaskIdentity, name, value)

    runtime = FakeRuntime(withheld={2})
    http = HttpGrid(token="t")
    http._client = runtime  # noqa: SLF001 - the Runtime API, in memory
    http.set_run(Run.create_empty(7))
    grid = PromptGrid(http, interval=0.05)
    messages = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN) for node in (1, 2)]
    timeout = 0.5
    runtime.deadline = time.monotonic() + timeout  # no later than the Grid's own deadline
    with caplog.at_level("WARNING", logger="server_app.grid"):
        replies = list(grid.send_and_receive(messages, timeout=timeout))
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert not replies[0].has_error()
    # the withheld objects were tried at most once each after the deadline (Flower would go on for 2 hours)
    assert runtime.pulls_past_deadline <= len(runtime.unavailable)
    assert any("node 2" in r.getMessage() and "left out" in r.getMessage() for r in caplog.records), caplog.text


def test_a_reply_registered_while_a_pull_waits_on_missing_objects_is_still_collected(monkeypatch):
    """Node 2 registers first and never uploads; node 1 registers while the pull waits on node 2's objects
    (until the deadline): the phase still ends with node 1's reply (one last pull after the deadline)."""
    from flwr.superlink.grid.http_grid import HttpGrid
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    timeout = 0.6
    runtime = FakeRuntime(withheld={2}, registers_at={1: time.monotonic() + 0.2})
    http = HttpGrid(token="t")
    http._client = runtime  # noqa: SLF001 - the Runtime API, in memory
    http.set_run(Run.create_empty(7))
    grid = PromptGrid(http, interval=0.05)
    messages = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN) for node in (1, 2)]
    runtime.deadline = time.monotonic() + timeout
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    assert [r.metadata.src_node_id for r in replies] == [1] and not replies[0].has_error()


def test_object_pulls_never_reach_past_the_phase_deadline(monkeypatch):
    from flwr.superlink.grid import http_grid

    from server_app import grid as grid_module

    calls = []
    monkeypatch.setattr(http_grid, "pull_objects", spy_pulls(http_grid, calls, result={}))
    assert grid_module.prompt_object_pulls()
    token = grid_module._PULL_DEADLINE.set(time.monotonic() - 1)  # noqa: SLF001 - a deadline already passed
    try:
        http_grid.pull_objects(["a"], lambda i: b"x", max_time=30)
    finally:
        grid_module._PULL_DEADLINE.reset(token)  # noqa: SLF001
    assert calls[-1]["max_time"] == 0.0  # one try per object, no retries
