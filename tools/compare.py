#!/usr/bin/env python
"""Compare the token-reduction methods side by side: one backbone, one data set, one machine.

With no arguments it runs offline on the embedded default (scikit-learn's digits): the shipped small ViT baseline and
each method's shipped artefacts derived from it (shared/assets/compare/; --retrain derives them again with each
method's own code), every point evaluated on the same validation images, then a table (terminal, CSV, JSON) and plots.

    python tools/compare.py
    python tools/compare.py --methods tome,diffrate --r 2 4 --target-flops 0.03
    python tools/compare.py --preset deit_small_imagenet --weights-dir WEIGHTS --data-path /data/imagenet
    python tools/compare.py --data-set IMNET --data-path /data/imagenet --model vit_small_patch14_reg4_dinov2 \
        --checkpoint dinov2_s_finetuned.pth --input-size 224 --methods tome

Each inference point reports top-1/top-5, GFLOPs (the shared analytic convention; for data-dependent models the mean
over the evaluated images with its spread, p5/p95 and min/max), model-only throughput (ToMe's convention: eval, no
grad, warm-up thrown away, stated batch size and dtype, on real validation images so that data-dependent models run
as they would; all points timed in one interleaved loop, median and [min, max] over rounds), batch-1 latency, peak
forward memory, parameters, and what it was made from (settings, seed, SHA-256 of every weight file). Methods whose
benefit is training cost (ToE, kind 'training' in shared/methods.py) get a table of their own: wall time per epoch
and in total against the baseline recipe's, speed-up, accuracy reached. With --preset, the papers' reported numbers
stand next to each row. Output: results.txt, results.csv, training.csv, results.json (with the provenance and the
time of each phase), acc_vs_gflops.png, acc_vs_throughput.png.
"""
import argparse
import contextlib
import csv
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a plain checkout too

import torch  # noqa: E402

from shared.args import CheckedArgumentParser, check_finite_weights, load_checkpoint  # noqa: E402
from shared.compare_api import Context, MissingArtefact, Variant, make_data_args  # noqa: E402
from shared.errors import UserError, debug_requested  # noqa: E402
from shared.provenance import device_name, file_sha256 as sha256, git_commit as repo_commit  # noqa: E402,F401
from shared import methods as registry  # noqa: E402

# the methods, their hook modules and plot styles: the one registry, shared/methods.py
DEFAULT_METHODS = list(registry.NAMES)
# The embedded default's baseline, trained by tools/train_baseline.py (the command is in shared/assets/README.md), so
# that the demo spends its minutes on the methods rather than on re-training the same ViT.
SHIPPED_BASELINE = os.path.join(ROOT, 'shared', 'assets', 'vit_digits_patch4_32.pth')
# ... and each method's artefacts derived from it (shared/assets/README.md has the command and SHA-256 of each)
SHIPPED_ARTEFACTS = os.path.join(ROOT, 'shared', 'assets', 'compare')
FIELDS = ['method', 'label', 'acc1', 'acc5', 'paper_acc1', 'gflops', 'gflops_per', 'gflops_p5', 'gflops_p95',
          'gflops_min', 'gflops_max', 'paper_gflops', 'img_per_s', 'img_per_s_min', 'img_per_s_max', 'img_per_s_q1',
          'img_per_s_q3', 'speedup', 'speedup_min', 'speedup_max', 'latency_ms', 'latency_ms_min', 'latency_ms_max',
          'spread_wide', 'peak_mem_mb', 'params_m', 'throughput_batch', 'dtype', 'device', 'seed', 'settings',
          'weights', 'paper_source', 'extra']
# the training record of a training-time method (shared/compare_api.py), flattened into a row
TRAINING_RECORD_KEYS = ('epochs', 'wall_s_total', 'wall_s_per_epoch', 'wall_s_per_epoch_min', 'wall_s_per_epoch_max',
                        'acc1', 'baseline_wall_s_total', 'baseline_wall_s_per_epoch', 'baseline_wall_s_per_epoch_min',
                        'baseline_wall_s_per_epoch_max', 'baseline_acc1', 'speedup')
MEASURED_KEYS = ('source', 'device_name', 'threads', 'git_commit', 'date')
TRAINING_FIELDS = ['method', 'label', *TRAINING_RECORD_KEYS, 'acc1_evaluated', 'paper_acc1',
                   *(f'measured_{k}' for k in MEASURED_KEYS), 'settings', 'weights', 'commands', 'paper_source',
                   'extra']
# columns the CSVs write as JSON text (nested values)
JSON_FIELDS = ('settings', 'weights', 'extra', 'commands')


class ErrorExit(SystemExit):
    """Exit status 2 once the `error:` line is printed; str() is the message, for Python callers of main()."""

    def __init__(self, error):
        super().__init__(2)
        self.error = error

    def __str__(self):
        return str(self.error)


def hook_module(method):
    """The compare hook of a method (an unknown name is a UserError naming the known ones)."""
    return registry.compare_hook(method)


def known_methods():
    return ', '.join(sorted(registry.METHODS))


