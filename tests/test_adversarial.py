"""No site can crash or steer the server: every crafted reply of issue 23 ends accepted or rejected
with a reason, the robust aggregators resist one hostile node of five, and a property-based fuzz of
the parser and of ``aggregate_train`` / ``aggregate_evaluate`` finds nothing that escapes."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from flwr.app import ArrayRecord, MessageType, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.records import CLASS_MEANS, CLASS_MEANS_META, ClassTensors
from common.wire import PACKED_LAYOUT, PACKED_PREFIX, WireError, decode, encode, unpack
from hostile_replies import (ACFG, NAMES, as_reply, bank_content, honest_content, honest_means, reply_contents,
                             server, with_layout)
from server_app.quorum import QuorumError
from server_app.round_state import parse_train_reply
from server_app.identity import PartitionOwners
from server_app.validation import Rejected
from common.models.adapters import Adapters

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def rejected_reason(strategy, content) -> str:
    """The reason the strategy rejects a single bad reply next to two honest ones (the round goes on)."""
    replies = [as_reply(honest_content(0), 100), as_reply(honest_content(1), 101), as_reply(content, 102)]
    strategy.aggregate_train(1, replies)
    state = strategy.state
    assert sorted(state.replies.nodes) == [0, 1], state.replies.rejected
    assert len(state.replies.rejected) == 1
    return state.replies.rejected[0]


# ---------------------------------------------------------------------------- crashes of the issue
@pytest.mark.parametrize("layout, reason", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('[["clip.out.1.weight", "int8", [4611686018427387904], 0]]', "shape"),
    ('[["clip.out.1.weight", "int8", [6, 16], Infinity]]', "offset"),
    ('[["clip.out.1.weight", "int8", [6, 16], 1e400]]', "offset"),
    ('[["clip.out.1.weight", "int8", [6.0, 16], 0]]', "shape"),
])
def test_a_malformed_layout_is_rejected_with_a_reason_and_the_round_goes_on(tmp_path, layout, reason):
    assert reason in rejected_reason(server(tmp_path), with_layout(honest_content(2), layout))


def test_a_zero_dim_int8_tensor_with_a_scale_and_zero_dim_class_means_are_rejected(tmp_path):
    state = {"w": torch.zeros((), dtype=torch.int8), "w::scale": torch.ones(())}
    with pytest.raises(WireError, match="scale"):
        decode(ArrayRecord(state))
    content = honest_content(2)
    content[CLASS_MEANS] = ArrayRecord({"clip": torch.zeros(()), "t5": torch.zeros(()), "counts": torch.zeros((), dtype=torch.int64)})
    assert "shape" in rejected_reason(server(tmp_path), content)


def test_aliased_ranges_cannot_amplify_memory():
    """Two names over one buffer range would unpack into twice the bytes that came: refused, and the
    tensors that are accepted are views of the buffer, not copies."""
    w = {"a": torch.randn(64, 64), "b": torch.randn(64, 64)}
    state = encode(w, "float32").to_torch_state_dict()
    aliased = dict(state, **{PACKED_LAYOUT: torch.tensor(list(json.dumps(
        [["a", "float32", [64, 64], 0], ["b", "float32", [64, 64], 0]]).encode()), dtype=torch.uint8)})
    with pytest.raises(WireError, match="overlap"):
        unpack(aliased)
    out = unpack(state)
    assert out["b"].untyped_storage().data_ptr() == state[PACKED_PREFIX + "float32"].untyped_storage().data_ptr()
    with pytest.raises(WireError, match="unexpected tensor 'b'"):
        unpack(state, expected={"a": (64, 64)})  # names checked against the model before anything is built


def test_weights_that_are_finite_but_huge_are_rejected(tmp_path):
    adapters = Adapters(ACFG)
    with torch.no_grad():
        next(iter(adapters.parameters())).fill_(1e38)
    assert "magnitude" in rejected_reason(server(tmp_path), honest_content(2, adapters, codec="float32"))


def test_generator_metadata_must_equal_the_servers_spec_before_anything_is_built(tmp_path):
    for change, word in (({"hidden_dim": 10**7}, "hidden_dim"), ({"tokens": 3}, "tokens")):
        assert word in rejected_reason(server(tmp_path), bank_content(honest_content(2), change))
    strategy = server(tmp_path)
    strategy.aggregate_train(1, [as_reply(bank_content(honest_content(0)), 100)])
    assert strategy.state.replies.banks  # the server's own spec is accepted


def test_inflated_and_wrapping_counts_are_rejected(tmp_path):
    n = 10**12
    assert "num-examples" in rejected_reason(server(tmp_path), honest_content(2, n=n, means=honest_means(n)))
    big = 2**63 - 1
    means = ClassTensors(NAMES, torch.zeros(3, 6), torch.zeros(3, 2, 5), torch.tensor([big, big, 14]))
    assert "count" in rejected_reason(server(tmp_path), honest_content(2, n=12, means=means))


def test_metrics_out_of_bounds_are_rejected(tmp_path):
    for metrics, word in (({"train_loss": 1e300}, "bounds"), ({"test_retrieval_acc": 1.5}, "accuracy"),
                          ({"num_val": 10**9}, "num_val")):
        assert word in rejected_reason(server(tmp_path), honest_content(2, metrics=metrics))


def test_a_reply_over_the_size_cap_is_rejected_before_decoding(tmp_path):
    strategy = server(tmp_path, **{"robust.max-reply-mb": 0.001})
    with pytest.raises(QuorumError, match="robust.max-reply-mb"):
        strategy.aggregate_train(1, [as_reply(honest_content(0), 100)])


def test_evaluate_replies_get_the_identity_checks(tmp_path):
    strategy = server(tmp_path)
    strategy.aggregate_train(1, [as_reply(honest_content(0), 100), as_reply(honest_content(1), 101)])
    strategy.connected = {100, 101, 102}
    evaluate = [as_reply(RecordDict({"metrics": MetricRecord({"num-examples": 4, "partition_id": p,
                                                              "test_retrieval_acc": 0.5})}), node, MessageType.EVALUATE)
                for p, node in ((0, 102), (0, 100), (1, 101))]
    strategy.asked["evaluate"] = 3
    strategy.aggregate_evaluate(1, evaluate)
    assert sorted(strategy.state.evaluate_nodes) == ["0", "1"]
    assert "belongs to Flower node 100" in strategy.state.evaluate_failures[0]


# ---------------------------------------------------------------------------- bounded influence
def five_replies(hostile_weights=None, hostile_means=None, n_hostile=12):
    torch.manual_seed(0)
    honest = [Adapters(ACFG) for _ in range(4)]
    means = [honest_means() for _ in range(4)]
    replies = [as_reply(honest_content(p, honest[p], codec="float32", means=means[p]), 100 + p) for p in range(4)]
    hostile = honest_content(4, hostile_weights or Adapters(ACFG), n=n_hostile, codec="float32",
                             means=hostile_means or honest_means(n_hostile))
    return honest, means, replies + [as_reply(hostile, 104)]


@pytest.mark.parametrize("method", ["median", "trimmed-mean"])
def test_robust_aggregation_ignores_one_scaled_node_and_its_claimed_count(tmp_path, method):
    bad = Adapters(ACFG)
    with torch.no_grad():
        for p in bad.parameters():
            p.mul_(100)
    honest, means, replies = five_replies(bad, n_hostile=10**6, hostile_means=ClassTensors(
        NAMES, torch.full((3, 6), 1e3), torch.full((3, 2, 5), 1e3), torch.tensor([10**6 - 2, 1, 1])))
    strategy = server(tmp_path, aggregation=method)
    arrays, _ = strategy.aggregate_train(1, replies)
    key = "clip.out.1.weight"
    stacked = torch.stack([h.state_dict()[key] for h in honest])
    got = arrays.to_torch_state_dict()[key]
    assert bool(((got >= stacked.min(0).values - 1e-6) & (got <= stacked.max(0).values + 1e-6)).all())
    fedavg = server(tmp_path / "f")
    assert float(fedavg.aggregate_train(1, replies)[0].to_torch_state_dict()[key].abs().max()) > 10 * float(stacked.abs().max())
    honest_clip = torch.stack([m.clip for m in means])
    assert bool((strategy.state.global_means.clip <= honest_clip.max(0).values + 1e-6).all())


def test_update_clipping_bounds_one_node_under_fedavg(tmp_path):
    bad = Adapters(ACFG)
    with torch.no_grad():
        for p in bad.parameters():
            p.mul_(100)
    honest, _, replies = five_replies(bad)
    strategy = server(tmp_path, **{"robust.clip-norm": "median"})
    sent = Adapters(ACFG)
    strategy.sent_arrays = ArrayRecord({k: v.clone() for k, v in sent.state_dict().items()})
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clipped_updates"] >= 1
    diff = sum(float(((arrays.to_torch_state_dict()[k] - v) ** 2).sum()) for k, v in sent.state_dict().items()) ** 0.5
    assert diff <= metrics["clip_bound"] + 1e-4


def test_the_median_evaluation_is_not_moved_by_one_node(tmp_path):
    def evaluate(strategy, hostile_acc):
        strategy.aggregate_train(1, five_replies()[2])
        strategy.asked["evaluate"] = 5
        replies = [as_reply(RecordDict({"metrics": MetricRecord({"num-examples": 10**6 if p == 4 else 16,
                                                                 "partition_id": p,
                                                                 "test_retrieval_acc": hostile_acc if p == 4 else 0.8 + 0.01 * p})}),
                            100 + p, MessageType.EVALUATE) for p in range(5)]
        return strategy.aggregate_evaluate(1, replies)["test_retrieval_acc"], strategy.state.evaluate_median
    for hostile in (0.0, 1.0):
        weighted, median = evaluate(server(tmp_path), hostile)
        assert abs(weighted - hostile) < 0.01  # FedAvg's weighting follows the claimed test clips
        robust, _ = evaluate(server(tmp_path, **{"robust.evaluate": "median"}), hostile)
        assert 0.8 <= robust <= 0.83 and 0.8 <= median["test_retrieval_acc"] <= 0.83


# ---------------------------------------------------------------------------- property-based fuzz
@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    return server(tmp_path_factory.mktemp("fuzz"))


@FUZZ
@given(content=reply_contents())
def test_fuzz_the_reply_parser_accepts_or_rejects_with_a_reason(fuzz_server, content):
    strategy = fuzz_server
    strategy.validator.owners = PartitionOwners()
    try:
        parse_train_reply(as_reply(content, 100), strategy.validator, set(), None, strategy._decode_reply)
    except Rejected as err:
        assert str(err)


@settings(FUZZ, max_examples=50)
@given(contents=st.lists(reply_contents(), min_size=1, max_size=3), honest=st.integers(0, 2))
def test_fuzz_aggregate_train_and_evaluate_only_stop_on_the_quorum(fuzz_server, caplog, contents, honest):
    """Only the quorum error may stop a round, and no reply's parsing raises (the strategy's last guard
    logs such a fault at ERROR and rejects the reply: none may be logged)."""
    caplog.clear()
    strategy = fuzz_server
    strategy.validator.owners = PartitionOwners()
    replies = [as_reply(honest_content(10 + i), 200 + i) for i in range(honest)]
    replies += [as_reply(c, 100 + i) for i, c in enumerate(contents)]
    try:
        strategy.aggregate_train(1, replies)
    except QuorumError:
        assert honest == 0
    evaluate = [as_reply(RecordDict({"metrics": c["metrics"]}), 100 + i, MessageType.EVALUATE)
                for i, c in enumerate(contents)]
    try:
        strategy.aggregate_evaluate(1, evaluate)
    except QuorumError:
        pass
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-2000:]


# ---------------------------------------------------------------------------- identity
def test_pinned_partitions_keep_their_owner_across_resume_and_only_the_operator_moves_them(tmp_path):
    from ops.cli import main as cli
    from common.owners import OWNERS_FILE
    from server_app.identity import PartitionOwners

    path = tmp_path / OWNERS_FILE
    owners = PartitionOwners(path, pinned=True)
    assert owners.check(10, 0) is None
    owners.remember(10, 0)
    # a restarted node with the same key (the same Flower node id) keeps its partition; another is named
    resumed = PartitionOwners(path, pinned=True)
    assert resumed.check(10, 0, connected=set()) is None
    assert "pinned to Flower node 10" in resumed.check(99, 0, connected=set())  # even while the owner is offline
    assert cli(["owners", str(tmp_path), "--release", "0", "--set", "0=99"]) == 0
    moved = PartitionOwners(path, pinned=True)
    assert moved.check(99, 0) is None and "pinned to Flower node 99" in moved.check(10, 0)


def test_unpinned_partitions_pass_to_a_restarted_node_only_once_the_owner_left(caplog):
    from server_app.identity import PartitionOwners

    with caplog.at_level(logging.WARNING):
        owners = PartitionOwners()
    assert "not pinned" in caplog.text
    owners.remember(10, 0)
    assert "belongs to Flower node 10" in owners.check(11, 0, connected={10, 11})
    assert owners.check(11, 0, connected={11}) is None
    owners.remember(11, 0)
    assert "belongs to Flower node 11" in owners.check(10, 0, connected={10, 11})


def test_the_operators_mapping_wins_and_pins(tmp_path):
    from common.config import load_config
    from common.owners import OWNERS_FILE, load_owners
    from server_app.identity import PartitionOwners

    cfg = load_config({"robust": {"partition-owners": {"0": 1234}}})
    owners = PartitionOwners(tmp_path / OWNERS_FILE, assigned={int(p): n for p, n in cfg.robust.partition_owners.items()})
    assert owners.pinned and "pinned to Flower node 1234" in owners.check(99, 0, connected={99})
    assert load_owners(tmp_path / OWNERS_FILE) == {0: 1234}


def test_the_trimmed_evaluation_cuts_one_lying_node_of_five(tmp_path):
    strategy = server(tmp_path, **{"robust.evaluate": "trimmed"})
    strategy.aggregate_train(1, five_replies()[2])
    strategy.asked["evaluate"] = 5
    for hostile in (0.0, 1.0):
        replies = [as_reply(RecordDict({"metrics": MetricRecord({"num-examples": 10**6 if p == 4 else 16, "partition_id": p,
                                                                 "test_retrieval_acc": hostile if p == 4 else 0.8 + 0.01 * p})}),
                            100 + p, MessageType.EVALUATE) for p in range(5)]
        got = strategy.aggregate_evaluate(1, replies)["test_retrieval_acc"]
        assert 0.8 <= got <= 0.83
