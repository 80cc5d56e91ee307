"""tools/compare.py protocol for ToE (see shared/compare_api.py).

ToE is a training accelerator: it changes how a ViT is trained, not what runs at inference, so its result is a
training cost. The hook trains the baseline architecture twice FROM SCRATCH with the same recipe, data, epochs,
batch, seed and thread count on the same machine, each with its own entry script in a child process, both at once
on the CPU when each can have its own cores (a busy machine then slows both alike; the baseline's last epochs, after
ToE has finished, run with one competitor less, which can only understate ToE's speed-up), else back to back:

    ToE:       python toe/deit/main.py <recipe> --expansion-step ... --keep-rate ... (ToE's DeiT trainer)
    baseline:  python tools/train_baseline.py <recipe>                             (the baseline's trainer)

<recipe> is the shipped baseline's (shared/assets/README.md: lr 5e-4 unscaled, 3 warm-up epochs, gradient clipping
at 1.0, batch 64, no mixup/cutmix/RandAugment/erasing, label smoothing 0.1), spelled out flag by flag for both
scripts because their parsers' defaults differ. The expansion schedule is the DeiT run script's (keep rates 0.5 0.75
1.0, r0 0.25, 2 sub-steps, stages at 0/100/200 of 300 epochs) scaled to the budget: stage s starts at epoch
(s-1)*E//S (`schedule`).

Wall time of an epoch = the training pass of that epoch (data loading, forward, backward, optimizer step), read from
the `Epoch: [e] Total time: ... (<s> s / it)` line the trainers' MetricLogger prints (s / it x iterations);
evaluation and checkpointing are left out (both evaluate the same plain ViT on all tokens). The child's CPU seconds
(user + system, whole process) are recorded too: on a shared machine they are the steadier measure of work.

Contract with tools/compare.py: one Variant, the ToE-trained plain ViT (evaluated on all tokens, the baseline's
GFLOPs), with `extra['training']` =
    {'epochs': E, 'wall_s_total', 'wall_s_per_epoch' (median), 'wall_s_per_epoch_min', 'wall_s_per_epoch_max',
     'acc1' (last epoch's top-1 on the validation set),
     'baseline_wall_s_total', 'baseline_wall_s_per_epoch', 'baseline_wall_s_per_epoch_min',
     'baseline_wall_s_per_epoch_max', 'baseline_acc1',
     'speedup': baseline_wall_s_total / wall_s_total,
     'measured': {'source': 'shipped record' | 'this run', 'device_name', 'threads', 'git_commit', 'date',
                  'runs': 'side by side' | 'back to back'},
     'commands': [ToE command, baseline command] (exact, run from the repository root),
     and for the curious: 'wall_s_epochs' / 'baseline_wall_s_epochs' (every epoch), 'cpu_s_total' /
     'baseline_cpu_s_total', 'cpu_speedup', 'run_wall_s_total' / 'baseline_run_wall_s_total' (whole processes),
     'load_avg_1min' (at the start and end of each run), 'kept_tokens_per_epoch', 'expansion_step'}
Wall times in seconds; accuracies in percent. `extra['training']` is None when the model comes from
`--toe-checkpoint` (nothing was measured).

Where it comes from: on the embedded default the shipped record shared/assets/compare/toe/<name>/ (weights,
training.json, README.md with the command that made it), unless --retrain; then both runs are trained and measured
again under <cache_dir>/toe/<name>/ (reused on the next call). `--toe-checkpoint PATH` takes a trained ToE
checkpoint instead (ImageNet presets) and trains nothing. With `ctx.quick` (tests) both runs train on 64 generated
images (FAKE) for the 3 epochs of the 3 stages.
"""
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

import torch

from shared.compare_api import MissingArtefact, Variant, artefact_dir, epochs_for, load_base_model
from shared.errors import UserError
from shared.provenance import device_name, git_commit

METHODS = ('toe',)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOE_SCRIPT = os.path.join('toe', 'deit', 'main.py')
BASELINE_SCRIPT = os.path.join('tools', 'train_baseline.py')
# 60 epochs each (half the shipped baseline's 120, stages of 20 epochs): both runs side by side took 32 min on the
# 2-core machine that made the record; 30 epochs stayed below 40 % top-1 from scratch
DEFAULT_EPOCHS = 60
# The shipped baseline's recipe, given to BOTH scripts (ToE's parser keeps DeiT's ImageNet defaults otherwise)
RECIPE = ['--lr', '5e-4', '--unscale-lr', '--warmup-epochs', '3', '--min-lr', '1e-5', '--cooldown-epochs', '0',
          '--clip-grad', '1.0', '--drop-path', '0.0', '--no-model-ema', '--aa', '', '--reprob', '0', '--mixup', '0',
          '--cutmix', '0', '--smoothing', '0.1', '--no-repeated-aug', '--print-freq', '1000000']
