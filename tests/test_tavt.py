"""TAVT: patch drop, samplers, MACs, search bookkeeping (tiny random-weight models, CPU)."""
import math

import pytest
import torch

from tavt.length_drop import sample_layer_configuration, sample_length_configuration
from tavt.models.modeling import GeneError, build_model, gene_macs, select_tokens

LOWER_785 = (628, 503, 403, 323, 259, 208, 167, 134, 108, 87, 70, 56)


def tiny(img_size=64, num_classes=10, seed=0):
    torch.manual_seed(seed)
    model = build_model('tiny-test', img_size, num_classes, zero_head=False)
    for p in model.parameters():  # non-trivial weights everywhere (the default init has zero pos-embed and cls)
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def test_lower_gene_for_785_tokens():
    assert sample_length_configuration(785, 12, length_drop_ratio=0.2) == LOWER_785


def test_full_gene_equals_plain_vit():
    model = tiny()
    x = torch.randn(3, 3, 64, 64)
    n = model.num_tokens  # (64/16)^2 + 1
    assert n == 17
    with torch.no_grad():
        plain = model(x)
        full = model(x, length_config=(n,) * 12)
    assert torch.allclose(plain, full, atol=1e-5)
    assert (plain - full).abs().max() < 1e-5


def test_gene_keeps_counted_tokens_and_class_token():
    model = tiny()
    gene = (15, 12, 12, 10, 8, 8, 6, 5, 4, 3, 2, 2)
    seen = []
    hooks = [blk.ffn.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
             for blk in model.transformer.encoder.layer]
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64), length_config=gene)
    for h in hooks:
        h.remove()
    assert tuple(seen) == gene


def test_select_tokens_ranks_by_attention_received():
    x = torch.arange(5, dtype=torch.float).view(1, 5, 1)
    probs = torch.zeros(1, 2, 5, 5)
    probs[..., 3] = 1.0   # every query of every head attends token 3 most
    probs[0, 0, :, 1] = 0.5
    probs[0, 0, :, 0] = 9.0  # the class token's score is ignored: it is always kept first
    kept, keep = select_tokens(x, probs, 3)
    assert keep.tolist() == [[0, 3, 1]]
    assert kept.flatten().tolist() == [0.0, 3.0, 1.0]


def test_layer_config_skips_layers():
    model = tiny()
    calls = []
    hooks = [blk.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
             for k, blk in enumerate(model.transformer.encoder.layer)]
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64), layer_config=(0, 2, 5))
    for h in hooks:
        h.remove()
    assert calls == [0, 2, 5]


def test_restore_does_not_change_logits():
    model = tiny()
    gene = sample_length_configuration(17, 12, length_drop_ratio=0.2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = model(x, length_config=gene)
        model.transformer.encoder.restore_dropped = False
        b = model(x, length_config=gene)
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize('gene, words', [
    ((18,) * 12, 'exceeds'),
    ((17, 15, 16) + (2,) * 9, 'increases'),
    ((17,) * 11, 'entries'),
])
def test_bad_gene_is_a_clear_error(gene, words):
    model = tiny()
    with pytest.raises(GeneError, match=words):
        model.set_length_config(gene)
    with pytest.raises(GeneError, match=words):
        model(torch.randn(1, 3, 64, 64), length_config=gene)


def test_samplers_are_monotone_and_bounded():
    import numpy as np
    np.random.seed(0)
    for _ in range(50):
        lc = sample_layer_configuration(12, layer_dropout_prob=0.2)
        gene = sample_length_configuration(785, 12, lc, length_drop_ratio_bound=0.2)
        prev = 785
        for i, g in enumerate(gene):
            assert 2 <= g <= prev
            if i not in lc:
                assert g == prev
            else:
                assert g >= math.ceil(prev * 0.8)
            prev = g
    assert sample_layer_configuration(12, layer_dropout=0) == tuple(range(12))
    assert sample_layer_configuration(12) is None


def test_reference_macs_vit_b16_448():
    model = build_model('ViT-B_16', 448, 200, zero_head=True)
    assert abs(gene_macs(model) / 1e9 - 78.495) < 1e-3
    assert abs(gene_macs(model, LOWER_785) / 1e9 - 25.662) < 1e-3
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 86.40) < 0.01


def test_macs_match_flop_counter_on_tiny_model():
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny()
    gene = (15, 12, 12, 10, 8, 8, 6, 5, 4, 3, 2, 2)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randn(1, 3, 64, 64), length_config=gene)
    counted = counter.get_total_flops() / 2
    c = model.config.hidden_size
    # the counter sees the patch embedding without the class slot the project's convention counts
    assert abs(counted - (gene_macs(model, gene) - c * 3 * 16 * 16)) < 1
