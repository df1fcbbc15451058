"""Image accuracy from sound (the picture scorer lives with the pictures): is the class of the clip (or sample) that drew an image visible in it?

Two scorers, one interface (``predict(images, class_names, template) -> class indices``):

* :class:`PictureScorer` for the offline ``tiny-trained`` render preset, whose pictures are known
  (:mod:`common.render.pictures`): nearest class picture, plus which class the **colour** (the CLIP
  pooled branch) and the **shape** (the T5 branch) point to, so each branch's share is visible.
* :class:`ZeroShotCLIP` for real FLUX.1 weights: does a CLIP model see the class in the picture?

Each image is classified by CLIP against the prompts of all federation classes (same template as
the text targets); accuracy, balanced accuracy and macro-F1 against the class the image was
rendered for are reported per owner (node / server) and pooled. The CLIP model is loaded from a
local folder (``render.clip-metric-model``); without one the metric is skipped with one log line.
The plumbing is tested with a tiny random CLIP saved to a folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from common.render.pictures import class_look, class_pictures, nearest_colour, nearest_shape

log = logging.getLogger(__name__)

_WARNED: set[str] = set()


def classification_scores(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over classes present) and macro-F1 (over classes
    present in labels or predictions)."""
    pred, labels = pred.long(), labels.long()
    if not len(labels):
        return {}
    acc = float((pred == labels).float().mean())
    recalls, f1s = [], []
    for c in range(num_classes):
        tp = int(((pred == c) & (labels == c)).sum())
        fn = int(((pred != c) & (labels == c)).sum())
        fp = int(((pred == c) & (labels != c)).sum())
        if tp + fn:
            recalls.append(tp / (tp + fn))
        if tp + fn + fp:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"acc": acc, "balanced_acc": sum(recalls) / len(recalls), "macro_f1": sum(f1s) / len(f1s), "n": float(len(labels))}


class ZeroShotCLIP:
    def __init__(self, folder: str | Path, device: str = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
        self.device = device

    @classmethod
    def maybe(cls, folder: str, device: str = "cpu") -> "ZeroShotCLIP | None":
        """The metric model, or ``None`` with one log line when no weights are configured/present."""
        if not folder or not Path(folder).expanduser().is_dir():
            reason = "render.clip-metric-model is empty" if not folder else f"'{folder}' is not a folder"
            if reason not in _WARNED:
                _WARNED.add(reason)
                log.info("zero-shot CLIP image metric skipped: %s (point it at a local CLIP folder to enable it)", reason)
            return None
        return cls(Path(folder).expanduser(), device)

    @torch.no_grad()
    def predict(self, images: list[Image.Image], class_names: list[str], template: str, batch_size: int = 32) -> torch.Tensor:
        prompts = [template.format(label=c.replace("_", " ")) for c in class_names]
        text = self.processor(text=prompts, return_tensors="pt", padding=True).to(self.device)
        text_emb = torch.nn.functional.normalize(_features(self.model.get_text_features(**text)), dim=-1)
        preds = []
        for start in range(0, len(images), batch_size):
            pix = self.processor(images=images[start : start + batch_size], return_tensors="pt").to(self.device)
            img = torch.nn.functional.normalize(_features(self.model.get_image_features(**pix)), dim=-1)
            preds.append((img @ text_emb.T).argmax(-1).cpu())
        return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


class PictureScorer:
    """Nearest class picture (mean squared error at the picture resolution); colour and shape read apart."""

    def __init__(self, num_classes: int, resolution: int = 64) -> None:
        self.resolution = resolution
        self.templates = class_pictures(num_classes, resolution)  # [K, 3, R, R]
        looks = [class_look(i) for i in range(num_classes)]
        self.colours = torch.tensor([c for c, _ in looks])
        self.shapes = torch.tensor([s for _, s in looks])

    def tensors(self, images: list[Image.Image]) -> torch.Tensor:
        import numpy as np

        arr = [np.asarray(im.convert("RGB").resize((self.resolution, self.resolution), Image.BILINEAR), dtype=np.float32)
               for im in images]
        return torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2) / 127.5 - 1 if arr else torch.empty(0, 3, 1, 1)

    def predict(self, images: list[Image.Image], class_names: list[str] | None = None, template: str = "") -> torch.Tensor:
        x = self.tensors(images)
        if not len(x):
            return torch.empty(0, dtype=torch.long)
        return torch.cdist(x.flatten(1), self.templates.flatten(1)).argmin(1)

    def branch_scores(self, images: list[Image.Image], labels: torch.Tensor) -> dict[str, float]:
        """``acc_clip``: the colour is the label's colour; ``acc_t5``: the shape is the label's shape."""
        x = self.tensors(images)
        if not len(x):
            return {}
        return {"acc_clip": float((nearest_colour(x) == self.colours[labels]).float().mean()),
                "acc_t5": float((nearest_shape(x) == self.shapes[labels]).float().mean())}


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict[str, float]:
    """``acc:<class>`` for every class that has images."""
    return {f"acc:{c}": float((pred[labels == i] == i).float().mean()) for i, c in enumerate(class_names)
            if bool((labels == i).any())}


def _features(out: Any) -> torch.Tensor:
    """transformers 5 returns a model output whose ``pooler_output`` holds the projected features."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def score_images(
    scorer: "ZeroShotCLIP | PictureScorer", out: Path, entries: list[dict[str, Any]], class_names: list[str], template: str
) -> dict[str, dict[str, float]]:
    """Scores per owner and pooled (``"all"``) for manifest ``entries`` under ``out``: accuracy, balanced
    accuracy, macro-F1, per class (``acc:<class>``) and, for pictures, per branch (``acc_clip``, ``acc_t5``)."""
    index = {c: i for i, c in enumerate(class_names)}
    entries = [e for e in entries if e.get("class_name") in index and (Path(out) / e["path"]).is_file()]
    images = []
    for e in entries:
        with Image.open(Path(out) / e["path"]) as im:
            images.append(im.convert("RGB"))
    pred = scorer.predict(images, class_names, template)
    labels = torch.tensor([index[e["class_name"]] for e in entries], dtype=torch.long)
    def scores(mask: torch.Tensor) -> dict[str, float]:
        out = {**classification_scores(pred[mask], labels[mask], len(class_names)),
               **per_class_accuracy(pred[mask], labels[mask], class_names)}
        if isinstance(scorer, PictureScorer):
            out.update(scorer.branch_scores([im for im, m in zip(images, mask.tolist()) if m], labels[mask]))
        return out

    result = {"all": scores(torch.ones(len(entries), dtype=torch.bool))}
    for owner in sorted({e["owner"] for e in entries}):
        result[owner] = scores(torch.tensor([e["owner"] == owner for e in entries], dtype=torch.bool))
    return result
