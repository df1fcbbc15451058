"""``feda2v-superexec``: Flower's SuperExec whose ClientApp processes start warm (forked, not exec'd).

Why: in a deployment Flower 1.41 runs every message in a fresh ``flwr-clientapp`` process (its
SuperExec's subprocess executor, ``flwr/supercore/superexec/executor/subprocess_executor.py``; warm
executors exist only in its Kubernetes executor). Each one starts Python and imports Flower and torch
before the app runs, twice a round: the largest part of a loopback round's overhead (docs/cost.md,
the ``round_latency`` benchmark).

:class:`ForkserverExecutor` starts ClientApp tasks through Python's ``multiprocessing`` forkserver:
one server process imports :data:`PRELOAD` (Flower's ClientApp runtime, torch, numpy, safetensors)
once when the SuperExec starts, and every task is a fork of it that runs Flower's own
``flwr-clientapp`` entry point with the same arguments the subprocess executor would pass. The
app's own modules are never preloaded: each task imports them from the FAB it installs, as before.
Other task types (and any task once the forkserver cannot start) go to Flower's subprocess executor.

``feda2v-superexec`` takes ``flower-superexec``'s arguments (use it where a site runs
``flower-superexec --plugin-type clientapp`` beside a ``--isolation process`` SuperNode);
``feda2v-supernode`` (:mod:`ops.deploy.prompt_timing`) starts it in place of ``flower-superexec``.
``FEDA2V_SUPEREXEC_PRELOAD`` (comma-separated modules) replaces :data:`PRELOAD`; ``none`` turns the
warm start off. Imports only Flower and the standard library here; the forkserver imports the rest.
Why forked tasks are safe: the forkserver is a fresh interpreter that only imported modules (no
threads, no torch work), which is what ``multiprocessing`` and torch's own data loaders rely on.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND, ExecutorType, TaskType
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

from common.flower_compat import flower_version_mismatch, global_mismatch, keyword_mismatch, mismatches, source_mismatch

log = logging.getLogger(__name__)

# Imported once by the forkserver: Flower's ClientApp runtime and the heavy libraries every task imports.
PRELOAD = ("flwr.supernode.cli.flwr_clientapp", "torch", "torchaudio", "numpy", "safetensors.torch", "soundfile")
PRELOAD_ENV = "FEDA2V_SUPEREXEC_PRELOAD"


def preload_from_env(environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """The modules to preload: ``FEDA2V_SUPEREXEC_PRELOAD`` (comma-separated; ``none``: no warm start)."""
    raw = (os.environ if environ is None else environ).get(PRELOAD_ENV, "").strip()
    if not raw:
        return PRELOAD
    if raw.lower() == "none":
        return ()
    modules = tuple(m.strip() for m in raw.split(",") if m.strip())
    bad = [m for m in modules if not all(part.isidentifier() for part in m.split("."))]
    if bad:
        raise ValueError(f"{PRELOAD_ENV} must name Python modules separated by commas, got {bad}")
    return modules


SPEC_FIELDS = ("task_type", "runtime_api_address", "token", "insecure", "root_certificates_path", "parent_pid",
               "runtime_dependency_install")  # what clientapp_argv reads


def clientapp_argv(spec: ExecutionSpec) -> list[str]:
    """``flwr-clientapp``'s arguments for an ``ExecutionSpec``, as Flower's subprocess executor builds them."""
    args = [TASK_TYPE_TO_COMMAND[spec.task_type], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
            spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args.extend(["--root-certificates", spec.root_certificates_path])
    if spec.parent_pid is not None:
        args.extend(["--parent-pid", str(spec.parent_pid)])
    if spec.runtime_dependency_install:
        args.append("--allow-runtime-dependency-installation")
    return args


def run_task(argv: Sequence[str], quiet: bool) -> None:
    """The forked task: Flower's ``flwr-clientapp`` entry point with ``argv`` (it exits by itself).

    This project's own modules, imported here to reach this function, are dropped first: the task
    imports the app from the FAB it installs (Flower puts the FAB's folder first on ``sys.path``), and
    a module already in ``sys.modules`` would shadow the FAB's copy."""
    own = __name__.split(".")[0]
    for name in [n for n in sys.modules if n == own or n.startswith(own + ".")]:
        del sys.modules[name]
    if quiet:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    sys.argv = list(argv)
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()


class ForkserverExecutor(SubprocessExecutor):
    """Flower's subprocess executor with ClientApp tasks forked from a preloaded forkserver."""

    def __init__(self, preload: Sequence[str] = PRELOAD) -> None:
        self.preload = tuple(preload)
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(list(self.preload))
        try:  # the forkserver imports the preload now, not in the first message's time
            from multiprocessing import forkserver

            forkserver.ensure_running()
        except OSError as err:
            log.warning("the ClientApp forkserver did not start (%s): tasks start as fresh processes", err)
            self._ctx = None

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Fork a ClientApp task from the forkserver; any other task (or no forkserver): Flower's launch."""
        if self._ctx is None or spec.task_type != TaskType.CLIENT_APP:
            return super().launch(spec)
        try:
            proc = self._ctx.Process(target=run_task, args=(clientapp_argv(spec), spec.suppress_output),
                                     name=f"flwr-clientapp-{spec.task_id}")
            proc.start()
        except OSError as err:
            log.warning("forking ClientApp task %s failed (%s): starting it as a fresh process", spec.task_id, err)
            return super().launch(spec)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished tasks (``multiprocessing.active_children`` joins them)."""
        multiprocessing.active_children()


def install(preload: Sequence[str] | None = None) -> bool:
    """Make this process's Flower SuperExec use :class:`ForkserverExecutor` for its subprocess executor;
    returns whether it applied (an unknown Flower layout is logged and left alone)."""
    modules = preload_from_env() if preload is None else tuple(preload)
    if not modules:
        log.info("%s=none: ClientApp tasks start as fresh processes", PRELOAD_ENV)
        return False
    problems = flower_mismatches()
    if problems:
        log.warning("ClientApp tasks start as fresh processes (Flower's SuperExec): %s", "; ".join(problems))
        return False
    from flwr.supercore.superexec import run_superexec as superexec

    original = superexec.get_executor
    if getattr(original, "feda2v_warm", False):
        return True

    def get_executor(executor_type: Any, *args: Any, **kwargs: Any) -> Any:
        if executor_type == ExecutorType.SUBPROCESS:
            return ForkserverExecutor(modules)
        return original(executor_type, *args, **kwargs)

    get_executor.feda2v_warm = True  # type: ignore[attr-defined]
    superexec.get_executor = get_executor  # type: ignore[attr-defined]
    return True


SUPEREXEC = "feda2v-superexec"


class WarmSuperExecLauncher:
    """Stands in for the ``subprocess`` module inside Flower's SuperNode (``--isolation subprocess``): the
    ``flower-superexec`` it starts becomes ``feda2v-superexec`` with the same arguments."""

    feda2v_stand_in = True

    def Popen(self, args: Sequence[str], *rest: Any, **kwargs: Any) -> subprocess.Popen:  # noqa: N802 - subprocess's name
        args = list(args)
        if args and os.path.basename(str(args[0])) == "flower-superexec":
            args[0] = SUPEREXEC
        return subprocess.Popen(args, *rest, **kwargs)

    def __getattr__(self, name: str) -> Any:  # subprocess.DEVNULL, ...: the real module's
        return getattr(subprocess, name)


def flower_mismatches() -> list[str]:
    """What :func:`install` and :func:`warm_supernode` assume of the installed Flower and is not so."""
    try:
        from flwr.supercore.superexec import run_superexec as superexec
        from flwr.supernode import start_client_internal as loop
    except ImportError as err:
        return [f"Flower's SuperExec or SuperNode module cannot be imported ({err})"]
    return mismatches(
        flower_version_mismatch(),
        keyword_mismatch(getattr(superexec, "get_executor", None), "flwr.supercore.superexec.run_superexec.get_executor",
                         ("executor_type",)),
        global_mismatch(loop, "subprocess", subprocess),
        source_mismatch(loop, ['"flower-superexec"', "subprocess.Popen("]),
        *(None if hasattr(ExecutionSpec, field) or field in getattr(ExecutionSpec, "__dataclass_fields__", {})
          else f"ExecutionSpec has no {field}" for field in SPEC_FIELDS),
    )


def warm_supernode() -> bool:
    """Make this process's Flower SuperNode start ``feda2v-superexec``; returns whether it applied."""
    problems = flower_mismatches()
    if problems:
        log.warning("ClientApps start as fresh processes (Flower's SuperExec): %s", "; ".join(problems))
        return False
    from flwr.supernode import start_client_internal as loop

    if not isinstance(loop.subprocess, WarmSuperExecLauncher):
        loop.subprocess = WarmSuperExecLauncher()  # type: ignore[attr-defined]
    return True


def main() -> None:
    """``feda2v-superexec``: ``flower-superexec`` (same arguments) with :func:`install` applied."""
    from flwr.supercore.cli import flower_superexec

    try:
        install()
    except ValueError as err:
        raise SystemExit(f"feda2v-superexec: {err}") from None
    flower_superexec()


if __name__ == "__main__":
    main()
