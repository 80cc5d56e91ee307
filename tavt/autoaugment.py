"""AutoAugment's ImageNet policy as TAVT (and TransFG before it) trains Stanford Cars and iNat2017 with: the
DeepVoltaire port's semantics, which differ from torchvision's `AutoAugment(IMAGENET)` in small ways that change the
training distribution:

- 24 sub-policies (torchvision has a 25th, a second copy of the equalize/equalize pair);
- rotate only counter-clockwise, composited onto grey through an alpha mask (nearest resampling);
- solarize thresholds on a 256 -> 0 grid (torchvision: 255 -> 0);
- shear by an affine map with bicubic resampling; colour, contrast, sharpness and brightness factors 1 +- m;
- Python's `random` draws everything: the sub-policy, then per operation its coin and, for signed operations, the sign.

Each sub-policy is two (probability, operation, magnitude index) steps; index i of 0..9 reads the operation's grid.
"""
import random

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

__all__ = ['ImageNetAutoAugment', 'IMAGENET_POLICY', 'magnitude']

# (p, operation, magnitude index) pairs, the AutoAugment paper's ImageNet policy in the order the port lists it.
IMAGENET_POLICY = (
    ((0.4, 'posterize', 8), (0.6, 'rotate', 9)),
    ((0.6, 'solarize', 5), (0.6, 'autocontrast', 5)),
    ((0.8, 'equalize', 8), (0.6, 'equalize', 3)),
    ((0.6, 'posterize', 7), (0.6, 'posterize', 6)),
    ((0.4, 'equalize', 7), (0.2, 'solarize', 4)),
    ((0.4, 'equalize', 4), (0.8, 'rotate', 8)),
    ((0.6, 'solarize', 3), (0.6, 'equalize', 7)),
    ((0.8, 'posterize', 5), (1.0, 'equalize', 2)),
    ((0.2, 'rotate', 3), (0.6, 'solarize', 8)),
    ((0.6, 'equalize', 8), (0.4, 'posterize', 6)),
    ((0.8, 'rotate', 8), (0.4, 'color', 0)),
    ((0.4, 'rotate', 9), (0.6, 'equalize', 2)),
    ((0.0, 'equalize', 7), (0.8, 'equalize', 8)),
    ((0.6, 'invert', 4), (1.0, 'equalize', 8)),
    ((0.6, 'color', 4), (1.0, 'contrast', 8)),
    ((0.8, 'rotate', 8), (1.0, 'color', 2)),
    ((0.8, 'color', 8), (0.8, 'solarize', 7)),
    ((0.4, 'sharpness', 7), (0.6, 'invert', 8)),
    ((0.6, 'shearX', 5), (1.0, 'equalize', 9)),
    ((0.4, 'color', 0), (0.6, 'equalize', 3)),
    ((0.4, 'equalize', 7), (0.2, 'solarize', 4)),
    ((0.6, 'solarize', 5), (0.6, 'autocontrast', 5)),
    ((0.6, 'invert', 4), (1.0, 'equalize', 8)),
    ((0.6, 'color', 4), (1.0, 'contrast', 8)),
)

# operation -> (start, stop) of its 10-step linear grid; operations without a magnitude are absent.
_GRIDS = {
    'shearX': (0., 0.3), 'shearY': (0., 0.3), 'translateX': (0., 150 / 331), 'translateY': (0., 150 / 331),
    'rotate': (0., 30.), 'color': (0., 0.9), 'contrast': (0., 0.9), 'sharpness': (0., 0.9),
    'brightness': (0., 0.9), 'posterize': (8., 4.), 'solarize': (256., 0.),
}


def magnitude(operation, index):
    """The value of step `index` (0..9) of the operation's grid; posterize's is rounded to whole bits."""
    if operation not in _GRIDS:
        return 0
    value = float(np.linspace(*_GRIDS[operation], 10)[index])
    return int(round(value)) if operation == 'posterize' else value


def _sign():
    return random.choice([-1, 1])


def _enhance(enhancer):
    return lambda img, m, fill: enhancer(img).enhance(1 + m * _sign())


def _rotate(img, degrees, fill):
    # the port fills with grey (128) in every channel through the rotated alpha mask, whatever `fill` is
    rotated = img.convert('RGBA').rotate(degrees)
    return Image.composite(rotated, Image.new('RGBA', rotated.size, (128,) * 4), rotated).convert(img.mode)


_OPERATIONS = {
    'shearX': lambda img, m, fill: img.transform(img.size, Image.AFFINE, (1, m * _sign(), 0, 0, 1, 0),
                                                 Image.BICUBIC, fillcolor=fill),
    'shearY': lambda img, m, fill: img.transform(img.size, Image.AFFINE, (1, 0, 0, m * _sign(), 1, 0),
                                                 Image.BICUBIC, fillcolor=fill),
    'translateX': lambda img, m, fill: img.transform(img.size, Image.AFFINE,
                                                     (1, 0, m * img.size[0] * _sign(), 0, 1, 0), fillcolor=fill),
    'translateY': lambda img, m, fill: img.transform(img.size, Image.AFFINE,
                                                     (1, 0, 0, 0, 1, m * img.size[1] * _sign()), fillcolor=fill),
    'rotate': _rotate,
    'color': _enhance(ImageEnhance.Color),
    'contrast': _enhance(ImageEnhance.Contrast),
    'sharpness': _enhance(ImageEnhance.Sharpness),
    'brightness': _enhance(ImageEnhance.Brightness),
    'posterize': lambda img, m, fill: ImageOps.posterize(img, m),
    'solarize': lambda img, m, fill: ImageOps.solarize(img, m),
    'autocontrast': lambda img, m, fill: ImageOps.autocontrast(img),
    'equalize': lambda img, m, fill: ImageOps.equalize(img),
    'invert': lambda img, m, fill: ImageOps.invert(img),
}


class ImageNetAutoAugment:
    """PIL image -> PIL image: one of the 24 sub-policies, chosen uniformly with Python's `random`."""

    def __init__(self, fill=(128, 128, 128), policy=IMAGENET_POLICY):
        self.fill = tuple(fill)
        self.policy = tuple(tuple((p, op, magnitude(op, i)) for p, op, i in sub) for sub in policy)

    def apply(self, img, index):
        """Sub-policy `index`: each step runs when its coin (random.random() < p) says so."""
        for p, op, m in self.policy[index]:
            if random.random() < p:
                img = _OPERATIONS[op](img, m, self.fill)
        return img

    def __call__(self, img):
        return self.apply(img, random.randint(0, len(self.policy) - 1))

    def __repr__(self):
        return f'{type(self).__name__}(fill={self.fill}, sub_policies={len(self.policy)})'
