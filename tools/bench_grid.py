"""`tools/benchmark.py --all`: every method of the registry (shared.methods) against its plain baseline in one
process, over dtypes, batch sizes and, with --compile, compiled forwards; one Markdown and one CSV table headed by the
device, the library versions, the thread count and the commit.

Each method contributes one or more pairs built on the same weights: the plain timm model and the reduced inference
path at a fixed setting (the papers' comparison points on a GPU, tiny models on the CPU), with the analytic GFLOPs of
both (shared.flops conventions). ToE changes training only: its pair is the ToE model at inference against the plain
model, a control whose speed-up must be 1 within the spread.

Timing is shared.benchmark's interleaved rounds; with --compile the eager and compiled forwards of a pair are timed in
the same rounds, so a compiled row has its speed-up over the compiled baseline (its `speedup`) and over the eager
baseline (`speedup_vs_eager_baseline`). Peak memory is shared.benchmark.peak_forward_memory_mb of one forward.
"""
import csv
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch

from shared.methods import NAMES

# the GPU grid holds the papers' comparison points; the CPU grid is the smoke run of the same code (seconds)
GPU_GRID = dict(batch_sizes=(1, 64, 256), dtypes=('float16', 'bfloat16'), rounds=5, runs=10, warmup=3,
                compile_batch_sizes=(256,), compile_dtypes=('float16',))
CPU_GRID = dict(batch_sizes=(1,), dtypes=('float32',), rounds=1, runs=1, warmup=1, compile_batch_sizes=(1,),
                compile_dtypes=('float32',))
# Compiled rows on a GPU default to the papers' throughput setting (float16, batch 256) only: every (model, batch,
# dtype) is an inductor compile of its own (tens of seconds each), and the whole grid has to fit in minutes. The
# other cells: --compile-batch-sizes / --compile-dtypes.


@dataclass
class Pair:
    """A plain model and a reduced forward on the same weights. `gflops` is (baseline, reduced) per image, or None
    when the reduced model's cost depends on the images (read after a forward of the timed batch)."""
    label: str
    plain: torch.nn.Module
    reduced: Callable
    module: torch.nn.Module  # what holds the reduced forward's weights (moved to the device)
    size: int
    gflops: Optional[Tuple[float, float]]
    dynamo_config: dict = field(default_factory=dict)  # applied while the compiled forward traces


def _tome_pair(name, r, size):
    from tocom.measure import _build, model_gflops, plain_timm_model
    args = _namespace(model=name, num_classes=1000, input_size=size)
    torch.manual_seed(0)
    model = _build(args).eval()
    model.r = r
    return Pair(f'ToMe {name} r={r}', plain_timm_model(model, name).eval(), model, model,
                model.patch_embed.img_size[0], (model_gflops(model, 0), model_gflops(model, r)))


def tome_pairs(gpu):
    if gpu:  # ToMe's Table 1 points: ViT-S r=13 and ViT-B r=16
        return [_tome_pair('deit_small_patch16_224', 13, None), _tome_pair('deit_base_patch16_224', 16, None)]
    return [_tome_pair('deit_tiny_patch16_224', 2, 32)]


def tocom_pairs(gpu):
    """ToCom deployed: the compensator folded into qkv, i.e. a ToMe model at r_tgt with other weights."""
    from tocom.measure import _build, model_gflops, plain_timm_model
    from tocom.models import fold_compensator
    name, size, r_src, r_tgt = ('deit_small_patch16_224_tocom', None, 16, 13) if gpu else \
        ('deit_tiny_patch16_224_tocom', 32, 1, 2)
    torch.manual_seed(0)
    model = _build(_namespace(model=name, num_classes=1000, input_size=size)).eval()
    folded = fold_compensator(model, r_tgt, r_src).eval()
    return [Pair(f'ToCom {name} folded r_src={r_src} r_tgt={r_tgt}', plain_timm_model(folded, name).eval(), folded,
                 folded, folded.patch_embed.img_size[0], (model_gflops(folded, 0), model_gflops(folded, r_tgt)))]


