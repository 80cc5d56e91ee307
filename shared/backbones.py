"""Which ViT backbones the token-reduction methods can honour, and how each one pools its tokens.

The methods (ToMe, ToCom, DiffRate, A-ViT's zipped path, TAVT's patch drop) change the token sequence between blocks.
That is sound on a timm `VisionTransformer` whose blocks are plain pre-norm `Block`s with global attention and
absolute position embeddings added before the first block: tokens carry their position in their values, so a merged or
dropped sequence is still a valid input to the next block. It is not sound where attention depends on where a token
sits in the sequence (window attention: Swin, SAM's ViT-Det; rotary position embeddings: EVA-02, the rope ViTs),
so those backbones are refused with the reason.

- `describe(model) -> Backbone`: the configuration the methods depend on; raises `UnsupportedBackbone` otherwise.
- `require_supported(model, method, ...)`: `describe` plus the limits of one method; messages start with the method.
- `pool_features(model, x, size)`: the model's own pooling (class token, average, attention pooling, then `fc_norm`),
  weighted by token size when tokens have been merged.
- `FAMILIES` / `REFUSED`: timm names and small random-weight configurations, for the parametrised tests.

Prefix tokens (class, distillation, registers) are the first `num_prefix_tokens` of the sequence; the methods never
merge or drop them.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import Attention, LayerScale
from timm.models.vision_transformer import Block, VisionTransformer

from shared.errors import UserError

__all__ = ['Backbone', 'UnsupportedBackbone', 'describe', 'require_supported', 'pool_features', 'model_name',
           'FAMILIES', 'REFUSED', 'MERGING_POOLS', 'DROPPING_POOLS']

# pools a merged sequence can honour (size-weighted mean, log-size bias on the latent query, the untouched class
# token); a max over merged tokens has no such form
MERGING_POOLS = ('token', 'avg', 'map')
# pools a sequence with dropped tokens can honour: any reduction over the kept tokens
DROPPING_POOLS = ('token', 'avg', 'map', 'max', 'avgmax')


class UnsupportedBackbone(UserError):
    """A method cannot be applied to this backbone; `reason` says why (without the model and method names)."""

    def __init__(self, message: str, reason: str = ''):
        super().__init__(message)
        self.reason = reason or message


@dataclass(frozen=True)
class Backbone:
    """What a token-reduction method needs to know about a timm ViT."""
    family: str               # the FAMILIES key whose configuration this model has
    num_prefix_tokens: int    # class + distillation + register tokens, at positions 0..num_prefix_tokens-1
    has_class_token: bool
    num_registers: int
    global_pool: str          # 'token', 'avg', 'map', 'max', 'avgmax' or ''
    embed_dim: int
    depth: int
    num_heads: int
    layer_scale: bool         # blocks scale their branches (ls1 / ls2), as DINOv2 does
    pre_norm: bool            # a LayerNorm before the first block (CLIP)
    fc_norm: bool             # the final norm sits after the pooling

    @property
    def has_distill_token(self) -> bool:
        return self.num_prefix_tokens > int(self.has_class_token) + self.num_registers


def model_name(model: nn.Module) -> str:
    """timm's architecture name when the model has one (`pretrained_cfg`), else its class name."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or type(model).__name__


def _refusal(model: nn.Module) -> Optional[str]:
    """Why no method can run on `model`, or None when it is a ViT the methods can honour."""
    kind = type(model).__name__
    if getattr(model, 'rope', None) is not None or any('Rotary' in type(m).__name__ for m in model.modules()):
        return ('rotary position embeddings: attention depends on each token\'s grid position, which merging or '
                'dropping tokens would scramble')
    if any(getattr(m, 'window_size', 0) for m in model.modules()) or 'swin' in kind.lower():
        return ('window attention: tokens attend within fixed windows of the patch grid, which a shorter token '
                'sequence no longer has')
    if not isinstance(getattr(model, 'blocks', None), nn.Sequential):
        return f'{kind} has no `.blocks` sequence of transformer blocks (not a timm VisionTransformer)'
    if not isinstance(model, VisionTransformer):
        return f'{kind} is not a timm VisionTransformer'
    for i, block in enumerate(model.blocks):
        if not isinstance(block, Block):
            return (f'block {i} is a {type(block).__name__}; only timm\'s pre-norm Block (attention, then MLP, '
                    'each on a residual branch) is supported')
        if not isinstance(block.attn, Attention):
            return f'block {i} has a {type(block.attn).__name__}; only timm\'s global Attention is supported'
    pool = getattr(model, 'attn_pool', None)
    if pool is not None:
        if type(pool).__name__ != 'AttentionPoolLatent':
            return f'{type(pool).__name__} pooling is not supported (only the latent-query attention pooling, map)'
        if pool.pos_embed is not None:
            return 'the attention pooling adds its own position embedding to every token, which a shorter sequence breaks'
    return None


def _family(model: VisionTransformer, has_class_token: bool, num_registers: int) -> str:
    if getattr(model, 'dist_token', None) is not None:
        return 'deit_distilled'
    if num_registers:
        return 'dinov2_reg' if has_class_token else 'vit_reg_gap'
    if model.global_pool == 'map':
        return 'siglip'
    if not has_class_token:
        return 'vit_gap'
    if not isinstance(model.norm_pre, nn.Identity):
        return 'clip'
    return 'deit'


