"""ToE TokenSelect: per-stage token counts (spec table), equality with a literal reference, gradients, validation."""
import contextlib

import pytest
import torch

from toe.token_select import ScheduleError, TokenSelect, check_schedule


def reference_select(x, sel: TokenSelect):
    """Literal, unoptimised replay of the original algorithm: (B, n, C) index tensors re-gathered and re-normalised
    every sub-step, seeds by a python loop."""
    B, T, C = x.shape
    N = T - 1
    patches = x[:, 1:]
    n_seed = int(N * sel.initialization_keep_rate)
    stride = int(1 // sel.initialization_keep_rate)
    seeds, rest = [], []
    for i in range(N):
        (seeds if i % stride == 0 and len(seeds) < n_seed else rest).append(i)
    kept_idx = torch.tensor(seeds)[None, :, None].expand(B, len(seeds), C)
    left_idx = torch.tensor(rest)[None, :, None].expand(B, len(rest), C)
    kept, left = patches.gather(1, kept_idx), patches.gather(1, left_idx)
    for stage in range(1, sel.expansion_stage + 1):
        if stage == sel.total_expansion_stage:
            quota = int(N * sel.final_keep_rate) - int(
                N * (sel.initialization_keep_rate + sum(sel.expansion_keep_rate[:stage - 1])))
        else:
            quota = int(N * sel.expansion_keep_rate[stage - 1])
        k = sel.expansion_multiple_stage
        for sub in range(1, k + 1):
            q = quota - (k - 1) * (quota // k) if sub == k else quota // k
            with torch.no_grad():
                s = sel.get_score(left / left.norm(dim=-1, keepdim=True), kept / kept.norm(dim=-1, keepdim=True))
                order = s.max(dim=-1).values.argsort(dim=-1)[..., None]
            add, stay = order[:, :q].expand(B, q, C), order[:, q:].expand(B, order.shape[1] - q, C)
            kept_idx = torch.cat([kept_idx, left_idx.gather(1, add)], 1)
            kept = torch.cat([kept, left.gather(1, add)], 1)
            left_idx, left = left_idx.gather(1, stay), left.gather(1, stay)
    if left.shape[1] > 0:
        with torch.no_grad():
            s = sel.get_score(left / left.norm(dim=-1, keepdim=True), kept / kept.norm(dim=-1, keepdim=True))
            target = s.max(dim=-1).indices[..., None].expand(B, left.shape[1], C)
        kept = kept.scatter_reduce(1, target, left, reduce='mean')
    out = torch.cat([x[:, :1], kept], 1)
    index = torch.cat([torch.zeros(B, 1, C, dtype=torch.long), kept_idx + 1], 1)
    return out, index


# (r0, keep rates) -> kept patch tokens at stages 1/2/3 for N = 196, 144, 100 (spec §2.6, measured on the original)
SPEC_TABLE = {
    (0.25, (0.5, 0.75, 1.0)): {196: [98, 147, 196], 144: [72, 108, 144], 100: [50, 75, 100]},
    (0.4, (0.5, 0.75, 1.0)): {196: [97, 146, 196], 144: [71, 107, 144], 100: [49, 74, 100]},
    (0.2, (0.4, 0.7, 1.0)): {196: [78, 136, 196], 144: [56, 99, 144], 100: [40, 69, 100]},
    (0.3, (0.6, 0.8, 1.0)): {196: [116, 155, 196], 144: [86, 114, 144], 100: [60, 80, 100]},
}


@pytest.mark.parametrize('setting', list(SPEC_TABLE))
@pytest.mark.parametrize('num_patches', [196, 144, 100])
def test_stage_token_counts_match_spec(setting, num_patches):
    r0, keep = setting
    expected = SPEC_TABLE[setting][num_patches]
    sel = TokenSelect([0, 100, 200], keep, r0, 2)
    assert sel.stage_token_counts(num_patches) == expected
    # and the module really outputs that many tokens (C small: counts do not depend on C)
    sel.sparse_inference = True
    x = torch.randn(2, 1 + num_patches, 8)
    for stage, epoch in enumerate([0, 100, 200]):
        sel.update_current_stage(epoch)
        out, index = sel.token_select(x)
        assert out.shape == (2, 1 + expected[stage], 8)
        if expected[stage] == num_patches:
            assert index is None and out is x  # last stage at keep rate 1.0: full tokens, untouched


def test_seeding_stride_quirk():
    sel = TokenSelect([0], [1.0], 0.2, 2)
    seeds, _ = sel.seed_indices(196, 'cpu')
    assert len(seeds) == 39 and seeds[1] - seeds[0] == 4 and seeds.max() == 152  # 1 // 0.2 == 4.0 in float
    seeds, _ = TokenSelect([0], [1.0], 0.4, 2).seed_indices(196, 'cpu')
    assert len(seeds) == 78 and seeds.max() == 154


@pytest.mark.parametrize('distance', ['cosine', 'manhattan', 'euclidean'])
@pytest.mark.parametrize('r0,keep,k', [(0.25, [0.5, 0.75, 1.0], 2), (0.2, [0.4, 0.7, 1.0], 2),
                                       (0.4, [0.5, 0.75, 1.0], 5), (0.3, [0.6, 0.8, 0.9], 3)])
def test_equals_reference(distance, r0, keep, k):
    torch.manual_seed(0)
    with pytest.warns(UserWarning) if distance != 'cosine' else contextlib.nullcontext():
        sel = TokenSelect([0, 2, 4], keep, r0, k, distance)
    sel.sparse_inference = True
    x = torch.randn(3, 1 + 196, 32)
    for epoch in [0, 2, 4]:
        sel.update_current_stage(epoch)
        out, index = sel.token_select(x)
        if index is None:
            continue
        ref_out, ref_index = reference_select(x, sel)
        assert torch.equal(index, ref_index)  # kept indices and their order
        assert torch.equal(out, ref_out)  # bit-identical values
        assert torch.equal(out[:, 0], x[:, 0])  # class token untouched


def test_merge_is_mean_and_grads_reach_every_token():
    torch.manual_seed(1)
    sel = TokenSelect([0, 10], [0.5, 1.0], 0.25, 2)
    sel.sparse_inference = True
    sel.update_current_stage(0)
    x = torch.randn(2, 1 + 64, 16, requires_grad=True)
    out, index = sel.token_select(x)
    kept, left, target = sel.select_indices(x[:, 1:].detach())
    b, j = 1, 0
    members = [x[b, 1 + kept[b, j]]] + [x[b, 1 + left[b, u]] for u in range(left.shape[1]) if target[b, u] == j]
    assert torch.allclose(out[b, 1 + j], torch.stack(members).mean(0), atol=1e-6)
    assert torch.equal(index[:, :, 0], torch.cat([torch.zeros(2, 1, dtype=torch.long), kept + 1], 1))
    out.sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all()


def test_stage_from_epoch_and_activation():
    sel = TokenSelect([0, 100, 200], [0.5, 0.75, 1.0], 0.25, 2)
    assert [sel.update_current_stage(e) for e in (0, 99, 100, 199, 200, 299)] == [1, 1, 2, 2, 3, 3]
    sel.update_current_stage(0)
    x = torch.randn(1, 197, 8)
    assert sel.token_select(x)[1] is None  # sparse_inference off: no reduction
    assert TokenSelect([5], [0.5], 0.25).update_current_stage(3) == 0


@pytest.mark.parametrize('steps,keep,r0,msg', [
    ([0, 100, 200], [0.75, 0.5, 1.0], 0.25, 'non-decreasing'),
    ([0, 100], [0.5, 0.75, 1.0], 0.25, 'has 2 values'),
    ([0, 100, 200], [0.5, 0.75, 1.2], 0.25, '<= 1.0'),
    ([0, 100, 200], [0.5, 0.75, 1.0], 0.6, 'above the first --keep-rate'),
    ([100, 0, 200], [0.5, 0.75, 1.0], 0.25, 'non-decreasing epochs'),
])
def test_bad_schedules(steps, keep, r0, msg):
    with pytest.raises(ScheduleError, match=msg):
        check_schedule(steps, keep, r0)
    with pytest.raises(ScheduleError):
        TokenSelect(steps, keep, r0)
