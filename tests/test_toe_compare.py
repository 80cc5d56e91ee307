"""toe.compare: the ToE variant tools/compare.py measures, trained by ToE's own DeiT entry script."""
import argparse
import os

import pytest
import torch

from shared.flops import model_macs
from shared.models import create_model
from toe import compare as hook


@pytest.fixture
def ctx(compare_ctx):
    return compare_ctx


def hook_args(*argv):
    parser = argparse.ArgumentParser()
    hook.add_args(parser)
    return parser.parse_args(list(argv))


def test_schedule_scaling():
    assert hook.schedule(1, [0.5, 0.75, 1.0]) == (3, [0, 1, 2])
    assert hook.schedule(6, [0.5, 0.75, 1.0]) == (6, [0, 2, 4])
    assert hook.schedule(300, [0.5, 0.75, 1.0]) == (300, [0, 100, 200])  # the run script's own steps


def test_toe_variant_trained_through_the_deit_script(ctx):
    args = hook_args()
    [v] = hook.variants('toe', ctx, args)
    assert v.method == 'toe' and v.label == 'r=0.5/0.75/1'
    assert v.settings['expansion_step'] == [0, 1, 2]
    # the run script's schedule on the digits ViT's 64 patches, then all tokens
    assert v.extra['kept_tokens_per_epoch'] == [32, 48, 64]
    assert v.extra['total_train_time_s'] > 0 and v.extra['train_speedup_vs_full_tokens'] > 0
    base = create_model('vit_digits_patch4_32')
    base.load_state_dict(torch.load(ctx.base_checkpoint)['model'])
    assert type(v.model) is type(base)  # the plain ViT: all tokens at inference
    assert v.gflops == pytest.approx(model_macs(base) / 1e9)  # ToE adds nothing at inference
    assert any((a - b).abs().max() > 0 for a, b in zip(v.model.state_dict().values(), base.state_dict().values()))
    x = torch.randn(2, 3, 32, 32)
    assert v.model(x).shape == (2, 10)
    path = v.artefacts['checkpoint']
    stamp = os.path.getmtime(path)
    hook.variants('toe', ctx, args)  # cached: not trained again
    assert os.path.getmtime(path) == stamp


def test_bad_schedule_is_a_clear_error(ctx):
    with pytest.raises(SystemExit):
        hook.variants('toe', ctx, hook_args('--toe-keep-rates', '0.75', '0.5', '1.0'))
