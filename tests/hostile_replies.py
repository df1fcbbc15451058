"""Replies a buggy or hostile node could send, for the parser's tests and ``bench/adversarial.py``.

``server()`` builds a strategy exactly as the ServerApp does (validator with the config's limits, the
server's generator spec) over tiny adapters; ``honest_content`` is what a node's train handler sends;
``reply_contents()`` is a hypothesis strategy of hostile variants of it, one record type at a time
(packed and plain weights, class means, generator banks, metrics, configs).
"""

from __future__ import annotations

import functools
import json
import math
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from hypothesis import strategies as st

from common.config import load_config
from common.models.adapters import AdapterConfig, Adapters
from common.models.generators import GeneratorSpec
from common.generator_bank import bank_to_records
from common.records import CLASS_MEANS, CLASS_MEANS_META, GENERATORS, GENERATORS_META, ClassTensors, module_to_arrays
from common.wire import PACKED_LAYOUT, PACKED_PREFIX, WIRE, encode, wire_config
from server_app.pipeline import build_pipelines
from server_app.run_context import ServerRun
from server_app.strategy import FedA2VStrategy
from server_app.summary import RunSummary
from server_app.validation import ReplyLimits, ReplyValidator

ACFG = AdapterConfig(in_dim=8, in_tokens=2, clip_dim=6, t5_dim=5, t5_tokens=2, hidden_dim=16, heads=2, dropout=0.0)
NAMES = ["dog", "siren", "rain"]
GEN = {"generator.latent-dim": 4, "generator.hidden-dim": 8, "generator.num-layers": 1, "generator.token-dim": 0}


def server(tmp_path, **overrides) -> FedA2VStrategy:
    """A strategy as the ServerApp builds it (validator, limits, generator spec) over tiny adapters."""
    cfg = load_config({"num-rounds": 3, **GEN, **overrides})
    targets = ClassTensors(NAMES, torch.randn(3, 6), torch.randn(3, 2, 5))
    template = Adapters(ACFG)
    run = ServerRun(run_dir=tmp_path, targets=targets, template=template, adapter_config=ACFG.to_dict(),
                    config_hash="abc", num_rounds=3, device=torch.device("cpu"))
    pipelines = build_pipelines(cfg, run, RunSummary(tmp_path / "summary.json", {"classes": NAMES}))
    spec = GeneratorSpec.from_config(cfg.generator, ACFG.in_tokens, ACFG.in_dim).to_dict()
    validator = ReplyValidator(template.state_dict(), NAMES, ACFG.clip_dim, (ACFG.t5_tokens, ACFG.t5_dim),
                               ReplyLimits.from_config(cfg.robust), spec)
    return FedA2VStrategy(targets=targets, round_pipeline=pipelines.round, after_round=pipelines.after_round,
                          validator=validator, evaluate_metrics=cfg.robust.evaluate, trim_fraction=cfg.robust.trim_fraction, min_replies=1)


