"""shared/presets.py: the ImageNet presets of tools/compare.py refuse missing or corrupt weight files (naming each file,
its expected path and its source), fill the compare flags, and give the reported numbers of exactly the reported
settings. Generated ImageNet-layout data and random weights only: these check the machinery, not the numbers."""
import argparse
import dataclasses
import hashlib
import json
import os

import pytest
import torch
from PIL import Image

from diffrate import schedules
from shared import presets
from shared.errors import UserError


def make_imagenet(root, classes=('n01440764', 'n01443537'), per_class=2, size=40):
    """train/ and val/ with one sub-folder of small JPEGs per class, as ImageNet is laid out."""
    gen = torch.Generator().manual_seed(0)
    for split in ('train', 'val'):
        for c in classes:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(os.path.join(root, split, c, f'{c}_{i}.JPEG'))
    return str(root)


def sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def random_weights(path, seed=0):
    torch.manual_seed(seed)
    torch.save({'model': {'w': torch.randn(8, 8)}}, path)
    return str(path)


def args_for(preset, weights_dir, data_path='imagenet', **given):
    values = dict(preset=preset, weights_dir=str(weights_dir), data_path=data_path, methods=None, model=None,
                  checkpoint='', input_size=None, tome_r=None, target_flops=None, diffrate_schedule_path=None,
                  tocom_path='', avit_checkpoint='', toe_checkpoint='')
    values.update(given)
    return argparse.Namespace(**values)


def self_hashed(preset, weights_dir):
    """`preset` with its baseline file renamed to a random-weight file's own SHA-256 prefix (the official hash cannot
    be met by a generated file), and every other file it needs written with random weights."""
    tmp = random_weights(os.path.join(weights_dir, 'tmp.pth'))
    name = preset.baseline.name.rsplit('-', 1)[0] + f'-{sha256(tmp)[:8]}.pth'
    os.replace(tmp, os.path.join(weights_dir, name))
    renamed = dataclasses.replace(preset, baseline=dataclasses.replace(preset.baseline, name=name))
    for i, f in enumerate(renamed.artefacts):
        random_weights(os.path.join(weights_dir, f.name), seed=i + 1)
    return renamed


def test_hash_prefix_of_names():
    assert presets.hash_prefix('deit_small_patch16_224-cd65a155.pth') == 'cd65a155'
    assert presets.hash_prefix('deit_base_patch16_224-b5f2ef4d.pth') == 'b5f2ef4d'
    # A-ViT's names carry the gate parameters, MAE's and ToMe's no hash at all
    for name in ('small-10-75.pth', 'mae_finetuned_vit_base.pth', 'f367470145_deit_S_r13.pth'):
        assert presets.hash_prefix(name) is None


def test_deit_names_match_their_urls():
    for name in ('deit_tiny_imagenet', 'deit_small_imagenet', 'deit_base_imagenet'):
        base = presets.PRESETS[name].baseline
        assert base.source == f'https://dl.fbaipublicfiles.com/deit/{base.name}'
        assert base.released and presets.hash_prefix(base.name)


@pytest.mark.parametrize('methods', [None, 'tome,diffrate,avit,tocom,toe'])
def test_missing_files_are_all_named_with_path_and_source(tmp_path, methods):
    preset = presets.PRESETS['deit_small_imagenet']
    with pytest.raises(UserError) as e:
        presets.apply_preset(args_for('deit_small_imagenet', tmp_path, methods=methods))
    message = str(e.value)
    wanted = preset.files(methods.split(',') if methods else preset.methods)
    assert len(wanted) == (2 if methods is None else 4)
    assert f'{len(wanted)} file(s) missing' in message
    for f in wanted:
        assert f.name in message
        assert str(tmp_path / f.name) in message
        assert f.source.split()[0] in message
    assert 'https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth' in message
    assert 'drive.google.com' in message  # A-ViT's released weights
    if methods:
        assert 'tocom/main.py' in message and 'toe/deit/main.py' in message  # nothing released: how to make them
        # the baseline path is spelled out in the ToCom command
        assert f'--finetune {tmp_path / preset.baseline.name}' in message


