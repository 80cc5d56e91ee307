"""DiffRate's differentiable discrete proxy: a learnable distribution over candidate kept-token numbers.

One proxy decides how many tokens survive one operation (prune or merge) of one block. The expected kept number is
rounded up with a straight-through ceil, so the FLOPs penalty can pull the distribution; the classification loss
reaches it through a straight-through 0/1 token mask whose backward goes through the keep probabilities.
"""
import torch
import torch.nn as nn


class _CeilSTE(torch.autograd.Function):
    """ceil in the forward, identity in the backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.ceil(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _MinSTE(torch.autograd.Function):
    """min(running, *kept) whose backward hands the full incoming gradient to every kept number (prune and merge)
    and none to the running count. This rule is the reference's and shapes the search trajectory: dFLOPs/dk of a
    block stops at that block instead of flowing down the network."""

    @staticmethod
    def forward(running, *kept):
        out = running
        for k in kept:
            out = torch.minimum(out, k)
        return out

    @staticmethod
    def backward(ctx, grad):
        return (None,) + (grad,) * ctx.num_kept

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.num_kept = len(inputs) - 1


ceil_ste = _CeilSTE.apply
min_ste = _MinSTE.apply


class KeptNumberProxy(nn.Module):
    """Distribution over kept-token numbers [P, P-g, P-2g, ...] (> 0) for a layer with P patch tokens.

    `kept_token_number` (int, class token included) is what inference uses; a training forward refreshes it from
    the logits through `update_kept_token_number()`, and `set_kept_number()` overrides it with a loaded schedule.
    Attribute and parameter names follow the reference so that its checkpoints load unchanged.
    """

    def __init__(self, patch_number=196, granularity=1, class_token=True):
        super().__init__()
        self.patch_number = patch_number
        self.class_token_num = int(bool(class_token))
        self.kept_token_candidate = nn.Parameter(
            torch.arange(patch_number, 0, -granularity).float(), requires_grad=False)
        self.selected_probability = nn.Parameter(torch.zeros_like(self.kept_token_candidate))
        self.kept_token_number = patch_number + self.class_token_num
        with torch.no_grad():
            self.update_kept_token_number()

    @property
    def num_tokens(self):
        return self.patch_number + self.class_token_num

    def probabilities(self):
        return self.selected_probability.softmax(dim=-1)

    def update_kept_token_number(self):
        """Differentiable expected kept number ceil_STE(sum_j p_j K_j) + c; caches its integer value."""
        p = self.probabilities()
        kept = ceil_ste(torch.matmul(self.kept_token_candidate, p)) + self.class_token_num
        self.kept_token_number = int(kept)
        return kept

    def keep_probability(self):
        """pi_t = P(sampled kept number > t) for every token position t (class token at 0).

        The candidates are descending, so the j with K_j + c > t form a prefix and pi_t is a prefix sum of p
        (accumulated left to right, like the reference's loop)."""
        p = self.probabilities()
        cumulative = torch.cumsum(p, dim=0)
        positions = torch.arange(self.num_tokens, device=p.device)
        bounds = self.kept_token_candidate + self.class_token_num
        count = (bounds[None, :] > positions[:, None]).sum(dim=1)
        padded = torch.cat([cumulative.new_zeros(1), cumulative])
        return padded[count]

    def token_mask(self, alive=None):
        """Hard 0/1 mask over all token positions carrying the keep probabilities' gradient.

        Positions kept_token_number .. alive-1 are zeroed; positions >= alive were removed by earlier operations
        already and stay 1 here (their zero lives in the running mask)."""
        pi = self.keep_probability()
        mask = torch.ones_like(pi)
        mask[self.kept_token_number:alive] = 0
        return mask - pi.detach() + pi

    def set_kept_number(self, number):
        self.kept_token_number = int(number)

    def extra_repr(self):
        return (f'patch_number={self.patch_number}, candidates={self.kept_token_candidate.numel()}, '
                f'class_token={bool(self.class_token_num)}')
