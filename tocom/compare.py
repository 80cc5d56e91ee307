"""tools/compare.py protocol for ToMe and ToCom (see shared/compare_api.py).

- `tome`: the baseline ViT, ToMe-patched (proportional attention), run off the shelf at each r of `--tome-r`.
- `tocom`: the same, plus a Token Compensator pre-trained by ToCom's own entry script (tocom/main.py, `--r_src -1`:
  frozen baseline, self-distillation from the plain ToMe model over random (r_tgt, r_src) pairs) for `ctx.epochs` on
  the comparison data, cached under `<cache_dir>/tocom`. The baseline counts as the downstream model trained at
  r_src = `--tocom-r-src` (0: it never merged); each variant runs at r_tgt with the compensator folded into qkv, so
  its GFLOPs equal ToMe's at the same r.
"""
import contextlib
import io
import os

from shared.compare_api import epochs_for, MissingArtefact, Variant, load_base_model
from tocom.measure import model_gflops

METHODS = ('tome', 'tocom')


def add_args(parser):
    g = parser.add_argument_group('ToMe / ToCom')
    g.add_argument('--tome-r', type=int, nargs='+', default=[2, 4], help='tokens merged per layer, one variant each')
    g.add_argument('--tocom-r-src', type=int, default=0, help='the r the baseline was trained with')
    g.add_argument('--tocom-scale', type=float, default=0.1, help='compensation scale s (README: 0.05..0.15)')
    g.add_argument('--tocom-lr', type=float, default=1e-3, help='pre-training base lr (README: 1e-3)')
    g.add_argument('--tocom-path', default='', help='a pre-trained compensator (tocom/main.py --r_src -1) instead of '
                   'pre-training one on the comparison data')


def _tome_model(ctx):
    from shared.tome import apply_patch
    return apply_patch(load_base_model(ctx), prop_attn=True).eval()


def _pretrain_compensator(ctx, args, steps):
    """ToCom pre-training through tocom/main.py on the comparison data; returns the compensator checkpoint path."""
    given = ctx.artefacts.get('tocom_path')
    if given:
        if not os.path.isfile(given):
            raise MissingArtefact('ToCom compensator', given, 'python tocom/main.py --r_src -1 ... (README)')
        return given
    out = os.path.join(ctx.cache_dir, 'tocom', f'{ctx.model_name}_steps{steps}_e{epochs_for(ctx, 2)}_s{ctx.seed}')
    path = os.path.join(out, 'checkpoint.pth')
    if os.path.isfile(os.path.join(out, 'done')):
        return path
    from tocom.main import get_args_parser, main
    d = ctx.data_args
    argv = ['--model', f'{ctx.model_name}_tocom', '--teacher-model', ctx.model_name,
            '--finetune', ctx.base_checkpoint, '--teacher-path', ctx.base_checkpoint,
            '--distillation-type', 'soft', '--distillation-alpha', '1.0', '--r_src', '-1',
            '--warmup-epochs', '0', '--lr', str(args.tocom_lr), '--epochs', str(epochs_for(ctx, 2)),
            '--tocom_scale', str(args.tocom_scale), '--tocom_steps', str(steps),
            '--data-set', d.data_set, '--input-size', str(d.input_size), '--batch-size', str(min(d.batch_size, 64)),
            '--output_dir', out, '--device', str(ctx.device), '--num_workers', str(d.num_workers),
            '--seed', str(ctx.seed), '--no-model-ema', '--print-freq', '1000000',
            # a few epochs on 32 px digits learn more without RandAugment
            '--aa', '']
    if d.data_path:
        argv += ['--data-path', d.data_path]
    targs = get_args_parser().parse_args(argv)
    if ctx.quick:
        targs.fake_size = 64
    with contextlib.redirect_stdout(io.StringIO()):
        main(targs)
    open(os.path.join(out, 'done'), 'w').close()
    return path


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
        made.append(Variant(method='tocom', label=f'r={r}',
                            settings={'r_tgt': r, 'r_src': args.tocom_r_src, 'tocom_scale': args.tocom_scale,
                                      'tocom_steps': steps, 'folded': True},
                            model=folded, gflops=model_gflops(folded, r),
                            artefacts={'baseline': ctx.base_checkpoint, 'tocom_path': path}))
    return made
