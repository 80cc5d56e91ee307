"""Token Merging (ToMe, Bolya et al., ICLR 2023) over timm 1.0's VisionTransformer.

Written once for every method in the project that merges tokens (ToCom, DiffRate). The pieces are small functions so
that a method with its own block (DiffRate's differentiable merge, ToCom's compensated attention) can reuse the matching,
merging and size-weighted attention without the patch:

- `parse_r(num_layers, r)`: int, `(r, inflection)` or per-layer list -> per-layer list.
- `bipartite_soft_matching(metric, r, class_token, distill_token)` -> `(merge, unmerge)` closures, built from
  `split_alternate`, `matching_scores`, `match_tokens` and `gather_merge`.
- `merge_wavg(merge, x, size)`: size-weighted average merge; `merge_source(merge, x, source)`: source tracking.
- `size_attention(q, k, v, size, ...)`: attention with ToMe's proportional bias (log of token sizes on the keys).
- `apply_patch(model, trace_source=False, prop_attn=True)`, then `model.r = 16`: ToMe's patch API.

Conventions are the official ToMe's: set A holds the even token indices, set B the odd ones; the merged sequence is
[unmerged A tokens, all B tokens]; the class token (index 0) and the distillation token (index 1) are never merged
and stay at indices 0 and 1.
"""
import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

__all__ = [
    'parse_r', 'do_nothing', 'split_alternate', 'matching_scores', 'match_tokens', 'gather_merge', 'gather_unmerge',
    'bipartite_soft_matching', 'merge_wavg', 'merge_source', 'size_attention', 'ToMeAttention', 'ToMeBlock',
    'make_tome_class', 'apply_patch', 'tome_info',
]


def parse_r(num_layers: int, r: Union[List[int], Tuple[int, float], int]) -> list:
    """Per-layer list of tokens to merge.

    - int: the same r in every layer;
    - (r, inflection): a linear ramp with the same total as r per layer; inflection -1 is the paper's "decreasing"
      schedule, 0 constant, +1 increasing;
    - list: taken as given (a copy), padded with zeros to `num_layers`. Its entries are not inspected, so a method may
      put its own per-layer values there (ToCom puts `[r_tgt, r_src]` pairs).
    """
    inflect = 0
    if isinstance(r, list):
        if len(r) < num_layers:
            r = r + [0] * (num_layers - len(r))
        return list(r)
    if isinstance(r, tuple):
        r, inflect = r
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1) if num_layers > 1 else 0
    return [int(min_val + step * i) for i in range(num_layers)]


def do_nothing(x: torch.Tensor, mode: Optional[str] = None) -> torch.Tensor:
    return x


def split_alternate(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bipartite split along the token axis: set A = even indices, set B = odd indices."""
    return x[..., ::2, :], x[..., 1::2, :]


def matching_scores(metric: torch.Tensor, class_token: bool = False, distill_token: bool = False) -> torch.Tensor:
    """Cosine similarity of every A token to every B token, `[B, ceil(T/2), floor(T/2)]`.

    Protected tokens get -inf so they are never chosen: the class token is A's row 0, the distillation token (index 1)
    is B's column 0.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = split_alternate(metric)
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    if distill_token:
        scores[..., :, 0] = -math.inf
    return scores


def match_tokens(scores: torch.Tensor, r: int, class_token: bool = False):
    """Choose the r most similar A tokens and their B partners.

    Returns `(unm_idx, src_idx, dst_idx)`, each `[B, n, 1]`: A tokens kept, A tokens merged, and for each merged one the
    B token it goes into. With a class token the kept A tokens are put back in their original order (class token first).
    """
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]
    return unm_idx, src_idx, dst_idx


