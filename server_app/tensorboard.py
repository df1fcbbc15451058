"""Optional TensorBoard logging (``logging.tensorboard = true``): scalars per round and image grids.

Why optional: the report (``report.html``) already shows every figure offline; TensorBoard is for
people who compare many runs in one dashboard. It needs the ``tensorboard`` package
(``pip install 'feda2v[tensorboard]'``); without it the run says so once and goes on. Events go to
``<run>/tensorboard/`` (``tensorboard --logdir outputs`` shows every run).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from server_app.round_state import RoundState

log = logging.getLogger(__name__)


def open_writer(log_dir: Path) -> Any | None:
    """A ``SummaryWriter`` on ``log_dir``, or ``None`` with a clear message when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        log.warning("logging.tensorboard = true, but TensorBoard cannot be used (%s): install it with "
                    "pip install 'feda2v[tensorboard]'; the run goes on without TensorBoard logs", err)
        return None
    return SummaryWriter(log_dir=str(log_dir))


class TensorBoardStep:
    """The 'tensorboard' step, last of a round: the round's metrics and its contact sheets."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, images_dir_of_round) -> None:
        """``images_dir_of_round(r)``: where the round's images (and contact sheets) are."""
        self.writer = open_writer(log_dir)
        self.images_dir_of_round = images_dir_of_round

    def __call__(self, state: RoundState) -> None:
        if self.writer is None:
            return
        r = state.server_round
        scalars = {f"train/{k}": v for k, v in state.metrics.items()}
        scalars.update({f"evaluate/{k}": v for k, v in state.evaluate_metrics.items()})
        scalars.update({f"render/{k}": v for k, v in (state.render_metrics or {}).items()})
        for node, metrics in state.evaluate_nodes.items():
            scalars.update({f"node_{node}/{k}": v for k, v in metrics.items() if "acc" in k or k.endswith("_loss")})
        for node, metrics in state.replies.metrics.items():
            scalars.update({f"node_{node}/{k}": v for k, v in metrics.items() if k.startswith("train_loss")})
        for tag, value in scalars.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(tag, float(value), r)
        if state.render_metrics:
            folder = Path(self.images_dir_of_round(r))
            for sheet in sorted(folder.glob("*/contact_sheet.png")):
                with Image.open(sheet) as im:
                    self.writer.add_image(f"images/{sheet.parent.name}", np.asarray(im.convert("RGB")), r, dataformats="HWC")
        self.writer.flush()
