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

Each handler reads top to bottom: open the node's session (:mod:`client_app.session`: the message parsed
once, the node's state read once), ask the training source of ``generator.mode`` (:mod:`client_app.sources`)
for this round's embeddings, train or evaluate, close the session, reply (:mod:`client_app.replies`).
The app owns the process's node-data memo (:data:`NODE_DATA`, bounded) and passes it down; nothing
else in the client keeps module-level state.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client_app.augment import augment_from_server
from client_app.held import HeldRecordMissing, forget_files, missing_reply
from client_app.message import checked_run_name
from client_app.node_data import NodeDataMemo, load_node_data
from client_app.node_state import release_noted
from client_app.render import render_node_images
from client_app.local_training import LocalTraining
from client_app.replies import evaluate_reply, train_reply
from client_app.session import NodeSession, check_classes
from common import seeds
from common.errors import redact_paths
from common.metric_keys import NUM_EXAMPLES, NUM_VAL, TEST_ACC, TEST_ACC_CLIP, TEST_ACC_T5
from common.metrics.resources import ENTRY_UNIX, memory_metrics, process_age_seconds, release_memory, warm_start
from common.records import module_to_arrays
from common.render.jobs import RenderContext
from common.training import TrainSettings, evaluate_adapters

__all__ = ["app", "checked_run_name", "evaluate", "node_run_dir", "train"]

log = logging.getLogger(__name__)
app = ClientApp()
NODE_DATA = NodeDataMemo(max_entries=8)  # this process's node embeddings (see client_app.node_data)


def node_run_dir(output_dir: str, run_name: str) -> Path | None:
    """``<output-dir>/<run-name>`` resolved on this node (``None`` without a run name)."""
    if not checked_run_name(run_name):
        return None
    return (Path(output_dir).expanduser() / run_name).resolve()


def _timing() -> dict[str, float]:
    """When the handler started: ``process_age_seconds`` (deployment: this message's process start and
    imports), ``warm_start`` and the wall clock the server turns into ``dispatch_seconds`` (server_app.grid)."""
    return {"process_age_seconds": process_age_seconds(), "warm_start": warm_start(), ENTRY_UNIX: time.time(),
            "_t0": time.perf_counter()}


def _finish(metrics: dict, timing: dict[str, float]) -> dict:
    """``call_seconds`` (the whole handler: node compute, as bench/scale.py counts it) and memory."""
    release_memory()  # what the handler freed goes back to the OS before the memory is measured
    t0 = timing.pop("_t0")
    return {**metrics, **memory_metrics(), **timing, "call_seconds": time.perf_counter() - t0}


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


def _local_training(session: NodeSession, data) -> LocalTraining:
    """The round's training under the site's DP, or plain. Opacus (seconds of imports) loads on DP sites only."""
    if session.site.policy.dp:
        from client_app.privacy import PrivateTraining

        return PrivateTraining(session, data)
    return LocalTraining(session, data)


