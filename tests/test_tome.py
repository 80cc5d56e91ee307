"""shared.tome: ToMe's matching, merging, proportional attention and the timm patch."""
import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from shared.backbones import UnsupportedBackbone
from shared.benchmark import peak_forward_memory_mb
from shared.tome import (apply_patch, bipartite_soft_matching, merge_source, merge_wavg, parse_r, size_attention)


def tiny_vit(img_size=32, depth=4, dist=False, **kw):
    torch.manual_seed(0)
    if dist:
        from timm.models.deit import VisionTransformerDistilled
        cls = VisionTransformerDistilled
    else:
        cls = VisionTransformer
    return cls(img_size=img_size, patch_size=4, embed_dim=32, depth=depth, num_heads=2, num_classes=5, **kw).eval()


# ---------------------------------------------------------------- parse_r
def test_parse_r_forms():
    assert parse_r(12, 8) == [8] * 12
    assert parse_r(4, [3, 2]) == [3, 2, 0, 0]
    sched = parse_r(12, (8, -1))  # decreasing schedule: 16 -> 0
    assert sched[0] == 16 and sched[-1] == 0 and sched == sorted(sched, reverse=True)
    assert parse_r(12, (8, 0)) == [8] * 12
    assert parse_r(12, (8, 1))[0] == 0 and parse_r(12, (8, 1))[-1] == 16
    pairs = [[3, 5]] * 12
    out = parse_r(12, pairs)
    assert out == pairs and out is not pairs  # a copy: blocks pop from it


# ---------------------------------------------------------------- hand-computed matching
def hand_case():
    # tokens: 0 = class (A), 1 (B), 2 (A), 3 (B), 4 (A)
    metric = torch.tensor([[[1., 0.], [0., 1.], [0., 1.], [1., 0.], [1., .5]]])
    x = torch.arange(5.).view(1, 5, 1) * 10  # features 0, 10, 20, 30, 40
    return metric, x


def test_matching_hand_computed_r1():
    metric, x = hand_case()
    # A->B cosines: token 2 vs 1 = 1.0, token 4 vs 3 = 0.894; class row is -inf -> token 2 merges into token 1
    merge, _ = bipartite_soft_matching(metric, 1, class_token=True)
    out, size = merge_wavg(merge, x)
    assert out.flatten().tolist() == [0., 40., 15., 30.]  # [unmerged A (class first, original order), B]
    assert size.flatten().tolist() == [1., 1., 2., 1.]


def test_matching_hand_computed_r2_and_cap():
    metric, x = hand_case()
    merge, _ = bipartite_soft_matching(metric, 2, class_token=True)
    out, size = merge_wavg(merge, x)
    assert out.flatten().tolist() == [0., 15., 35.]
    assert size.flatten().tolist() == [1., 2., 2.]
    # r is capped at half of the unprotected tokens: (5 - 1) // 2 = 2
    merge5, _ = bipartite_soft_matching(metric, 5, class_token=True)
    assert torch.equal(merge5(x, mode='sum'), merge(x, mode='sum'))


def test_unprotected_class_token_can_merge():
    metric, x = hand_case()
    metric[0, 0] = torch.tensor([0., 1.])  # token 0 now equals token 1
    merge, _ = bipartite_soft_matching(metric, 1, class_token=False)
    out, size = merge_wavg(merge, x)
    # token 0 and token 2 both score 1.0 with token 1; argsort is stable-free, so only check one of them merged there
    assert out.shape[1] == 4 and size.flatten().tolist().count(2.) == 1


def test_weighted_average_and_source_over_several_merges():
    torch.manual_seed(1)
    x0 = torch.randn(2, 17, 6)
    x, size, source = x0, None, None
    for r in (3, 4, 2):
        merge, unmerge = bipartite_soft_matching(x, r, class_token=True)
        source = merge_source(merge, x, source)
        x, size = merge_wavg(merge, x, size)
    assert x.shape[1] == 17 - 9
    assert torch.equal(size.squeeze(-1), source.sum(-1))                  # sizes count the source patches
    assert torch.all(size.sum(1) == 17)                                    # and sum to the input token count
    assert torch.allclose(x, (source @ x0) / size, atol=1e-6)              # each token is the mean of its patches
    assert torch.all(source[:, 0, 0] == 1) and torch.all(size[:, 0] == 1)  # class token untouched at index 0


