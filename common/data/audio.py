"""Decode clip files into fixed-length mono float32 tensors at the model's sample rate.

The data path is one direction: file --soundfile--> mono float32 --torchaudio resample--> 16 kHz,
padded/trimmed to the clip length. Every clip comes out with the same number of samples, so batches stack without a
custom collate, and the AST ``max_length`` can be derived from the clip length alone.

I/O is soundfile only: ``torchaudio.load`` needs torchcodec, which is not installed. A bad file (corrupt, empty,
not audio, NaN samples, larger than ``data.max-file-mb``) is a property of one clip, not of the run:
:func:`load_clips` skips it with a warning that names it, and reports it in :attr:`LoadedAudio.skipped` so callers
can count what was lost.

Only the frames the clip needs are decoded (:func:`frames_needed`): the crop starts at the first frame, so a file
of an hour costs what a file of the clip's length costs, and a huge or hostile file cannot exhaust the node's
memory. The frames read cover the resampling filter's reach past the crop, so the samples that come out are
those of decoding the whole file: bit-identical in tests from 16-96 kHz down to 16 kHz; when upsampling (8 or
11.025 kHz files) torch's convolution may round the last bit differently on the shorter input (< 2e-7).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from common.errors import FedA2VError

from .clips import Clip

logger = logging.getLogger(__name__)


class AudioLoadError(FedA2VError):
    """A clip file that cannot be turned into audio; ``str()`` names the file and the reason."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot load audio file {self.path}: {reason}")


def num_samples(sample_rate: int, clip_seconds: float) -> int:
    """Samples per clip after loading (the one place this rounding is defined)."""
    return int(round(clip_seconds * sample_rate))


def _check_target(sample_rate: int, clip_seconds: float) -> None:
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if clip_seconds <= 0:
        raise ValueError(f"clip_seconds must be positive, got {clip_seconds}")


@functools.lru_cache(maxsize=16)
def _resampler(orig_freq: int, new_freq: int) -> torchaudio.transforms.Resample:
    # Building the sinc kernel costs more than applying it to a 5-s clip; datasets use one or two source rates.
    return torchaudio.transforms.Resample(orig_freq=orig_freq, new_freq=new_freq)


