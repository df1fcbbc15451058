"""The 'checkpoint' step: everything a round produced goes to the run directory, before any rendering.

``checkpoints/adapters.safetensors`` (+ ``_round_{r}`` copies every ``checkpoint-every`` rounds and
at the end; ``adapters_best.safetensors``: the round with the best global *validation* retrieval
accuracy so far — model selection on the nodes' validation clips, never on test clips;
``adapters_ema.safetensors``: an exponential moving average of the global adapters over rounds,
``ema-decay``), or with standalone nodes ``adapters_node{id}[...]``; ``checkpoints/resume_round_{r}.safetensors``
(every round: what ``resume`` continues from); ``class_means.safetensors`` (the
round's count-weighted global class means); ``generators/``: every node's uploaded bank and the
server generator, under the same names the nodes use.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from common.checkpoints import CheckpointError, load_adapters, save_adapters
from common.records import CLASS_MEANS_FILE
from server_app.resume import save_resume_arrays
from server_app.round_state import RoundState
from server_app.run_context import ServerRun

log = logging.getLogger(__name__)


class CheckpointStep:
    name = "checkpoint"

    def __init__(self, run: ServerRun, aggregation: str, global_model: bool, checkpoint_every: int,
                 generator_base: str, server_generator_frequency: int, ema_decay: float = 0.0) -> None:
        self.run = run
        self.aggregation = aggregation
        self.global_model = global_model
        self.checkpoint_every = checkpoint_every
        self.generator_base = generator_base
        self.server_generator_frequency = server_generator_frequency
        self.best: float | None = self._previous_best()  # a resumed run keeps competing with its earlier best
        self.ema_decay = ema_decay
        self.ema: dict[str, torch.Tensor] | None = self._previous_ema()  # a resumed run continues its average

    SELECT_BY = "val_retrieval_acc"
    EMA_FILE = "adapters_ema.safetensors"

    def _previous(self, name: str, what: str):
        """``(adapters, metadata)`` of an earlier round's ``name`` (a resumed run), or ``None``."""
        path = self.ckpt_dir / name
        if not path.is_file():
            return None
        try:
            return load_adapters(path)
        except CheckpointError as err:
            log.warning("%s unreadable (%s): %s starts over", path, err, what)
            return None

    def _previous_ema(self) -> dict[str, torch.Tensor] | None:
        found = self._previous(self.EMA_FILE, "the moving average") if self.ema_decay else None
        return {k: v.float() for k, v in found[0].state_dict().items()} if found else None

    def _previous_best(self) -> float | None:
        found = self._previous("adapters_best.safetensors", "the best checkpoint")
        value = found[1].get(self.SELECT_BY) if found else None
        return float(value) if value is not None else None

    @property
    def ckpt_dir(self) -> Path:
        return self.run.run_dir / "checkpoints"

    def due(self, server_round: int) -> bool:
        return server_round % self.checkpoint_every == 0 or server_round == self.run.num_rounds

    def _save(self, arrays, names: list[str], server_round: int, extra: dict) -> Path:
        adapters = self.run.adapters(arrays)
        paths = [
            save_adapters(self.ckpt_dir / f"{name}.safetensors", adapters, self.run.adapter_config,
                          self.run.class_names, server_round, self.run.config_hash, extra)
            for name in names
        ]
        return paths[0]

    def __call__(self, state: RoundState) -> None:
        r = state.server_round
        if self.due(r):
            if self.global_model and state.arrays is not None:
                path = self._save(state.arrays, [f"adapters_round_{r}", "adapters"], r, {"aggregation": self.aggregation})
                log.info("round %d: global adapters saved to %s", r, path)
            elif not self.global_model:
                for pid, arrays in state.replies.arrays.items():
                    self._save(arrays, [f"adapters_node{pid}_round_{r}", f"adapters_node{pid}"], r,
                               {"aggregation": self.aggregation, "node": pid})
        if self.global_model and state.arrays is not None:  # every round: what a resumed run starts from
            save_resume_arrays(self.run.run_dir, state.arrays, r, self.run.config_hash)
            self._keep_best(state)
            if self.ema_decay:
                self._keep_average(state)
        if state.global_means is not None:
            state.global_means.save(self.run.run_dir / "class_means.safetensors", CLASS_MEANS_FILE, {"round": r})
        generators = self.run.run_dir / "generators"
        for pid, reply in state.replies.nodes.items():
            if reply.bank is not None:
                reply.bank.save_pretrained(generators, base=self.generator_base, node_id=pid, round=r,
                                           checkpoint_every=self.checkpoint_every, encoder_key=reply.encoder_key)
        if state.server_bank is not None:
            paths = state.server_bank.save_pretrained(generators, base=self.generator_base, node_id=None, round=r,
                                                      checkpoint_every=self.server_generator_frequency,
                                                      encoder_key=state.replies.encoder_key)
            log.info("round %d: server generator saved: %s", r, [p.name for p in paths])

    def _keep_best(self, state: RoundState) -> None:
        """``adapters_best.safetensors`` when this round's global validation accuracy beats every earlier round's."""
        value = state.evaluate_metrics.get(self.SELECT_BY)
        if value is None or (self.best is not None and value <= self.best):
            return
        self.best = float(value)
        self._save(state.arrays, ["adapters_best"], state.server_round,
                   {"aggregation": self.aggregation, "selected-by": self.SELECT_BY, self.SELECT_BY: float(value)})
        log.info("round %d: best global %s so far (%.4f): adapters_best.safetensors", state.server_round,
                 self.SELECT_BY, value)

    def _keep_average(self, state: RoundState) -> None:
        """``adapters_ema.safetensors``: ``ema = decay * ema + (1 - decay) * this round's global adapters``.

        Why: with sites holding different classes the global model swings from round to round (each
        round's KD or FedAvg result depends on that round's drifted node models and generator samples);
        the average over rounds is steadier. It is a checkpoint for users, not what nodes train from.
        """
        adapters = self.run.adapters(state.arrays)
        current = {k: v.detach().float() for k, v in adapters.state_dict().items()}
        if self.ema is None:
            self.ema = current
        else:
            d = self.ema_decay
            self.ema = {k: d * self.ema[k] + (1 - d) * current[k] for k in current}
        adapters.load_state_dict(self.ema)
        save_adapters(self.ckpt_dir / self.EMA_FILE, adapters, self.run.adapter_config, self.run.class_names,
                      state.server_round, self.run.config_hash, {"aggregation": self.aggregation, "ema-decay": self.ema_decay})
