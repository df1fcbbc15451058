"""What every server step shares for the whole run: built once by the ServerApp, read-only after.

Why a small object instead of the whole configuration: a step should say what it needs. Steps get
this (where the run writes, the class targets, how to rebuild adapters from weights) plus their own
config section, never the full ``FedA2VConfig``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from common.models.adapters import Adapters
from common.records import ClassTensors, arrays_to_module


@dataclass(frozen=True)
class ServerRun:
    run_dir: Path
    targets: ClassTensors  # the federation's classes, in label order, and their text targets
    template: Adapters  # architecture to load weights into (never trained itself)
    adapter_config: dict[str, Any]
    config_hash: str
    num_rounds: int
    device: torch.device

    @property
    def class_names(self) -> list[str]:
        return self.targets.class_names

    def adapters(self, arrays: ArrayRecord) -> Adapters:
        """A fresh model holding ``arrays`` (the template is copied, never modified)."""
        return arrays_to_module(arrays, copy.deepcopy(self.template))  # type: ignore[return-value]