def get_parser(methods):
    parser = CheckedArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--methods', default=','.join(DEFAULT_METHODS),
                        help=f'comma-separated, from {known_methods()}')
    parser.add_argument('--data-set', default='DIGITS')
    parser.add_argument('--data-path', default='')
    parser.add_argument('--input-size', default=None, type=int, help='default: 32 for DIGITS, 224 otherwise')
    parser.add_argument('--model', default='vit_digits_patch4_32', help='baseline timm model name')
    parser.add_argument('--checkpoint', default='', help='baseline weights (DeiT .pth or timm state dict); default '
                        f'on DIGITS: the shipped {os.path.relpath(SHIPPED_BASELINE, ROOT)}')
    parser.add_argument('--retrain-baseline', action='store_true', help='train the DIGITS baseline with '
                        'tools/train_baseline.py (cached) instead of the shipped one')
    parser.add_argument('--baseline-epochs', default=40, type=int)
    parser.add_argument('--epochs', default=None, type=int,
                        help="override every method's training budget (default: each method's own, the one its "
                        'shipped artefact was made with)')
    parser.add_argument('--retrain', action='store_true',
                        help='derive every artefact again (cached under --cache-dir) instead of using the shipped ones '
                        f'({os.path.relpath(SHIPPED_ARTEFACTS, ROOT)}, embedded default only)')
    parser.add_argument('--cache-dir', default=os.path.join(ROOT, '.cache', 'compare'))
    parser.add_argument('--output-dir', default=os.path.join(ROOT, 'output', 'compare'))
    parser.add_argument('--batch-size', default=128, type=int, help='evaluation batch size')
    parser.add_argument('--throughput-batch', default=64, type=int)
    parser.add_argument('--dtype', default='float32', choices=['float32', 'float16', 'bfloat16'])
    parser.add_argument('--rounds', default=5, type=int,
                        help='timing rounds; each round times every point in turn (median and spread over rounds)')
    parser.add_argument('--runs', default=2, type=int, help='timed runs of a point per round')
    parser.add_argument('--wide-spread', default=0.2, type=float,
                        help='flag a row whose (max - min) / median img/s over the rounds exceeds this')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--num_workers', default=0, type=int)
    parser.add_argument('--no-plots', action='store_true')
    parser.add_argument('--quick', action='store_true', help='smallest budgets (tests)')
    parser.add_argument('--preset', default=None,
                        help="the papers' setting, e.g. deit_small_imagenet (shared/presets.py): checks that the "
                        'weight files are in --weights-dir, fills --model/--checkpoint/--input-size and the '
                        "methods' artefacts, and prints the papers' numbers next to each row")
    parser.add_argument('--weights-dir', default=None, help='the folder of the weight files a --preset needs')
    for method in dict.fromkeys(methods):
        module = hook_module(method)
        if hasattr(module, 'add_args') and not getattr(parser, f'_added_{module.__name__}', False):
            module.add_args(parser)
            setattr(parser, f'_added_{module.__name__}', True)
    if {'tome', 'tocom'} & set(methods):
        # the project's spelling of ToMe's r (tools/flops.py, tools/benchmark.py, the README's sweep)
        parser.add_argument('--r', dest='tome_r', type=int, nargs='+', default=argparse.SUPPRESS,
                            help='the same as --tome-r')
    return parser