@app.train()
@_asks_again_in_full
@_no_host_paths
def train(msg: Message, context: Context) -> Message:
    timing = _timing()
    session = NodeSession.open(msg, context, NODE_DATA)
    cfg, node, targets, r = session.cfg, session.node, session.targets, session.message.server_round
    device = session.site.device
    data = session.source.training_set(session)
    check_classes(targets, data.class_names, node)
    adapters, sent = session.adapters()
    settings = TrainSettings.from_config(cfg.train, seed=seeds.node_train(cfg.seed, r, node.partition_id))
    local = _local_training(session, data)
    x, y, augmented = augment_from_server(msg.content, data.embeddings, data.labels, data.class_names,
                                          local.augment_to(cfg.train.augment_to), settings.seed)
    t0 = time.perf_counter()
    if session.source.trains_adapters:
        losses = local.train(adapters, x, y, targets, settings)
    else:  # adapters untouched (generator-only, generate-only): their losses only
        losses = evaluate_adapters(adapters, data.embeddings, data.labels, targets.clip, targets.t5, settings, device=device)
    seconds = time.perf_counter() - t0
    means, withheld = local.class_means(adapters)
    weights = module_to_arrays(adapters)
    session.keep_own_adapters(weights)
    local.commit()  # a DP site's ledger records (and re-checks under its lock) the releases before they leave
    log.info("node %d round %d: trained on %d embeddings in %.1fs, loss %.4f (clip %.4f, t5 %.4f)", node.partition_id,
             r, data.labels.numel(), seconds, losses["loss"], losses["loss_clip"], losses["loss_t5"])
    metrics = _finish(local.reported({**withheld, "augmented_samples": augmented, "train_loss": losses["loss"],
                                      "train_loss_clip": losses["loss_clip"], "train_loss_t5": losses["loss_t5"],
                                      "train_seconds": seconds, **session.state_metrics, **data.metrics}), timing)
    # a generate-only run trains nothing and renders on the nodes: its pretrained banks stay home
    reply = train_reply(msg, session, weights, sent, means, metrics, send_bank=data.has_bank and not cfg.generate_only)
    session.close(persist=True)
    return reply


@app.evaluate()
@_asks_again_in_full
@_no_host_paths
def evaluate(msg: Message, context: Context) -> Message:
    timing = _timing()
    session = NodeSession.open(msg, context, NODE_DATA, evaluate=True)
    cfg, site, r = session.cfg, session.site, session.message.server_round
    adapters, _ = session.adapters()
    metrics = {**_evaluate_on_held_out_clips(session, adapters), **session.state_metrics}
    if cfg.render.due(r, cfg.num_rounds):  # the aggregated adapters of this round draw the images
        session.source.before_render(session)
        run_dir = node_run_dir(cfg.output_dir, session.message.run_name)
        metrics.update(render_node_images(RenderContext.of(cfg, site.cache_dir), cfg.data, site, adapters, session.targets, session.state,
                                          str(run_dir or ""), r, cache_only=session.source.cache_only, memo=NODE_DATA))
    if r >= cfg.num_rounds:  # the run's last message to this node: its held records' files can go
        forget_files(session.disk.directory)
    session.close(persist=False)
    return evaluate_reply(msg, session, _finish(metrics, timing))


def _evaluate_on_held_out_clips(session: NodeSession, adapters) -> dict[str, float | int]:
    """Retrieval accuracy and losses on the node's validation and test clips (none for a node without audio)."""
    cfg, site, node, targets, device = session.cfg, session.site, session.node, session.targets, session.site.device
    metrics: dict[str, float | int] = {NUM_EXAMPLES: 0, NUM_VAL: 0}
    empty = ["val", "test"]
    if site.holds_audio:
        data = load_node_data(cfg.data, site, cache_only=session.source.cache_only, memo=NODE_DATA)
        check_classes(targets, data.class_names, node)
        metrics.update({NUM_EXAMPLES: len(data.splits["test"]), NUM_VAL: len(data.splits["val"])})
        settings = TrainSettings.from_config(cfg.train, seed=cfg.seed)
        empty = [name for name in ("val", "test") if not len(data.splits[name])]  # e.g. nothing cached (pretrained)
        for name in ("val", "test"):
            if name not in empty:
                split = data.splits[name]
                result = evaluate_adapters(adapters, split.embeddings, split.labels, targets.clip, targets.t5, settings,
                                           device=device)
                metrics.update({f"{name}_{k}": v for k, v in result.items()})
    if empty:
        why = (f"holds no audio (nodes.{node.partition_id}.audio = false)"
               if not site.holds_audio else "has no embeddings to evaluate on")
        log.info("node %d %s: %s evaluation skipped", node.partition_id, why, " and ".join(empty))
    if "test" not in empty:
        log.info("node %d: test retrieval acc %.3f (clip %.3f, t5 %.3f) on %d clips", node.partition_id,
                 metrics[TEST_ACC], metrics[TEST_ACC_CLIP], metrics[TEST_ACC_T5], metrics[NUM_EXAMPLES])
    return metrics
