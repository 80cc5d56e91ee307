#!/usr/bin/env python
"""Compare the token-reduction methods side by side: one backbone, one data set, one machine.

With no arguments it runs offline on the embedded default (scikit-learn's digits): it trains a small ViT baseline
(or reuses it from the cache), derives each method's models from it with the method's own code (ToMe and ToCom with a
compensator trained on the fly, DiffRate searches, A-ViT fine-tuning, TAVT distillation + search, ToE training), then
evaluates every point on the same validation images and writes a table (terminal, CSV, JSON) and plots.

    python tools/compare.py
    python tools/compare.py --methods tome,diffrate --r 2 4 --target-flops 0.03
    python tools/compare.py --methods tome,tocom --r 2 4 6
    python tools/compare.py --data-set IMNET --data-path /data/imagenet --model deit_small_patch16_224 \
        --checkpoint deit_small.pth --input-size 224 --tocom-path tocom.pth ...

Each point reports top-1/top-5, GFLOPs (the shared analytic convention; data-dependent ones averaged over the
evaluated images), model-only throughput (ToMe's convention: eval, no grad, warm-up thrown away, stated batch size and
dtype, on real validation images so that data-dependent models run as they would), batch-1 latency, peak forward
memory, parameters, and what it was made from (settings, seed, SHA-256 of every weight file).
"""
import argparse
import csv
import hashlib
import importlib
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
from shared import methods as registry  # noqa: E402

# the methods, their hook modules and plot styles: the one registry, shared/methods.py
DEFAULT_METHODS = list(registry.NAMES)
# The embedded default's baseline, trained by tools/train_baseline.py (the command is in shared/assets/README.md), so
# that the demo spends its minutes on the methods rather than on re-training the same ViT.
SHIPPED_BASELINE = os.path.join(ROOT, 'shared', 'assets', 'vit_digits_patch4_32.pth')
# ... and each method's artefacts derived from it (shared/assets/README.md has the command and SHA-256 of each)
SHIPPED_ARTEFACTS = os.path.join(ROOT, 'shared', 'assets', 'compare')
FIELDS = ['method', 'label', 'acc1', 'acc5', 'gflops', 'img_per_s', 'img_per_s_min', 'img_per_s_max',
          'img_per_s_q1', 'img_per_s_q3', 'speedup', 'latency_ms', 'latency_ms_min', 'latency_ms_max', 'spread_wide',
          'peak_mem_mb', 'params_m',
          'throughput_batch', 'dtype', 'device', 'seed', 'settings', 'weights', 'extra']
# columns the CSV writes as JSON text (nested values)
JSON_FIELDS = ('settings', 'weights', 'extra')


class ErrorExit(SystemExit):
    """Exit status 2 once the `error:` line is printed; str() is the message, for Python callers of main()."""

    def __init__(self, error):
        super().__init__(2)
        self.error = error

    def __str__(self):
        return str(self.error)


def hook_module(method):
    """The compare hook of a method (an unknown name is a UserError naming the known ones)."""
    return importlib.import_module(registry.get(method).compare)


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
    parser.add_argument('--retrain-baseline', action='store_true',
                        help='train the DIGITS baseline with tools/train_baseline.py (cached) instead of the shipped one')
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


def sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


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