def parse_methods(argv):
    """The requested methods; by default every method whose hook module is importable (the others are named)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument('--methods', default=None)
    known, _ = pre.parse_known_args(argv)
    if known.methods is None:
        methods = []
        for m in DEFAULT_METHODS:
            try:
                hook_module(m)
                methods.append(m)
            except ImportError as e:
                print(f'| skipping {m}: its compare hook {registry.get(m).compare} cannot be imported ({e})')
        return methods
    methods = [m.strip() for m in known.methods.split(',') if m.strip()]
    if not methods:
        raise UserError(f"--methods {known.methods!r} names no method; known methods: {known_methods()}")
    for m in methods:
        registry.get(m)  # an unknown name: the error lists the known ones
    return methods


# lr 1e-3 unscaled with a short warm-up: DeiT's linear scaling gives 6e-5 at batch 64, far too little for a ViT
# learning 1,437 digits from scratch in tens of epochs.
BASELINE_RECIPE = ['--lr', '1e-3', '--unscale-lr', '--warmup-epochs', '3', '--print-freq', '1000']


def ensure_baseline(args):
    """The baseline checkpoint: given, or trained on the embedded digits by the shared DeiT trainer (cached)."""
    if args.checkpoint:
        if not os.path.isfile(args.checkpoint):
            raise MissingArtefact('baseline checkpoint', args.checkpoint,
                                  'python tools/train_baseline.py --output_dir DIR (or a DeiT/timm checkpoint)')
        return args.checkpoint
    if args.data_set != 'DIGITS':
        raise UserError(f'--checkpoint is required outside the embedded DIGITS data set (--data-set {args.data_set})')
    if args.model == 'vit_digits_patch4_32' and not args.retrain_baseline and os.path.isfile(SHIPPED_BASELINE):
        return SHIPPED_BASELINE
    out = os.path.join(args.cache_dir, f'baseline_{args.model}_e{args.baseline_epochs}_s{args.seed}')
    ckpt = os.path.join(out, 'checkpoint.pth')
    if not os.path.isfile(os.path.join(out, 'done')):
        print(f'| training the baseline {args.model} on DIGITS ({args.baseline_epochs} epochs) into {out}')
        cmd = [sys.executable, os.path.join(ROOT, 'tools', 'train_baseline.py'), '--model', args.model,
               '--epochs', str(args.baseline_epochs), '--output_dir', out, '--seed', str(args.seed),
               '--device', args.device, *BASELINE_RECIPE]
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-4000:])
            raise UserError('baseline training failed (its output is above): ' + ' '.join(cmd))
        last = [line for line in proc.stdout.splitlines() if line.startswith('* Acc@1')]
        print(f'| baseline trained: {last[-1] if last else "(no evaluation line)"}')
        open(os.path.join(out, 'done'), 'w').close()
    return ckpt


def default_input_size(model_name):
    """The input size a timm model is built for (its pretrained config), None when it has none."""
    from timm.models import get_pretrained_cfg
    try:
        cfg = get_pretrained_cfg(model_name)
    except (RuntimeError, ValueError):
        return None
    return int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else None


def backbone_kwargs(args, state, ckpt, input_size):
    """How to build the baseline for its checkpoint: num_classes from its head, the image size of --input-size
    (passed only where it differs from the model's own default, so that a model built without it stays as it was),
    and the preset's kwargs (MAE's pooling)."""
    head = state.get('head.weight')
    if head is None:
        raise UserError(f'--checkpoint {ckpt} has no classification head (head.weight): compare evaluates top-1, so '
                        'it needs a classifier checkpoint (a fine-tuned model, not a self-supervised backbone)')
    kwargs = {'num_classes': int(head.shape[0])}
    if input_size != default_input_size(args.model):
        kwargs['img_size'] = input_size
    kwargs.update(getattr(args, 'model_kwargs', None) or {})
    return kwargs


def fit_checkpoint(args, state, ckpt, model_kwargs):
    """The checkpoint path the methods load: `ckpt` itself when it fits the model built with `model_kwargs`, else a
    copy (cached under --cache-dir) whose position embedding (and patch embedding) timm resampled to the model's
    grid: a checkpoint trained at 518 px evaluated at --input-size 224, say."""
    from shared.models import create_model
    from timm.models.vision_transformer import checkpoint_filter_fn
    try:
        with torch.device('meta'):  # shapes only: no memory, no initialisation
            model = create_model(args.model, **model_kwargs)
    except (RuntimeError, ValueError, TypeError) as e:
        raise UserError(f'--model {args.model}: {e}') from None
    own = model.state_dict()
    if all(k in own and own[k].shape == v.shape for k, v in state.items() if hasattr(v, 'shape')):
        return ckpt
    fitted = checkpoint_filter_fn(dict(state), model)
    if any(k in own and own[k].shape != v.shape for k, v in fitted.items() if hasattr(v, 'shape')):
        return ckpt  # not a resolution difference: loading names the mismatched keys
    out = os.path.join(args.cache_dir, 'baseline_fitted',
                       f'{sha256(ckpt)[:16]}_{args.model}_{model_kwargs.get("img_size", "default")}.pth')
    if not os.path.isfile(out):
        from shared.checkpoint import atomic_save
        atomic_save({'model': fitted}, out)
    print(f'| {ckpt}: position embedding resampled by timm to the model\'s grid ({out})')
    return out


def build_context(args):
    from shared.checkpoint import to_timm_state_dict
    input_size = args.input_size or (32 if args.data_set == 'DIGITS' else default_input_size(args.model) or 224)
    ckpt = ensure_baseline(args)
    state = to_timm_state_dict(load_checkpoint(ckpt, '--checkpoint'))
    check_finite_weights(state, ckpt, '--checkpoint')
    model_kwargs = backbone_kwargs(args, state, ckpt, input_size)
    base = fit_checkpoint(args, state, ckpt, model_kwargs)
    data_args = make_data_args(args.data_set, args.data_path, input_size, args.batch_size, args.num_workers, args.seed)
    return Context(base_checkpoint=base, model_name=args.model, model_kwargs=model_kwargs, data_args=data_args,
                   cache_dir=args.cache_dir, device=torch.device(args.device), seed=args.seed,
                   epochs=args.epochs, artefacts={}, quick=args.quick, retrain=args.retrain,
                   shipped_root=SHIPPED_ARTEFACTS if ckpt == SHIPPED_BASELINE else None)


def baseline_variant(ctx):
    from shared.compare_api import load_base_model
    from shared.flops import model_macs
    model = load_base_model(ctx).eval()
    return Variant(method='baseline', label='full', settings={'model': ctx.model_name}, model=model,
                   gflops=model_macs(model) / 1e9, artefacts={'baseline': ctx.base_checkpoint})


def timing_batch(val_loader, size):
    """The first `size` validation images (repeated when the validation set is smaller), so that data-dependent
    models run as they would on real data."""
    images = torch.cat([x for x, _ in val_loader], 0)
    if images.shape[0] < size:
        images = images.repeat((size + images.shape[0] - 1) // images.shape[0], 1, 1, 1)
    return images[:size]


def logits_forward(variant):
    """x -> logits of a variant (its own forward may also return per-batch figures)."""
    forward = variant.forward or (lambda m, x: m(x))

    def run(x):
        out = forward(variant.model, x)
        return out[0] if isinstance(out, tuple) else out
    return run


class GflopsRecorder:
    """A variant's forward for the evaluation that keeps the GFLOPs of every image it reports.

    shared.engine.evaluate averages one number per batch (weighted by the batch size); a forward may return a 1-D
    tensor of per-image GFLOPs instead, so this wrapper hands the engine that batch's mean (the engine's arithmetic
    is unchanged: a float passes through as it is) and keeps the per-image values for the spread. A float from the
    forward is a batch mean: its images are recorded at that value ('batch')."""

    def __init__(self, forward):
        self.forward = forward or (lambda m, x: m(x))
        self.values = []
        self.per = None      # 'image' or 'batch' once a forward reported GFLOPs

    def __call__(self, model, images):
        out = self.forward(model, images)
        if not isinstance(out, tuple) or 'gflops' not in out[1]:
            return out
        logits, figures = out
        value = figures['gflops']
        if torch.is_tensor(value) and value.dim() == 1:
            per_image = value.detach().to('cpu', torch.float64)
            if per_image.numel() != images.shape[0]:
                raise ValueError(f"a forward returned {per_image.numel()} per-image GFLOPs for {images.shape[0]} "
                                 'images')
            self.per = 'image'
            value = float(per_image.mean())
        else:
            value = float(value)
            per_image = torch.full((images.shape[0],), value, dtype=torch.float64)
            self.per = self.per or 'batch'
        self.values.append(per_image)
        return logits, {**figures, 'gflops': value}

    def spread(self):
        """{'p5', 'p95', 'min', 'max'} over the recorded images (None when nothing was recorded)."""
        if not self.values:
            return None
        from tools.flops import distribution
        stats = distribution(torch.cat(self.values))
        return {k: stats[k] for k in ('p5', 'p95', 'min', 'max')}


SPREAD_KEYS = ('p5', 'p95', 'min', 'max')


def gflops_fields(mean, recorder):
    """The row's GFLOPs: the mean with its spread over the evaluated images (0 wide for a static model)."""
    if mean is None:
        return {'gflops': None, 'gflops_per': None, **{f'gflops_{k}': None for k in SPREAD_KEYS}}
    spread = recorder.spread()
    if spread is None:  # static: every image costs the same
        spread, per = {k: float(mean) for k in SPREAD_KEYS}, 'static'
    else:
        per = recorder.per
    return {'gflops': round(float(mean), 6), 'gflops_per': per,
            **{f'gflops_{k}': round(v, 6) for k, v in spread.items()}}


