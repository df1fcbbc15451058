"""Where an image's conditioning comes from.

* **adapters on embeddings**: real held-out clips (audio -> AST -> adapters) or generator samples
  (pretrained mode) go through the adapters; the CLIP branch gives ``clip_pooled``, the T5 branch
  ``t5_sequence``.
* **class text embeddings** (oracle): per branch, the class's own text target replaces the adapter
  output — the baseline that shows what FLUX draws from the true prompt (the seeds'
  ``generate_from_clip_text_embeddings`` / ``generate_from_t5_text_embeddings``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from common.config.choices import CALIBRATIONS, ORACLES
from common.records import ClassTensors
from common.render.backend import Conditioning
from common.render.trained_preset import Preconditioner
from common.training import predict

WHITEN_FLOOR = 0.05  # target-soft: no span direction counts more than 1 / (this x the strongest one's spread)


def adapter_conditioning(adapters: nn.Module, embeddings: Tensor, device: torch.device | str = "cpu") -> Conditioning:
    clip, t5 = predict(adapters, embeddings, device=device)
    return Conditioning({"clip_pooled": clip, "t5_sequence": t5})


def outputs_conditioning(clip: Tensor, t5: Tensor) -> Conditioning:
    """Conditioning from adapter outputs computed elsewhere (e.g. class-mean outputs)."""
    return Conditioning({"clip_pooled": clip.float(), "t5_sequence": t5.float()})


def with_oracle(cond: Conditioning, targets: ClassTensors, class_names: list[str], oracle: str) -> Conditioning:
    """Replace the CLIP and/or T5 conditioning of each row by its class's text target."""
    if oracle not in ORACLES:
        raise ValueError(f"oracle must be one of {ORACLES}, got {oracle!r}")
    if oracle == "none":
        return cond
    rows = torch.tensor([targets.class_names.index(c) for c in class_names])
    out = dict(cond.tensors)
    if oracle in ("clip", "both"):
        out["clip_pooled"] = targets.clip[rows].float()
    if oracle in ("t5", "both"):
        t5 = targets.t5[rows].float()
        out["t5_sequence"] = t5
    return Conditioning(out)


def target_radius(cond: Conditioning, targets: ClassTensors, span: bool = False) -> Conditioning:
    """Each row's offset from the centre of the class text targets, rescaled to the targets' mean radius.

    Why: adapters trained to regress text targets shrink toward the targets' mean when a clip is
    ambiguous (on KD adapters the T5 outputs carry a fraction of their class's offset from the
    mean), and a picture model trained on prompts has never seen such short offsets: it draws the
    in-between picture. Rescaling keeps the direction, which holds the class (retrieval is by cosine),
    and restores the length a prompt has. Per branch and per row (a T5 row is its whole sequence);
    the centre and radius come from the targets alone, never from the rows being rendered, so an
    image does not depend on what else is in its batch. A row at the centre is left as it is.

    ``span``: first keep only the part of the offset that lies in the span of the class targets'
    offsets (``render.calibrate = "target-span"``): for a picture model that knows only these prompts
    (the ``tiny-trained`` preset), the rest is noise that would take the place of the class's share
    of the radius.
    """
    out = dict(cond.tensors)
    for name, table in (("clip_pooled", targets.clip), ("t5_sequence", targets.t5)):
        if name not in out:
            continue
        table = table.float().flatten(1)
        centre = table.mean(0)
        radius = (table - centre).norm(dim=1).mean()
        x = out[name].float()
        offset = x.flatten(1) - centre
        if span:
            _, sv, vh = torch.linalg.svd(table - centre, full_matrices=False)
            basis = vh[sv > sv[0] * 1e-5]  # [k, D]
            offset = (offset @ basis.T) @ basis
        norm = offset.norm(dim=1, keepdim=True)
        scaled = centre + offset * (radius / norm.clamp_min(1e-12))
        out[name] = torch.where(norm > 0, scaled, x.flatten(1)).view(x.shape)
    return Conditioning(out)


def target_soft(cond: Conditioning, targets: ClassTensors, sigma: float) -> Conditioning:
    """Each row replaced by a mix of the class text targets, weighted by how close the row is to each.

    Why: a picture model that knows only the federation's class prompts (the ``tiny-trained`` preset)
    draws a class's picture for that class's prompt, and something undefined in between. Adapter
    outputs from sound land near their class's prompt but not on it (in the targets' whitened span,
    a good part of the distance between two prompts away); there the preset draws the right picture
    far less often than the nearest prompt is the right one. So, per branch and per row (a T5 row is its whole sequence), the row's offset from the
    targets' centre is read in the targets' span, whitened (:class:`Preconditioner`, floor
    :data:`WHITEN_FLOOR`), and the row becomes ``sum_c w_c target_c`` with
    ``w = softmax(-d_c^2 / (2 (sigma s)^2))``, ``d_c`` the whitened distance to class ``c``'s target and
    ``s`` the mean distance between two class targets there (so ``sigma`` means the same for 4 classes
    as for 50): a clearly placed row gets its class's prompt, an ambiguous one a blend of the prompts
    it is near.
    The picture then shows which prompts the sound is close to (a soft retrieval drawn by FLUX), not
    the adapter output itself; for real FLUX.1 use ``target-radius`` or ``none``. Centre, span and
    scale come from the targets alone: an image never depends on its batch.
    """
    if sigma <= 0:
        raise ValueError(f"render.calibrate-sigma must be > 0, got {sigma}")
    out = dict(cond.tensors)
    for name, table in (("clip_pooled", targets.clip), ("t5_sequence", targets.t5)):
        if name not in out:
            continue
        table = table.float().flatten(1)
        pre = Preconditioner.fit(table, WHITEN_FLOOR)
        z_targets = pre.coords(table)
        x = out[name].float()
        z = pre.coords(x.flatten(1))
        spacing = torch.pdist(z_targets).mean() if len(z_targets) > 1 else torch.tensor(1.0)
        weights = torch.softmax(-torch.cdist(z, z_targets).pow(2) / (2 * (sigma * spacing) ** 2), dim=1)
        out[name] = (weights @ table).view(x.shape)
    return Conditioning(out)


def calibrate(cond: Conditioning, targets: ClassTensors, how: str, sigma: float) -> Conditioning:
    """``render.calibrate`` applied to ``cond`` (see :func:`target_radius` and :func:`target_soft`)."""
    if how not in CALIBRATIONS:
        raise ValueError(f"render.calibrate must be one of {CALIBRATIONS}, got {how!r}")
    if how == "none":
        return cond
    if how == "target-soft":
        return target_soft(cond, targets, sigma)
    return target_radius(cond, targets, span=how == "target-span")
