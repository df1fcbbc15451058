"""A DP-SGD twin of the adapters: the same computation, built only from layers that can be clipped per clip.

Why a twin and not the adapters themselves: per-clip clipping (:mod:`common.privacy.clipping`, and Opacus,
its reference) works layer by layer from each layer's input and output gradient, and
:class:`~common.models.adapters.BranchAdapter` holds two bare parameters (``pos``, ``latents``) and an
``nn.MultiheadAttention`` whose projections run inside one functional call, out of the hooks' sight.
Opacus' own replacement, ``DPMultiheadAttention``, is wrong in 1.6.0 whenever the query has more than one
token with ``batch_first=True`` (it splices heads into tokens; the T5 branch queries ``t5_tokens`` latents),
and it renames the attention's weights. The twin shares every supported submodule with the adapters (the
token MLP, the summary, the norms, the MLP and the output: trained in place), puts ``pos`` and ``latents``
into two tiny modules with their own clipping rules (and Opacus grad samplers), and rebuilds the attention
from four ``nn.Linear`` layers.
:meth:`DPTwin.copy_to` writes the trained weights back under the adapters' own keys, so a DP site's reply has
the same records as any other site's and both can share a federation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import Tensor, nn

from common.models.adapters import Adapters, BranchAdapter
from common.privacy.clipping import per_clip_rule, register_rule

__all__ = ["DPTwin"]


class AddParam(nn.Module):
    """``h + weight`` (``weight [L, H]`` broadcast over the batch): the twin's ``BranchAdapter.pos``."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(value.detach().clone())

    def forward(self, h: Tensor) -> Tensor:
        return h + self.weight


class Latents(nn.Module):
    """``weight [K, H]`` expanded to ``[B, K, H]``: the twin's ``BranchAdapter.latents``. The zero-weighted
    term ties the output to the input, so Opacus' hooks see this layer's activations."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(value.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.weight.unsqueeze(0).expand(x.shape[0], -1, -1) + 0 * x[:, :1, :1].sum()


def _output_grad(layer: AddParam | Latents, activations, backprops: Tensor) -> dict:
    """Each clip's gradient of ``weight`` is the gradient of the layer's output (``[B, *weight.shape]``)."""
    return {layer.weight: backprops}


for _layer in (AddParam, Latents):
    register_grad_sampler(_layer)(_output_grad)  # Opacus' per-sample mode
    register_rule(_layer, per_clip_rule(_output_grad))  # the book-keeping mode


class LinearAttention(nn.Module):
    """``nn.MultiheadAttention``'s computation (batch first, no attention weights) from four ``nn.Linear``."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        e = mha.embed_dim
        self.heads, self.dropout = mha.num_heads, mha.dropout
        self.q, self.k, self.v, self.out = (nn.Linear(e, e) for _ in range(4))
        with torch.no_grad():
            for lin, w, b in zip((self.q, self.k, self.v), mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            self.out.weight.copy_(mha.out_proj.weight)
            self.out.bias.copy_(mha.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        b, lq, e = query.shape

        def split(t: Tensor) -> Tensor:
            return t.view(b, t.shape[1], self.heads, e // self.heads).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(self.q(query)), split(self.k(key)), split(self.v(value)),
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(b, lq, e))

    def copy_to(self, mha: nn.MultiheadAttention) -> None:
        with torch.no_grad():
            mha.in_proj_weight.copy_(torch.cat([self.q.weight, self.k.weight, self.v.weight]))
            mha.in_proj_bias.copy_(torch.cat([self.q.bias, self.k.bias, self.v.bias]))
            mha.out_proj.weight.copy_(self.out.weight)
            mha.out_proj.bias.copy_(self.out.bias)


class TwinBranch(nn.Module):
    """One branch, as :meth:`BranchAdapter.forward` computes it."""

    def __init__(self, branch: BranchAdapter) -> None:
        super().__init__()
        if branch.pos is None or branch.summary is None:
            raise ValueError("DP training needs adapters with input positions (in_tokens set)")
        self.token_mlp, self.summary, self.norm_q, self.norm_kv, self.mlp, self.out = (
            branch.token_mlp, branch.summary, branch.norm_q, branch.norm_kv, branch.mlp, branch.out)
        self.pos = AddParam(branch.pos)
        self.latents = Latents(branch.latents)
        self.attn = LinearAttention(branch.attn)

    def forward(self, x: Tensor) -> Tensor:
        h = self.pos(self.token_mlp(x))
        q = self.latents(x) + self.summary(h.flatten(1)).unsqueeze(1)
        kv = self.norm_kv(h)
        z = q + self.attn(self.norm_q(q), kv, kv)
        z = z + self.mlp(z)
        return self.out(z)

    def copy_to(self, branch: BranchAdapter) -> None:
        with torch.no_grad():
            branch.pos.copy_(self.pos.weight)
            branch.latents.copy_(self.latents.weight)
        self.attn.copy_to(branch.attn)


class DPTwin(nn.Module):
    """Both branches: ``forward(x) -> (clip [B, Dc], t5 [B, n, Dt])``, as :class:`Adapters` computes them."""

    def __init__(self, adapters: Adapters) -> None:
        super().__init__()
        self.clip, self.t5 = TwinBranch(adapters.clip), TwinBranch(adapters.t5)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim == 2:  # [B, H], as Adapters accepts it
            x = x.unsqueeze(1)
        return self.clip(x)[:, 0], self.t5(x)

    def branch_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {"clip": list(self.clip.parameters()), "t5": list(self.t5.parameters())}

    def copy_to(self, adapters: Adapters) -> None:
        """Write what only the twin holds (positions, latents, attention) back into ``adapters``."""
        self.clip.copy_to(adapters.clip)
        self.t5.copy_to(adapters.t5)
