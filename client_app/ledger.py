"""A site's privacy ledger: every DP release of its data, kept on the site across rounds, resumes and runs.

Why a file of its own, outside the run's node state: the node state of a run is removed when another run
of the same name starts (:meth:`client_app.node_state.DiskState.claim`), but a site's privacy loss is
spent for good. The ledger is keyed by the dataset (its folder's id on this host) and the partition, lives
in ``<node cache dir>/privacy/``, is read back by every later run on the same data, and is written (atomically,
under a file lock: two runs may share a host) before the reply that carries the release leaves the node.
A replayed round is a new release with fresh noise and is counted again; a crash after the write but before
the reply over-counts, which is safe.

Also kept per run (``runs.<run identity>``): the noisy class counts the run released once, so a resumed run
reuses them instead of drawing (and paying for) new ones.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from common.atomic import atomic_write_json
from common.privacy import Release

__all__ = ["LEDGER_SCHEMA", "LedgerError", "LedgerEntry", "PrivacyLedger"]

log = logging.getLogger(__name__)

LEDGER_SCHEMA = 1


class LedgerError(ValueError):
    """The ledger file cannot be read as a ledger: refusing to release anything is the safe answer."""


@dataclass(frozen=True)
class LedgerEntry:
    run_identity: str
    run_name: str
    server_round: int
    release: Release


class PrivacyLedger:
    """The releases recorded in ``path`` (read on open; :meth:`append` re-reads under the lock)."""

    def __init__(self, path: Path, dataset: str, partition_id: int) -> None:
        self.path = Path(path)
        self.lock = FileLock(str(self.path) + ".lock")
        self.dataset, self.partition_id = dataset, partition_id
        self.entries: list[LedgerEntry] = []
        self.runs: dict[str, dict[str, Any]] = {}
        with self.lock:
            self._read()

    @classmethod
    def for_data(cls, cache_dir: Path, dataset: str, partition_id: int) -> "PrivacyLedger":
        """The ledger of ``dataset`` (a :func:`common.cache.key.dataset_id`) and partition on this host."""
        return cls(Path(cache_dir) / "privacy" / f"ledger_{dataset}_p{int(partition_id)}.json", dataset, partition_id)

    def _read(self) -> None:
        if not self.path.is_file():
            self.entries, self.runs = [], {}
            return
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("schema") != LEDGER_SCHEMA:
                raise LedgerError(f"schema {doc.get('schema')!r}, expected {LEDGER_SCHEMA}")
            self.entries = [LedgerEntry(str(e["run_identity"]), str(e.get("run_name", "")), int(e["round"]),
                                        Release.from_dict(e)) for e in doc["releases"]]
            self.runs = {str(k): dict(v) for k, v in doc.get("runs", {}).items()}
        except LedgerError as err:
            raise LedgerError(f"privacy ledger {self.path}: {err}") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise LedgerError(f"privacy ledger {self.path} is unreadable ({type(err).__name__}: {err}); it is the "
                              "record of this site's privacy loss: restore it from a backup rather than delete it"
                              ) from None

    def _write(self) -> None:
        atomic_write_json(self.path, {
            "schema": LEDGER_SCHEMA, "dataset": self.dataset, "partition_id": self.partition_id,
            "releases": [{"run_identity": e.run_identity, "run_name": e.run_name, "round": e.server_round,
                          **e.release.to_dict()} for e in self.entries],
            "runs": self.runs, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })

    def releases(self, run_identity: str | None = None) -> list[Release]:
        """Every release on record (of one run with ``run_identity``)."""
        return [e.release for e in self.entries if run_identity is None or e.run_identity == run_identity]

    def append(self, run_identity: str, run_name: str, server_round: int, releases: list[Release],
               run_record: dict[str, Any] | None = None, check: Callable[[], None] | None = None) -> None:
        """Record ``releases`` (and this run's record, e.g. its noisy counts) before they leave the site.

        ``check`` runs under the lock once the file is read again, before anything is written: another run on
        this host may have spent budget since this one planned its round, so the budget is checked where no
        other writer can come between the check and the record. If it raises, nothing is recorded."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            self._read()  # another run on this host may have written since we opened it
            if check is not None:
                check()
            self.entries.extend(LedgerEntry(run_identity, run_name, server_round, r) for r in releases)
            if run_record is not None:
                self.runs[run_identity] = run_record
            self._write()
