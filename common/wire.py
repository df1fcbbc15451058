"""What tensors look like on the wire: float32, float16, or int8 with one scale per row.

Why: the default adapters are 13.8 M parameters (55 MB in float32) and travel three times per node
and round (train down, train up, evaluate down); with a real AST and longer T5 sequences they grow.
Weights tolerate 8 bits per value when every row (the last axis) has its own scale: the error is at
most half a step, 1/254 of the row's largest magnitude. Uploads are smaller still in error: a node
sends the *difference* between its trained weights and the weights it received (``base``), whose
rows span far less than the weights themselves, and the server adds it back to what it sent.

Records that do not change between messages (the class targets all run; the global weights between
a round's evaluate message and the next round's train message) go to a node once: it keeps them
(:mod:`client_app.held`, on its disk too) and says so in every reply; the server then sends only
their hash (:mod:`server_app.holdings`).

A record is self-describing: an int8 tensor ``name`` comes with ``name::scale``
(:data:`SCALE_SUFFIX`; PyTorch names never hold ``::``), a float16 tensor is widened on decode, and
everything else passes as it is; the ``wire`` ConfigRecord of a message (:data:`WIRE`) says whether
the arrays are a difference. Small tensors (under :data:`MIN_INT8_VALUES` values: biases, norms)
stay float32 under the int8 codec, where 8 bits would save nothing worth their error.

On the wire those tensors are **packed**: one flat buffer per dtype (:data:`PACKED_PREFIX`) plus a
layout (:data:`PACKED_LAYOUT`, JSON in a uint8 array: name, dtype, shape, offset of each tensor).
Why: Flower moves every array of a record as its own object (and every 5 MB chunk as another), one
HTTP request per object and hop; the default adapters' 80 int8 arrays and scales made 122 objects
per message, and in a loopback deployment the requests, not the bytes, took most of a round.
Packed, a message holds a handful of objects. :func:`decode` reads packed and per-tensor records.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import Tensor

from common.records import ARRAYS, TARGETS, TARGETS_META, RecordError

CODECS = ("float32", "float16", "int8")
WIRE = "wire"  # ConfigRecord of a message: {"codec": str, "delta": bool}
# Records a node keeps between messages, so the server can send them by reference (server_app.holdings,
# client_app.held): name -> the message records that make it up.
HELD_RECORDS = {"targets": (TARGETS, TARGETS_META), "weights": (ARRAYS, WIRE)}
HASHES = "record-hashes"  # ConfigRecord of a message: {name: hash} of the held records it refers to or carries
BY_REFERENCE = "by-reference"  # ConfigRecord of a message: {name: hash} of records left out (the node holds them)
HELD = "held"  # ConfigRecord of a reply: {name: hash} of what the node now holds
SCALE_SUFFIX = "::scale"
MIN_INT8_VALUES = 1024
PACKED_LAYOUT = "::layout"  # uint8 array: JSON [[name, dtype, shape, offset], ...]
PACKED_PREFIX = "::packed::"  # + dtype name ("int8", "float32", ...): the tensors of that dtype, flat


class WireError(ValueError):
    """A record that cannot be decoded (names the tensor)."""


class HeldRecordMissing(RecordError):
    """The server sent a record by reference that this node does not hold (its state was lost)."""


def _int8(t: Tensor) -> tuple[Tensor, Tensor]:
    rows = t.detach().float().reshape(-1, t.shape[-1])
    scale = rows.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(t.shape), scale


def pack(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Tensors -> one flat buffer per dtype plus their layout (see the module docstring)."""
    layout: list[list] = []
    flat: dict[str, list[Tensor]] = {}
    sizes: dict[str, int] = {}
    for name, t in state.items():
        kind = str(t.dtype).removeprefix("torch.")
        layout.append([name, kind, list(t.shape), sizes.get(kind, 0)])
        flat.setdefault(kind, []).append(t.detach().cpu().reshape(-1))
        sizes[kind] = sizes.get(kind, 0) + t.numel()
    out = {PACKED_PREFIX + kind: torch.cat(parts) for kind, parts in flat.items()}
    out[PACKED_LAYOUT] = torch.tensor(list(json.dumps(layout).encode()), dtype=torch.uint8)
    return out


