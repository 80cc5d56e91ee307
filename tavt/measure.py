"""tools/flops.py and tools/benchmark.py hooks for TAVT: a searched gene (per-layer token counts) at deployment.

    python tools/flops.py --method tavt --config full          # ViT-B/16 at 448: 78.495
    python tools/flops.py --method tavt --config lower         # the ratio-0.2 lower-bound gene: 25.662
    python tools/flops.py --method tavt --config "628,503,403,323,259,208,167,134,108,87,70,56"
    python tools/flops.py --method tavt --config evo/CUB_VIT_adaptive/population-iter30.tsv --row -2
    python tools/benchmark.py --method tavt --config lower --batch_size 64 --device cuda

GFLOPs are multiply-accumulates in the project's convention (shared.flops). The benchmark (our addition: the
original has none) times the full model and the gene in one run, on random weights unless --pretrained_model is
given, with the drop-and-restore bookkeeping off (it changes no logit; a deployment build skips it).
"""
import ast
import csv
import os

import torch

from tavt.data_utils import DATASETS, num_classes_of
from tavt.length_drop import sample_length_configuration
from tavt.models.modeling import build_model, gene_macs

MODEL_TYPES = ["ViT-B_16", "ViT-B_32", "ViT-L_16", "ViT-L_32", "ViT-H_14", "tiny-test", "ViT-digits"]


def _add_model_args(parser):
    g = parser.add_argument_group('TAVT model and gene')
    g.add_argument('--model_type', choices=MODEL_TYPES, default='ViT-B_16')
    g.add_argument('--img_size', type=int, default=448)
    g.add_argument('--dataset', choices=list(DATASETS), default='CUB_200_2011', help='sets the number of classes')
    g.add_argument('--num_classes', type=int, default=None,
                   help="head size when it is not --dataset's (e.g. 10 for tools/compare.py's digits baseline)")
    g.add_argument('--split', default='non-overlap', choices=['non-overlap', 'overlap'])
    g.add_argument('--slide_step', type=int, default=12)
    g.add_argument('--config', default='full',
                   help="the gene: 'full', 'lower' (ratio --length_drop_ratio_bound per layer), comma-separated "
                        "counts, or a search TSV (population-iter*.tsv / store-iter*.tsv) with --row")
    g.add_argument('--row', type=int, default=0, help='row of the TSV given as --config (negative counts from the end)')
    g.add_argument('--length_drop_ratio_bound', type=float, default=0.2)
    return g


def _model(args):
    num_classes = args.num_classes or num_classes_of(args.dataset)
    return build_model(args.model_type, args.img_size, num_classes, zero_head=False,
                       split=args.split, slide_step=args.slide_step)


def parse_gene(text, num_tokens, num_layers, row=0, ratio_bound=0.2):
    """None for 'full', the lower-bound gene for 'lower', else the counts given inline or by a TSV row."""
    text = str(text).strip()
    if text == 'full':
        return None
    if text == 'lower':
        return sample_length_configuration(num_tokens, num_layers, length_drop_ratio=ratio_bound)
    if os.path.isfile(text):
        with open(text) as f:
            rows = [r for r in csv.reader(f, delimiter='\t') if r]
        if not rows:
            raise ValueError(f'--config {text}: the TSV has no rows')
        return tuple(int(v) for v in ast.literal_eval(rows[row][0]))
    try:
        value = ast.literal_eval(text if ',' in text else text.replace(' ', ','))
    except (ValueError, SyntaxError):
        raise ValueError(f"--config {text!r}: expected 'full', 'lower', comma-separated token counts or an "
                         f"existing TSV file") from None
    return tuple(int(v) for v in (value if isinstance(value, (tuple, list)) else (value,)))


def add_flops_args(parser):
    _add_model_args(parser)


def flops(args):
    model = _model(args)
    gene = parse_gene(args.config, model.num_tokens, model.num_layers, args.row, args.length_drop_ratio_bound)
    print(f'gene: {gene if gene is not None else "full"} ({model.num_tokens} tokens, {model.num_layers} layers)')
    return gene_macs(model, gene) / 1e9


def add_benchmark_args(parser):
    _add_model_args(parser)
    g = parser.add_argument_group('timing')
    g.add_argument('--pretrained_model', default=None, help="a train.py checkpoint ({'model': ...}); random if absent")
    g.add_argument('--batch_size', type=int, default=64)
    g.add_argument('--device', default='cuda')
    g.add_argument('--dtype', default='float32', choices=['float32', 'float16', 'bfloat16'])
    g.add_argument('--runs', type=int, default=20)
    g.add_argument('--warmup', type=int, default=5)


def benchmark(args):
    from shared.benchmark import throughput
    from shared.distributed import resolve_device
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    model = _model(args)
    if args.pretrained_model:
        from tavt.train import load_checkpoint_model
        load_checkpoint_model(args.pretrained_model, model)
    model.transformer.encoder.restore_dropped = False
    gene = parse_gene(args.config, model.num_tokens, model.num_layers, args.row, args.length_drop_ratio_bound)
    model.check_length_config(gene)
    size = (3, args.img_size, args.img_size)
    results = {}
    for label, g in (('full', None), ('gene', gene)):
        model.set_length_config(g)
        results[label] = dict(gflops=gene_macs(model, g) / 1e9, img_per_s=throughput(
            model, size, batch_size=args.batch_size, device=device, dtype=dtype, runs=args.runs,
            warmup=args.warmup))
    model.set_length_config(None)
    speedup = results['gene']['img_per_s'] / results['full']['img_per_s']
    print(f"TAVT {args.model_type} @ {args.img_size}px, batch {args.batch_size}, {args.dtype}, {device}")
    print(f"{'model':<6} {'GFLOPs':>9} {'img/s':>10}")
    for label, r in results.items():
        print(f"{label:<6} {r['gflops']:>9.3f} {r['img_per_s']:>10.1f}")
    print(f"gene {gene}: speed-up x{speedup:.2f}, FLOPs ratio x{results['full']['gflops'] / results['gene']['gflops']:.2f}")
    return dict(gene=gene, full=results['full'], tavt=results['gene'], speedup=speedup)
