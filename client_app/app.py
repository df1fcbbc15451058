"""The feda2v ClientApp: a site trains adapters on its own audio and reports weights + class means.

``train``: load the global adapters (or, with ``aggregation = "none"``, this node's own adapters kept
in the node's state on its disk), train local epochs toward the per-clip class targets sent by the
server, reply with adapter weights, metrics and per-class mean adapter outputs. The metrics include
what obtaining the node's embeddings cost in this message: ``cache_hits``, ``cache_misses``,
``extract_seconds`` (AST extraction of misses, 0 when all hit) and ``load_seconds`` (cache reads);
all four are 0 when the process already held the data from an earlier round (simulation).
With generators (``generator.mode``) the node also trains its generator bank
(:mod:`client_app.generators`) or, in ``use-pretrained-generators``, trains on embeddings sampled
from its pretrained bank without building the AST (:mod:`client_app.pretrained`); either way the
bank goes back to the server in the reply.
``evaluate``: retrieval accuracy and losses on the node's validation and test clips; in the rounds
``render.when`` selects, the node also renders images of its classes with the aggregated adapters
(:mod:`client_app.render`); they stay on the node. The server sends its run's name (``run-name``
in the message config), never a path of its own host: the node's image directory is node-config
``image-dir`` > ``render.output-dir`` > ``<output-dir>/<run-name>/images`` resolved on the node
(in simulation that is the server's run directory).

The app owns the process's node-data memo (:data:`NODE_DATA`, bounded) and passes it down;
nothing else in the client keeps module-level state.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.augment import augment_from_server
from client_app.generators import shareable_classes, train_node_generators
from client_app.held import (
    HELD,
    HeldRecordMissing,
    by_reference,
    forget_files,
    held,
    missing_reply,
    resolve,
    state_keys,
)
from client_app.node_data import NodeDataMemo, load_node_data, node_cache_dir
from client_app.node_state import LOCAL_ADAPTERS, DiskState, release_noted, state_dir
from client_app.pretrained import load_node_bank, pretrained_index, synthetic_train_set
from client_app.render import render_node_images
from common import seeds
from common.config import FedA2VConfig, NodeRuntimeConfig, load_config
from common.errors import redact_paths
from common.factory import adapter_config, build_adapters, resolve_device
from common.logs import setup_logging
from common.metric_keys import NUM_EXAMPLES, NUM_VAL, PARTITION_ID, TEST_ACC, TEST_ACC_CLIP, TEST_ACC_T5
from common.metrics.resources import (
    ENTRY_UNIX,
    EXIT_UNIX,
    memory_metrics,
    process_age_seconds,
    release_memory,
    warm_start,
)
from common.models.adapters import Adapters
from common.names import folder_name_problem
from common.records import (
    ARRAYS,
    CLASS_MEANS,
    CLASS_MEANS_META,
    CONFIG,
    GENERATORS,
    GENERATORS_META,
    GLOBAL_MODEL,
    METRICS,
    RUN_IDENTITY,
    RUN_NAME,
    TARGETS,
    TARGETS_META,
    ClassTensors,
    RecordError,
    arrays_to_module,
    module_to_arrays,
)
from common.training import TrainSettings, class_mean_outputs, evaluate_adapters, train_adapters
from common.wire import WIRE, codec_of, decode, encode, wire_config

log = logging.getLogger(__name__)
app = ClientApp()
NODE_DATA = NodeDataMemo(max_entries=8)  # this process's node embeddings (see client_app.node_data)



def _setup(msg: Message, context: Context, evaluate: bool = False) -> tuple[
        FedA2VConfig, NodeRuntimeConfig, ClassTensors, DiskState, tuple[str, ...], dict[str, int]]:
    """Config, node, class targets, and the carried state (:func:`_carried_state`) of one message.

    The message's content is completed from what the node holds (:mod:`client_app.held`: records the
    server sent by reference) and the records it brought in full are kept, on the node's disk (and in
    memory only where the disk failed: :class:`~client_app.node_state.DiskState`)."""
    setup_logging()
    cfg = load_config(context.run_config)
    node = NodeRuntimeConfig.from_node_config(context.node_config)
    if node.num_threads:
        torch.set_num_threads(node.num_threads)
    checked_run_name(_round_config(msg).get(RUN_NAME, ""))  # before any path is built from it
    disk, carried, state_metrics = _carried_state(cfg, node, msg, context, evaluate)
    server_round = int(_round_config(msg).get("server-round", 0))
    if by_reference(msg.content):
        disk.restore(context.state, state_keys(), server_round + 1)  # the held records live on the node's disk
    msg.content, kept = resolve(msg.content, context.state)
    if kept:
        try:
            disk.persist(context.state, tuple(kept), server_round)
        except OSError as err:  # an optimisation only: the state in memory still serves this SuperNode's life
            log.warning("node %d: the server's records could not be kept on disk (%s); a restart will need them "
                        "sent again", node.partition_id, redact_paths(str(err)))
    targets = ClassTensors.from_records(msg.content, TARGETS, TARGETS_META)
    return cfg, node, targets, disk, carried, state_metrics


def _check_classes(targets: ClassTensors, class_names: list[str], node: NodeRuntimeConfig) -> None:
    if targets.class_names != class_names:
        raise RecordError(
            f"node {node.partition_id}: server targets are for classes {targets.class_names} but this node's "
            f"configuration gives {class_names}; both sides must use the same data.classes"
        )


def _cache_only(cfg: FedA2VConfig) -> bool:
    """Pretrained mode without real clips: held-out embeddings come from the cache alone (no AST)."""
    return cfg.generator.mode == "use-pretrained-generators" and cfg.generator.real_mix_ratio == 0


def _round_config(msg: Message) -> ConfigRecord:
    return msg.content[CONFIG] if CONFIG in msg.content else ConfigRecord()  # type: ignore[return-value]


def _keeps_own_adapters(msg: Message) -> bool:
    """The server says whether there is a global model (``global-model``); without one (standalone
    nodes) a node continues its own adapters, kept in its Context state between messages."""
    return not bool(_round_config(msg).get(GLOBAL_MODEL, True))


def _adapters(cfg: FedA2VConfig, msg: Message, context: Context, targets: ClassTensors) -> tuple[Adapters, dict | None]:
    """The adapters this message works on, and the server's weights as received (``None`` when the node
    works on its own adapters): the base of a train reply sent as a difference (:mod:`common.wire`)."""
    acfg = adapter_config(cfg, clip_dim=targets.clip.shape[1], t5_dim=targets.t5.shape[2])
    adapters = build_adapters(cfg, acfg)
    if _keeps_own_adapters(msg) and LOCAL_ADAPTERS in context.state:
        return arrays_to_module(context.state[LOCAL_ADAPTERS], adapters), None  # type: ignore[arg-type]
    sent = decode(msg.content[ARRAYS])  # type: ignore[arg-type]
    return arrays_to_module(ArrayRecord(sent), adapters), sent


def checked_run_name(value: object) -> str:
    """The run name the server sent (``run-name`` in the round config), refused unless it is one plain
    folder name (:func:`common.names.folder_name_problem`, the rule the server's own config obeys).

    Why: the node builds its state and image folders from it; a name such as ``..`` or ``/etc`` from a
    buggy or hostile server would make the node write outside the directories its operator gave it."""
    name = str(value)
    problem = folder_name_problem(name) if name else None
    if problem:
        raise RecordError(f"{RUN_NAME} {name[:80]!r} in the server's round config is refused: {problem}")
    return name


def node_run_dir(cfg: FedA2VConfig, run_name: str) -> Path | None:
    """``<output-dir>/<run-name>`` resolved on this node (``None`` without a run name)."""
    if not checked_run_name(run_name):
        return None
    return (Path(cfg.output_dir).expanduser() / run_name).resolve()


def _training_set(
    cfg: FedA2VConfig, node: NodeRuntimeConfig, context: Context, msg: Message
) -> tuple[list[str], torch.Tensor, torch.Tensor, dict[str, float], bool]:
    """(class names, embeddings, labels, data metrics, has generators) for this round's training."""
    server_round = int(_round_config(msg).get("server-round", 0))
    gen_metrics: dict[str, float] = {}
    if cfg.generator.mode == "use-pretrained-generators":
        synth, _ = synthetic_train_set(cfg, node, context.state, server_round, memo=NODE_DATA)
        metrics = {"synthetic_samples": synth.synthetic, "real_samples": synth.real,
                   "extract_seconds": 0.0, "load_seconds": 0.0, "cache_hits": 0, "cache_misses": 0, "skipped_files": 0, "missing_files": 0}
        return synth.class_names, synth.embeddings, synth.labels, metrics, True
    data = load_node_data(cfg, node, memo=NODE_DATA)
    split = data.splits["train"]
    if cfg.generator.mode != "off":
        _, gen_metrics = train_node_generators(cfg, node, data, context.state, server_round, _run_name(msg),
                                               _run_identity(msg))
    metrics = {
        "extract_seconds": data.stats.extract_seconds,
        "load_seconds": data.stats.load_seconds,
        "cache_hits": data.stats.hits,
        "cache_misses": data.stats.misses,
        "skipped_files": data.skipped_files,
        "missing_files": data.missing_files,
        **gen_metrics,
    }
    return data.class_names, split.embeddings, split.labels, metrics, cfg.generator.mode != "off"


def _carried_state(cfg: FedA2VConfig, node: NodeRuntimeConfig, msg: Message, context: Context,
                   evaluate: bool = False) -> tuple[DiskState, tuple[str, ...], dict[str, int]]:
    """Read back what this node carries across rounds (see :mod:`client_app.node_state`): the files of
    earlier rounds for a train message, and for an evaluate message also this round's (what its train
    message just wrote).

    Returns the message's :class:`~client_app.node_state.DiskState`, the keys the node carries in this
    run and the ``state_restored`` (reloaded after a SuperNode restart) / ``state_lost`` metrics."""
    keys: tuple[str, ...] = ()
    if _keeps_own_adapters(msg):
        keys += (LOCAL_ADAPTERS,)
    if cfg.generator.mode in ("generator-training", "generator-only"):
        keys += (GENERATORS,)
    disk = DiskState(state_dir(node_cache_dir(cfg, node), _run_name(msg), node.partition_id), _run_identity(msg))
    directory = disk.directory
    try:
        disk.claim()  # another run of this name left its state here: removed before anything is read
    except OSError as err:  # the identity in each file still keeps another run's state out
        log.warning("node %d: could not mark %s as this run's state folder (%s)", node.partition_id, directory,
                    redact_paths(str(err)))
    server_round = int(_round_config(msg).get("server-round", 0))
    restored = disk.restore(context.state, keys, server_round + int(evaluate))
    if restored:
        log.info("node %d: restored %s from %s (the SuperNode restarted)", node.partition_id, restored, directory)
    lost = [k for k in keys if k not in context.state]
    if lost and server_round > 1:
        log.warning("node %d round %d: %s from earlier rounds is gone (not in the node's state nor in %s): starting "
                    "them over", node.partition_id, server_round, lost, directory)
    return disk, keys, {"state_restored": int(bool(restored)), "state_lost": int(bool(lost) and server_round > 1)}


def _run_name(msg: Message) -> str:
    return str(_round_config(msg).get(RUN_NAME, ""))


def _run_identity(msg: Message) -> str:
    """The run's identity the server sends (``run-identity``; empty from a server that sends none)."""
    return str(_round_config(msg).get(RUN_IDENTITY, ""))


def _asks_again_in_full(handler):
    """A message that names records by reference this node does not hold gets a ``held-missing`` reply
    (:func:`client_app.held.missing_reply`), not an error: the server sends it again in full within the
    same phase, so a node whose state was lost stays in the round."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except HeldRecordMissing as err:
            log.warning("%s", err)
            return Message(content=missing_reply(msg.content, context.state, str(err)), reply_to=msg)

    return wrapper


def _no_host_paths(handler):
    """An exception leaves the node (Flower sends ``str(exception)`` to the server) with absolute paths
    cut to their last part; the full message and traceback stay in the node's own log. The Context
    goes back small after a failure too (:func:`~client_app.node_state.release_noted`)."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:
            release_noted(context.state)
            if not isinstance(err, HeldRecordMissing):  # expected after a lost state: answered, not a failure
                log.exception("node handler %s failed", handler.__name__)
            message = redact_paths(str(err))
            if isinstance(err, OSError):  # str() of an OSError is built from its filename, not its args
                raise OSError(message) from None
            err.args = (message,)
            raise

    return wrapper


@app.train()
@_asks_again_in_full
@_no_host_paths
def train(msg: Message, context: Context) -> Message:
    t_call = time.perf_counter()  # the whole handler: ``call_seconds`` (node compute, as bench/scale.py counts it)
    age = process_age_seconds()  # deployment: this message's process start and imports
    entry = time.time()  # wall clock: the server turns it into ``dispatch_seconds`` (server_app.grid)
    cfg, node, targets, disk, carried, state_metrics = _setup(msg, context)
    server_round = int(_round_config(msg).get("server-round", 0))
    device = resolve_device(cfg)
    class_names, embeddings, labels, data_metrics, has_bank = _training_set(cfg, node, context, msg)
    if cfg.generator.mode == "use-pretrained-generators":
        disk.on_disk.add(GENERATORS)  # the pretrained bank is in its checkpoints: the next message reads them again
    _check_classes(targets, class_names, node)
    adapters, sent = _adapters(cfg, msg, context, targets)
    settings = TrainSettings.from_config(cfg.train, seed=seeds.node_train(cfg.seed, server_round, node.partition_id))
    train_x, train_y, augmented = augment_from_server(
        msg.content, embeddings, labels, class_names, cfg.train.augment_to, settings.seed
    )
    t0 = time.perf_counter()
    if cfg.generator.mode == "generator-only" or cfg.generate_only:  # adapters untouched: losses only
        losses = evaluate_adapters(adapters, embeddings, labels, targets.clip, targets.t5, settings, device=device)
    else:
        losses = train_adapters(adapters, train_x, train_y, targets.clip, targets.t5, settings, device)
    train_seconds = time.perf_counter() - t0
    # means over the node's own embeddings only (never the server generator's samples)
    clip_means, t5_means, counts = class_mean_outputs(adapters, embeddings, labels, len(class_names), device)
    weights = module_to_arrays(adapters)
    if _keeps_own_adapters(msg):
        context.state[LOCAL_ADAPTERS] = weights
    disk.persist(context.state, carried, server_round)
    shared = set(shareable_classes(cfg, node, dict(zip(class_names, counts.tolist()))))
    present = [i for i, c in enumerate(class_names) if c in shared]
    withheld = [i for i, n in enumerate(counts.tolist()) if n > 0 and class_names[i] not in shared]
    means = ClassTensors([class_names[i] for i in present], clip_means[present], t5_means[present], counts[present])
    release_memory()  # what training freed goes back to the OS before the memory is measured
    metrics = {
        NUM_EXAMPLES: int(labels.numel()),
        "withheld_classes": len(withheld),  # privacy.min-class-count: too few clips to share a mean
        "withheld_clips": int(counts[withheld].sum()) if withheld else 0,
        "augmented_samples": augmented,
        "train_loss": losses["loss"],
        "train_loss_clip": losses["loss_clip"],
        "train_loss_t5": losses["loss_t5"],
        "train_seconds": train_seconds,
        PARTITION_ID: node.partition_id,
        **state_metrics,
        **data_metrics,
        **memory_metrics(),
    }
    log.info(
        "node %d round %d: trained on %d embeddings in %.1fs, loss %.4f (clip %.4f, t5 %.4f)",
        node.partition_id, server_round, labels.numel(), train_seconds, losses["loss"], losses["loss_clip"], losses["loss_t5"],
    )
    metrics.update({"call_seconds": time.perf_counter() - t_call, "process_age_seconds": age, "warm_start": warm_start(),
                    ENTRY_UNIX: entry})
    content = RecordDict({ARRAYS: weights, METRICS: MetricRecord(metrics)})
    codec = codec_of(msg.content)
    if WIRE in msg.content:  # the server's codec; a difference only from weights it sent (common.wire)
        content[ARRAYS] = encode(weights, codec, base=sent)
        content[WIRE] = wire_config(codec, delta=sent is not None)
    means.to_records(content, CLASS_MEANS, CLASS_MEANS_META, half=codec != "float32")
    content[HELD] = held(context.state)
    # the server keeps every node's generators (KD samples, its generators/ folder); a generate-only run
    # trains nothing and renders on the nodes, so its pretrained banks stay home (no traffic for nothing)
    if has_bank and not cfg.generate_only:
        for name in (GENERATORS, GENERATORS_META):
            content[name] = context.state[name]
    disk.release(context.state)  # the Context goes back to the SuperNode small (client_app.node_state)
    content[METRICS][EXIT_UNIX] = time.time()
    return Message(content=content, reply_to=msg)


@app.evaluate()
@_asks_again_in_full
@_no_host_paths
def evaluate(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()  # the whole handler: ``call_seconds``
    age = process_age_seconds()
    entry = time.time()
    cfg, node, targets, disk, _, state_metrics = _setup(msg, context, evaluate=True)
    device = resolve_device(cfg)
    adapters, _ = _adapters(cfg, msg, context, targets)
    metrics: dict[str, float | int] = {NUM_EXAMPLES: 0, NUM_VAL: 0, PARTITION_ID: node.partition_id,
                                       **state_metrics}
    empty = ["val", "test"]
    if cfg.node_holds_audio(node.partition_id):
        data = load_node_data(cfg, node, cache_only=_cache_only(cfg), memo=NODE_DATA)
        _check_classes(targets, data.class_names, node)
        metrics.update({NUM_EXAMPLES: len(data.splits["test"]), NUM_VAL: len(data.splits["val"])})
        settings = TrainSettings.from_config(cfg.train, seed=cfg.seed)
        empty = [name for name in ("val", "test") if not len(data.splits[name])]
        for name in ("val", "test"):
            if name in empty:  # e.g. cache-only lookup in pretrained mode with no cached clips
                continue
            split = data.splits[name]
            result = evaluate_adapters(adapters, split.embeddings, split.labels, targets.clip, targets.t5, settings,
                                       device=device)
            metrics.update({f"{name}_{k}": v for k, v in result.items()})
    if empty:
        why = (f"holds no audio (nodes.{node.partition_id}.audio = false)"
               if not cfg.node_holds_audio(node.partition_id) else "has no embeddings to evaluate on")
        log.info("node %d %s: %s evaluation skipped", node.partition_id, why, " and ".join(empty))
    if "test" not in empty:
        log.info(
            "node %d: test retrieval acc %.3f (clip %.3f, t5 %.3f) on %d clips",
            node.partition_id, metrics[TEST_ACC], metrics[TEST_ACC_CLIP],
            metrics[TEST_ACC_T5], metrics[NUM_EXAMPLES],
        )
    server_round = int(_round_config(msg).get("server-round", 0))
    if cfg.render.due(server_round, cfg.num_rounds):  # the aggregated adapters of this round draw the images
        run_dir = node_run_dir(cfg, _run_name(msg))
        if cfg.generator.mode == "use-pretrained-generators" and cfg.render.source == "generator":
            load_node_bank(cfg, node, pretrained_index(cfg, node), context.state)  # from its checkpoints
            disk.on_disk.add(GENERATORS)
        metrics.update(render_node_images(cfg, node, adapters, targets, context.state, str(run_dir or ""), server_round,
                                          str(device), cache_only=_cache_only(cfg), memo=NODE_DATA))
    if server_round >= cfg.num_rounds:  # the run's last message to this node: its held records' files can go
        forget_files(disk.directory)
    disk.release(context.state)
    release_memory()
    metrics.update({"call_seconds": time.perf_counter() - t0, "process_age_seconds": age, "warm_start": warm_start(),
                    **memory_metrics(),
                    ENTRY_UNIX: entry, EXIT_UNIX: time.time()})
    return Message(content=RecordDict({METRICS: MetricRecord(metrics), HELD: held(context.state)}), reply_to=msg)
