"""What a user hands the pipeline: which files, and how each one becomes one clip.

Any file soundfile (libsndfile) reads is accepted: WAV (8/16/24/32-bit, float), FLAC, OGG/Vorbis, Opus,
MP3 (libsndfile >= 1.1), AIFF, AU, CAF, W64 and the rest of :func:`soundfile.available_formats`; of
any length, rate and channel count. A file becomes a clip exactly as a dataset clip does
(:func:`common.data.audio.load_clip`): channels averaged to mono, resampled to the pipeline's sample
rate, cut to ``clip_seconds`` *from its first sample* or zero-padded at its end. Only the frames the crop
needs are decoded, so a 10-minute file costs what a 5-second one costs. A file larger than
``max_file_mb`` MiB is refused before it is opened; an empty, truncated or non-audio file is refused with
its reason. Shorter files are padded with silence (unlike training, which skips clips under
``data.min-clip-seconds``: a person may well hand in a short sound).

A raw waveform (``torch.Tensor`` or numpy array, ``[samples]`` or ``[channels, samples]``) is read at the
rate the caller names (default: the pipeline's own) and goes through the same crop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import soundfile as sf
import torch

from common.data.audio import AudioLoadError, fit_clip, load_clip

__all__ = ["AudioInput", "AudioSpec", "Decoded", "audio_suffixes", "clip_digest", "find_audio"]

AudioInput = Union[str, Path, torch.Tensor, np.ndarray]


def audio_suffixes() -> frozenset[str]:
    """File suffixes a folder is searched for: every format this libsndfile reads, plus the usual aliases."""
    names = {f".{k.lower()}" for k in sf.available_formats()}
    aliases = {".aif": ".aiff", ".aifc": ".aiff", ".oga": ".ogg", ".opus": ".ogg", ".snd": ".au", ".wave": ".wav"}
    return frozenset(names | {a for a, fmt in aliases.items() if fmt in names})


def find_audio(paths: Iterable[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The files to imagine, in a stable order, and the paths that name nothing usable (with the reason).

    A file named directly is taken whatever its suffix (its decoding decides); a folder is searched
    recursively for files with an audio suffix (:func:`audio_suffixes`), sorted by path.
    """
    suffixes = audio_suffixes()
    files: list[Path] = []
    missing: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                missing.append((path, f"no audio files ({', '.join(sorted(suffixes))}) in this folder"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            missing.append((path, "no such file or folder"))
    return files, missing


@dataclass(frozen=True)
class AudioSpec:
    """How any input becomes one clip: the rate and length the encoder was trained on, and the size bound."""

    sample_rate: int
    clip_seconds: float
    max_file_mb: float

    def decode(self, path: str | Path) -> torch.Tensor:
        """One file as a clip; :class:`~common.data.audio.AudioLoadError` names the file and the reason."""
        return load_clip(Path(path), self.sample_rate, self.clip_seconds, 0.0, self.max_file_mb)

    def from_waveform(self, wave: torch.Tensor | np.ndarray, rate: int | None = None) -> torch.Tensor:
        """A raw waveform (``[samples]`` or ``[channels, samples]`` at ``rate`` Hz, default the spec's) as a clip."""
        x = torch.as_tensor(np.asarray(wave) if isinstance(wave, np.ndarray) else wave).detach().to("cpu", torch.float32)
        if x.ndim == 2:
            x = x.mean(dim=0)
        if x.ndim != 1 or x.shape[0] == 0:
            raise ValueError(f"a waveform must be [samples] or [channels, samples] with samples > 0, got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("the waveform contains non-finite samples (NaN or infinity)")
        return fit_clip(x, int(rate or self.sample_rate), self.sample_rate, self.clip_seconds)


@dataclass
class Decoded:
    """Inputs turned into clips: ``clips[i]`` came from ``names[i]``; ``failed`` holds (name, reason)."""

    clips: torch.Tensor  # [N, samples]
    names: list[str]
    failed: list[tuple[str, str]]

    @classmethod
    def of(cls, spec: AudioSpec, inputs: Sequence[AudioInput], rate: int | None = None) -> "Decoded":
        """Decode every input; a bad one is recorded in ``failed`` (never raised) so the rest go on."""
        rows: list[torch.Tensor] = []
        names: list[str] = []
        failed: list[tuple[str, str]] = []
        for i, item in enumerate(inputs):
            if isinstance(item, (str, Path)):
                name = str(item)
                try:
                    rows.append(spec.decode(item))
                except AudioLoadError as err:
                    failed.append((name, err.reason))
                    continue
            else:
                name = f"waveform[{i}]"
                try:
                    rows.append(spec.from_waveform(item, rate))
                except ValueError as err:
                    failed.append((name, str(err)))
                    continue
            names.append(name)
        length = int(round(spec.clip_seconds * spec.sample_rate))
        clips = torch.stack(rows) if rows else torch.empty(0, length)
        return cls(clips, names, failed)


def clip_digest(clip: torch.Tensor) -> str:
    """A short hash of a clip's samples: the same sound gives the same image seeds, whatever its file name."""
    return hashlib.sha256(clip.detach().cpu().contiguous().to(torch.float32).numpy().tobytes()).hexdigest()[:16]
