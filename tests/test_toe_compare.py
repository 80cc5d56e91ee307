"""toe.compare: ToE reported as a training accelerator (ToE and the baseline recipe trained from scratch, timed)."""
import argparse
import hashlib
import json
import os
import re
import shlex
import statistics

import pytest
import torch

from shared.compare_api import Context, MissingArtefact, make_data_args
from shared.flops import model_macs
from shared.models import create_model
from toe import compare as hook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_ROOT = os.path.join(ROOT, 'shared', 'assets', 'compare')
SHIPPED_BASELINE = os.path.join(ROOT, 'shared', 'assets', 'vit_digits_patch4_32.pth')
CONTRACT = ('epochs', 'wall_s_total', 'wall_s_per_epoch', 'wall_s_per_epoch_min', 'wall_s_per_epoch_max', 'acc1',
            'baseline_wall_s_total', 'baseline_wall_s_per_epoch', 'baseline_wall_s_per_epoch_min',
            'baseline_wall_s_per_epoch_max', 'baseline_acc1', 'speedup', 'measured', 'commands')
MEASURED = ('source', 'device_name', 'threads', 'git_commit', 'date')


def hook_args(*argv):
    parser = argparse.ArgumentParser()
    hook.add_args(parser)
    return parser.parse_args(list(argv))


def shipped_folder():
    epochs, _ = hook.schedule(hook.DEFAULT_EPOCHS, [0.5, 0.75, 1.0])
    return os.path.join(SHIPPED_ROOT, 'toe', hook.artefact_name(embedded_ctx('unused'), hook_args(), epochs))


def embedded_ctx(cache_dir, retrain=False):
    """The context tools/compare.py builds on the embedded default (shipped baseline, shipped artefacts)."""
    return Context(base_checkpoint=SHIPPED_BASELINE, model_name='vit_digits_patch4_32',
                   model_kwargs={'num_classes': 10, 'img_size': 32}, data_args=make_data_args(),
                   cache_dir=str(cache_dir), device=torch.device('cpu'), retrain=retrain, shipped_root=SHIPPED_ROOT)


def no_training(*args, **kwargs):
    raise AssertionError('trained although a record was available')


def check_record(record, source):
    assert set(CONTRACT) <= set(record) and set(MEASURED) <= set(record['measured'])
    assert record['measured']['source'] == source
    assert record['speedup'] == pytest.approx(record['baseline_wall_s_total'] / record['wall_s_total'], rel=1e-3)
    for prefix in ('', 'baseline_'):
        epochs = record[f'{prefix}wall_s_epochs']
        assert len(epochs) == record['epochs']
        assert record[f"{prefix}wall_s_total"] == pytest.approx(sum(epochs), abs=1e-3 * len(epochs))
        assert record[f'{prefix}wall_s_per_epoch'] == pytest.approx(statistics.median(epochs), abs=1e-3)
        assert record[f'{prefix}wall_s_per_epoch_min'] == min(epochs)
        assert record[f'{prefix}wall_s_per_epoch_max'] == max(epochs)
        assert 0 <= record[f'{prefix}acc1'] <= 100
    # the schedule: stage s keeps keep_rate[s] of the 64 patches from its expansion step on
    steps = record['expansion_step']
    expected = [int(64 * [0.5, 0.75, 1.0][sum(e >= s for s in steps) - 1]) for e in range(record['epochs'])]
    assert record['kept_tokens_per_epoch'] == expected
    toe_cmd, base_cmd = record['commands']
    assert ' toe/deit/main.py ' in toe_cmd and ' tools/train_baseline.py ' in base_cmd
    # the same recipe, budget and data for both: the baseline's flags are ToE's without ToE's own and --output_dir
    toe_flags, base_flags = shlex.split(toe_cmd)[3:], shlex.split(base_cmd)[3:]

    def without(flags, names):
        out, skip = [], False
        for f in flags:
            skip = f in names or (skip and not f.startswith('--'))
            if not skip:
                out.append(f)
        return out
    toe_only = {'--expansion-step', '--keep-rate', '--initialization-keep-rate', '--expansion-multiple-stage'}
    assert without(toe_flags, toe_only | {'--output_dir'}) == without(base_flags, {'--output_dir'})
    assert toe_flags[toe_flags.index('--epochs') + 1] == str(record['epochs'])


def test_schedule_scaling():
    assert hook.schedule(1, [0.5, 0.75, 1.0]) == (3, [0, 1, 2])
    assert hook.schedule(50, [0.5, 0.75, 1.0]) == (50, [0, 16, 33])
    assert hook.schedule(300, [0.5, 0.75, 1.0]) == (300, [0, 100, 200])  # the run script's own steps


def test_epoch_wall_seconds_from_the_trainer_lines():
    lines = ['Epoch: [0]  [ 0/22]  eta: 0:00:10  lr: 0.000100  loss: 2.3 (2.3)  time: 0.5  data: 0.0',
             'Epoch: [0]  [21/22]  eta: 0:00:00  lr: 0.000100  loss: 2.1 (2.2)  time: 0.4  data: 0.0',
             'Epoch: [0] Total time: 0:00:09 (0.4318 s / it)',
             'Test:  [0/3]  eta: 0:00:01', 'Test: Total time: 0:00:01 (0.3000 s / it)',
             'Epoch: [1]  [ 0/20]  eta: 0:00:10', 'Epoch: [1] Total time: 0:00:08 (0.4000 s / it)']
    assert hook.epoch_wall_seconds(lines) == [pytest.approx(0.4318 * 22), pytest.approx(0.4 * 20)]


