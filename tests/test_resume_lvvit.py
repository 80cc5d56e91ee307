"""Resume contract of toe/lvvit/main.py, which keeps timm's train-script outputs (last.pth.tar, checkpoint-<n>.pth.tar,
model_best.pth.tar, summary.csv in <--output>/train/<time>-<model>-<size>/): a run killed inside an epoch and started
again with the same command continues in its folder and ends where an uninterrupted run ends; with auto-resume off an
earlier run is refused; the eval folder is labelled with the training split's classes."""
import os
import types

import pytest
import torch

from tests.test_toe_lvvit import LV_TOE, make_label_map_set


class Interrupted(Exception):
    """Stands for a kill inside an epoch."""


def _argv(data, labels, out, *extra):
    return [str(data), '--model', 'lvvit_t', '--img-size', '64', '--num-classes', '2', '-b', '4', '-j', '0',
            '--token-label', '--token-label-data', str(labels), '--token-label-size', '4', '--model-ema',
            '--mixup', '0.8', '--cutmix', '1.0', '--device', 'cpu', '--warmup-epochs', '1', '--cooldown-epochs', '0',
            '--epochs', '3', '--output', str(out), *LV_TOE, *extra]


def _run(argv):
    from toe.lvvit import main as lvvit
    return lvvit.main(*lvvit.parse_args(argv))


def _flat(x, prefix=''):
    if isinstance(x, dict):
        return {k2: v2 for k, v in x.items() for k2, v2 in _flat(v, f'{prefix}.{k}').items()}
    if isinstance(x, (list, tuple)):
        return {k2: v2 for i, v in enumerate(x) for k2, v2 in _flat(v, f'{prefix}[{i}]').items()}
    return {prefix: x}


def _assert_same(a, b, keys):
    for key in keys:
        fa, fb = _flat(a[key]), _flat(b[key])
        assert fa.keys() == fb.keys(), key
        for name in fa:
            same = torch.equal(fa[name], fb[name]) if torch.is_tensor(fa[name]) else fa[name] == fb[name]
            assert same, (key, name)


def test_killed_and_rerun_equals_straight_run(tmp_path, monkeypatch, capsys):
    from toe.lvvit import main as lvvit
    data, labels = make_label_map_set(tmp_path)
    # summary.csv's train_total_train_time is wall-clock time: a frozen clock makes the two files comparable bytes
    monkeypatch.setattr(lvvit, 'time', types.SimpleNamespace(time=lambda: 0.0))
    straight = _run(_argv(data, labels, tmp_path / 'straight'))

    real_epoch = lvvit.train_one_epoch

    def killed_in_epoch_2(epoch, *args, **kwargs):
        if epoch == 2:
            raise Interrupted
        return real_epoch(epoch, *args, **kwargs)
    monkeypatch.setattr(lvvit, 'train_one_epoch', killed_in_epoch_2)
    with pytest.raises(Interrupted):
        _run(_argv(data, labels, tmp_path / 'resumed'))
    [folder] = (tmp_path / 'resumed' / 'train').iterdir()
    summary = (folder / 'summary.csv').read_text()
    assert [line.split(',')[0] for line in summary.splitlines()] == ['epoch', '0', '1']
    # as if a later kill had come between the summary line and the checkpoint, and in the middle of a save
    (folder / 'summary.csv').write_text(summary + '2,9.0,0.0,9.0,0.0,0.0\r\n')
    (folder / '.last.pth.tar.x1y2.tmp').write_bytes(b'half a checkpoint')
    monkeypatch.setattr(lvvit, 'train_one_epoch', real_epoch)
    capsys.readouterr()
    resumed = _run(_argv(data, labels, tmp_path / 'resumed'))
    out = capsys.readouterr().out

    assert resumed == str(folder)  # the same folder, not a new timestamped one
    assert f'auto-resume from {folder / "last.pth.tar"}' in out and 'ToE epoch 2' in out and 'ToE epoch 1' not in out
    names = {p.name for p in os.scandir(folder)} - {'.run.lock'}
    assert names == {p.name for p in os.scandir(straight)} - {'.run.lock'}
    assert names == {'args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'checkpoint-0.pth.tar',
                     'checkpoint-1.pth.tar', 'checkpoint-2.pth.tar'}
    for name in ('last.pth.tar', 'model_best.pth.tar', 'checkpoint-2.pth.tar'):
        a = torch.load(os.path.join(straight, name), weights_only=False)
        b = torch.load(folder / name, weights_only=False)
        _assert_same(a, b, ('state_dict', 'optimizer', 'state_dict_ema', 'saver', 'summary'))
        assert (a['epoch'], a['metric'], a['arch'], a['version']) == (b['epoch'], b['metric'], b['arch'], b['version'])
    final = torch.load(folder / 'last.pth.tar', weights_only=False)
    assert final['epoch'] == 2 and [r['epoch'] for r in final['summary']] == [0, 1, 2]
    assert (folder / 'summary.csv').read_bytes() == open(os.path.join(straight, 'summary.csv'), 'rb').read()
    assert [line.split(',')[0] for line in (folder / 'summary.csv').read_text().splitlines()] == ['epoch', '0', '1',
                                                                                                   '2']


