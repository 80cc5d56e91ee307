"""tocom.compare: the ToMe and ToCom variants tools/compare.py measures, made by ToCom's own entry script, and the
compensator shipped for the embedded default."""
import argparse
import hashlib
import os
import re

import pytest
import torch

from shared.compare_api import Context, MissingArtefact, make_data_args
from tocom import compare as hook
from tocom.models import add_compensator, compensator_state_dict, set_r

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_ROOT = os.path.join(ROOT, 'shared', 'assets', 'compare')
SHIPPED_BASELINE = os.path.join(ROOT, 'shared', 'assets', 'vit_digits_patch4_32.pth')


@pytest.fixture
def ctx(compare_ctx):
    return compare_ctx


def hook_args(**kw):
    parser = argparse.ArgumentParser()
    hook.add_args(parser)
    return parser.parse_args([f'--{k.replace("_", "-")}={v}' for k, v in kw.items()])


def embedded_ctx(cache_dir, shipped_root=SHIPPED_ROOT, base=SHIPPED_BASELINE, **kw):
    """The context tools/compare.py builds for the embedded default (no --epochs, not quick)."""
    return Context(base_checkpoint=str(base), model_name='vit_digits_patch4_32',
                   model_kwargs={'num_classes': 10, 'img_size': 32}, data_args=make_data_args(),
                   cache_dir=str(cache_dir), device=torch.device('cpu'), shipped_root=str(shipped_root), **kw)


def test_tome_and_tocom_variants(ctx):
    args = hook_args()
    tome = hook.variants('tome', ctx, args)
    tocom = hook.variants('tocom', ctx, args)
    assert [v.label for v in tome] == [v.label for v in tocom] == ['r=3', 'r=4', 'r=5']
    x = torch.randn(2, 3, 32, 32)
    for a, b in zip(tome, tocom):
        assert a.gflops == b.gflops == pytest.approx(hook.tome_gflops(ctx, a.settings['r']), abs=0)
        assert a.model(x).shape == b.model(x).shape == (2, 10)
    assert tome[0].gflops > tome[1].gflops > tome[2].gflops
    path = tocom[0].artefacts['tocom_path']
    # the cached file holds the compensator only: 12 blocks x (q, v) x (down, up), hidden 2 x 5 steps
    state = torch.load(path, weights_only=True)['model']
    assert len(state) == 48 and all('_tocom.adapter_' in k for k in state)
    assert state['blocks.0.attn.q_tocom.adapter_down.weight'].shape == (10, 64)
    stamp = os.path.getmtime(path)
    hook.variants('tocom', ctx, args)  # cached: not pre-trained again
    assert os.path.getmtime(path) == stamp


def test_missing_compensator(ctx, tmp_path):
    ctx.artefacts['tocom_path'] = str(tmp_path / 'nope.pth')
    with pytest.raises(MissingArtefact, match='nope.pth'):
        hook.variants('tocom', ctx, hook_args())


class Trained(Exception):
    """Raised by the stand-in for tocom/main.py's main: the hook decided to pre-train."""


@pytest.fixture
def fake_shipped(tmp_path, compare_ctx, monkeypatch):
    """A shipped folder, under a temporary shipped root, holding a random compensator for the default settings;
    pre-training raises `Trained` instead of running."""
    import tocom.main

    def no_training(args):
        raise Trained(args.output_dir)

    monkeypatch.setattr(tocom.main, 'main', no_training)
    ctx = embedded_ctx(tmp_path / 'cache', tmp_path / 'shipped', base=compare_ctx.base_checkpoint)
    folder = tmp_path / 'shipped' / 'tocom' / hook.artefact_name(ctx, hook_args(), max(hook.DEFAULT_R))
    folder.mkdir(parents=True)
    torch.manual_seed(1)
    donor = add_compensator(hook._tome_model(ctx), 10, 0.1, 5)
    for p in donor.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    weights = compensator_state_dict(donor)
    torch.save({'model': weights}, folder / hook.COMPENSATOR_FILE)
    (folder / 'done').touch()
    return ctx, folder, donor


def listing(folder):
    return sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir())


def test_shipped_compensator_is_loaded_not_retrained(fake_shipped):
    ctx, folder, donor = fake_shipped
    before = listing(folder)
    variants = hook.variants('tocom', ctx, hook_args())
    assert listing(folder) == before and not os.path.exists(ctx.cache_dir)  # read only, nothing trained or cached
    x = torch.randn(4, 3, 32, 32)
    plain = hook._tome_model(ctx)
    for v in variants:
        assert v.artefacts['tocom_path'] == str(folder / hook.COMPENSATOR_FILE)
        r = v.settings['r_tgt']
        set_r(donor, r, 0)  # the donor's own adapters, run unfolded: an independent path to the same function
        plain.r = r
        with torch.no_grad():
            got, expected, uncompensated = v.model(x), donor.eval()(x), plain(x)
        assert torch.allclose(got, expected, atol=1e-5, rtol=0)
        assert (got - uncompensated).abs().max() > 1e-3  # and the compensation is not nothing


@pytest.mark.parametrize('change', [dict(retrain=True), dict(epochs=3), dict(args=dict(tocom_lr=5e-3)),
                                    dict(args=dict(tocom_scale=0.05)), dict(args=dict(tome_r='6'))])
def test_shipped_compensator_ignored_under_other_settings(fake_shipped, change):
    ctx, folder, _ = fake_shipped
    before = listing(folder)
    for field in ('retrain', 'epochs'):
        if field in change:
            setattr(ctx, field, change[field])
    with pytest.raises(Trained) as trained:
        hook.variants('tocom', ctx, hook_args(**change.get('args', {})))
    assert str(trained.value).startswith(os.path.join(ctx.cache_dir, 'tocom'))
    assert listing(folder) == before


def shipped_folders(method):
    root = os.path.join(SHIPPED_ROOT, method)
    return sorted(os.path.join(root, d) for d in os.listdir(root)) if os.path.isdir(root) else []


def check_readme_hashes(folder):
    """Every file of a shipped folder (README.md and done aside) is named in its README with its SHA-256."""
    with open(os.path.join(folder, 'README.md')) as f:
        listed = dict((name, digest) for digest, name in re.findall(r'\b([0-9a-f]{64})\s+`?([\w.-]+)`?', f.read()))
    files = sorted(set(os.listdir(folder)) - {'README.md', 'done'})
    assert files and sorted(listed) == files
    for name in files:
        with open(os.path.join(folder, name), 'rb') as f:
            assert hashlib.sha256(f.read()).hexdigest() == listed[name], name


def test_shipped_compensator_matches_its_readme_and_the_defaults(tmp_path):
    folders = shipped_folders('tocom')
    assert len(folders) == 1
    check_readme_hashes(folders[0])
    assert os.listdir(folders[0]) and os.path.isfile(os.path.join(folders[0], 'done'))
    assert sorted(os.listdir(folders[0])) == ['README.md', hook.COMPENSATOR_FILE, 'done']
    # the embedded default picks it: same name as the defaults give
    ctx = embedded_ctx(tmp_path)
    path = hook._pretrain_compensator(ctx, hook_args(), max(hook.DEFAULT_R))
    assert path == os.path.join(folders[0], hook.COMPENSATOR_FILE) and not os.path.exists(tmp_path / 'tocom')