def test_shipped_record_used_by_default(tmp_path, monkeypatch):
    folder = shipped_folder()
    assert os.path.isfile(os.path.join(folder, 'done')), 'the shipped ToE record is missing'
    monkeypatch.setattr(hook, 'train_and_measure', no_training)
    [v] = hook.variants('toe', embedded_ctx(tmp_path), hook_args())
    assert v.artefacts['checkpoint'] == os.path.join(folder, hook.WEIGHTS)
    check_record(v.extra['training'], 'shipped record')
    with open(os.path.join(folder, hook.RECORD)) as f:
        on_disk = json.load(f)
    assert {k: val for k, val in v.extra['training'].items() if k != 'measured'} == \
        {k: val for k, val in on_disk.items() if k != 'measured'}
    shipped = torch.load(os.path.join(folder, hook.WEIGHTS))['model']
    assert all(torch.equal(shipped[k], val) for k, val in v.model.state_dict().items())
    assert v.gflops == pytest.approx(model_macs(create_model('vit_digits_patch4_32')) / 1e9)
    assert not os.listdir(tmp_path)  # nothing trained, nothing cached


def test_retrain_ignores_the_shipped_record(tmp_path, monkeypatch):
    calls = []

    def fake_training(ctx, args, epochs, steps, folder):
        calls.append(folder)
        raise RuntimeError('stop here')
    monkeypatch.setattr(hook, 'train_and_measure', fake_training)
    with pytest.raises(RuntimeError, match='stop here'):
        hook.variants('toe', embedded_ctx(tmp_path, retrain=True), hook_args())
    assert calls == [os.path.join(str(tmp_path), 'toe', os.path.basename(shipped_folder()))]
    # a changed setting is another artefact, never the shipped one
    calls.clear()
    with pytest.raises(RuntimeError, match='stop here'):
        hook.variants('toe', embedded_ctx(tmp_path), hook_args('--toe-batch-size', '32'))
    assert calls and calls[0].startswith(str(tmp_path))


def test_shipped_record_fields_and_readme_sha256():
    folder = shipped_folder()
    with open(os.path.join(folder, hook.RECORD)) as f:
        record = json.load(f)
    check_record(record, 'this run')  # as written by the run that made it
    assert record['epochs'] == hook.DEFAULT_EPOCHS
    for command in record['commands']:  # runnable from a checkout: no path of the machine that made it
        assert command.startswith('OMP_NUM_THREADS=') and ' /' not in command
    with open(os.path.join(folder, 'README.md')) as f:
        readme = f.read()
    listed = dict(re.findall(r'`([\w.]+)`: `([0-9a-f]{64})`', readme))
    assert set(listed) == {hook.WEIGHTS, hook.RECORD}
    for name, digest in listed.items():
        with open(os.path.join(folder, name), 'rb') as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, name
    # only the weights: no optimizer state
    assert set(torch.load(os.path.join(folder, hook.WEIGHTS))) == {'model'}


def test_quick_retrain_measures_both_runs(compare_ctx, tmp_path):
    ctx = compare_ctx
    [v] = hook.variants('toe', ctx, hook_args())
    record = v.extra['training']
    check_record(record, 'this run')
    assert record['epochs'] == 3 and record['expansion_step'] == [0, 1, 2]
    assert record['measured']['threads'] == torch.get_num_threads()
    with open(os.path.join(shipped_folder(), hook.RECORD)) as f:
        assert set(json.load(f)) == set(record)  # the same fields as the shipped record
    base = create_model('vit_digits_patch4_32')
    assert type(v.model) is type(base)  # the plain ViT: all tokens at inference
    assert v.gflops == pytest.approx(model_macs(base) / 1e9)  # ToE adds nothing at inference
    path = v.artefacts['checkpoint']
    stamp = os.path.getmtime(path)
    [again] = hook.variants('toe', ctx, hook_args())  # cached: not trained again
    assert os.path.getmtime(path) == stamp and again.extra['training'] == record

    # the recorded ToE command is exactly what ran: ToE's main in this process with its flags gives the same weights
    from toe.deit.main import main, parse_args
    argv = shlex.split(record['commands'][0])[3:]
    out = argv.index('--output_dir') + 1
    argv[out] = str(tmp_path / 'again')
    threads = torch.get_num_threads()
    torch.set_num_threads(record['measured']['threads'])
    try:
        main(parse_args(argv))
    finally:
        torch.set_num_threads(threads)
    from shared.checkpoint import safe_load, to_timm_state_dict
    rerun = to_timm_state_dict(safe_load(str(tmp_path / 'again' / 'checkpoint.pth')))
    assert all(torch.equal(rerun[k], val) for k, val in v.model.state_dict().items())


def test_toe_checkpoint_is_evaluated_without_training(compare_ctx, tmp_path, monkeypatch):
    with pytest.raises(MissingArtefact, match='toe.pth'):
        hook.variants('toe', compare_ctx, hook_args('--toe-checkpoint', str(tmp_path / 'toe.pth')))
    torch.manual_seed(1)
    trained = create_model('vit_digits_patch4_32')
    torch.save({'model': trained.state_dict(), 'epoch': 299}, tmp_path / 'toe.pth')
    monkeypatch.setattr(hook, 'train_and_measure', no_training)
    [v] = hook.variants('toe', compare_ctx, hook_args('--toe-checkpoint', str(tmp_path / 'toe.pth')))
    assert v.extra['training'] is None
    assert all(torch.equal(trained.state_dict()[k], val) for k, val in v.model.state_dict().items())


def test_bad_schedule_is_a_clear_error(compare_ctx):
    with pytest.raises(SystemExit):
        hook.variants('toe', compare_ctx, hook_args('--toe-keep-rates', '0.75', '0.5', '1.0'))