def test_only_the_missing_file_is_named(tmp_path):
    random_weights(tmp_path / 'small-10-75.pth')
    with pytest.raises(UserError) as e:
        presets.apply_preset(args_for('deit_small_imagenet', tmp_path))
    assert '1 file(s) missing' in str(e.value)
    assert 'deit_small_patch16_224-cd65a155.pth' in str(e.value) and 'small-10-75.pth' not in str(e.value)


def test_hash_mismatch_is_refused_naming_the_file(tmp_path):
    path = random_weights(tmp_path / 'deit_small_patch16_224-cd65a155.pth')
    random_weights(tmp_path / 'small-10-75.pth', seed=1)
    assert not sha256(path).startswith('cd65a155')
    with pytest.raises(UserError) as e:
        presets.apply_preset(args_for('deit_small_imagenet', tmp_path))
    assert path in str(e.value) and 'cd65a155' in str(e.value) and sha256(path)[:16] in str(e.value)


def test_fills_the_compare_args(tmp_path):
    preset = self_hashed(presets.PRESETS['deit_small_imagenet'], tmp_path)
    args = args_for(preset, tmp_path, data_path='/data/imagenet', cache_dir=str(tmp_path / 'cache'))
    presets.apply_preset(args)
    assert args.data_set == 'IMNET' and args.data_path == '/data/imagenet'
    assert args.model == 'deit_small_patch16_224' and args.input_size == 224 and args.model_kwargs == {}
    assert args.checkpoint == str(tmp_path / preset.baseline.name)
    assert args.avit_checkpoint == str(tmp_path / 'small-10-75.pth')
    assert args.methods == 'tome,diffrate,avit'
    assert args.tome_r == [8, 13, 16]
    assert args.tocom_path == '' and args.toe_checkpoint == ''
    # DiffRate: the shipped ViT-S-DeiT schedules, unchanged, under the timm name compare builds
    with open(args.diffrate_schedule_path) as f:
        written = json.load(f)
    shipped = schedules.read_table(schedules.SHIPPED_PATH)['ViT-S-DeiT']
    assert written == {'deit_small_patch16_224': shipped}
    assert args.target_flops == [2.3, 2.5, 2.7, 2.9, 3.1]


def test_user_flags_are_kept_and_defaults_filled(tmp_path):
    preset = self_hashed(presets.PRESETS['deit_small_imagenet'], tmp_path)
    parser = argparse.ArgumentParser()
    parser.add_argument('--tome-r', type=int, nargs='+', default=[2, 4])
    parser.add_argument('--target-flops', type=float, nargs='+', default=None)
    # the user's --r and --target-flops stay; only ToMe and DiffRate run, so A-ViT's file is not needed
    os.remove(tmp_path / 'small-10-75.pth')
    args = args_for(preset, tmp_path, methods='tome,diffrate', tome_r=[4, 8], target_flops=[2.9],
                    cache_dir=str(tmp_path / 'cache'))
    presets.apply_preset(args, parser)
    assert args.tome_r == [4, 8] and args.target_flops == [2.9] and args.methods == 'tome,diffrate'
    assert args.avit_checkpoint == ''
    # a value still at the parser's default counts as not given
    args = args_for(preset, tmp_path, methods='tome', tome_r=[2, 4])
    presets.apply_preset(args, parser)
    assert args.tome_r == [8, 13, 16]


