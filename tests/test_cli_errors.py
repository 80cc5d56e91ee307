"""Every entry script and tool answers a user's mistake with one `error:` line naming the flag or file, a non-zero
exit status (2 for usage errors), no traceback, and leaves what an earlier run wrote in its output folder untouched.

Each case runs in its own process: forked from this one once torch, timm and the project's modules are imported (a
fresh `python script` would spend ~5 s of CPU importing them again for each of the cases), then the script runs as
`__main__` with its argv, as the interpreter runs it; `test_forked_run_equals_a_fresh_interpreter` checks that both
ways give the same status and stderr.
"""
import os
import runpy
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = ('timm', 'torchvision', 'shared.args', 'shared.checkpoint', 'shared.datasets', 'shared.engine',
           'shared.trainer', 'shared.models', 'tocom.main', 'avit.main_act', 'diffrate.main', 'toe.deit.main',
           'tocom.compare', 'diffrate.compare')
FAKE = ['--data-set', 'FAKE', '--fake-size', '16', '--fake-classes', '4', '--device', 'cpu', '--num_workers', '0',
        '--batch-size', '4']
DIFFRATE = [*FAKE, '--model', 'vit_deit_tiny_patch16_224', '--input-size', '32', '--target_flops', '0.02',
            '--granularity', '1']
TOE = [*FAKE, '--model', 'vit_digits_patch4_32', '--input-size', '32', '--expansion-step', '0', '1', '2',
       '--keep-rate', '0.5', '0.75', '1.0']
TOCOM = [*FAKE, '--model', 'deit_tiny_patch16_224', '--input-size', '32']
AVIT = [*FAKE, '--model', 'avit_tiny_patch16_224', '--input-size', '32']
TAVT = ['--name', 'bad', '--model_type', 'tiny-test', '--img_size', '32', '--num_steps', '2', '--eval_every', '1',
        '--train_batch_size', '2', '--eval_batch_size', '2', '--num_workers', '0']

# Which flag carries the output folder of each script (its files must not change); None: the script writes none
# (convert.py's output is placed in the folder by the case itself).
OUTPUT_FLAG = {'tools/compare.py': '--output-dir', 'toe/lvvit/main.py': '--output', 'tools/flops.py': None,
               'tools/benchmark.py': None, 'tools/convert.py': None}



def _case(id_, script, argv, names, status=2):
    """names: what the error line must mention (any of them: flag spellings); status: the exit status (2: usage)."""
    return pytest.param(script, argv, names, status, id=id_)


