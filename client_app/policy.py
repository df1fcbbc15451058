"""A site's own privacy settings: what the node enforces whatever the server's run config says.

Why: the run config comes from the server, and a server (buggy, misconfigured or curious) could lower
``privacy.min-class-count`` to 1 and receive a "class mean" that is one clip's adapter output. The site's
operator sets a floor in the SuperNode's ``--node-config`` (``min-class-count``) and the node applies the
stricter of the two. :class:`SitePolicy` is the one place where run and node settings meet for such
limits: later per-site privacy settings join it here, and every use (class means, generator training,
pretrained banks) reads the policy (:attr:`client_app.site.NodeSite.policy`) instead of ``[privacy]`` directly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from common.config import NodeRuntimeConfig, PrivacyConfig

log = logging.getLogger(__name__)

__all__ = ["SitePolicy"]


@dataclass(frozen=True)
class SitePolicy:
    """The privacy limits one node applies: each the stricter of the run's value and the node's own.

    Build it with :meth:`of` (cheap and pure, so every caller derives the same policy from the same
    configs); the server cannot lower a node-config value, only raise the effective one."""

    partition_id: int
    min_class_count: int  # effective floor: max(run privacy.min-class-count, node-config min-class-count)
    run_min_class_count: int  # what the server asked for, kept for the log line
    node_min_class_count: int  # the site's own floor (0: none)
    dp: bool = False  # run privacy.dp or node-config privacy-dp / privacy-epsilon: the server cannot turn it off
    run_epsilon: float = 0.0  # what this run may spend (privacy.epsilon)
    site_epsilon: float = 0.0  # the site's lifetime cap over its ledger (node-config privacy-epsilon; 0: none)
    delta: float = 0.0  # min(run privacy.delta, node-config privacy-delta)
    dp_by_site: bool = False  # DP is on because the site says so (the run config did not ask for it)

    @classmethod
    def of(cls, privacy: PrivacyConfig, node: NodeRuntimeConfig) -> "SitePolicy":
        run_floor, own_floor = privacy.min_class_count, node.min_class_count
        by_site = (node.privacy_dp or node.privacy_epsilon > 0) and not privacy.dp
        delta = min(privacy.delta, node.privacy_delta) if node.privacy_delta > 0 else privacy.delta
        return cls(partition_id=node.partition_id, min_class_count=max(run_floor, own_floor),
                   run_min_class_count=run_floor, node_min_class_count=own_floor, dp=privacy.dp or by_site,
                   run_epsilon=privacy.epsilon, site_epsilon=node.privacy_epsilon, delta=delta, dp_by_site=by_site)

    def budgets(self) -> list[tuple[str, float, bool]]:
        """(name, epsilon, lifetime) of each cap this site's releases must stay within: the run's (over this run's
        releases) and, when the site set one, its own (over every release in its ledger)."""
        caps = [("privacy.epsilon", self.run_epsilon, False)]
        if self.site_epsilon > 0:
            caps.append(("node-config privacy-epsilon", self.site_epsilon, True))
        return caps

    def describe_floor(self) -> str:
        """Where the effective floor comes from, for log lines an operator can act on."""
        if self.node_min_class_count > self.run_min_class_count:
            return (f"node-config min-class-count={self.node_min_class_count} (the run's "
                    f"privacy.min-class-count={self.run_min_class_count} is lower)")
        return f"privacy.min-class-count={self.run_min_class_count}"

    def shareable_classes(self, counts: Mapping[str, int]) -> list[str]:
        """The classes this node may model or summarise: at least :attr:`min_class_count` training clips
        (a generator prior or a mean fitted on one clip is that clip). The others are logged, not shared."""
        withheld = {c: n for c, n in counts.items() if 0 < n < self.min_class_count}
        if withheld:
            log.info("node %d: %s hold fewer than %s training clips: not shared (no generator, no class mean)",
                     self.partition_id, withheld, self.describe_floor())
        return [c for c, n in counts.items() if n >= self.min_class_count]
