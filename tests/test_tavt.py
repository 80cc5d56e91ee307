"""TAVT: patch drop, samplers, MACs, search bookkeeping (tiny random-weight models, CPU)."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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


# ---- npz loading, checkpoints, entry script

def _tiny_from_npz(path, img_size, zero_head=True, num_classes=10):
    model = build_model('tiny-test', img_size, num_classes, zero_head=zero_head)
    model.load_from(path)
    return model.eval()


def test_npz_equals_timm_loader(tmp_path):
    import timm
    from timm.models.vision_transformer import _load_weights
    from tavt_helpers import write_random_npz
    path = str(tmp_path / 'w.npz')
    write_random_npz(path, grid=4, num_classes=10)
    ours = _tiny_from_npz(path, 64, zero_head=False)
    ref = timm.models.vision_transformer.VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=12,
                                                           num_heads=2, mlp_ratio=2.0, num_classes=10).eval()
    _load_weights(ref, path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() < 1e-5


def test_npz_posembed_resize_is_bilinear_align_corners(tmp_path):
    import numpy as np
    from scipy import ndimage
    from tavt_helpers import write_random_npz
    path = str(tmp_path / 'w.npz')
    arrays = write_random_npz(path, grid=2)
    model = _tiny_from_npz(path, 64)  # grid 2 -> 4
    grid = arrays['Transformer/posembed_input/pos_embedding'][0, 1:].reshape(2, 2, -1)
    expected = ndimage.zoom(grid, (2, 2, 1), order=1).reshape(16, -1)  # the original's resampling
    got = model.transformer.embeddings.position_embeddings[0, 1:].detach().numpy()
    assert np.abs(got - expected).max() < 1e-5
    assert torch.count_nonzero(model.head.weight) == 0  # zero_head: the npz head is ignored


def test_npz_of_another_architecture_names_keys(tmp_path):
    from tavt.models.npz import NpzMismatchError
    from tavt_helpers import write_random_npz
    path = str(tmp_path / 'w.npz')
    write_random_npz(path, hidden=48, heads=2, mlp=64, grid=4)
    with pytest.raises(NpzMismatchError, match='patch_embeddings.weight'):
        _tiny_from_npz(path, 64)
    write_random_npz(path, layers=6, grid=4)
    with pytest.raises(NpzMismatchError, match='6 encoder blocks'):
        _tiny_from_npz(path, 64)


def _run(tmp_path, monkeypatch, *extra):
    from tavt import train
    monkeypatch.chdir(tmp_path)
    train.main(['--model_type', 'tiny-test', '--pretrained_dir', 'w.npz', '--data_root', 'data', '--img_size', '64',
                '--max_seq_length', '17', '--train_batch_size', '4', '--eval_batch_size', '4', '--num_workers', '0',
                '--warmup_steps', '1', *extra])


def test_three_readme_runs_single_process(tmp_path, monkeypatch):
    from tavt.evolution import DUMMY_BATCH, read_population
    from tavt.measure import parse_gene
    from tavt_helpers import write_cub, write_random_npz
    write_random_npz(str(tmp_path / 'w.npz'), grid=2)
    write_cub(str(tmp_path / 'data'))
    _run(tmp_path, monkeypatch, '--name', 'base', '--num_steps', '4', '--eval_every', '2')
    assert (tmp_path / 'output' / 'base_checkpoint.bin').is_file()
    _run(tmp_path, monkeypatch, '--name', 'ad', '--num_steps', '6', '--eval_every', '3', '--do_distil',
         '--pretrained_model', 'output/base_checkpoint.bin')
    assert (tmp_path / 'output' / 'ad_checkpoint.bin').is_file()
    _run(tmp_path, monkeypatch, '--name', 'ad', '--do_search', '--pretrained_model', 'output/ad_checkpoint.bin',
         '--evo_iter', '1', '--population_size', '3', '--mutation_size', '2', '--crossover_size', '2')
    frontier = read_population(str(tmp_path / 'evo' / 'ad' / 'population-iter1.tsv'))
    assert frontier[-1][0] == (17,) * 12
    model = build_model('tiny-test', 64, 200)
    for gene, macs, score in frontier:
        assert 0 <= score <= 1
        assert macs == round(gene_macs(model, gene) * DUMMY_BATCH)
        assert parse_gene(str(gene), 17, 12) == gene
    assert [m for _, m, _ in frontier] == sorted(m for _, m, _ in frontier)


def test_bad_inputs_stop_clearly(tmp_path, monkeypatch):
    from tavt_helpers import write_cub, write_random_npz
    write_random_npz(str(tmp_path / 'w.npz'), grid=2)
    write_cub(str(tmp_path / 'data'))
    with pytest.raises(ValueError, match='--max_seq_length 17'):
        _run(tmp_path, monkeypatch, '--name', 'x', '--max_seq_length', '785')
    with pytest.raises(FileNotFoundError, match='nope.npz'):
        _run(tmp_path, monkeypatch, '--name', 'x', '--pretrained_dir', 'nope.npz')
    with pytest.raises(Exception, match='missing.bin'):
        _run(tmp_path, monkeypatch, '--name', 'x', '--pretrained_model', 'missing.bin')