def test_a_backbone_flag_the_preset_would_replace_is_refused(tmp_path):
    preset = self_hashed(presets.PRESETS['deit_small_imagenet'], tmp_path)
    parser = argparse.ArgumentParser()
    parser.add_argument('--model', default='vit_digits_patch4_32')
    parser.add_argument('--checkpoint', default='')
    cases = {'model': 'deit_base_patch16_224', 'checkpoint': str(tmp_path / 'mine.pth')}
    for dest, value in cases.items():
        args = args_for(preset, tmp_path, cache_dir=str(tmp_path / 'cache'), **{**dict.fromkeys(cases, None),
                                                                                  dest: value})
        with pytest.raises(UserError, match=f'--{dest} {value} conflicts with --preset'):
            presets.apply_preset(args, parser)
    # the same value as the preset's, or the parser's default, is no conflict
    args = args_for(preset, tmp_path, cache_dir=str(tmp_path / 'cache'), model='deit_small_patch16_224',
                    checkpoint='')
    assert presets.apply_preset(args, parser).checkpoint == str(tmp_path / preset.baseline.name)


def test_user_made_files_join_the_default_methods(tmp_path):
    preset = self_hashed(presets.PRESETS['deit_small_imagenet'], tmp_path)
    toe = random_weights(tmp_path / 'toe_deit_small_patch16_224.pth', seed=5)
    args = args_for(preset, tmp_path, cache_dir=str(tmp_path / 'cache'))
    presets.apply_preset(args)
    assert args.methods == 'tome,diffrate,avit,toe' and args.toe_checkpoint == toe and args.tocom_path == ''


def test_bad_requests(tmp_path):
    with pytest.raises(UserError, match='unknown --preset .*deit_small_imagenet'):
        presets.apply_preset(args_for('deit_huge', tmp_path))
    with pytest.raises(UserError, match='needs --weights-dir'):
        presets.apply_preset(args_for('deit_small_imagenet', ''))
    with pytest.raises(UserError, match='needs --data-path'):
        presets.apply_preset(args_for('deit_small_imagenet', tmp_path, data_path=''))
    # TAVT is fine-grained: no ImageNet setting
    with pytest.raises(UserError, match='no setting for tavt'):
        presets.apply_preset(args_for('deit_small_imagenet', tmp_path, methods='tome,tavt'))


def test_mae_preset_builds_the_fine_tuned_classifier():
    # MAE's fine-tuned ViT-B averages the patch tokens through fc_norm and has no final norm, so that its checkpoint's
    # `model` dict (fc_norm.*, no norm.*) loads as it is
    from shared.models import create_model
    preset = presets.PRESETS['mae_base_imagenet']
    assert preset.baseline.source == 'https://dl.fbaipublicfiles.com/mae/finetune/mae_finetuned_vit_base.pth'
    model = create_model(preset.model, **preset.model_kwargs, depth=1)  # one block: the head is what matters here
    keys = set(model.state_dict())
    assert {'fc_norm.weight', 'fc_norm.bias'} <= keys and not {'norm.weight', 'norm.bias'} & keys
    assert model.global_pool == 'avg' and model.fc_norm.eps == 1e-6 and model.embed_dim == 768


def row(method, label, **settings):
    return {'method': method, 'label': label, 'settings': settings, 'weights': {}}


def test_paper_reference_tome_deit_small():
    # ToMe's paper (DeiT-S trained with ToMe) r=8/13/16; its README's deit_S_r13 checkpoint gives 79.36 at r=13
    expected = {8: (79.7, 3.4), 13: (79.4, 2.7), 16: (79.1, 2.3)}
    for r, (acc1, gflops) in expected.items():
        ref = presets.paper_reference('deit_small_imagenet', row('tome', f'r={r}', r=r, prop_attn=True))
        assert (ref['acc1'], ref['gflops']) == (acc1, gflops)
        assert 'ToMe' in ref['source'] and 'trains DeiT-S with ToMe' in ref['note']
    assert round(79.36, 1) == expected[13][0]
    # matched from the label when the settings lack the key
    assert presets.paper_reference('deit_small_imagenet', row('tome', 'r=16'))['acc1'] == 79.1
    # settings no source reports
    assert presets.paper_reference('deit_small_imagenet', row('tome', 'r=4', r=4)) is None
    assert presets.paper_reference('deit_base_imagenet', row('tome', 'r=8', r=8)) is None
    assert presets.paper_reference('deit_small_imagenet', row('tocom', 'r=8', r_tgt=8)) is None