def spread_is_wide(spread, limit):
    """A spread (shared.benchmark's {median, min, max, ...}) whose range is more than `limit` of its median."""
    return (spread['max'] - spread['min']) / spread['median'] > limit


def time_points(variants, batch, ctx, args):
    """Throughput and batch-1 latency of every point, each timed in ONE interleaved loop over all points (rounds x
    runs), so that a machine whose speed drifts shifts every point alike. Returns one dict of row fields per variant."""
    from shared.benchmark import interleaved_seconds, speedup_table
    dtype = getattr(torch, args.dtype)
    rounds, runs = (3, 1) if args.quick else (args.rounds, args.runs)
    for v in variants:
        v.model.to(ctx.device).eval()
    batch = batch.to(ctx.device)
    fields = [{} for _ in variants]
    for size, repeat in ((batch.shape[0], runs), (1, runs * 2)):
        start = time.time()
        print(f'| timing {len(variants)} points at batch {size}: {rounds} rounds x {repeat} runs each, interleaved',
              flush=True)
        forwards = {i: announce_first_call(logits_forward(v), f'|   warm-up [{i + 1}/{len(variants)}] '
                                           f'{v.method} {v.label}') for i, v in enumerate(variants)}
        seconds = interleaved_seconds(forwards, batch[:size], rounds=rounds, runs=repeat, dtype=dtype)
        print(f'| timing at batch {size} done in {time.time() - start:.1f} s', flush=True)
        if size == batch.shape[0]:
            table = speedup_table(seconds, size, baseline=0)
            for i, f in enumerate(fields):
                img_s, speedup = table[i]['img_per_s'], table[i]['speedup']
                f.update({'img_per_s': round(img_s['median'], 1), 'img_per_s_min': round(img_s['min'], 1),
                          'img_per_s_max': round(img_s['max'], 1), 'img_per_s_q1': round(img_s['q1'], 1),
                          'img_per_s_q3': round(img_s['q3'], 1), 'speedup': round(speedup['median'], 3),
                          'speedup_min': round(speedup['min'], 3), 'speedup_max': round(speedup['max'], 3),
                          'spread_wide': spread_is_wide(img_s, args.wide_spread)})
        else:
            for i, f in enumerate(fields):
                lat = sorted(1000.0 * s for s in seconds[i])
                f.update({'latency_ms': round(statistics.median(lat), 3), 'latency_ms_min': round(lat[0], 3),
                          'latency_ms_max': round(lat[-1], 3)})
    return fields


def announce_first_call(fn, line):
    """fn that prints `line` on its first call: the warm-up calls, before any timed one."""
    state = {'first': True}

    def run(x):
        if state['first']:
            state['first'] = False
            print(line, flush=True)
        return fn(x)
    return run