def build_context(args):
    from shared.checkpoint import to_timm_state_dict
    input_size = args.input_size or (32 if args.data_set == 'DIGITS' else 224)
    ckpt = ensure_baseline(args)
    state = to_timm_state_dict(load_checkpoint(ckpt, '--checkpoint'))
    check_finite_weights(state, ckpt, '--checkpoint')
    head = state.get('head.weight')
    model_kwargs = {'num_classes': int(head.shape[0]) if head is not None else 1000}
    if input_size != 224 or args.model == 'vit_digits_patch4_32':
        model_kwargs['img_size'] = input_size
    data_args = make_data_args(args.data_set, args.data_path, input_size, args.batch_size, args.num_workers, args.seed)
    return Context(base_checkpoint=ckpt, model_name=args.model, model_kwargs=model_kwargs, data_args=data_args,
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
    forwards = {i: logits_forward(v) for i, v in enumerate(variants)}
    batch = batch.to(ctx.device)
    big = speedup_table(interleaved_seconds(forwards, batch, rounds=rounds, runs=runs, dtype=dtype),
                        batch.shape[0], baseline=0)
    one = interleaved_seconds(forwards, batch[:1], rounds=rounds, runs=runs * 2, dtype=dtype)
    fields = []
    for i in range(len(variants)):
        img_s, lat = big[i]['img_per_s'], sorted(1000.0 * s for s in one[i])
        fields.append({
            'img_per_s': round(img_s['median'], 1), 'img_per_s_min': round(img_s['min'], 1),
            'img_per_s_max': round(img_s['max'], 1), 'img_per_s_q1': round(img_s['q1'], 1),
            'img_per_s_q3': round(img_s['q3'], 1), 'speedup': round(big[i]['speedup']['median'], 3),
            'latency_ms': round(statistics.median(lat), 3), 'latency_ms_min': round(lat[0], 3),
            'latency_ms_max': round(lat[-1], 3), 'spread_wide': spread_is_wide(img_s, args.wide_spread)})
    return fields


def measure(variant, ctx, val_loader, args):
    """Every figure of one point but its timing (time_points), on the same validation data as every other point."""
    from shared.benchmark import peak_forward_memory_mb
    from shared.engine import evaluate
    device = ctx.device
    model = variant.model.to(device).eval()
    forward = variant.forward or (lambda m, x: m(x))
    stats = evaluate(val_loader, model, device, forward_fn=forward, print_freq=10 ** 9,
                     header=f'Test {variant.method} {variant.label}:')
    gflops = stats.get('gflops', variant.gflops)
    batch = timing_batch(val_loader, args.throughput_batch)
    mem = peak_forward_memory_mb(lambda: logits_forward(variant)(batch.to(device)), device)
    params = sum(p.numel() for p in model.parameters())
    weights = {name: {'path': os.path.relpath(p, ROOT) if p.startswith(ROOT) else p, 'sha256': sha256(p)}
               for name, p in variant.artefacts.items() if p and os.path.isfile(p)}
    return {
        'method': variant.method, 'label': variant.label, 'acc1': round(stats['acc1'], 3),
        'acc5': round(stats['acc5'], 3), 'gflops': round(float(gflops), 6) if gflops is not None else None,
        'peak_mem_mb': round(mem, 2),
        'params_m': round(params / 1e6, 4), 'throughput_batch': int(batch.shape[0]), 'dtype': args.dtype,
        'device': str(device), 'seed': ctx.seed, 'settings': variant.settings, 'weights': weights,
        # what a method reports beyond the inference figures (ToE: its training time and speed-up)
        'extra': dict(variant.extra),
    }


def git_commit():
    """HEAD of the checkout this file is in, with '+dirty' when tracked files differ from it; 'unknown' outside git."""
    def git(*cmd):
        return subprocess.run(['git', *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              timeout=30)
    try:
        head = git('rev-parse', 'HEAD')
        if head.returncode != 0:
            return 'unknown'
        dirty = git('status', '--porcelain', '--untracked-files=no').stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
    return head.stdout.strip() + ('+dirty' if dirty else '')


def device_name(device):
    """The GPU's name, or the CPU's model name (platform.processor() is empty on most Linux systems)."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or 'unknown'


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


def write_reports(rows, args):
    os.makedirs(args.output_dir, exist_ok=True)
    prov = provenance(args)
    with open(os.path.join(args.output_dir, 'results.json'), 'w') as f:
        json.dump({'provenance': prov, 'rows': rows, 'command': sys.argv,
                   'time': time.strftime('%Y-%m-%d %H:%M:%S')}, f, indent=2)
    # the CSV repeats the provenance on every row (columns 'prov_*') so that a plain CSV reader keeps it
    prov_columns = {f'prov_{k}': v for k, v in prov.items()}
    with open(os.path.join(args.output_dir, 'results.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=FIELDS + list(prov_columns))
        w.writeheader()
        for r in rows:
            w.writerow({**r, **{k: json.dumps(r[k], sort_keys=True) for k in JSON_FIELDS}, **prov_columns})
    header = f"{'method':<10} {'setting':<22} {'Acc@1':>7} {'Acc@5':>7} {'GFLOPs':>9} {'img/s':>9} " \
             f"{'[min, max]':>17} {'lat ms':>8} {'mem MB':>8} {'params M':>9}"
    lines = [header, '-' * len(header)]
    for r in rows:
        lines.append(f"{r['method']:<10} {r['label'][:22]:<22} {r['acc1']:>7.2f} {r['acc5']:>7.2f} "
                     f"{r['gflops']:>9.4f} {r['img_per_s']:>9.1f} "
                     f"{'[%.0f, %.0f]%s' % (r['img_per_s_min'], r['img_per_s_max'], '!' if r['spread_wide'] else ' '):>17} "
                     f"{r['latency_ms']:>8.2f} {r['peak_mem_mb']:>8.2f} "
                     f"{r['params_m']:>9.3f}")
    lines.append(f"throughput: batch {rows[0]['throughput_batch']}, {rows[0]['dtype']}, {rows[0]['device']}; "
                 f'seed {rows[0]["seed"]}')
    lines.append(f'img/s: median over the timing rounds, all points interleaved, [min, max] over rounds; '
                 f'! marks a spread (max - min) / median above {args.wide_spread:g}')
    table = '\n'.join(lines)
    with open(os.path.join(args.output_dir, 'results.txt'), 'w') as f:
        f.write(table + '\n')
    print(table)
    written = [os.path.join(args.output_dir, n) for n in ('results.txt', 'results.csv', 'results.json')]
    if not args.no_plots:
        plot(rows, args.output_dir)
        written += [os.path.join(args.output_dir, n) for n in ('acc_vs_gflops.png', 'acc_vs_throughput.png')]
    print('| results written to:')
    for path in written:
        print(f'|   {path}')
    return written


def plot(rows, out_dir):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    for x_key, x_label, low_better, name in (('gflops', 'GFLOPs (MACs)', True, 'acc_vs_gflops.png'),
                                             ('img_per_s', 'throughput (img/s)', False, 'acc_vs_throughput.png')):
        fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
        for method in dict.fromkeys(r['method'] for r in rows):
            pts = [r for r in rows if r['method'] == method]
            # ToMe is drawn as rings so that a ToCom point at the same place (zero-FLOPs folded compensator) shows
            hollow = method == 'tome'
            marker, color = registry.style(method)
            ax.scatter([r[x_key] for r in pts], [r['acc1'] for r in pts], marker=marker,
                       s=150 if hollow else 60, label=method, zorder=4 if hollow else 3,
                       **({'facecolors': 'none', 'edgecolors': color, 'linewidths': 1.5} if hollow
                          else {'color': color}))
            for r in pts:
                ax.annotate(f"{method} {r['label']}" if method != 'baseline' else 'baseline', (r[x_key], r['acc1']),
                            fontsize=6, xytext=(5, -9 if hollow else 4), textcoords='offset points')
        front = pareto_front(rows, x_key, 'acc1', low_better)
        ax.plot([r[x_key] for r in front], [r['acc1'] for r in front], '--', color='gray', zorder=2,
                label='Pareto front')
        ax.set_xlabel(x_label)
        ax.set_ylabel('top-1 accuracy (%)')
        ax.set_title(f'top-1 vs {x_label}  (throughput batch {rows[0]["throughput_batch"]}, {rows[0]["dtype"]}, '
                     f'{rows[0]["device"]})', fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name))
        plt.close(fig)


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


def run(argv):
    methods = parse_methods(argv)
    parser = get_parser(methods)
    args = check_args(parser.parse_args(argv), parser)
    torch.manual_seed(args.seed)
    ctx = build_context(args)
    ctx.artefacts = {k: v for k, v in vars(args).items() if k.endswith('_path') and k != 'data_path' and v}
    from shared.datasets import build_dataset
    from tqdm import tqdm
    dataset_val, _ = build_dataset(False, ctx.data_args)
    val_loader = torch.utils.data.DataLoader(dataset_val, batch_size=args.batch_size, shuffle=False,
                                             num_workers=args.num_workers)
    variants = [baseline_variant(ctx)]
    for method in tqdm(methods, desc='deriving methods', disable=None):
        start = time.time()
        print(f'| {method}: start', flush=True)
        try:
            made = hook_module(method).variants(method, ctx, args)
        except UserError as e:
            raise UserError(f'{method}: {e}') from None
        print(f'| {method}: done, {len(made)} point(s) in {time.time() - start:.1f} s', flush=True)
        variants.extend(made)
    rows = [measure(v, ctx, val_loader, args) for v in tqdm(variants, desc='measuring', disable=None)]
    print(f'| timing {len(variants)} points in one interleaved loop')
    for row, timing in zip(rows, time_points(variants, timing_batch(val_loader, args.throughput_batch), ctx, args)):
        row.update(timing)
    write_reports(rows, args)
    return rows


if __name__ == '__main__':
    main()  # prints one `error:` line for a user error (ErrorExit)