def frames_needed(rate: int, sample_rate: int, clip_seconds: float, min_seconds: float = 0.0) -> int:
    """Frames of a ``rate`` Hz file that decide the clip: the crop (``clip_seconds`` at ``sample_rate``,
    from the first frame) plus what the resampling filter reads beyond it, and at least ``min_seconds``
    (so the too-short check still sees a file's full length when it matters).

    Why exact: output sample ``j`` of torchaudio's polyphase resampler reads input frames up to
    ``(j // new) * orig + width + orig - 1`` (``orig``/``new`` the rates divided by their gcd, ``width``
    the filter's half-width), so reading that many frames gives the same crop as decoding the whole file.
    """
    target = num_samples(sample_rate, clip_seconds)
    floor = int(np.ceil(min_seconds * rate))
    if rate == sample_rate:
        return max(target, floor)
    resampler = _resampler(rate, sample_rate)
    orig, new = rate // resampler.gcd, sample_rate // resampler.gcd
    return max(((target - 1) // new) * orig + resampler.width + orig, floor)


_MAX_WAV_CHUNKS = 1024  # chunks before 'data' that a WAV header may hold before we stop judging it (real files: < 10)


def _wav_declared_bytes(path: Path) -> tuple[int, int] | None:
    """(bytes the WAV ``data`` chunk declares, bytes present after it), or ``None`` for other formats
    or headers too odd to judge (streamed WAVs declare 0 or 0xFFFFFFFF)."""
    with open(path, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        size = path.stat().st_size
        for _ in range(_MAX_WAV_CHUNKS):
            chunk = fh.read(8)
            if len(chunk) < 8:
                return None
            cid, length = chunk[:4], int.from_bytes(chunk[4:], "little")
            if cid == b"data":
                if length in (0, 0xFFFFFFFF):
                    return None
                return length, size - fh.tell()
            fh.seek(length + (length & 1), 1)
    return None


def _check_size(path: Path, max_mb: float | None) -> None:
    """A file over ``max_mb`` MiB (``data.max-file-mb``) is refused before libsndfile opens it."""
    if not path.is_file():  # libsndfile would only say "System error"
        raise AudioLoadError(path, "file not found" if not path.exists() else "not a regular file")
    size = path.stat().st_size
    if max_mb is not None and size > max_mb * 2**20:
        raise AudioLoadError(path, f"{size / 2**20:.1f} MiB, larger than data.max-file-mb={max_mb:g}")


def _read(path: Path, sample_rate: int, clip_seconds: float, min_seconds: float = 0.0,
          max_mb: float | None = None) -> tuple[np.ndarray, int]:
    """The frames of ``path`` the clip needs (:func:`frames_needed`) as float32 ``(frames, channels)``, and
    the file's sample rate. The header is read first; the rest of a long file is never decoded."""
    _check_size(path, max_mb)
    try:
        declared = _wav_declared_bytes(path)
        with sf.SoundFile(str(path)) as audio:
            rate, channels, total = int(audio.samplerate), int(audio.channels), int(audio.frames)
            if channels <= 0 or rate <= 0:
                raise AudioLoadError(path, f"the header declares {channels} channel(s) at {rate} Hz")
            data = audio.read(frames_needed(rate, sample_rate, clip_seconds, min_seconds), dtype="float32",
                              always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError, TypeError) as exc:
        # libsndfile reports "Format not recognised" for text/garbage files, and raises for truncated data.
        raise AudioLoadError(path, f"unreadable or not an audio file ({exc})") from exc
    if data.shape[0] == 0:
        raise AudioLoadError(path, "the file holds no audio frames")
    if declared is not None and declared[0] > declared[1]:  # libsndfile reads what is there: a cut file looks short
        raise AudioLoadError(path, f"truncated: the WAV header declares {declared[0]} bytes of audio, the file holds "
                                   f"{declared[1]} ({total} frames)")
    if data.shape[0] < min_seconds * rate:
        raise AudioLoadError(path, f"{data.shape[0] / rate:.3f} s of audio, less than data.min-clip-seconds={min_seconds:g}")
    if data.shape[1] == 0:
        raise AudioLoadError(path, "the file has no channels")
    if not np.isfinite(data).all():
        raise AudioLoadError(path, "the file contains non-finite samples (NaN or infinity)")
    return data, int(rate)


def load_clip(path: Path, sample_rate: int = 16000, clip_seconds: float = 5.0, min_seconds: float = 0.0,
              max_mb: float | None = None) -> torch.Tensor:
    """Load one file as a float32 tensor of shape ``(round(clip_seconds * sample_rate),)``.

    Channels are averaged to mono, the signal is resampled to `sample_rate`, then zero-padded at the end or
    trimmed. Raises :class:`AudioLoadError` for anything that is not usable audio, including a file cut
    short of the frames its header declares, one with less than ``min_seconds`` of audio (padding
    those with silence would train on silence as their class) and one larger than ``max_mb`` MiB
    (``None``: no bound).
    """
    _check_target(sample_rate, clip_seconds)
    data, rate = _read(Path(path), sample_rate, clip_seconds, min_seconds, max_mb)
    return fit_clip(torch.from_numpy(np.ascontiguousarray(data.mean(axis=1, dtype=np.float32))), rate, sample_rate,
                    clip_seconds)


def fit_clip(wave: torch.Tensor, rate: int, sample_rate: int = 16000, clip_seconds: float = 5.0) -> torch.Tensor:
    """A mono waveform at ``rate`` Hz as the clip the models read: resampled to ``sample_rate``, then cut to
    ``clip_seconds`` from its first sample or zero-padded at its end (the one definition of the crop, for
    files and for raw waveforms alike)."""
    _check_target(sample_rate, clip_seconds)
    if rate <= 0:
        raise ValueError(f"the waveform's sample rate must be positive, got {rate}")
    wave = torch.as_tensor(wave, dtype=torch.float32)
    if rate != sample_rate:
        with torch.no_grad():
            wave = _resampler(int(rate), sample_rate)(wave)
    target = num_samples(sample_rate, clip_seconds)
    if wave.shape[0] >= target:
        wave = wave[:target]
    else:
        wave = torch.nn.functional.pad(wave, (0, target - wave.shape[0]))
    return wave.contiguous().to(torch.float32)


@dataclass
class LoadedAudio:
    """Decoded clips: ``waveforms[i]`` belongs to ``clips[i]``; files that failed are in ``skipped``."""

    waveforms: torch.Tensor  # [N, S] float32
    clips: list[Clip]
    skipped: list[tuple[Clip, str]] = field(default_factory=list)  # (clip, reason)


def load_clips(clips: Sequence[Clip], sample_rate: int = 16000, clip_seconds: float = 5.0,
               min_seconds: float = 0.0, max_mb: float | None = None) -> LoadedAudio:
    """Load many clips, skipping bad files (one warning per file) instead of failing the whole run."""
    _check_target(sample_rate, clip_seconds)
    waveforms = torch.empty((len(clips), num_samples(sample_rate, clip_seconds)), dtype=torch.float32)
    kept: list[Clip] = []
    skipped: list[tuple[Clip, str]] = []
    for clip in clips:
        try:
            waveforms[len(kept)] = load_clip(clip.path, sample_rate, clip_seconds, min_seconds, max_mb)
        except AudioLoadError as exc:
            logger.warning("skipping clip %s (%s): %s", clip.rel_path, exc.path, exc.reason)
            skipped.append((clip, exc.reason))
            continue
        kept.append(clip)
    if skipped:
        logger.info("loaded %d of %d clips; %d skipped", len(kept), len(clips), len(skipped))
    return LoadedAudio(waveforms=waveforms[: len(kept)].clone() if skipped else waveforms, clips=kept,
                       skipped=skipped)