def _diffrate_pair(name, target):
    from diffrate import schedules
    from diffrate.measure import schedule_gflops
    from diffrate.models import apply_diffrate, create_model
    from tools.export import LogitsOnly  # the patched forward returns (logits, FLOPs)
    import copy
    torch.manual_seed(0)
    plain = create_model(name, num_classes=1000).eval()
    model = apply_diffrate(copy.deepcopy(plain), name, 4).eval()
    model.set_kept_num(*schedules.lookup(name, target))
    size = plain.patch_embed.img_size[0]
    return Pair(f'DiffRate {name} {target}G', plain, LogitsOnly(model).eval(), model, size,
                (schedule_gflops(name, None, None, 1000), model.calculate_flop_inference() / 1e9))


def diffrate_pairs(gpu):
    if gpu:  # the DeiT-S point and the ViT-H (MAE) one of the paper's speed figure
        return [_diffrate_pair('vit_deit_small_patch16_224', 2.9), _diffrate_pair('vit_huge_patch14_mae', 103.4)]
    return [_diffrate_pair('vit_deit_tiny_patch16_224', 0.8)]


def _avit_pair(name, size):
    import timm
    from avit.measure import _build
    args = _namespace(model=name, finetune='', gate_scale=None, gate_center=None, input_size=size, nb_classes=None,
                      seed=0)
    model = _build(args, (100., 3.))
    model.zip_tokens = True
    plain = timm.create_model(name.replace('avit_', 'vit_'), pretrained=False, num_classes=model.num_classes,
                              img_size=size)
    plain.load_state_dict(model.state_dict())
    # how many tokens stay active is read from the data: with captured scalars the zipped path is one graph
    return Pair(f'A-ViT {name} zipped (random weights)', plain.eval(), model, model, size, None,
                dict(capture_scalar_outputs=True))


def avit_pairs(gpu):
    if gpu:  # the paper's A-ViT-S and A-ViT-T
        return [_avit_pair('avit_small_patch16_224', 224), _avit_pair('avit_tiny_patch16_224', 224)]
    return [_avit_pair('avit_tiny_patch16_224', 32)]


def tavt_pairs(gpu):
    from tavt.measure import gene_macs, parse_gene, plain_timm_model
    from tavt.models.modeling import build_model
    model_type, size = ('ViT-B_16', 224) if gpu else ('ViT-digits', 32)
    torch.manual_seed(0)
    model = build_model(model_type, size, 200, zero_head=False)
    model.transformer.encoder.restore_dropped = False
    gene = parse_gene('lower', model.num_tokens, model.num_layers)
    model.set_length_config(gene)
    model.eval()
    return [Pair(f'TAVT {model_type}@{size} lower gene', plain_timm_model(model).eval(), model, model, size,
                 (gene_macs(model, None) / 1e9, gene_macs(model, gene) / 1e9))]


def toe_pairs(gpu):
    """ToE's model at inference (token selection off in eval, as its evaluation runs it) against the plain timm
    model: the same computation, the control row of the grid."""
    from shared.flops import model_macs
    from toe.deit.models import create_model
    from toe.measure import plain_timm_model
    name, size = ('deit_small_patch16_224', 224) if gpu else ('deit_tiny_patch16_224', 32)
    torch.manual_seed(0)
    model = create_model(name, num_classes=1000, img_size=size, drop_path_rate=0.0).eval()
    gflops = model_macs(model) / 1e9
    return [Pair(f'ToE {name} at inference (control)', plain_timm_model(model).eval(), model, model, size,
                 (gflops, gflops))]


PAIRS = {'tome': tome_pairs, 'tocom': tocom_pairs, 'diffrate': diffrate_pairs, 'avit': avit_pairs,
         'tavt': tavt_pairs, 'toe': toe_pairs}
assert tuple(PAIRS) == NAMES, 'every method of shared.methods needs its benchmark pair here, in registry order'


def _namespace(**kwargs):
    import types
    return types.SimpleNamespace(**kwargs)


def _avit_gflops(model, x):
    """(full, zipped) GFLOPs per image of A-ViT on the batch x: its depth counters after one forward."""
    from avit.engine_act import per_image_macs
    from shared.flops import model_macs
    with torch.no_grad():
        model(x.float())
    return model_macs(model) / 1e9, float(per_image_macs(model, model.counter_token).mean()) / 1e9


