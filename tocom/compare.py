"""tools/compare.py protocol for ToMe and ToCom (see shared/compare_api.py).

- `tome`: the baseline ViT, ToMe-patched (proportional attention), run off the shelf at each r of `--tome-r`.
- `tocom`: the same, plus a Token Compensator pre-trained by ToCom's own entry script (tocom/main.py, `--r_src -1`:
  frozen baseline, self-distillation from the plain ToMe model over random (r_tgt, r_src) pairs) on the comparison
  data. The baseline counts as the downstream model trained at r_src = `--tocom-r-src` (0: it never merged); each
  variant runs at r_tgt with the compensator folded into qkv, so its GFLOPs equal ToMe's at the same r.

Sweep: r = 3, 4, 5. The digits ViT has 64 patch tokens and 12 blocks, so r = 5 leaves 6 tokens after the last block
and r = 6 runs out of tokens; r <= 2 costs nothing (98.6 % at r = 2 against the baseline's 98.3 %), so the points
where merging costs accuracy, and where a compensator or a searched schedule can win something back, are 3..5.

Budget: the paper pre-trains the compensator for 10 ImageNet epochs at batch 1024 and lr 1e-3 (2e-3 after DeiT's
batch scaling), about 12,500 steps of AdamW. Here the compensator is small (12 blocks x q, v x 2 x 64 x 2S weights)
and the data 1,437 digits: DEFAULT_EPOCHS (10) epochs of 22 steps at batch 64 with the paper's effective lr 2e-3, unscaled
(DeiT's scaling to batch 64 would give 2.5e-4, which leaves the zero-initialised compensator where it started in a
few hundred steps). The shipped compensator (shared/assets/compare/tocom/<name>/, its README has the command) was made
with these defaults; `--retrain`, `--epochs` or any other setting trains one into `<cache_dir>/tocom` instead.
Pre-training sees the images as the baseline was trained on them (no mixup, cutmix, random erasing, drop path:
shared/assets/README.md); no RandAugment, whose top posterize magnitude PIL >= 10 refuses.
"""
import contextlib
import io
import os

import torch

from shared.compare_api import MissingArtefact, Variant, artefact_dir, epochs_for, load_base_model
from tocom.measure import model_gflops

METHODS = ('tome', 'tocom')

DEFAULT_R = (3, 4, 5)
DEFAULT_EPOCHS = 10
DEFAULT_LR = 2e-3
COMPENSATOR_FILE = 'compensator.pth'
# the baseline's own training recipe (tools/train_baseline.py): what the frozen backbone has seen
BASELINE_RECIPE = ('--aa', '', '--mixup', '0', '--cutmix', '0', '--reprob', '0', '--drop-path', '0')


def add_args(parser):
    g = parser.add_argument_group('ToMe / ToCom')
    g.add_argument('--tome-r', type=int, nargs='+', default=list(DEFAULT_R),
                   help='tokens merged per layer, one variant each (DiffRate searches at the same GFLOPs)')
    g.add_argument('--tocom-r-src', type=int, default=0, help='the r the baseline was trained with')
    g.add_argument('--tocom-scale', type=float, default=0.1, help='compensation scale s (README: 0.05..0.15)')
    g.add_argument('--tocom-lr', type=float, default=DEFAULT_LR,
                   help="pre-training lr as used (DeiT's batch scaling off; the paper's 1e-3 at batch 1024 scales to "
                   '2e-3)')
    g.add_argument('--tocom-path', default='', help='a pre-trained compensator (tocom/main.py --r_src -1) instead of '
                   'pre-training one on the comparison data')


def _tome_model(ctx):
    from shared.tome import apply_patch
    return apply_patch(load_base_model(ctx), prop_attn=True).eval()


def tome_gflops(ctx, r):
    """GFLOPs of the baseline under ToMe at r (what the ToMe and ToCom variants report; DiffRate's default targets)."""
    return model_gflops(load_base_model(ctx), r)


def artefact_name(ctx, args, steps):
    """Every setting the compensator depends on (the baseline aside: shipped ones exist for the shipped baseline)."""
    return (f'{ctx.model_name}_steps{steps}_e{epochs_for(ctx, DEFAULT_EPOCHS)}_lr{args.tocom_lr:g}'
            f'_scale{args.tocom_scale:g}_s{ctx.seed}')


