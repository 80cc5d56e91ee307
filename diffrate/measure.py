"""tools/flops.py and tools/benchmark.py hooks for DiffRate.

    python tools/flops.py --method diffrate --model vit_deit_small_patch16_224 --target_flops 2.9     # 2.905
    python tools/benchmark.py --method diffrate --model vit_deit_small_patch16_224 --target_flops 2.9
"""
from diffrate import schedules
from diffrate.flops import caformer_gflops, vit_gflops

# (embed_dim, patch_size, patches, depth) of the reference's ViTs at 224 x 224
VIT_GEOMETRY = {
    'vit_deit_tiny_patch16_224': (192, 16, 196, 12),
    'vit_deit_small_patch16_224': (384, 16, 196, 12),
    'vit_deit_base_patch16_224': (768, 16, 196, 12),
    'vit_base_patch16_mae': (768, 16, 196, 12),
    'vit_large_patch16_mae': (1024, 16, 196, 24),
    'vit_huge_patch14_mae': (1280, 14, 256, 32),
}
CAFORMER_S36 = dict(dims=(64, 128, 320, 512), depths=(3, 12, 18, 3))


def schedule_gflops(model, prune_kept, merge_kept, num_classes=1000):
    """GFLOPs of a reference model under a schedule; None lists mean uncompressed."""
    if model == 'caformer_s36':
        if merge_kept is None:
            merge_kept = [196] * 18 + [49] * 3
        return caformer_gflops(CAFORMER_S36['dims'], CAFORMER_S36['depths'], num_classes, merge_kept)
    if model not in VIT_GEOMETRY:
        raise ValueError(f"model '{model}' is not one of DiffRate's: {', '.join(schedules.MODEL_KEYS)}")
    dim, patch, patches, depth = VIT_GEOMETRY[model]
    full = [patches + 1] * depth
    return vit_gflops(dim, patch, patches, num_classes, prune_kept or full, merge_kept or full)


def add_flops_args(parser):
    parser.add_argument('--model', default='vit_deit_small_patch16_224', help=', '.join(schedules.MODEL_KEYS))
    parser.add_argument('--target_flops', type=float, default=None,
                        help='schedule of compression_rate.json to measure (omit: the uncompressed model)')
    parser.add_argument('--nb-classes', type=int, default=1000)
    parser.add_argument('--compression-rate-file', default=None,
                        help='a compression_rate.json-format file (default: ./compression_rate.json if present, '
                             'else the one shipped in diffrate/)')


def flops(args):
    prune = merge = None
    if args.target_flops is not None:
        prune, merge = schedules.lookup(args.model, args.target_flops, args.compression_rate_file)
        print(f'prune kept number:{prune}\nmerge kept number:{merge}')
    return schedule_gflops(args.model, prune, merge, args.nb_classes)


def add_benchmark_args(parser):
    add_flops_args(parser)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--rounds', type=int, default=5, help='interleaved timing rounds (median and spread)')
    parser.add_argument('--runs', type=int, default=4, help='forwards of each model per round')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: leave as is)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--granularity', type=int, default=4)
    parser.add_argument('--seed', type=int, default=0)
    from shared.benchmark import add_compile_args
    add_compile_args(parser)


def benchmark(args):
    """Plain timm model against the same weights DiffRate-patched, uncompressed and under the schedule, timed in
    alternation (random weights and input); speed-up over the plain model as the median and range over rounds."""
    import copy
    import torch
    from diffrate.models import apply_diffrate, create_model
    from shared.benchmark import format_spread, seconds_with_compiled, speedup_table
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    plain = create_model(args.model, num_classes=args.nb_classes).eval().to(device)
    patched = apply_diffrate(copy.deepcopy(plain), args.model, args.granularity).eval().to(device)
    full = [10 ** 6] * len(patched.get_kept_num()[1])
    settings = {'uncompressed': (None if args.model == 'caformer_s36' else full, full)}
    if args.target_flops is not None:
        settings[f'target {args.target_flops}'] = schedules.lookup(args.model, args.target_flops,
                                                                    args.compression_rate_file)
    models, gflops = {'timm': plain}, {'timm': schedule_gflops(args.model, None, None, args.nb_classes)}
    for label, (prune, merge) in settings.items():
        model = copy.deepcopy(patched)
        model.set_kept_num(prune, merge)
        models[label] = model
        gflops[label] = model.calculate_flop_inference() / 1e9
    forwards = {'timm': plain}
    forwards.update({label: _logits_only(models[label]) for label in settings})
    size = getattr(plain, 'pretrained_cfg', {}).get('input_size', (3, 224, 224))
    x = torch.randn(args.batch_size, *size, generator=torch.Generator().manual_seed(args.seed)).to(device)
    seconds, compiled = seconds_with_compiled(forwards, x, args, 'timm', rounds=args.rounds, runs=args.runs,
                                              warmup=args.warmup)
    table = speedup_table(seconds, args.batch_size, 'timm')
    print(f'{args.model}, batch {args.batch_size}, {device}, {torch.get_num_threads()} threads, {args.rounds} '
          f'interleaved rounds of {args.runs} forwards; median [min, max] over rounds')
    results = {}
    for label, row in table.items():
        results[label] = {'images_per_s': row['img_per_s']['median'], 'gflops': gflops[label],
                          'img_per_s': row['img_per_s'], 'speedup': row['speedup']}
        print(f"{label:>16}: {format_spread(row['img_per_s'], 1):>26} im/s  {gflops[label]:.3f} GFLOPs  "
              f"speed-up {format_spread(row['speedup'])}")
    if compiled is not None:
        results['compiled'] = compiled
    return results


def _logits_only(model):
    def forward(x):
        return model(x, return_flop=False)
    return forward
