"""tavt.measure's benchmark baseline: timm's ViT holding the TAVT model's weights gives its full-gene logits."""
import argparse

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from tavt import measure
from tavt.models.modeling import build_model


@pytest.mark.parametrize('split', ['non-overlap', 'overlap'])
def test_plain_timm_model_matches_the_full_gene(split):
    torch.manual_seed(0)
    model = build_model('tiny-test', 64, 7, zero_head=False, split=split, slide_step=12).eval()
    plain = measure.plain_timm_model(model).eval()
    assert type(plain) is VisionTransformer
    assert plain.pos_embed.shape[1] == model.num_tokens
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(x), plain(x)
    assert (expected - got).abs().max() < 1e-5


def test_benchmark_times_timm_full_and_gene():
    parser = argparse.ArgumentParser()
    measure.add_benchmark_args(parser)
    args = parser.parse_args(['--model_type', 'tiny-test', '--img_size', '64', '--num_classes', '7', '--config',
                              'lower', '--batch_size', '2', '--device', 'cpu', '--rounds', '2', '--runs', '1',
                              '--warmup', '0'])
    out = measure.benchmark(args)
    assert out['timm']['speedup_spread']['max'] == 1.0 and out['tavt']['gflops'] < out['full']['gflops']
    assert out['speedup'] == out['tavt']['speedup_spread']['median']
