"""DeiT / DeiT-III with ToE: a timm VisionTransformer whose block loop calls a TokenSelect before block 1.

The original copies timm 0.9.2's deit.py and re-registers every DeiT name over timm's; here the names live in a local
registry (`MODELS`) that `create_model` consults before timm, so timm's own `deit_*` stay untouched.
Distilled DeiTs are timm's `VisionTransformerDistilled` with a `token_select` attribute that nothing calls: the
original trains them on full tokens too (kept, with a warning, see toe/README.md).
"""
import warnings
from functools import partial

import torch
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer

from shared.models import DIGITS_VIT
from shared.models import create_model as _create_model
from toe.token_select import TokenSelect


class VisionTransformerExpansion(VisionTransformer):
    """timm's VisionTransformer with token expansion before block 1 (block 0 always sees every token)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_select = TokenSelect()  # replaced by the entry script with the configured one

    def forward_features(self, x, attn_mask=None, is_causal=False):
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            # As in the original: the checkpointed path has no selection hook, so it trains on all tokens.
            return self.norm(checkpoint_seq(self.blocks, x))
        mask_args = {} if attn_mask is None and not is_causal else dict(attn_mask=attn_mask, is_causal=is_causal)
        for depth, block in enumerate(self.blocks):
            if depth == 1:  # block 0 always sees every token
                x, _ = self.token_select.token_select(x)
            x = block(x, **mask_args)
        return self.norm(x)


# Architectures of the names the original registers (timm's deit.py), DeiT-III with layer scale and no class-token
# position embedding.
_DEIT = dict(patch_size=16, mlp_ratio=4, qkv_bias=True)
_DEIT3 = dict(_DEIT, no_embed_class=True, init_values=1e-6)
ARCHS = {
    'deit_tiny_patch16_224': dict(_DEIT, embed_dim=192, depth=12, num_heads=3),
    'deit_small_patch16_224': dict(_DEIT, embed_dim=384, depth=12, num_heads=6),
    'deit_base_patch16_224': dict(_DEIT, embed_dim=768, depth=12, num_heads=12),
    'deit_base_patch16_384': dict(_DEIT, embed_dim=768, depth=12, num_heads=12, img_size=384),
    'deit3_small_patch16_224': dict(_DEIT3, embed_dim=384, depth=12, num_heads=6),
    'deit3_small_patch16_384': dict(_DEIT3, embed_dim=384, depth=12, num_heads=6, img_size=384),
    'deit3_medium_patch16_224': dict(_DEIT3, embed_dim=512, depth=12, num_heads=8),
    'deit3_base_patch16_224': dict(_DEIT3, embed_dim=768, depth=12, num_heads=12),
    'deit3_base_patch16_384': dict(_DEIT3, embed_dim=768, depth=12, num_heads=12, img_size=384),
    'deit3_large_patch16_224': dict(_DEIT3, embed_dim=1024, depth=24, num_heads=16),
    'deit3_large_patch16_384': dict(_DEIT3, embed_dim=1024, depth=24, num_heads=16, img_size=384),
    'deit3_huge_patch14_224': dict(_DEIT3, patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    # the project's embedded-default ViT (digits, 32 px), so ToE trains on DIGITS in seconds
    'vit_digits_patch4_32': dict(DIGITS_VIT),
}
DISTILLED = ('deit_tiny_distilled_patch16_224', 'deit_small_distilled_patch16_224',
             'deit_base_distilled_patch16_224', 'deit_base_distilled_patch16_384')
# timm factory keywords that a direct constructor does not take
_FACTORY_KEYS = ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir', 'checkpoint_path')


def _build_expansion(name, pretrained=False, **kwargs):
    if pretrained:
        raise ValueError(f'{name}: pretrained weights are never downloaded here; use --finetune <checkpoint>')
    for key in _FACTORY_KEYS:
        kwargs.pop(key, None)
    return VisionTransformerExpansion(**{**ARCHS[name], **kwargs})


def _build_distilled(name, **kwargs):
    import timm
    warnings.warn(f'{name} has a distillation token: as in the original ToE, its forward never calls TokenSelect, '
                  'so it trains on all tokens', stacklevel=3)
    model = timm.create_model(name, **kwargs)
    model.token_select = TokenSelect()
    return model


MODELS = {name: partial(_build_expansion, name) for name in ARCHS}
MODELS.update({name: partial(_build_distilled, name) for name in DISTILLED})


def create_model(name, **kwargs):
    """A ToE DeiT by the original's name (None-valued keywords dropped, as timm's create_model does)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return _create_model(name, MODELS, **kwargs)
