"""tools/flops.py and tools/benchmark.py hooks for ToMe and ToCom (`--method tome` and `--method tocom`).

FLOPs: the project's one convention (shared.flops.vit_macs) on the token counts ToMe leaves in each block: a block's
attention sees the tokens that enter it, its MLP the tokens left after merging r (capped at half the unprotected
tokens). A folded compensator costs nothing; `--unfolded` counts the two adapters (q, v) of every block when
r_src != r_tgt, as upstream runs them.

Benchmark: ToMe's throughput convention (random input, eval, no grad, warm-up runs thrown away, images/s at a stated
batch size and dtype): the plain timm model (the r = 0 row) and the same weights ToMe-patched at r = 8, 13, 16, timed
in alternation in one run; speed-ups over the plain model as the median and range over the rounds.
"""
import torch

from shared.benchmark import add_compile_args
from shared.flops import vit_dims, vit_macs

DEFAULT_BENCH_R = (8, 13, 16)


def tome_token_counts(num_tokens, depth, r, protected=1):
    """(attention tokens, MLP tokens) per block for a ToMe schedule `r` (int, (r, inflection) or list)."""
    from shared.tome import parse_r
    attn, mlp = [], []
    n = num_tokens
    for r_layer in parse_r(depth, r)[:depth]:
        attn.append(n)
        n -= max(0, min(int(r_layer), (n - protected) // 2))
        mlp.append(n)
    return attn, mlp


def _build(args, name=None):
    from tocom.models import create_tocom_model
    kwargs = {'num_classes': args.num_classes}
    if args.input_size:
        kwargs['img_size'] = args.input_size
    return create_tocom_model(name or args.model, **kwargs)


def model_gflops(model, r, r_src=None, unfolded=False):
    dims, depth = vit_dims(model)
    # every prefix token (class, distillation, registers) is kept out of the matching (shared.tome)
    attn, mlp = tome_token_counts(dims['num_patches'] + dims['num_prefix_tokens'], depth, r,
                                  dims['num_prefix_tokens'])
    macs = vit_macs(attn, mlp, **dims)
    if unfolded and r_src is not None and r_src != r:
        blk = model.blocks[0].attn
        hidden = blk.q_tocom.hidden if hasattr(blk, 'q_tocom') else 32
        macs += sum(2 * 2 * n * dims['embed_dim'] * hidden for n in attn)  # q and v: down + up per token
    return macs / 1e9


# ------------------------------------------------------------------------------------------------------------ FLOPs
def add_flops_args(parser):
    parser.add_argument('--model', default='deit_base_patch16_224', help='deit_{tiny,small,base}_patch16_224 or a '
                        'timm ViT (ToMe-patched)')
    parser.add_argument('--r', default=0, type=int, help='tokens merged per layer (ToMe r, ToCom r_tgt)')
    parser.add_argument('--r_src', default=None, type=int, help='ToCom: the r the model was trained with')
    parser.add_argument('--unfolded', action='store_true', help='ToCom: count the compensator run as adapters '
                        '(upstream) instead of folded into qkv (zero extra FLOPs)')
    parser.add_argument('--input-size', default=None, type=int)
    parser.add_argument('--num-classes', default=1000, type=int)


def flops(args):
    model = _build(args)
    if args.unfolded:
        from tocom.models import add_compensator
        add_compensator(model)
    return model_gflops(model, args.r, args.r_src, args.unfolded)


# -------------------------------------------------------------------------------------------------------- benchmark
def add_benchmark_args(parser):
    parser.add_argument('--model', default='deit_small_patch16_224')
    parser.add_argument('--r', default=list(DEFAULT_BENCH_R), type=int, nargs='+', help='r values to time')
    parser.add_argument('--batch-size', default=None, type=int, help='default: 64 on a GPU (ToMe), 8 on the CPU')
    parser.add_argument('--input-size', default=None, type=int)
    parser.add_argument('--num-classes', default=1000, type=int)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--dtype', default=None, choices=['float32', 'float16', 'bfloat16'],
                        help='default: float16 on a GPU (ToMe), float32 on the CPU')
    parser.add_argument('--runs', default=None, type=int, help='timed runs (default 40 on a GPU, 6 on the CPU)')
    parser.add_argument('--warmup', default=None, type=int, help='runs thrown away first (default 10 GPU, 2 CPU)')
    parser.add_argument('--threads', default=None, type=int, help='CPU threads (torch.set_num_threads)')
    parser.add_argument('--rounds', default=5, type=int,
                        help='interleaved rounds over the plain model and every r; the median round counts and the '
                             'range is printed (a shared machine drifts: interleaving keeps the ratios fair)')
    add_compile_args(parser)


def plain_timm_model(model, name):
    """The unpatched timm model of `name` (without a `_tocom` suffix) holding `model`'s network weights."""
    import timm
    name = name[:-len('_tocom')] if name.endswith('_tocom') else name
    plain = timm.create_model(name, pretrained=False, num_classes=model.num_classes,
                              img_size=model.patch_embed.img_size)
    state = {k: v for k, v in model.state_dict().items() if k in plain.state_dict()}
    plain.load_state_dict(state)
    return plain


def benchmark(args):
    from shared.benchmark import format_spread, seconds_with_compiled, speedup_table
    device = torch.device(args.device)
    gpu = device.type == 'cuda'
    batch = args.batch_size or (64 if gpu else 8)
    dtype = getattr(torch, args.dtype or ('float16' if gpu else 'float32'))
    runs = args.runs or (40 if gpu else 6)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _build(args).eval().to(device)
    plain = plain_timm_model(model, args.model).eval().to(device)
    x = torch.randn(batch, 3, *model.patch_embed.img_size, device=device)

    def with_r(r):
        def forward(t):
            model.r = r
            return model(t)
        return forward

    forwards = {0: plain}
    forwards.update({r: with_r(r) for r in args.r if r != 0})
    seconds, compiled = seconds_with_compiled(forwards, x, args, 0, rounds=max(1, args.rounds), runs=runs,
                                              warmup=warmup, dtype=dtype)
    table = speedup_table(seconds, batch, 0)
    rows = [{'r': r, 'gflops': model_gflops(model, r), 'img_per_s': table[r]['img_per_s']['median'],
             'img_per_s_spread': table[r]['img_per_s'], 'speedup': table[r]['speedup']['median'],
             'speedup_spread': table[r]['speedup']} for r in forwards]
    base = rows[0]
    print(f'ToMe throughput: {args.model}, batch {batch}, {str(dtype).replace("torch.", "")}, {device}, '
          f'{args.rounds} interleaved rounds of {runs} timed runs after {warmup} warm-up runs; r = 0 is the plain '
          f'timm model; median [min, max] over rounds')
    print(f'{"r":>4} {"GFLOPs":>8} {"img/s":>24} {"speed-up":>20} {"FLOPs ratio":>12} {"speed-up/FLOPs":>15}')
    for row in rows:
        row['flops_ratio'] = base['gflops'] / row['gflops']
        row['efficiency'] = row['speedup'] / row['flops_ratio']
        print(f'{row["r"]:>4} {row["gflops"]:>8.3f} {format_spread(row["img_per_s_spread"]):>24} '
              f'{format_spread(row["speedup_spread"], 3):>20} {row["flops_ratio"]:>12.3f} {row["efficiency"]:>15.3f}')
    return {'model': args.model, 'batch_size': batch, 'dtype': str(dtype), 'device': str(device), 'rows': rows,
            'compiled': compiled}
