"""shared.tome: ToMe's matching, merging, proportional attention and the timm patch."""
import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

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


def test_unmerge_restores_shape():
    torch.manual_seed(2)
    x = torch.randn(1, 9, 4)
    merge, unmerge = bipartite_soft_matching(x, 3, class_token=True)
    y = unmerge(merge(x))
    assert y.shape == x.shape and torch.equal(y[:, 0], x[:, 0])


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


def test_patch_rejects_non_vit():
    with pytest.raises(TypeError, match='VisionTransformer'):
        apply_patch(torch.nn.Linear(2, 2))
