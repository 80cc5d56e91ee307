"""Model-name resolution and the embedded-default small ViT.

The originals registered names that timm 1.0 now owns (`deit_base_patch16_224`) or names of their own
(`vit_deit_small_patch16_224`, `avit_tiny_patch16_224`). Each method keeps a local dict of constructors that
`create_model` consults before timm, so the original names work inside that method's scripts and timm's registry is
never overwritten (and never warns)."""
import timm
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

# The small ViT the embedded default (scikit-learn's 8x8 digits upscaled to 32 px) trains in seconds on a CPU:
# 64 patches + class token, 12 blocks so that per-layer schedules have the paper models' depth.
DIGITS_VIT = dict(img_size=32, patch_size=4, embed_dim=64, depth=12, num_heads=4, mlp_ratio=4.0, num_classes=10)


@register_model
def vit_digits_patch4_32(pretrained=False, **kwargs):
    if pretrained:
        raise ValueError('vit_digits_patch4_32 has no pretrained weights: train it with tools/train_baseline.py')
    for key in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir'):  # timm's factory passes these along
        kwargs.pop(key, None)
    return VisionTransformer(**{**DIGITS_VIT, **kwargs})


def create_model(name, local_registry=None, **kwargs):
    """Build `name` from the method's local constructors first, then from timm (never downloading weights)."""
    kwargs.setdefault('pretrained', False)
    if local_registry and name in local_registry:
        return local_registry[name](**kwargs)
    if not timm.is_model(name):
        known = sorted(local_registry or {})
        raise ValueError(f"unknown model '{name}'" + (f"; this script's own models are {known}" if known else '') +
                         ', other names must be timm models')
    return timm.create_model(name, **kwargs)
