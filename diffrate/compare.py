"""tools/compare.py protocol for DiffRate (see shared/compare_api.py).

One variant per `--target-flops`: DiffRate's own search (diffrate/main.py's `main`: its loaders, AdamW on the proxies
only, cosine schedule, engine with CE + lambda * (GFLOPs - target)^2, per-epoch evaluation, schedule written to
`compression_rate.json`) runs on the comparison data, starting from the baseline weights, and the learned
(prune, merge) kept numbers are cached under `<cache_dir>/diffrate`. The variant is the baseline with
DiffRate's DeiT patch (class-token classifier, block 0 never compressed) in eval mode applying that schedule; its
GFLOPs are DiffRate's formula (the project's convention) for the schedule.

How the weights enter the search: the baseline is not one of the reference's model names, so the hook builds the
patched model itself (timm model + baseline state dict + DiffRate's DeiT patch) and hands it to `main(args, model)`,
which runs the search in train mode as the entry script's `--weights` does for a named model (its `--finetune`, as the
reference's, would put the search in eval mode, where the proxies get no gradient and nothing is learned).

FLOPs weight: DiffRate's lambda = 5 is tuned for GFLOPs of DeiT scale (the penalty is a squared difference in
GFLOPs). A 0.045-GFLOPs digits ViT makes that penalty ~1e-3 of the classification loss, so the search would ignore
the target. `--diffrate-flops-weight` (default: 5 x (4.599 / baseline GFLOPs)^2, i.e. the balance of DeiT-S, the
model of the paper's main comparison with ToMe) restores the reference's balance; 5 gives the reference's literal
value. DeiT-T's balance (5 x (1.254 / ...)^2, 13.5 times weaker) let the search trade GFLOPs for accuracy: at ToMe
r = 5's target (0.0230) it settled at 0.0266, 15 % above; DeiT-S's holds every target within 2.1 %.

Targets: by default ToMe's GFLOPs at each r of `--tome-r` (3, 4, 5 unless given), so that every DiffRate point sits
at the GFLOPs of a ToMe point (the paper's Table compares them at equal FLOPs, both off the shelf).

Recipe: the search sees the images as the baseline was trained on them (`--diffrate-recipe baseline`: no mixup,
cutmix, random erasing or drop path; label smoothing 0.1), as the reference searches a DeiT with DeiT's own recipe.
Under the entry script's DeiT recipe (`--diffrate-recipe reference`) the digits baseline, trained without any of it,
sits at chance in the search loss (2.3 on 10 classes, against 1.1 falling to 0.7 under its own recipe), which then
hardly tells one schedule from another. No RandAugment in either: PIL >= 10 refuses its top posterize magnitude.

Budget: the reference searches 3 ImageNet epochs at batch 1024: about 3,750 AdamW steps at lr 0.01 cosine to 0.001,
and as an Adam step moves a proxy logit by about the lr, the logits can travel ~35 in all. The digits give 40 steps of
batch 32 an epoch (the entry script's repeated-augmentation sampler: 1,280 draws, about 427 images x 3 views):
DEFAULT_EPOCHS (6) epochs, 240 steps at lr 0.07 cosine to 0.007, travel ~13, over 16 candidates a block (64 patches
/ granularity 4) where DeiT has 49; the search loss is flat by then
(0.66-0.69 over the last three epochs at r = 4), though the schedule still moves from epoch to epoch (top-1 90-94 %
at r = 4, 84-90 % at r = 5). At the reference's lr 0.01 the same steps travel ~2 and leave the
proxies near their uniform start, which removes half the tokens at block 1 whatever that costs (80-85 % at ToMe
r = 4's GFLOPs after 1-4 epochs, against 93-94 % from the second epoch on at 0.07; diffrate/README.md). The shipped
schedules (shared/assets/compare/diffrate/<name>/, the README there has the command) were searched with these
defaults; `--retrain`, `--epochs` or any other setting searches into `<cache_dir>/diffrate` instead. `ctx.quick`
(tests) searches on 128 generated images of the same size (FAKE) instead.
"""
import contextlib
import io
import os

from shared.compare_api import MissingArtefact, Variant, artefact_dir, epochs_for, load_base_model

METHODS = ('diffrate',)

DEIT_SMALL_GFLOPS = 4.599  # DeiT-S, whose penalty balance the default FLOPs weight reproduces
DEFAULT_EPOCHS = 6
DEFAULT_BATCH_SIZE = 32
DEFAULT_ARCH_LR = 0.07
SCHEDULE_FILE = 'compression_rate.json'


