"""On-disk embedding store for one (dataset, key): immutable safetensors shards + a checksummed index.

Layout (``<root>`` is ``<cache-dir>/embeddings``)::

    <root>/<dataset-id>/dataset.json            {"root": "/abs/dataset/folder"}
    <root>/<dataset-id>/<key[:16]>/key.json     the key and its fields (what the embeddings depend on)
                                  /index.json   header line {"format", "sha256"} + body line (see below)
                                  /index.lock   file lock serialising index updates
                                  /shards/<time_ns>-<pid>-<rand>.safetensors

Shards: one ``[N, L, H]`` tensor ``embeddings`` in the storage dtype; metadata holds the key, the
entries ``[rel_path, size, mtime_ns]`` in row order and a crc32 per row. A shard is written once
(temp file + fsync + ``os.replace``) and never modified, so readers need no lock and the index can
always be rebuilt from shard metadata alone.

Index body: ``{"key", "entries": {rel_path: [size, mtime_ns, shard, row, crc32]}, "shards":
{name: {"rows", "bytes"}}}``. A clip is a hit only if its current size and mtime match, so an edited
clip is re-extracted. The header's sha256 covers the body bytes, so a garbled index is detected
without re-serialising it, and is then rebuilt from the shards.

Why per-row crc32 (not a per-shard hash): a node loads a small subset of a shared cache, and a
per-shard hash would force it to read whole shards. Rows are read through ``safe_open`` +
``get_slice`` (mmap), so RAM holds only the rows asked for, and each is verified as it is read.

Concurrency: several processes (SuperNodes of one host, simulation actors) may fill the store at
once. Shard names are unique; an index update is read-merge-write under ``index.lock``, and the
index file itself is replaced atomically, so lock-free readers always see a complete index.
Nothing here deletes live data automatically except shards proven corrupt; rows made obsolete by
re-extraction stay until ``feda2v cache verify --repair`` or ``cache clear``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors import safe_open

from common.atomic import atomic_write_bytes, atomic_write_json
from common.cache.key import CACHE_FORMAT, cache_key, dataset_id, diff_fields
from common.cache.rows import ClipId, row_crc32, row_ranges
from common.checkpoints import save_tensors
from common.dtypes import torch_dtype
from common.errors import FedA2VError

log = logging.getLogger(__name__)

__all__ = ["ClipId", "EmbeddingStore", "IndexCorrupt", "VerifyReport", "list_stores", "row_crc32"]

TENSOR = "embeddings"
_KEY_DIR_CHARS = 16
_STALE_TMP_SECONDS = 3600.0


_SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\.safetensors")  # a file directly in shards/, nothing else


class IndexCorrupt(FedA2VError, ValueError):
    """index.json is unreadable, truncated or fails its checksum."""


class _ShardError(Exception):
    """A shard cannot serve rows; ``delete`` when the file is proven corrupt (not merely missing)."""

    def __init__(self, reason: str, delete: bool) -> None:
        super().__init__(reason)
        self.delete = delete


@dataclass
class _Index:
    entries: dict[str, list[Any]] = field(default_factory=dict)  # rel -> [size, mtime_ns, shard, row, crc]
    shards: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> {"rows", "bytes"}


@dataclass
class VerifyReport:
    """What ``verify`` found; ``ok`` is False when anything would make a read fail or drop entries."""

    key_dir: Path
    entries: int = 0
    shards: int = 0
    index_problem: str | None = None
    bad_shards: dict[str, str] = field(default_factory=dict)
    bad_entries: dict[str, str] = field(default_factory=dict)
    orphan_shards: list[str] = field(default_factory=list)  # on disk, not in the index (crashed writer)
    dead_shards: list[str] = field(default_factory=list)  # in the index, no live entry
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return not (self.index_problem or self.bad_shards or self.bad_entries)


class EmbeddingStore:
    """Shards + index of one cache key. Build with :meth:`open` (by fields) or :meth:`existing` (a dir)."""

    def __init__(
        self,
        key_dir: Path,
        key: str,
        fields: dict[str, Any] | None,
        lock_timeout: float = 120.0,
        dataset_root: Path | None = None,
    ) -> None:
        self.dir = Path(key_dir)
        self.dataset_root = dataset_root  # recorded in dataset.json on the first write
        self.key = key  # full sha256, or the directory-name prefix when key.json is unreadable
        self.fields = fields
        self.shard_dir = self.dir / "shards"
        self.index_path = self.dir / "index.json"
        self.lock_timeout = lock_timeout
        self._cached: tuple[tuple[int, int, int], _Index] | None = None
        self._key_change_logged = False  # _log_key_change says it once per store object

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(cls, root: Path, dataset_root: Path, fields: dict[str, Any], lock_timeout: float = 120.0) -> "EmbeddingStore":
        """The store for ``fields`` of the dataset at ``dataset_root``; nothing is created until a write."""
        key = cache_key(fields)
        resolved = Path(dataset_root).expanduser().resolve()
        return cls(Path(root) / dataset_id(resolved) / key[:_KEY_DIR_CHARS], key, fields, lock_timeout, resolved)

    @classmethod
    def existing(cls, key_dir: Path) -> "EmbeddingStore":
        """Open a key directory found on disk (CLI); its fields come from key.json when readable."""
        key_dir = Path(key_dir)
        try:
            doc = json.loads((key_dir / "key.json").read_text())
            return cls(key_dir, str(doc["key"]), dict(doc["fields"]))
        except (OSError, ValueError, KeyError, TypeError):
            return cls(key_dir, key_dir.name, None)

    @property
    def storage_dtype(self) -> str:
        return str((self.fields or {}).get("storage_dtype", "float16"))

    # ------------------------------------------------------------------ index file
    def _read_index_file(self) -> _Index | None:
        """The index on disk; ``None`` if absent; :class:`IndexCorrupt` if it fails any check."""
        try:
            raw = self.index_path.read_bytes()
        except FileNotFoundError:
            return None
        head, sep, body = raw.partition(b"\n")
        body = body[:-1] if body.endswith(b"\n") else body
        try:
            header = json.loads(head)
            if not sep or header.get("format") != CACHE_FORMAT:
                raise IndexCorrupt(f"unknown header {head[:80]!r}")
            if hashlib.sha256(body).hexdigest() != header.get("sha256"):
                raise IndexCorrupt("checksum mismatch (truncated or overwritten)")
            doc = json.loads(body)
            if not str(doc["key"]).startswith(self.key):
                raise IndexCorrupt(f"index belongs to key {doc['key']!r}")
            index = _Index(entries=dict(doc["entries"]), shards=dict(doc["shards"]))
            names = set(index.shards) | {str(e[2]) for e in index.entries.values()}
            bad = sorted(n for n in names if not _SHARD_NAME.fullmatch(n))
            if bad:  # a crafted index must not make us read or delete files outside shards/
                raise IndexCorrupt(f"shard name(s) {bad[:3]} are not plain shard file names")
        except IndexCorrupt:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise IndexCorrupt(f"{type(err).__name__}: {err}") from None
        return index

    def _write_index(self, index: _Index) -> None:
        body = json.dumps(
            {"key": self.key, "entries": index.entries, "shards": index.shards}, separators=(",", ":")
        ).encode()
        header = json.dumps({"format": CACHE_FORMAT, "sha256": hashlib.sha256(body).hexdigest()}).encode()
        atomic_write_bytes(self.index_path, header + b"\n" + body + b"\n")
        self._cached = None

    def _index(self) -> _Index:
        """Current index for reading (no lock): memoised on the file's identity, repaired if corrupt."""
        try:
            st = os.stat(self.index_path)
            sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            sig = None
        if sig is not None and self._cached is not None and self._cached[0] == sig:
            return self._cached[1]
        try:
            index = self._read_index_file()
        except IndexCorrupt:
            index = None  # re-read under the lock below, which logs and rebuilds it
        if index is None:
            if not self._shard_files():
                return _Index()
            try:
                with self._locked() as ok:
                    index = self._load_for_update() if ok else self._rebuild(write=False)
            except OSError as err:  # read-only cache: rebuild in memory only
                log.warning("embedding cache %s: index not repairable here (%s); using shard metadata", self.dir, err)
                index = self._rebuild(write=False)
        elif sig is not None:
            self._cached = (sig, index)
        return index

    def _load_for_update(self, new_shard: str = "") -> _Index:
        """Index to merge into; call with the lock held. Missing or corrupt: rebuilt from the shards
        (other than ``new_shard``, the one the caller is about to add itself)."""
        try:
            index = self._read_index_file()
        except IndexCorrupt as err:
            log.warning("embedding cache %s: index.json is corrupt (%s); rebuilding it from shard metadata", self.dir, err)
            index = None
        if index is None:
            others = [p for p in self._shard_files() if p.name != new_shard]
            index = self._rebuild(write=True) if others else _Index()
        return index

    @contextmanager
    def _locked(self) -> Iterator[bool]:
        """Hold index.lock; yields False (and logs) instead of raising when it cannot be had in time."""
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.dir / "index.lock"), timeout=self.lock_timeout)
        try:
            lock.acquire()
        except Timeout:
            log.warning("embedding cache %s: index lock not acquired in %.0f s; skipping this update", self.dir, self.lock_timeout)
            yield False
            return
        try:
            yield True
        finally:
            lock.release()

    # ------------------------------------------------------------------ shards
    def _shard_files(self) -> list[Path]:
        if not self.shard_dir.is_dir():
            return []
        return sorted(p for p in self.shard_dir.glob("*.safetensors") if not p.name.startswith("."))

    def _shard_meta(self, path: Path) -> tuple[list[list[Any]], list[int], tuple[int, ...]]:
        """(entries, crc32s, shape) from a shard's header only; ``_ShardError`` if it is not valid."""
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                shape = tuple(fh.get_slice(TENSOR).get_shape())
            key = json.loads(meta["key"])
            entries = json.loads(meta["entries"])
            crcs = json.loads(meta["crc32"])
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise _ShardError(f"unreadable header ({type(err).__name__}: {err})", delete=True) from None
        if not str(key).startswith(self.key):
            raise _ShardError(f"belongs to key {str(key)[:16]}", delete=True)
        if not (len(entries) == len(crcs) == shape[0]):
            raise _ShardError(f"{len(entries)} entries / {len(crcs)} checksums for {shape[0]} rows", delete=True)
        return entries, crcs, shape

    def _rebuild(self, write: bool) -> _Index:
        """Index from shard metadata (oldest shard first, so newer rows win); corrupt shards are removed."""
        index = _Index()
        for path in self._shard_files():
            try:
                entries, crcs, _ = self._shard_meta(path)
            except _ShardError as err:
                log.warning("embedding cache %s: shard %s is corrupt (%s)%s", self.dir, path.name, err,
                            "; deleted" if write else "")
                if write:
                    path.unlink(missing_ok=True)
                continue
            index.shards[path.name] = {"rows": len(entries), "bytes": path.stat().st_size}
            for row, ((rel, size, mtime_ns), crc) in enumerate(zip(entries, crcs)):
                index.entries[rel] = [size, mtime_ns, path.name, row, crc]
        if write:
            self._write_index(index)
            log.info("embedding cache %s: index rebuilt from %d shard(s), %d entries", self.dir, len(index.shards), len(index.entries))
        return index

    def _read_rows(self, shard: str, info: dict[str, int] | None, rows: list[int]) -> dict[int, torch.Tensor]:
        """Rows of one shard via mmap slices (only those bytes are read); checks size and key first."""
        path = self.shard_dir / shard
        if info is None:
            raise _ShardError("not listed in the index", delete=False)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise _ShardError("file missing", delete=False) from None
        if size != info.get("bytes"):
            raise _ShardError(f"{size} bytes on disk, {info.get('bytes')} expected (truncated or overwritten)", delete=True)
        out: dict[int, torch.Tensor] = {}
        try:
            with safe_open(str(path), framework="pt") as fh:
                key = json.loads((fh.metadata() or {}).get("key", '""'))
                if not str(key).startswith(self.key):
                    raise _ShardError(f"belongs to key {str(key)[:16]}", delete=True)
                sl = fh.get_slice(TENSOR)
                n = sl.get_shape()[0]
                for a, b in row_ranges(sorted(set(rows))):
                    if b > n:
                        raise _ShardError(f"row {b - 1} requested, shard has {n}", delete=False)
                    block = sl[a:b]
                    for j in range(a, b):
                        out[j] = block[j - a]
        except _ShardError:
            raise
        except Exception as err:
            raise _ShardError(f"unreadable ({type(err).__name__}: {err})", delete=True) from None
        return out

    # ------------------------------------------------------------------ public API
    def lookup(self, ids: Sequence[ClipId | None]) -> list[torch.Tensor | None]:
        """Cached ``[L, H]`` rows (storage dtype) aligned with ``ids``; ``None`` = miss.

        Rows whose checksum fails and shards that are truncated or unreadable are dropped from the
        index with a warning, so the caller recomputes them as ordinary misses.
        """
        out: list[torch.Tensor | None] = [None] * len(ids)
        if not self.dir.is_dir():
            self._log_key_change()
            return out
        index = self._index()
        wanted: dict[str, list[tuple[int, int, int, str]]] = defaultdict(list)
        for i, cid in enumerate(ids):
            if cid is None:
                continue
            entry = index.entries.get(cid.rel_path)
            if entry is not None and entry[0] == cid.size and entry[1] == cid.mtime_ns:
                wanted[entry[2]].append((i, int(entry[3]), int(entry[4]), cid.rel_path))
        bad_shards: dict[str, tuple[str, bool]] = {}
        bad_entries: dict[str, tuple[str, int, str]] = {}
        for shard, items in wanted.items():
            try:
                rows = self._read_rows(shard, index.shards.get(shard), [row for _, row, _, _ in items])
            except _ShardError as err:
                bad_shards[shard] = (str(err), err.delete)
                continue
            for i, row, crc, rel in items:
                tensor = rows[row]
                if row_crc32(tensor) != crc:
                    bad_entries[rel] = (shard, row, "checksum mismatch")
                else:
                    out[i] = tensor
        if bad_shards or bad_entries:
            try:
                self._drop(bad_entries, bad_shards)
            except OSError as err:  # e.g. a read-only cache: the good rows are still served
                log.warning("embedding cache %s: cannot update the index (%s)", self.dir, err)
        return out

    def put(self, ids: Sequence[ClipId], embeddings: torch.Tensor) -> str:
        """Append ``[N, L, H]`` embeddings of ``ids`` as a new shard and merge it into the index."""
        if len(ids) != embeddings.shape[0]:
            raise ValueError(f"{len(ids)} clip ids for {embeddings.shape[0]} embeddings")
        if not ids:
            return ""
        emb = embeddings.detach().to("cpu", torch_dtype(self.storage_dtype)).contiguous()
        crcs = [row_crc32(emb[i]) for i in range(emb.shape[0])]
        self._ensure_layout()
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
        path = save_tensors(
            self.shard_dir / name,
            {TENSOR: emb},
            {"key": self.key, "entries": [[c.rel_path, c.size, c.mtime_ns] for c in ids], "crc32": crcs},
        )
        nbytes = path.stat().st_size
        with self._locked() as ok:
            if not ok:  # the shard stays as an orphan; `cache verify --repair` adopts it
                return name
            index = self._load_for_update(new_shard=name)
            index.shards[name] = {"rows": len(ids), "bytes": nbytes}
            for row, (cid, crc) in enumerate(zip(ids, crcs)):
                index.entries[cid.rel_path] = [cid.size, cid.mtime_ns, name, row, crc]
            self._write_index(index)
        return name

    def _ensure_layout(self) -> None:
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        key_json = self.dir / "key.json"
        if self.fields is not None and not key_json.is_file():
            atomic_write_json(key_json, {"key": self.key, "fields": self.fields})
        ds_json = self.dir.parent / "dataset.json"
        if self.dataset_root is not None and not ds_json.is_file():
            atomic_write_json(ds_json, {"root": str(self.dataset_root)})

    def _drop(self, bad_entries: dict[str, tuple[str, int, str]], bad_shards: dict[str, tuple[str, bool]]) -> None:
        """Remove bad entries (and corrupt shard files) from the index, under the lock."""
        for shard, (reason, _) in bad_shards.items():
            log.warning("embedding cache %s: shard %s is unusable (%s); its entries are dropped and will be recomputed",
                        self.dir, shard, reason)
        if bad_entries:
            names = ", ".join(sorted(bad_entries)[:5]) + (" ..." if len(bad_entries) > 5 else "")
            log.warning("embedding cache %s: %d entr%s failed the checksum (%s); dropped, will be recomputed",
                        self.dir, len(bad_entries), "y" if len(bad_entries) == 1 else "ies", names)
        with self._locked() as ok:
            if not ok:
                return
            index = self._load_for_update()
            for shard, (_, delete) in bad_shards.items():
                for rel in [r for r, e in index.entries.items() if e[2] == shard]:
                    del index.entries[rel]
                index.shards.pop(shard, None)
                if delete:
                    (self.shard_dir / shard).unlink(missing_ok=True)
            for rel, (shard, row, _) in bad_entries.items():
                entry = index.entries.get(rel)
                if entry is not None and entry[2] == shard and entry[3] == row:  # not rewritten meanwhile
                    del index.entries[rel]
            self._write_index(index)

    def _log_key_change(self) -> None:
        """No cache under this key: if the dataset has others, say which key fields differ (once per store)."""
        if self.fields is None or self._key_change_logged:
            return
        self._key_change_logged = True
        others: list[tuple[int, str, list[tuple[str, Any, Any]]]] = []
        parent = self.dir.parent
        for key_json in sorted(parent.glob("*/key.json")) if parent.is_dir() else []:
            try:
                fields = json.loads(key_json.read_text())["fields"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            diff = diff_fields(fields, self.fields)
            if diff:
                others.append((len(diff), key_json.parent.name, diff))
        if not others:
            log.info("embedding cache %s: empty, every clip will be extracted", self.dir)
            return
        _, name, diff = min(others)
        changes = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diff)
        log.warning(
            "embedding cache: no entries under key %s for this dataset; %d other key(s) exist, the closest (%s) "
            "differs in %s. Clips will be re-extracted.",
            self.key[:_KEY_DIR_CHARS], len(others), name, changes,
        )

    # ------------------------------------------------------------------ maintenance
    def summary(self) -> dict[str, Any]:
        """Entries, shards, bytes, live/dead rows and the key fields (for ``feda2v cache info``)."""
        try:
            index = self._read_index_file() or (self._rebuild(write=False) if self._shard_files() else _Index())
            index_state = "ok"
        except IndexCorrupt as err:
            index, index_state = self._rebuild(write=False), f"corrupt ({err})"
        files = self._shard_files()
        total_rows = sum(int(s.get("rows", 0)) for s in index.shards.values())
        nbytes = sum(p.stat().st_size for p in files) + (self.index_path.stat().st_size if self.index_path.is_file() else 0)
        return {
            "key": self.key,
            "dir": str(self.dir),
            "dataset_root": _dataset_root_of(self.dir.parent),
            "entries": len(index.entries),
            "shards": len(files),
            "rows": total_rows,
            "dead_rows": total_rows - len(index.entries),
            "bytes": nbytes,
            "bytes_per_entry": round(nbytes / len(index.entries)) if index.entries else 0,
            "index": index_state,
            "fields": self.fields,
        }

    def verify(self, repair: bool = False) -> VerifyReport:
        """Check the index checksum, every shard's size/header and every live row's crc32.

        ``repair``: drop bad entries and corrupt shards, adopt orphan shards, delete shards without
        live rows and stale temp files, and rewrite the index.
        """
        report = VerifyReport(self.dir)
        try:
            index = self._read_index_file()
            if index is None and self._shard_files():
                report.index_problem = "index.json missing"
        except IndexCorrupt as err:
            report.index_problem = f"index.json corrupt ({err})"
            index = None
        if index is None:
            index = self._rebuild(write=False)
        live: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
        for rel, entry in index.entries.items():
            live[entry[2]].append((rel, int(entry[3]), int(entry[4])))
        for shard, info in index.shards.items():
            try:
                rows = self._read_rows(shard, info, [row for _, row, _ in live[shard]]) if live[shard] else {}
                if not live[shard]:
                    self._shard_meta(self.shard_dir / shard)
            except _ShardError as err:
                report.bad_shards[shard] = str(err)
                continue
            for rel, row, crc in live[shard]:
                if row_crc32(rows[row]) != crc:
                    report.bad_entries[rel] = f"checksum mismatch in {shard} row {row}"
            if not live[shard]:
                report.dead_shards.append(shard)
        for shard in set(live) - set(index.shards):
            report.bad_shards[shard] = "referenced by entries but not listed in the index"
        on_disk = {p.name for p in self._shard_files()}
        report.orphan_shards = sorted(on_disk - set(index.shards))
        report.entries, report.shards = len(index.entries), len(on_disk)
        if repair:
            self._repair(report)
        return report

    def _repair(self, report: VerifyReport) -> None:
        with self._locked() as ok:
            if not ok:
                return
            index = self._load_for_update()
            for shard in report.bad_shards:
                for rel in [r for r, e in index.entries.items() if e[2] == shard]:
                    del index.entries[rel]
                index.shards.pop(shard, None)
                (self.shard_dir / shard).unlink(missing_ok=True)
            for rel in report.bad_entries:
                index.entries.pop(rel, None)
            for shard in report.orphan_shards:  # complete shards whose index update never happened
                try:
                    entries, crcs, _ = self._shard_meta(self.shard_dir / shard)
                except _ShardError:
                    (self.shard_dir / shard).unlink(missing_ok=True)
                    continue
                index.shards[shard] = {"rows": len(entries), "bytes": (self.shard_dir / shard).stat().st_size}
                for row, ((rel, size, mtime_ns), crc) in enumerate(zip(entries, crcs)):
                    index.entries.setdefault(rel, [size, mtime_ns, shard, row, crc])
            referenced = {e[2] for e in index.entries.values()}
            for shard in [s for s in index.shards if s not in referenced]:
                index.shards.pop(shard)
                (self.shard_dir / shard).unlink(missing_ok=True)
            now = time.time()
            for tmp in self.shard_dir.glob(".*.tmp") if self.shard_dir.is_dir() else []:
                if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                    tmp.unlink(missing_ok=True)
            self._write_index(index)
            report.repaired = True

    def clear(self) -> None:
        """Delete this key's directory (under the lock, so no writer is mid-update)."""
        if not self.dir.exists():
            return
        with self._locked():
            shutil.rmtree(self.shard_dir, ignore_errors=True)
            for name in ("index.json", "key.json"):
                (self.dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        dataset_dir = self.dir.parent
        if dataset_dir.is_dir() and not any(p.is_dir() for p in dataset_dir.iterdir()):
            shutil.rmtree(dataset_dir, ignore_errors=True)  # only dataset.json was left


def _dataset_root_of(dataset_dir: Path) -> str | None:
    try:
        return str(json.loads((dataset_dir / "dataset.json").read_text())["root"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_stores(root: Path) -> list[EmbeddingStore]:
    """Every key directory under ``<cache-dir>/embeddings`` (for the CLI)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [
        EmbeddingStore.existing(key_dir)
        for dataset_dir in sorted(p for p in root.iterdir() if p.is_dir())
        for key_dir in sorted(p for p in dataset_dir.iterdir() if p.is_dir())
    ]
