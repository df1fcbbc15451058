"""Prompt hand-offs between Flower 1.41's processes: object pulls and the SuperNode's polling.

Why: in a deployment, most of a short round is waiting, not work. Flower 1.41 waits on fixed clocks:

* an object that is not uploaded yet is retried after 1 s, 2 s, 4 s ... (``PULL_INITIAL_BACKOFF`` 1,
  ``PULL_BACKOFF_CAP`` 10 in ``flwr/supercore/constant.py``), in the ServerApp's Grid when it pulls a
  reply whose weights are still arriving and in the SuperNode when it pulls a new message;
* a SuperNode that found no message sleeps 3 s before asking the SuperLink again
  (``flwr/supernode/start_client_internal.py``), so every message waits 1.5 s on average before its
  node even sees it; while its ClientApp works it checks for the reply every 0.5 s.

:func:`prompt_pulls` gives one module's ``pull_objects`` a 0.05-0.5 s backoff (unlimited tries within
Flower's own time limit, ``PULL_MAX_TIME``). The ServerApp's Grid has its own, bounded by each phase's
deadline (:mod:`server_app.grid`: the app imports no deployment tooling). :func:`patch_supernode`
applies it to the SuperNode and shortens its
sleeps: the idle poll to ``FEDA2V_SUPERNODE_IDLE_POLL`` seconds (default :data:`IDLE_POLL`), the local
reply checks to :data:`LOCAL_POLL`. ``feda2v-supernode`` (:func:`main`) is ``flower-supernode`` with
that patch, same arguments; with ``--isolation subprocess`` (Flower's default) it also starts
``feda2v-superexec`` instead of ``flower-superexec``, so its ClientApp processes start warm
(:mod:`ops.deploy.warm_superexec`). A site chooses it instead of ``flower-supernode``
(``LocalFederation(prompt_supernodes=True)``, ``bench/round_latency.py``); Flower's own binaries stay
the documented default. An unknown Flower layout is left alone and logged, never a crash. Imports
only Flower and the standard library (the SuperNode's host needs neither torch nor this project's
models; the SuperExec's forkserver imports torch where the ClientApps run).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from types import ModuleType
from typing import Any

from common.flower_compat import flower_version_mismatch, global_mismatch, keyword_mismatch, mismatches, source_mismatch
from ops.deploy.warm_superexec import warm_supernode

log = logging.getLogger(__name__)

# Backoff of prompt object pulls (seconds): first retry, and the largest wait between two
PULL_BACKOFF, PULL_BACKOFF_CAP = 0.05, 0.5
# The SuperNode's wait before asking the SuperLink again when it found no message (Flower: 3 s). Each
# ask is one small request; 0.5 s keeps a hundred nodes at 200 requests/s on the SuperLink.
IDLE_POLL = 0.5
IDLE_POLL_ENV = "FEDA2V_SUPERNODE_IDLE_POLL"
# The SuperNode's checks of its own store for a ClientApp's reply (Flower: 0.5 s); local, no network.
LOCAL_POLL = 0.05
_FLOWER_IDLE_SLEEP = 3  # the literal in start_client_internal's loop


def prompt_pulls(module: ModuleType) -> bool:
    """Wrap ``module.pull_objects`` with :data:`PULL_BACKOFF` / :data:`PULL_BACKOFF_CAP` and unlimited tries.

    Idempotent; explicit keyword arguments of a caller win. Returns whether ``module`` had a
    ``pull_objects`` to wrap.
    """
    original = getattr(module, "pull_objects", None)
    if original is None:
        log.info("%s has no pull_objects: its object pulls keep Flower's backoff", module.__name__)
        return False
    if getattr(original, "feda2v_prompt", False):
        return True

    @functools.wraps(original)
    def prompt(object_ids: Any, pull_object_fn: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("initial_backoff", PULL_BACKOFF)
        kwargs.setdefault("backoff_cap", PULL_BACKOFF_CAP)
        kwargs.setdefault("max_tries_per_object", None)
        return original(object_ids, pull_object_fn, **kwargs)

    prompt.feda2v_prompt = True  # type: ignore[attr-defined]
    module.pull_objects = prompt  # type: ignore[attr-defined]
    return True


class PromptSleep:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: only ``sleep`` differs.

    Flower's idle sleep (3 s) becomes ``idle`` seconds; any other sleep (its 0.5-s checks of the
    node's own store) is capped at ``local``.
    """

    feda2v_prompt = True

    def __init__(self, idle: float, local: float = LOCAL_POLL) -> None:
        if idle <= 0 or local <= 0:
            raise ValueError(f"poll intervals must be > 0 (idle {idle}, local {local})")
        self.idle, self.local = float(idle), float(local)

    def sleep(self, seconds: float) -> None:
        time.sleep(self.idle if seconds == _FLOWER_IDLE_SLEEP else min(seconds, self.local))

    def __getattr__(self, name: str) -> Any:  # time.time, time.monotonic, ...: the real module's
        return getattr(time, name)


def idle_poll_from_env(environ: dict[str, str] | None = None) -> float:
    """The idle poll in seconds from ``FEDA2V_SUPERNODE_IDLE_POLL`` (default :data:`IDLE_POLL`)."""
    raw = (os.environ if environ is None else environ).get(IDLE_POLL_ENV, "").strip()
    if not raw:
        return IDLE_POLL
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{IDLE_POLL_ENV} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{IDLE_POLL_ENV} must be > 0, got {raw!r}")
    return value


def flower_mismatches() -> list[str]:
    """What :func:`patch_supernode` assumes of the installed Flower's SuperNode loop and is not so."""
    try:
        from flwr.supernode import start_client_internal as loop
    except ImportError as err:
        return [f"flwr.supernode.start_client_internal cannot be imported ({err})"]
    return mismatches(
        flower_version_mismatch(),
        global_mismatch(loop, "time", time),
        source_mismatch(loop, [f"time.sleep({_FLOWER_IDLE_SLEEP})"]),
        keyword_mismatch(getattr(loop, "pull_objects", None), "flwr.supernode.start_client_internal.pull_objects",
                         ("initial_backoff", "backoff_cap", "max_tries_per_object")),
    )


def patch_supernode(idle: float | None = None) -> bool:
    """Prompt pulls and short sleeps in this process's Flower SuperNode loop; returns whether it applied
    (an installed Flower that does not match :func:`flower_mismatches` keeps its own timing, with a warning)."""
    problems = flower_mismatches()
    if problems:
        log.warning("the SuperNode keeps Flower's timing: %s", "; ".join(problems))
        return False
    from flwr.supernode import start_client_internal as loop

    loop.time = PromptSleep(idle_poll_from_env() if idle is None else idle)  # type: ignore[assignment]
    return prompt_pulls(loop)


def main() -> None:
    """``feda2v-supernode``: ``flower-supernode`` (same arguments) with :func:`patch_supernode` applied and,
    with ``--isolation subprocess``, ``feda2v-superexec`` as its SuperExec (warm ClientApp processes)."""
    from flwr.supernode.cli import flower_supernode

    try:
        idle = idle_poll_from_env()
    except ValueError as err:
        raise SystemExit(f"feda2v-supernode: {err}") from None
    patch_supernode(idle)
    warm_supernode()  # its SuperExec forks ClientApps from a preloaded process (ops.deploy.warm_superexec)
    flower_supernode()


if __name__ == "__main__":
    main()
