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
    parser.add_argument('--runs', type=int, default=20)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--granularity', type=int, default=4)


def benchmark(args):
    """Throughput of the patched model (random weights) under the schedule vs the same model uncompressed."""
    import torch
    from diffrate.models import apply_diffrate, create_model
    from shared.benchmark import throughput
    device = torch.device(args.device)
    model = apply_diffrate(create_model(args.model, num_classes=args.nb_classes), args.model, args.granularity)
    model.eval().to(device)
    depth = len(model.get_kept_num()[1])
    full = [10 ** 6] * depth
    results = {}
    settings = [('uncompressed', None if args.model == 'caformer_s36' else full, full)]
    if args.target_flops is not None:
        settings.append((f'target {args.target_flops}',) + schedules.lookup(args.model, args.target_flops,
                                                                            args.compression_rate_file))
    for label, prune, merge in settings:
        model.set_kept_num(prune, merge)
        ips = throughput(model, batch_size=args.batch_size, device=device, runs=args.runs,
                         forward=_logits_only)
        results[label] = {'images_per_s': ips, 'gflops': model.calculate_flop_inference() / 1e9}
        print(f"{label:>16}: {ips:9.1f} im/s  {results[label]['gflops']:.3f} GFLOPs")
    return results


def _logits_only(model, x):
    import torch
    with torch.no_grad():
        return model(x, return_flop=False)