def honest_means(n: int = 12, names: list[str] | None = None) -> ClassTensors:
    names = names or NAMES
    counts = [n // len(names)] * len(names)
    counts[0] += n - sum(counts)
    return ClassTensors(list(names), torch.randn(len(names), 6), torch.randn(len(names), 2, 5), torch.tensor(counts))


def honest_content(pid: int, adapters: Adapters | None = None, n: int = 12, codec: str = "int8",
                   means: ClassTensors | None = None, metrics: dict | None = None) -> RecordDict:
    """What a node's train handler sends: weights in the codec, metrics, class means."""
    adapters = adapters or Adapters(ACFG)
    content = RecordDict({
        "arrays": encode(module_to_arrays(adapters), codec),
        "metrics": MetricRecord({"num-examples": n, "partition_id": pid, "train_loss": 0.5,
                                 **(metrics or {})}),
    })
    content[WIRE] = wire_config(codec, delta=False)
    (means or honest_means(n)).to_records(content, CLASS_MEANS, CLASS_MEANS_META, half=codec != "float32")
    return content


@functools.lru_cache(maxsize=16)
def _cached_records(pid: int, codec: str) -> tuple:
    torch.manual_seed(pid)
    content = honest_content(pid, codec=codec)
    return tuple(content.items())


@functools.lru_cache(maxsize=16)
def cached_state(pid: int, codec: str) -> dict[str, torch.Tensor]:
    """The packed tensors of ``cached_content(pid, codec)``'s weights (copy before changing)."""
    return dict(_cached_records(pid, codec))["arrays"].to_torch_state_dict()


def cached_content(pid: int, codec: str) -> RecordDict:
    """``honest_content`` built once per (pid, codec): a fresh RecordDict over the same records (records
    are replaced, never changed in place, by the fuzz and by the server)."""
    return RecordDict(dict(_cached_records(pid, codec)))


def as_reply(content: RecordDict, node_id: int, message_type: str = MessageType.TRAIN) -> Message:
    meta = Metadata(run_id=1, message_id=f"r{node_id}-{time.monotonic_ns()}", src_node_id=node_id, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=time.time(), ttl=60, message_type=message_type)
    return Message(content=content, metadata=meta)


def layout_bytes(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def with_layout(content: RecordDict, layout: object | str, buffers: dict[str, torch.Tensor] | None = None,
                state: dict[str, torch.Tensor] | None = None) -> RecordDict:
    """``content`` whose packed weights (``state``, default: read from ``content``) have another layout
    (JSON text or an object) and buffers."""
    state = dict(state) if state is not None else content["arrays"].to_torch_state_dict()
    text = layout if isinstance(layout, str) else json.dumps(layout)
    state[PACKED_LAYOUT] = layout_bytes(text)
    for kind, buffer in (buffers or {}).items():
        state[PACKED_PREFIX + kind] = buffer
    content["arrays"] = ArrayRecord(state)
    return content


def bank_content(content: RecordDict, spec_changes: dict | None = None, meta_changes: dict | None = None) -> RecordDict:
    """``content`` plus a unified generator bank of the server's spec (changed by ``spec_changes``)."""
    for name, record in _bank_records():
        content[name] = record
    if spec_changes or meta_changes:
        meta = json.loads(content[GENERATORS_META]["meta"])
        for unit in meta["units"]:
            unit["generator-spec"].update(spec_changes or {})
        meta.update(meta_changes or {})
        content[GENERATORS_META] = ConfigRecord({"meta": json.dumps(meta)})
    return content


@functools.lru_cache(maxsize=1)
def _bank_records() -> tuple:
    from common.generator_bank import GeneratorBank, Unit
    from common.models.generators import build_generator

    cfg = load_config(GEN)
    spec = GeneratorSpec.from_config(cfg.generator, ACFG.in_tokens, ACFG.in_dim)
    spec.num_classes = len(NAMES)
    bank = GeneratorBank("unified", [Unit("unified", "unified", list(NAMES))], {"unified": build_generator(spec, seed=0)})
    bank.class_counts = {n: 4 for n in NAMES}
    content = RecordDict()
    bank_to_records(bank, content, "enc", 0, 1)
    return tuple(content.items())


# ---------------------------------------------------------------------------- hypothesis strategies
_TEMPLATE = {k: tuple(v.shape) for k, v in Adapters(ACFG).state_dict().items()}
_NAMES = sorted(_TEMPLATE)
KINDS = ["int8", "float32", "float16", "int64", "uint8", "bool", "complex64", "", "float"]
_numbers = st.one_of(
    st.integers(min_value=-2**64, max_value=2**64), st.sampled_from([0, 1, 2, 2**31, 2**62, 2**63 - 1, -1]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e38, -1e38, 1e12, 0.5]),
)
_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), _numbers, st.text(max_size=8)),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=4), children, max_size=3)),
    max_leaves=12,
)
_dims = st.lists(st.one_of(st.integers(0, 64), _numbers), max_size=4)
_entry = st.one_of(
    st.tuples(st.sampled_from(_NAMES + [n + "::scale" for n in _NAMES] + ["x", ""]), st.sampled_from(KINDS),
              st.one_of(_dims, st.sampled_from([list(s) for s in _TEMPLATE.values()])),
              st.one_of(st.integers(0, 4096), _numbers)).map(list),
    _json_values,
)
_layouts = st.one_of(
    st.lists(_entry, max_size=6).map(json.dumps),
    st.integers(1, 5000).map(lambda d: "[" * d + "]" * d),  # deep nesting
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
    st.sampled_from(['[["a", "int8", [2, 2], Infinity]]', '[["a", "int8", [4611686018427387904], 0]]', "null", "{}"]),
)
_buffers = st.dictionaries(st.sampled_from(["int8", "float32", "float16", "int64", "weird"]),
                           st.tuples(st.sampled_from([torch.int8, torch.float32, torch.float16, torch.int64]),
                                     st.integers(0, 3000)).map(lambda t: torch.zeros(t[1], dtype=t[0])),
                           max_size=3)
