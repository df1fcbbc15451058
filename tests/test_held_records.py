"""Records sent once: a node keeps the class targets and the global weights it received, says so in its
replies, and the server then sends only their hash; a node that lost them says so and gets the message
in full within the same phase; a restarted node finds them on its disk, and never another run's."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from uuid import uuid4

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, Metadata, RecordDict

from client_app.app import evaluate, train
from client_app.held import held, resolve, state_keys
from client_app.node_state import DiskState, claim, persist, restore, state_dir
from common.config import load_config
from common.records import ARRAYS, CONFIG, HELD_MISSING, METRICS, RUN_IDENTITY, TARGETS, TARGETS_META, ClassTensors
from common.wire import (BY_REFERENCE, HELD, WIRE, HeldRecordMissing, codec_of, content_bytes, decode, encode, is_delta,
                         wire_config)
from server_app.holdings import NodeHoldings, ResendInFull
from tests.test_client_app import data_root, run_config, server_content  # noqa: F401


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


# ------------------------------------------------------------------ one run's state, and a lost state mid-round
NODE = 7


class NodeGrid:
    """A Grid whose node is this process's ClientApp: pushing a message runs the handler on the node's
    Context (``contexts[dst]``), as a SuperNode would; every message pushed is kept in ``pushed``."""

    def __init__(self, contexts: dict[int, Context]) -> None:
        self.contexts, self.pushed = contexts, []

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex  # what Flower's Grid does on push
            self.pushed.append(msg)
            handler = train if msg.metadata.message_type == MessageType.TRAIN else evaluate
            replies.append(handler(msg, self.contexts[msg.metadata.dst_node_id]))
        return replies


def node_message(cfg, server_round: int, run_name: str, identity: str, kind: str, shift: float = 0.0) -> Message:
    """The server's message of ``server_round`` to :data:`NODE`; ``shift`` moves its weights (another run's)."""
    content = server_content(cfg, server_round)
    if shift:
        content[ARRAYS] = ArrayRecord({k: v + shift for k, v in content[ARRAYS].to_torch_state_dict().items()})
    content[CONFIG]["run-name"] = run_name
    content[CONFIG][RUN_IDENTITY] = identity
    meta = Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=NODE, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=60, message_type=kind)
    return Message(content=content, metadata=meta)


def phase(holdings: NodeHoldings, grid, message: Message) -> list[Message]:
    """One phase as the strategy runs it: personalise, send through ``grid``, note what the node holds."""
    replies = list(grid.send_and_receive(holdings.personalise([message]), timeout=60))
    holdings.update(replies)
    return replies


@contextlib.contextmanager
def node_log(caplog):
    """The project's loggers do not propagate to the root logger (common.logs): capture them at theirs."""
    logger = logging.getLogger("client_app")
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def node_context(rc: dict, run_id: int = 1) -> Context:
    return Context(run_id=run_id, node_id=NODE, state=RecordDict(), run_config=rc,
                   node_config={"partition-id": 0, "num-partitions": 2})


def test_another_run_of_the_same_name_never_restores_this_nodes_state(data_root, tmp_path, caplog):  # noqa: F811
    """The reported bug: after ``rm -rf outputs`` a new 'run1' restored the first run1's held weights of a
    later round from <cache-dir>/node-state/run1/, and its round 2 lost the node. The state folder now
    belongs to one run identity: another one's files are removed before anything is read."""
    rc = run_config(data_root, tmp_path, **{"num-rounds": 5})
    cfg = load_config(rc)
    contexts = {NODE: node_context(rc)}
    grid = NodeGrid(contexts)
    first = NodeHoldings()
    for r in (1, 2, 3):  # the first run1 stops after round 3: its node keeps the weights of rounds 2 and 3
        for kind in (MessageType.TRAIN, MessageType.EVALUATE):
            phase(first, grid, node_message(cfg, r, "run1", "first", kind, shift=float(r)))
    folder = state_dir(tmp_path, "run1", 0)
    assert (folder / "held-weights_round_2.safetensors").is_file()

    contexts[NODE] = node_context(rc, run_id=2)  # a new flwr run of the same name, other weights
    second = NodeHoldings()
    with node_log(caplog):
        for kind in (MessageType.TRAIN, MessageType.EVALUATE):
            phase(second, grid, node_message(cfg, 1, "run1", "second", kind))
    assert any("another run of this name" in r.getMessage() for r in caplog.records)
    assert not (folder / "held-weights_round_2.safetensors").exists()
    reply = phase(second, grid, node_message(cfg, 2, "run1", "second", MessageType.TRAIN))[0]
    assert set(grid.pushed[-1].content[BY_REFERENCE]) == {"targets", "weights"}  # it said it holds them ...
    assert HELD_MISSING not in reply.content and reply.content[METRICS]["num-examples"] > 0  # ... and it does


