"""What tensors look like on the wire: float32, float16, or int8 with one scale per row.

Why: the adapters are most of a round's bytes and travel three times per node and round (train down, train up, evaluate down); with a real AST and longer T5 sequences they grow.
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
import math
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


# Bounds of a packed layout: a node's reply is hostile until parsed (server_app.validation).
MAX_LAYOUT_BYTES = 1 << 20  # JSON text of the layout
MAX_TENSORS = 4096  # entries of one layout
MAX_NAME_CHARS = 512
MAX_DIMS = 8
MAX_DIM = 1 << 40  # any one dimension (Python ints: nothing here can overflow)
DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64", "int8", "uint8",
                                                   "int16", "int32", "int64", "bool")}


def _layout_entries(state: Mapping[str, Tensor]) -> list[tuple[str, str, tuple[int, ...], int]]:
    """The layout of a packed record, parsed totally: every entry ``[name, dtype, shape, offset]`` with a
    string name, a known dtype, integer dimensions (JSON numbers that are not integers, ``Infinity`` and
    booleans are refused) and an integer offset; anything else is a :class:`WireError`. The schema is
    flat (depth 3), so deeper JSON is refused; JSON nested beyond Python's recursion limit too."""
    raw = state[PACKED_LAYOUT]
    if raw.dtype != torch.uint8 or raw.dim() != 1:
        raise WireError(f"wire record: '{PACKED_LAYOUT}' must be a 1-D uint8 array, got {raw.dtype} {tuple(raw.shape)}")
    if raw.numel() > MAX_LAYOUT_BYTES:
        raise WireError(f"wire record: '{PACKED_LAYOUT}' is {raw.numel()} bytes, at most {MAX_LAYOUT_BYTES}")
    try:
        layout = json.loads(raw.numpy().tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WireError(f"wire record: unreadable '{PACKED_LAYOUT}' ({err})") from None
    except RecursionError:
        raise WireError(f"wire record: '{PACKED_LAYOUT}' is nested too deeply") from None
    if not isinstance(layout, list):
        raise WireError(f"wire record: '{PACKED_LAYOUT}' is not a list of tensors")
    if len(layout) > MAX_TENSORS:
        raise WireError(f"wire record: '{PACKED_LAYOUT}' lists {len(layout)} tensors, at most {MAX_TENSORS}")
    entries = []
    for entry in layout:
        if not (isinstance(entry, list) and len(entry) == 4):
            raise WireError(f"wire record: layout entry {_short(entry)} is not [name, dtype, shape, offset]")
        name, kind, shape, offset = entry
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            raise WireError(f"wire record: layout entry {_short(entry)} has no valid name")
        if kind not in DTYPES:
            raise WireError(f"wire record: '{_short(name)}' has dtype {_short(kind)}, not one of {sorted(DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape)):
            raise WireError(f"wire record layout: '{_short(name)}' has shape {_short(shape)}: at most {MAX_DIMS} "
                            f"non-negative integer dimensions, each at most {MAX_DIM}")
        if not _is_int(offset) or offset < 0:
            raise WireError(f"wire record: '{_short(name)}' has offset {_short(offset)}: a non-negative integer")
        entries.append((name, kind, tuple(shape), offset))
    return entries


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object, limit: int = 80) -> str:
    """``value`` for an error message, cut short (a hostile name may be megabytes long)."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def unpack(state: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, Tensor]:
    """The tensors of a packed record (a record without a layout is returned as it is).

    Nothing is allocated before the whole layout is checked: names unique (and with ``expected``,
    name -> shape, each one of those names with that shape), ranges inside their buffer and not
    overlapping one another (so the tensors never weigh more than the buffers that came), every
    array of the record a buffer the layout uses. The tensors are views of the buffers, not copies.
    """
    if PACKED_LAYOUT not in state:
        return dict(state)
    entries = _layout_entries(state)
    used: dict[str, list[tuple[int, int, str]]] = {}
    names: set[str] = set()
    for name, kind, shape, offset in entries:
        if name in names:
            raise WireError(f"wire record: '{_short(name)}' is listed twice in the layout")
        names.add(name)
        if expected is not None:
            if name not in expected:
                raise WireError(f"wire record: unexpected tensor '{_short(name)}'")
            if shape != tuple(expected[name]):
                raise WireError(f"wire record: '{name}' has shape {shape}, expected {tuple(expected[name])}")
        buffer = state.get(PACKED_PREFIX + kind)
        numel = math.prod(shape)
        if buffer is not None and (buffer.dim() != 1 or buffer.dtype != DTYPES[kind]):
            raise WireError(f"wire record: the packed {kind} buffer is {buffer.dtype} {tuple(buffer.shape)}, not 1-D {kind}")
        if buffer is None or offset + numel > buffer.numel():
            raise WireError(f"wire record: '{_short(name)}' ({kind}, {shape} at {offset}) is not in the packed "
                            f"{kind} buffer ({'missing' if buffer is None else buffer.numel()})")
        used.setdefault(kind, []).append((offset, numel, name))
    for kind, ranges in used.items():
        ranges.sort()
        for (start, size, name), (next_start, _, other) in zip(ranges, ranges[1:]):
            if start + size > next_start:
                raise WireError(f"wire record: '{_short(name)}' and '{_short(other)}' overlap in the {kind} buffer")
    extra = sorted(set(state) - {PACKED_LAYOUT} - {PACKED_PREFIX + k for k in used})
    if extra:
        raise WireError(f"wire record: arrays {[_short(e) for e in extra[:3]]} are not used by the layout")
    return {name: state[PACKED_PREFIX + kind][offset:offset + math.prod(shape)].view(shape)
            for name, kind, shape, offset in entries}


def expected_names(template: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The names (and shapes) an encoded record of ``template`` (name -> shape) may hold: every tensor,
    plus the ``::scale`` of each that has at least one dimension (an int8 tensor's row scales)."""
    out = {name: tuple(shape) for name, shape in template.items()}
    for name, shape in template.items():
        if len(shape) >= 1:
            out[name + SCALE_SUFFIX] = (math.prod(shape[:-1]),)
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


def record_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    """A record's arrays as tensors; arrays that do not deserialise (bytes another site crafted) are a
    :class:`WireError`, whatever Flower's or numpy's reader raised on them."""
    try:
        return record.to_torch_state_dict()
    except Exception as err:  # noqa: BLE001 - hostile bytes: numpy/Flower raise many kinds of errors on them
        raise WireError(f"wire record: arrays do not deserialise ({type(err).__name__}: {_short(str(err))})") from None


def decode(record: ArrayRecord, base: Mapping[str, Tensor] | None = None,
           expected: Mapping[str, tuple[int, ...]] | None = None, max_abs: float | None = None) -> dict[str, Tensor]:
    """float32 tensors of an encoded record, packed or not (``base`` added back to a difference).

    ``expected`` (name -> shape: the model the record must be): exactly those tensors, checked in the
    layout before anything is allocated; ``max_abs``: every decoded value finite and at most this in
    magnitude (a finite 1e38 overflows later). Either failing is a :class:`WireError` naming the tensor.
    """
    allowed = expected_names(expected) if expected is not None else None
    state = record_tensors(record)
    if PACKED_LAYOUT in state:
        state = unpack(state, allowed)
    elif allowed is not None:
        for name, t in state.items():
            if name not in allowed or tuple(t.shape) != allowed[name]:
                raise WireError(f"wire record: unexpected tensor '{_short(name)}' {tuple(t.shape)}")
    if expected is not None:
        missing = sorted(set(expected) - set(state))
        if missing:
            raise WireError(f"wire record: lacks tensors {missing[:3]}")
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in state:
                raise WireError(f"wire record: scale '{_short(name)}' without its tensor")
            continue
        scale = state.get(name + SCALE_SUFFIX)
        if scale is not None:
            if t.dtype != torch.int8 or t.dim() < 1 or scale.dim() != 1 or scale.numel() != t.numel() // max(1, t.shape[-1]):
                raise WireError(f"wire record: '{name}' ({t.dtype}, {tuple(t.shape)}) does not match its scale "
                                f"({tuple(scale.shape)})")
            t = (t.float().reshape(-1, t.shape[-1]) * scale.float()[:, None]).reshape(t.shape)
        elif t.is_floating_point():
            t = t.float()
        elif expected is not None:
            raise WireError(f"wire record: '{name}' is {t.dtype} without a scale, expected floating point weights")
        if base is not None and t.is_floating_point():
            if name not in base or tuple(base[name].shape) != tuple(t.shape):
                raise WireError(f"wire delta: no base tensor '{_short(name)}' of shape {tuple(t.shape)}")
            t = base[name].detach().cpu().float() + t
        if max_abs is not None and t.is_floating_point() and t.numel():
            peak = float(t.abs().max())  # nan propagates through max, inf stays inf
            if not math.isfinite(peak) or peak > max_abs:
                raise WireError(f"wire record: '{name}' holds a value of magnitude {peak:g} (finite and at most "
                                f"{max_abs:g} expected)")
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