def evaluate_variant(variant, ctx, val_loader):
    """Top-1/top-5 and the GFLOPs of a variant on the comparison's validation data (shared.engine.evaluate)."""
    from shared.engine import evaluate
    model = variant.model.to(ctx.device).eval()
    recorder = GflopsRecorder(variant.forward)
    with contextlib.redirect_stdout(io.StringIO()):  # the engine's log lines; compare prints its own
        stats = evaluate(val_loader, model, ctx.device, forward_fn=recorder, print_freq=10 ** 9,
                         header=f'Test {variant.method} {variant.label}:')
    return stats, recorder


def measure(variant, ctx, val_loader, args, batch=None):
    """Every figure of one point but its timing (time_points), on the same validation data as every other point;
    `batch`: timing_batch(val_loader, args.throughput_batch), made once for every point."""
    from shared.benchmark import peak_forward_memory_mb
    device = ctx.device
    stats, recorder = evaluate_variant(variant, ctx, val_loader)
    batch = timing_batch(val_loader, args.throughput_batch) if batch is None else batch
    mem = peak_forward_memory_mb(lambda: logits_forward(variant)(batch.to(device)), device)
    params = sum(p.numel() for p in variant.model.parameters())
    return {
        'method': variant.method, 'label': variant.label, 'acc1': round(stats['acc1'], 3),
        'acc5': round(stats['acc5'], 3), **gflops_fields(stats.get('gflops', variant.gflops), recorder),
        'peak_mem_mb': round(mem, 2),
        'params_m': round(params / 1e6, 4), 'throughput_batch': int(batch.shape[0]), 'dtype': args.dtype,
        'device': str(device), 'seed': ctx.seed, 'settings': variant.settings, 'weights': weights_of(variant),
        # what a method reports beyond the inference figures
        'extra': dict(variant.extra),
    }


def weights_of(variant):
    """{name: {path, sha256}} of the files a variant was made from."""
    return {name: {'path': os.path.relpath(p, ROOT) if p.startswith(ROOT) else p, 'sha256': sha256(p)}
            for name, p in variant.artefacts.items() if p and os.path.isfile(p)}


def training_row(variant, ctx, val_loader):
    """The row of a training-time method: its training record (variant.extra['training'], the contract in
    shared/compare_api.py) and the top-1 of the model it trained, evaluated here on the comparison's images."""
    record = variant.extra.get('training') or {}
    measured = record.get('measured') or {}
    row = {'method': variant.method, 'label': variant.label}
    row.update({k: record.get(k) for k in TRAINING_RECORD_KEYS})
    row['acc1_evaluated'] = None
    if variant.model is not None:
        row['acc1_evaluated'] = round(evaluate_variant(variant, ctx, val_loader)[0]['acc1'], 3)
    row.update({f'measured_{k}': measured.get(k) for k in MEASURED_KEYS})
    row.update(settings=variant.settings, weights=weights_of(variant), commands=record.get('commands') or [],
               extra={k: v for k, v in variant.extra.items() if k != 'training'})
    if not record:
        print(f'| {variant.method} {variant.label}: no training record (extra["training"]): only its top-1 is '
              'reported', flush=True)
    return row


def figures_from(row):
    """Where a training row's figures come from, in words for the table."""
    source = row.get('measured_source')
    if source is None:
        return 'no record'
    if source == 'this run':
        return 'measured by this run'
    return f'{source} ({row.get("measured_date") or "undated"}, {row.get("measured_device_name") or "?"}, ' \
           f'{row.get("measured_threads") or "?"} thread(s))'


def git_commit():
    return repo_commit(ROOT)


def provenance(args):
    """What the numbers depend on besides the models: code version, libraries, machine, precision, batch sizes."""
    import timm
    return {'git_commit': git_commit(), 'python': platform.python_version(), 'torch': torch.__version__,
            'timm': timm.__version__, 'device': args.device, 'device_name': device_name(args.device),
            'torch_threads': torch.get_num_threads(), 'dtype': args.dtype, 'eval_batch_size': args.batch_size,
            'throughput_batch': args.throughput_batch, 'data_set': args.data_set, 'model': args.model}


def pareto_front(rows, x_key, y_key, x_better_low):
    """Points not dominated in (x, accuracy): sorted along x."""
    pts = sorted(rows, key=lambda r: r[x_key], reverse=not x_better_low)
    front, best = [], -float('inf')
    for r in pts:
        if r[y_key] > best:
            front.append(r)
            best = r[y_key]
    return front


def _csv_value(row, key):
    return json.dumps(row.get(key), sort_keys=True) if key in JSON_FIELDS else row.get(key)


def write_csv(path, fields, rows, prov):
    """One row per dict, nested values as JSON text; the provenance repeated on every row (columns 'prov_*') so that
    a plain CSV reader keeps it."""
    prov_columns = {f'prov_{k}': v for k, v in prov.items()}
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=fields + list(prov_columns))
        w.writeheader()
        for r in rows:
            w.writerow({**{k: _csv_value(r, k) for k in fields}, **prov_columns})


def _num(value, fmt, width):
    return f'{"-":>{width}}' if value is None else f'{value:>{width}{fmt}}'


