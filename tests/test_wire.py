"""Weights on the wire: int8 with a scale per row within half a step, differences from the weights
sent, float16, self-describing records, clear errors, and a quarter of the bytes."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from common.wire import PACKED_LAYOUT, PACKED_PREFIX, SCALE_SUFFIX, WIRE, WireError, content_bytes, decode, encode, is_delta, received, wire_config


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"proj.weight": torch.randn(64, 512, generator=g) * 0.02, "proj.bias": torch.randn(64, generator=g),
            "seq": torch.randn(3, 16, 128, generator=g), "steps": torch.tensor([7], dtype=torch.int64)}


def test_int8_is_within_half_a_step_of_each_row_and_small_or_integer_tensors_pass_as_they_are():
    w = weights()
    record = encode(w, "int8", packed=False)
    assert record["proj.weight"].dtype == "int8" and "proj.weight" + SCALE_SUFFIX in record
    back = decode(record)
    for name, t in decode(encode(w, "int8")).items():  # the packed wire form decodes to the same tensors
        assert torch.equal(t, back[name]) and t.dtype == back[name].dtype, name
    assert set(back) == set(w)
    for name in ("proj.weight", "seq"):
        rows = w[name].reshape(-1, w[name].shape[-1])
        step = rows.abs().amax(1, keepdim=True) / 127
        err = (back[name].reshape(rows.shape) - rows).abs()
        assert bool((err <= step / 2 + 1e-7).all()), name
    assert torch.equal(back["proj.bias"], w["proj.bias"])  # 64 values: kept float32
    assert torch.equal(back["steps"], w["steps"])
    assert received(w, "int8")["proj.weight"].dtype == torch.float32


def test_a_difference_from_the_weights_sent_comes_back_far_more_precisely_than_the_weights():
    sent = received(weights(0), "int8")  # what the node decoded
    trained = {k: (v + 1e-3 * torch.randn_like(v.float()).to(v.dtype)) if v.is_floating_point() else v
               for k, v in sent.items()}
    as_delta = decode(encode(trained, "int8", base=sent), base=sent)
    as_weights = decode(encode(trained, "int8"))
    err_delta = (as_delta["proj.weight"] - trained["proj.weight"]).abs().max()
    err_plain = (as_weights["proj.weight"] - trained["proj.weight"]).abs().max()
    assert err_delta < err_plain / 5
    assert torch.equal(as_delta["steps"], trained["steps"])


def test_float16_and_float32_codecs():
    w = weights()
    half = encode(w, "float16", packed=False)
    assert half["proj.weight"].dtype == "float16"
    assert torch.allclose(decode(half)["proj.weight"], w["proj.weight"], atol=1e-4)
    assert torch.equal(decode(encode(w, "float32"))["seq"], w["seq"])


def test_bad_records_and_bases_are_errors_that_name_the_tensor():
    w = weights()
    with pytest.raises(WireError, match="codec"):
        encode(w, "int4")
    with pytest.raises(WireError, match="proj.weight"):
        encode(w, "int8", base={"seq": w["seq"]})
    with pytest.raises(WireError, match="seq"):
        decode(encode(w, "int8"), base={"proj.weight": w["proj.weight"], "proj.bias": w["proj.bias"]})
    broken = encode(w, "int8", packed=False).to_torch_state_dict()
    broken["proj.weight" + SCALE_SUFFIX] = torch.ones(3)
    with pytest.raises(WireError, match="proj.weight"):
        decode(ArrayRecord(broken))


def test_a_packed_record_holds_one_buffer_per_dtype_and_its_layout_and_bad_layouts_are_named_errors():
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    w = {f"layer{i}.weight": torch.randn(32, 64) for i in range(40)} | {"steps": torch.tensor([3])}
    record = encode(w, "int8")
    assert sorted(record) == sorted([PACKED_LAYOUT] + [PACKED_PREFIX + k for k in ("float32", "int8", "int64")])
    per_tensor = encode(w, "int8", packed=False)
    # Flower moves each array (and each chunk) as one object: packed, a handful instead of ~two per tensor
    assert len(get_all_nested_objects(record)) < 10 < 80 < len(get_all_nested_objects(per_tensor))
    assert content_bytes(RecordDict({"a": record})) < 1.05 * content_bytes(RecordDict({"a": per_tensor}))
    assert decode(record).keys() == w.keys() and torch.equal(decode(record)["steps"], w["steps"])
    state = record.to_torch_state_dict()
    short = dict(state, **{PACKED_PREFIX + "int8": state[PACKED_PREFIX + "int8"][:100]})
    with pytest.raises(WireError, match=r"layer0.weight.*buffer \(100\)"):
        decode(ArrayRecord(short))
    with pytest.raises(WireError, match="layer0.weight.*missing"):
        decode(ArrayRecord({k: v for k, v in state.items() if k != PACKED_PREFIX + "int8"}))
    for bad in (bytes([255, 0, 1]), b"null", b'[["w", "int8", [-1], 0]]'):
        with pytest.raises(WireError, match="layout|negative"):
            decode(ArrayRecord(dict(state, **{PACKED_LAYOUT: torch.tensor(list(bad), dtype=torch.uint8)})))


def test_int8_takes_about_a_quarter_of_the_bytes_and_the_wire_record_says_what_was_sent():
    w = {"a": torch.randn(256, 1024), "b": torch.randn(512, 512)}
    full = content_bytes(RecordDict({"arrays": encode(w, "float32")}))
    small = content_bytes(RecordDict({"arrays": encode(w, "int8")}))
    assert small < 0.26 * full
    content = RecordDict({"arrays": encode(w, "int8"), WIRE: wire_config("int8", delta=True)})
    assert is_delta(content) and not is_delta(RecordDict({"arrays": encode(w, "int8")}))


def test_bytes_of_a_config_record_with_an_empty_list():
    """A node that withholds every class sends ``class-names = []``; Flower 1.41's own count fails on it."""
    from flwr.app import ConfigRecord

    assert content_bytes(RecordDict({"meta": ConfigRecord({"class-names": []}), "arrays": encode({"a": torch.ones(4)},
                                                                                                  "int8")})) > 0
