"""What a node carries from one round to the next, kept on its own disk so a SuperNode restart loses nothing.

Flower keeps a node's ``Context.state`` in the SuperNode's memory: a restarted SuperNode starts with
an empty one. Two things must survive: the node's own adapters when there is no global model
(``aggregation = "none"``) and its generator bank (generator modes); the server's records it holds
(:mod:`client_app.held`) use the same files, so a restarted node can still complete a message that
names them by hash. Each is written atomically to
``<node cache-dir>/node-state/<run-name>/partition{id}/{key}_round_{r}`` whenever it changes and read back when the
state lacks it. A node that should have carried something and cannot find it says so in its reply
(``state_lost = 1``) instead of silently starting over; ``state_restored = 1`` when it reloaded
after a restart.

The files belong to one run: the server sends the run's identity (``run-identity`` in the round
config: random, made with the run directory and kept when the run is resumed, see
:mod:`server_app.resume`), and the folder holds it in ``run.json``. Why: the folder is named after the
run name, and a user who deletes ``outputs`` and starts another run of the same name must not
restore the first one's adapters, generators or held records (a node once restored an earlier
run's held weights of a later round, answered "holds d517ed6de717" to a message by reference, and the
round lost its quorum). Flower's own run id cannot serve: a resumed run is a new Flower run that must
restore its state. A folder of another identity (or of none) is emptied, with a warning, before
anything is read (:meth:`DiskState.claim`), and every file also carries the identity in its metadata,
so a file of another run is never loaded even if two runs race on one folder.

Between messages the bulky records live **on disk only** (:class:`DiskState`): ``Context.state`` keeps
their small ``-meta`` records and an ``on-disk`` note. Why: in a deployment Flower moves the whole
Context between the SuperNode and every ClientApp process, in (``pull-task-input``) and out
(``push-task-output``), so a state holding the adapters or a generator bank (tens of MB) cost every
message two large transfers, and Flower gives the final push only 5 s before it ends the exiting
process (``FORCE_EXIT_TIMEOUT_SECONDS`` in ``flwr/supercore/constant.py``). On busy cores a large push
was cut off; the SuperNode then kept the task open until its token expired (60 s) and answered the
node's next message of that run with "ClientApp stopped responding".
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from common.atomic import atomic_write_json
from common.checkpoints import CheckpointError, load_tensors, save_tensors
from common.names import safe_name

log = logging.getLogger(__name__)

LOCAL_ADAPTERS = "local-adapters"  # Context.state key of a node's own adapters (no global model)


IDENTITY_FILE = "run.json"  # {"run-identity": str}: the run whose state the folder holds


def run_folder(run_name: str) -> str:
    """The folder name of a run on a node (node state, generator checkpoints): the server's run name made
    safe for a file name (a message without one: ``unnamed``)."""
    return safe_name(run_name or "unnamed")


def state_dir(cache_dir: Path, run_name: str, partition_id: int) -> Path:
    return Path(cache_dir) / "node-state" / run_folder(run_name) / f"partition{int(partition_id)}"


KEEP = 2  # newest rounds kept per key: a resumed run may restart one round before the newest file


def _files(directory: Path, key: str) -> dict[int, Path]:
    out = {}
    for path in Path(directory).glob(f"{key}_round_*.safetensors"):
        r = path.stem.removeprefix(f"{key}_round_")
        if r.isdigit():
            out[int(r)] = path
    return out


def persist(state: RecordDict, directory: Path, keys: tuple[str, ...], server_round: int,
            identity: str | None = None) -> list[str]:
    """Write the ``keys`` present in ``state`` (ArrayRecords, with their ``-meta`` ConfigRecord if any) as
    this round's files, tagged with the run's ``identity``; files older than the newest :data:`KEEP` rounds
    are removed. Returns the keys written."""
    written = []
    for key in keys:
        if key not in state:
            continue
        meta_key = f"{key}-meta"
        record_meta = dict(state[meta_key]) if meta_key in state else {}
        meta = {"type": "node-state", "key": key, "round": int(server_round), "record-meta": record_meta}
        if identity is not None:
            meta["run-identity"] = identity
        save_tensors(Path(directory) / f"{key}_round_{int(server_round)}.safetensors",
                     state[key].to_torch_state_dict(), meta)  # type: ignore[union-attr]
        for r, path in _files(directory, key).items():
            if r <= server_round - KEEP:
                path.unlink(missing_ok=True)
        written.append(key)
    return written


def restore(state: RecordDict, directory: Path, keys: tuple[str, ...], server_round: int,
            identity: str | None = None) -> list[str]:
    """Load the ``keys`` missing from ``state`` from the newest file of a round before ``server_round`` (never
    from this round or later: a stopped run's unfinished rounds must not leak into its resumed ones).
    With an ``identity``, a file tagged with another run's is skipped (logged). Returns the keys restored."""
    restored = []
    for key in keys:
        if key in state:
            continue
        earlier = {r: p for r, p in _files(directory, key).items() if r < server_round}
        if not earlier:
            continue
        path = earlier[max(earlier)]
        try:
            tensors, meta = load_tensors(path)
        except CheckpointError as err:
            log.warning("node state %s is unreadable (%s): not restored", path, err)
            continue
        if identity is not None and meta.get("run-identity") != identity:
            log.warning("node state %s belongs to another run (run identity %r, this run's %r): not restored",
                        path, meta.get("run-identity"), identity)
            continue
        state[key] = ArrayRecord(tensors)
        if meta.get("record-meta"):
            state[f"{key}-meta"] = ConfigRecord(dict(meta["record-meta"]))
        restored.append(key)
    return restored


ON_DISK = "on-disk"  # Context.state ConfigRecord {key: True}: records this node keeps on its disk only


def claim(directory: Path, identity: str) -> list[str]:
    """Make ``directory`` the state folder of the run ``identity``: a folder that holds another run's state
    (another identity in :data:`IDENTITY_FILE`, or state files and no identity at all) is emptied of its
    state files, with a warning, so nothing of that run is ever restored. Returns the files removed."""
    directory = Path(directory)
    owner = _identity_of(directory)
    if owner == identity:
        return []
    stale = sorted(p.name for p in directory.glob("*_round_*.safetensors")) if directory.is_dir() else []
    for name in stale:
        (directory / name).unlink(missing_ok=True)
    if stale:
        log.warning("%s holds the node state of another run of this name (run identity %r, this run's %r): not "
                    "restored, %d file(s) removed; this node starts the run clean", directory, owner, identity,
                    len(stale))
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / IDENTITY_FILE, {"run-identity": identity})
    return stale