def inference_table(rows, args, with_paper):
    header = (f"{'method':<10} {'setting':<22} {'Acc@1':>7} {'Acc@5':>7} {'GFLOPs':>9} {'[p5, p95]':>17} "
              f"{'img/s':>9} {'[min, max]':>17} {'lat ms':>8} {'mem MB':>8} {'params M':>9}")
    if with_paper:
        header += f" {'paper Acc@1':>11} {'paper GFLOPs':>12}"
    lines = [header, '-' * len(header)]
    for r in rows:
        gspread = (f"[{r['gflops_p5']:.4f}, {r['gflops_p95']:.4f}]" if r.get('gflops_per') in ('image', 'batch')
                   else '')
        line = (f"{r['method']:<10} {r['label'][:22]:<22} {r['acc1']:>7.2f} {r['acc5']:>7.2f} "
                f"{_num(r['gflops'], '.4f', 9)} {gspread:>17} {r['img_per_s']:>9.1f} "
                f"{'[%.0f, %.0f]%s' % (r['img_per_s_min'], r['img_per_s_max'], '!' if r['spread_wide'] else ' '):>17} "
                f"{r['latency_ms']:>8.2f} {r['peak_mem_mb']:>8.2f} {r['params_m']:>9.3f}")
        if with_paper:
            line += f" {_num(r.get('paper_acc1'), '.2f', 11)} {_num(r.get('paper_gflops'), '.2f', 12)}"
        lines.append(line)
    lines.append(f"throughput: batch {rows[0]['throughput_batch']}, {rows[0]['dtype']}, {rows[0]['device']}; "
                 f'seed {rows[0]["seed"]}')
    lines.append('img/s: median over the timing rounds, all points interleaved, [min, max] over rounds; '
                 f'! marks a spread (max - min) / median above {args.wide_spread:g}')
    lines.append('GFLOPs: mean over the evaluated images; [p5, p95] over the images where the cost depends on them')
    return lines


def training_table(rows, with_paper):
    if not rows:
        return []
    header = (f"{'method':<10} {'setting':<16} {'epochs':>6} {'s/epoch':>8} {'[min, max]':>15} {'total s':>8} "
              f"{'base s/ep':>9} {'[min, max]':>15} {'base tot':>8} {'speed-up':>8} {'Acc@1':>7} {'base Acc@1':>10} "
              f"{'eval Acc@1':>10}")
    if with_paper:
        header += f" {'paper Acc@1':>11}"
    lines = ['', 'training-time methods: the benefit is training cost; the trained model is a plain ViT, so it is '
             'not an inference point', header, '-' * len(header)]
    for r in rows:
        def rng(prefix):
            lo, hi = r.get(f'{prefix}wall_s_per_epoch_min'), r.get(f'{prefix}wall_s_per_epoch_max')
            return '' if lo is None or hi is None else f'[{lo:.1f}, {hi:.1f}]'
        line = (f"{r['method']:<10} {r['label'][:16]:<16} {_num(r.get('epochs'), 'd', 6)} "
                f"{_num(r.get('wall_s_per_epoch'), '.2f', 8)} {rng(''):>15} {_num(r.get('wall_s_total'), '.1f', 8)} "
                f"{_num(r.get('baseline_wall_s_per_epoch'), '.2f', 9)} {rng('baseline_'):>15} "
                f"{_num(r.get('baseline_wall_s_total'), '.1f', 8)} {_num(r.get('speedup'), '.3f', 8)} "
                f"{_num(r.get('acc1'), '.2f', 7)} {_num(r.get('baseline_acc1'), '.2f', 10)} "
                f"{_num(r.get('acc1_evaluated'), '.2f', 10)}")
        if with_paper:
            line += f" {_num(r.get('paper_acc1'), '.2f', 11)}"
        lines.append(line)
        lines.append(f"{'':<10} figures: {figures_from(r)}")
    lines.append('wall s: training pass per epoch (median [min, max]) and in total, the method and the baseline recipe '
                 'trained with the same budget; speed-up = baseline total / method total; eval Acc@1: the trained '
                 'model evaluated by this run')
    return lines


def write_reports(rows, training_rows, args, phases=None):
    """results.txt/csv/json, training.csv and the two plots; returns the paths written."""
    os.makedirs(args.output_dir, exist_ok=True)
    prov = provenance(args)
    out = {name: os.path.join(args.output_dir, name)
           for name in ('results.txt', 'results.csv', 'training.csv', 'results.json')}
    with open(out['results.json'], 'w') as f:
        json.dump({'provenance': prov, 'preset': getattr(args, 'preset', None), 'rows': rows,
                   'training_rows': training_rows, 'phases_s': phases or {}, 'command': sys.argv,
                   'time': time.strftime('%Y-%m-%d %H:%M:%S')}, f, indent=2)
    write_csv(out['results.csv'], FIELDS, rows, prov)
    write_csv(out['training.csv'], TRAINING_FIELDS, training_rows, prov)
    with_paper = bool(getattr(args, 'preset', None))
    table = '\n'.join(inference_table(rows, args, with_paper) + training_table(training_rows, with_paper))
    with open(out['results.txt'], 'w') as f:
        f.write(table + '\n')
    print(table)
    written = [out[n] for n in ('results.txt', 'results.csv', 'training.csv', 'results.json')]
    if not args.no_plots:
        written += plot(rows, args.output_dir, prov)
    return written