WEIGHTS = 'model.pth'
RECORD = 'training.json'
# the trainers' MetricLogger lines (shared/metrics.py): a progress line per print_freq steps, a total per epoch
PROGRESS_LINE = re.compile(r'^Epoch: \[(\d+)\]\s+\[\s*\d+/(\d+)\]')
TOTAL_LINE = re.compile(r'^Epoch: \[(\d+)\] Total time: \S+ \(([0-9.]+) s / it\)')


def add_args(parser):
    g = parser.add_argument_group('ToE')
    g.add_argument('--toe-keep-rates', type=float, nargs='+', default=[0.5, 0.75, 1.0],
                   help='ToE keep rate per expansion stage (the DeiT run script: 0.5 0.75 1.0)')
    g.add_argument('--toe-initialization-keep-rate', type=float, default=0.25)
    g.add_argument('--toe-expansion-multiple-stage', type=int, default=2)
    g.add_argument('--toe-batch-size', type=int, default=64, help='training batch of both runs (the baseline recipe)')
    g.add_argument('--toe-checkpoint', default='',
                   help='a trained ToE checkpoint (toe/deit/main.py output) to evaluate instead of training one, '
                        'e.g. DeiT-S + ToE on ImageNet; no training is measured then')


def schedule(epochs, keep_rates):
    """(epochs, expansion steps): every stage gets at least one epoch, stages split the run evenly."""
    stages = len(keep_rates)
    epochs = max(int(epochs), stages)
    return epochs, [s * epochs // stages for s in range(stages)]


def artefact_name(ctx, args, epochs):
    """Every setting the record depends on (a changed flag never reuses a shipped record)."""
    rates = '-'.join(f'{r:g}' for r in args.toe_keep_rates)
    data = 'quick' if ctx.quick else ctx.data_args.data_set
    return (f'{ctx.model_name}_{data}_scratch_r{rates}_r0{args.toe_initialization_keep_rate:g}'
            f'_k{args.toe_expansion_multiple_stage}_e{epochs}_b{args.toe_batch_size}_s{ctx.seed}')


def shared_argv(ctx, args, epochs, out):
    """The flags both runs get: model, data, budget, recipe, seed, device, output folder."""
    d = ctx.data_args
    argv = ['--model', ctx.model_name, '--input-size', str(d.input_size), '--epochs', str(epochs),
            '--batch-size', str(args.toe_batch_size), '--seed', str(ctx.seed), '--device', str(ctx.device),
            '--num_workers', str(d.num_workers), '--eval-crop-ratio', str(getattr(d, 'eval_crop_ratio', 0.875)),
            *RECIPE, '--output_dir', out]
    if ctx.quick:  # tests: the same code paths on 64 generated images
        argv += ['--data-set', 'FAKE', '--fake-size', '64',
                 '--fake-classes', str(ctx.model_kwargs.get('num_classes', 10))]
    else:
        argv += ['--data-set', d.data_set]
        if d.data_path:
            argv += ['--data-path', d.data_path]
    return argv


def toe_argv(args, steps):
    return ['--expansion-step', *map(str, steps), '--keep-rate', *map(str, args.toe_keep_rates),
            '--initialization-keep-rate', str(args.toe_initialization_keep_rate),
            '--expansion-multiple-stage', str(args.toe_expansion_multiple_stage)]


def shown(path):
    """A path as the record shows it: relative to the repository root when inside it."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def command_text(script, argv, threads):
    return f'OMP_NUM_THREADS={threads} python {script} ' + shlex.join(
        [shown(a) if os.path.isabs(a) else a for a in argv])


def epoch_wall_seconds(lines):
    """Training-pass seconds of each epoch from a trainer's output: s / it x iterations of every Total time line."""
    steps, seconds = {}, {}
    for line in lines:
        progress = PROGRESS_LINE.match(line)
        if progress:
            steps[int(progress.group(1))] = int(progress.group(2))
        total = TOTAL_LINE.match(line)
        if total:
            epoch = int(total.group(1))
            seconds[epoch] = float(total.group(2)) * steps[epoch]
    return [seconds[e] for e in sorted(seconds)]


class TrainingRun:
    """One training script in a child process with `threads` threads, its output in log_path."""

    def __init__(self, script, argv, threads, log_path):
        self.script, self.log_path = script, log_path
        env = {**os.environ, 'OMP_NUM_THREADS': str(threads), 'MKL_NUM_THREADS': str(threads),
               'PYTHONUNBUFFERED': '1'}
        self.load_before = os.getloadavg()[0]
        self.started = time.perf_counter()
        with open(log_path, 'w') as log:
            self.proc = subprocess.Popen([sys.executable, script, *argv], cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        self.result = None

    def poll(self):
        """True once the child has ended; then `result` holds the per-epoch training wall seconds, the whole run's
        wall and CPU seconds (this child's own, from wait4) and the machine's 1-minute load average when it started
        and ended (how busy the machine was with other work)."""
        if self.result is not None:
            return True
        pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return False
        wall = time.perf_counter() - self.started
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        with open(self.log_path) as f:
            lines = f.read().splitlines()
        if self.proc.returncode != 0:
            tail = '\n'.join(lines[-30:])
            raise UserError(f'toe: {self.script} failed (exit {self.proc.returncode}); the end of {self.log_path}:\n'
                            f'{tail}')
        self.result = {'epoch_wall_s': epoch_wall_seconds(lines), 'run_wall_s': wall,
                       'cpu_s': usage.ru_utime + usage.ru_stime,
                       'load_avg_1min': [round(self.load_before, 2), round(os.getloadavg()[0], 2)]}
        return True


def run_all(jobs, threads, side_by_side):
    """Run the (script, argv, log_path) jobs all at once (side by side) or one after the other; their results."""
    runs = []
    try:
        for job in jobs:
            runs.append(TrainingRun(*job[:2], threads, job[2]))
            while not side_by_side and not runs[-1].poll():
                time.sleep(0.2)
        while not all(run.poll() for run in runs):
            time.sleep(0.2)
    finally:
        for run in runs:
            if run.proc.returncode is None:
                run.proc.kill()
                run.proc.wait()
    return [run.result for run in runs]


def side_by_side_fits(device, threads):
    """Both runs at once when each can have its own cores: on a busy machine both then see the same load, as the
    comparison's interleaved timing does for inference; a GPU (or too few cores) runs them back to back."""
    return torch.device(device).type == 'cpu' and 2 * threads <= (os.cpu_count() or 1)


def read_log(out):
    with open(os.path.join(out, 'log.txt')) as f:
        return [json.loads(line) for line in f if line.strip()]


def seconds_summary(prefix, epoch_seconds):
    return {f'{prefix}wall_s_total': round(sum(epoch_seconds), 3),
            f'{prefix}wall_s_per_epoch': round(statistics.median(epoch_seconds), 3),
            f'{prefix}wall_s_per_epoch_min': round(min(epoch_seconds), 3),
            f'{prefix}wall_s_per_epoch_max': round(max(epoch_seconds), 3),
            f'{prefix}wall_s_epochs': [round(s, 3) for s in epoch_seconds]}


def training_record(toe_run, base_run, toe_log, base_log, steps, commands, ctx, threads):
    """The measurements of the two runs (the contract in the module docstring), 'measured' as of now."""
    record = {'epochs': len(toe_log), **seconds_summary('', toe_run['epoch_wall_s']),
              'acc1': toe_log[-1]['test_acc1'], **seconds_summary('baseline_', base_run['epoch_wall_s']),
              'baseline_acc1': base_log[-1]['test_acc1']}
    record['speedup'] = round(record['baseline_wall_s_total'] / record['wall_s_total'], 4)
    record.update(cpu_s_total=round(toe_run['cpu_s'], 1), baseline_cpu_s_total=round(base_run['cpu_s'], 1),
                  cpu_speedup=round(base_run['cpu_s'] / toe_run['cpu_s'], 4),
                  run_wall_s_total=round(toe_run['run_wall_s'], 1),
                  baseline_run_wall_s_total=round(base_run['run_wall_s'], 1),
                  load_avg_1min={'toe': toe_run['load_avg_1min'], 'baseline': base_run['load_avg_1min']},
                  kept_tokens_per_epoch=[e['train_kept_tokens'] for e in toe_log], expansion_step=steps,
                  measured={'source': 'this run', 'device_name': device_name(ctx.device), 'threads': threads,
                            'git_commit': git_commit(),
                            'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')},
                  commands=commands)
    return record


def train_and_measure(ctx, args, epochs, steps, folder):
    """ToE then the baseline, back to back, from scratch; writes folder/{model.pth, training.json, done}."""
    from shared.checkpoint import safe_load, to_timm_state_dict
    from toe.deit.main import parse_args
    from toe.deit.models import MODELS
    if ctx.model_name not in MODELS:
        raise UserError(f'toe: {ctx.model_name} is not a model of ToE/deit (known: {sorted(MODELS)})')
    threads = torch.get_num_threads()
    toe_out, base_out = os.path.join(folder, 'toe'), os.path.join(folder, 'baseline')
    toe_flags = shared_argv(ctx, args, epochs, toe_out) + toe_argv(args, steps)
    base_flags = shared_argv(ctx, args, epochs, base_out)
    parse_args(toe_flags)  # an impossible schedule exits here with the parser's message, before anything runs
    for out in (toe_out, base_out):
        os.makedirs(out, exist_ok=True)
    print(f'| toe: training ToE and the baseline from scratch, {epochs} epochs each, {threads} thread(s) each, '
          f'{"side by side" if side_by_side_fits(ctx.device, threads) else "back to back"}, into {folder}',
          flush=True)
    side_by_side = side_by_side_fits(ctx.device, threads)
    toe_run, base_run = run_all([(TOE_SCRIPT, toe_flags, os.path.join(folder, 'toe.out')),
                                 (BASELINE_SCRIPT, base_flags, os.path.join(folder, 'baseline.out'))],
                                threads, side_by_side)
    commands = [command_text(TOE_SCRIPT, toe_flags, threads), command_text(BASELINE_SCRIPT, base_flags, threads)]
    record = training_record(toe_run, base_run, read_log(toe_out), read_log(base_out), steps, commands, ctx, threads)
    record['measured']['runs'] = 'side by side' if side_by_side else 'back to back'
    # what the comparison loads: the plain ViT's weights only (no optimizer, no TokenSelect state)
    torch.save({'model': to_timm_state_dict(safe_load(os.path.join(toe_out, 'checkpoint.pth')))},
               os.path.join(folder, WEIGHTS))
    with open(os.path.join(folder, RECORD), 'w') as f:
        json.dump(record, f, indent=1)
    open(os.path.join(folder, 'done'), 'w').close()


def load_record(folder, shipped):
    with open(os.path.join(folder, RECORD)) as f:
        record = json.load(f)
    record['measured']['source'] = 'shipped record' if shipped else 'this run'
    return record


def variants(method, ctx, args):
    from shared.checkpoint import load_weights, safe_load, to_timm_state_dict
    from shared.flops import model_macs
    epochs, steps = schedule(epochs_for(ctx, DEFAULT_EPOCHS), args.toe_keep_rates)
    settings = {'keep_rate': list(args.toe_keep_rates), 'expansion_step': steps,
                'initialization_keep_rate': args.toe_initialization_keep_rate,
                'expansion_multiple_stage': args.toe_expansion_multiple_stage, 'epochs': epochs,
                'batch_size': args.toe_batch_size, 'start': 'from scratch', 'eval_tokens': 'all'}
    if args.toe_checkpoint:
        if not os.path.isfile(args.toe_checkpoint):
            raise MissingArtefact('ToE checkpoint (--toe-checkpoint)', args.toe_checkpoint,
                                  f'torchrun --nproc_per_node=N {TOE_SCRIPT} --model {ctx.model_name} '
                                  '--expansion-step 0 100 200 --keep-rate 0.5 0.75 1.0 '
                                  '--initialization-keep-rate 0.25 --expansion-multiple-stage 2 --output_dir DIR '
                                  '(toe/README.md)')
        path, record, label = args.toe_checkpoint, None, 'checkpoint'
        settings = {'checkpoint': args.toe_checkpoint, 'eval_tokens': 'all'}
    else:
        folder = artefact_dir(ctx, 'toe', artefact_name(ctx, args, epochs))
        shipped = bool(ctx.shipped_root) and os.path.dirname(os.path.dirname(folder)) == ctx.shipped_root
        if not os.path.isfile(os.path.join(folder, 'done')):
            train_and_measure(ctx, args, epochs, steps, folder)
        path, record = os.path.join(folder, WEIGHTS), load_record(folder, shipped)
        label = 'r=' + '/'.join(f'{r:g}' for r in args.toe_keep_rates)
    model = load_base_model(ctx)  # the plain ViT: ToE leaves no trace at inference
    load_weights(model, to_timm_state_dict(safe_load(path)), source=path)
    model.to(ctx.device).eval()
    return [Variant(method='toe', label=label, settings=settings, model=model, gflops=model_macs(model) / 1e9,
                    artefacts={'checkpoint': path}, extra={'training': record})]
