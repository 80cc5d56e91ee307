"""ToE's token selector: initialise -> expand -> merge (Huang et al., CVPR 2024, "Token Expansion").

During training, right before the second transformer block, the N patch tokens are cut down to a kept fraction
of themselves (class token untouched, re-attached first):

1. initialisation: every `int(1 // r0)`-th patch index (Python float floor division, so r0 = 0.2 gives stride 4
   and the last rows get no seed) up to `int(N * r0)` seeds, the same for every image;
2. expansion: each stage's quota is split into `expansion_multiple_stage` greedy sub-steps; each sub-step scores
   every unselected token against the selected ones (on L2-normalised features), takes its best score, sorts
   ascending and appends the first q tokens to the selection (the tokens farthest from everything kept: the
   "widest feature distribution");
3. merging: every leftover token is averaged into its best-scoring kept token (`scatter_reduce(..., 'mean')`
   with the kept token itself included).

The stage comes from the epoch (`update_current_stage`), so it holds no state worth saving and resume is exact.
The arithmetic of the quotas is the original's float arithmetic on purpose (e.g. 0.7 - 0.4 = 0.29999999999999993
makes LV-ViT's stage 2 keep 136 tokens, not 137); see `stage_token_counts`.

This version keeps the selection as (B, n) index tensors and normalises the patch tokens once, instead of
gathering and concatenating (B, n, C) int64 index tensors every sub-step as the original does; the scores are still
computed with the same (B, |U|, C) x (B, C, |A|) products on the same normalised rows, the sort is the same call on
the same order of candidates, and the merge is the same `scatter_reduce`, so kept indices, token order and output
values are identical (tests/test_toe_token_select.py checks it against a literal reference).
"""
import bisect
import warnings

import torch
from torch import nn

DISTANCES = ('cosine', 'manhattan', 'euclidean')


class ScheduleError(ValueError):
    """An expansion schedule that cannot be run (named in the message)."""


def check_schedule(expansion_step, keep_rate, initialization_keep_rate, expansion_multiple_stage=2,
                   distance='cosine'):
    """Raise ScheduleError naming the problem if the ToE schedule is impossible; return None when it is fine."""
    expansion_step, keep_rate = list(expansion_step), list(keep_rate)
    if not keep_rate or not expansion_step:
        raise ScheduleError('--expansion-step and --keep-rate need at least one value each')
    if len(expansion_step) != len(keep_rate):
        raise ScheduleError(f'--expansion-step has {len(expansion_step)} values ({expansion_step}) but --keep-rate has '
                            f'{len(keep_rate)} ({keep_rate}): one keep rate per expansion stage is needed')
    if any(int(s) != s or s < 0 for s in expansion_step):
        raise ScheduleError(f'--expansion-step must be non-negative integer epochs, got {expansion_step}')
    if any(b < a for a, b in zip(expansion_step, expansion_step[1:])):
        raise ScheduleError(f'--expansion-step must be non-decreasing epochs, got {expansion_step}')
    if any(r <= 0 for r in keep_rate):
        raise ScheduleError(f'--keep-rate values must be > 0, got {keep_rate}')
    if any(r > 1.0 for r in keep_rate):
        raise ScheduleError(f'--keep-rate values must be <= 1.0 (a fraction of the patch tokens), got {keep_rate}')
    if any(b < a for a, b in zip(keep_rate, keep_rate[1:])):
        raise ScheduleError(f'--keep-rate must be non-decreasing (tokens are only ever added), got {keep_rate}')
    if not 0 < initialization_keep_rate <= 1.0:
        raise ScheduleError(f'--initialization-keep-rate must be in (0, 1], got {initialization_keep_rate}')
    if initialization_keep_rate > keep_rate[0]:
        raise ScheduleError(f'--initialization-keep-rate {initialization_keep_rate} is above the first --keep-rate '
                            f'{keep_rate[0]}: the first stage would have to drop seed tokens')
    if int(expansion_multiple_stage) < 1:
        raise ScheduleError(f'--expansion-multiple-stage must be >= 1, got {expansion_multiple_stage}')
    if distance not in DISTANCES:
        raise ScheduleError(f'--distance must be one of {DISTANCES}, got {distance!r}')


