"""TokenLabeling's data: images with dense label maps, augmented in pairs, and the soft targets built from them.

On-disk format (TokenLabeling's generate_label.py): for every training image `<data_dir>/train/<class>/<stem>.<ext>`
a tensor file `<token_label_data>/<class>/<stem>.pt` of shape (2, K, H, W): [0] the teacher's top-K scores and [1]
their class indices (stored as half; K = 5 and H = W = 15 for the released ImageNet maps) at every position of an
H x W grid over the whole image.

Paired augmentation (tlt/data/label_transforms_factory.py): the flips flip the map too; the random-resized crop
records its box as fractions (top, left, height, width) of the image in an extra map slice, so that the target can be
ROI-aligned out of the map later; the dataset writes the class index into that slice at [-1, 0, 0, 5] (the map must
therefore be at least 6 wide). `token_label_target` turns a batch of those maps into (B, classes, 2 + L*L) soft
targets: [:, :, 0] the smoothed one-hot ground truth, [:, :, 1] the class-token label (ROI-aligned 1x1), [:, :, 2:]
the L x L token labels, each softmax-normalised over the classes and smoothed.
"""
import math
import os
import random

import numpy as np
import torch
from PIL import Image
from timm.data.mixup import Mixup
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp
from torchvision import transforms
from torchvision.transforms import functional as F

from shared.datasets import DatasetLayoutError, image_folder

class TokenLabelFolder(torch.utils.data.Dataset):
    """`root/<class>/<image>` with `label_root/<class>/<stem>.pt` maps; (image, map with coords and class)."""

    def __init__(self, root, label_root, transform=None):
        if not os.path.isdir(label_root):
            raise DatasetLayoutError(f'--token-label-data {label_root!r} is not a directory (expected '
                                     '<dir>/<class>/<image stem>.pt label maps)')
        folder = image_folder(root)
        self.samples, self.classes, self.class_to_idx = folder.samples, folder.classes, folder.class_to_idx
        self.root, self.label_root, self.transform = root, label_root, transform
        missing = [p for p, _ in self.samples if not os.path.isfile(self.label_path(p))]
        if missing:
            raise DatasetLayoutError(f'{len(missing)} of {len(self.samples)} training images have no label map, e.g. '
                                     f'{self.label_path(missing[0])} (for {missing[0]})')

    def label_path(self, image_path):
        cls, name = image_path.split(os.sep)[-2:]
        return os.path.join(self.label_root, cls, os.path.splitext(name)[0] + '.pt')

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        img = Image.open(path).convert('RGB')
        maps = torch.load(self.label_path(path), map_location='cpu', weights_only=True).float()
        if maps.dim() != 4 or maps.shape[0] != 2 or maps.shape[-1] < 6:
            raise DatasetLayoutError(f'{self.label_path(path)}: expected a (2, K, H, W) map with W >= 6, '
                                     f'got {tuple(maps.shape)}')
        if self.transform is not None:
            img, maps = self.transform(img, maps)
        maps[-1, 0, 0, 5] = target  # ground truth after the crop coordinates
        return img, maps


class PairedCompose:
    """Applies image-only transforms to the image and paired ones (with `paired = True`) to (image, map)."""

    def __init__(self, transforms_):
        self.transforms = transforms_

    def __call__(self, img, label_map):
        for transform in self.transforms:
            paired = getattr(transform, 'paired', False)  # geometric: the label map moves with the image
            img, label_map = transform(img, label_map) if paired else (transform(img), label_map)
        return img, label_map


class PairedFlip:
    paired = True

    def __init__(self, p, vertical=False):
        self.p, self.vertical = p, vertical

    def __call__(self, img, label_map):
        if torch.rand(1) < self.p:
            return (F.vflip(img), label_map.flip(2)) if self.vertical else (F.hflip(img), label_map.flip(3))
        return img, label_map


class RandomResizedCropWithCoords(RandomResizedCropAndInterpolation):
    """timm's RRC that appends the crop box (top, left, height, width as image fractions) to the label map."""
    paired = True

    def __call__(self, img, label_map):
        i, j, h, w = self.get_params(img, self.scale, self.ratio)
        coords = label_map.new_zeros(label_map[:1].shape)
        coords[0, 0, 0, :4] = torch.tensor([i / img.size[1], j / img.size[0], h / img.size[1], w / img.size[0]])
        interpolation = self.interpolation
        if isinstance(interpolation, (tuple, list)):  # 'random': bilinear or bicubic per image
            interpolation = random.choice(interpolation)
        img = F.resized_crop(img, i, j, h, w, self.size, interpolation)
        return img, torch.cat([label_map, coords])