def _identity_of(directory: Path) -> str | None:
    """The run identity a state folder says it holds (``None``: no folder, no file, or unreadable)."""
    path = Path(directory) / IDENTITY_FILE
    try:
        value = json.loads(path.read_text()).get("run-identity")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


@dataclass
class DiskState:
    """One message's dealings with the node's state directory, and what the Context may leave behind.

    Every record this message read from or wrote to ``directory`` is on disk (and a pretrained generator
    bank, in its checkpoints, which the app adds to :attr:`on_disk`); :meth:`release` takes
    those ArrayRecords out of the Context state before the reply (their ``-meta`` records and the
    :data:`ON_DISK` note stay) so the Context that travels back to the SuperNode is small. A record
    whose write failed stays in memory: it still serves this SuperNode's life.
    """

    directory: Path
    identity: str = ""  # the run's identity (the server's ``run-identity``): the folder holds no other run's state
    on_disk: set[str] = field(default_factory=set)

    def claim(self) -> list[str]:
        """:func:`claim`: call it before anything is read; returns the files of another run removed."""
        return claim(self.directory, self.identity)

    def restore(self, state: RecordDict, keys: tuple[str, ...], server_round: int) -> list[str]:
        """:func:`restore`; returns the keys reloaded after a restart (a key the Context notes as
        :data:`ON_DISK` was released by an earlier message, not lost)."""
        noted = _noted(state)
        restored = restore(state, self.directory, keys, server_round, self.identity)
        self.on_disk.update(restored)
        return [k for k in restored if k not in noted]

    def persist(self, state: RecordDict, keys: tuple[str, ...], server_round: int) -> None:
        """:func:`persist`; the keys written may leave the Context."""
        self.on_disk.update(persist(state, self.directory, keys, server_round, self.identity))

    def release(self, state: RecordDict) -> list[str]:
        """Remove the ArrayRecords that are on disk from ``state`` and note them; returns the keys removed."""
        released = sorted(k for k in self.on_disk if isinstance(state.get(k), ArrayRecord))
        if not released:
            return []
        state[ON_DISK] = ConfigRecord({**_noted(state), **dict.fromkeys(released, True)})
        _drop(state, released)
        return released


def release_noted(state: RecordDict) -> list[str]:
    """After a failed message: remove the ArrayRecords that the :data:`ON_DISK` note says are on disk
    (the failed message's changes to them never reached the server); returns the keys removed. Why:
    the Context goes back to the SuperNode after a failure too, within Flower's 5 s."""
    removed = sorted(k for k in _noted(state) if isinstance(state.get(k), ArrayRecord))
    _drop(state, removed)
    return removed


def _noted(state: RecordDict) -> dict:
    """The :data:`ON_DISK` note of ``state`` ({key: True}; empty without one)."""
    return dict(state[ON_DISK]) if ON_DISK in state else {}  # type: ignore[arg-type]


def _drop(state: RecordDict, keys: list[str]) -> None:
    for key in keys:
        del state[key]
