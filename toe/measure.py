"""ToE hooks for tools/flops.py and tools/benchmark.py.

ToE only changes training: from block 1 on, the blocks see 1 + M tokens (M kept patch tokens of the stage). So:
- flops(): training GFLOPs per image at each stage (shared.flops convention) and their epoch-weighted mean over the
  schedule (the figure it returns);
- benchmark(): one run timing a full training step (forward + backward + AdamW step) of the plain timm model and of
  the same weights under ToE at each stage's token count, in alternation; the per-stage speed-up over the plain model
  (median and range over rounds) next to the FLOPs ratio, the schedule-weighted speed-up, and the TokenSelect call's
  own time.

    python tools/flops.py --method toe --model deit_small_patch16_224 --expansion-step 0 100 200 --keep-rate 0.5 0.75 1.0
    python tools/benchmark.py --method toe --model deit_small_patch16_224 --batch-size 64 --device cuda
"""
import copy
import statistics

import torch

from shared.flops import model_macs, vit_dims
from toe.token_select import TokenSelect, add_toe_args, check_schedule


def _add_common(parser):
    parser.add_argument('--model', default='deit_small_patch16_224')
    parser.add_argument('--input-size', default=224, type=int)
    parser.add_argument('--num-classes', default=1000, type=int)
    parser.add_argument('--epochs', default=300, type=int, help='schedule length for the epoch-weighted figures')
    parser.add_argument('--stage', default=None, type=int, help='report this stage only (1-based)')
    # the run scripts' ToE values (the class defaults)
    add_toe_args(parser, initialization_keep_rate=0.25, expansion_multiple_stage=2)


def _build(args):
    from toe.deit.models import create_model
    check_schedule(args.expansion_step, args.keep_rate, args.initialization_keep_rate, args.expansion_multiple_stage,
                   args.distance)
    model = create_model(args.model, num_classes=args.num_classes, img_size=args.input_size, drop_path_rate=0.0)
    model.token_select = TokenSelect(args.expansion_step, args.keep_rate, args.initialization_keep_rate,
                                     args.expansion_multiple_stage, args.distance)
    return model


def stage_epochs(expansion_step, epochs):
    """Epochs spent in stages 0..S (stage 0: before the first step)."""
    bounds = [0] + [min(max(s, 0), epochs) for s in expansion_step] + [epochs]
    return [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]


def stage_table(model, epochs):
    """[(stage, epochs, kept patch tokens, GFLOPs)] for stages with at least one epoch."""
    sel = model.token_select
    dims, depth = vit_dims(model)
    n = dims['num_patches']
    rows = []
    for stage, n_epochs in enumerate(stage_epochs(sel.expansion_step, epochs)):
        kept = sel.kept_tokens(n, stage)
        tokens = [1 + n] + [1 + kept] * (depth - 1)  # block 0 always sees every token
        rows.append((stage, n_epochs, kept, model_macs(model, tokens) / 1e9))
    return [r for r in rows if r[1] > 0 or (r[0] == 0 and epochs == 0)]


def add_flops_args(parser):
    _add_common(parser)


def flops(args):
    model = _build(args)
    rows = stage_table(model, args.epochs)
    full = model_macs(model) / 1e9
    print(f'{args.model} at {args.input_size}px: {full:.3f} GFLOPs with all tokens')
    print('stage  epochs  kept patch tokens  GFLOPs (training forward)')
    for stage, n_epochs, kept, g in rows:
        print(f'{stage:5d}  {n_epochs:6d}  {kept:17d}  {g:.3f}')
    if args.stage is not None:
        return next(g for s, _, _, g in rows if s == args.stage)
    weighted = sum(e * g for _, e, _, g in rows) / max(sum(e for _, e, _, _ in rows), 1)
    print(f'epoch-weighted training GFLOPs over {args.epochs} epochs: {weighted:.3f} ({full / weighted:.3f}x fewer)')
    return weighted


def add_benchmark_args(parser):
    _add_common(parser)
    parser.add_argument('--batch-size', default=64, type=int)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--rounds', default=5, type=int, help='interleaved rounds (median and range are reported)')
    parser.add_argument('--runs', default=2, type=int, help='training steps of each model per round')
    parser.add_argument('--warmup', default=2, type=int)
    parser.add_argument('--threads', default=0, type=int, help='torch CPU threads (0: leave as is)')
    parser.add_argument('--amp', action='store_true', default=None, help='autocast (default: on for CUDA)')


