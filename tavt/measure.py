"""tools/flops.py and tools/benchmark.py hooks for TAVT: a searched gene (per-layer token counts) at deployment.

    python tools/flops.py --method tavt --config full          # ViT-B/16 at 448: 78.495
    python tools/flops.py --method tavt --config lower         # the ratio-0.2 lower-bound gene: 25.662
    python tools/flops.py --method tavt --config "628,503,403,323,259,208,167,134,108,87,70,56"
    python tools/flops.py --method tavt --config evo/CUB_VIT_adaptive/population-iter30.tsv --row -2
    python tools/benchmark.py --method tavt --config lower --batch_size 64 --device cuda

GFLOPs are multiply-accumulates in the project's convention (shared.flops). The benchmark (our addition: the
original has none) times the plain timm ViT holding the same weights, TAVT's model with the full gene and with the
searched gene, in alternation in one run (speed-ups over timm: median and range over rounds), on random weights
unless --pretrained_model is given, with the drop-and-restore bookkeeping off (it changes no logit; a deployment
build skips it).
"""
import ast
import csv
import os
from functools import partial

import torch
import torch.nn as nn

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
    gflops = gene_macs(model, gene) / 1e9
    # a gene fixes every layer's token count whatever the image, so there is no distribution to take over a data set
    print(f'FLOPs fixed by the gene, the same for every image: {gflops:.3f} GFLOPs per image')
    return gflops


def add_benchmark_args(parser):
    _add_model_args(parser)
    g = parser.add_argument_group('timing')
    g.add_argument('--pretrained_model', default=None, help="a train.py checkpoint ({'model': ...}); random if absent")
    g.add_argument('--batch_size', type=int, default=64)
    g.add_argument('--device', default='cuda')
    g.add_argument('--dtype', default='float32', choices=['float32', 'float16', 'bfloat16'])
    g.add_argument('--rounds', type=int, default=5, help='interleaved timing rounds (median and range reported)')
    g.add_argument('--runs', type=int, default=4, help='forwards of each model per round')
    g.add_argument('--warmup', type=int, default=2)
    g.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: leave as is)')
    from shared.benchmark import add_compile_args
    add_compile_args(g)


def plain_timm_model(model):
    """timm's VisionTransformer with the TAVT (ViT-pytorch) model's dimensions and weights: query/key/value joined
    into qkv. TransFG's overlapping split is a patch convolution of stride `slide_step`, set on timm's patch
    embedding (whose grid then has the overlapping count)."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    cfg = model.config
    conv = model.transformer.embeddings.patch_embeddings
    grid = [(model.img_size - k) // s + 1 for k, s in zip(conv.kernel_size, conv.stride)]
    plain = TimmViT(img_size=[g * k for g, k in zip(grid, conv.kernel_size)], patch_size=conv.kernel_size[0],
                    num_classes=model.num_classes, embed_dim=cfg.hidden_size, depth=model.num_layers,
                    num_heads=cfg.transformer.num_heads, mlp_ratio=cfg.transformer.mlp_dim / cfg.hidden_size,
                    qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    plain.patch_embed.proj.stride = conv.stride
    plain.patch_embed.img_size = (model.img_size, model.img_size)
    src = model.state_dict()
    state = {'patch_embed.proj.weight': src['transformer.embeddings.patch_embeddings.weight'],
             'patch_embed.proj.bias': src['transformer.embeddings.patch_embeddings.bias'],
             'cls_token': src['transformer.embeddings.cls_token'],
             'pos_embed': src['transformer.embeddings.position_embeddings'],
             'norm.weight': src['transformer.encoder.encoder_norm.weight'],
             'norm.bias': src['transformer.encoder.encoder_norm.bias'],
             'head.weight': src['head.weight'], 'head.bias': src['head.bias']}
    for i in range(model.num_layers):
        layer, block = f'transformer.encoder.layer.{i}.', f'blocks.{i}.'
        for kind in ('weight', 'bias'):
            state[block + f'attn.qkv.{kind}'] = torch.cat([src[layer + f'attn.{part}.{kind}']
                                                          for part in ('query', 'key', 'value')])
            for ours, theirs in (('attn.proj', 'attn.out'), ('norm1', 'attention_norm'), ('norm2', 'ffn_norm'),
                                 ('mlp.fc1', 'ffn.fc1'), ('mlp.fc2', 'ffn.fc2')):
                state[block + f'{ours}.{kind}'] = src[layer + f'{theirs}.{kind}']
    plain.load_state_dict(state)
    return plain


def benchmark(args):
    from shared.benchmark import format_spread, seconds_with_compiled, speedup_table
    from shared.distributed import resolve_device
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    model = _model(args)
    if args.pretrained_model:
        from tavt.train import load_checkpoint_model
        load_checkpoint_model(args.pretrained_model, model)
    model.transformer.encoder.restore_dropped = False
    gene = parse_gene(args.config, model.num_tokens, model.num_layers, args.row, args.length_drop_ratio_bound)
    model.check_length_config(gene)
    plain = plain_timm_model(model).eval().to(device)
    model.eval().to(device)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    model.set_length_config(None)
    forwards = {'timm': plain, 'full': model}
    if gene is not None:
        forwards['gene'] = lambda t: model(t, length_config=gene)
    seconds, compiled = seconds_with_compiled(forwards, x, args, 'timm', rounds=args.rounds, runs=args.runs,
                                              warmup=args.warmup, dtype=dtype)
    table = speedup_table(seconds, args.batch_size, 'timm')
    macs = {'timm': gene_macs(model, None) / 1e9, 'full': gene_macs(model, None) / 1e9,
            'gene': gene_macs(model, gene) / 1e9}
    results = {label: dict(gflops=macs[label], img_per_s=row['img_per_s']['median'],
                           img_per_s_spread=row['img_per_s'], speedup=row['speedup']['median'],
                           speedup_spread=row['speedup']) for label, row in table.items()}
    print(f"TAVT {args.model_type} @ {args.img_size}px, batch {args.batch_size}, {args.dtype}, {device}, "
          f"{args.rounds} interleaved rounds of {args.runs} forwards; median [min, max] over rounds")
    print(f"{'model':<6} {'GFLOPs':>9} {'img/s':>26} {'speed-up vs timm':>20}")
    for label, r in results.items():
        print(f"{label:<6} {r['gflops']:>9.3f} {format_spread(r['img_per_s_spread'], 1):>26} "
              f"{format_spread(r['speedup_spread']):>20}")
    tavt = results.get('gene', results['full'])
    print(f"gene {gene}: speed-up over timm x{tavt['speedup']:.2f}, FLOPs ratio x{macs['timm'] / tavt['gflops']:.2f}")
    return dict(gene=gene, timm=results['timm'], full=results['full'], tavt=tavt, speedup=tavt['speedup'],
                compiled=compiled)