def describe(model: nn.Module) -> Backbone:
    """The configuration of a timm ViT the methods can honour; raises UnsupportedBackbone naming the reason."""
    reason = _refusal(model)
    if reason is not None:
        raise UnsupportedBackbone(f'{model_name(model)} is not supported: {reason}', reason)
    has_class_token = model.cls_token is not None
    num_registers = 0 if model.reg_token is None else model.reg_token.shape[1]
    first = model.blocks[0]
    return Backbone(
        family=_family(model, has_class_token, num_registers),
        num_prefix_tokens=model.num_prefix_tokens,
        has_class_token=has_class_token,
        num_registers=num_registers,
        global_pool=model.global_pool,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=first.attn.num_heads,
        layer_scale=isinstance(first.ls1, LayerScale),
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
    )


def require_supported(model: nn.Module, method: str, merges: bool = True, needs_class_token: bool = False) -> Backbone:
    """`describe(model)` plus the limits of `method`; the message starts with the method's name.

    merges: the method merges tokens (ToMe, ToCom, DiffRate), so the pooling must have a size-weighted form; a method
    that only drops tokens (TAVT, A-ViT) can run any pooling over the kept tokens.
    needs_class_token: the method reads the class token (e.g. to score or halt tokens).
    """
    try:
        backbone = describe(model)
    except UnsupportedBackbone as e:
        raise UnsupportedBackbone(f'{method} cannot be applied to {model_name(model)}: {e.reason}', e.reason) from None
    pools = MERGING_POOLS if merges else DROPPING_POOLS
    reason = None
    if backbone.global_pool not in pools:
        what = 'returns every token, and a reduced sequence has no output per patch' if not backbone.global_pool \
            else 'has no size-weighted form over merged tokens'
        reason = f"global_pool='{backbone.global_pool}' {what} (supported: {', '.join(pools)})"
    elif needs_class_token and not backbone.has_class_token:
        reason = 'the method reads the class token, and this model has none'
    if getattr(model, 'grad_checkpointing', False):
        reason = 'gradient checkpointing re-runs blocks in backward; call model.set_grad_checkpointing(False)'
    if reason is not None:
        raise UnsupportedBackbone(f'{method} cannot be applied to {model_name(model)}: {reason}', reason)
    return backbone


def pool_features(model: VisionTransformer, x: torch.Tensor, size: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The model's pooled features (before `head_drop` / `head`) from its token sequence x `[B, N, C]` after the final
    norm, as `model.forward_head(x, pre_logits=True)` computes them when `size` is None.

    size `[B, N, 1]`: how many patches each token stands for. A merged token then weighs by its size: the average is
    sum(size * x) / sum(size), and the attention pooling's keys get the bias log(size) (ToMe's proportional
    attention), so a token of size s counts as s identical tokens would.
    """
    if size is not None:
        skip = 0 if model.pool_include_prefix else model.num_prefix_tokens
        if model.attn_pool is not None:
            bias = size[:, skip:].log()[:, None, None, :, 0].to(x.dtype)
            pooled = model.attn_pool(x[:, skip:], attn_mask=bias)
        elif model.global_pool == 'avg':
            weight = size[:, skip:].to(x.dtype)
            pooled = (x[:, skip:] * weight).sum(dim=1) / weight.sum(dim=1)
        elif model.global_pool == 'token':
            pooled = x[:, 0]
        else:
            raise UnsupportedBackbone(f"global_pool='{model.global_pool}' has no size-weighted form",
                                      f"global_pool='{model.global_pool}' has no size-weighted form")
    else:
        pooled = model.pool(x)
    return model.fc_norm(pooled)


# Small random-weight configurations of each family, by timm's own model names (pretrained=False): fast enough for a
# test that runs every method on every family on one CPU core.
_SMALL = dict(embed_dim=64, depth=4, num_heads=4, img_size=32, patch_size=4, num_classes=10)

FAMILIES = {
    'deit': ('deit_small_patch16_224', dict(_SMALL)),                           # class token (DeiT, MAE, ViT)
    'deit_distilled': ('deit_small_distilled_patch16_224', dict(_SMALL)),       # class + distillation token
    'clip': ('vit_base_patch16_clip_224', dict(_SMALL)),                        # pre-norm, class token
    'dinov2_reg': ('vit_small_patch14_reg4_dinov2', dict(_SMALL, img_size=56, patch_size=8)),  # class + 4 registers, layer scale
    'siglip': ('vit_base_patch16_siglip_224', dict(_SMALL)),                    # no class token, attention pooling
    'vit_gap': ('vit_medium_patch16_gap_256', dict(_SMALL)),                    # no class token, average pooling
    'vit_reg_gap': ('vit_betwixt_patch16_reg4_gap_256', dict(_SMALL)),          # 4 registers, average pooling, fc_norm
}

REFUSED = {
    'eva02': ('eva02_tiny_patch14_224', dict(_SMALL, patch_size=8), 'rotary position embeddings'),
    'vit_rope': ('vit_base_patch16_rope_reg1_gap_256', dict(_SMALL, patch_size=8), 'rotary position embeddings'),
    'swin': ('swin_tiny_patch4_window7_224',
             dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4), img_size=32, window_size=4, num_classes=10),
             'window attention'),
    'samvit': ('samvit_base_patch16',
               dict(embed_dim=64, depth=2, num_heads=4, img_size=64, patch_size=16, window_size=2,
                    global_attn_indexes=(1,), num_classes=10),
               'window attention'),
}
