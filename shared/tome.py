"""Token Merging (ToMe, Bolya et al., ICLR 2023) over timm 1.0's VisionTransformer.

Written once for every method in the project that merges tokens (ToCom, DiffRate). The pieces are small functions so
that a method with its own block (DiffRate's differentiable merge, ToCom's compensated attention) can reuse the matching,
merging and size-weighted attention without the patch:

- `parse_r(num_layers, r)`: int, `(r, inflection)` or per-layer list -> per-layer list.
- `bipartite_soft_matching(metric, r, class_token, distill_token, num_prefix)` -> `(merge, unmerge)` functions, built
  from `match_bipartite` (a `Matching` of index tensors), `merge_matched` and `unmerge_matched`.
- `merge_wavg(merge, x, size)`: size-weighted average merge; `merge_source(merge, x, source)`: source tracking.
- `size_attention(q, k, v, size, ...)`: attention with ToMe's proportional bias (log of token sizes on the keys).
- `apply_patch(model, trace_source=False, prop_attn=True)`, then `model.r = 16`: ToMe's patch API.

Conventions are the official ToMe's (results match it bit for bit): set A holds the even token indices, set B the odd
ones; the merged sequence is [unmerged A tokens, all B tokens]. The prefix tokens (class, distillation, registers: the
first `num_prefix` of the sequence) are never merged and stay at indices 0..num_prefix-1 in their order; with one prefix
token (DeiT's class token) or two (class + distillation) this is ToMe's own layout.

The patch runs on every backbone `shared.backbones` supports: class token or none, registers, layer scale (the block
applies `ls1` / `ls2` as timm's does), pre-norm, average or attention pooling (weighted by token size once tokens are
merged, `shared.backbones.pool_features`), any width, depth and image size; other backbones are refused with the reason.
"""
import math
from functools import partial
from typing import Callable, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from shared.backbones import pool_features, require_supported