def plain_timm_model(model):
    """timm's VisionTransformer of the ToE model's architecture holding its weights (no TokenSelect)."""
    from timm.models.vision_transformer import VisionTransformer
    from toe.deit.models import VisionTransformerExpansion
    plain = copy.deepcopy(model)
    del plain.token_select
    if isinstance(model, VisionTransformerExpansion):  # a distilled DeiT is timm's own class already
        plain.__class__ = VisionTransformer
    return plain


def benchmark(args):
    from shared.amp import autocast
    from shared.benchmark import format_spread, interleaved_seconds, speedup_table
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = (device.type == 'cuda') if args.amp is None else args.amp
    model = _build(args).to(device).train()
    plain = plain_timm_model(model).to(device).train()
    sel = model.token_select
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    criterion = torch.nn.CrossEntropyLoss()

    def trainer(net):
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == 'cuda')

        def step(images):
            with torch.enable_grad(), autocast(device, amp):
                loss = criterion(net(images), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return step

    with torch.no_grad(), autocast(device, amp):  # block-0 output: what TokenSelect sees in training
        tokens = model.blocks[0](model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x)))))

    def select(stage):
        def run(_):
            sel.expansion_stage, sel.sparse_inference = stage, True
            return sel.token_select(tokens)
        return run

    rows = stage_table(model, args.epochs)
    # one optimizer for ToE's model across its stages, as in training; stages without selection run all tokens
    toe_step = trainer(model)
    forwards = {'timm': trainer(plain)}
    active = {}
    for stage, *_ in rows:
        sel.expansion_stage, sel.sparse_inference = stage, True
        active[stage] = sel.is_active()
        if active[stage]:
            forwards[f'stage {stage}'] = _at_stage(toe_step, sel, stage)
            forwards[f'select {stage}'] = select(stage)
    forwards['toe all tokens'] = _at_stage(toe_step, sel, None)
    seconds = interleaved_seconds(forwards, x, rounds=args.rounds, runs=args.runs, warmup=args.warmup)
    sel.sparse_inference = False
    table = speedup_table(seconds, args.batch_size, 'timm')
    median = {name: statistics.median(t) for name, t in seconds.items()}
    t_full = median['timm']
    full_gflops = model_macs(model) / 1e9
    print(f'{args.model}, batch {args.batch_size}, {args.input_size}px, {device}, amp={amp}, {torch.get_num_threads()} '
          f'threads, {args.rounds} interleaved rounds of {args.runs} steps: plain timm training step '
          f'{t_full * 1000:.1f} ms; ToE with every token {median["toe all tokens"] * 1000:.1f} ms '
          f'(speed-up {format_spread(table["toe all tokens"]["speedup"], 3)})')
    print('stage  epochs  kept  GFLOPs  step ms  speed-up [min, max]   FLOPs ratio  speed-up/FLOPs  select ms')
    results = []
    for stage, n_epochs, kept, g in rows:
        name = f'stage {stage}' if active[stage] else 'toe all tokens'
        spread = table[name]['speedup']
        t = median[name]
        t_sel = median[f'select {stage}'] if active[stage] else 0.0
        speed, ratio = spread['median'], full_gflops / g
        results.append(dict(stage=stage, epochs=n_epochs, kept_tokens=kept, gflops=g, step_s=t, speedup=speed,
                            speedup_spread=spread, flops_ratio=ratio, select_s=t_sel))
        print(f'{stage:5d}  {n_epochs:6d}  {kept:4d}  {g:6.3f}  {t * 1000:7.1f}  {format_spread(spread, 3):>19}  '
              f'{ratio:11.3f}  {speed / ratio:14.3f}  {t_sel * 1000:9.2f}')
    total_epochs = sum(r['epochs'] for r in results)
    weighted_time = sum(r['epochs'] * r['step_s'] for r in results)
    weighted = total_epochs * t_full / weighted_time if weighted_time else 1.0
    weighted_flops = total_epochs * full_gflops / sum(r['epochs'] * r['gflops'] for r in results)
    print(f'schedule-weighted training speed-up over the plain model, {args.epochs} epochs: {weighted:.3f}x '
          f'(FLOPs: {weighted_flops:.3f}x)')
    return dict(model=args.model, batch_size=args.batch_size, device=str(device), amp=amp, full_step_s=t_full,
                toe_all_tokens_step_s=median['toe all tokens'], stages=results, schedule_speedup=weighted,
                schedule_flops_ratio=weighted_flops)


def _at_stage(step, sel, stage):
    """`step` with the selector at `stage` (None: selection off, every token)."""
    def run(images):
        if stage is None:
            sel.sparse_inference = False
        else:
            sel.expansion_stage, sel.sparse_inference = stage, True
        return step(images)
    return run
