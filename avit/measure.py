"""tools/flops.py and tools/benchmark.py hooks for A-ViT.

FLOPs are data dependent: each image's MACs follow from its per-token depth counters (block l computes the tokens of
depth >= l), in the project's convention (shared.flops.vit_macs), averaged over the evaluated images:

    python tools/flops.py --method avit --model avit_tiny_patch16_224 --finetune tiny-10-30.pth --data-path IMAGENET
    python tools/flops.py --method avit --model avit_small_patch16_224 --full-depth        # 4.599 (= DeiT-S)

The benchmark times the zipped inference path (halted tokens removed) against the same weights run as a plain timm
DeiT, in one run, at batch 1 and batch 64, and compares the speed-up with the FLOPs reduction of those images:

    python tools/benchmark.py --method avit --model avit_tiny_patch16_224 [--finetune CKPT] [--device cuda]
"""

import torch

from avit.engine_act import per_image_macs
from avit.main_act import gates_from_file_name
from shared.checkpoint import load_finetune
from avit.models_act import avit_models
from shared.distributed import resolve_device
from shared.flops import model_macs
from shared.models import create_model


def _add_model_args(parser, gate_scale, gate_center):
    parser.add_argument('--model', default='avit_tiny_patch16_224', choices=sorted(avit_models))
    parser.add_argument('--finetune', '--checkpoint', dest='finetune', default='',
                        help='A-ViT (or DeiT) checkpoint; random weights when empty')
    parser.add_argument('--gate_scale', type=float, default=None,
                        help=f'default: from the checkpoint name <name>-<scale>-<center>.pth, else {gate_scale}')
    parser.add_argument('--gate_center', type=float, default=None,
                        help=f'default: from the checkpoint name, else {gate_center}')
    parser.add_argument('--input-size', default=224, type=int)
    parser.add_argument('--nb-classes', default=None, type=int, help='head size (default: the data set\'s or 1000)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--seed', default=0, type=int)


def _build(args, default_gates, num_classes=1000):
    scale, center = default_gates
    parsed = gates_from_file_name(args.finetune) if args.finetune else None
    if parsed is not None:
        scale, center = parsed
    scale = args.gate_scale if args.gate_scale is not None else scale
    center = args.gate_center if args.gate_center is not None else center
    torch.manual_seed(args.seed)
    model = create_model(args.model, avit_models, num_classes=args.nb_classes or num_classes,
                         img_size=args.input_size, gate_scale=scale, gate_center=center)
    if args.finetune:
        load_finetune(model, args.finetune, '--finetune')
    print(f'{args.model}: gate_scale {scale}, gate_center {center}, '
          f'weights {args.finetune or "random (seed %d)" % args.seed}')
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# FLOPs


def add_flops_args(parser):
    _add_model_args(parser, 10., 30.)
    parser.add_argument('--data-set', default='IMNET', help='any shared.datasets name (IMNET, DIGITS, FAKE, ...)')
    parser.add_argument('--data-path', default='', help='data root (val split is used)')
    parser.add_argument('--batch-size', default=64, type=int)
    parser.add_argument('--num-images', default=0, type=int, help='evaluate only the first N images (0: all)')
    parser.add_argument('--num_workers', default=0, type=int)
    parser.add_argument('--full-depth', action='store_true', help='every token through every block (no data)')


def _data_args(args):
    from avit.main_act import get_args_parser
    data_args = get_args_parser(add_help=False).parse_args([])
    for k in ('data_set', 'data_path', 'input_size', 'batch_size', 'num_workers'):
        setattr(data_args, k, getattr(args, k))
    return data_args


