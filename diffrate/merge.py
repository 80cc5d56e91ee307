"""DiffRate's merge operator (spec 6.1 step 4), which differs from ToMe's bipartite soft matching.

Tokens arrive sorted by importance. The first `kept` are destinations (prefix tokens first), every other token is a
source. Each source joins its most similar destination (cosine similarity of the detached features, never a prefix
token: class, distillation or register); destinations become the plain mean of themselves and their sources. The similarity of each source to its
destination is returned so the caller can scale sizes by it.
"""
import math

import torch


def merge_by_similarity(metric, kept, class_token=True):
    """Returns (merge, similarity): merge(x, mode, keep_sources) applies the assignment to any (B, N, *) tensor
    with scatter-reduce `mode` ('mean' includes the destination itself, 'sum', 'amax'); with keep_sources the
    sources are appended after the destinations (the search keeps them in place and masks them).
    class_token: how many leading destinations no source may join (True: the class token alone)."""
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        sources, destinations = metric[:, kept:], metric[:, :kept]
        similarity = sources @ destinations.transpose(-1, -2)
        protected = int(class_token)
        if protected:
            similarity[..., :, :protected] = -math.inf
        best_similarity, best_destination = similarity.max(dim=-1)
        index = best_destination[..., None]

    def merge(x, mode='mean', keep_sources=False):
        src, dst = x[:, kept:], x[:, :kept]
        n, t, c = src.shape
        dst = dst.scatter_reduce(-2, index.expand(n, t, c), src, reduce=mode)
        return torch.cat([dst, src], dim=1) if keep_sources else dst

    return merge, best_similarity


def uncompress(x, source):
    """Back to the full token grid: every original position takes the merged token that contains it.
    x (B, N', C), source (B, N', N) -> (B, N, C)."""
    index = source.argmax(dim=1)
    return torch.gather(x, dim=1, index=index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def tokens_to_grid(x):
    """(B, N, C) -> (B, H, W, C) for a square token grid."""
    B, N, C = x.shape
    side = math.isqrt(N)
    return x.reshape(B, side, side, C)
