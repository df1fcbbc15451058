"""Wire format: weighted FedAvg math, record round trips, metric aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.records import ClassTensors, RecordError, arrays_to_module, module_to_arrays
from server_app.metrics import aggregate_metrics


def test_weighted_fedavg_on_known_arrays():
    a = {"w": np.array([[1.0, 2.0]], dtype=np.float32), "b": np.array([0.0], dtype=np.float32)}
    b = {"w": np.array([[3.0, 6.0]], dtype=np.float32), "b": np.array([4.0], dtype=np.float32)}
    replies = [
        RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in a.items()}), "metrics": MetricRecord({"num-examples": 1})}),
        RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in b.items()}), "metrics": MetricRecord({"num-examples": 3})}),
    ]
    out = aggregate_arrayrecords(replies, "num-examples").to_torch_state_dict()
    np.testing.assert_allclose(out["w"].numpy(), [[2.5, 5.0]])
    np.testing.assert_allclose(out["b"].numpy(), [3.0])


def test_module_round_trip_and_mismatch():
    src = torch.nn.Linear(3, 2)
    dst = torch.nn.Linear(3, 2)
    arrays_to_module(module_to_arrays(src), dst)
    assert torch.equal(src.weight, dst.weight)
    with pytest.raises(RecordError, match="weight"):
        arrays_to_module(module_to_arrays(torch.nn.Linear(4, 2)), dst)


def test_class_tensors_round_trip():
    ct = ClassTensors(["dog", "rain"], torch.randn(2, 5), torch.randn(2, 3, 7), torch.tensor([4, 1]))
    content = RecordDict()
    ct.to_records(content, "class-means", "class-means-meta")
    back = ClassTensors.from_records(content, "class-means", "class-means-meta")
    assert back.class_names == ["dog", "rain"]
    assert torch.allclose(back.clip, ct.clip) and torch.allclose(back.t5, ct.t5)
    assert back.counts.tolist() == [4, 1]
    with pytest.raises(RecordError, match="targets"):
        ClassTensors.from_records(RecordDict(), "targets", "targets-meta")


def test_metric_aggregation_weights_and_ids():
    r1 = RecordDict({"m": MetricRecord({"num-examples": 10, "num_val": 1, "test_acc": 1.0, "val_acc": 0.0, "partition_id": 0})})
    r2 = RecordDict({"m": MetricRecord({"num-examples": 30, "num_val": 3, "test_acc": 0.0, "val_acc": 1.0, "partition_id": 1})})
    out = aggregate_metrics([r1, r2], "num-examples")
    assert out["test_acc"] == pytest.approx(0.25)
    assert out["val_acc"] == pytest.approx(0.75)
    assert out["num-examples"] == 40 and out["num_val"] == 4
    assert "partition_id" not in out