@torch.no_grad()
def image_macs(model, data_loader, device, num_images=0):
    """Per-batch tensors of each image's MACs (float64) and mean token depth, over the loader's first
    `num_images` images (0: all)."""
    macs, depths, seen = [], [], 0
    for images, _ in data_loader:
        if num_images:
            images = images[:num_images - seen]
        model(images.to(device))
        cnt = model.counter_token
        macs.append(per_image_macs(model, cnt).cpu())
        depths.append(cnt.float().mean(dim=1).cpu())
        seen += len(images)
        if num_images and seen >= num_images:
            break
    if not seen:
        raise SystemExit('no images to evaluate (empty data set?)')
    return macs, depths


def _batch_mean(batches):
    # batch sums added in loader order, then divided once: the mean every earlier release printed
    return sum(float(b.sum()) for b in batches) / sum(len(b) for b in batches)


@torch.no_grad()
def mean_gflops(model, data_loader, device, num_images=0):
    """GFLOPs per image averaged over the loader's images, and the mean token depth."""
    macs, depths = image_macs(model, data_loader, device, num_images)
    return _batch_mean(macs) / 1e9, _batch_mean(depths), sum(len(b) for b in macs)


def flops_per_image(args):
    """(mean GFLOPs, per-image GFLOPs as a float64 tensor) over the data set, or the full-depth count alone
    (a one-element tensor) with --full-depth."""
    device = resolve_device(args.device)
    if args.full_depth:
        gflops = model_macs(_build(args, (10., 30.))) / 1e9
        return gflops, torch.tensor([gflops], dtype=torch.float64)
    from shared.datasets import build_dataset
    dataset, nb_classes = build_dataset(is_train=False, args=_data_args(args))
    model = _build(args, (10., 30.), nb_classes).to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.num_workers)
    macs, depths = image_macs(model, loader, device, args.num_images)
    seen = sum(len(b) for b in macs)
    print(f'mean token depth {_batch_mean(depths):.3f} / {len(model.blocks)} over {seen} images; full depth '
          f'{model_macs(model) / 1e9:.3f} GFLOPs')
    return _batch_mean(macs) / 1e9, torch.cat(macs) / 1e9


def flops(args):
    return flops_per_image(args)[0]


# ---------------------------------------------------------------------------------------------------------------
# Benchmark


def add_benchmark_args(parser):
    # With random weights the original parser's default gates (100, 3) give tokens of every depth 1..12
    # (mean ~5.4, a 2.3x FLOPs cut); --gate_center 30 gives mean depth ~7 (1.8x, near the paper's A-ViT-T).
    # Pass a trained checkpoint for real figures.
    _add_model_args(parser, 100., 3.)
    parser.add_argument('--batch-sizes', default=[1, 64], type=int, nargs='+')
    parser.add_argument('--rounds', default=5, type=int, help='timing rounds, the median counts')
    parser.add_argument('--runs', default=3, type=int, help='forwards of each model per round')
    parser.add_argument('--warmup', default=2, type=int)
    parser.add_argument('--threads', default=0, type=int, help='torch CPU threads (0: leave as is)')
    from shared.benchmark import add_compile_args
    add_compile_args(parser)


