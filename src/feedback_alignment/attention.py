"""Multi-head attention whose projections send the error through feedback weights.

nn.MultiheadAttention keeps its input projection as bare Parameters (in_proj_weight, or
q/k/v_proj_weight when key and value have their own sizes) and calls out_proj's weight directly,
so converting its Linear children alone would leave all of attention on exact backprop (on
vit_b_16, a third of the matrix weights). Here every projection carries a B: the error reaching
the attention's query, key and value goes through the input projection's B, and the error
reaching the attention's inner output goes through out_proj's B. The attention itself (scores,
softmax, the weighted sum) has no weights and keeps its exact gradient.

The computation is F.multi_head_attention_forward's, step for step (same masks, dropout draws and
kernels), with the three projections through the feedback Functions; without gradients, or in
alignment.measure's backprop pass, the layer is torch's own.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import FeedbackLayer, from_module, take_over


class FeedbackProjection(FeedbackLayer, nn.Module):
    """The feedback state (B, gain, draws) of one weight of a multi-head attention: `weight` is
    the owner's Parameter of that name. A child module of the owner, so its buffers live in the
    owner's state_dict and move with it."""

    def __init__(self, owner: nn.MultiheadAttention, weight_name: str, name: str, rule: str, scale: str,
                 seed: int, constrain_weight_norm: bool):
        nn.Module.__init__(self)
        object.__setattr__(self, "_owner", owner)  # not a submodule: the owner holds this one
        self.weight_name = weight_name
        self._setup_feedback(rule, scale, seed, name, constrain_weight_norm)

    @property
    def weight(self) -> Tensor:
        return getattr(self._owner, self.weight_name)

    def project(self, input: Tensor, weight: Tensor, bias: Tensor | None, rows: slice = slice(None)) -> Tensor:
        """input @ weight^T + bias, with `weight` rows `rows` of this projection's W and B."""
        return self._feedback_output(input, weight, bias, None, feedback=self.feedback_direction[rows])

    def extra_repr(self) -> str:
        return f"{self.weight_name}, rule={self.rule.name}, scale={self.scale}"


class FeedbackMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention whose input projections and out_proj send the error through B."""

    @classmethod
    def from_module(cls, module: nn.MultiheadAttention, name: str, rule: str, scale: str, seed: int,
                    constrain_weight_norm: bool) -> FeedbackMultiheadAttention:
        layer = take_over(module, cls)
        prefix = f"{name}." if name else ""
        layer.out_proj = from_module(module.out_proj, prefix + "out_proj", rule, scale, seed, constrain_weight_norm)
        for weight_name in layer._projection_weights():
            child = weight_name.replace("_weight", "_feedback")
            setattr(layer, child, FeedbackProjection(layer, weight_name, prefix + child, rule, scale, seed,
                                                     constrain_weight_norm))
        return layer

    def _projection_weights(self) -> list[str]:
        """The input projection's Parameters: one packed, or one each for query, key and value."""
        return ["in_proj_weight"] if self._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]

    def projections(self) -> list[FeedbackProjection]:
        return [getattr(self, name.replace("_weight", "_feedback")) for name in self._projection_weights()]

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        layers = [*self.projections(), self.out_proj]
        records = torch.is_grad_enabled() and (
            any(x.requires_grad for x in (query, key, value)) or any(p.requires_grad for p in self.parameters()))
        if not records or any(layer._exact_backprop for layer in layers):
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        for projection in layers[:-1]:  # out_proj does its own, in its forward
            projection._prepare_feedback(projection.weight)
        is_batched = query.dim() == 3
        self_attention = query is key and key is value
        if self.batch_first and is_batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        if not is_batched:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        output, weights = self._attention(query, key, value, self_attention, key_padding_mask, need_weights,
                                          attn_mask, average_attn_weights, is_causal)
        if not is_batched:
            output = output.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            output = output.transpose(1, 0)
        return output, weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool):
        """q, k, v through the input projection(s), each (length, batch, embed_dim)."""
        E = self.embed_dim
        bias = self.in_proj_bias
        biases = (None, None, None) if bias is None else bias.chunk(3)
        if not self._qkv_same_embed_dim:
            return tuple(projection.project(x, projection.weight, b)
                         for projection, x, b in zip(self.projections(), (query, key, value), biases))
        projection = self.in_proj_feedback
        weight = self.in_proj_weight
        if self_attention:  # one product for all three, as torch does
            packed = projection.project(query, weight, bias)
            q, k, v = packed.unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return q, k, v
        return tuple(projection.project(x, weight[rows], b, rows)
                     for x, rows, b in zip((query, key, value), (slice(0, E), slice(E, 2 * E), slice(2 * E, 3 * E)),
                                           biases))

    def _attention(self, query, key, value, self_attention, key_padding_mask, need_weights, attn_mask,
                   average_attn_weights, is_causal):
        """F.multi_head_attention_forward on (length, batch, embed) inputs, projections through B."""
        tgt_len, bsz, embed_dim = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("nn.MultiheadAttention needs attn_mask with the is_causal hint")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False
        q, k, v = self._project(query, key, value, self_attention)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
                                .reshape(bsz * heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            output = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            output = self.out_proj(output).view(tgt_len, bsz, -1)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            return output, weights.mean(dim=1) if average_attn_weights else weights
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, heads, -1, src_len)
        q = q.view(bsz, heads, tgt_len, head_dim)
        k = k.view(bsz, heads, src_len, head_dim)
        v = v.view(bsz, heads, src_len, head_dim)
        output = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        output = output.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, embed_dim)
        return self.out_proj(output).view(tgt_len, bsz, -1), None
