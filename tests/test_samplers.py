"""shared.samplers.RASampler: the indices each rank draws per epoch, against a direct computation of the rule."""
import math

import pytest
import torch

from shared.samplers import RASampler


class Sized:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def expected_indices(n, world, rank, epoch, repeats=3, shuffle=True):
    """The rule training runs have used: seeded permutation, each index `repeats` times in a row, wrapped to a
    multiple of the world size, every world-th entry from rank, cut to a multiple of 256 images per epoch (at least
    ceil(n / world) per rank)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).tolist() if shuffle else list(range(n))
    repeated = [i for i in order for _ in range(repeats)]
    per_rank = math.ceil(n * repeats / world)
    padded = (repeated * (per_rank * world // len(repeated) + 1))[:per_rank * world]
    keep = (n // 256 * 256) // world or math.ceil(n / world)
    return padded[rank::world][:keep]


@pytest.mark.parametrize('n', [10, 100, 255, 256, 300, 600, 1797])
@pytest.mark.parametrize('world', [1, 2, 3])
def test_indices_per_rank_and_epoch(n, world):
    for rank in range(world):
        sampler = RASampler(Sized(n), num_replicas=world, rank=rank)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            drawn = list(sampler)
            assert drawn == expected_indices(n, world, rank, epoch)
            assert len(drawn) == len(sampler)


def test_counts_below_and_above_256_images():
    assert len(RASampler(Sized(1797), num_replicas=3, rank=0)) == 1792 // 3   # rounded down to 7 * 256 images
    assert len(RASampler(Sized(255), num_replicas=2, rank=1)) == 128           # ceil(255 / 2): nothing to round
    # the 256-image rounding would leave these ranks nothing: they keep ceil(n / world) images
    assert len(RASampler(Sized(300), num_replicas=300, rank=7)) == 1
    assert len(RASampler(Sized(500), num_replicas=300, rank=7)) == 2
    assert len(RASampler(Sized(600), num_replicas=300, rank=7)) == 1  # 512 // 300 is not zero: no floor needed


def test_three_repeats_over_three_ranks_give_each_rank_the_same_images():
    # each image's three consecutive copies land on ranks 0, 1, 2: every rank draws the same distinct images
    ranks = [list(RASampler(Sized(768), num_replicas=3, rank=r)) for r in range(3)]
    assert ranks[0] == ranks[1] == ranks[2] and len(set(ranks[0])) == len(ranks[0]) == 256
    assert ranks[0] == torch.randperm(768, generator=torch.Generator().manual_seed(0))[:256].tolist()


def test_unshuffled_and_defaults_without_process_group():
    sampler = RASampler(Sized(7), shuffle=False, num_repeats=2)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)
    assert list(sampler) == [0, 0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match='num_repeats'):
        RASampler(Sized(7), num_repeats=0)
