"""TAVT's data pipeline (TransFG's): the fine-grained readers of shared.datasets with the original's transforms and
samplers.

Transforms: resize to a square (bilinear, aspect ratio not kept), random crop + horizontal flip for training, centre
crop for testing, ImageNet mean/std. 600 -> 448 for CUB, Cars, Dogs, NABirds; 400 -> 304 for iNat2017; Cars and
iNat2017 add the ImageNet AutoAugment policy after the flip. The original hard-codes the crop; here a different
`--img_size` scales both sizes by img_size / crop (same 600:448 ratio) so that small test models get matching
images instead of a position-embedding mismatch.
"""
import argparse
import logging

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler, Sampler
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from shared.distributed import barrier, get_rank, get_world_size, is_dist_avail_and_initialized
from tavt.autoaugment import ImageNetAutoAugment

_logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --dataset -> (shared.datasets name, classes, resize, crop, AutoAugment on train)
DATASETS = {
    'CUB_200_2011': ('CUB', 200, 600, 448, False),
    'car': ('CARS', 196, 600, 448, True),
    'dog': ('DOGS', 120, 600, 448, False),
    'nabirds': ('NABIRDS', 555, 600, 448, False),
    'INat2017': ('INAT2017', 5089, 400, 304, True),
}


def num_classes_of(dataset):
    return DATASETS[dataset][1]


def default_image_size(dataset):
    return DATASETS[dataset][3]


def build_transforms(dataset, img_size=None):
    """(train, test) transforms of `--dataset`; img_size None means the original's crop."""
    _, _, resize, crop, autoaugment = DATASETS[dataset]
    if img_size is not None and img_size != crop:
        resize, crop = round(resize * img_size / crop), img_size
    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = [transforms.Resize((resize, resize), InterpolationMode.BILINEAR), transforms.RandomCrop((crop, crop)),
             transforms.RandomHorizontalFlip()]
    if autoaugment:
        train.append(ImageNetAutoAugment())  # the DeepVoltaire port's ImageNet policy, as the original
    test = [transforms.Resize((resize, resize), InterpolationMode.BILINEAR), transforms.CenterCrop((crop, crop))]
    return transforms.Compose(train + normalize), transforms.Compose(test + normalize)


class ShardSampler(Sampler):
    """Rank r evaluates images r, r+W, r+2W, ... with no padding, so that summed counts over ranks are exact.
    (The original's DistributedSampler pads the test set with duplicates and averages per-rank accuracies.)"""

    def __init__(self, dataset, num_replicas=None, rank=None):
        self.num_replicas = num_replicas if num_replicas is not None else get_world_size()
        self.rank = rank if rank is not None else get_rank()
        self.n = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self):
        return len(range(self.rank, self.n, self.num_replicas))


def build_datasets(args, train=True):
    from shared.datasets import build_dataset
    name = DATASETS[args.dataset][0]
    train_tf, test_tf = build_transforms(args.dataset, args.img_size)
    spec = argparse.Namespace(data_set=name, data_path=args.data_root, input_size=args.img_size)
    # Rank 0 reads the annotations first (the original's barrier pair), the others then hit a warm file cache.
    if get_rank() != 0:
        barrier()
    trainset = build_dataset(True, spec, transform=train_tf)[0] if train else None
    testset = build_dataset(False, spec, transform=test_tf)[0]
    if get_rank() == 0:
        barrier()
    return trainset, testset


def get_loader(args, train=True, datasets=None):
    """(train_loader, test_loader) as the original builds them; train_loader is None when train is False.
    `datasets`: a (trainset, testset) pair from a Python caller (tavt/compare.py) instead of --dataset's."""
    trainset, testset = datasets if datasets is not None else build_datasets(args, train)
    if not train:
        trainset = None
    distributed = is_dist_avail_and_initialized()
    workers = getattr(args, 'num_workers', 4)
    pin = torch.cuda.is_available()
    train_loader = None
    if trainset is not None:
        if len(trainset) < args.train_batch_size * (get_world_size() if distributed else 1):
            raise ValueError(f"the training set has {len(trainset)} images, fewer than one batch of "
                             f"{args.train_batch_size} per process: nothing to train on (drop_last=True)")
        # set_epoch is never called in the original: every epoch sees the same permutation under DDP.
        sampler = DistributedSampler(trainset) if distributed else RandomSampler(trainset)
        train_loader = DataLoader(trainset, sampler=sampler, batch_size=args.train_batch_size, num_workers=workers,
                                  drop_last=True, pin_memory=pin)
    sampler = ShardSampler(testset) if distributed else SequentialSampler(testset)
    test_loader = DataLoader(testset, sampler=sampler, batch_size=args.eval_batch_size, num_workers=workers,
                             pin_memory=pin)
    return train_loader, test_loader
