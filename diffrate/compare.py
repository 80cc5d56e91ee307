"""tools/compare.py protocol for DiffRate (see shared/compare_api.py).

One variant per `--target-flops`: DiffRate's own search (diffrate/main.py's `main`: its loaders, AdamW on the proxies
only, cosine schedule, engine with CE + lambda * (GFLOPs - target)^2, per-epoch evaluation, schedule written to
`compression_rate.json`) runs for `ctx.epochs` on the comparison data, starting from the baseline weights, and the
learned (prune, merge) kept numbers are cached under `<cache_dir>/diffrate`. The variant is the baseline with
DiffRate's DeiT patch (class-token classifier, block 0 never compressed) in eval mode applying that schedule; its
GFLOPs are DiffRate's formula (the project's convention) for the schedule.

How the weights enter the search: the baseline is not one of the reference's model names, so the hook builds the
patched model itself (timm model + baseline state dict + DiffRate's DeiT patch) and hands it to `main(args, model)`,
which runs the search in train mode as the entry script's `--weights` does for a named model (its `--finetune`, as the
reference's, would put the search in eval mode, where the proxies get no gradient and nothing is learned).

FLOPs weight: DiffRate's lambda = 5 is tuned for GFLOPs of DeiT scale (the penalty is a squared difference in
GFLOPs). A 0.045-GFLOPs digits ViT makes that penalty ~1e-3 of the classification loss, so the search would ignore
the target. `--diffrate-flops-weight` (default: 5 x (1.254 / baseline GFLOPs)^2, i.e. DeiT-T's balance) restores the
reference's balance; 5 gives the reference's literal value.

Everything else is the entry script's defaults (mixup/cutmix, random erasing, drop path 0.1 during the search) but
RandAugment, which PIL >= 10 refuses at its top posterize magnitude. Default targets: 70 % and 50 % of the
baseline's GFLOPs. `ctx.quick` (tests) searches on 128 generated images of the same size (FAKE) instead.
"""
import contextlib
import io
import os

from shared.compare_api import epochs_for, MissingArtefact, Variant, load_base_model

METHODS = ('diffrate',)

DEIT_TINY_GFLOPS = 1.254  # the reference's smallest model, whose penalty balance the default weight reproduces
DEFAULT_TARGET_RATIOS = (0.7, 0.5)


def add_args(parser):
    g = parser.add_argument_group('DiffRate')
    g.add_argument('--target-flops', type=float, nargs='+', default=None,
                   help='GFLOPs targets, one search each (default: 70%% and 50%% of the baseline)')
    g.add_argument('--diffrate-granularity', type=int, default=4, help='gap between kept-number candidates')
    g.add_argument('--diffrate-arch-lr', type=float, default=0.01, help='AdamW lr of the proxies (reference: 0.01)')
    g.add_argument('--diffrate-arch-min-lr', type=float, default=0.001, help='cosine floor (reference: 0.001)')
    g.add_argument('--diffrate-batch-size', type=int, default=64, help='search batch size')
    g.add_argument('--diffrate-flops-weight', type=float, default=None,
                   help='lambda of the FLOPs penalty (default: scaled to the baseline, see diffrate/compare.py)')
    g.add_argument('--diffrate-schedule-path', default=None,
                   help='a compression_rate.json-format file with schedules for the baseline (skips the search)')


def base_gflops(ctx):
    from shared.flops import model_macs
    return model_macs(load_base_model(ctx)) / 1e9


def default_targets(ctx):
    full = base_gflops(ctx)
    return [round(full * r, 4) for r in DEFAULT_TARGET_RATIOS]


def flops_weight(ctx, args):
    if args.diffrate_flops_weight is not None:
        return args.diffrate_flops_weight
    from diffrate.engine import FLOPS_WEIGHT
    return FLOPS_WEIGHT * (DEIT_TINY_GFLOPS / base_gflops(ctx)) ** 2


def patched_model(ctx, granularity, **kwargs):
    """The baseline with DiffRate's DeiT patch (block 0 uncompressed, class-token classifier)."""
    from diffrate.vit import apply_deit_patch
    return apply_deit_patch(load_base_model(ctx, **kwargs), granularity, granularity)


@contextlib.contextmanager
def _flops_weight(value):
    """The engine reads its module constant at every epoch; set it for this search only."""
    from diffrate import engine
    saved = engine.FLOPS_WEIGHT
    engine.FLOPS_WEIGHT = value
    try:
        yield
    finally:
        engine.FLOPS_WEIGHT = saved


