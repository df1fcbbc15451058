"""How a node trains and summarises in one round: plainly, or under the site's differential privacy.

Why an object: the train handler reads the same top to bottom either way (augment, train, class means,
metrics, reply); what changes with DP (who samples the batches, what noise goes where, which counts are
reported, the ledger written before the reply leaves) lives in :class:`client_app.privacy.PrivateTraining`,
chosen once per message by the train handler.
"""

from __future__ import annotations

from torch import Tensor

from client_app.session import NodeSession
from client_app.sources import TrainingSet
from common.metric_keys import NUM_EXAMPLES
from common.models.adapters import Adapters
from common.records import ClassTensors
from common.training import TrainSettings, class_mean_outputs, train_adapters

__all__ = ["LocalTraining", "shared_means"]


class LocalTraining:
    """Training and class means without DP: what every node did before DP existed."""

    def __init__(self, session: NodeSession, data: TrainingSet) -> None:
        self.session, self.data = session, data

    def augment_to(self, requested: int) -> int:
        """How many samples per thin class the server's generator may fill up to (``train.augment-to``)."""
        return requested

    def train(self, adapters: Adapters, x: Tensor, y: Tensor, targets: ClassTensors, settings: TrainSettings
              ) -> dict[str, float]:
        return train_adapters(adapters, x, y, targets.clip, targets.t5, settings, self.session.site.device)

    def class_means(self, adapters: Adapters) -> tuple[ClassTensors, dict[str, int]]:
        """The class means this node may share over its own embeddings (never the server generator's samples),
        and how much it withheld (``withheld_classes``, ``withheld_clips``)."""
        data = self.data
        clip, t5, counts = class_mean_outputs(adapters, data.embeddings, data.labels, len(data.class_names),
                                              self.session.site.device)
        return shared_means(self.session, data.class_names, clip, t5, counts)

    def reported(self, metrics: dict) -> dict:
        """The train reply's metrics: ``num-examples`` is the number of training rows."""
        return {NUM_EXAMPLES: int(self.data.labels.numel()), **metrics}

    def commit(self) -> None:
        """Called once the releases are computed, before the reply is built: nothing to record without DP."""


def shared_means(session: NodeSession, class_names: list[str], clip: Tensor, t5: Tensor, counts: Tensor) -> tuple[ClassTensors, dict[str, int]]:
    """The class means above the site's floor (:class:`client_app.policy.SitePolicy`), and how much was withheld."""
    shared = set(session.site.policy.shareable_classes(dict(zip(class_names, counts.tolist()))))
    present = [i for i, c in enumerate(class_names) if c in shared]
    withheld = [i for i, n in enumerate(counts.tolist()) if n > 0 and class_names[i] not in shared]
    means = ClassTensors([class_names[i] for i in present], clip[present], t5[present], counts[present])
    return means, {"withheld_classes": len(withheld),  # privacy.min-class-count: too few clips to share a mean
                   "withheld_clips": int(counts[withheld].sum()) if withheld else 0}