def run_grid(device, out_dir, methods=NAMES, compile_=False, batch_sizes=None, dtypes=None, rounds=None, runs=None,
             warmup=None, backend='inductor', compile_batch_sizes=None, compile_dtypes=None):
    from shared.benchmark import compile_forward, interleaved_seconds
    device = torch.device(device)
    gpu = device.type == 'cuda'
    grid = dict(GPU_GRID if gpu else CPU_GRID)
    overrides = dict(batch_sizes=batch_sizes, dtypes=dtypes, rounds=rounds, runs=runs, warmup=warmup,
                     compile_batch_sizes=compile_batch_sizes, compile_dtypes=compile_dtypes)
    for key, value in overrides.items():
        if value:
            grid[key] = value
    # every (model, batch, dtype) is a graph of its own; the default limit of 8 per code object would silently fall
    # back to eager for the models that share timm's forward
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                4 * len(grid['compile_batch_sizes']) * len(grid['compile_dtypes']))
    if compile_ and not (set(grid['compile_batch_sizes']) & set(grid['batch_sizes'])
                         and set(grid['compile_dtypes']) & set(grid['dtypes'])):
        print(f"--compile: no compiled rows, the grid has no cell of batch {grid['compile_batch_sizes']} and dtype "
              f"{grid['compile_dtypes']} (set --compile-batch-sizes / --compile-dtypes)")
    rows = []
    for method in methods:
        for pair in PAIRS[method](gpu):
            start = time.perf_counter()
            torch._dynamo.reset()  # each pair compiles from scratch, its graphs alone in the cache
            pair.plain.to(device)
            pair.module.to(device)
            eager = {SERIES['eager'][0]: pair.plain, SERIES['eager'][1]: pair.reduced}
            both = dict(eager)
            if compile_:
                both[SERIES['compiled'][0]] = compile_forward(pair.plain, backend)
                both[SERIES['compiled'][1]] = compile_forward(pair.reduced, backend, pair.dynamo_config)
            for bs in grid['batch_sizes']:
                x = torch.randn(bs, 3, pair.size, pair.size, generator=torch.Generator().manual_seed(0)).to(device)
                gflops = pair.gflops or _avit_gflops(pair.module, x)
                for dtype_name in grid['dtypes']:
                    dtype = getattr(torch, dtype_name)
                    with_compiled = bs in grid['compile_batch_sizes'] and dtype_name in grid['compile_dtypes']
                    forwards = both if with_compiled else eager
                    seconds = interleaved_seconds(forwards, x, rounds=grid['rounds'], runs=grid['runs'],
                                                  warmup=grid['warmup'], dtype=dtype)
                    for mode, speed in speed_columns(seconds, bs).items():
                        base_fn, red_fn = forwards[SERIES[mode][0]], forwards[SERIES[mode][1]]
                        row = dict(method=method, setting=pair.label, mode=mode, dtype=dtype_name, batch=bs, **speed,
                                   baseline_gflops=gflops[0], gflops=gflops[1], flops_ratio=gflops[0] / gflops[1],
                                   baseline_peak_mb=_peak_mb(base_fn, x, dtype, device, mode),
                                   peak_mb=_peak_mb(red_fn, x, dtype, device, mode))
                        rows.append(row)
                        print(f"{pair.label} {mode} {dtype_name} batch {bs}: x{row['speedup']:.2f} "
                              f"[{row['speedup_min']:.2f}, {row['speedup_max']:.2f}] "
                              f"(x{row['speedup_vs_eager_baseline']:.2f} over the eager baseline), "
                              f"FLOPs ratio {row['flops_ratio']:.2f}", flush=True)
            print(f'{pair.label}: {time.perf_counter() - start:.0f} s', flush=True)
    return write_tables(rows, device, out_dir, grid, compile_ and backend)


# mode -> (baseline, reduced) names of the timed forwards
SERIES = {'eager': ('baseline', 'reduced'), 'compiled': ('compiled baseline', 'compiled reduced')}


