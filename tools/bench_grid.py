"""`tools/benchmark.py --all`: every method against its plain baseline in one process, over dtypes, batch sizes and
(with --compile) compiled forwards; one Markdown and one CSV table with the device and versions.

Each method contributes a pair built on the same weights: the plain timm model and the reduced inference path at a
fixed setting, with the analytic GFLOPs of both (shared.flops). Timing is shared.benchmark's interleaved rounds;
peak memory is shared.benchmark.peak_forward_memory_mb of one forward."""
import copy
import csv
import os
import platform
import types

import torch

# (GPU setting, CPU smoke setting) per method; the GPU ones are the papers' comparison points
GPU_GRID = dict(batch_sizes=(1, 64, 256), dtypes=('float16', 'bfloat16'), rounds=5, runs=10, warmup=3)
CPU_GRID = dict(batch_sizes=(1,), dtypes=('float32',), rounds=1, runs=1, warmup=1)


def _tome(gpu):
    from tocom.measure import _build, model_gflops, plain_timm_model
    args = types.SimpleNamespace(model='deit_small_patch16_224' if gpu else 'deit_tiny_patch16_224',
                                 num_classes=1000, input_size=None if gpu else 32)
    r = 13 if gpu else 2
    torch.manual_seed(0)
    model = _build(args).eval()
    model.r = r
    return f'ToMe {args.model} r={r}', plain_timm_model(model, args.model).eval(), model, model, \
        model_gflops(model, 0), model_gflops(model, r), model.patch_embed.img_size[0]


def _diffrate(gpu):
    from diffrate import schedules
    from diffrate.measure import _logits_only, schedule_gflops
    from diffrate.models import apply_diffrate, create_model
    name, target = 'vit_deit_small_patch16_224', 2.9
    torch.manual_seed(0)
    plain = create_model(name, num_classes=1000).eval()
    model = apply_diffrate(copy.deepcopy(plain), name, 4).eval()
    model.set_kept_num(*schedules.lookup(name, target))
    return f'DiffRate {name} {target}G', plain, _logits_only(model), model, schedule_gflops(name, None, None, 1000), \
        model.calculate_flop_inference() / 1e9, 224


def _avit(gpu):
    import timm
    from avit.measure import _build
    args = types.SimpleNamespace(model='avit_small_patch16_224' if gpu else 'avit_tiny_patch16_224', finetune='',
                                 gate_scale=None, gate_center=None, input_size=224 if gpu else 32, nb_classes=None,
                                 seed=0)
    model = _build(args, (100., 3.))
    model.zip_tokens = True
    plain = timm.create_model(args.model.replace('avit_', 'vit_'), pretrained=False, num_classes=model.num_classes,
                              img_size=args.input_size)
    plain.load_state_dict(model.state_dict())
    # random weights: the FLOPs of the timed batch are read after its first forward (see measure_pair)
    return f'A-ViT {args.model} zipped (random weights)', plain.eval(), model, model, None, None, args.input_size


def _tavt(gpu):
    from tavt.measure import gene_macs, parse_gene, plain_timm_model
    from tavt.models.modeling import build_model
    model_type, size = ('ViT-B_16', 224) if gpu else ('ViT-digits', 32)
    torch.manual_seed(0)
    model = build_model(model_type, size, 200, zero_head=False)
    model.transformer.encoder.restore_dropped = False
    gene = parse_gene('lower', model.num_tokens, model.num_layers)
    model.eval()
    return f'TAVT {model_type}@{size} lower gene', plain_timm_model(model).eval(), \
        lambda t: model(t, length_config=gene), model, gene_macs(model, None) / 1e9, gene_macs(model, gene) / 1e9, size


METHODS = {'tome': _tome, 'diffrate': _diffrate, 'avit': _avit, 'tavt': _tavt}


def _avit_gflops(model, x):
    from avit.engine_act import per_image_macs
    from shared.flops import model_macs
    with torch.no_grad():
        model(x.float())
    return model_macs(model) / 1e9, float(per_image_macs(model, model.counter_token).mean()) / 1e9


