"""Every reply is parsed totally before anything is aggregated: accepted, or rejected with a reason.

Sites are separate institutions; a buggy, outdated or hostile one must cost the federation at most
its own contribution. So a reply is hostile until parsed, and parsing either accepts it or raises
:class:`Rejected` with a reason that names what is wrong (the strategy drops the reply, logs the reason
with the node, and lists it in the round's ``rejected``). Nothing is allocated from a reply before the
reply's size and the shapes it declares are checked (:class:`ReplyLimits`), so a message of normal
size cannot make the server hold gigabytes. Checks:

* size: a reply's records weigh at most ``robust.max-reply-mb`` before anything in it is decoded;
* metrics: numbers, finite and bounded: accuracies in [0, 1], every count a node claims (and the
  server weighs by: ``num-examples``, ``num_val``, ``images_scored``, ...) an integer in
  [0, ``robust.max-examples``], anything else at most :data:`MAX_METRIC`;
* identity: one reply per partition id per round, and a partition keeps its owner
  (:class:`server_app.identity.PartitionOwners`);
* adapter weights: exactly the global model's tensors (names and shapes checked in the packed
  layout before allocation, :func:`common.wire.decode`), finite and at most ``robust.max-abs-value``;
* class means: federation classes only, once each, the model's output shapes, finite and bounded;
  counts added as Python ints (a count of 2**63-1 cannot wrap), each at least 1 and at most
  ``num-examples``, summing to ``num-examples`` minus the clips the node withheld;
* a generator bank: its metadata parsed and its spec equal to the server's own (from the config,
  with the federation's embedding shape) *before* any model is built; weights finite and bounded.

Evaluate replies get the same size, metric and identity checks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from flwr.app import Message, RecordDict

from common.generator_bank import GeneratorCheckpointError, bank_from_records
from common.metric_keys import NUM_EXAMPLES, NUM_VAL, PARTITION_ID
from common.config import PrivacyConfig, RobustConfig
from common.models.adapters import AdapterConfig
from common.models.generators import GeneratorSpec
from common.owners import OWNERS_FILE
from common.records import (
    CLASS_MEANS,
    CLASS_MEANS_META,
    GENERATORS,
    GENERATORS_META,
    METRICS,
    ClassTensors,
    RecordError,
)
from common.wire import WireError, content_bytes, record_tensors
from server_app.identity import PartitionOwners

MAX_METRIC = 1e15  # any metric that is neither an accuracy nor a count (seconds, losses, byte counts)
MAX_META_CHARS = 1 << 20  # JSON metadata of a generator bank
MAX_PARTITION_ID = 1 << 31
#: Metrics that count clips, files or images: integers in [0, robust.max-examples]
COUNT_KEYS = frozenset({
    NUM_EXAMPLES, NUM_VAL, "images_scored", "images_rendered", "images_skipped", "skipped_files",
    "missing_files", "forget_files", "withheld_clips", "withheld_classes", "cache_hits", "cache_misses",
})


class Rejected(Exception):
    """A reply that is not accepted; ``str()`` is the reason (names the record, field or tensor)."""


@dataclass(frozen=True)
class ReplyLimits:
    """What one reply may weigh, claim and hold (``[robust]`` in the config)."""

    max_reply_bytes: int = 1 << 30
    max_abs: float = 1e4
    max_examples: int = 1_000_000

    @classmethod
    def from_config(cls, robust: Any) -> "ReplyLimits":
        return cls(int(robust.max_reply_mb * (1 << 20)), float(robust.max_abs_value), int(robust.max_examples))


def is_accuracy(key: str) -> bool:
    """Accuracy metrics (``retrieval_acc``, ``test_retrieval_acc_clip``, ``image_acc``, ...) lie in [0, 1]."""
    return "acc" in key.split("_")


class ReplyValidator:
    def __init__(self, template_state: dict[str, torch.Tensor], class_names: list[str], clip_dim: int,
                 t5_shape: tuple[int, int], limits: ReplyLimits | None = None,
                 generator_spec: Mapping[str, Any] | None = None, owners=None, dp_epsilon: float | None = None) -> None:
        """``generator_spec``: the server's own generator spec (``GeneratorSpec.to_dict()`` from the
        config and the embedding shape); node banks must match it (``num_classes`` per unit aside).
        ``owners``: who may reply for which partition (:class:`server_app.identity.PartitionOwners`).
        ``dp_epsilon``: the run asks for ``privacy.dp`` with this budget; a train reply must say it applied DP
        and spent at most that in this run (a site's own DP, with the run's off, is accepted as it is)."""
        self.expected = {k: (tuple(v.shape), v.dtype) for k, v in template_state.items()}
        self.shapes = {k: shape for k, (shape, _) in self.expected.items()}
        self.class_list = list(class_names)
        self.class_names = set(class_names)
        self.clip_dim = clip_dim
        self.t5_shape = tuple(t5_shape)
        self.limits = limits or ReplyLimits()
        self.generator_spec = dict(generator_spec) if generator_spec is not None else None
        self.owners = owners if owners is not None else PartitionOwners()
        self.dp_epsilon = dp_epsilon

    @classmethod
    def for_run(cls, robust: RobustConfig, generator_spec: GeneratorSpec, template_state: dict[str, torch.Tensor],
                class_names: list[str], adapter_cfg: AdapterConfig, run_dir: Path | None,
                privacy: PrivacyConfig | None = None) -> "ReplyValidator":
        """The validator a run's configuration asks for: its limits (``[robust]``), the generator spec nodes
        must match (the run's, :meth:`GeneratorSpec.from_config`), and the partition owners (pinned or
        assigned ones recorded in ``run_dir``)."""
        owners = PartitionOwners(run_dir / OWNERS_FILE if run_dir is not None else None,
                                 pinned=robust.pin_partitions,
                                 assigned={int(p): n for p, n in robust.partition_owners.items()})
        return cls(template_state, class_names, adapter_cfg.clip_dim, (adapter_cfg.t5_tokens, adapter_cfg.t5_dim),
                   ReplyLimits.from_config(robust), generator_spec.to_dict(), owners,
                   privacy.epsilon if privacy is not None and privacy.dp else None)

    # ------------------------------------------------------------------ whole replies
    def check_size(self, content: RecordDict) -> None:
        try:
            size = content_bytes(content)
        except Exception as err:  # noqa: BLE001 - a record Flower cannot even count is no reply
            raise Rejected(f"records cannot be measured ({type(err).__name__})") from None
        if size > self.limits.max_reply_bytes:
            raise Rejected(f"reply is {size / 2**20:.1f} MiB, more than robust.max-reply-mb="
                           f"{self.limits.max_reply_bytes / 2**20:g}")

    def metrics_of(self, msg: Message, min_examples: int = 1) -> dict[str, Any]:
        """The reply's metrics, checked (:meth:`check_metrics`); a reply without them is rejected."""
        if METRICS not in msg.content:
            raise Rejected("no 'metrics' record")
        try:
            metrics = dict(msg.content[METRICS])  # type: ignore[arg-type]
        except (TypeError, ValueError) as err:
            raise Rejected(f"'metrics' is not a metric record ({err})") from None
        reason = self.check_metrics(metrics, min_examples, self.limits.max_examples)
        if reason:
            raise Rejected(reason)
        return metrics

    def check_partition(self, node_id: int, metrics: Mapping[str, Any], seen: set[int],
                        connected: set[int] | None = None) -> int:
        """The reply's partition id (its Flower node id when it did not say), checked against its owner."""
        pid = int(metrics.get(PARTITION_ID, node_id))
        if not 0 <= pid < MAX_PARTITION_ID:
            raise Rejected(f"partition id {pid} out of range")
        reason = self.check_identity(node_id, pid, seen, connected)
        if reason:
            raise Rejected(reason)
        return pid

    # ------------------------------------------------------------------ identity
    def check_identity(self, node_id: int, partition_id: int, seen: set[int],
                       connected: set[int] | None = None) -> str | None:
        """``connected``: the Flower nodes online this round. A restarted SuperNode comes back with a new
        Flower node id: it may take over its partition id once the old node is gone, never while it is
        still connected."""
        # ownership first: a squatter refused by the pinned owner is named as such, whoever replied first
        reason = self.owners.check(node_id, partition_id, connected)
        if reason is None and partition_id in seen:
            reason = f"partition id {partition_id} replied twice this round"
        return reason

    def remember(self, node_id: int, partition_id: int) -> None:
        """Record an accepted reply: ``node_id`` owns ``partition_id`` (a restarted node takes it over)."""
        self.owners.remember(node_id, partition_id)

    # ------------------------------------------------------------------ metrics
    @staticmethod
    def check_metrics(metrics: dict[str, Any], min_examples: int = 1, max_count: int = 1_000_000) -> str | None:
        """Numbers, finite and bounded (see the module docstring); ``num-examples`` an integer in
        [``min_examples``, ``max_count``] (evaluation may have none)."""
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                return f"metric '{key}' is not a number ({type(value).__name__})"
            if not math.isfinite(float(value)):
                return f"metric '{key}' is not finite ({value})"
            if key in COUNT_KEYS or key == PARTITION_ID:
                if float(value) != int(value) or not 0 <= int(value) <= (MAX_PARTITION_ID if key == PARTITION_ID
                                                                          else max_count):
                    return f"metric '{key}' must be an integer in [0, {max_count}] (robust.max-examples), got {value}"
            elif is_accuracy(key):
                if not 0.0 <= float(value) <= 1.0:
                    return f"metric '{key}' is an accuracy outside [0, 1]: {value}"
            elif abs(float(value)) > MAX_METRIC:
                return f"metric '{key}' is out of bounds ({value:g}, at most {MAX_METRIC:g})"
        n = metrics.get(NUM_EXAMPLES)
        if n is None:
            return "metrics lack 'num-examples'"
        if int(n) < min_examples:
            return f"num-examples must be an integer >= {min_examples}, got {n}"
        return None

    # ------------------------------------------------------------------ weights
    def check_train(self, reply) -> str | None:
        """The reason to reject a parsed :class:`~server_app.round_state.NodeReply`, or ``None``."""
        if reply.arrays is None:
            return "no adapter weights ('arrays' record)"
        if self.dp_epsilon is not None:
            if reply.metrics.get("dp") != 1:
                return "the run asks for privacy.dp, and this reply says it was not made under DP"
            spent = float(reply.metrics.get("dp_epsilon_run", math.inf))
            if spent > self.dp_epsilon * (1 + 1e-6):
                return f"the site reports epsilon {spent:g} spent in this run, over privacy.epsilon={self.dp_epsilon:g}"
        state = reply.arrays.to_torch_state_dict()
        missing = sorted(set(self.expected) - set(state))
        extra = sorted(set(state) - set(self.expected))
        if missing or extra:
            return f"adapter weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
        for key, tensor in state.items():
            shape, dtype = self.expected[key]
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                return f"adapter weight '{key}': {tuple(tensor.shape)} {tensor.dtype}, expected {shape} {dtype}"
            if tensor.numel() and not bool(torch.isfinite(tensor).all()):
                return f"adapter weight '{key}' holds non-finite values"
            if tensor.numel() and float(tensor.abs().max()) > self.limits.max_abs:
                return f"adapter weight '{key}' exceeds robust.max-abs-value={self.limits.max_abs:g}"
        return None

    # ------------------------------------------------------------------ class means
    def parse_means(self, content: RecordDict, metrics: Mapping[str, Any]) -> ClassTensors | None:
        """The reply's class means, parsed and checked (``None`` when it sent none)."""
        if CLASS_MEANS not in content and CLASS_MEANS_META not in content:
            return None
        if CLASS_MEANS not in content or CLASS_MEANS_META not in content:
            raise Rejected(f"class means need both '{CLASS_MEANS}' and '{CLASS_MEANS_META}'")
        names = _string_list(content[CLASS_MEANS_META], "class-names", f"'{CLASS_MEANS_META}'")
        unknown = sorted(set(names) - self.class_names)
        if unknown:
            raise Rejected(f"class means for classes outside the federation: {[n[:40] for n in unknown[:5]]}")
        if len(set(names)) != len(names):
            raise Rejected("class means name a class twice")
        k = len(names)
        try:
            state = record_tensors(content[CLASS_MEANS])  # type: ignore[arg-type]
        except WireError as err:
            raise Rejected(f"class means unusable: {err}") from None
        want = {"clip": (k, self.clip_dim), "t5": (k, *self.t5_shape), "counts": (k,)}
        if set(state) != set(want):
            raise Rejected(f"class means hold {sorted(state)[:5]}, expected {sorted(want)}")
        for key, shape in want.items():
            if tuple(state[key].shape) != shape:
                raise Rejected(f"class means '{key}' has shape {tuple(state[key].shape)}, expected {shape}")
        for key in ("clip", "t5"):
            t = state[key]
            if not t.is_floating_point():
                raise Rejected(f"class means '{key}' is {t.dtype}, expected floating point")
            peak = float(t.abs().max()) if t.numel() else 0.0
            if not math.isfinite(peak) or peak > self.limits.max_abs:
                raise Rejected(f"class means '{key}' hold a value of magnitude {peak:g} (finite and at most "
                               f"robust.max-abs-value={self.limits.max_abs:g} expected)")
        if state["counts"].dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise Rejected(f"class-mean counts are {state['counts'].dtype}, expected integers")
        counts = [int(c) for c in state["counts"].tolist()]  # Python ints: a sum cannot wrap
        n = int(metrics[NUM_EXAMPLES])
        withheld = int(metrics.get("withheld_clips", 0))
        bad = [c for c in counts if not 1 <= c <= n]
        if bad:
            raise Rejected(f"class-mean count {bad[0]} outside [1, num-examples={n}]")
        if sum(counts) + withheld != n:
            raise Rejected(f"class-mean counts sum to {sum(counts)} (+{withheld} withheld), but num-examples is {n}")
        return ClassTensors(names, state["clip"].float(), state["t5"].float(), torch.tensor(counts, dtype=torch.int64))

    # ------------------------------------------------------------------ generator banks
    def parse_bank(self, content: RecordDict, source: str):
        """The reply's generator bank and its metadata (``(None, {})`` when it sent none): the metadata
        is checked against the server's own generator spec before any model is built from it."""
        try:
            return self._parse_bank(content, source)
        except Rejected as err:
            reason = str(err)
            raise Rejected(reason if reason.startswith("generator bank unusable") else
                           f"generator bank unusable: {reason}") from None

    def _parse_bank(self, content: RecordDict, source: str):
        if GENERATORS not in content and GENERATORS_META not in content:
            return None, {}
        if GENERATORS not in content or GENERATORS_META not in content:
            raise Rejected(f"a generator bank needs both '{GENERATORS}' and '{GENERATORS_META}'")
        raw = content[GENERATORS_META].get("meta") if hasattr(content[GENERATORS_META], "get") else None  # type: ignore[union-attr]
        if not isinstance(raw, str) or len(raw) > MAX_META_CHARS:
            raise Rejected(f"'{GENERATORS_META}' must hold 'meta' as JSON text of at most {MAX_META_CHARS} characters")
        try:
            meta = json.loads(raw)
        except (json.JSONDecodeError, RecursionError) as err:
            raise Rejected(f"generator metadata is not JSON ({type(err).__name__})") from None
        if not isinstance(meta, dict):
            raise Rejected("generator metadata is not a JSON object")
        self.check_bank_meta(meta)
        try:
            tensors = record_tensors(content[GENERATORS])  # type: ignore[arg-type]
        except WireError as err:
            raise Rejected(f"generator bank unusable: {err}") from None
        units = len(meta["units"])
        stray = [k for k in tensors if not (k.startswith("unit") and k[4:].split(".", 1)[0].isdigit()
                                             and int(k[4:].split(".", 1)[0]) < units)]
        if stray:
            raise Rejected(f"generator weights outside its units: {[s[:40] for s in stray[:3]]}")
        for key, t in tensors.items():
            if t.is_floating_point() and t.numel():
                peak = float(t.abs().max())
                if not math.isfinite(peak) or peak > self.limits.max_abs:
                    raise Rejected(f"generator weight '{key[:60]}' holds a value of magnitude {peak:g}")
        try:
            shape = (self.generator_spec["tokens"], self.generator_spec["dim"]) if self.generator_spec else None
            bank, _ = bank_from_records(content, source, expected_shape=shape)  # what passed the checks above
        except (GeneratorCheckpointError, RecordError, ValueError, KeyError, TypeError) as err:
            raise Rejected(f"generator bank unusable: {err}") from None
        return bank, meta

    def check_bank_meta(self, meta: Mapping[str, Any]) -> None:
        """Units, their classes and their specs, before anything is built: every spec equal to the server's."""
        units = meta.get("units")
        if not isinstance(units, list) or not 1 <= len(units) <= len(self.class_list) + 1:
            raise Rejected(f"generator metadata: 'units' must list 1..{len(self.class_list) + 1} units")
        for i, unit in enumerate(units):
            if not isinstance(unit, dict):
                raise Rejected(f"generator unit {i}: not a JSON object")
            classes = unit.get("classes") or []
            if not isinstance(classes, list) or not all(isinstance(c, str) and c in self.class_names for c in classes):
                raise Rejected(f"generator unit {i}: classes must be federation class names")
            counts = unit.get("class-counts") or {}
            if not isinstance(counts, dict) or not all(
                    isinstance(c, str) and isinstance(v, int) and not isinstance(v, bool)
                    and 0 <= v <= self.limits.max_examples for c, v in counts.items()):
                raise Rejected(f"generator unit {i}: class-counts must map class names to counts in "
                               f"[0, {self.limits.max_examples}]")
            spec = unit.get("generator-spec")
            if not isinstance(spec, dict):
                raise Rejected(f"generator unit {i}: no generator-spec")
            if self.generator_spec is not None:
                mine = {k: v for k, v in spec.items() if k != "num_classes"}
                ours = {k: v for k, v in self.generator_spec.items() if k != "num_classes"}
                if mine != ours:
                    diff = sorted(k for k in set(mine) | set(ours) if mine.get(k) != ours.get(k))
                    raise Rejected(f"generator unit {i}: spec differs from the server's in {diff[:5]}")
                n = spec.get("num_classes")
                if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= max(1, len(self.class_list))):
                    raise Rejected(f"generator unit {i}: num_classes must be in [1, {len(self.class_list)}]")


def _string_list(record: Any, key: str, where: str) -> list[str]:
    try:
        value = record[key]
    except (KeyError, TypeError):
        raise Rejected(f"{where} lacks '{key}'") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Rejected(f"{where}: '{key}' must be a list of strings")
    return list(value)