def _affine_label_map(label_map, matrix):
    """A (2, K, H, W) label map (top-K scores, their class indices) resampled as TokenLabeling does for an image op:
    PIL's AFFINE coefficients (a, b, c, d, e, f) read in (row, column) order of the map, nearest neighbour, scores 0
    outside the map, indices repeated from its border."""
    from scipy import ndimage
    a, b, c, d, e, f = matrix
    inverse = [[1, 0, 0, 0], [0, a, b, c], [0, d, e, f]]  # output (k, row, col) -> input coordinates
    scores = ndimage.affine_transform(label_map[0].numpy(), matrix=inverse, order=0, mode='constant')
    index = ndimage.affine_transform(label_map[1].numpy(), matrix=inverse, order=0, mode='nearest')
    return torch.from_numpy(np.stack([scores, index]))


def _rotate_label_map(label_map, degrees):
    # TokenLabeling's matrix: the angle's sign and the centre (size(2) / 2, size(3) / 2) as it wrote them
    cx, cy = label_map.shape[2] / 2., label_map.shape[3] / 2.
    angle = math.radians(degrees)
    cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
    return _affine_label_map(label_map, (cos, sin, -cos * cx - sin * cy + cx, -sin, cos, sin * cx - cos * cy + cy))


# timm RandAugment op name -> how the label map follows it (other ops leave the map alone, as in TokenLabeling)
_LABEL_MAP_OPS = {
    'Rotate': _rotate_label_map,
    'ShearX': lambda m, factor: _affine_label_map(m, (1, 0, 0, factor, 1, 0)),
    'ShearY': lambda m, factor: _affine_label_map(m, (1, factor, 0, 0, 1, 0)),
    'TranslateXRel': lambda m, pct: _affine_label_map(m, (1, 0, 0, 0, 1, pct * m.shape[3])),
    'TranslateYRel': lambda m, pct: _affine_label_map(m, (1, 0, pct * m.shape[2], 0, 1, 0)),
}


class PairedRandAugment:
    """timm's RandAugment on the image, with the geometric ops (rotate, shear, relative translate) applied to the
    label map with the same drawn arguments, as TokenLabeling's random_augment_label. The random draws are timm's,
    in its order: the ops (numpy), then per op its coin, magnitude noise and sign (Python `random`)."""
    paired = True

    def __init__(self, rand_augment):
        self.rand_augment = rand_augment

    @staticmethod
    def _apply(op, img, label_map):
        if op.prob < 1.0 and random.random() > op.prob:
            return img, label_map
        magnitude = op.magnitude
        if op.magnitude_std == float('inf'):
            magnitude = random.uniform(0, magnitude)
        elif op.magnitude_std > 0:
            magnitude = random.gauss(magnitude, op.magnitude_std)
        magnitude = max(0., min(magnitude, op.magnitude_max or 10))
        args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()
        label_op = _LABEL_MAP_OPS.get(op.name)
        if label_op is not None:
            label_map = label_op(label_map, *args)
        return op.aug_fn(img, *args, **op.kwargs), label_map

    def __call__(self, img, label_map):
        ra = self.rand_augment
        for op in np.random.choice(ra.ops, ra.num_layers, replace=ra.choice_weights is None, p=ra.choice_weights):
            img, label_map = self._apply(op, img, label_map)
        return img, label_map


