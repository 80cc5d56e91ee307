"""DeiT-III's `--ThreeAugment` training transform (which DeiT's main.py swaps in; shared.datasets lacks it)."""
import random

from PIL import ImageFilter, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms


class _GaussianBlur:
    def __init__(self, p=0.1, radius_min=0.1, radius_max=2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class _Solarization:
    def __init__(self, p=0.2):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


class _GrayScale:
    def __init__(self, p=0.2):
        self.p, self.to_gray = p, transforms.Grayscale(3)

    def __call__(self, img):
        return self.to_gray(img) if random.random() < self.p else img


def three_augment(args):
    """Crop (simple random crop with --src, else resize + padded random crop), flip, one of grayscale / solarize /
    blur, colour jitter, normalise."""
    size = args.input_size
    if args.src:
        crop = [transforms.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.RandomHorizontalFlip()]
    else:
        crop = [transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.RandomCrop(size, padding=4, padding_mode='reflect'), transforms.RandomHorizontalFlip()]
    pick = [transforms.RandomChoice([_GrayScale(p=1.0), _Solarization(p=1.0), _GaussianBlur(p=1.0)])]
    if args.color_jitter is not None and args.color_jitter != 0:
        pick.append(transforms.ColorJitter(args.color_jitter, args.color_jitter, args.color_jitter))
    final = [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return transforms.Compose(crop + pick + final)
