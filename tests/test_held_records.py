"""Records sent once: a node keeps the class targets and the global weights it received, says so in its
replies, and the server then sends only their hash; a node that lost them is an error that makes the
server send everything in full again; a restarted node finds them on its disk."""

from __future__ import annotations

import time

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MessageType, Metadata, RecordDict

from client_app.held import held, resolve, state_keys
from client_app.node_state import persist, restore
from common.records import ARRAYS, TARGETS, TARGETS_META, ClassTensors
from common.wire import BY_REFERENCE, HELD, WIRE, HeldRecordMissing, content_bytes, decode, encode, wire_config
from server_app.holdings import NodeHoldings


def shared_content(seed: int = 0) -> RecordDict:
    g = torch.Generator().manual_seed(seed)
    content = RecordDict({ARRAYS: encode({"w": torch.randn(64, 256, generator=g)}, "int8"),
                          WIRE: wire_config("int8", delta=False), "config": ConfigRecord({"server-round": 1})})
    t = torch.Generator().manual_seed(99)  # the targets stay the same all run
    ClassTensors(["dog", "rain"], torch.randn(2, 8, generator=t), torch.randn(2, 3, 16, generator=t)).to_records(
        content, TARGETS, TARGETS_META, half=True)
    return content


def to_node(content: RecordDict, node: int) -> Message:
    meta = Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=node, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=60, message_type=MessageType.TRAIN)
    return Message(content=content, metadata=meta)


def reply_from(node: int, content: RecordDict | None) -> Message:
    meta = Metadata(run_id=1, message_id="r", src_node_id=node, dst_node_id=0, reply_to_message_id="x", group_id="1",
                    created_at=time.time(), ttl=60, message_type=MessageType.TRAIN)
    if content is None:
        return Message(Error(code=2, reason="boom"), metadata=meta)
    return Message(content=content, metadata=meta)


def test_a_node_keeps_what_came_in_full_and_the_server_then_sends_only_hashes(tmp_path):
    server, state = NodeHoldings(), RecordDict()
    first = server.personalise([to_node(shared_content(), 5), to_node(shared_content(), 6)])
    assert all(BY_REFERENCE not in m.content and ARRAYS in m.content for m in first)  # nobody holds anything yet
    content, kept = resolve(first[0].content, state)
    assert sorted(kept) == sorted(state_keys())
    assert torch.equal(decode(content[ARRAYS])["w"], decode(first[0].content[ARRAYS])["w"])
    server.update([reply_from(5, RecordDict({HELD: held(state)}))])
    # the same records again: node 5 gets hashes only, node 6 (no reply yet) everything
    again = server.personalise([to_node(shared_content(), 5), to_node(shared_content(), 6)])
    assert set(again[0].content[BY_REFERENCE]) == {"targets", "weights"}
    assert ARRAYS not in again[0].content and TARGETS not in again[0].content
    assert ARRAYS in again[1].content
    assert content_bytes(again[0].content) < 0.05 * content_bytes(again[1].content)
    filled, kept = resolve(again[0].content, state)
    assert kept == []
    assert torch.equal(decode(filled[ARRAYS])["w"], decode(first[0].content[ARRAYS])["w"])
    assert ClassTensors.from_records(filled, TARGETS, TARGETS_META).class_names == ["dog", "rain"]
    assert dict(filled[WIRE]) == {"codec": "int8", "delta": False}
    # new weights (next round): only the unchanged targets go by reference
    changed = server.personalise([to_node(shared_content(seed=1), 5)])[0]
    assert set(changed.content[BY_REFERENCE]) == {"targets"} and ARRAYS in changed.content


def test_a_node_that_lost_its_records_fails_clearly_and_then_gets_everything_again(tmp_path):
    server, state = NodeHoldings(), RecordDict()
    _, _ = resolve(server.personalise([to_node(shared_content(), 5)])[0].content, state)
    server.update([reply_from(5, RecordDict({HELD: held(state)}))])
    by_ref = server.personalise([to_node(shared_content(), 5)])[0]
    with pytest.raises(HeldRecordMissing, match="targets|weights"):
        resolve(by_ref.content, RecordDict())  # a SuperNode restarted without its disk
    server.update([reply_from(5, None)])  # its error reply
    assert BY_REFERENCE not in server.personalise([to_node(shared_content(), 5)])[0].content


def test_a_restarted_node_reads_its_held_records_back_from_disk(tmp_path):
    server, state = NodeHoldings(), RecordDict()
    _, kept = resolve(server.personalise([to_node(shared_content(), 5)])[0].content, state)
    persist(state, tmp_path, tuple(kept), server_round=1)
    server.update([reply_from(5, RecordDict({HELD: held(state)}))])
    by_ref = server.personalise([to_node(shared_content(), 5)])[0]
    fresh = RecordDict()
    assert sorted(restore(fresh, tmp_path, state_keys(), server_round=2)) == sorted(state_keys())
    filled, _ = resolve(by_ref.content, fresh)
    assert torch.equal(decode(filled[ARRAYS])["w"], decode(shared_content()[ARRAYS])["w"])
    assert held(fresh) == held(state)
    assert "metrics" not in filled  # the message's own records only
