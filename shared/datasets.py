"""Data sets, transforms and loaders (DeiT's `datasets.py` and the loader part of its `main.py`).

`build_dataset(is_train, args) -> (dataset, nb_classes)` reads `args.data_set` / `args.data_path`;
`build_transform(is_train, args)` is DeiT's recipe through timm's `create_transform`;
`build_loaders(args, dataset_train, dataset_val)` wraps them in DataLoaders over `build_samplers`' samplers.
An ImageFolder validation split is labelled with its training split's class indices (`image_folder(train_root=)`).

Every data-set class takes `(root, is_train, transform)` so that a method with its own transforms (TAVT) can reuse
the readers. A missing folder or a wrong layout raises `DatasetLayoutError` naming what was expected where.
"""
import json
import os
import pickle
import random

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import datasets, transforms
from torchvision.datasets.folder import default_loader

import shared.augment  # noqa: F401  (RandAugment's 0-bit posterize on current Pillow)


class DatasetLayoutError(ValueError):
    """A data set is missing or is not laid out as its reader expects."""


def _require(path, what):
    """Raise DatasetLayoutError unless `path` exists; `what` says what it should be."""
    if not os.path.exists(path):
        raise DatasetLayoutError(f'{what} not found: expected {path}')
    return path


def _pil_rgb(array_hwc):
    return Image.fromarray(np.ascontiguousarray(array_hwc, dtype=np.uint8)).convert('RGB')


# ---------------------------------------------------------------------------------------------------------------
# ImageNet-style folders


def folder_classes(root):
    """Class-to-index map of an ImageFolder-style split: its sub-folder names, sorted, numbered from 0."""
    _require(root, 'image folder')
    try:
        return datasets.folder.find_classes(root)[1]
    except FileNotFoundError as e:
        raise DatasetLayoutError(f'{root}: expected one sub-folder of images per class ({e})') from None


class _FolderWithClassMap(datasets.ImageFolder):
    """ImageFolder labelled by a given class-to-index map instead of by its own sub-folders."""

    def __init__(self, root, class_to_idx, transform=None):
        self._given_class_to_idx = dict(class_to_idx)
        # allow_empty: a split may lack some of the map's classes (a validation subset); present ones are checked below
        super().__init__(root, transform=transform, allow_empty=True)

    def find_classes(self, directory):
        return sorted(self._given_class_to_idx, key=self._given_class_to_idx.get), self._given_class_to_idx


def image_folder(root, transform=None, train_root=None):
    """torchvision ImageFolder of `root`, with DatasetLayoutError instead of torchvision's bare FileNotFoundError.

    With `train_root` (for a validation split) the labels are the training split's class indices: a class
    missing from `root` keeps the other classes' indices (one line says which are missing), and a class that the
    training split does not have is an error. Numbering `root`'s own sub-folders instead would shift every label
    after a missing class."""
    own = folder_classes(root)
    if train_root is None:
        try:
            return datasets.ImageFolder(root, transform=transform)
        except FileNotFoundError as e:
            raise DatasetLayoutError(f'{root}: expected images in every class sub-folder ({e})') from None
    train = folder_classes(train_root)
    unknown = sorted(set(own) - set(train))
    if unknown:
        raise DatasetLayoutError(f'{root}: class folder(s) {", ".join(unknown)} not among the {len(train)} classes '
                                 f'of the training split {train_root}')
    missing = sorted(set(train) - set(own))
    if missing:
        print(f'{root}: no folder for {len(missing)} of the {len(train)} training classes '
              f'({", ".join(missing[:10])}{", ..." if len(missing) > 10 else ""}); '
              'evaluating with the training class indices')
    dataset = _FolderWithClassMap(root, train, transform=transform)
    empty = sorted(set(own) - {dataset.classes[t] for t in dataset.targets})
    if empty:
        raise DatasetLayoutError(f'{root}: no images in class folder(s) {", ".join(empty)}')
    return dataset


# ---------------------------------------------------------------------------------------------------------------
# CIFAR python pickles (read here rather than by torchvision, whose md5 check refuses any file but the original)


