"""Repeated-augmentation sampling (`--repeated-aug`) on timm's `RepeatAugSampler`.

timm's sampler already draws what our training runs have always drawn: per epoch a `randperm` seeded with the epoch
number (or `arange` without shuffling), each index repeated `num_repeats` times in a row, the list wrapped around to a
multiple of the world size, every `world_size`-th entry from `rank` on, cut to a per-rank count of
`floor(len(dataset) // 256 * 256 / world_size)`, or `ceil(len(dataset) / world_size)` below 256 images.

`RASampler` adds two things and changes nothing else:
- outside torch.distributed it samples for a world of one (timm's would ask torch.distributed and fail);
- where the 256-image rounding leaves nothing for a rank (a world larger than `len(dataset) // 256 * 256`), each rank
  still gets `ceil(len(dataset) / world_size)` images rather than an empty epoch.
"""
import math

import torch.distributed as dist
from timm.data.distributed_sampler import RepeatAugSampler


def _default_world():
    """(world size, rank) of the initialised process group, else a world of one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class RASampler(RepeatAugSampler):
    """Each image is drawn `num_repeats` times per epoch, the copies going to different ranks (and so receiving
    different augmentations). Call `set_epoch` before each epoch."""

    def __init__(self, dataset, num_replicas=None, rank=None, shuffle=True, num_repeats=3):
        if num_repeats < 1:
            raise ValueError(f'num_repeats must be at least 1, got {num_repeats}')
        world_size, own_rank = _default_world()
        super().__init__(dataset, num_replicas=world_size if num_replicas is None else num_replicas,
                         rank=own_rank if rank is None else rank, shuffle=shuffle, num_repeats=num_repeats)
        if self.num_selected_samples == 0:
            self.num_selected_samples = math.ceil(len(dataset) / self.num_replicas)