def test_no_auto_resume_refuses_an_earlier_run(tmp_path):
    from shared.errors import UserError
    data, labels = make_label_map_set(tmp_path, train_per_class=2, val_per_class=1)
    earlier = tmp_path / 'out' / 'train' / '20250101-000000-lvvit_t-64'
    earlier.mkdir(parents=True)
    (earlier / 'last.pth.tar').write_bytes(b'an earlier run')
    with pytest.raises(UserError, match='auto-resume is off'):
        _run(_argv(data, labels, tmp_path / 'out', '--no-auto-resume'))
    assert [p.name for p in (tmp_path / 'out' / 'train').iterdir()] == [earlier.name]
    assert [p.name for p in earlier.iterdir()] == ['last.pth.tar']
    assert (earlier / 'last.pth.tar').read_bytes() == b'an earlier run'


def test_nan_loss_stops_before_any_save(tmp_path, monkeypatch):
    from shared.errors import TrainingDiverged
    from toe.lvvit import main as lvvit
    data, labels = make_label_map_set(tmp_path, train_per_class=2, val_per_class=1)
    monkeypatch.setattr(lvvit.TokenLabelCrossEntropy, 'forward',
                        lambda self, output, target: output[0].sum() * float('nan'))
    with pytest.raises(TrainingDiverged, match='epoch 0, step 0'):
        _run(_argv(data, labels, tmp_path / 'out'))
    [folder] = (tmp_path / 'out' / 'train').iterdir()
    assert not any(p.name.endswith('.pth.tar') for p in folder.iterdir())


def test_eval_folder_missing_a_class_keeps_the_training_labels(tmp_path):
    from toe.lvvit.main import build_loaders, parse_args
    data, labels = make_label_map_set(tmp_path, classes=3, train_per_class=2, val_per_class=2)
    # ImageNet's val/ name (the default --val-split 'validation' falls back to it), lacking the middle class
    (data / 'validation').rename(data / 'val')
    for image in (data / 'val' / 'n01').iterdir():
        image.unlink()
    (data / 'val' / 'n01').rmdir()
    args, _ = parse_args(_argv(data, labels, tmp_path / 'out'))
    args.distributed, args.world_size = False, 1
    data_config = {'input_size': (3, 64, 64), 'interpolation': 'bicubic', 'mean': (0.5,) * 3, 'std': (0.5,) * 3,
                   'crop_pct': 0.9}
    _, loader_eval = build_loaders(args, data_config)
    train_classes = sorted(os.listdir(data / 'train'))
    expected = [train_classes.index(os.path.basename(os.path.dirname(path))) for path, _ in
                sorted(loader_eval.dataset.samples)]
    assert expected == [0, 0, 2, 2]
    assert [t for _, t in sorted(loader_eval.dataset.samples)] == expected
    assert torch.cat([y for _, y in loader_eval]).tolist() == [0, 0, 2, 2]