def _pretrain_compensator(ctx, args, steps):
    """The compensator file: given, shipped, cached, or pre-trained now through tocom/main.py on the comparison data
    into the cache (where only its weights are kept in `compensator.pth`)."""
    given = ctx.artefacts.get('tocom_path')
    if given:
        if not os.path.isfile(given):
            raise MissingArtefact('ToCom compensator', given, 'python tocom/main.py --r_src -1 ... (README)')
        return given
    out = artefact_dir(ctx, 'tocom', artefact_name(ctx, args, steps))
    path = os.path.join(out, COMPENSATOR_FILE)
    if os.path.isfile(os.path.join(out, 'done')):
        return path
    from tocom.main import get_args_parser, main
    d = ctx.data_args
    argv = ['--model', f'{ctx.model_name}_tocom', '--teacher-model', ctx.model_name,
            '--finetune', ctx.base_checkpoint, '--teacher-path', ctx.base_checkpoint,
            '--distillation-type', 'soft', '--distillation-alpha', '1.0', '--r_src', '-1',
            '--warmup-epochs', '0', '--lr', str(args.tocom_lr), '--unscale-lr',
            '--epochs', str(epochs_for(ctx, DEFAULT_EPOCHS)),
            '--tocom_scale', str(args.tocom_scale), '--tocom_steps', str(steps),
            '--data-set', d.data_set, '--input-size', str(d.input_size), '--batch-size', str(min(d.batch_size, 64)),
            '--output_dir', out, '--device', str(ctx.device), '--num_workers', str(d.num_workers),
            '--seed', str(ctx.seed), '--no-model-ema', '--print-freq', '1000000', *BASELINE_RECIPE]
    if d.data_path:
        argv += ['--data-path', d.data_path]
    targs = get_args_parser().parse_args(argv)
    if ctx.quick:
        targs.fake_size = 64
    with contextlib.redirect_stdout(io.StringIO()):
        main(targs)
    _keep_compensator_only(os.path.join(out, 'checkpoint.pth'), path)
    open(os.path.join(out, 'done'), 'w').close()
    return path


def _keep_compensator_only(checkpoint, path):
    """What a variant loads, without the optimizer, scheduler and RNG states of the training checkpoint."""
    from shared.checkpoint import safe_load
    state = safe_load(checkpoint)['model']
    torch.save({'model': {k: v for k, v in state.items() if '.q_tocom.' in k or '.v_tocom.' in k}}, path)


def variants(method, ctx, args):
    from tocom.models import add_compensator, fold_compensator, load_compensator, set_r
    rs = sorted(set(args.tome_r))
    made = []
    if method == 'tome':
        for r in rs:
            model = _tome_model(ctx)
            model.r = r
            made.append(Variant(method='tome', label=f'r={r}', settings={'r': r, 'prop_attn': True}, model=model,
                                gflops=model_gflops(model, r), artefacts={'baseline': ctx.base_checkpoint}))
        return made

    steps = max(rs + [args.tocom_r_src])
    path = _pretrain_compensator(ctx, args, steps)
    for r in rs:
        model = add_compensator(_tome_model(ctx), 2 * steps, args.tocom_scale, steps)
        load_compensator(model, path)
        set_r(model, r, args.tocom_r_src)
        folded = fold_compensator(model, r, args.tocom_r_src).eval()
        trained = {} if ctx.artefacts.get('tocom_path') else {'pretrain_epochs': epochs_for(ctx, DEFAULT_EPOCHS),
                                                               'pretrain_lr': args.tocom_lr}
        made.append(Variant(method='tocom', label=f'r={r}',
                            settings={'r_tgt': r, 'r_src': args.tocom_r_src, 'tocom_scale': args.tocom_scale,
                                      'tocom_steps': steps, 'folded': True, **trained},
                            model=folded, gflops=model_gflops(folded, r),
                            artefacts={'baseline': ctx.base_checkpoint, 'tocom_path': path}))
    return made
