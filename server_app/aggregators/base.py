"""What an aggregation method is, and the registry that finds one by its config name.

Adding a method: one new module in this package with a subclass of :class:`Aggregator`, decorated
with :func:`register`, plus its name in ``aggregation``'s choices in the config schema.
"""

from __future__ import annotations

from typing import Any, ClassVar

from flwr.app import ArrayRecord

from common.records import ClassTensors
from server_app.round_state import RoundState, merge_class_means
from server_app.run_context import ServerRun

AGGREGATORS: dict[str, type["Aggregator"]] = {}


def register(cls: type["Aggregator"]) -> type["Aggregator"]:
    if not cls.name or cls.name in AGGREGATORS:
        raise ValueError(f"aggregator name {cls.name!r} is empty or already registered")
    AGGREGATORS[cls.name] = cls
    return cls


class Aggregator:
    """Turns a round's node adapters into the next global adapters (the 'aggregate adapters' step)."""

    name: ClassVar[str] = ""
    #: False: nodes keep their own adapters; there is no global model to checkpoint or render
    global_model: ClassVar[bool] = True

    def __init__(self, run: ServerRun, **_: Any) -> None:
        self.run = run

    def aggregate(self, state: RoundState) -> ArrayRecord | None:
        raise NotImplementedError

    def merge_means(self, class_names: list[str], node_means: dict[int, ClassTensors]) -> ClassTensors:
        """The round's global class means: count-weighted over the nodes that own each class."""
        return merge_class_means(class_names, node_means)

    def extra_steps(self) -> list[Any]:
        """Steps this method adds after the server generator (KD's distillation); none by default."""
        return []
