"""tocom.compare: the ToMe and ToCom variants tools/compare.py measures, made by ToCom's own entry script."""
import argparse
import os

import pytest
import torch

from shared.compare_api import MissingArtefact
from tocom import compare as hook


@pytest.fixture
def ctx(compare_ctx):
    return compare_ctx


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
