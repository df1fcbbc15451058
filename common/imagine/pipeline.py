"""``AudioToImagePipeline``: one object from a sound to pictures, saved and loaded like a diffusers pipeline.

What it holds: the frozen AST (:class:`~common.models.audio_encoder.AudioEncoder`), the trained adapters,
the class text targets they were trained toward (with the class list), the calibration applied before
rendering (``render.calibrate`` and its sigma: its statistics, the targets' centre, radius, span and
whitening, are computed from the bundled targets alone), and the FLUX.1 render model. ``pipe(inputs)``
decodes each input (:mod:`common.imagine.inputs`), embeds it, runs the adapters, scores it against every
class, calibrates and renders ``n`` images per clip, all batched.

On disk (``save_pretrained`` / ``from_pretrained``), safetensors plus JSON, never pickles::

    pipeline.json            format, classes, audio spec, encoder, adapters, targets, render, provenance
    adapters.safetensors     the adapters (the run's checkpoint format: weights + adapter config + classes)
    targets.safetensors      the class text targets (CLIP pooled, T5 sequence) + class names
    audio_encoder/           the AST (config.json, model.safetensors, preprocessor_config.json), when bundled
    render/                  the trained tiny-trained FLUX.1 preset (diffusers layout), when bundled

Small models are bundled (the tiny AST; any AST folder up to :data:`BUNDLE_MAX_MB`; the tiny-trained
render preset); large ones (a real AST, real FLUX.1) are referenced by identity (hub id or path) and a
fingerprint of their files (:mod:`common.models.fingerprint`), checked against the local copy on load.
Every file the pipeline bundles is fingerprinted in ``pipeline.json`` too, so a swapped or corrupt file is
an error naming the field, as is an encoder whose width does not fit the adapters or targets whose
classes or sizes differ.

Nearest class: :func:`common.training.class_similarity`, the mean of the CLIP-branch and T5-branch
cosines of the adapter outputs to each class's text target (the metric ``retrieval_acc_joint``),
computed on the outputs *before* calibration.

Image seeds: image ``k`` (1-based) of a clip is drawn from ``image_seed(render seed, "imagine", digest,
k)``, ``digest`` a hash of the clip's samples after decoding and cropping: the same sound gives the same
pictures whatever its file name, its position among the inputs or the batch it is rendered in.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from PIL import Image

from common.atomic import atomic_write_json, fsync_dir
from common.cache.embed import as_stored
from common.checkpoints import CheckpointError, load_adapters, save_adapters
from common.errors import FedA2VError
from common.imagine.inputs import AudioInput, AudioSpec, Decoded, clip_digest
from common.models.adapters import Adapters
from common.models.audio_encoder import AudioEncoder, ModelLoadError, audio_encoder_identity
from common.models.fingerprint import files_fingerprint
from common.progress import Progress
from common.records import CLASS_TARGETS, ClassTensors
from common.render.backend import RenderBackend, RenderSettings
from common.render.conditioning import calibrate, outputs_conditioning
from common.render.images import image_seed
from common.render.registry import build_backend
from common.render.trained_preset import Recipe, preset_key
from common.training import class_similarity, predict

__all__ = ["AudioToImagePipeline", "ClipImages", "EncoderSpec", "PipelineError", "PipelineOutput", "RenderSpec"]

log = logging.getLogger(__name__)

FORMAT = "feda2v-audio-to-image"
VERSION = 1
PIPELINE_JSON = "pipeline.json"
ADAPTERS_FILE = "adapters.safetensors"
TARGETS_FILE = "targets.safetensors"
ENCODER_DIR = "audio_encoder"
RENDER_DIR = "render"
BUNDLE_MAX_MB = 64.0  # an AST folder up to this size travels inside the pipeline; larger ones are referenced
SEED_OWNER = "imagine"  # the owner part of an imagined image's seed


class PipelineError(FedA2VError, ValueError):
    """A pipeline folder that cannot be used here; the message names the file or the ``pipeline.json`` field."""


@dataclass(frozen=True)
class EncoderSpec:
    """The AST and how its output is reduced and rounded (the run's ``audio-encoder`` section and seed)."""

    model: str  # "tiny", a local folder or a hub id (where the weights came from)
    reduction: str
    tokens: int
    dtype: str
    seed: int
    batch_size: int
    storage_dtype: str  # audio-encoder.cache-dtype: the adapters trained on embeddings rounded to it


@dataclass(frozen=True)
class RenderSpec:
    """The render model and everything that changes pixels (the run's ``[render]`` section)."""

    backend: str
    model: str  # "tiny", "tiny-trained" or a FLUX.1 folder, as the run named it
    resolution: int
    steps: int
    guidance: float
    dtype: str
    batch_size: int
    seed: int  # base of the per-image seeds (the run's render.seed, or its seed)
    calibrate: str
    calibrate_sigma: float
    images_per_clip: int = 2


@dataclass
class ClipImages:
    """One input's result: its pictures and what it sounded like to the adapters."""

    source: str  # the file path, or "waveform[i]"
    images: list[Image.Image]
    seeds: list[int]
    nearest: str  # the nearest class (class_similarity)
    similarity: float  # its similarity, in [-1, 1]
    top: list[tuple[str, float]]  # the best classes with their similarities, best first
    digest: str  # hash of the decoded clip (its seeds' source)


@dataclass
class PipelineOutput:
    """``clips[i]`` for every input that decoded; ``failed`` holds (input, reason) for the others."""

    clips: list[ClipImages] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images(self) -> list[list[Image.Image]]:
        return [c.images for c in self.clips]

    @property
    def nearest_classes(self) -> list[str]:
        return [c.nearest for c in self.clips]


def _fingerprint_dir(root: Path) -> str:
    """A fingerprint of every config and weight file below ``root`` (sorted relative paths)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
    if not files:
        raise PipelineError(f"'{root}' holds no model files (*.json, *.safetensors)")
    return files_fingerprint(root, files)


def _dir_mb(root: Path) -> float:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20


class AudioToImagePipeline:
    """Sound in, pictures out. Build it with :meth:`from_pretrained` (a saved folder) or
    :func:`common.imagine.export.pipeline_from_run` (a run folder); call it on files or waveforms."""

    def __init__(
        self,
        encoder: AudioEncoder,
        adapters: Adapters,
        targets: ClassTensors,
        audio: AudioSpec,
        encoder_spec: EncoderSpec,
        render: RenderSpec,
        render_model: str,
        provenance: dict[str, Any] | None = None,
        device: str = "cpu",
    ) -> None:
        self.encoder = encoder
        self.adapters = adapters.eval()
        self.targets = targets
        self.audio = audio
        self.encoder_spec = encoder_spec
        self.render = render
        self.render_model = render_model  # what the backend loads: "tiny" or a folder
        self.provenance = dict(provenance or {})
        self.device = device
        self._backend: RenderBackend | None = None
        _check_fit(adapters, targets, encoder)

    # ------------------------------------------------------------------ properties
    @property
    def classes(self) -> list[str]:
        return list(self.targets.class_names)

    def render_settings(self) -> RenderSettings:
        r = self.render
        return RenderSettings(model=self.render_model, resolution=r.resolution, steps=r.steps, guidance=r.guidance,
                              dtype=r.dtype, batch_size=r.batch_size, seed=r.seed, calibrate=r.calibrate,
                              device=self.device)

    def backend(self) -> RenderBackend:
        """The render model, loaded on first use and kept (one load per pipeline object)."""
        if self._backend is None:
            t0 = time.perf_counter()
            self._backend = build_backend(self.render.backend, self.render_settings())
            log.info("render model loaded in %.1fs (%s)", time.perf_counter() - t0, self.render_model)
        return self._backend

    # ------------------------------------------------------------------ the steps
    def embed(self, clips: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """``[N, samples]`` clips -> ``[N, L, H]`` embeddings, rounded as the embedding cache stores them."""
        if len(clips) == 0:
            return torch.empty(0, self.encoder.num_tokens, self.encoder.hidden_size)
        emb = self.encoder.encode(clips, batch_size=self.encoder_spec.batch_size, progress=progress)
        return as_stored(emb, self.encoder_spec.storage_dtype).float()

    def scores(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(similarity ``[N, C]``, CLIP outputs, T5 outputs) of embedded clips."""
        out_clip, out_t5 = predict(self.adapters, embeddings, device=self.device)
        if len(embeddings) == 0:
            return torch.empty(0, len(self.classes)), out_clip, out_t5
        return class_similarity(out_clip, out_t5, self.targets.clip, self.targets.t5), out_clip, out_t5

    def __call__(
        self,
        inputs: AudioInput | Sequence[AudioInput],
        n: int | None = None,
        sample_rate: int | None = None,
        top_k: int = 3,
        progress: bool = False,
    ) -> PipelineOutput:
        """``n`` (default :attr:`RenderSpec.images_per_clip`) images per input, plus its nearest classes.

        ``inputs``: a path or waveform, or a list of them (a waveform is one clip at ``sample_rate`` Hz,
        default the pipeline's :attr:`AudioSpec.sample_rate`). An input that cannot be decoded is listed in
        :attr:`PipelineOutput.failed` with its reason; the rest go on.
        """
        items = [inputs] if isinstance(inputs, (str, Path, torch.Tensor)) or hasattr(inputs, "__array__") else list(inputs)
        n = self.render.images_per_clip if n is None else int(n)
        if n < 1:
            raise ValueError(f"n (images per clip) must be >= 1, got {n}")
        decoded = Decoded.of(self.audio, items, sample_rate)
        out = PipelineOutput(failed=decoded.failed)
        sim, out_clip, out_t5 = self.scores(self.embed(decoded.clips))
        if not decoded.names:
            return out
        cond = calibrate(outputs_conditioning(out_clip, out_t5), self.targets, self.render.calibrate,
                         self.render.calibrate_sigma)
        digests = [clip_digest(c) for c in decoded.clips]
        seeds = [[image_seed(self.render.seed, SEED_OWNER, d, k) for k in range(1, n + 1)] for d in digests]
        rows = torch.arange(len(decoded.names)).repeat_interleave(n).tolist()
        flat_seeds = [s for per in seeds for s in per]
        images = self._render(cond.rows(rows), flat_seeds, progress)
        k = min(top_k, len(self.classes))
        best = sim.topk(k, dim=1)
        for i, name in enumerate(decoded.names):
            top = [(self.classes[j], round(float(v), 6)) for v, j in zip(best.values[i].tolist(), best.indices[i].tolist())]
            out.clips.append(ClipImages(name, images[i * n:(i + 1) * n], seeds[i], top[0][0], top[0][1], top, digests[i]))
        return out

    def _render(self, cond, seeds: list[int], progress: bool) -> list[Image.Image]:
        backend = self.backend()
        size = max(1, self.render.batch_size)
        bar = Progress(len(seeds), "imagining", "img", bar=progress)
        images: list[Image.Image] = []
        for start in range(0, len(seeds), size):
            idx = list(range(start, min(start + size, len(seeds))))
            images.extend(backend.render(cond.rows(idx), seeds[start:start + size]))
            bar.update(len(idx))
        bar.close()
        return images

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the pipeline into ``directory`` (replaced whole if it already holds a pipeline; refused if it
        holds anything else). Written to a temporary folder beside it, then renamed: a crash leaves the old
        pipeline or the new one, never half of one; two exports to one folder take turns (file lock)."""
        directory = Path(directory).expanduser().resolve()
        directory.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(directory) + ".lock"):
            if directory.exists() and (not directory.is_dir() or
                                       (any(directory.iterdir()) and not (directory / PIPELINE_JSON).is_file())):
                raise PipelineError(f"'{directory}' exists and is not a pipeline folder: refusing to overwrite it")
            tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
            try:
                self._write(tmp)
                if directory.exists():
                    old = directory.with_name(f".{directory.name}.old")
                    shutil.rmtree(old, ignore_errors=True)
                    directory.rename(old)
                    tmp.rename(directory)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    tmp.rename(directory)
                fsync_dir(directory.parent)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("pipeline written to %s (%.1f MiB)", directory, _dir_mb(directory))
        return directory

    def _write(self, root: Path) -> None:
        acfg = self.adapters.cfg.to_dict()
        save_adapters(root / ADAPTERS_FILE, self.adapters, acfg, self.classes, int(self.provenance.get("round", 0)),
                      str(self.provenance.get("config_hash", "")), {"checkpoint": self.provenance.get("checkpoint", "")})
        self.targets.save(root / TARGETS_FILE, CLASS_TARGETS, {"text-encoder": self.provenance.get("text_encoder", "")})
        enc = asdict(self.encoder_spec)
        model_path = Path(self.encoder_spec.model).expanduser()
        if self.encoder_spec.model == "tiny" or (model_path.is_dir() and _dir_mb(model_path) <= BUNDLE_MAX_MB):
            self.encoder.save_pretrained(root / ENCODER_DIR)
            enc.update(bundled=ENCODER_DIR, files_sha256=_fingerprint_dir(root / ENCODER_DIR))
        else:
            ident = audio_encoder_identity(self.encoder_spec.model, self.audio.clip_seconds, self.audio.sample_rate,
                                           self.encoder_spec.reduction, self.encoder_spec.tokens, self.encoder_spec.dtype,
                                           self.encoder_spec.seed)
            enc.update(bundled=None, files_sha256=ident["files_sha256"])
        render = asdict(self.render)
        folder = Path(self.render_model)
        if (folder / "preset.json").is_file():  # the tiny-trained preset: small, trained for these targets
            shutil.copytree(folder, root / RENDER_DIR)
            render.update(bundled=RENDER_DIR, files_sha256=_fingerprint_dir(root / RENDER_DIR),
                          preset_key=preset_key(self.targets, Recipe(resolution=self.render.resolution)))
        elif self.render_model == "tiny":
            render.update(bundled=None, files_sha256=None)
        else:
            render.update(bundled=None, location=str(folder), files_sha256=_fingerprint_dir(folder))
        atomic_write_json(root / PIPELINE_JSON, {
            "format": FORMAT, "version": VERSION, "classes": self.classes,
            "audio": {**asdict(self.audio), "crop": "start", "channels": "mean"},
            "audio_encoder": enc,
            "adapters": {"file": ADAPTERS_FILE, "adapter_config": acfg, "files_sha256": _file_sha(root, ADAPTERS_FILE)},
            "targets": {"file": TARGETS_FILE, "files_sha256": _file_sha(root, TARGETS_FILE),
                        "text_encoder": self.provenance.get("text_encoder", "")},
            "render": render,
            "nearest_class": "mean of the CLIP and T5 branch cosines to each class text target (retrieval_acc_joint)",
            "provenance": self.provenance,
        })

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "cpu", audio_encoder: str = "",
                        render_model: str = "") -> "AudioToImagePipeline":
        """Load a saved pipeline. ``audio_encoder`` / ``render_model``: where this machine keeps a model the
        pipeline references instead of bundling (default: the hub id or path it names); the local copy's
        fingerprint must match the one in ``pipeline.json``."""
        root = Path(directory).expanduser()
        spec = _read_spec(root)
        adapters, ameta = _load_part(root, spec, "adapters", lambda p: load_adapters(p))
        if ameta.get("adapter-config") != spec["adapters"].get("adapter_config"):
            raise PipelineError(f"{root / PIPELINE_JSON}: adapters.adapter_config differs from {ADAPTERS_FILE}'s metadata")
        targets, _ = _load_part(root, spec, "targets", lambda p: ClassTensors.load(p, CLASS_TARGETS))
        if targets.class_names != spec["classes"]:
            raise PipelineError(f"{root / TARGETS_FILE}: classes {targets.class_names} differ from pipeline.json "
                                f"classes {spec['classes']}")
        audio = AudioSpec(**{k: spec["audio"][k] for k in ("sample_rate", "clip_seconds", "max_file_mb")})
        e = spec["audio_encoder"]
        enc_spec = EncoderSpec(**{k: e[k] for k in EncoderSpec.__dataclass_fields__})
        if e.get("bundled"):
            folder = _checked_dir(root, e["bundled"], e.get("files_sha256"), "audio_encoder")
            model = str(folder)
        else:
            model = audio_encoder or enc_spec.model
            ident = audio_encoder_identity(model, audio.clip_seconds, audio.sample_rate, enc_spec.reduction,
                                           enc_spec.tokens, enc_spec.dtype, enc_spec.seed)
            if ident.get("files_sha256") != e.get("files_sha256"):
                raise PipelineError(f"{root / PIPELINE_JSON}: audio_encoder.files_sha256 {e.get('files_sha256')} does not "
                                    f"match the local copy of '{model}' ({ident.get('files_sha256')}): another AST than "
                                    "the adapters were trained on")
        encoder = AudioEncoder.build(model, audio.clip_seconds, sample_rate=audio.sample_rate,
                                     reduction=enc_spec.reduction, tokens=enc_spec.tokens, dtype=enc_spec.dtype,
                                     seed=enc_spec.seed, device=device)
        r = spec["render"]
        render = RenderSpec(**{k: r[k] for k in RenderSpec.__dataclass_fields__})
        if r.get("bundled"):
            folder = _checked_dir(root, r["bundled"], r.get("files_sha256"), "render")
            expected = preset_key(targets, Recipe(resolution=render.resolution))
            if r.get("preset_key") != expected:
                raise PipelineError(f"{root / PIPELINE_JSON}: render.preset_key {r.get('preset_key')} was trained for other "
                                    f"text targets than {TARGETS_FILE} ({expected})")
            render_at = str(folder)
        elif r.get("files_sha256") is None:
            render_at = "tiny"
        else:
            render_at = render_model or r.get("location", render.model)
            local = _fingerprint_dir(Path(render_at).expanduser()) if Path(render_at).expanduser().is_dir() else None
            if local is None:
                raise ModelLoadError(f"{root / PIPELINE_JSON}: render.location '{render_at}' is not a folder here; pass the "
                                     "local FLUX.1 folder (--render-model)")
            if local != r["files_sha256"]:
                raise PipelineError(f"{root / PIPELINE_JSON}: render.files_sha256 does not match the local FLUX.1 folder "
                                    f"'{render_at}'")
        return cls(encoder, adapters, targets, audio, enc_spec, render, render_at, spec.get("provenance"), device)


def _file_sha(root: Path, name: str) -> str:
    return files_fingerprint(root, [root / name])


def _read_spec(root: Path) -> dict[str, Any]:
    path = root / PIPELINE_JSON
    if not path.is_file():
        raise PipelineError(f"'{root}' is not a pipeline folder (no {PIPELINE_JSON}); write one with `feda2v export`")
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PipelineError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise PipelineError(f"{path}: format is {spec.get('format') if isinstance(spec, dict) else None!r}, expected {FORMAT!r}")
    if spec.get("version") != VERSION:
        raise PipelineError(f"{path}: version {spec.get('version')!r}, this feda2v reads version {VERSION}")
    for key in ("classes", "audio", "audio_encoder", "adapters", "targets", "render"):
        if key not in spec:
            raise PipelineError(f"{path}: field '{key}' is missing")
    return spec


def _load_part(root: Path, spec: dict[str, Any], part: str, load):
    name = spec[part].get("file")
    if name not in (ADAPTERS_FILE, TARGETS_FILE):
        raise PipelineError(f"{root / PIPELINE_JSON}: {part}.file is {name!r}")
    path = root / name
    if not path.is_file():
        raise PipelineError(f"{path}: missing ({part}.file of {root / PIPELINE_JSON})")
    if _file_sha(root, name) != spec[part].get("files_sha256"):
        raise PipelineError(f"{path}: its fingerprint differs from pipeline.json {part}.files_sha256 (changed or corrupt)")
    try:
        return load(path)
    except CheckpointError as err:
        raise PipelineError(f"{part}: {err}") from None


def _checked_dir(root: Path, name: str, fingerprint: str | None, field_name: str) -> Path:
    folder = root / name
    if Path(name).is_absolute() or ".." in Path(name).parts or not folder.is_dir():
        raise PipelineError(f"{root / PIPELINE_JSON}: {field_name}.bundled names {name!r}, not a folder of the pipeline")
    if _fingerprint_dir(folder) != fingerprint:
        raise PipelineError(f"{folder}: its fingerprint differs from pipeline.json {field_name}.files_sha256 (changed or corrupt)")
    return folder


def _check_fit(adapters: Adapters, targets: ClassTensors, encoder: AudioEncoder) -> None:
    """The parts fit each other; a mismatch names the field."""
    cfg = adapters.cfg
    checks = (
        ("adapter_config.in_dim", cfg.in_dim, "audio_encoder hidden size", encoder.hidden_size),
        ("adapter_config.in_tokens", cfg.in_tokens, "audio_encoder tokens", encoder.num_tokens),
        ("adapter_config.clip_dim", cfg.clip_dim, "targets clip width", int(targets.clip.shape[1])),
        ("adapter_config.t5_tokens", cfg.t5_tokens, "targets t5 tokens", int(targets.t5.shape[1])),
        ("adapter_config.t5_dim", cfg.t5_dim, "targets t5 width", int(targets.t5.shape[2])),
    )
    for name, want, what, got in checks:
        if want != got:
            raise PipelineError(f"adapters.{name} is {want} but the {what} is {got}: the parts do not belong together")