__all__ = [
    'parse_r', 'do_nothing', 'split_alternate', 'Matching', 'match_bipartite', 'merge_matched', 'unmerge_matched',
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
    if isinstance(r, list):
        return list(r) + [0] * (num_layers - len(r))
    mean_r, inflection = r if isinstance(r, tuple) else (r, 0)
    # the ramp runs from `first` to `last` around the mean; each layer's value is truncated to an int
    first = int(mean_r * (1.0 - inflection))
    last = 2 * mean_r - first
    slope = (last - first) / (num_layers - 1) if num_layers > 1 else 0
    return [int(first + layer * slope) for layer in range(num_layers)]


def do_nothing(x: torch.Tensor, mode: Optional[str] = None) -> torch.Tensor:
    return x


def split_alternate(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bipartite split along the token axis: set A = even indices, set B = odd indices."""
    return x[..., ::2, :], x[..., 1::2, :]


def _rows(index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A `[B, n, 1]` token index widened to every channel of `x` `[B, T, C]` (for gather / scatter)."""
    return index.expand(x.shape[0], -1, x.shape[-1])


class Matching(NamedTuple):
    """One bipartite matching; the index tensors are `[B, n, 1]`, into set A (`kept`, `merged`) or set B (`into`)."""
    kept: torch.Tensor     # A tokens that stay, in token order when there are prefix tokens
    merged: torch.Tensor   # A tokens that leave, most similar first
    into: torch.Tensor     # for each leaving A token, the B token that absorbs it
    num_tokens: int        # sequence length before the merge
    num_prefix: int        # protected tokens at the start of the sequence


def _prefix_split(num_prefix: int) -> Tuple[int, int]:
    """How many of the first `num_prefix` tokens fall in set A (even indices) and in set B (odd indices)."""
    return (num_prefix + 1) // 2, num_prefix // 2


def _num_prefix(class_token: bool, distill_token: bool, num_prefix: Optional[int]) -> int:
    return int(class_token) + int(distill_token) if num_prefix is None else num_prefix


def match_bipartite(metric: torch.Tensor, r: int, class_token: bool = False, distill_token: bool = False,
                    num_prefix: Optional[int] = None) -> Matching:
    """Pair each A token with its most similar B token (cosine of `metric`) and let the r best-paired A tokens go.

    The first `num_prefix` tokens (default: the class and distillation tokens) are protected: their A rows score -inf,
    so they never leave, and their B columns score -inf, so nothing merges into them. r must already be capped
    (see `bipartite_soft_matching`).
    """
    num_prefix = _num_prefix(class_token, distill_token, num_prefix)
    rows, columns = _prefix_split(num_prefix)
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        set_a, set_b = split_alternate(unit)
        similarity = set_a @ set_b.transpose(-1, -2)
        similarity[..., :rows, :] = -math.inf
        similarity[..., :, :columns] = -math.inf
        best, partner = similarity.max(dim=-1)
        ranking = best.argsort(dim=-1, descending=True).unsqueeze(-1)
        merged, kept = ranking[..., :r, :], ranking[..., r:, :]
        if num_prefix:  # ranked order would move the protected tokens away from the front
            kept = kept.sort(dim=1).values
        into = partner.unsqueeze(-1).gather(-2, merged)
    return Matching(kept, merged, into, metric.shape[1], num_prefix)


def merge_matched(match: Matching, x: torch.Tensor, mode: str = 'mean') -> torch.Tensor:
    """Fold the leaving A tokens of x into their B partners with `scatter_reduce(mode)` (the B token itself included).

    Output [kept A, B], except that the prefix tokens come first in their original order: [class, distill, other kept
    A, other B] with a distillation token, [class, reg1, reg2, reg3, reg4, other kept A, other B] with four registers.
    """
    set_a, set_b = split_alternate(x)
    kept = set_a.gather(-2, _rows(match.kept, x))
    set_b = set_b.scatter_reduce(-2, _rows(match.into, x), set_a.gather(-2, _rows(match.merged, x)), reduce=mode)
    rows, columns = _prefix_split(match.num_prefix)
    if not columns:  # at most one prefix token: it is already first among the (sorted) kept A tokens
        return torch.cat((kept, set_b), dim=1)
    # prefix token i sits in A (row i // 2) when i is even, in B (column i // 2) when odd
    prefix = [(kept if i % 2 == 0 else set_b)[:, i // 2:i // 2 + 1] for i in range(match.num_prefix)]
    return torch.cat(prefix + [kept[:, rows:], set_b[:, columns:]], dim=1)


def unmerge_matched(match: Matching, x: torch.Tensor) -> torch.Tensor:
    """Inverse of `merge_matched`: every token goes back to the positions it came from."""
    num_kept = match.kept.shape[1]
    rows, columns = _prefix_split(match.num_prefix)
    if columns:  # undo the interleaved prefix: its even entries are A tokens, its odd ones B tokens
        prefix, rest = x[..., :match.num_prefix, :], x[..., match.num_prefix:, :]
        kept = torch.cat((prefix[..., 0::2, :], rest[..., :num_kept - rows, :]), dim=-2)
        set_b = torch.cat((prefix[..., 1::2, :], rest[..., num_kept - rows:, :]), dim=-2)
    else:
        kept, set_b = x[..., :num_kept, :], x[..., num_kept:, :]
    restored = x.new_zeros(x.shape[0], match.num_tokens, x.shape[-1])
    restored[..., 1::2, :] = set_b
    restored.scatter_(-2, _rows(2 * match.kept, x), kept)
    restored.scatter_(-2, _rows(2 * match.merged, x), set_b.gather(-2, _rows(match.into, x)))
    return restored


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = False, distill_token: bool = False,
                            num_prefix: Optional[int] = None) -> Tuple[Callable, Callable]:
    """ToMe's balanced bipartite matching on `metric` `[B, T, C]`, removing r tokens and protecting the first
    `num_prefix` (default: class + distillation token). Returns `(merge(x, mode='mean'), unmerge(x))`."""
    num_prefix = _num_prefix(class_token, distill_token, num_prefix)
    # set A holds half of the unprotected tokens, so at most that many can leave
    r = min(r, (metric.shape[1] - num_prefix) // 2)
    if r <= 0:
        return do_nothing, do_nothing
    match = match_bipartite(metric, r, num_prefix=num_prefix)
    return partial(merge_matched, match), partial(unmerge_matched, match)


def merge_wavg(merge: Callable, x: torch.Tensor, size: Optional[torch.Tensor] = None):
    """Merge by the average weighted by token size (number of patches a token stands for): sum of size * x over the
    merged tokens, divided by their summed size. Returns the merged tokens and their new sizes `[B, T', 1]`."""
    weight = torch.ones_like(x[..., :1]) if size is None else size
    weighted_sum = merge(x * weight, mode='sum')
    merged_size = merge(weight, mode='sum')
    return weighted_sum / merged_size, merged_size


def merge_source(merge: Callable, x: torch.Tensor, source: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Track which input patches each token holds: a 0/1 `[B, T', T0]` map, identity before the first merge."""
    if source is None:
        batch, tokens = x.shape[:2]
        source = torch.eye(tokens, device=x.device).expand(batch, tokens, tokens)
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

    def layer_schedule(self):
        """This layer's number of tokens to merge and the extra arguments of its attention (none for plain ToMe);
        a method with its own per-layer schedule (ToCom) overrides this."""
        return self._tome_info['r'].pop(0), ()

    def tome_merge(self, x: torch.Tensor, metric: torch.Tensor, r: int) -> torch.Tensor:
        """Merge r tokens of x by the metric, updating the shared size (and source) state."""
        if r <= 0:
            return x
        info = self._tome_info
        merge, _ = bipartite_soft_matching(metric, r, num_prefix=info['num_prefix_tokens'])
        if info['trace_source']:
            info['source'] = merge_source(merge, x, info['source'])
        x, info['size'] = merge_wavg(merge, x, info['size'])
        return x

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise NotImplementedError('ToMe blocks change the token count; attention masks are not supported')
        r, attn_args = self.layer_schedule()
        info = self._tome_info
        attn_out, metric = self.attn(self.norm1(x), info['size'] if info['prop_attn'] else None, *attn_args)
        x = x + self.drop_path1(self.ls1(attn_out))
        # neither the attention output nor the metric is needed by the MLP: freeing them here keeps the block's peak
        # memory at plain timm's (one [B, N, C] tensor less than holding them to the end of the block)
        del attn_out
        x = self.tome_merge(x, metric, r)
        del metric
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


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

        def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
            # average and attention pooling weigh each merged token by the patches it holds; class-token pooling
            # (and a forward that merged nothing) is the model's own head
            size = self._tome_info['size']
            if size is None or self.global_pool == 'token' or size.shape[1] != x.shape[1]:
                return super().forward_head(x, pre_logits)
            x = self.head_drop(pool_features(self, x, size))
            return x if pre_logits else self.head(x)

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
        'num_prefix_tokens': model.num_prefix_tokens,  # class, distillation and register tokens: never merged
    }


def apply_patch(model: VisionTransformer, trace_source: bool = False, prop_attn: bool = True,
                block_class=ToMeBlock, attention_class=ToMeAttention, method: str = 'ToMe') -> VisionTransformer:
    """Apply ToMe to a timm VisionTransformer in place (and return it). Afterwards set `model.r`.

    trace_source: keep `model._tome_info['source']`, the patch-to-token map (for visualisation).
    prop_attn: proportional attention; ToMe turns it on for models evaluated off the shelf.
    block_class / attention_class: the replacement classes (a method with its own block subclasses ToMeBlock).
    method: the name a refusal starts with. A backbone the merge cannot honour (window attention, rotary embeddings,
    not a timm VisionTransformer, max pooling, gradient checkpointing) raises `shared.backbones.UnsupportedBackbone`.
    """
    require_supported(model, method, merges=True)
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