def plot_subtitle(prov):
    """The provenance line under every plot's title."""
    return (f"{prov['data_set']}, {prov['model']} | {prov['device_name']} ({prov['device']}), {prov['dtype']}, "
            f"throughput batch {prov['throughput_batch']}, {prov['torch_threads']} thread(s) | "
            f"commit {prov['git_commit'][:12]}{'+dirty' if prov['git_commit'].endswith('+dirty') else ''}")


PLOTS = (('gflops', 'GFLOPs (MACs) per image', True, 'acc_vs_gflops.png'),
         ('img_per_s', 'throughput (img/s)', False, 'acc_vs_throughput.png'))


def plot(rows, out_dir, prov):
    """acc_vs_gflops.png and acc_vs_throughput.png; returns their paths."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    paths = []
    for x_key, x_label, low_better, name in PLOTS:
        fig = draw_plot(rows, x_key, x_label, low_better, prov)
        paths.append(os.path.join(out_dir, name))
        fig.savefig(paths[-1])
        plt.close(fig)
    return paths


def x_error(row, x_key):
    """(below, above) the point: throughput [min, max] over rounds, data-dependent GFLOPs [p5, p95]."""
    if x_key == 'img_per_s':
        return row['img_per_s'] - row['img_per_s_min'], row['img_per_s_max'] - row['img_per_s']
    if row.get('gflops_per') in ('image', 'batch'):
        return row['gflops'] - row['gflops_p5'], row['gflops_p95'] - row['gflops']
    return 0.0, 0.0


def point_label(row):
    return 'baseline' if row['method'] == 'baseline' else f"{registry_title(row['method'])} {row['label']}"


def registry_title(method):
    return registry.METHODS[method].title if method in registry.METHODS else method


LABEL_FONT = 6.5


def draw_plot(rows, x_key, x_label, low_better, prov, dpi=120):
    """One accuracy-vs-x figure: a marker and colour per method (shared/methods.py), error bars, the Pareto front,
    and point labels laid out without overlaps (tools/label_layout.py), on leader lines where points crowd."""
    import matplotlib.pyplot as plt
    from tools.label_layout import Box, needs_leader, place_labels
    rows = [r for r in rows if r.get(x_key) is not None]
    fig, ax = plt.subplots(figsize=(9, 5.6), dpi=dpi)
    fig.subplots_adjust(left=0.08, right=0.80, top=0.88, bottom=0.1)
    for method in dict.fromkeys(r['method'] for r in rows):
        pts = [r for r in rows if r['method'] == method]
        marker, color = registry.style(method)
        xs, ys = [r[x_key] for r in pts], [r['acc1'] for r in pts]
        errors = [x_error(r, x_key) for r in pts]
        if any(lo or hi for lo, hi in errors):
            ax.errorbar(xs, ys, xerr=[[lo for lo, _ in errors], [hi for _, hi in errors]], fmt='none', ecolor=color,
                        elinewidth=0.8, capsize=2.5, alpha=0.8, zorder=2)
        # ToMe is drawn as rings so that a ToCom point at the same place (zero-FLOPs folded compensator) shows
        hollow = method == 'tome'
        ax.scatter(xs, ys, marker=marker, s=120 if hollow else 55, label=registry_title(method),
                   zorder=4 if hollow else 3,
                   **({'facecolors': 'none', 'edgecolors': color, 'linewidths': 1.4} if hollow else {'color': color}))
    front = pareto_front(rows, x_key, 'acc1', low_better)
    ax.plot([r[x_key] for r in front], [r['acc1'] for r in front], '--', color='gray', lw=0.9, zorder=1,
            label='Pareto front')
    _fit_limits(ax, rows, x_key)
    ax.set_xlabel(x_label)
    ax.set_ylabel('top-1 accuracy (%)')
    fig.suptitle(f'top-1 vs {x_label}', fontsize=11, y=0.975)
    ax.set_title(plot_subtitle(prov), fontsize=7, color='dimgray', wrap=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    # labels: measured in pixels on the finished axes, then laid out
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [point_label(r) for r in rows]
    sizes = []
    for text in texts:
        probe = ax.text(0, 0, text, fontsize=LABEL_FONT)
        extent = probe.get_window_extent(renderer)
        sizes.append((extent.width, extent.height))
        probe.remove()
    points = [tuple(ax.transData.transform((r[x_key], r['acc1']))) for r in rows]
    bb = ax.get_window_extent(renderer)
    marker_px = 6.0 * dpi / 72
    boxes = place_labels(points, sizes, Box(bb.x0 + 2, bb.y0 + 2, bb.x1 - 2, bb.y1 - 2), marker_radius=marker_px)
    for row, text, point, box in zip(rows, texts, points, boxes):
        color = registry.style(row['method'])[1]
        leader = needs_leader(point, box, marker_radius=marker_px, others=points)
        ax.annotate(text, xy=(row[x_key], row['acc1']), xytext=(box.x0 - point[0], box.y0 - point[1]),
                    textcoords='offset pixels', ha='left', va='bottom', fontsize=LABEL_FONT, color='black',
                    zorder=5, annotation_clip=False,
                    # readable where it crosses an error bar or the front
                    bbox=dict(boxstyle='square,pad=0.1', facecolor='white', edgecolor='none', alpha=0.75),
                    arrowprops=dict(arrowstyle='-', color=color, lw=0.8, shrinkA=0, shrinkB=2)
                    if leader else None)
    return fig


def _fit_limits(ax, rows, x_key):
    """Axis limits around the points and their error bars, with room for the labels."""
    lo = min(r[x_key] - x_error(r, x_key)[0] for r in rows)
    hi = max(r[x_key] + x_error(r, x_key)[1] for r in rows)
    span = (hi - lo) or abs(hi) or 1.0
    ax.set_xlim(lo - 0.12 * span, hi + 0.12 * span)
    acc = [r['acc1'] for r in rows]
    span = (max(acc) - min(acc)) or 1.0
    ax.set_ylim(min(acc) - 0.15 * span, max(acc) + 0.15 * span)


def check_args(args, parser):
    for v in getattr(args, 'target_flops', None) or ():
        if not v > 0:
            parser.error(f'--target-flops {v}: must be a positive number of GFLOPs')
    return args


def main(argv=None):
    """The command line; a user error prints one `error:` line and raises ErrorExit (SystemExit, status 2)."""
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        if debug_requested():
            raise
        print(f'error: {e}', file=sys.stderr, flush=True)
        raise ErrorExit(e) from None


def apply_preset(args, parser):
    """--preset: the papers' setting (shared/presets.py checks the weight files and fills the flags)."""
    if not args.preset:
        return args
    from shared.presets import apply_preset as fill
    return fill(args, parser)


