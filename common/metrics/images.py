"""Image quality as zero-shot classification: does a CLIP model see the class in the picture?

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


def _features(out: Any) -> torch.Tensor:
    """transformers 5 returns a model output whose ``pooler_output`` holds the projected features."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def score_images(
    scorer: ZeroShotCLIP, out: Path, entries: list[dict[str, Any]], class_names: list[str], template: str
) -> dict[str, dict[str, float]]:
    """Zero-shot scores per owner and pooled (``"all"``) for manifest ``entries`` under ``out``."""
    index = {c: i for i, c in enumerate(class_names)}
    entries = [e for e in entries if e.get("class_name") in index and (Path(out) / e["path"]).is_file()]
    images = []
    for e in entries:
        with Image.open(Path(out) / e["path"]) as im:
            images.append(im.convert("RGB"))
    pred = scorer.predict(images, class_names, template)
    labels = torch.tensor([index[e["class_name"]] for e in entries], dtype=torch.long)
    result = {"all": classification_scores(pred, labels, len(class_names))}
    for owner in sorted({e["owner"] for e in entries}):
        mask = torch.tensor([e["owner"] == owner for e in entries])
        result[owner] = classification_scores(pred[mask], labels[mask], len(class_names))
    return result