def gather_merge(x: torch.Tensor, unm_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor,
                 mode: str = 'mean', distill_token: bool = False) -> torch.Tensor:
    """Merge the chosen A tokens into their B partners with `scatter_reduce(mode)`; output [unmerged A, B]."""
    src, dst = split_alternate(x)
    n, t1, c = src.shape
    r = src_idx.shape[-2]
    unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
    src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
    dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
    if distill_token:
        # keep [class, distill] at [0, 1]
        return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
    return torch.cat([unm, dst], dim=1)


def gather_unmerge(x: torch.Tensor, unm_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor,
                   num_tokens: int) -> torch.Tensor:
    """Inverse of `gather_merge` (without distill token): each merged token is copied back to all its sources."""
    unm_len = unm_idx.shape[1]
    r = src_idx.shape[-2]
    unm, dst = x[..., :unm_len, :], x[..., unm_len:, :]
    n, _, c = unm.shape
    src = dst.gather(dim=-2, index=dst_idx.expand(n, r, c))
    out = torch.zeros(n, num_tokens, c, device=x.device, dtype=x.dtype)
    out[..., 1::2, :] = dst
    out.scatter_(dim=-2, index=(2 * unm_idx).expand(n, unm_len, c), src=unm)
    out.scatter_(dim=-2, index=(2 * src_idx).expand(n, r, c), src=src)
    return out


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = False,
                            distill_token: bool = False) -> Tuple[Callable, Callable]:
    """ToMe's balanced bipartite matching on `metric` `[B, T, C]`, removing r tokens (at most half of the
    unprotected ones). Returns `(merge(x, mode='mean'), unmerge(x))`."""
    protected = int(class_token) + int(distill_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return do_nothing, do_nothing

    with torch.no_grad():
        scores = matching_scores(metric, class_token, distill_token)
        unm_idx, src_idx, dst_idx = match_tokens(scores, r, class_token)

    def merge(x: torch.Tensor, mode: str = 'mean') -> torch.Tensor:
        return gather_merge(x, unm_idx, src_idx, dst_idx, mode, distill_token)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        return gather_unmerge(x, unm_idx, src_idx, dst_idx, t)

    return merge, unmerge


def merge_wavg(merge: Callable, x: torch.Tensor, size: Optional[torch.Tensor] = None):
    """Merge by the average weighted by token size (number of patches a token stands for).
    Returns the merged tokens and their new sizes `[B, T', 1]`."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode='sum')
    size = merge(size, mode='sum')
    return x / size, size


def merge_source(merge: Callable, x: torch.Tensor, source: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Track which input patches each token holds: a 0/1 `[B, T', T0]` map, identity before the first merge."""
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device)[None, ...].expand(n, t, t)
    return merge(source, mode='amax')


def size_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Optional[torch.Tensor], scale: float,
                   dropout_p: float = 0.0, fused: bool = True) -> torch.Tensor:
    """softmax(q k^T * scale + log(size of each key)) v, for `[B, H, N, D]` inputs and `size` `[B, N, 1]` or None.

    The proportional bias is an additive float mask, so the fused kernel (`F.scaled_dot_product_attention`) computes
    it; `fused=False` runs the explicit softmax (ToMe's code path). Both agree within fp32 rounding.
    """
    bias = None if size is None else size.log()[:, None, None, :, 0].to(q.dtype)
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    attn = attn.softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