def loop_reference_merge(metric, x, size, r, num_prefix):
    """ToMe's merge written per image with Python lists: even tokens (A) pick their most cosine-similar odd token (B),
    the r A tokens with the highest such similarity join it; the output is [kept A, B], each token the size-weighted
    mean of its group, with the group's summed size and the set of input tokens it holds. The first `num_prefix`
    tokens neither leave nor absorb anything and come first, in token order; the other kept A tokens follow in token
    order when there is a prefix, else in decreasing order of their best similarity."""
    out_x, out_size, out_groups = [], [], []
    for m, feats, sizes in zip(metric, x, size):
        unit = m / m.norm(dim=-1, keepdim=True)
        a_tokens, b_tokens = list(range(0, len(m), 2)), list(range(1, len(m), 2))
        similarity = unit[a_tokens] @ unit[b_tokens].T
        similarity[:, [j for j, token in enumerate(b_tokens) if token < num_prefix]] = float('-inf')
        best = [float('-inf') if a_tokens[i] < num_prefix else similarity[i].max().item()
                for i in range(len(a_tokens))]
        partner = [b_tokens[int(similarity[i].argmax())] for i in range(len(a_tokens))]
        ranked = sorted(range(len(a_tokens)), key=lambda i: -best[i])
        leaving, staying = ranked[:r], (sorted(ranked[r:]) if num_prefix else ranked[r:])
        groups = [[a_tokens[i]] for i in staying] + [[j] + [a_tokens[i] for i in leaving if partner[i] == j]
                                                     for j in b_tokens]
        groups = sorted((g for g in groups if g[0] < num_prefix)) + [g for g in groups if g[0] >= num_prefix]
        out_groups.append(groups)
        out_size.append(torch.stack([sizes[g].sum(0) for g in groups]))
        out_x.append(torch.stack([(feats[g] * sizes[g]).sum(0) / sizes[g].sum(0) for g in groups]))
    return torch.stack(out_x), torch.stack(out_size), out_groups