_tensor = st.tuples(st.lists(st.integers(0, 4), max_size=3),
                    st.sampled_from([torch.float32, torch.float16, torch.int64, torch.int8, torch.float64]),
                    st.sampled_from([0.0, 1.0, 1e38, math.inf, math.nan, -2**62])).map(
    lambda t: torch.full(t[0], t[2]).to(t[1]) if t[1].is_floating_point or math.isfinite(t[2]) else torch.zeros(t[0], dtype=t[1]))
_metrics = st.dictionaries(
    st.sampled_from(["num-examples", "partition_id", "withheld_clips", "num_val", "images_scored", "train_loss",
                     "test_retrieval_acc", "x"]),
    st.one_of(_numbers, st.lists(st.integers(-5, 5), max_size=3), st.lists(st.floats(), max_size=2)),
    max_size=5,
)


@st.composite
def reply_contents(draw) -> RecordDict:
    """A train reply with one or more of its records replaced by something hostile."""
    n = draw(st.sampled_from([12, 1, 10**12]))
    pid, codec = draw(st.integers(0, 3)), draw(st.sampled_from(["int8", "float16", "float32"]))
    content, state = cached_content(pid, codec), cached_state(pid, codec)
    kinds = draw(st.sets(st.sampled_from(["layout", "buffers", "plain", "means", "means_meta", "bank", "metrics",
                                          "config"]), min_size=1, max_size=3))
    if "layout" in kinds or "buffers" in kinds:
        layout = draw(_layouts) if "layout" in kinds else state[PACKED_LAYOUT].numpy().tobytes().decode()
        with_layout(content, layout, draw(_buffers) if "buffers" in kinds else None, state)
    if "plain" in kinds:
        content["arrays"] = ArrayRecord(draw(st.dictionaries(st.sampled_from(_NAMES + [n + "::scale" for n in _NAMES]),
                                                             _tensor, max_size=4)))
    if "means" in kinds:
        content[CLASS_MEANS] = ArrayRecord(draw(st.dictionaries(st.sampled_from(["clip", "t5", "counts", "x"]), _tensor,
                                                                max_size=4)))
    if "means_meta" in kinds:
        content[CLASS_MEANS_META] = ConfigRecord({"class-names": draw(st.one_of(
            st.lists(st.sampled_from(NAMES + ["cat", ""]), max_size=4), st.text(max_size=5).map(lambda t: [t])))})
    if "bank" in kinds:
        bank_content(content, draw(st.dictionaries(st.sampled_from(["hidden_dim", "latent_dim", "tokens", "dim",
                                                                    "num_classes", "kind", "bogus"]),
                                                   st.one_of(_numbers, st.text(max_size=4)), max_size=2)),
                     draw(st.dictionaries(st.sampled_from(["units", "granularity", "format", "embedding-shape"]),
                                          _json_values, max_size=2)))
    if "metrics" in kinds:
        metrics = draw(_metrics)
        try:
            content["metrics"] = MetricRecord({"num-examples": n, **metrics})
        except (TypeError, ValueError, OverflowError):  # Flower refuses it: the reply never leaves the node
            pass
    if "config" in kinds:
        content[WIRE] = ConfigRecord({"codec": draw(st.text(max_size=5)), "delta": draw(st.booleans())})
        content["held"] = draw(st.one_of(
            st.dictionaries(st.text(max_size=6), st.one_of(st.text(max_size=6), st.integers(), st.booleans()),
                            max_size=3).map(ConfigRecord),
            st.just(ArrayRecord({"x": torch.zeros(2)}))))
    return content
