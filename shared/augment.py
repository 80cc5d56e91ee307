"""RandAugment's posterize at 0 bits, made to work on current Pillow.

timm's `rand-m9-mstd0.5-inc1` (DeiT's default `--aa`) can draw a magnitude that keeps 0 bits. The Pillow the
originals ran with masked every bit away there (a black image); current Pillow raises ValueError instead, which
crashed DeiT-style training on roughly one image in three hundred. `install_posterize_fix()` (run on import) restores
the old result.
"""
from PIL import Image, ImageOps
from timm.data import auto_augment


def posterize(img, bits_to_keep, **_):
    """timm's posterize op, with 0 bits giving what Pillow < 10 gave: every channel masked to zero."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def install_posterize_fix():
    """Point timm's RandAugment / AutoAugment posterize ops at `posterize` (ops built afterwards use it)."""
    for name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = posterize


install_posterize_fix()