def benchmark(args):
    """DeiT (timm, same weights), the masked loop, the zipped path, the zipped path with nothing halting (its own
    overhead: ~1.0x DeiT) and the blocks alone on the zipped path's token counts without any halting bookkeeping
    (what ideal zipping would cost on these kernels), timed in alternation on one batch; speed-up = zipped / DeiT
    (ratio of the median rounds), next to the FLOPs cut and to the ideal's speed-up; every forward's per-round
    speed-up over DeiT is printed as median [min, max] and returned as `speedup_spread`."""
    import timm
    from avit.models_act import packed_block
    from shared.benchmark import format_spread, seconds_with_compiled, speedup_table
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = _build(args, (100., 3.)).to(device)
    plain_name = {'avit_tiny_patch16_224': 'vit_tiny_patch16_224',
                  'avit_small_patch16_224': 'vit_small_patch16_224'}[args.model]
    deit = timm.create_model(plain_name, pretrained=False, num_classes=model.num_classes, img_size=args.input_size)
    deit.load_state_dict(model.state_dict())
    deit.to(device).eval()
    full = model_macs(model) / 1e9
    results = {'model': args.model, 'device': str(device), 'threads': torch.get_num_threads(), 'full_gflops': full,
               'gate_scale': model.gate_scale, 'gate_center': model.gate_center, 'rows': []}

    def run(zip_tokens, gate_center=None):
        def forward(x):
            model.zip_tokens, saved = zip_tokens, model.gate_center
            model.gate_center = saved if gate_center is None else gate_center
            try:
                return model(x)
            finally:
                model.gate_center = saved
        return forward

    def blocks_only(token_counts):
        @torch.no_grad()
        def forward(x):
            states = model.embed(x)
            for block, n in zip(model.blocks, token_counts):
                states = packed_block(block, states[:, :n].contiguous(), None)
            return model.forward_head(model.norm(states[:, :1]))
        return forward

    print(f'{torch.get_num_threads()} CPU threads' if device.type == 'cpu' else str(device))
    print(f'{"batch":>5} {"depth":>6} {"GFLOPs":>7} {"FLOPs x":>8} {"DeiT img/s":>11} {"masked img/s":>13} '
          f'{"zipped img/s":>13} {"no-halt img/s":>14} {"blocks img/s":>13} {"speed-up":>9} {"/ FLOPs x":>9} '
          f'{"ideal / FLOPs x":>15}')
    for bs in args.batch_sizes:
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(bs, 3, args.input_size, args.input_size, generator=g).to(device)
        with torch.no_grad():
            run(False)(x)
        avit_gflops = float(per_image_macs(model, model.counter_token).mean()) / 1e9
        depth = float(model.counter_token.float().mean())
        reduction = full / avit_gflops
        # tokens each block computes in the zipped path: the batch's largest active count (padding included)
        counts = [int((model.counter_token > layer).sum(1).max()) for layer in range(len(model.blocks))]
        forwards = {'deit': deit, 'masked': run(False), 'zipped': run(True), 'zipped_no_halting': run(True, 1e9),
                    'blocks_only': blocks_only(counts)}
        # the token count is read from the data: captured as an unbacked size, the zipped path is one graph
        seconds, compiled = seconds_with_compiled(forwards, x, args, 'deit', {'capture_scalar_outputs': True},
                                                  rounds=args.rounds, runs=args.runs, warmup=args.warmup)
        table = speedup_table(seconds, bs, 'deit')
        ips = {name: row['img_per_s']['median'] for name, row in table.items()}
        speedup = ips['zipped'] / ips['deit']
        ideal = ips['blocks_only'] / ips['deit']
        row = dict(batch_size=bs, mean_depth=depth, gflops=avit_gflops, flops_reduction=reduction,
                   deit_img_s=ips['deit'], masked_img_s=ips['masked'], zipped_img_s=ips['zipped'],
                   zipped_no_halting_img_s=ips['zipped_no_halting'], blocks_only_img_s=ips['blocks_only'],
                   tokens_per_block=counts, speedup=speedup, speedup_over_flops_reduction=speedup / reduction,
                   ideal_speedup_over_flops_reduction=ideal / reduction,
                   speedup_spread={name: row['speedup'] for name, row in table.items()}, compiled=compiled)
        results['rows'].append(row)
        print(f'{bs:>5} {depth:>6.2f} {avit_gflops:>7.3f} {reduction:>8.2f} {ips["deit"]:>11.1f} '
              f'{ips["masked"]:>13.1f} {ips["zipped"]:>13.1f} {ips["zipped_no_halting"]:>14.1f} '
              f'{ips["blocks_only"]:>13.1f} {speedup:>9.2f} {speedup / reduction:>9.2f} {ideal / reduction:>15.2f}')
        print('      per-round speed-up over DeiT, median [min, max]: ' + ', '.join(
            f'{name} {format_spread(row["speedup"])}' for name, row in table.items() if name != 'deit'))
    model.zip_tokens = True
    return results