def token_label_train_transform(img_size, scale=None, ratio=None, hflip=0.5, vflip=0., color_jitter=0.4,
                                auto_augment=None, interpolation='random', mean=None, std=None, re_prob=0.,
                                re_mode='const', re_count=1):
    """tlt's transforms_imagenet_train: flips (paired) -> RandAugment or colour jitter -> RRC with coords (paired) ->
    tensor, normalise, random erasing. RandAugment's geometric ops move the label map too (PairedRandAugment)."""
    from timm.data import rand_augment_transform
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.data.random_erasing import RandomErasing
    mean, std = tuple(mean or IMAGENET_DEFAULT_MEAN), tuple(std or IMAGENET_DEFAULT_STD)
    size = img_size[-2:] if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    tfl = []
    if hflip > 0:
        tfl.append(PairedFlip(hflip))
    if vflip > 0:
        tfl.append(PairedFlip(vflip, vertical=True))
    if auto_augment:
        params = dict(translate_const=int(min(size) * 0.45), img_mean=tuple(min(255, round(255 * x)) for x in mean))
        if interpolation and interpolation != 'random':
            params['interpolation'] = str_to_pil_interp(interpolation)
        if auto_augment.startswith('rand'):
            tfl.append(PairedRandAugment(rand_augment_transform(auto_augment, params)))
    elif color_jitter is not None:
        tfl.append(transforms.ColorJitter(*(float(color_jitter),) * 3))
    tfl += [RandomResizedCropWithCoords(tuple(size), tuple(scale or (0.08, 1.0)), tuple(ratio or (3. / 4., 4. / 3.)),
                                        interpolation),
            transforms.ToTensor(), transforms.Normalize(mean, std)]
    if re_prob > 0:
        tfl.append(RandomErasing(re_prob, mode=re_mode, max_count=re_count, device='cpu'))
    return PairedCompose(tfl)


def _one_hot(x, num_classes, on_value, off_value):
    return torch.full((x.numel(), num_classes), off_value, device=x.device).scatter_(1, x.long().view(-1, 1), on_value)


def token_label_target(maps, num_classes, smoothing=0.1, label_size=1):
    """(B, 3, K, H, W) augmented maps -> (B, classes, 2 + L*L) (or (B, classes, 2) when L = 1) soft targets, as
    tlt's create_token_label_target / get_labelmaps_with_coords (no mixup: lam = 1)."""
    from torchvision.ops import roi_align
    off_value = smoothing / num_classes
    on_value = 1. - smoothing + off_value
    B = maps.shape[0]
    boxes = maps[:, 2, 0, 0, :4].reshape(-1, 4).clone()
    boxes[:, 2:] += boxes[:, :2]  # (top, left, bottom, right); used as roi_align's (x1, y1, x2, y2) as the original
    ground_truth = _one_hot(maps[:, 2, 0, 0, 5], num_classes, on_value, off_value)
    dense = torch.zeros(B, num_classes, maps.shape[3], maps.shape[4], device=maps.device)
    dense.scatter_(1, maps[:, 1].long(), maps[:, 0])  # top-K scores back into a full class map
    rois = torch.cat([torch.arange(B, device=maps.device, dtype=torch.float).view(B, 1),
                      boxes.float() * dense.shape[3] - 0.5], 1)
    label = roi_align(dense, rois, output_size=(label_size, label_size))
    if label_size > 1:
        cls_label = roi_align(dense, rois, output_size=(1, 1))
        label = torch.cat([cls_label.view(B, num_classes, 1), label.view(B, num_classes, -1)], dim=2)
    label = torch.softmax(label.view(B, num_classes, -1), 1) * on_value + off_value
    return torch.cat([ground_truth.view(B, num_classes, 1), label], dim=2)


def smoothed_one_hot(target, num_classes, smoothing=0.1):
    off_value = smoothing / num_classes
    return _one_hot(target, num_classes, 1. - smoothing + off_value, off_value)


class TokenLabelMixup(Mixup):
    """TokenLabeling's mixup/cutmix: timm's Mixup mixes the images (batch, pair or elem mode, same random draws);
    the targets are built first, the label-map targets (or smoothed one-hot labels) as without mixup, then mixed with
    the batch-flipped targets by the same lambda. Token labels are mixed by lambda everywhere, not cut by the box,
    as in the original. Per-image lambdas (pair/elem modes) weight each image's whole target; the original's (B, 1)
    lambda does not broadcast over a (B, classes, tokens) target (an error, or the wrong axes when B == classes)."""

    def __init__(self, label_size=1, **kwargs):
        super().__init__(**kwargs)
        self.label_size = label_size

    def __call__(self, x, target):
        if len(x) % 2:
            raise ValueError(f'mixup/cutmix need an even batch, got {len(x)} images')
        mix_images = {'elem': self._mix_elem, 'pair': self._mix_pair}.get(self.mode, self._mix_batch)
        lam = mix_images(x)  # mixes x in place, as timm's Mixup does
        if target.dim() > 2:
            y = token_label_target(target, self.num_classes, self.label_smoothing, self.label_size)
        else:
            y = smoothed_one_hot(target, self.num_classes, self.label_smoothing)
        if torch.is_tensor(lam):
            lam = lam.view(-1, *[1] * (y.dim() - 1)).to(y)
        return x, y * lam + y.flip(0) * (1. - lam)