class TokenSelect(nn.Module):
    """Parameter-free; `token_select(x)` maps (B, 1+N, C) to ((B, 1+M, C), index (B, 1+M, C) int64) or (x, None).

    `index[b, j, :]` is the position in `x` of kept token j (0 for the class token); it is returned as an expanded
    view of a (B, 1+M) tensor (same values as the original's materialised tensor)."""

    def __init__(self, expansion_step=(0, 100, 200), keep_rate=(0.5, 0.75, 1.0), initialization_keep_rate=0.25,
                 expansion_multiple_stage=2, distance='cosine'):
        super().__init__()
        check_schedule(expansion_step, keep_rate, initialization_keep_rate, expansion_multiple_stage, distance)
        if distance != 'cosine':
            # The original takes max + ascending sort for every option; on a distance this picks the tokens whose
            # farthest kept token is nearest (and merges into the farthest one). Kept literally for fidelity.
            warnings.warn(f"ToE distance '{distance}' keeps the original's semantics (max of a distance, sorted "
                          "ascending), which inverts the paper's 'widest distribution' intent; only cosine behaves as "
                          "the paper describes", stacklevel=2)
        self.expansion_stage = 0
        self.sparse_inference = False
        self.expansion_step = list(expansion_step)
        self.total_expansion_stage = len(self.expansion_step)
        self.initialization_keep_rate = initialization_keep_rate
        # Python-float increments, exactly as the original (their rounding decides several counts).
        keep_rate = list(keep_rate)
        self.expansion_keep_rate = [keep_rate[0] - initialization_keep_rate] + [
            keep_rate[i] - keep_rate[i - 1] for i in range(1, len(keep_rate))]
        self.keep_rate = keep_rate
        self.final_keep_rate = keep_rate[-1]
        self.expansion_multiple_stage = int(expansion_multiple_stage)
        self.distance = distance

    def extra_repr(self):
        return (f'expansion_step={self.expansion_step}, keep_rate={self.keep_rate}, '
                f'initialization_keep_rate={self.initialization_keep_rate}, '
                f'expansion_multiple_stage={self.expansion_multiple_stage}, distance={self.distance!r}')

    # ----------------------------------------------------------------------------------------------- schedule
    def update_current_stage(self, epoch: int):
        """Stage = number of `expansion_step` entries <= epoch (0 before the first step)."""
        self.expansion_stage = bisect.bisect_right(self.expansion_step, epoch)
        return self.expansion_stage

    def is_active(self, stage=None):
        stage = self.expansion_stage if stage is None else stage
        last_is_full = stage == self.total_expansion_stage and self.final_keep_rate == 1.0
        return stage > 0 and not last_is_full and self.sparse_inference

    def seed_count_and_stride(self, num_patches):
        return int(num_patches * self.initialization_keep_rate), int(1 // self.initialization_keep_rate)

    def stage_quota(self, num_patches, stage):
        """Tokens added during stage `stage` (1-based), the original's formula."""
        if stage == self.total_expansion_stage:
            before = self.initialization_keep_rate + sum(self.expansion_keep_rate[i] for i in range(stage - 1))
            return int(num_patches * self.final_keep_rate) - int(num_patches * before)
        return int(num_patches * self.expansion_keep_rate[stage - 1])

    def substep_quotas(self, num_patches, stage=None):
        """The per-sub-step quotas replayed from the seeds up to `stage` (default: the current one)."""
        stage = self.expansion_stage if stage is None else stage
        k = self.expansion_multiple_stage
        quotas = []
        for s in range(1, stage + 1):
            q = self.stage_quota(num_patches, s)
            quotas += [q // k] * (k - 1) + [q - (k - 1) * (q // k)]
        return quotas

    def kept_tokens(self, num_patches, stage=None):
        """Patch tokens (class token not counted) the selector outputs at `stage` when reducing; N when inactive."""
        stage = self.expansion_stage if stage is None else stage
        if stage == 0 or (stage == self.total_expansion_stage and self.final_keep_rate == 1.0):
            return num_patches
        return self.seed_count_and_stride(num_patches)[0] + sum(self.substep_quotas(num_patches, stage))

    def check_num_patches(self, num_patches):
        """ScheduleError when `num_patches` leaves no seed token (the original crashes in its first sub-step)."""
        if self.seed_count_and_stride(num_patches)[0] < 1:
            raise ScheduleError(f'--initialization-keep-rate {self.initialization_keep_rate} of {num_patches} patch '
                                'tokens is no seed token: raise it or the input size')

    def stage_token_counts(self, num_patches):
        """Kept patch tokens for stages 1..S (the last is N when the final keep rate is 1.0)."""
        return [self.kept_tokens(num_patches, s) for s in range(1, self.total_expansion_stage + 1)]

    # ----------------------------------------------------------------------------------------------- selection
    def get_score(self, a, b):
        """(B, n, C) x (B, m, C) -> (B, n, m); larger counts as 'closer' downstream for every option (see warning)."""
        if self.distance == 'cosine':
            return a @ b.transpose(-1, -2)
        if self.distance == 'manhattan':
            return torch.sum(torch.abs(a.unsqueeze(2) - b.unsqueeze(1)), dim=-1)
        if self.distance == 'euclidean':
            return torch.sqrt(torch.sum((a.unsqueeze(2) - b.unsqueeze(1)) ** 2, dim=-1))
        raise ValueError(f'unknown distance {self.distance!r}')

    def seed_indices(self, num_patches, device):
        """The seed positions (every stride-th, n_seed of them) and the other positions, both ascending.

        Written with slices and reshapes of one `arange` so that every shape is a Python int: no boolean mask, hence
        no `nonzero`, which would be a data-dependent shape (a graph break under torch.compile) and a host sync on a
        GPU. The seeds span the first n_seed * stride positions: stride <= 1 / rate and n_seed <= N * rate, so that
        span never passes N; inside it the non-seeds are columns 1.. of an (n_seed, stride) view, after it all
        positions are non-seeds."""
        n_seed, stride = self.seed_count_and_stride(num_patches)
        span = n_seed * stride
        positions = torch.arange(num_patches, device=device)
        grid = positions[:span].view(n_seed, stride)
        return grid[:, 0], torch.cat([grid[:, 1:].reshape(-1), positions[span:]])

    def select_indices(self, patches):
        """Kept and leftover patch indices (B, M), (B, N-M) in output order, and each leftover's merge target (B, N-M)
        as a position in the kept list (None when nothing is left over). No gradients."""
        B, N, _ = patches.shape
        seeds, rest = self.seed_indices(N, patches.device)
        kept, left = seeds.expand(B, -1), rest.expand(B, -1)
        with torch.no_grad():
            # Row-wise normalisation, done once: the same numbers the original gets from normalising its gathered
            # subsets every sub-step (no epsilon, as the original: an all-zero token gives NaN scores).
            normed = patches / patches.norm(dim=-1, keepdim=True)
            for quota in self.substep_quotas(N):
                scores = self.get_score(_gather_rows(normed, left), _gather_rows(normed, kept))
                order = scores.max(dim=-1).values.argsort(dim=-1, descending=False)
                left = left.gather(1, order)
                kept, left = torch.cat([kept, left[:, :quota]], dim=1), left[:, quota:]
            target = None
            if left.shape[1] > 0:
                scores = self.get_score(_gather_rows(normed, left), _gather_rows(normed, kept))
                target = scores.max(dim=-1).indices
        return kept, left, target

    def token_select(self, x):
        self.token_num = x.shape[1]
        if not self.is_active():
            return x, None
        B, _, C = x.shape
        cls_token, patches = x[:, :1], x[:, 1:]
        kept, left, target = self.select_indices(patches)
        selected = _gather_rows(patches, kept)
        if target is not None:
            # include_self=True: a kept token becomes the mean of itself and the leftovers assigned to it.
            selected = selected.scatter_reduce(1, target.unsqueeze(-1).expand(B, target.shape[1], C),
                                               _gather_rows(patches, left), reduce='mean')
        x = torch.cat([cls_token, selected], dim=1)
        index = torch.cat([kept.new_zeros(B, 1), kept + 1], dim=1)
        return x, index.unsqueeze(-1).expand(B, index.shape[1], C)

    forward = token_select


def _gather_rows(x, index):
    """x[b, index[b, j]] for (B, N, C) x and (B, n) index. Row indexing copies whole C-vectors; on the CPU it is several
    times faster than `gather` with an index expanded over C (the original's way), and gives the same values."""
    return x[torch.arange(x.shape[0], device=x.device).unsqueeze(1), index]


def add_toe_args(parser, initialization_keep_rate=0.25, expansion_multiple_stage=2):
    """ToE's six flags. The original declares the two list flags with string defaults that argparse feeds through
    int()/float() and exits on; here the defaults are the lists those strings spell."""
    g = parser.add_argument_group('ToE (token expansion)')
    g.add_argument('--expansion-step', nargs='+', type=int, default=[0, 100, 200],
                   help='epoch at which each expansion stage starts')
    g.add_argument('--keep-rate', nargs='+', type=float, default=[0.5, 0.75, 1.0],
                   help='fraction of patch tokens kept at the end of each stage (non-decreasing, <= 1)')
    g.add_argument('--initialization-keep-rate', type=float, default=initialization_keep_rate,
                   help='fraction of patch tokens taken as spatially uniform seeds')
    g.add_argument('--expansion-multiple-stage', type=int, default=expansion_multiple_stage,
                   help='greedy sub-steps each stage quota is split into')
    g.add_argument('--distance', type=str, default='cosine', choices=list(DISTANCES))
    g.add_argument('--sparse-eval', action='store_true', help='also reduce tokens when evaluating the online model')
    return g


def check_toe_args(parser, args):
    """parser.error (exit 2, message naming the flag) on an impossible schedule."""
    try:
        check_schedule(args.expansion_step, args.keep_rate, args.initialization_keep_rate,
                       args.expansion_multiple_stage, args.distance)
    except ScheduleError as e:
        parser.error(str(e))


def enter_epoch(token_select, epoch, num_patches):
    """What every ToE trainer does before an epoch's training: move the selector to the epoch's stage, switch token
    selection on, and print the stage line (tests read the stage transitions from it)."""
    token_select.update_current_stage(epoch)
    token_select.sparse_inference = True
    print(f'ToE epoch {epoch}: expansion stage {token_select.expansion_stage}/{token_select.total_expansion_stage}, '
          f'{token_select.kept_tokens(num_patches)}/{num_patches} patch tokens kept in training')


def build_token_select(args):
    return TokenSelect(expansion_step=args.expansion_step, keep_rate=args.keep_rate,
                       initialization_keep_rate=args.initialization_keep_rate,
                       expansion_multiple_stage=args.expansion_multiple_stage, distance=args.distance)