def test_paper_reference_diffrate_avit_baseline():
    from diffrate.measure import schedule_gflops
    ref = presets.paper_reference('deit_small_imagenet', row('diffrate', 'target=2.9', target_flops=2.9))
    assert (ref['acc1'], ref['gflops']) == (79.538, 2.905) and 'DiffRate README' in ref['source']
    # the README's flops agree with DiffRate's formula on the shipped schedule
    prune, merge = schedules.lookup('vit_deit_small_patch16_224', 2.9, schedules.SHIPPED_PATH)
    assert round(schedule_gflops('vit_deit_small_patch16_224', prune, merge), 3) == ref['gflops']
    assert presets.paper_reference('deit_small_imagenet', row('diffrate', 'target=2.5', target_flops=2.5)) is None
    for preset, acc1 in (('deit_base_imagenet', 81.498), ('mae_base_imagenet', 82.864)):
        ref = presets.paper_reference(preset, row('diffrate', 'target=11.5', target_flops=11.5))
        assert (ref['acc1'], ref['gflops']) == (acc1, 11.517)
    # A-ViT-S: the released checkpoint, recognised by its file name
    avit = row('avit', 'released')
    avit['weights'] = {'checkpoint': {'path': 'w/small-10-75.pth', 'sha256': '0' * 64}}
    assert presets.paper_reference('deit_small_imagenet', avit)['acc1'] == 78.8
    assert presets.paper_reference('deit_small_imagenet', row('avit', 'beta=75', gate_center=75)) is None
    assert presets.paper_reference('deit_small_imagenet', row('baseline', 'full'))['acc1'] == 79.854
    assert presets.paper_reference('deit_base_imagenet', row('baseline', 'full'))['acc1'] == 81.846
    assert presets.paper_reference('mae_base_imagenet', row('baseline', 'full')) is None


def test_paper_reference_deit_tiny():
    for r, numbers in {8: (71.7, 0.9), 12: (71.4, 0.8), 16: (70.7, 0.6)}.items():
        ref = presets.paper_reference('deit_tiny_imagenet', row('tome', f'r={r}', r=r))
        assert (ref['acc1'], ref['gflops']) == numbers and 'DeiT-T' in ref['note']
    assert presets.paper_reference('deit_tiny_imagenet', row('tome', 'r=13', r=13)) is None
    avit = row('avit', 'released')
    avit['weights'] = {'checkpoint': {'path': 'tiny-10-30.pth'}}
    assert presets.paper_reference('deit_tiny_imagenet', avit)['acc1'] == 71.4
    assert presets.paper_reference('deit_tiny_imagenet', row('baseline', 'full'))['acc1'] == 72.202


def test_every_diffrate_reference_is_a_shipped_schedule_at_its_reported_flops():
    from diffrate.measure import schedule_gflops
    seen = 0
    for preset in presets.PRESETS.values():
        cli = next(name for name, key in schedules.MODEL_KEYS.items() if key == preset.diffrate_key)
        for ref in preset.references:
            if ref.method == 'diffrate':
                prune, merge = schedules.lookup(cli, ref.match['target_flops'], schedules.SHIPPED_PATH)
                assert round(schedule_gflops(cli, prune, merge), 3) == ref.gflops
                seen += 1
    assert seen == 3


def test_generated_imagenet_is_readable(tmp_path):
    from shared.compare_api import make_data_args
    from shared.datasets import build_dataset
    root = make_imagenet(tmp_path / 'imagenet')
    dataset, classes = build_dataset(False, make_data_args('IMNET', root, 32))
    assert len(dataset) == 4 and classes == 1000 and sorted(set(dataset.targets)) == [0, 1]