def add_args(parser):
    g = parser.add_argument_group('DiffRate')
    g.add_argument('--target-flops', type=float, nargs='+', default=None,
                   help="GFLOPs targets, one search each (default: ToMe's GFLOPs at each r of --tome-r)")
    g.add_argument('--diffrate-granularity', type=int, default=4, help='gap between kept-number candidates')
    g.add_argument('--diffrate-arch-lr', type=float, default=DEFAULT_ARCH_LR,
                   help='AdamW lr of the proxies (reference: 0.01 for ~3,750 steps; see diffrate/compare.py)')
    g.add_argument('--diffrate-arch-min-lr', type=float, default=DEFAULT_ARCH_LR / 10,
                   help='cosine floor (reference: a tenth of the lr)')
    g.add_argument('--diffrate-batch-size', type=int, default=DEFAULT_BATCH_SIZE, help='search batch size')
    g.add_argument('--diffrate-flops-weight', type=float, default=None,
                   help='lambda of the FLOPs penalty (default: scaled to the baseline, see diffrate/compare.py)')
    g.add_argument('--diffrate-recipe', choices=('baseline', 'reference'), default='baseline',
                   help="the search's augmentation: the baseline's training recipe (default) or the entry script's "
                   '(mixup, cutmix, random erasing, drop path 0.1)')
    g.add_argument('--diffrate-schedule-path', default=None,
                   help='a compression_rate.json-format file with schedules for the baseline (skips the search)')


def base_gflops(ctx):
    from shared.flops import model_macs
    return model_macs(load_base_model(ctx)) / 1e9


def default_targets(ctx, args=None):
    """ToMe's GFLOPs (rounded to 6 decimals) at each r of --tome-r (its default when ToMe is not in the run): the
    comparison is at equal GFLOPs."""
    from tocom import compare as tome_hook
    rs = sorted(set(getattr(args, 'tome_r', None) or tome_hook.DEFAULT_R))
    return [round(tome_hook.tome_gflops(ctx, r), 6) for r in rs]


def flops_weight(ctx, args):
    if args.diffrate_flops_weight is not None:
        return args.diffrate_flops_weight
    from diffrate.engine import FLOPS_WEIGHT
    return FLOPS_WEIGHT * (DEIT_SMALL_GFLOPS / base_gflops(ctx)) ** 2


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


# The search sees the images as the baseline was trained on them. DiffRate searches a DeiT with DeiT's own recipe
# (mixup, cutmix, random erasing, drop path 0.1); the digits baseline was trained without any of these
# (shared/assets/README.md), and under that foreign recipe its search loss sits at chance (2.3 on 10 classes) so the
# classification term hardly tells good schedules from bad ones.
BASELINE_RECIPE = ('--mixup', '0', '--cutmix', '0', '--reprob', '0', '--drop-path', '0', '--color-jitter', '0.3',
                   '--smoothing', '0.1')


def search_recipe(args):
    # no RandAugment in either: its posterize at the top magnitude asks PIL for 0 bits, which PIL >= 10 refuses
    return ['--aa', ''] + (list(BASELINE_RECIPE) if args.diffrate_recipe == 'baseline' else [])


def artefact_name(ctx, args, target):
    """Every setting the searched schedule depends on (the baseline aside: shipped ones exist for the shipped one)."""
    return (f'{ctx.model_name}_t{target:g}_g{args.diffrate_granularity}_e{epochs_for(ctx, DEFAULT_EPOCHS)}'
            f'_b{args.diffrate_batch_size}_lr{args.diffrate_arch_lr:g}-{args.diffrate_arch_min_lr:g}'
            f'_w{flops_weight(ctx, args):.4g}_{args.diffrate_recipe}_s{ctx.seed}' + ('_quick' if ctx.quick else ''))


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
    """The compression_rate.json of DiffRate's search at `target`: shipped, cached, or searched now through
    diffrate/main.py into the cache."""
    out = artefact_dir(ctx, 'diffrate', artefact_name(ctx, args, target))
    path = os.path.join(out, SCHEDULE_FILE)
    if os.path.isfile(os.path.join(out, 'done')):
        return path
    from diffrate.main import get_args_parser, main
    d = ctx.data_args
    argv = ['--model', ctx.model_name, '--data-set', d.data_set, '--input-size', str(d.input_size),
            '--batch-size', str(args.diffrate_batch_size), '--epochs', str(epochs_for(ctx, DEFAULT_EPOCHS)),
            '--target_flops', str(target), '--granularity', str(args.diffrate_granularity),
            '--arch-lr', str(args.diffrate_arch_lr), '--arch-min-lr', str(args.diffrate_arch_min_lr),
            '--output_dir', out, '--device', str(ctx.device), '--num_workers', str(d.num_workers),
            '--seed', str(ctx.seed), '--print-freq', '1000000', *search_recipe(args)]
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
    targets = args.target_flops or default_targets(ctx, args)
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
                    'granularity': args.diffrate_granularity}
        if not given:
            settings.update(search_epochs=epochs_for(ctx, DEFAULT_EPOCHS), batch_size=args.diffrate_batch_size,
                            arch_lr=args.diffrate_arch_lr, arch_min_lr=args.diffrate_arch_min_lr,
                            flops_weight=flops_weight(ctx, args), recipe=args.diffrate_recipe)
        made.append(Variant(method='diffrate', label=f'target={target:g}', settings=settings, model=model,
                            gflops=model.calculate_flop_inference() / 1e9, forward=_logits,
                            artefacts={'baseline': ctx.base_checkpoint, 'schedule': path}))
    return made


def _logits(model, images):
    return model(images, return_flop=False)