def unpack(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of a packed record (a record without a layout is returned as it is)."""
    if PACKED_LAYOUT not in state:
        return dict(state)
    try:
        layout = json.loads(bytes(state[PACKED_LAYOUT].to(torch.uint8).tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WireError(f"wire record: unreadable '{PACKED_LAYOUT}' ({err})") from None
    if not isinstance(layout, list):
        raise WireError(f"wire record: '{PACKED_LAYOUT}' is not a list of tensors")
    out: dict[str, Tensor] = {}
    for entry in layout:
        try:
            name, kind, shape, offset = str(entry[0]), str(entry[1]), [int(d) for d in entry[2]], int(entry[3])
        except (TypeError, ValueError, IndexError):
            raise WireError(f"wire record: bad layout entry {entry!r}") from None
        if any(d < 0 for d in shape):
            raise WireError(f"wire record: '{name}' has a negative dimension in {tuple(shape)}")
        buffer = state.get(PACKED_PREFIX + kind)
        numel = int(torch.Size(shape).numel())
        if buffer is None or offset < 0 or offset + numel > buffer.numel():
            raise WireError(f"wire record: '{name}' ({kind}, {tuple(shape)} at {offset}) is not in the packed "
                            f"{kind} buffer ({'missing' if buffer is None else buffer.numel()})")
        out[name] = buffer[offset:offset + numel].reshape(shape).clone()
    return out


def encode(tensors: Mapping[str, Tensor] | ArrayRecord, codec: str, base: Mapping[str, Tensor] | None = None,
           packed: bool = True) -> ArrayRecord:
    """``tensors`` (minus ``base`` when given: a difference) in ``codec``; non-float tensors pass unchanged.

    ``packed`` (the wire form): a few flat buffers and a layout instead of one array per tensor.
    """
    if codec not in CODECS:
        raise WireError(f"wire codec must be one of {CODECS}, got {codec!r}")
    state = tensors.to_torch_state_dict() if isinstance(tensors, ArrayRecord) else dict(tensors)
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        t = t.detach().cpu()
        if not t.is_floating_point():
            out[name] = t
            continue
        if base is not None:
            if name not in base or tuple(base[name].shape) != tuple(t.shape):
                raise WireError(f"wire delta: no base tensor '{name}' of shape {tuple(t.shape)}")
            t = t.float() - base[name].detach().cpu().float()
        if codec == "int8" and t.dim() >= 1 and t.numel() >= MIN_INT8_VALUES:
            out[name], out[name + SCALE_SUFFIX] = _int8(t)
        elif codec == "float16":
            out[name] = t.to(torch.float16)
        else:
            out[name] = t.float()
    return ArrayRecord(pack(out) if packed else out)


def decode(record: ArrayRecord, base: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """float32 tensors of an encoded record, packed or not (``base`` added back to a difference)."""
    state = unpack(record.to_torch_state_dict())
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in state:
                raise WireError(f"wire record: scale '{name}' without its tensor")
            continue
        scale = state.get(name + SCALE_SUFFIX)
        if scale is not None:
            if t.dtype != torch.int8 or scale.numel() != t.numel() // max(1, t.shape[-1]):
                raise WireError(f"wire record: '{name}' ({t.dtype}, {tuple(t.shape)}) does not match its scale "
                                f"({scale.numel()} rows)")
            t = (t.float().reshape(-1, t.shape[-1]) * scale.float()[:, None]).reshape(t.shape)
        elif t.is_floating_point():
            t = t.float()
        if base is not None and t.is_floating_point():
            if name not in base or tuple(base[name].shape) != tuple(t.shape):
                raise WireError(f"wire delta: no base tensor '{name}' of shape {tuple(t.shape)}")
            t = base[name].detach().cpu().float() + t
        out[name] = t
    return out


def received(tensors: Mapping[str, Tensor] | ArrayRecord, codec: str) -> dict[str, Tensor]:
    """Exactly what the other side decodes from ``encode(tensors, codec)`` (the base of its reply)."""
    return decode(encode(tensors, codec))


def wire_config(codec: str, delta: bool) -> ConfigRecord:
    return ConfigRecord({"codec": codec, "delta": bool(delta)})


def is_delta(content: RecordDict) -> bool:
    """Whether a message's arrays are a difference from what the receiver sent (its ``wire`` record)."""
    return bool(content[WIRE].get("delta", False)) if WIRE in content else False  # type: ignore[union-attr]


def codec_of(content: RecordDict, default: str = "float32") -> str:
    """The codec the sender chose (``float32`` for a message without a ``wire`` record)."""
    return str(content[WIRE].get("codec", default)) if WIRE in content else default  # type: ignore[union-attr]


def _record_bytes(record: object) -> int:
    try:
        return int(record.count_bytes())  # type: ignore[attr-defined]
    except (IndexError, TypeError, ValueError):  # Flower 1.41's ConfigRecord.count_bytes fails on an empty list
        return sum(len(str(k)) + len(json.dumps(v, default=str)) for k, v in record.items())  # type: ignore[attr-defined]


def content_bytes(content: RecordDict) -> int:
    """Bytes of every record in a message, as Flower counts them (data plus keys)."""
    return sum(_record_bytes(record) for record in content.values() if hasattr(record, "count_bytes"))
