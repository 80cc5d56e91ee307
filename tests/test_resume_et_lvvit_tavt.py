"""Resume contract of the three training scripts that keep their originals' own checkpoint formats (TAVT here):
a run interrupted after a saved state and rerun into the same output dir ends exactly where an uninterrupted run
ends, its log holds each validation once, and a diverging run stops before it overwrites anything."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class Interrupted(Exception):
    """Stands for a kill: raised from inside the step loop."""


def _tavt_data(tmp_path):
    from tavt_helpers import write_cub, write_random_npz
    write_random_npz(str(tmp_path / 'w.npz'), grid=2)
    write_cub(str(tmp_path / 'data'))  # 12 training images: 3 steps of 4 per pass


def _tavt_argv(out, *extra):
    return ['--model_type', 'tiny-test', '--pretrained_dir', 'w.npz', '--data_root', 'data', '--img_size', '64',
            '--max_seq_length', '17', '--train_batch_size', '4', '--eval_batch_size', '4', '--num_workers', '0',
            '--warmup_steps', '1', '--output_dir', out, '--name', 'run', *extra]


def _count_passes(monkeypatch, train, distil, on_call):
    """Wrap the passes function so that on_call(n, model) runs before micro-batch n (1-based)."""
    name = 'distil_passes' if distil else 'baseline_passes'
    original = getattr(train, name)
    calls = [0]

    def wrapped(args, model, precision, x, y):
        calls[0] += 1
        on_call(calls[0], model)
        return original(args, model, precision, x, y)
    monkeypatch.setattr(train, name, wrapped)
    return calls


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def _assert_same_state(a, b):
    for key in ('model', 'optimizer', 'lr_scheduler'):
        fa, fb = _flat(a[key]), _flat(b[key])
        assert fa.keys() == fb.keys()
        for name in fa:
            assert torch.equal(fa[name], fb[name]) if torch.is_tensor(fa[name]) else fa[name] == fb[name], (key, name)
    assert (a['global_step'], a['epoch'], a['best_acc'], a['log']) == (b['global_step'], b['epoch'], b['best_acc'],
                                                                         b['log'])


def _flat(x, prefix=''):
    out = {}
    if isinstance(x, dict):
        for k, v in x.items():
            out.update(_flat(v, f'{prefix}.{k}'))
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            out.update(_flat(v, f'{prefix}[{i}]'))
    else:
        out[prefix] = x
    return out


# (distil, extra flags, micro-batch at which the first run is killed, validations written before the kill)
TAVT_CASES = {
    # killed in the third pass: resumed from the state saved at the end of the second (step 6)
    'baseline_after_pass_end': (False, ['--num_steps', '10', '--eval_every', '2'], 7, 3),
    # killed in the second pass: resumed from the state saved at step 4, in the middle of that pass
    'baseline_mid_pass': (False, ['--num_steps', '10', '--eval_every', '2'], 5, 2),
    # distillation (numpy draws per step) with accumulation: micro-batch 16 ends step 8, saved mid-pass
    'distil_accumulation': (True, ['--num_steps', '11', '--eval_every', '2', '--do_distil',
                                   '--gradient_accumulation_steps', '2'], 17, 3),
}


@pytest.mark.parametrize('case', sorted(TAVT_CASES))
def test_tavt_killed_and_rerun_equals_straight_run(tmp_path, monkeypatch, case):
    from tavt import train
    distil, extra, kill_at, saved_evals = TAVT_CASES[case]
    monkeypatch.chdir(tmp_path)
    _tavt_data(tmp_path)
    train.main(_tavt_argv('straight', *extra))

    def kill(n, model):
        if n == kill_at:
            raise Interrupted
    _count_passes(monkeypatch, train, distil, kill)
    with pytest.raises(Interrupted):
        train.main(_tavt_argv('resumed', *extra))
    assert len(_load('resumed/run_state.bin')['log']) == saved_evals
    with open('resumed/run_log.txt', 'a') as f:  # a line of a later validation a killed run may have written
        f.write('{"step": 99}\n')
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    train.main(_tavt_argv('resumed', *extra))

    straight, resumed = _load('straight/run_state.bin'), _load('resumed/run_state.bin')
    assert straight['finished'] and resumed['finished']
    _assert_same_state(straight, resumed)
    with open('straight/run_log.txt') as f1, open('resumed/run_log.txt') as f2:
        lines = f1.read()
        assert lines == f2.read()
    assert len(lines.splitlines()) == len(straight['log']) > saved_evals
    best_a, best_b = _load('straight/run_checkpoint.bin'), _load('resumed/run_checkpoint.bin')
    for k in best_a['model']:
        assert torch.equal(best_a['model'][k], best_b['model'][k])
    # a rerun of a finished run trains nothing and changes nothing
    before = open('resumed/run_state.bin', 'rb').read()
    train.main(_tavt_argv('resumed', *extra))
    assert open('resumed/run_state.bin', 'rb').read() == before


def _snapshot(folder):
    return {n: open(os.path.join(folder, n), 'rb').read() for n in sorted(os.listdir(folder)) if not n.startswith('.')}


@pytest.mark.parametrize('where', ['loss', 'weights'])
def test_tavt_nan_stops_before_saving(tmp_path, monkeypatch, capsys, where):
    """NaN weights before micro-batch 5 give a NaN loss; NaN weights set after the pass of micro-batch 6 reach the
    validation at step 6 with a finite loss. Both stop with exit 1 and leave the files of step 3 untouched."""
    from shared.errors import run_cli
    from tavt import train
    monkeypatch.chdir(tmp_path)
    _tavt_data(tmp_path)
    saved = {}

    def poison(n, model):
        if n == 5:
            saved.update(_snapshot('out'))
            if where == 'loss':
                with torch.no_grad():
                    next(model.parameters()).fill_(float('nan'))
    calls = _count_passes(monkeypatch, train, False, poison)
    if where == 'weights':
        real_step = train.Precision.clip_and_step

        def step_then_poison(self, scheduler, max_grad_norm):
            real_step(self, scheduler, max_grad_norm)
            if calls[0] == 6:
                with torch.no_grad():
                    self.model.transformer.encoder.encoder_norm.weight[0] = float('inf')
        monkeypatch.setattr(train.Precision, 'clip_and_step', step_then_poison)
    with pytest.raises(SystemExit) as stop:
        run_cli(train.main, _tavt_argv('out', '--num_steps', '10', '--eval_every', '3'))
    assert stop.value.code == 1
    err = capsys.readouterr().err
    if where == 'loss':
        assert 'error: loss is nan at epoch 1, step 5' in err
    else:
        assert 'error: model tensor transformer.encoder.encoder_norm.weight holds NaN/Inf' in err
    assert set(saved) == {'run_checkpoint.bin', 'run_state.bin', 'run_log.txt'}
    assert _snapshot('out') == saved
    assert _load('out/run_state.bin')['global_step'] == 3


def test_tavt_no_auto_resume_refuses_existing_state(tmp_path, monkeypatch):
    from shared.errors import UserError
    from tavt import train
    monkeypatch.chdir(tmp_path)
    _tavt_data(tmp_path)
    train.main(_tavt_argv('out', '--num_steps', '2', '--eval_every', '2'))
    before = _snapshot('out')
    with pytest.raises(UserError, match='auto-resume is off'):
        train.main(_tavt_argv('out', '--num_steps', '2', '--eval_every', '2', '--no_auto_resume'))
    assert _snapshot('out') == before


# ---- ToE inside EfficientTrain

def _et_args(out, *extra):
    from toe.EfficientTrain.main import parse_args
    args = parse_args(['--model', 'vit_digits_patch4_32', '--data_set', 'FAKE', '--base_input_size', '32',
                       '--input_size', '24', '--batch_size', '4', '--update_freq', '2', '--num_workers', '0',
                       '--device', 'cpu', '--output_dir', str(out), '--epochs', '3', '--end_epoch', '3',
                       '--warmup_epochs', '1', '--aa', 'rand-m9-mstd0.5-inc1', '--mixup', '0.8', '--cutmix', '1.0',
                       '--model_ema', 'true', '--model_ema_eval', 'true', '--save_ckpt_num', '2',
                       '--expansion-step', '0', '1', '2', '--keep-rate', '0.6', '0.8', '1.0',
                       '--initialization-keep-rate', '0.3', '--expansion-multiple-stage', '2', *extra])
    args.fake_size, args.fake_classes = 32, 4
    return args


def _assert_same_checkpoint(a, b, keys=('model', 'optimizer', 'model_ema', 'scaler')):
    for key in keys:
        fa, fb = _flat(a.get(key)), _flat(b.get(key))
        assert fa.keys() == fb.keys(), key
        for name in fa:
            same = torch.equal(fa[name], fb[name]) if torch.is_tensor(fa[name]) else fa[name] == fb[name]
            assert same, (key, name)


def test_efficienttrain_killed_and_rerun_equals_straight_run(tmp_path, monkeypatch):
    from toe.EfficientTrain import main as et
    et.main(_et_args(tmp_path / 'straight'))
    real_epoch = et.train_one_epoch

    def killed_in_epoch_2(*args, **kwargs):
        if args[5] == 2:
            raise Interrupted
        return real_epoch(*args, **kwargs)
    monkeypatch.setattr(et, 'train_one_epoch', killed_in_epoch_2)
    with pytest.raises(Interrupted):
        et.main(_et_args(tmp_path / 'resumed'))
    with open(tmp_path / 'resumed' / 'log.txt', 'a') as f:
        f.write('{"epoch": 2}\n')  # as if killed between the log line and the checkpoint of a later epoch
    monkeypatch.undo()
    et.main(_et_args(tmp_path / 'resumed'))
    # --save_ckpt_num 2 keeps the last two numbered checkpoints
    for run in ('straight', 'resumed'):
        names = sorted(n for n in os.listdir(tmp_path / run) if n.startswith('checkpoint'))
        assert names == ['checkpoint-1.pth', 'checkpoint-2.pth', 'checkpoint-best-ema.pth', 'checkpoint-best.pth'] \
            or names == ['checkpoint-1.pth', 'checkpoint-2.pth', 'checkpoint-best.pth']
    a, b = _load(tmp_path / 'straight' / 'checkpoint-2.pth'), _load(tmp_path / 'resumed' / 'checkpoint-2.pth')
    _assert_same_checkpoint(a, b)
    assert a['best'] == b['best'] and len(a['log']) == 3

    def log_without_timing(run):  # train_total_train_time is wall-clock time
        lines = [json.loads(line) for line in (tmp_path / run / 'log.txt').read_text().splitlines()]
        return [{k: v for k, v in e.items() if k != 'train_total_train_time'} for e in lines]
    assert log_without_timing('straight') == log_without_timing('resumed')
    assert [e['epoch'] for e in log_without_timing('resumed')] == [0, 1, 2]
    assert log_without_timing('resumed') == [{k: v for k, v in e.items() if k != 'train_total_train_time'}
                                             for e in b['log']]


def test_efficienttrain_auto_resume_false_refuses_existing_checkpoint(tmp_path, monkeypatch):
    from shared.errors import UserError
    from toe.EfficientTrain import main as et
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'checkpoint-0.pth').write_bytes(b'x')
    with pytest.raises(UserError, match='--auto_resume is false'):
        et.main(_et_args(tmp_path / 'out', '--auto_resume', 'false'))
    assert (tmp_path / 'out' / 'checkpoint-0.pth').read_bytes() == b'x'
