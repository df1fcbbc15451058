"""Clips -> AST embeddings through the cache: read hits, extract only misses, write them back.

This is the one extraction path (ClientApp, ``feda2v cache build``, benches), so every dataset
reader that yields :class:`~common.data.esc50.Clip` records gets the cache for free.

Why the encoder is lazy: the point of a cache hit is to skip the AST entirely. The key is computed
from settings alone (:func:`~common.models.audio_encoder.audio_encoder_identity`), hits are read
from shards, and only when at least one miss has decoded into audio is the AST (and its feature
extractor) built. A fully cached node therefore opens no audio file and constructs no model.

Why embeddings are always rounded to the storage dtype: a clip served from the cache holds the
stored (fp16 by default) values; rounding freshly extracted ones the same way makes a first run
(misses) and a second run (hits) train on bit-identical inputs, with the cache on or off.

Why every cache call is guarded: the cache is an optimisation. A cache that cannot be read or
written (corrupt beyond the store's own recovery, disk full, read-only) costs a warning and an
extraction, never a failed training round.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.cache.key import cache_key_fields
from common.cache.store import ClipId, EmbeddingStore
from common.config import AudioEncoderConfig, DataConfig
from common.data.audio import load_clips
from common.data.clips import Clip
from common.dtypes import torch_dtype
from common.models.audio_encoder import AudioEncoder, audio_encoder_identity
from common.progress import Progress

log = logging.getLogger(__name__)

__all__ = ["EmbedResult", "EmbedStats", "ExtractionSettings", "LazyEncoder", "as_stored", "embed_clips", "open_store"]


@dataclass(frozen=True)
class ExtractionSettings:
    """Everything the extraction path needs; ``identity()`` is the part that changes an embedding.

    No field has a default: build it with :meth:`of` (``audio-encoder.*``, ``data.*`` and
    ``seed``); ``device`` is where the AST runs (:func:`common.device.resolve_device`).
    """

    model: str
    clip_seconds: float
    sample_rate: int
    reduction: str
    tokens: int
    dtype: str  # AST compute dtype
    seed: int
    storage_dtype: str
    batch_size: int
    device: str
    min_clip_seconds: float  # shorter (or truncated) files are skipped; not part of the key
    max_file_mb: float  # larger files are skipped before decoding; not part of the key

    @classmethod
    def of(cls, encoder: AudioEncoderConfig, data: DataConfig, seed: int, device: str = "cpu") -> "ExtractionSettings":
        """From the ``audio-encoder`` and ``data`` sections and the run seed (the tiny AST's weights).

        ``device`` only places the AST; it is not part of the cache key.
        """
        return cls(
            model=encoder.model,
            clip_seconds=data.clip_seconds,
            sample_rate=data.sample_rate,
            reduction=encoder.reduction,
            tokens=encoder.tokens,
            dtype=encoder.dtype,
            seed=seed,
            storage_dtype=encoder.cache_dtype,
            batch_size=encoder.batch_size,
            device=device,
            min_clip_seconds=data.min_clip_seconds,
            max_file_mb=data.max_file_mb,
        )

    def identity(self) -> dict[str, Any]:
        return audio_encoder_identity(
            self.model, self.clip_seconds, self.sample_rate, self.reduction, self.tokens, self.dtype, self.seed
        )

    def key_fields(self) -> dict[str, Any]:
        return cache_key_fields(self.identity(), self.storage_dtype)

    def build_encoder(self) -> AudioEncoder:
        return AudioEncoder.build(
            self.model,
            clip_seconds=self.clip_seconds,
            sample_rate=self.sample_rate,
            reduction=self.reduction,
            tokens=self.tokens,
            dtype=self.dtype,
            device=self.device,
            seed=self.seed,
        )


class LazyEncoder:
    """Builds the AudioEncoder on first use only; shared by the splits of a node."""

    def __init__(self, settings: ExtractionSettings) -> None:
        self.settings = settings
        self._encoder: AudioEncoder | None = None

    @property
    def built(self) -> bool:
        return self._encoder is not None

    def get(self) -> AudioEncoder:
        if self._encoder is None:
            t0 = time.perf_counter()
            self._encoder = self.settings.build_encoder()
            log.info("built %r in %.1fs", self._encoder, time.perf_counter() - t0)
        return self._encoder


@dataclass
class EmbedStats:
    """Cache accounting of one extraction call (or of a node: add them up)."""

    hits: int = 0
    misses: int = 0  # clips not served by the cache (bad audio files included)
    extract_seconds: float = 0.0  # building the AST, decoding audio and AST forward passes
    load_seconds: float = 0.0  # stat + index + mmap reads + checksums
    store_seconds: float = 0.0  # writing shards and index updates

    def __iadd__(self, other: "EmbedStats") -> "EmbedStats":
        self.hits += other.hits
        self.misses += other.misses
        self.extract_seconds += other.extract_seconds
        self.load_seconds += other.load_seconds
        self.store_seconds += other.store_seconds
        return self


@dataclass
class EmbedResult:
    """``embeddings[i]`` (float32 ``[N, L, H]``) belongs to ``clips[i]``; bad files are in ``skipped``."""

    embeddings: torch.Tensor
    clips: list[Clip]
    skipped: list[tuple[Clip, str]] = field(default_factory=list)
    stats: EmbedStats = field(default_factory=EmbedStats)


def open_store(cache_root: Path, dataset_root: Path, settings: ExtractionSettings) -> EmbeddingStore | None:
    """The store for these settings under ``<cache_root>/embeddings``; ``None`` (with a warning) on failure."""
    try:
        return EmbeddingStore.open(Path(cache_root) / "embeddings", dataset_root, settings.key_fields())
    except Exception as err:  # e.g. a model folder that vanished: extraction will report the real error
        log.warning("embedding cache disabled for this run: cannot compute its key (%s: %s)", type(err).__name__, err)
        return None


def as_stored(emb: torch.Tensor, storage_dtype: str) -> torch.Tensor:
    """``emb`` as the embedding cache stores it (``audio-encoder.cache-dtype``): what the adapters train on, so
    a clip embedded outside the cache (``feda2v imagine``) is rounded the same way."""
    stored = emb.to(torch_dtype(storage_dtype))
    if not torch.isfinite(stored).all():
        log.warning("embeddings overflow %s (max |x| = %.3g); set audio-encoder.cache-dtype to bfloat16 or float32",
                    storage_dtype, float(emb.abs().max()))
    return stored


def embed_clips(
    clips: list[Clip],
    settings: ExtractionSettings,
    store: EmbeddingStore | None,
    encoder: LazyEncoder | None = None,
    progress: bool = False,
    chunk: int | None = None,
    extract: bool = True,
) -> EmbedResult:
    """Embeddings of ``clips`` in their order (bad files skipped): cache hits first, misses extracted.

    ``extract=False`` is the cache-only lookup of the pretrained-generator mode: misses are not
    extracted (no audio opened, no AST built) but returned in ``skipped`` with the reason.

    Misses are decoded and encoded ``chunk`` clips at a time (default 4 AST batches) and each chunk
    is written as one shard right away, so RAM holds one chunk of audio and an interrupted run
    (e.g. ``feda2v cache build``) resumes where it stopped.
    """
    encoder = encoder or LazyEncoder(settings)
    stats = EmbedStats()
    rows: list[torch.Tensor | None] = [None] * len(clips)
    ids: list[ClipId | None] = [None] * len(clips)

    t0 = time.perf_counter()
    if store is not None:
        ids = [ClipId.of(c.path, c.rel_path) for c in clips]
        try:
            rows = store.lookup(ids)
        except Exception as err:
            log.warning("embedding cache %s unreadable (%s: %s); extracting every clip", store.dir, type(err).__name__, err)
            rows = [None] * len(clips)
    stats.load_seconds = time.perf_counter() - t0
    missing = [i for i, r in enumerate(rows) if r is None]
    stats.hits, stats.misses = len(clips) - len(missing), len(missing)

    skipped: list[tuple[Clip, str]] = []
    if not extract:
        skipped = [(clips[i], "not in the embedding cache (cache-only lookup)") for i in missing]
        missing = []
    bar = Progress(len(missing), "AST embeddings", "clip", bar=progress) if missing else None
    step = chunk or max(settings.batch_size * 4, 1)
    for start in range(0, len(missing), step):
        idx = missing[start : start + step]
        t1 = time.perf_counter()
        loaded = load_clips([clips[i] for i in idx], settings.sample_rate, settings.clip_seconds,
                            settings.min_clip_seconds, settings.max_file_mb)
        skipped.extend(loaded.skipped)
        ok = {c.rel_path for c in loaded.clips}
        kept = [i for i in idx if clips[i].rel_path in ok]
        if kept:
            emb = encoder.get().encode(loaded.waveforms, batch_size=settings.batch_size)
            stored = as_stored(emb, settings.storage_dtype)
            for j, i in enumerate(kept):
                rows[i] = stored[j]
        stats.extract_seconds += time.perf_counter() - t1
        if kept and store is not None:
            t2 = time.perf_counter()
            good = [(ids[i], stored[j]) for j, i in enumerate(kept) if ids[i] is not None]
            if good:
                try:
                    store.put([g[0] for g in good], torch.stack([g[1] for g in good]))  # type: ignore[misc]
                except Exception as err:
                    log.warning("embedding cache %s: write failed (%s: %s); continuing without caching these clips",
                                store.dir, type(err).__name__, err)
            stats.store_seconds += time.perf_counter() - t2
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()

    kept_clips = [c for c, r in zip(clips, rows) if r is not None]
    present = [r for r in rows if r is not None]
    embeddings = torch.stack(present).float() if present else torch.empty(0, 1, 1)
    return EmbedResult(embeddings, kept_clips, skipped, stats)