def run_grid(device, out_dir, methods=tuple(METHODS), compile_=False, batch_sizes=None, dtypes=None, rounds=None,
             runs=None, warmup=None):
    from shared.benchmark import interleaved_seconds, peak_forward_memory_mb, speedup_table
    device = torch.device(device)
    gpu = device.type == 'cuda'
    grid = dict(GPU_GRID if gpu else CPU_GRID)
    for key, value in dict(batch_sizes=batch_sizes, dtypes=dtypes, rounds=rounds, runs=runs, warmup=warmup).items():
        if value:
            grid[key] = value
    rows = []
    for method in methods:
        label, plain, reduced, module, base_gflops, red_gflops, size = METHODS[method](gpu)
        plain.to(device)
        module.to(device)
        modes = [('eager', plain, reduced)]
        if compile_:
            modes.append(('compiled', torch.compile(plain), torch.compile(reduced)))
        for bs in grid['batch_sizes']:
            x = torch.randn(bs, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
            if method == 'avit':
                base_gflops, red_gflops = _avit_gflops(module, x)
            for dtype_name in grid['dtypes']:
                dtype = getattr(torch, dtype_name)
                for mode, base_fn, red_fn in modes:
                    seconds = interleaved_seconds({'baseline': base_fn, 'reduced': red_fn}, x, rounds=grid['rounds'],
                                                  runs=grid['runs'], warmup=grid['warmup'], dtype=dtype)
                    table = speedup_table(seconds, bs, 'baseline')
                    xd = x.to(dtype)

                    def peak(fn):
                        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                            return peak_forward_memory_mb(lambda: fn(xd), device)
                    sp = table['reduced']['speedup']
                    rows.append(dict(method=method, setting=label, mode=mode, dtype=dtype_name, batch=bs,
                                     baseline_img_s=table['baseline']['img_per_s']['median'],
                                     img_s=table['reduced']['img_per_s']['median'], speedup=sp['median'],
                                     speedup_min=sp['min'], speedup_max=sp['max'], baseline_gflops=base_gflops,
                                     gflops=red_gflops, flops_ratio=base_gflops / red_gflops,
                                     baseline_peak_mb=peak(base_fn), peak_mb=peak(red_fn)))
                    print(f"{label} {mode} {dtype_name} batch {bs}: x{sp['median']:.2f} "
                          f"[{sp['min']:.2f}, {sp['max']:.2f}], FLOPs ratio {base_gflops / red_gflops:.2f}")
    return write_tables(rows, device, out_dir, grid)


def device_line(device):
    import timm
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else \
        f'CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)'
    cuda = f', CUDA {torch.version.cuda}' if device.type == 'cuda' else ''
    return f'Device: {name}; torch {torch.__version__}{cuda}, timm {timm.__version__}, Python {platform.python_version()}'


COLUMNS = ['method', 'setting', 'mode', 'dtype', 'batch', 'baseline_img_s', 'img_s', 'speedup', 'speedup_min',
           'speedup_max', 'baseline_gflops', 'gflops', 'flops_ratio', 'baseline_peak_mb', 'peak_mb']


def write_tables(rows, device, out_dir, grid):
    os.makedirs(out_dir, exist_ok=True)
    line = device_line(device)
    csv_path, md_path = os.path.join(out_dir, 'bench.csv'), os.path.join(out_dir, 'bench.md')
    with open(csv_path, 'w', newline='') as f:
        f.write(f'# {line}\n')
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with open(md_path, 'w') as f:
        f.write(f'{line}\n\nEach method against its plain timm baseline on the same weights, {grid["rounds"]} '
                f'interleaved rounds of {grid["runs"]} forwards after {grid["warmup"]} warm-up; speed-up: median '
                '[min, max] over rounds; peak memory of one forward (MiB).\n\n')
        f.write('| method | mode | dtype | batch | baseline img/s | img/s | speed-up | FLOPs ratio | '
                'baseline peak MiB | peak MiB |\n|' + '---|' * 10 + '\n')
        for r in rows:
            f.write(f"| {r['setting']} | {r['mode']} | {r['dtype']} | {r['batch']} | {r['baseline_img_s']:.1f} | "
                    f"{r['img_s']:.1f} | {r['speedup']:.2f} [{r['speedup_min']:.2f}, {r['speedup_max']:.2f}] | "
                    f"{r['flops_ratio']:.2f} | {r['baseline_peak_mb']:.1f} | {r['peak_mb']:.1f} |\n")
    print(f'wrote {md_path} and {csv_path}')
    return rows, md_path, csv_path
