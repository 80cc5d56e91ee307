"""toe.compare: the ToE variant tools/compare.py measures, trained by ToE's own DeiT entry script."""
import argparse
import os

import pytest
import torch

from shared.compare_api import Context
from shared.flops import model_macs
from shared.models import create_model
from toe import compare as hook


@pytest.fixture
def ctx(tmp_path):
    torch.manual_seed(0)
    base = tmp_path / 'baseline.pth'
    torch.save({'model': create_model('vit_digits_patch4_32').state_dict()}, base)
    data = argparse.Namespace(
        data_set='DIGITS', data_path='', input_size=32, batch_size=128, num_workers=0, pin_mem=False,
        eval_crop_ratio=1.0, color_jitter=0.3, aa='rand-m9-mstd0.5-inc1', train_interpolation='bicubic', reprob=0.0,
        remode='pixel', recount=1, repeated_aug=False, distributed=False, dist_eval=False, inat_category='name',
        seed=0, fake_size=256, fake_classes=10, ThreeAugment=False, src=False)
    return Context(base_checkpoint=str(base), model_name='vit_digits_patch4_32', model_kwargs={'num_classes': 10},
                   data_args=data, cache_dir=str(tmp_path / 'cache'), device=torch.device('cpu'), epochs=1,
                   quick=True)


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