def tiny_preset_files(weights_dir):
    """deit_tiny_imagenet's files with random weights of the right shapes: the DeiT-T baseline under its own SHA-256
    prefix (returned: the preset renamed to it) and A-ViT-T under the released name."""
    from avit.models_act import avit_tiny_patch16_224
    from shared.models import create_model
    preset = presets.PRESETS['deit_tiny_imagenet']
    torch.manual_seed(0)
    tmp = os.path.join(weights_dir, 'tmp.pth')
    torch.save({'model': create_model('deit_tiny_patch16_224').state_dict()}, tmp)
    name = f'deit_tiny_patch16_224-{sha256(tmp)[:8]}.pth'
    os.replace(tmp, os.path.join(weights_dir, name))
    torch.save({'model': avit_tiny_patch16_224().state_dict()}, os.path.join(weights_dir, 'tiny-10-30.pth'))
    return dataclasses.replace(preset, baseline=dataclasses.replace(preset.baseline, name=name))


def test_compare_with_a_preset_end_to_end(tmp_path, monkeypatch):
    # the machinery, not the numbers: random weights, 4 generated images, one point per method
    from diffrate.measure import schedule_gflops
    from tools import compare
    data = make_imagenet(tmp_path / 'imagenet')
    weights = tmp_path / 'weights'
    weights.mkdir()
    monkeypatch.setitem(presets.PRESETS, 'deit_tiny_imagenet', tiny_preset_files(str(weights)))
    out = tmp_path / 'out'
    rows = compare.main(['--preset', 'deit_tiny_imagenet', '--weights-dir', str(weights), '--data-path', data,
                         '--r', '8', '--target-flops', '0.9', '--quick', '--batch-size', '4', '--throughput-batch', '2',
                         '--no-plots', '--output-dir', str(out), '--cache-dir', str(tmp_path / 'cache')])
    assert [(r['method'], r['label']) for r in rows] == [
        ('baseline', 'full'), ('tome', 'r=8'), ('diffrate', 'target=0.9'), ('avit', 'given beta=30')]
    by_method = {r['method']: r for r in rows}
    assert by_method['baseline']['weights']['baseline']['sha256'].startswith(
        presets.PRESETS['deit_tiny_imagenet'].baseline.name[-12:-4])
    # DiffRate ran the shipped ViT-T schedule of 0.9 GFLOPs
    prune, merge = schedules.lookup('vit_deit_tiny_patch16_224', 0.9, schedules.SHIPPED_PATH)
    assert by_method['diffrate']['gflops'] == pytest.approx(schedule_gflops('vit_deit_tiny_patch16_224', prune, merge),
                                                            abs=1e-6)
    # the reported numbers next to the measured rows; none for a setting no source reports
    paper = {r['method']: (r['paper_acc1'], r['paper_gflops']) for r in rows}
    assert paper == {'baseline': (72.202, None), 'tome': (71.7, 0.9), 'diffrate': (None, None), 'avit': (71.4, 0.8)}
    with open(out / 'results.json') as f:
        saved = json.load(f)
    assert saved['preset'] == 'deit_tiny_imagenet' and saved['provenance']['data_set'] == 'IMNET'
    assert [r['paper_acc1'] for r in saved['rows']] == [72.202, 71.7, None, 71.4]


def test_compare_refuses_missing_weights(tmp_path, capsys):
    from tools import compare
    with pytest.raises(SystemExit) as e:
        compare.main(['--preset', 'deit_small_imagenet', '--weights-dir', str(tmp_path), '--data-path',
                      str(tmp_path), '--no-plots', '--output-dir', str(tmp_path / 'out')])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('error: ')
    for name in ('deit_small_patch16_224-cd65a155.pth', 'small-10-75.pth'):
        assert str(tmp_path / name) in err
    assert 'https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth' in err
    assert not (tmp_path / 'out').exists()