class _CifarUnpickler(pickle.Unpickler):
    """The CIFAR batches hold dicts of numpy arrays and lists: nothing else may be constructed."""
    _allowed = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
                ('numpy', 'ndarray'), ('numpy', 'dtype'), ('numpy.core.multiarray', 'scalar'),
                ('numpy._core.multiarray', 'scalar'), ('_codecs', 'encode')}

    def find_class(self, module, name):
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'CIFAR batch refers to {module}.{name}, which a CIFAR batch never holds')


def _load_cifar_batch(path):
    with open(path, 'rb') as f:
        try:
            entry = _CifarUnpickler(f, encoding='latin1').load()
        except Exception as e:
            raise DatasetLayoutError(f'{path}: not a CIFAR python batch ({e})') from None
    if not isinstance(entry, dict) or 'data' not in entry:
        raise DatasetLayoutError(f"{path}: not a CIFAR python batch (no 'data' entry)")
    return entry


class CIFAR(torch.utils.data.Dataset):
    """CIFAR-100 (`<root>/cifar-100-python/{train,test,meta}`) or CIFAR-10
    (`<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`), the python pickle releases."""
    layouts = {
        100: ('cifar-100-python', ['train'], ['test'], 'fine_labels'),
        10: ('cifar-10-batches-py', [f'data_batch_{i}' for i in range(1, 6)], ['test_batch'], 'labels'),
    }

    def __init__(self, root, is_train=True, transform=None, num_classes=100):
        folder, train_files, test_files, label_key = self.layouts[num_classes]
        base = _require(os.path.join(root, folder), f'CIFAR-{num_classes} folder {folder}/')
        data, targets = [], []
        for name in (train_files if is_train else test_files):
            entry = _load_cifar_batch(_require(os.path.join(base, name), f'CIFAR-{num_classes} batch'))
            if label_key not in entry:
                raise DatasetLayoutError(f"{os.path.join(base, name)}: no '{label_key}' entry")
            data.append(np.asarray(entry['data'], dtype=np.uint8).reshape(-1, 3, 32, 32))
            targets.extend(int(t) for t in entry[label_key])
        self.data = np.concatenate(data).transpose(0, 2, 3, 1)  # N, H, W, C
        self.targets = targets
        self.transform = transform
        self.nb_classes = num_classes

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        img = Image.fromarray(self.data[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


# ---------------------------------------------------------------------------------------------------------------
# DeiT's iNaturalist json layout


class _ImageList(torch.utils.data.Dataset):
    """(path, label) samples read lazily as RGB PIL images."""
    nb_classes = None

    def __init__(self, samples, transform, loader=default_loader):
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.transform = transform
        self.loader = loader

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        image = self.loader(path)
        return (image if self.transform is None else self.transform(image)), target


class INatDataset(_ImageList):
    """DeiT's iNaturalist reader: `<root>/train{year}.json`, `<root>/val{year}.json`, `<root>/categories.json`
    (COCO-style json: `images[i].file_name` = `<dir>/<super>/<category id>/<file>` relative to root,
    `annotations[i].category_id`; `categories.json` is a list indexed by category id). Labels number the values of
    the `category` level (name, genus, ...) in order of first appearance in the training annotations, as DeiT does."""

    def __init__(self, root, is_train=True, transform=None, year=2018, category='name', loader=default_loader):
        self.root = root
        split = 'train' if is_train else 'val'
        path_json = _require(os.path.join(root, f'{split}{year}.json'), f'iNaturalist {year} {split} annotations')
        with open(path_json) as f:
            data = json.load(f)
        with open(_require(os.path.join(root, 'categories.json'), 'iNaturalist categories')) as f:
            data_catg = json.load(f)
        with open(_require(os.path.join(root, f'train{year}.json'), f'iNaturalist {year} train annotations')) as f:
            data_train = json.load(f)
        try:
            targeter, indexer = {}, 0
            for ann in data_train['annotations']:
                king = data_catg[int(ann['category_id'])][category]
                if king not in targeter:
                    targeter[king] = indexer
                    indexer += 1
            nb_classes = len(targeter)
            samples = []
            for elem in data['images']:
                cut = elem['file_name'].split('/')
                target_current = targeter[data_catg[int(cut[2])][category]]
                samples.append((os.path.join(root, cut[0], cut[2], cut[3]), target_current))
        except (KeyError, IndexError, TypeError) as e:
            raise DatasetLayoutError(f'{path_json}: not the iNaturalist {year} json layout ({e!r})') from None
        super().__init__(samples, transform, loader)
        self.nb_classes = nb_classes


# ---------------------------------------------------------------------------------------------------------------
# Fine-grained data sets. The papers' code points at them one folder apart (ToCom passes the parent of
# `CUB_200_2011/`, TAVT the folder itself), so each reader accepts either level.


def _locate(root, marker, folder):
    """`root` when `root/marker` exists, else `root/folder` when `root/folder/marker` does; else a layout error."""
    _require(root, 'data set root')
    for base in (root, os.path.join(root, folder)):
        if os.path.exists(os.path.join(base, marker)):
            return base
    raise DatasetLayoutError(f'{marker} not found: expected {os.path.join(root, marker)} or '
                             f'{os.path.join(root, folder, marker)}')


def _read_columns(path, what):
    """Whitespace-separated text file as a list of field lists (CUB/NABirds metadata)."""
    with open(_require(path, what)) as f:
        return [line.split() for line in f if line.strip()]


def _loadmat(path, what):
    import scipy.io
    try:
        return scipy.io.loadmat(_require(path, what), squeeze_me=True)
    except DatasetLayoutError:
        raise
    except Exception as e:
        raise DatasetLayoutError(f'{path}: not a readable .mat file ({e})') from None


def _mat_field(mat, key, path):
    if key not in mat:
        raise DatasetLayoutError(f"{path}: no '{key}' entry (has {sorted(k for k in mat if not k.startswith('__'))})")
    return np.atleast_1d(mat[key])


def _cub_style_samples(base, is_train, what, label_of=lambda raw: raw - 1):
    """images.txt (`<id> <relative path>`), image_class_labels.txt (`<id> <class id>`), train_test_split.txt
    (`<id> <1 = train>`), joined on the image id; images under `<base>/images/`."""
    images = {r[0]: r[-1] for r in _read_columns(os.path.join(base, 'images.txt'), f'{what} images.txt')}
    labels = {r[0]: int(r[-1]) for r in _read_columns(os.path.join(base, 'image_class_labels.txt'),
                                                      f'{what} image_class_labels.txt')}
    split = [(r[0], int(r[-1])) for r in _read_columns(os.path.join(base, 'train_test_split.txt'),
                                                       f'{what} train_test_split.txt')]
    try:
        return [(os.path.join(base, 'images', images[i]), label_of(labels[i]))
                for i, flag in split if flag == (1 if is_train else 0)], labels
    except KeyError as e:
        raise DatasetLayoutError(f'{base}: image id {e} of train_test_split.txt is missing from images.txt or '
                                 'image_class_labels.txt') from None


class CUB(_ImageList):
    """CUB-200-2011: `<root>[/CUB_200_2011]/{images.txt, image_class_labels.txt, train_test_split.txt, images/}`;
    label = class id - 1. 5,994 train / 5,794 test images, 200 classes."""
    nb_classes = 200

    def __init__(self, root, is_train=True, transform=None):
        base = _locate(root, 'images.txt', 'CUB_200_2011')
        samples, _ = _cub_style_samples(base, is_train, 'CUB')
        super().__init__(samples, transform)


class NABirds(_ImageList):
    """NABirds: `<root>[/nabirds]/{images.txt, image_class_labels.txt, train_test_split.txt, images/}`. Class ids
    are not contiguous; they are numbered 0..554 in ascending order of the ids used by the images (TransFG's
    mapping)."""
    nb_classes = 555

    def __init__(self, root, is_train=True, transform=None):
        base = _locate(root, 'images.txt', 'nabirds')
        raw, all_labels = _cub_style_samples(base, is_train, 'NABirds', label_of=lambda c: c)
        self.label_map = {c: i for i, c in enumerate(sorted(set(all_labels.values())))}
        super().__init__([(p, self.label_map[c]) for p, c in raw], transform)


class StanfordCars(_ImageList):
    """Stanford Cars: `<root>[/stanford_cars]/devkit/{cars_train_annos.mat, cars_meta.mat}`, `cars_train/`,
    `cars_test/`, and `cars_test_annos_withlabels.mat` beside devkit/ (torchvision) or inside it (TransFG). Each
    `annotations` record has `class` (1-based) and `fname`. 8,144 train / 8,041 test, 196 classes."""
    nb_classes = 196

    def __init__(self, root, is_train=True, transform=None):
        base = _locate(root, 'devkit', 'stanford_cars')
        if is_train:
            mat_path = os.path.join(base, 'devkit', 'cars_train_annos.mat')
        else:
            mat_path = os.path.join(base, 'cars_test_annos_withlabels.mat')
            if not os.path.exists(mat_path):
                mat_path = os.path.join(base, 'devkit', 'cars_test_annos_withlabels.mat')
        images = _require(os.path.join(base, 'cars_train' if is_train else 'cars_test'), 'Stanford Cars images')
        annotations = _mat_field(_loadmat(mat_path, 'Stanford Cars annotations'), 'annotations', mat_path)
        try:
            samples = [(os.path.join(images, str(a['fname'])), int(a['class']) - 1) for a in annotations]
        except (ValueError, IndexError, KeyError) as e:
            raise DatasetLayoutError(f"{mat_path}: annotations need 'class' and 'fname' fields ({e})") from None
        super().__init__(samples, transform)


class StanfordDogs(_ImageList):
    """Stanford Dogs: `<root>[/StanfordDogs]/{train_list.mat, test_list.mat, Images/}`; `annotation_list` holds
    `<synset-breed>/<id>` (+ '.jpg' under Images/), `labels` are 1-based. Uncropped images. 12,000 / 8,580, 120
    classes."""
    nb_classes = 120

    def __init__(self, root, is_train=True, transform=None):
        base = _locate(root, 'train_list.mat', 'StanfordDogs')
        mat_path = os.path.join(base, 'train_list.mat' if is_train else 'test_list.mat')
        mat = _loadmat(mat_path, 'Stanford Dogs split list')
        names = _mat_field(mat, 'annotation_list', mat_path)
        labels = _mat_field(mat, 'labels', mat_path)
        images = _require(os.path.join(base, 'Images'), 'Stanford Dogs Images/ folder')
        samples = [(os.path.join(images, str(n) + '.jpg'), int(l) - 1) for n, l in zip(names, labels)]
        super().__init__(samples, transform)


class Flowers102(_ImageList):
    """Oxford Flowers-102: `<root>[/flowers-102]/{jpg/image_%05d.jpg, imagelabels.mat, setid.mat}`; train = `trnid`
    (1,020; the `valid` ids are not added, as in torchvision), test = `tstid` (6,149); labels 1-based."""
    nb_classes = 102

    def __init__(self, root, is_train=True, transform=None):
        base = _locate(root, 'setid.mat', 'flowers-102')
        setid_path = os.path.join(base, 'setid.mat')
        ids = _mat_field(_loadmat(setid_path, 'Flowers-102 setid.mat'), 'trnid' if is_train else 'tstid', setid_path)
        labels_path = os.path.join(base, 'imagelabels.mat')
        labels = _mat_field(_loadmat(labels_path, 'Flowers-102 imagelabels.mat'), 'labels', labels_path)
        images = _require(os.path.join(base, 'jpg'), 'Flowers-102 jpg/ folder')
        try:
            samples = [(os.path.join(images, f'image_{int(i):05d}.jpg'), int(labels[int(i) - 1]) - 1) for i in ids]
        except IndexError:
            raise DatasetLayoutError(f'{setid_path}: an image id exceeds the {len(labels)} labels of '
                                     f'{labels_path}') from None
        super().__init__(samples, transform)


class INat2017(_ImageList):
    """iNaturalist 2017 as TransFG reads it: `<root>/{train2017.json, val2017.json, train_val_images/}`; the i-th
    annotation's `category_id` labels the i-th image (file names relative to root). 5,089 classes."""
    nb_classes = 5089

    def __init__(self, root, is_train=True, transform=None):
        _require(os.path.join(root, 'train_val_images'), 'iNaturalist 2017 train_val_images/ folder')
        path = os.path.join(root, ('train' if is_train else 'val') + '2017.json')
        with open(_require(path, 'iNaturalist 2017 annotations')) as f:
            data = json.load(f)
        try:
            samples = [(os.path.join(root, img['file_name']), int(ann['category_id']))
                       for img, ann in zip(data['images'], data['annotations'])]
        except (KeyError, TypeError) as e:
            raise DatasetLayoutError(f'{path}: not the iNaturalist 2017 json layout ({e!r})') from None
        super().__init__(samples, transform)


# ---------------------------------------------------------------------------------------------------------------
# Embedded and generated data sets (no files needed)


class Digits(torch.utils.data.Dataset):
    """scikit-learn's bundled 8x8 hand-written digits (1,797 images, 10 classes), upscaled to `image_size` and
    made RGB. The split is fixed: every fifth image (index % 5 == 0) is validation, so 1,437 train / 360 val."""
    nb_classes = 10

    def __init__(self, root=None, is_train=True, transform=None, image_size=32):
        from sklearn.datasets import load_digits
        digits = load_digits()
        images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # values 0..16 -> 0..255
        keep = (np.arange(len(images)) % 5 != 0) if is_train else (np.arange(len(images)) % 5 == 0)
        self.images = images[keep]
        self.targets = [int(t) for t in digits.target[keep]]
        self.image_size = image_size
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        img = Image.fromarray(self.images[index]).resize((self.image_size, self.image_size), Image.BILINEAR)
        img = img.convert('RGB')
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


class FakeImages(torch.utils.data.Dataset):
    """Deterministic generated images for smoke runs: image i of a split is the same on every call and every rank.
    Each class has its own mean colour under the noise, so a model can learn something."""

    def __init__(self, root=None, is_train=True, transform=None, size=256, num_classes=10, image_size=224):
        self.size = size
        self.nb_classes = num_classes
        self.image_size = image_size
        self.transform = transform
        self.split_seed = 0 if is_train else 1
        palette = np.random.default_rng(1234).integers(30, 226, size=(num_classes, 3))
        self.palette = palette
        self.targets = [int(t) for t in np.random.default_rng(self.split_seed + 7).integers(0, num_classes, size)]

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        rng = np.random.default_rng((self.split_seed, index))
        target = self.targets[index]
        noise = rng.normal(0, 40, size=(self.image_size, self.image_size, 3))
        img = _pil_rgb(np.clip(self.palette[target] + noise, 0, 255))
        if self.transform is not None:
            img = self.transform(img)
        return img, target


# ---------------------------------------------------------------------------------------------------------------
# Transforms


class _OneOf3Augment:
    """DeiT-III's 3-Augment choice, applied to every image: grayscale, solarize, or a Gaussian blur of radius drawn
    uniformly in [0.1, 2]. The python `random` draws are upstream's, in its order (the choice, then the always-true
    probability test of the chosen op, then the blur radius), so a seeded run sees the same augmentations."""

    def __init__(self):
        self.grayscale = transforms.Grayscale(3)

    def __call__(self, img):
        choice = int(random.random() * 3)  # torchvision RandomChoice -> random.choices
        random.random()  # the chosen op's own p=1.0 test
        if choice == 0:
            return self.grayscale(img)
        if choice == 1:
            return ImageOps.solarize(img)
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def three_augment_transform(args):
    """DeiT's --ThreeAugment training pipeline (DeiT III): random resized crop (or, with --src, resize + random
    crop with 4 px reflect padding) and flip, then one of grayscale / solarize / blur, colour jitter when
    --color-jitter is non-zero, to tensor, ImageNet normalisation. No RandAugment, no random erasing."""
    from timm.data.transforms import RandomResizedCropAndInterpolation
    size = args.input_size
    if getattr(args, 'src', False):
        primary = [transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                   transforms.RandomCrop(size, padding=4, padding_mode='reflect'), transforms.RandomHorizontalFlip()]
    else:
        primary = [RandomResizedCropAndInterpolation(size, scale=(0.08, 1.0), interpolation='bicubic'),
                   transforms.RandomHorizontalFlip()]
    secondary = [_OneOf3Augment()]
    jitter = getattr(args, 'color_jitter', None)
    if jitter:
        secondary.append(transforms.ColorJitter(jitter, jitter, jitter))
    final = [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return transforms.Compose(primary + secondary + final)


def build_transform(is_train, args):
    """DeiT's transforms: timm `create_transform` for training (RandomResizedCrop, flip, RandAugment, random
    erasing; --ThreeAugment: DeiT III's 3-Augment instead), Resize(input/eval_crop_ratio) + CenterCrop for evaluation. For inputs of 32 pixels or less the random
    resized crop becomes RandomCrop(size, padding=4) and evaluation does no resizing (DeiT's CIFAR recipe)."""
    input_size = args.input_size
    resize_im = input_size > 32
    if is_train and getattr(args, 'ThreeAugment', False):
        return three_augment_transform(args)
    if is_train:
        transform = create_transform(
            input_size=input_size,
            is_training=True,
            color_jitter=getattr(args, 'color_jitter', 0.3),
            auto_augment=getattr(args, 'aa', 'rand-m9-mstd0.5-inc1'),
            interpolation=getattr(args, 'train_interpolation', 'bicubic'),
            re_prob=getattr(args, 'reprob', 0.25),
            re_mode=getattr(args, 'remode', 'pixel'),
            re_count=getattr(args, 'recount', 1),
        )
        if not resize_im:
            transform.transforms[0] = transforms.RandomCrop(input_size, padding=4)
        return transform

    t = []
    if resize_im:
        size = int(input_size / getattr(args, 'eval_crop_ratio', 0.875))
        t.append(transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC))
        t.append(transforms.CenterCrop(input_size))
    t.append(transforms.ToTensor())
    t.append(transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    return transforms.Compose(t)


# ---------------------------------------------------------------------------------------------------------------
# The dispatcher


def imagenet_split(root, is_train, transform=None):
    """`<root>/train` or `<root>/val` as an ImageFolder; validation takes the class indices of `<root>/train` when
    it exists (an evaluation-only copy with just `val/` numbers its own folders, as the model's head must then)."""
    train_root = os.path.join(root, 'train')
    if is_train:
        return image_folder(train_root, transform)
    val_root = os.path.join(root, 'val')
    if not os.path.isdir(train_root):
        print(f'{train_root} not found: labelling {val_root} by its own sorted class folders')
        return image_folder(val_root, transform)
    return image_folder(val_root, transform, train_root=train_root)


def _inat_year(name):
    return {'INAT': 2018, 'INAT18': 2018, 'INAT19': 2019}[name]


def build_dataset(is_train, args, transform=None):
    """(dataset, nb_classes) for `args.data_set` under `args.data_path`; `transform` defaults to build_transform."""
    if transform is None:
        transform = build_transform(is_train, args)
    name = str(args.data_set).upper()
    root = getattr(args, 'data_path', None)

    if name == 'DIGITS':
        dataset = Digits(root, is_train, transform, image_size=args.input_size)
        return dataset, dataset.nb_classes
    if name == 'FAKE':
        dataset = FakeImages(root, is_train, transform, size=getattr(args, 'fake_size', 256),
                             num_classes=getattr(args, 'fake_classes', 10), image_size=args.input_size)
        return dataset, dataset.nb_classes

    if not root or not os.path.isdir(root):
        raise DatasetLayoutError(f'--data-path {root!r} for data set {args.data_set} is not a directory')
    if name == 'IMNET':
        dataset = imagenet_split(root, is_train, transform)
        return dataset, 1000 if len(dataset.classes) <= 1000 else len(dataset.classes)
    if name in ('CIFAR', 'CIFAR100'):
        dataset = CIFAR(root, is_train, transform, num_classes=100)
        return dataset, 100
    if name == 'CIFAR10':
        dataset = CIFAR(root, is_train, transform, num_classes=10)
        return dataset, 10
    if name in ('INAT', 'INAT18', 'INAT19'):
        dataset = INatDataset(root, is_train, transform, year=_inat_year(name),
                              category=getattr(args, 'inat_category', 'name'))
        return dataset, dataset.nb_classes
    if name in FINE_GRAINED:
        cls = FINE_GRAINED[name]
        dataset = cls(root, is_train, transform)
        return dataset, dataset.nb_classes
    raise DatasetLayoutError(f'unknown --data-set {args.data_set!r}; expected one of {", ".join(DATA_SETS)}')


# --data-set names (ours, and TAVT's --dataset spellings upper-cased) of the readers taking (root, is_train, transform)
FINE_GRAINED = {'CUB': CUB, 'CUB_200_2011': CUB, 'CARS': StanfordCars, 'CAR': StanfordCars, 'DOGS': StanfordDogs,
                'DOG': StanfordDogs, 'FLOWERS': Flowers102, 'NABIRDS': NABirds, 'INAT2017': INat2017}
DATA_SETS = ('IMNET', 'CIFAR', 'CIFAR10', 'CUB', 'CARS', 'DOGS', 'FLOWERS', 'NABIRDS', 'INAT', 'INAT18', 'INAT19',
             'INAT2017', 'DIGITS', 'FAKE')


# ---------------------------------------------------------------------------------------------------------------
# Loaders


def build_samplers(args, dataset_train, dataset_val, always_distributed=False):
    """(training sampler, evaluation sampler).

    One process: a fresh random order for training, file order for evaluation. Several processes (or
    `always_distributed`): training is shared out over the ranks, each image `num_repeats` times under
    --repeated-aug; evaluation is shared out only under --dist-eval, otherwise each rank evaluates everything."""
    import shared.distributed as distributed
    from shared.samplers import RASampler

    if not (getattr(args, 'distributed', False) or always_distributed):
        return torch.utils.data.RandomSampler(dataset_train), torch.utils.data.SequentialSampler(dataset_val)
    world = dict(num_replicas=distributed.get_world_size(), rank=distributed.get_rank())
    train_sampler_cls = RASampler if getattr(args, 'repeated_aug', False) else torch.utils.data.DistributedSampler
    sampler_train = train_sampler_cls(dataset_train, shuffle=True, **world)
    if not getattr(args, 'dist_eval', False):
        return sampler_train, torch.utils.data.SequentialSampler(dataset_val)
    # DistributedSampler pads every rank to the same count by repeating images from the start.
    repeated = -len(dataset_val) % world['num_replicas']
    if repeated:
        print(f"--dist-eval: {len(dataset_val)} evaluation images do not divide among {world['num_replicas']} "
              f'processes, so {repeated} of them are evaluated twice and the metrics move slightly')
    return sampler_train, torch.utils.data.DistributedSampler(dataset_val, shuffle=False, **world)


def build_loaders(args, dataset_train, dataset_val, eval_batch_size=None, samplers_always_distributed=False,
                  drop_last=True, persistent_workers=False):
    """Training and evaluation DataLoaders over `build_samplers`' samplers. Evaluation batches are 1.5x the training batch; training drops the last incomplete batch.

    The originals built on older DeiT copies differ in details that change numbers, selectable here:
    `eval_batch_size` (A-ViT and DiffRate evaluate at the training batch size), `samplers_always_distributed` (they
    use the distributed samplers even as a world of one), `drop_last` (A-ViT keeps the last batch),
    `persistent_workers` (DiffRate's MultiEpochsDataLoader keeps its workers between epochs)."""
    sampler_train, sampler_val = build_samplers(args, dataset_train, dataset_val, samplers_always_distributed)

    num_workers = getattr(args, 'num_workers', 0)
    # Pinned memory only helps (and only works without a warning) when a GPU is there.
    pin_memory = bool(getattr(args, 'pin_mem', False)) and torch.cuda.is_available()
    persistent = persistent_workers and num_workers > 0
    data_loader_train = torch.utils.data.DataLoader(
        dataset_train, sampler=sampler_train, batch_size=args.batch_size, num_workers=num_workers,
        pin_memory=pin_memory, drop_last=drop_last, persistent_workers=persistent)
    data_loader_val = torch.utils.data.DataLoader(
        dataset_val, sampler=sampler_val, batch_size=eval_batch_size or int(1.5 * args.batch_size),
        num_workers=num_workers, pin_memory=pin_memory, drop_last=False, persistent_workers=persistent)
    return data_loader_train, data_loader_val
