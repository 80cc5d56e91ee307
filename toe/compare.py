"""tools/compare.py protocol for ToE (see shared/compare_api.py).

ToE is a training accelerator: it changes how a ViT is trained, not what runs at inference. The variant is the
baseline architecture trained WITH token expansion by ToE's own DeiT entry script (toe.deit.main.main, in process),
starting from the baseline's weights through `--finetune` (weights only: a fresh optimizer and a fresh epoch-0
schedule, so the expansion stages run from their first one; `--resume` would instead continue the baseline's
finished schedule at its last epoch, past every expansion step). The schedule is the DeiT run script's
(`--keep-rate 0.5 0.75 1.0 --initialization-keep-rate 0.25 --expansion-multiple-stage 2`, steps at 0/100/200 of 300
epochs) scaled to the budget: E = max(epochs, stages) (epochs: `epochs_for(ctx, 2)`) epochs, stage s starting at epoch (s-1)*E//S. With
`ctx.quick` (tests) the same run trains on 64 generated images (FAKE) instead of the comparison data.

The trained model is evaluated as the plain ViT on all tokens (its GFLOPs are the baseline's). `extra` carries the
training figures from the run's log.txt: `total_train_time` (forward+backward+step seconds, the paper's measure) per
epoch and in total, the kept tokens per epoch, and the training speed-up against full-token training measured within
the run: epochs x (mean time of the full-token epochs) / total time (None when no epoch trained on all tokens).
"""
import contextlib
import io
import json
import os

from shared.compare_api import epochs_for, Variant, load_base_model

METHODS = ('toe',)


def add_args(parser):
    g = parser.add_argument_group('ToE')
    g.add_argument('--toe-keep-rates', type=float, nargs='+', default=[0.5, 0.75, 1.0],
                   help='ToE keep rate per expansion stage (the DeiT run script: 0.5 0.75 1.0)')
    g.add_argument('--toe-initialization-keep-rate', type=float, default=0.25)
    g.add_argument('--toe-expansion-multiple-stage', type=int, default=2)
    g.add_argument('--toe-lr', type=float, default=4e-3,
                   help='base lr before DeiT linear scaling (x batch 64 / 512 = 5e-4, a fine-tuning lr)')


def schedule(epochs, keep_rates):
    """(epochs, expansion steps): every stage gets at least one epoch, stages split the run evenly."""
    stages = len(keep_rates)
    epochs = max(int(epochs), stages)
    return epochs, [s * epochs // stages for s in range(stages)]


def _train_argv(ctx, args, epochs, steps, out):
    d = ctx.data_args
    argv = ['--model', ctx.model_name, '--finetune', ctx.base_checkpoint,
            '--expansion-step', *map(str, steps), '--keep-rate', *map(str, args.toe_keep_rates),
            '--initialization-keep-rate', str(args.toe_initialization_keep_rate),
            '--expansion-multiple-stage', str(args.toe_expansion_multiple_stage),
            '--epochs', str(epochs), '--lr', str(args.toe_lr), '--warmup-epochs', '0',
            '--data-set', d.data_set, '--input-size', str(d.input_size), '--batch-size', str(min(d.batch_size, 64)),
            '--eval-crop-ratio', str(getattr(d, 'eval_crop_ratio', 0.875)),
            '--output_dir', out, '--device', str(ctx.device), '--num_workers', str(d.num_workers),
            '--seed', str(ctx.seed), '--no-model-ema', '--print-freq', '1000000', '--drop-path', '0.0',
            # a few epochs of fine-tuning on 32 px digits: no RandAugment / mixup / erasing (as the baseline's recipe)
            '--aa', '', '--mixup', '0', '--cutmix', '0', '--reprob', '0']
    if d.data_path:
        argv += ['--data-path', d.data_path]
    return argv


def train(ctx, args):
    """Run toe/deit/main.py's main on the comparison data (cached); returns (checkpoint path, log entries)."""
    from toe.deit.main import parse_args, main
    from toe.deit.models import MODELS
    if ctx.model_name not in MODELS:
        raise SystemExit(f'toe: {ctx.model_name} is not a model of ToE/deit (known: {sorted(MODELS)})')
    epochs, steps = schedule(epochs_for(ctx, 2), args.toe_keep_rates)
    rates = '-'.join(f'{r:g}' for r in args.toe_keep_rates)
    out = os.path.join(ctx.cache_dir, 'toe', f'{ctx.model_name}_r{rates}_r0{args.toe_initialization_keep_rate:g}'
                                             f'_k{args.toe_expansion_multiple_stage}_e{epochs}_lr{args.toe_lr:g}'
                                             f'_s{ctx.seed}{"_quick" if ctx.quick else ""}')
    if not os.path.isfile(os.path.join(out, 'done')):
        targs = parse_args(_train_argv(ctx, args, epochs, steps, out))  # schedule checks (clear errors) here
        for key in ('fake_size', 'fake_classes', 'inat_category'):
            if hasattr(ctx.data_args, key):
                setattr(targs, key, getattr(ctx.data_args, key))
        if ctx.quick:  # tests: the same code path on 64 generated images instead of the data set
            targs.data_set, targs.fake_size = 'FAKE', 64
            targs.fake_classes = ctx.model_kwargs.get('num_classes', 10)
        with contextlib.redirect_stdout(io.StringIO()):
            main(targs)
        open(os.path.join(out, 'done'), 'w').close()
    with open(os.path.join(out, 'log.txt')) as f:
        log = [json.loads(line) for line in f if line.strip()]
    return os.path.join(out, 'checkpoint.pth'), log, steps


def training_figures(log, num_patches):
    times = [e['train_total_train_time'] for e in log]
    kept = [e['train_kept_tokens'] for e in log]
    full = [t for t, k in zip(times, kept) if k == num_patches]
    speedup = len(times) * (sum(full) / len(full)) / sum(times) if full and sum(times) > 0 else None
    return {'total_train_time_s': round(sum(times), 3), 'epoch_train_time_s': [round(t, 3) for t in times],
            'kept_tokens_per_epoch': kept, 'train_speedup_vs_full_tokens': round(speedup, 3) if speedup else None,
            'final_train_loss': log[-1].get('train_loss') if log else None}


def variants(method, ctx, args):
    from shared.checkpoint import load_weights, safe_load, to_timm_state_dict
    from shared.flops import model_macs
    path, log, steps = train(ctx, args)
    model = load_base_model(ctx)  # the plain ViT: ToE leaves no trace at inference
    load_weights(model, to_timm_state_dict(safe_load(path)), source=path)
    model.to(ctx.device).eval()
    settings = {'keep_rate': list(args.toe_keep_rates), 'expansion_step': steps,
                'initialization_keep_rate': args.toe_initialization_keep_rate,
                'expansion_multiple_stage': args.toe_expansion_multiple_stage, 'epochs': len(log),
                'lr': args.toe_lr, 'start': 'finetune from baseline', 'eval_tokens': 'all'}
    label = 'r=' + '/'.join(f'{r:g}' for r in args.toe_keep_rates)
    return [Variant(method='toe', label=label, settings=settings, model=model, gflops=model_macs(model) / 1e9,
                    artefacts={'baseline': ctx.base_checkpoint, 'checkpoint': path},
                    extra=training_figures(log, model.patch_embed.num_patches))]