def _search_dir(ctx, args, target):
    return os.path.join(ctx.cache_dir, 'diffrate',
                        f'{ctx.model_name}_t{target:g}_g{args.diffrate_granularity}_e{epochs_for(ctx, 2)}'
                        f'_lr{args.diffrate_arch_lr:g}_w{flops_weight(ctx, args):.4g}_s{ctx.seed}'
                        + ('_quick' if ctx.quick else ''))


def read_schedule(path, model_name, target):
    """(prune, merge) of `model_name` at `target` from a compression_rate.json-format file, any display name."""
    from diffrate import schedules
    table = schedules.read_table(path)
    name = schedules.MODEL_KEYS.get(model_name, model_name)
    key = schedules.target_key(target)
    if name not in table or key not in table[name]:
        raise KeyError(f'{path} has no schedule for {name} at {key} GFLOPs; it has {schedules.available(table)}')
    leaf = table[name][key]
    return schedules._parse_list(leaf['prune_kept_num']), schedules._parse_list(leaf['merge_kept_num'])


def search(ctx, args, target):
    """DiffRate's search at `target` through diffrate/main.py; returns the compression_rate.json it wrote (cached)."""
    out = _search_dir(ctx, args, target)
    path = os.path.join(out, 'compression_rate.json')
    if os.path.isfile(os.path.join(out, 'done')):
        return path
    from diffrate.main import get_args_parser, main
    d = ctx.data_args
    argv = ['--model', ctx.model_name, '--data-set', d.data_set, '--input-size', str(d.input_size),
            '--batch-size', str(args.diffrate_batch_size), '--epochs', str(epochs_for(ctx, 2)),
            '--target_flops', str(target), '--granularity', str(args.diffrate_granularity),
            '--arch-lr', str(args.diffrate_arch_lr), '--arch-min-lr', str(args.diffrate_arch_min_lr),
            '--output_dir', out, '--device', str(ctx.device), '--num_workers', str(d.num_workers),
            '--seed', str(ctx.seed), '--print-freq', '1000000',
            # no RandAugment: its posterize at the top magnitude asks PIL for 0 bits, which PIL >= 10 refuses
            '--aa', '']
    if d.data_path:
        argv += ['--data-path', d.data_path]
    if ctx.quick:  # tests: a few batches of generated images of the same size instead of a pass over the data
        argv[argv.index('--data-set') + 1] = 'FAKE'
    sargs = get_args_parser().parse_args(argv)
    sargs.fake_size, sargs.fake_classes = 128, ctx.model_kwargs.get('num_classes', 10)
    os.makedirs(out, exist_ok=True)
    model = patched_model(ctx, sargs.granularity, drop_rate=sargs.drop, drop_path_rate=sargs.drop_path)
    log = io.StringIO()
    with _flops_weight(flops_weight(ctx, args)), contextlib.redirect_stdout(log):
        main(sargs, model)
    with open(os.path.join(out, 'search.log'), 'w') as f:
        f.write(log.getvalue())
    open(os.path.join(out, 'done'), 'w').close()
    return path


def variants(method, ctx, args):
    targets = args.target_flops or default_targets(ctx)
    given = ctx.artefacts.get('diffrate_schedule_path') or getattr(args, 'diffrate_schedule_path', None)
    if given and not os.path.isfile(given):
        raise MissingArtefact('DiffRate schedule file', given,
                              f'python diffrate/main.py --model {ctx.model_name} --target_flops T --output_dir DIR ... '
                              '(it writes DIR/compression_rate.json)')
    made = []
    for target in targets:
        path = given or search(ctx, args, target)
        prune, merge = read_schedule(path, ctx.model_name, target)
        model = patched_model(ctx, args.diffrate_granularity)
        model.set_kept_num(prune, merge)
        model.eval()
        settings = {'target_flops': target, 'prune_kept_num': prune, 'merge_kept_num': merge,
                    'granularity': args.diffrate_granularity, 'search_epochs': None if given else epochs_for(ctx, 2),
                    'arch_lr': args.diffrate_arch_lr, 'flops_weight': None if given else flops_weight(ctx, args)}
        made.append(Variant(method='diffrate', label=f'target={target:g}', settings=settings, model=model,
                            gflops=model.calculate_flop_inference() / 1e9, forward=_logits,
                            artefacts={'baseline': ctx.base_checkpoint, 'schedule': path}))
    return made


def _logits(model, images):
    return model(images, return_flop=False)