class ToMeAttention(Attention):
    """timm Attention that takes the token sizes (proportional attention) and also returns the merge metric,
    the keys averaged over heads `[B, N, head_dim]`."""

    def qkv_heads(self, x: torch.Tensor):
        """q, k, v as `[B, H, N, head_dim]` (after timm's optional q/k norms)."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def attend(self, x: torch.Tensor, q, k, v, size: Optional[torch.Tensor]) -> torch.Tensor:
        """Attention output after the projection, `[B, N, dim]`."""
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, 'gate', None) is not None else None
        out = size_attention(q, k, v, size, self.scale, self.attn_drop.p if self.training else 0.0,
                             fused=self.fused_attn)
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def forward(self, x: torch.Tensor, size: Optional[torch.Tensor] = None):
        q, k, v = self.qkv_heads(x)
        return self.attend(x, q, k, v, size), k.mean(1)


class ToMeBlock(Block):
    """timm Block that merges `r` tokens (popped from the shared `_tome_info['r']`) between attention and MLP."""

    def tome_merge(self, x: torch.Tensor, metric: torch.Tensor, r: int) -> torch.Tensor:
        """Merge r tokens of x by the metric, updating the shared size (and source) state."""
        info = self._tome_info
        if r > 0:
            merge, _ = bipartite_soft_matching(metric, r, info['class_token'], info['distill_token'])
            if info['trace_source']:
                info['source'] = merge_source(merge, x, info['source'])
            x, info['size'] = merge_wavg(merge, x, info['size'])
        return x

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise NotImplementedError('ToMe blocks change the token count; attention masks are not supported')
        info = self._tome_info
        attn_size = info['size'] if info['prop_attn'] else None
        x_attn, metric = self.attn(self.norm1(x), attn_size)
        x = x + self.drop_path1(self.ls1(x_attn))
        x = self.tome_merge(x, metric, info['r'].pop(0))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


_TOME_CLASSES = {}


def make_tome_class(transformer_class):
    """Subclass of `transformer_class` whose forward_features first resets the ToMe state from `self.r`."""
    if transformer_class in _TOME_CLASSES:
        return _TOME_CLASSES[transformer_class]

    class ToMeVisionTransformer(transformer_class):
        def forward_features(self, *args, **kwargs):
            self._tome_info['r'] = parse_r(len(self.blocks), self.r)
            self._tome_info['size'] = None
            self._tome_info['source'] = None
            return super().forward_features(*args, **kwargs)

    ToMeVisionTransformer.__name__ = 'ToMe' + transformer_class.__name__
    ToMeVisionTransformer.__qualname__ = ToMeVisionTransformer.__name__
    _TOME_CLASSES[transformer_class] = ToMeVisionTransformer
    return ToMeVisionTransformer


def tome_info(model: VisionTransformer, trace_source: bool = False, prop_attn: bool = True) -> dict:
    """The state dict shared by the model and all its blocks."""
    return {
        'r': model.r,
        'size': None,
        'source': None,
        'trace_source': trace_source,
        'prop_attn': prop_attn,
        'class_token': getattr(model, 'cls_token', None) is not None,
        'distill_token': getattr(model, 'dist_token', None) is not None,
    }


def apply_patch(model: VisionTransformer, trace_source: bool = False, prop_attn: bool = True,
                block_class=ToMeBlock, attention_class=ToMeAttention) -> VisionTransformer:
    """Apply ToMe to a timm VisionTransformer in place (and return it). Afterwards set `model.r`.

    trace_source: keep `model._tome_info['source']`, the patch-to-token map (for visualisation).
    prop_attn: proportional attention; ToMe turns it on for models evaluated off the shelf.
    block_class / attention_class: the replacement classes (a method with its own block subclasses ToMeBlock).
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f'ToMe patches timm VisionTransformer models, got {type(model).__name__}')
    if getattr(model, 'reg_token', None) is not None:
        raise ValueError('ToMe protects only the class and distillation tokens; register tokens are not supported')
    if getattr(model, 'grad_checkpointing', False):
        # checkpoint_seq re-runs blocks in backward, which would pop the per-layer r list twice
        raise ValueError('ToMe does not support gradient checkpointing; call model.set_grad_checkpointing(False)')
    model.__class__ = make_tome_class(model.__class__)
    model.r = 0
    model._tome_info = tome_info(model, trace_source, prop_attn)
    for module in model.modules():
        if isinstance(module, Block):
            module.__class__ = block_class
            module._tome_info = model._tome_info
        elif isinstance(module, Attention):
            module.__class__ = attention_class
    return model
