"""DiffRate's search and ToE's DeiT trainer on shared.trainer: a run stopped after 2 epochs and rerun with --epochs 3
into the same folder ends exactly where a straight 3-epoch run ends, and a rerun with auto-resume switched off does
not touch a folder that holds a checkpoint.

Both runs use a learning-rate schedule that does not depend on --epochs (DiffRate: --arch-min-lr = --arch-lr; ToE:
the step schedule, first decay at epoch 30): a cosine schedule's horizon is --epochs, so extending a run by raising
--epochs changes the lr of the epochs after the first run's end, which is a different training, not a resume fault.
Both keep RandAugment, mixup/cutmix, random erasing and drop path on, so every random stream must continue exactly."""
import json
import os

import pytest
import torch

from shared.checkpoint import safe_load
from shared.errors import UserError

FAKE = ['--data-set', 'FAKE', '--fake-size', '16', '--fake-classes', '4', '--device', 'cpu', '--num_workers', '0',
        '--batch-size', '4', '--print-freq', '100', '--aa', 'rand-m9-mstd0.5-inc1']

DIFFRATE = [*FAKE, '--model', 'vit_deit_tiny_patch16_224', '--input-size', '48', '--target_flops', '0.024',
            '--granularity', '1', '--arch-lr', '0.2', '--arch-min-lr', '0.2']

TOE = [*FAKE, '--model', 'vit_digits_patch4_32', '--input-size', '32', '--sched', 'step', '--warmup-epochs', '0',
       '--expansion-step', '0', '1', '2', '--keep-rate', '0.5', '0.75', '1.0', '--initialization-keep-rate', '0.25',
       '--expansion-multiple-stage', '2', '--model-ema']


def run_diffrate(argv):
    from diffrate.main import get_args_parser, main
    args = get_args_parser().parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)  # as the script's __main__ does
    return main(args)


def run_toe(argv):
    from toe.deit.main import main, parse_args
    return main(parse_args(argv))


def folder_bytes(out):
    """Every file of a run folder but the lock file (whose holder line each start rewrites), with its bytes."""
    return {name: (out / name).read_bytes() for name in sorted(os.listdir(out)) if name != '.run.lock'}


def assert_same_state(a, b, keys):
    ca, cb = safe_load(a / 'checkpoint.pth'), safe_load(b / 'checkpoint.pth')
    assert ca['epoch'] == cb['epoch'] == 2
    for key in keys:
        assert ca[key].keys() == cb[key].keys(), key
        for name in ca[key]:
            assert torch.equal(ca[key][name], cb[key][name]), (key, name)
    sa, sb = ca['optimizer']['state'], cb['optimizer']['state']
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        for name in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][name]), torch.as_tensor(sb[i][name])), ('optimizer', i, name)
    assert ca['optimizer']['param_groups'] == cb['optimizer']['param_groups']
    return ca, cb


def log_text(out):
    text = (out / 'log.txt').read_text()
    assert [json.loads(line)['epoch'] for line in text.splitlines()] == [0, 1, 2]
    return text


def without_wall_time(text):
    """log.txt without ToE's per-epoch wall time (a measurement, different in every run)."""
    return [{k: v for k, v in json.loads(line).items() if k != 'train_total_train_time'} for line in text.splitlines()]


@pytest.fixture
def fresh_random_streams(monkeypatch):
    # streams other tests registered would be saved into (and restored from) these runs' checkpoints
    import shared.checkpoint
    monkeypatch.setattr(shared.checkpoint, '_RANDOM_STREAMS', {})


def test_diffrate_search_resumed_with_more_epochs_equals_a_straight_run(tmp_path, capsys, fresh_random_streams):
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    info = run_diffrate([*DIFFRATE, '--epochs', '3', '--output_dir', str(straight)])
    run_diffrate([*DIFFRATE, '--epochs', '2', '--output_dir', str(split)])
    capsys.readouterr()
    resumed = run_diffrate([*DIFFRATE, '--epochs', '3', '--output_dir', str(split)])
    printed = capsys.readouterr().out
    assert 'starting epoch 2' in printed and 'Epoch: [1]' not in printed and 'Epoch: [2]' in printed

    ca, cb = assert_same_state(straight, split, keys=('model',))
    # the learned schedule: same in the checkpoint, in compression_rate.json and in the returned entry
    assert ca['diffrate_schedule'] == cb['diffrate_schedule'] == info == resumed
    assert info['epoch'] == 2
    assert (straight / 'compression_rate.json').read_bytes() == (split / 'compression_rate.json').read_bytes()
    assert log_text(straight) == log_text(split)
    assert (split / 'model_best.pth').is_file()
    # the proxies really learned: otherwise equal checkpoints would prove nothing about the resumed arch state
    start = run_diffrate([*DIFFRATE, '--epochs', '1', '--output_dir', str(tmp_path / 'one')])
    assert start['merge_kept_num'] != info['merge_kept_num']


def test_diffrate_refuses_a_folder_with_a_checkpoint_when_auto_resume_is_off(tmp_path, fresh_random_streams):
    out = tmp_path / 'run'
    run_diffrate([*DIFFRATE, '--epochs', '1', '--output_dir', str(out)])
    before = folder_bytes(out)
    with pytest.raises(UserError, match='auto-resume is off'):
        run_diffrate([*DIFFRATE, '--epochs', '2', '--no-auto-resume', '--output_dir', str(out)])
    assert folder_bytes(out) == before
    # the reference's flag still parses and means what it meant
    from diffrate.main import get_args_parser
    assert get_args_parser().parse_args(['--autoresume']).auto_resume
    assert get_args_parser().parse_args([]).auto_resume
    assert not get_args_parser().parse_args(['--no-auto-resume']).auto_resume


def test_toe_resumed_with_more_epochs_equals_a_straight_run(tmp_path, capsys, fresh_random_streams):
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    run_toe([*TOE, '--epochs', '3', '--output_dir', str(straight)])
    run_toe([*TOE, '--epochs', '2', '--output_dir', str(split)])
    capsys.readouterr()
    run_toe([*TOE, '--epochs', '3', '--output_dir', str(split)])
    printed = capsys.readouterr().out
    # the resumed run enters the full-token stage directly
    assert 'starting epoch 2' in printed and 'expansion stage 3/3, 64/64 patch tokens kept' in printed
    assert 'expansion stage 2/3' not in printed
    assert 'Max accuracy of model_ema:' in printed

    assert_same_state(straight, split, keys=('model', 'model_ema'))
    a, b = without_wall_time(log_text(straight)), without_wall_time(log_text(split))
    assert a == b
    assert [e['train_kept_tokens'] for e in b] == [32, 48, 64] and all('ema_test_acc1' in e for e in b)
    for name in ('best_checkpoint.pth', 'ema_best_checkpoint.pth'):
        assert (split / name).is_file()


def test_toe_refuses_a_folder_with_a_checkpoint_when_auto_resume_is_off(tmp_path, fresh_random_streams):
    out = tmp_path / 'run'
    argv = [*TOE, '--epochs', '1', '--output_dir', str(out)]
    run_toe(argv)
    before = folder_bytes(out)
    with pytest.raises(UserError, match='auto-resume is off'):
        run_toe([*argv, '--no-auto-resume'])
    assert folder_bytes(out) == before
