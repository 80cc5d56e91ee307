"""DeiT's repeated-augmentation sampler."""
import math

import torch
import torch.distributed as dist


class RASampler(torch.utils.data.Sampler):
    """Each sample appears `num_repeats` times across the ranks (with different augmentations); each rank then
    iterates over the first len(dataset) // 256 * 256 / world_size of its share, as DeiT does."""

    def __init__(self, dataset, num_replicas=None, rank=None, shuffle=True, num_repeats=3):
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_initialized() else 0
        if num_repeats < 1:
            raise ValueError('num_repeats should be greater than 0')
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank
        self.num_repeats = num_repeats
        self.epoch = 0
        self.num_samples = int(math.ceil(len(dataset) * num_repeats / num_replicas))
        self.total_size = self.num_samples * num_replicas
        # DeiT keeps a multiple of 256 images per epoch; tiny data sets keep at least one batch-worth.
        self.num_selected_samples = int(math.floor(len(dataset) // 256 * 256 / num_replicas)) or \
            int(math.ceil(len(dataset) / num_replicas))
        self.shuffle = shuffle

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.epoch)
            indices = torch.randperm(len(self.dataset), generator=g)
        else:
            indices = torch.arange(len(self.dataset))
        indices = torch.repeat_interleave(indices, repeats=self.num_repeats, dim=0).tolist()
        padding = self.total_size - len(indices)
        if padding > 0:
            indices += indices[:padding]
        assert len(indices) == self.total_size
        indices = indices[self.rank:self.total_size:self.num_replicas]
        assert len(indices) == self.num_samples
        return iter(indices[:self.num_selected_samples])

    def __len__(self):
        return self.num_selected_samples

    def set_epoch(self, epoch):
        self.epoch = epoch