CASES = [
    # tools/flops.py
    _case('flops-input-size-0', 'tools/flops.py', ['--input-size', '0'], ['--input-size']),
    _case('flops-input-size-not-patches', 'tools/flops.py', ['--input-size', '50'], ['--input-size']),
    _case('flops-unknown-method', 'tools/flops.py', ['--method', 'nope'], ['--method']),
    _case('flops-negative-r', 'tools/flops.py', ['--method', 'tome', '--r', '-2'], ['--r']),
    _case('flops-avit-without-data', 'tools/flops.py', ['--method', 'avit'], ['--data-path']),
    _case('flops-unknown-model', 'tools/flops.py', ['--model', 'no_such_vit'], ['--model']),
    _case('flops-abbreviation', 'tools/flops.py', ['--input-s', '224'], ['--input-s']),
    # tools/benchmark.py
    _case('benchmark-no-method', 'tools/benchmark.py', [], ['--method']),
    _case('benchmark-negative-r', 'tools/benchmark.py', ['--method', 'tome', '--r', '-1'], ['--r']),
    _case('benchmark-batch-0', 'tools/benchmark.py', ['--method', 'toe', '--batch-size', '0'], ['--batch-size']),
    _case('benchmark-abbreviation', 'tools/benchmark.py', ['--meth', 'tome'], ['--method']),
    # tools/compare.py
    _case('compare-unknown-method', 'tools/compare.py', ['--methods', 'nope'], ['nope']),
    _case('compare-negative-r', 'tools/compare.py', ['--methods', 'tome', '--r', '2', '-1'], ['--r']),
    _case('compare-epochs-0', 'tools/compare.py', ['--methods', 'tome', '--epochs', '0'], ['--epochs']),
    _case('compare-text-checkpoint', 'tools/compare.py', ['--methods', 'tome', '--checkpoint', '{text}'], ['{text}']),
    _case('compare-nan-checkpoint', 'tools/compare.py', ['--methods', 'tome', '--checkpoint', '{nan}'], ['{nan}']),
    _case('compare-missing-checkpoint', 'tools/compare.py', ['--methods', 'tome', '--checkpoint', '{missing}'],
          ['{missing}']),
    _case('compare-unknown-data-set', 'tools/compare.py', ['--methods', 'tome', '--data-set', 'BAR'], ['--data-set']),
    _case('compare-target-flops-negative', 'tools/compare.py',
          ['--methods', 'tome,diffrate', '--r', '2', '--target-flops', '-1'], ['--target-flops']),
    _case('compare-imnet-without-checkpoint', 'tools/compare.py', ['--methods', 'tome', '--data-set', 'IMNET'],
          ['--checkpoint']),
    # tools/convert.py (a checkpoint that does not convert: status 1)
    _case('convert-text-src', 'tools/convert.py', ['{text}', '{out}/converted.pth', '--model', 'vit_digits_patch4_32'],
          ['{text}'], 1),
    _case('convert-nan-src', 'tools/convert.py', ['{nan}', '{out}/converted.pth', '--model', 'vit_digits_patch4_32'],
          ['{nan}', 'pos_embed'], 1),
    _case('convert-missing-src', 'tools/convert.py',
          ['{missing}', '{out}/converted.pth', '--model', 'vit_digits_patch4_32'], ['{missing}'], 1),
    _case('convert-unknown-model', 'tools/convert.py', ['{good}', '{out}/converted.pth', '--model', 'no_such_vit'],
          ['--model']),
    _case('convert-num-classes-0', 'tools/convert.py',
          ['{good}', '{out}/converted.pth', '--model', 'vit_digits_patch4_32', '--num-classes', '0'],
          ['--num-classes']),
    # diffrate/main.py
    _case('diffrate-epochs-0', 'diffrate/main.py', [*DIFFRATE, '--epochs', '0'], ['--epochs']),
    _case('diffrate-input-size-not-patches', 'diffrate/main.py', [*DIFFRATE, '--input-size', '40'], ['--input-size']),
    _case('diffrate-unknown-data-set', 'diffrate/main.py', [*DIFFRATE, '--data-set', 'FOO'], ['--data-set']),
    _case('diffrate-batch-0', 'diffrate/main.py', [*DIFFRATE, '--batch-size', '0'], ['--batch-size']),
    _case('diffrate-granularity-0', 'diffrate/main.py', [*DIFFRATE, '--granularity', '0'], ['--granularity']),
    _case('diffrate-search-without-weights', 'diffrate/main.py', DIFFRATE, ['--weights']),
    _case('diffrate-target-above-full', 'diffrate/main.py',
          [*DIFFRATE, '--allow-random-weights', '--target_flops', '50'], ['--target_flops']),
    _case('diffrate-text-weights', 'diffrate/main.py', [*DIFFRATE, '--weights', '{text}'], ['{text}']),
    _case('diffrate-nan-weights', 'diffrate/main.py', [*DIFFRATE, '--weights', '{nan_deit}'], ['{nan_deit}']),
    _case('diffrate-set-smaller-than-batch', 'diffrate/main.py',
          [*DIFFRATE, '--allow-random-weights', '--batch-size', '64'], ['--batch-size']),
    _case('diffrate-abbreviation', 'diffrate/main.py', [*DIFFRATE, '--gran', '2'], ['--gran']),
    # toe/deit/main.py
    _case('toe-epochs-0', 'toe/deit/main.py', [*TOE, '--epochs', '0'], ['--epochs']),
    _case('toe-unknown-data-set', 'toe/deit/main.py', [*TOE, '--data-set', 'FOO'], ['--data-set']),
    _case('toe-text-finetune', 'toe/deit/main.py', [*TOE, '--finetune', '{text}'], ['{text}']),
    _case('toe-nan-finetune', 'toe/deit/main.py', [*TOE, '--finetune', '{nan}'], ['{nan}']),
    _case('toe-text-resume', 'toe/deit/main.py', [*TOE, '--resume', '{text}'], ['{text}']),
    _case('toe-set-smaller-than-batch', 'toe/deit/main.py', [*TOE, '--batch-size', '64'], ['--batch-size']),
    # tocom/main.py
    _case('tocom-epochs-0', 'tocom/main.py', [*TOCOM, '--epochs', '0'], ['--epochs']),
    _case('tocom-input-size-0', 'tocom/main.py', [*TOCOM, '--input-size', '0'], ['--input-size']),
    _case('tocom-r-src-out-of-range', 'tocom/main.py', [*TOCOM, '--r_src', '99'], ['--r_src']),
    _case('tocom-text-finetune', 'tocom/main.py', [*TOCOM, '--finetune', '{text}'], ['{text}']),
    _case('tocom-pretrain-no-weights', 'tocom/main.py',
          [*TOCOM, '--model', 'deit_tiny_patch16_224_tocom', '--r_src', '-1'], ['--finetune']),
    # --allow-random-weights lifts only that refusal: the next missing input (the teacher) is named instead
    _case('tocom-pretrain-random-weights-no-teacher', 'tocom/main.py',
          [*TOCOM, '--model', 'deit_tiny_patch16_224_tocom', '--r_src', '-1', '--allow-random-weights'],
          ['--teacher-path']),
    _case('tocom-finetune-nan', 'tocom/main.py', [*TOCOM, '--finetune', '{nan_deit}'], ['{nan_deit}']),
    # avit/main_act.py
    _case('avit-epochs-0', 'avit/main_act.py', [*AVIT, '--epochs', '0'], ['--epochs']),
    _case('avit-input-size-not-patches', 'avit/main_act.py', [*AVIT, '--input-size', '40'], ['--input-size']),
    _case('avit-unknown-data-set', 'avit/main_act.py', [*AVIT, '--data-set', 'FOO'], ['--data-set']),
    _case('avit-text-finetune', 'avit/main_act.py', [*AVIT, '--finetune', '{text}'], ['{text}']),
    _case('avit-finetune-nan', 'avit/main_act.py', [*AVIT, '--finetune', '{nan_deit}'], ['{nan_deit}']),
    # tavt/train.py
    _case('tavt-num-steps-0', 'tavt/train.py', [*TAVT, '--num_steps', '0'], ['--num_steps']),
    _case('tavt-eval-every-0', 'tavt/train.py', [*TAVT, '--eval_every', '0'], ['--eval_every']),
    _case('tavt-accumulation-0', 'tavt/train.py', [*TAVT, '--gradient_accumulation_steps', '0'],
          ['--gradient_accumulation_steps']),
    _case('tavt-length-drop-bound', 'tavt/train.py', [*TAVT, '--length_drop_ratio_bound', '1.5'],
          ['--length_drop_ratio_bound']),
    _case('tavt-missing-data-root', 'tavt/train.py', [*TAVT, '--data_root', '{missing}'], ['--data_root']),
    _case('tavt-missing-pretrained-dir', 'tavt/train.py', [*TAVT, '--pretrained_dir', '{missing}'],
          ['--pretrained_dir']),
    # toe/lvvit/main.py
    _case('lvvit-epochs-0', 'toe/lvvit/main.py', ['{missing}', '--epochs', '0'], ['--epochs']),
    _case('lvvit-batch-0', 'toe/lvvit/main.py', ['{missing}', '--batch-size', '0'], ['--batch-size']),
    _case('lvvit-missing-data', 'toe/lvvit/main.py', ['{missing}', '--epochs', '1', '--device', 'cpu'], ['{missing}']),
    # toe/EfficientTrain/main.py
    _case('efficienttrain-epochs-0', 'toe/EfficientTrain/main.py', ['--epochs', '0'], ['--epochs']),
    _case('efficienttrain-batch-0', 'toe/EfficientTrain/main.py', ['--batch_size', '0'], ['--batch_size']),
    _case('efficienttrain-missing-data', 'toe/EfficientTrain/main.py', ['--data_path', '{missing}'],
          ['--data_path']),
]


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Generated inputs: a text file, a missing path, good and NaN checkpoints of two small models."""
    from shared.models import create_model
    d = tmp_path_factory.mktemp('inputs')
    (d / 'notes.txt').write_text('these are my notes, not weights\n')
    torch.manual_seed(0)
    good = create_model('vit_digits_patch4_32').state_dict()
    torch.save({'model': good}, d / 'good.pth')
    nan = {k: v.clone() for k, v in good.items()}
    nan['pos_embed'][0, 0, 0] = float('nan')
    torch.save({'model': nan}, d / 'nan.pth')
    import timm
    deit = timm.create_model('deit_tiny_patch16_224', img_size=32, num_classes=4).state_dict()
    deit['blocks.0.attn.qkv.weight'][0, 0] = float('inf')
    torch.save({'model': deit}, d / 'nan_deit.pth')
    for name in PRELOAD:  # imported once here, shared by every forked case
        __import__(name)
    return {'text': str(d / 'notes.txt'), 'missing': str(d / 'nowhere' / 'x.pth'), 'good': str(d / 'good.pth'),
            'nan': str(d / 'nan.pth'), 'nan_deit': str(d / 'nan_deit.pth')}


def run_forked(script, argv, out_dir, timeout=120):
    """(status, stdout, stderr) of `python script *argv`, run in a child forked from this process."""
    out_path, err_path = out_dir.parent / 'stdout.txt', out_dir.parent / 'stderr.txt'
    pid = os.fork()
    if pid == 0:  # the child: become `python script argv`
        status = 1
        try:
            for fd, path in ((1, out_path), (2, err_path)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.stdout = open(1, 'w', closefd=False)
            sys.stderr = open(2, 'w', closefd=False)
            os.chdir(ROOT)
            sys.argv = [script, *argv]
            sys.path[0] = str((ROOT / script).parent)
            try:
                runpy.run_path(str(ROOT / script), run_name='__main__')
                status = 0
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    status = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
            except BaseException:  # noqa: BLE001  (printed as the interpreter would)
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    deadline = time.monotonic() + timeout
    while True:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f'{script} {argv} still running after {timeout} s')
        time.sleep(0.02)
    return os.waitstatus_to_exitcode(wait_status), out_path.read_text(), err_path.read_text()


def earlier_run(tmp_path):
    """An output folder holding an earlier run's files; returns (folder, {name: bytes})."""
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'log.txt').write_text('{"epoch": 0, "train_loss": 1.0}\n')
    (out / 'results.txt').write_bytes(b'an earlier result\n')
    return out, {p.name: p.read_bytes() for p in out.iterdir()}


