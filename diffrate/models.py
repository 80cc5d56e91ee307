"""The reference's model names, built on timm 1.0 without touching timm's registry, and the DiffRate patch choice.

vit_deit_* are timm's DeiT; vit_*_mae are timm ViTs shaped like the MAE fine-tuned models (global average pool over
the non-class tokens, fc_norm, no final norm), whose `model` dicts load directly; caformer_s36 is timm's CAFormer,
patched to carry the attention stages as token sequences (see diffrate/caformer.py).
"""
from functools import partial

import timm
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from diffrate.caformer import apply_caformer_patch
from diffrate.vit import apply_deit_patch, apply_mae_patch
from shared.models import create_model as resolve_model

_TIMM_KWARGS = ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir', 'drop_block_rate')


def _timm(name, pretrained, **kwargs):
    for key in _TIMM_KWARGS:
        kwargs.pop(key, None)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def vit_deit_tiny_patch16_224(pretrained=False, **kwargs):
    return _timm('deit_tiny_patch16_224.fb_in1k', pretrained, **kwargs)


def vit_deit_small_patch16_224(pretrained=False, **kwargs):
    return _timm('deit_small_patch16_224.fb_in1k', pretrained, **kwargs)


def vit_deit_base_patch16_224(pretrained=False, **kwargs):
    return _timm('deit_base_patch16_224.fb_in1k', pretrained, **kwargs)


def _mae(pretrained, **kwargs):
    if pretrained:
        raise ValueError('MAE fine-tuned weights are not timm weights: build the model without pretrained weights and '
                         'load mae_finetuned_vit_*.pth with --finetune')
    for key in _TIMM_KWARGS:
        kwargs.pop(key, None)
    return VisionTransformer(mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                             global_pool='avg', fc_norm=True, class_token=True, **kwargs)


def vit_base_patch16_mae(pretrained=False, **kwargs):
    return _mae(pretrained, patch_size=16, embed_dim=768, depth=12, num_heads=12, **kwargs)


def vit_large_patch16_mae(pretrained=False, **kwargs):
    return _mae(pretrained, patch_size=16, embed_dim=1024, depth=24, num_heads=16, **kwargs)


def vit_huge_patch14_mae(pretrained=False, **kwargs):
    return _mae(pretrained, patch_size=14, embed_dim=1280, depth=32, num_heads=16, **kwargs)


def caformer_s36(pretrained=False, **kwargs):
    kwargs.pop('img_size', None)  # CAFormer's FLOPs model and token layout assume 224 x 224
    return _timm('caformer_s36.sail_in1k', pretrained, **kwargs)


MODELS = {f.__name__: f for f in (vit_deit_tiny_patch16_224, vit_deit_small_patch16_224, vit_deit_base_patch16_224,
                                   vit_base_patch16_mae, vit_large_patch16_mae, vit_huge_patch14_mae, caformer_s36)}


def create_model(name, **kwargs):
    """The reference's names first, then timm's (e.g. a small test ViT)."""
    return resolve_model(name, MODELS, **kwargs)


def patch_kind(name):
    """The reference picks the patch by substring of the model name; other timm ViT names ('vit_*', e.g. DINOv2, CLIP,
    SigLIP) get the generic patch, which refuses, with the reason, a backbone it cannot honour."""
    for kind in ('deit', 'mae', 'caformer'):
        if kind in name:
            return kind
    if name.startswith('vit_'):
        return 'vit'
    raise ValueError(f"model '{name}': DiffRate supports DeiT, MAE, CAFormer and timm VisionTransformer models only "
                     f"(the name must contain 'deit', 'mae' or 'caformer', or start with 'vit_'); supported names: "
                     f"{', '.join(MODELS)}")


def apply_diffrate(model, name, granularity, trace_source=False):
    kind = patch_kind(name)
    if kind in ('deit', 'vit'):
        return apply_deit_patch(model, granularity, granularity, trace_source)
    if kind == 'mae':
        return apply_mae_patch(model, granularity, granularity, trace_source)
    return apply_caformer_patch(model, granularity, granularity)