@pytest.mark.parametrize('num_prefix', [0, 1, 2, 5])
@pytest.mark.parametrize('tokens,r', [(17, 5), (24, 11), (9, 1), (14, 6)])
def test_merge_equals_per_image_loop(tokens, r, num_prefix):
    torch.manual_seed(tokens + r)
    metric, x = torch.randn(3, tokens, 6), torch.randn(3, tokens, 4)
    size = torch.randint(1, 4, (3, tokens, 1)).float()
    size[:, :num_prefix] = 1  # prefix tokens are never merged, so they stand for themselves only
    r = min(r, (tokens - num_prefix) // 2)  # the cap bipartite_soft_matching applies
    expected_x, expected_size, groups = loop_reference_merge(metric, x, size, r, num_prefix)
    if num_prefix <= 2:  # the class / distillation token keywords say the same as num_prefix
        merge, _ = bipartite_soft_matching(metric, r, class_token=num_prefix > 0, distill_token=num_prefix > 1)
    else:
        merge, _ = bipartite_soft_matching(metric, r, num_prefix=num_prefix)
    merged_x, merged_size = merge_wavg(merge, x, size)
    assert torch.equal(merged_size, expected_size)
    assert torch.allclose(merged_x, expected_x, atol=1e-6)  # same terms, summed in another order
    assert torch.equal(merged_x[:, :num_prefix], x[:, :num_prefix])  # prefix tokens untouched, in place
    source = merge_source(merge, x)
    for b, image_groups in enumerate(groups):
        assert [sorted(row.nonzero().flatten().tolist()) for row in source[b]] == [sorted(g) for g in image_groups]


@pytest.mark.parametrize('num_prefix', [0, 1, 2, 5])
def test_unmerge_sends_tokens_back(num_prefix):
    torch.manual_seed(2)
    x = torch.randn(2, 15, 4)
    merge, unmerge = bipartite_soft_matching(x, 4, num_prefix=num_prefix)
    source = merge_source(merge, x)
    merged = merge(x)
    restored = unmerge(merged)
    # each input position gets the merged token that holds it
    assert torch.equal(restored, source.transpose(1, 2) @ merged)
    assert torch.equal(restored[:, :num_prefix], x[:, :num_prefix])


# ---------------------------------------------------------------- proportional attention
def test_size_attention_fused_equals_explicit():
    torch.manual_seed(3)
    q, k, v = torch.randn(3, 2, 4, 7, 8).unbind(0)
    size = torch.randint(1, 5, (2, 7, 1)).float()
    fused = size_attention(q, k, v, size, 8 ** -0.5, fused=True)
    explicit = size_attention(q, k, v, size, 8 ** -0.5, fused=False)
    by_hand = (((q @ k.transpose(-1, -2)) * 8 ** -0.5 + size.log()[:, None, None, :, 0]).softmax(-1)) @ v
    assert (fused - explicit).abs().max() < 1e-5
    assert (explicit - by_hand).abs().max() < 1e-5
    # a key of size s weighs like s copies of a size-1 key
    plain = size_attention(q, k, v, None, 8 ** -0.5)
    assert not torch.allclose(plain, fused)


# ---------------------------------------------------------------- the timm patch
def test_patch_r0_equals_plain_vit():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    patched = apply_patch(copy.deepcopy(model))
    assert patched.r == 0
    assert torch.equal(patched(x), ref)


@pytest.mark.parametrize('r', [1, 4, 100])
def test_patch_fused_equals_explicit_and_tokens(r):
    model = apply_patch(tiny_vit(), trace_source=True)
    model.r = r
    x = torch.randn(2, 3, 32, 32)
    fused = model(x)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    explicit = model(x)
    assert (fused - explicit).abs().max() < 1e-5
    n = 65
    for _ in range(4):
        n -= min(r, (n - 1) // 2)
    info = model._tome_info
    assert info['size'].shape == (2, n, 1) and torch.all(info['size'].sum(1) == 64 + 1)
    assert info['source'].shape == (2, n, 65) and torch.all(info['source'][:, 0, 0] == 1)


def test_deit_b_geometry_token_counts():
    # 197 tokens, 12 layers: r=8 ends with 101 tokens, r=16 with 11 (last layer capped at (21-1)//2 = 10)
    torch.manual_seed(0)
    model = apply_patch(VisionTransformer(img_size=224, patch_size=16, embed_dim=16, depth=12, num_heads=1,
                                          num_classes=3).eval())
    x = torch.randn(1, 3, 224, 224)
    for r, n in ((8, 101), (16, 11)):
        model.r = r
        model(x)
        assert model._tome_info['size'].shape[1] == n
    model.r = (16, -1)  # decreasing schedule: count follows parse_r with the cap at half
    model(x)
    n = 197
    for r in parse_r(12, (16, -1)):
        n -= min(r, (n - 1) // 2)
    assert model._tome_info['size'].shape[1] == n


def test_distill_token_protected():
    model = apply_patch(tiny_vit(dist=True), trace_source=True)
    assert model._tome_info['distill_token'] and model._tome_info['class_token']
    model.r = 8
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5)
    src = model._tome_info['source']
    assert torch.all(src[:, 0, 0] == 1) and torch.all(src[:, 1, 1] == 1)
    assert torch.all(model._tome_info['size'][:, :2] == 1)


def test_per_layer_list_and_grad():
    model = apply_patch(tiny_vit())
    model.train()
    model.r = [4, 0, 8]
    out = model(torch.randn(2, 3, 32, 32))
    assert model._tome_info['r'] == []  # every block popped its entry
    assert model._tome_info['size'].shape[1] == 65 - 4 - 8
    out.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def block_peak_mb(block, x):
    return peak_forward_memory_mb(lambda: block(x), 'cpu')


def test_patched_block_peak_memory_not_above_timm_at_r0():
    # The CPU tracker counts tensor storages through the dispatcher and frees them by reference count, so the same
    # forward gives the same figure every time. C = 128 with 17 tokens: the MLP (10 [B, N, C] tensors at its peak) is
    # the block's peak; holding the attention output through it would add an eleventh.
    torch.manual_seed(0)
    plain = VisionTransformer(img_size=16, patch_size=4, embed_dim=128, depth=1, num_heads=2, num_classes=3).eval()
    patched = apply_patch(copy.deepcopy(plain))
    x = torch.randn(16, 17, 128)
    timm_peak = block_peak_mb(plain.blocks[0], x)
    assert block_peak_mb(plain.blocks[0], x) == timm_peak
    patched._tome_info.update(r=[0], size=None, source=None)
    patched_peak = block_peak_mb(patched.blocks[0], x)
    assert patched_peak <= timm_peak
    with torch.no_grad():
        patched._tome_info.update(r=[0], size=None, source=None)
        assert torch.equal(patched.blocks[0](x), plain.blocks[0](x))


def test_patch_rejects_unsupported_backbones():
    # ToMe#40: a model without `.blocks` is refused by name, not patched into silence
    with pytest.raises(UnsupportedBackbone, match=r'ToMe cannot be applied to Linear: .*no `\.blocks`'):
        apply_patch(torch.nn.Linear(2, 2))
    model = tiny_vit()
    model.set_grad_checkpointing(True)
    with pytest.raises(UnsupportedBackbone, match='gradient checkpointing'):
        apply_patch(model)