def fill(values, files, out):
    return [v.format(out=out, **files) for v in values]


@pytest.mark.parametrize('script,argv,names,status', CASES)
def test_bad_input_is_one_error_line(script, argv, names, status, files, tmp_path):
    out, before = earlier_run(tmp_path)
    argv = fill(argv, files, out)
    flag = OUTPUT_FLAG.get(script, '--output_dir')
    if flag:
        argv += [flag, str(out)]
    code, stdout, stderr = run_forked(script, argv, out)
    report = f'{script} {" ".join(argv)}\nstatus {code}\nstderr:\n{stderr[-3000:]}'
    assert 'Traceback' not in stderr, report
    errors = [line for line in stderr.splitlines() if 'error:' in line]
    assert len(errors) == 1, report
    assert code == status, report
    assert any(name in errors[0] for name in fill(names, files, out)), report
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, report


def test_there_are_at_least_40_bad_inputs_over_every_entry_script():
    scripts = {c.values[0] for c in CASES}
    assert len(CASES) >= 40
    assert scripts == {'tools/flops.py', 'tools/benchmark.py', 'tools/compare.py', 'tools/convert.py',
                       'diffrate/main.py', 'toe/deit/main.py', 'tocom/main.py', 'avit/main_act.py', 'tavt/train.py',
                       'toe/lvvit/main.py', 'toe/EfficientTrain/main.py'}


def test_forked_run_equals_a_fresh_interpreter(files, tmp_path):
    """The forked child behaves as `python script ...` does (status and stderr), here on a DiffRate refusal once
    the data is built."""
    for i, argv in enumerate(([*DIFFRATE, '--weights', files['text']],)):
        out = tmp_path / str(i) / 'out'
        out.mkdir(parents=True)
        argv = [*argv, '--output_dir', str(out)]
        forked = run_forked('diffrate/main.py', argv, out)
        fresh = subprocess.run([sys.executable, 'diffrate/main.py', *argv], cwd=ROOT, capture_output=True, text=True,
                               env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=300)
        assert (forked[0], forked[2]) == (fresh.returncode, fresh.stderr)
        assert forked[0] == 2 and forked[2].count('error:') == 1