def paper_columns(preset, row):
    """paper_acc1 / paper_gflops / paper_source of a row: what the paper reports for the same setting, if any."""
    reference = None
    if preset:
        from shared.presets import paper_reference
        reference = paper_reference(preset, row)
    reference = reference or {}
    return {'paper_acc1': reference.get('acc1'), 'paper_gflops': reference.get('gflops'),
            'paper_source': reference.get('source')}


class Phases:
    """Wall seconds of each phase of the run, printed at the end and stored in results.json."""

    def __init__(self):
        self.seconds = {}
        self.start = time.time()

    @contextlib.contextmanager
    def __call__(self, name):
        start = time.time()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.time() - start, 2)

    def summary(self):
        total = round(time.time() - self.start, 2)
        return {**self.seconds, 'total': total}


def run(argv):
    methods = parse_methods(argv)
    parser = get_parser(methods)
    args = apply_preset(check_args(parser.parse_args(argv), parser), parser)
    if args.preset:  # the preset may have chosen the methods
        methods = [m.strip() for m in str(args.methods).split(',') if m.strip()]
    torch.manual_seed(args.seed)
    phases = Phases()
    with phases('baseline'):
        ctx = build_context(args)
        ctx.artefacts = {k: v for k, v in vars(args).items() if k.endswith('_path') and k != 'data_path' and v}
        from shared.datasets import build_dataset
        dataset_val, _ = build_dataset(False, ctx.data_args)
        val_loader = torch.utils.data.DataLoader(dataset_val, batch_size=args.batch_size, shuffle=False,
                                                 num_workers=args.num_workers)
        variants = [baseline_variant(ctx)]
    for method in methods:
        start = time.time()
        print(f'| {method}: start', flush=True)
        with phases(f'derive {method}'):
            try:
                made = hook_module(method).variants(method, ctx, args)
            except UserError as e:
                raise UserError(f'{method}: {e}') from None
        print(f'| {method}: done, {len(made)} point(s) in {time.time() - start:.1f} s', flush=True)
        variants.extend(made)
    training = [v for v in variants if v.method in registry.METHODS and registry.get(v.method).kind == 'training']
    inference = [v for v in variants if v not in training]
    rows, training_rows = [], []
    batch = timing_batch(val_loader, args.throughput_batch)
    with phases('evaluate'):
        for i, v in enumerate(inference):
            start = time.time()
            rows.append(measure(v, ctx, val_loader, args, batch))
            print(f'| evaluated [{i + 1}/{len(inference)}] {v.method} {v.label}: top-1 {rows[-1]["acc1"]:.2f}, '
                  f'GFLOPs {_num(rows[-1]["gflops"], ".4f", 0)} ({time.time() - start:.1f} s)', flush=True)
        for v in training:
            training_rows.append(training_row(v, ctx, val_loader))
            print(f'| evaluated {v.method} {v.label} (training-time method): top-1 '
                  f'{_num(training_rows[-1]["acc1_evaluated"], ".2f", 0)}', flush=True)
    with phases('timing'):
        timings = time_points(inference, batch, ctx, args)
    for row, timing in zip(rows, timings):
        row.update(timing)
    for row in rows + training_rows:
        row.update(paper_columns(args.preset, row))
    with phases('reports'):
        # results.json keeps the phases up to here; the line below adds the reports' own seconds
        written = write_reports(rows, training_rows, args, phases.summary())
    summary = phases.summary()
    print('| time per phase: ' + ', '.join(f'{k} {v:.1f} s' for k, v in summary.items()), flush=True)
    print('| results written to:')
    for path in written:
        print(f'|   {path}')
    return rows


if __name__ == '__main__':
    main()  # prints one `error:` line for a user error (ErrorExit)