def test_a_node_that_lost_its_records_gets_them_in_full_within_the_same_phase(data_root, tmp_path):  # noqa: F811
    """A SuperNode restarted without its disk between two phases: its message by reference gets a
    ``held-missing`` reply, the same message goes again in full, and the phase has the node's real reply."""
    rc = run_config(data_root, tmp_path)
    cfg = load_config(rc)
    contexts = {NODE: node_context(rc)}
    holdings, nodes = NodeHoldings(), NodeGrid(contexts)
    grid = ResendInFull(nodes, holdings.resend)
    phase(holdings, grid, node_message(cfg, 1, "run-lost", "x", MessageType.TRAIN))
    assert set(holdings.by_node[NODE]) == {"targets", "weights"}
    shutil.rmtree(tmp_path / "node-state")  # the node's disk is gone, and so is its Context
    contexts[NODE] = node_context(rc)
    replies = phase(holdings, grid, node_message(cfg, 1, "run-lost", "x", MessageType.EVALUATE))
    first, again = nodes.pushed[-2:]
    assert BY_REFERENCE in first.content and BY_REFERENCE not in again.content and ARRAYS in again.content
    assert len(replies) == 1 and HELD_MISSING not in replies[0].content
    assert replies[0].content[METRICS]["num-examples"] > 0  # the node's evaluation, in this phase
    assert set(holdings.by_node[NODE]) == {"targets", "weights"}  # and it holds the records again
    # once per phase: a node that asks again is not sent a third message
    asks = Message(content=RecordDict({HELD_MISSING: ConfigRecord({"records": ["weights"]})}), reply_to=again)
    assert holdings.resend(asks) is None


def test_a_state_folder_holds_one_run_and_a_file_of_another_run_is_never_loaded(tmp_path, caplog):
    state = RecordDict({"held-weights": ArrayRecord({"w": torch.ones(3)})})
    persist(state, tmp_path, ("held-weights",), 2, identity="a")
    assert DiskState(tmp_path, "b").restore(RecordDict(), ("held-weights",), 3) == []  # the file says run a
    assert DiskState(tmp_path, "a").restore(RecordDict(), ("held-weights",), 3) == ["held-weights"]
    assert claim(tmp_path, "a") == ["held-weights_round_2.safetensors"]  # no folder identity: not trusted
    persist(state, tmp_path, ("held-weights",), 2, identity="a")
    assert claim(tmp_path, "a") == []  # the folder is run a's now
    with node_log(caplog):
        assert claim(tmp_path, "b") == ["held-weights_round_2.safetensors"]
    assert "another run of this name" in caplog.text and not list(tmp_path.glob("*.safetensors"))


def test_a_reply_to_weights_sent_by_reference_is_in_the_servers_codec(data_root, tmp_path):  # noqa: F811
    """The codec travels with the weights (their ``wire`` record), so it is read after the held records are
    filled in: when the weights come by reference the node still answers in the server's int8, as a
    difference from them (a regression caught by the per-round accuracy: it once answered in float32)."""
    rc = run_config(data_root, tmp_path)
    cfg = load_config(rc)
    grid, holdings = NodeGrid({NODE: node_context(rc)}), NodeHoldings()

    def int8(kind: str, server_round: int) -> Message:
        msg = node_message(cfg, server_round, "run-codec", "x", kind)
        msg.content[ARRAYS] = encode(msg.content[ARRAYS], "int8")
        msg.content[WIRE] = wire_config("int8", delta=False)
        return msg

    first = phase(holdings, grid, int8(MessageType.TRAIN, 1))[0]
    phase(holdings, grid, int8(MessageType.EVALUATE, 1))
    again = phase(holdings, grid, int8(MessageType.TRAIN, 2))[0]
    assert "weights" in grid.pushed[-1].content[BY_REFERENCE]
    for reply in (first, again):
        assert codec_of(reply.content) == "int8" and is_delta(reply.content)
