"""tocom.compare: the ToMe and ToCom variants tools/compare.py measures, made by ToCom's own entry script."""
import argparse
import os

import pytest
import torch

from shared.compare_api import Context, MissingArtefact
from shared.models import create_model
from tocom import compare as hook


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


def hook_args(**kw):
    parser = argparse.ArgumentParser()
    hook.add_args(parser)
    return parser.parse_args([f'--{k.replace("_", "-")}={v}' for k, v in kw.items()])


def test_tome_and_tocom_variants(ctx):
    args = hook_args()
    tome = hook.variants('tome', ctx, args)
    tocom = hook.variants('tocom', ctx, args)
    assert [v.label for v in tome] == [v.label for v in tocom] == ['r=2', 'r=4']
    x = torch.randn(2, 3, 32, 32)
    for a, b in zip(tome, tocom):
        assert a.gflops == b.gflops  # the folded compensator is free
        assert a.model(x).shape == b.model(x).shape == (2, 10)
    assert tome[0].gflops > tome[1].gflops
    path = tocom[0].artefacts['tocom_path']
    stamp = os.path.getmtime(path)
    hook.variants('tocom', ctx, args)  # cached: not pre-trained again
    assert os.path.getmtime(path) == stamp


def test_missing_compensator(ctx, tmp_path):
    ctx.artefacts['tocom_path'] = str(tmp_path / 'nope.pth')
    with pytest.raises(MissingArtefact, match='nope.pth'):
        hook.variants('tocom', ctx, hook_args())