def speed_columns(seconds, batch):
    """The speed columns of each mode's row from one `interleaved_seconds` result (compiled forwards present or
    not): img/s medians, speed-up over the same mode's baseline as median/min/max over rounds, and the median
    speed-up over the eager baseline."""
    from shared.benchmark import speedup_table
    over_eager = speedup_table(seconds, batch, SERIES['eager'][0])
    columns = {}
    for mode, (base, reduced) in SERIES.items():
        if reduced not in seconds:
            continue
        table = speedup_table(seconds, batch, base)
        speedup = table[reduced]['speedup']
        columns[mode] = dict(baseline_img_s=table[base]['img_per_s']['median'],
                             img_s=table[reduced]['img_per_s']['median'], speedup=speedup['median'],
                             speedup_min=speedup['min'], speedup_max=speedup['max'],
                             speedup_vs_eager_baseline=over_eager[reduced]['speedup']['median'])
    return columns


def _peak_mb(fn, x, dtype, device, mode):
    """Peak MiB of one forward; NaN for compiled code on the CPU, whose tracker (a dispatch mode) makes dynamo run
    the eager ops instead of the compiled graph."""
    from shared.benchmark import peak_forward_memory_mb
    if mode == 'compiled' and device.type != 'cuda':
        return float('nan')
    xd = x.to(dtype)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        return peak_forward_memory_mb(lambda: fn(xd), device)


def device_line(device):
    """The device, its thread count, the libraries and the commit the table was measured with."""
    import timm
    from shared.provenance import device_name, git_commit
    cuda = f', CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}' if device.type == 'cuda' else ''
    return (f'Device: {device.type.upper()} {device_name(device)}, {torch.get_num_threads()} torch threads; '
            f'torch {torch.__version__}{cuda}, timm {timm.__version__}, Python {platform.python_version()}; '
            f'commit {git_commit()}')


COLUMNS = ['method', 'setting', 'mode', 'dtype', 'batch', 'baseline_img_s', 'img_s', 'speedup', 'speedup_min',
           'speedup_max', 'speedup_vs_eager_baseline', 'baseline_gflops', 'gflops', 'flops_ratio',
           'baseline_peak_mb', 'peak_mb']


def _mib(value):
    return 'n/a' if value != value else f'{value:.1f}'


def write_tables(rows, device, out_dir, grid, backend=None):
    os.makedirs(out_dir, exist_ok=True)
    line = device_line(device)
    csv_path, md_path = os.path.join(out_dir, 'bench.csv'), os.path.join(out_dir, 'bench.md')
    with open(csv_path, 'w', newline='') as f:
        f.write(f'# {line}\n')
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    compiled_note = (f' Compiled rows (batch {", ".join(map(str, grid["compile_batch_sizes"]))}; '
                     f'{", ".join(grid["compile_dtypes"])}): both models torch.compile\'d ({backend}, static shapes); '
                     'speed-up over the compiled baseline, and in its own column over the eager one.') if backend else ''
    with open(md_path, 'w') as f:
        f.write(f'{line}\n\nEach method against its plain timm baseline on the same weights, {grid["rounds"]} '
                f'interleaved rounds of {grid["runs"]} forwards after {grid["warmup"]} warm-up; speed-up: median '
                f'[min, max] over rounds; peak memory of one forward (MiB; n/a: compiled on the CPU, which only '
                f'CUDA\'s allocator statistics can measure).{compiled_note}\n\n')
        f.write('| method | mode | dtype | batch | baseline img/s | img/s | speed-up | vs eager baseline | '
                'FLOPs ratio | baseline peak MiB | peak MiB |\n|' + '---|' * 11 + '\n')
        for r in rows:
            f.write(f"| {r['setting']} | {r['mode']} | {r['dtype']} | {r['batch']} | {r['baseline_img_s']:.1f} | "
                    f"{r['img_s']:.1f} | {r['speedup']:.2f} [{r['speedup_min']:.2f}, {r['speedup_max']:.2f}] | "
                    f"{r['speedup_vs_eager_baseline']:.2f} | {r['flops_ratio']:.2f} | {_mib(r['baseline_peak_mb'])} | "
                    f"{_mib(r['peak_mb'])} |\n")
    print(f'wrote {md_path} and {csv_path}')
    return rows, md_path, csv_path
