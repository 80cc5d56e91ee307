"""DiffRate: search per-block prune/merge kept-token numbers of a frozen ViT under a FLOPs target, or evaluate a
schedule (the reference's main.py, on the project's shared modules).

    torchrun --nproc_per_node=4 diffrate/main.py --arch-lr 0.01 --arch-min-lr 0.001 --epoch 3 --batch-size 256 \
        --data-path $IMAGENET --output_dir $OUT --model vit_deit_small_patch16_224 --target_flops 2.9
    python diffrate/main.py --eval --load_compression_rate --data-path $IMAGENET \
        --model vit_deit_small_patch16_224 --target_flops 2.9
"""
import os

# never download: timm's pretrained weights are used only when its cache already has them (read at hub import)
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from timm.scheduler.cosine_lr import CosineLRScheduler  # noqa: E402

from diffrate import schedules  # noqa: E402
from diffrate.engine import evaluate, log_kept_numbers, train_one_epoch  # noqa: E402
from diffrate.models import apply_diffrate, create_model, patch_kind  # noqa: E402
from shared import args as shared_args  # noqa: E402
from shared.amp import NativeScaler, amp_enabled  # noqa: E402
from shared.args import CheckedArgumentParser, check_finite_weights, check_train_batches, load_checkpoint  # noqa: E402
from shared.checkpoint import load_weights, to_timm_state_dict  # noqa: E402
from shared.datasets import build_dataset, build_loaders  # noqa: E402
from shared.distributed import init_distributed_mode, is_main_process, seed_per_rank, wrap_ddp  # noqa: E402
from shared.engine import build_criterion, build_mixup, scale_lr  # noqa: E402
from shared.errors import UserError, run_cli  # noqa: E402
from shared.trainer import Best, Trainer  # noqa: E402

def get_args_parser():
    parser = CheckedArgumentParser('DiffRate search and evaluation script', add_help=False)
    for add in shared_args.DEIT_GROUPS:
        add(parser)
    # the reference's defaults where they differ from DeiT's
    parser.set_defaults(batch_size=256, model_ema=False, weight_decay=0.0, color_jitter=0.4, output_dir='./log/temp',
                        dist_eval=True, num_workers=10)
    g = parser.add_argument_group('DiffRate')
    # the reference's README spells --epoch, which its parser took as an abbreviation of --epochs
    g.add_argument('--epoch', dest='epochs', type=int, default=argparse.SUPPRESS, help='the same as --epochs')
    g.add_argument('--multi-reso', default=False, action='store_true', help='unused (parsed as the reference does)')
    g.add_argument('--arch-lr', type=float, default=0.01, metavar='LR',
                   help='AdamW learning rate of the architecture parameters')
    g.add_argument('--arch-min-lr', type=float, default=0.001, metavar='LR',
                   help='floor of the cosine schedule of the architecture learning rate')
    # the reference's opt-in flag; resuming is now the default (--no-auto-resume switches it off)
    g.add_argument('--autoresume', action='store_true', dest='auto_resume', default=True,
                   help='resume from <output_dir>/checkpoint.pth if present (default on)')
    g.add_argument('--port', default='15662', type=str, help='SLURM master port (unused by torchrun)')
    g.add_argument('--target_flops', type=float, default=3.0,
                   help='GFLOPs target of the search; with --load_compression_rate the schedule to load')
    g.add_argument('--granularity', type=int, default=4,
                   help='the token number gap between each compression rate candidate')
    g.add_argument('--load_compression_rate', action='store_true',
                   help='evaluate the schedule of compression_rate.json for --model and --target_flops')
    g.add_argument('--warmup_compression_rate', action='store_true', default=False,
                   help='no FLOPs penalty in the first epoch')
    g.add_argument('--compression-rate-file', default=None,
                   help='schedule file for --load_compression_rate (default ./compression_rate.json as the reference, '
                        'else the one shipped in diffrate/)')
    g.add_argument('--weights', default='', metavar='PATH',
                   help='weights of the frozen network for a search, from a local checkpoint (DeiT/MAE {"model": ...} '
                        'or a timm state dict); loaded as --finetune loads them, but the search stays in train mode '
                        'as the reference\'s does with its downloaded pretrained weights (its --finetune switches the '
                        'search to eval mode, where nothing is learned)')
    g.add_argument('--allow-random-weights', action='store_true',
                   help='let a search run on randomly initialised weights when no weights are given (tests); '
                        'otherwise it stops and asks for --weights')
    return parser


def check_args(args, parser):
    """DiffRate's own usage errors (the shared ones are checked by the parser); the README's `caformer-s36`
    spelling is the model caformer_s36."""
    if args.model.replace('-', '_') in schedules.MODEL_KEYS:
        args.model = args.model.replace('-', '_')
    if args.target_flops <= 0:
        parser.error(f'--target_flops {args.target_flops}: must be a positive number of GFLOPs')
    return args


def build_diffrate_model(args, require_weights=False):
    """Model of --model with --drop/--drop-path and the dataset's classes, patched; weights from --finetune or
    --weights, else timm's cached pretrained weights when present, else random: said loudly, or refused
    (UserError) with `require_weights`."""
    patch_kind(args.model)  # unsupported names stop before anything is built
    weights = getattr(args, 'weights', '')
    if args.finetune and weights:
        raise UserError('give the weights with one of --finetune (the search then runs in eval mode, as the '
                        'reference\'s) and --weights (the search runs in train mode), not both')
    flag, source = ('--finetune', args.finetune) if args.finetune else ('--weights', weights)
    kwargs = dict(num_classes=args.nb_classes, drop_rate=args.drop, drop_path_rate=args.drop_path)
    if args.input_size != 224 and 'caformer' not in args.model:
        kwargs['img_size'] = args.input_size
    model = None
    if not source and 'mae' not in args.model:
        try:
            model = create_model(args.model, pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001  (no cached weights, no network)
            print(f'| pretrained weights of {args.model} unavailable here ({type(e).__name__}); using RANDOM weights '
                  '(pass --weights <checkpoint> to load weights)')
    if model is None:
        if not source and require_weights:
            raise UserError(f'no weights for {args.model}: neither --weights nor --finetune was given and timm has '
                            'no cached pretrained weights for it, so the search would learn a schedule for random '
                            'weights. Pass --weights <checkpoint> (or --allow-random-weights to run it anyway)')
        if not source and 'mae' in args.model:
            print(f'| {args.model}: no weights given; using RANDOM weights (pass --weights '
                  'mae_finetuned_vit_*.pth to load the MAE fine-tuned model)')
        model = create_model(args.model, **kwargs)
    apply_diffrate(model, args.model, args.granularity)
    if source:
        checkpoint = load_checkpoint(source, flag)
        state_dict = to_timm_state_dict(checkpoint, model if hasattr(model, 'pos_embed') else None)
        check_finite_weights(state_dict, source, flag)
        own = model.state_dict()
        for k in ['head.weight', 'head.bias', 'head_dist.weight', 'head_dist.bias']:
            if k in state_dict and k in own and state_dict[k].shape != own[k].shape:
                print(f'Removing key {k} from pretrained checkpoint')
                del state_dict[k]
        state_dict = {k: v for k, v in state_dict.items() if 'ddp' not in k}
        result = load_weights(model, state_dict, strict=False, source=source)
        network_missing = [k for k in result.missing_keys if 'ddp' not in k and not k.startswith('head')]
        if network_missing:
            raise UserError(f'{flag} {source} does not fit {args.model}: missing {network_missing[:8]}')
    return model


def reachable_gflops(model, pick=min):
    """GFLOPs with every compressible proxy at its smallest candidate (pick=min), or its largest (pick=max: the
    uncompressed model)."""
    saved = model.get_kept_num()
    kept = []
    for block_proxies in ([b.prune_ddp for b in model.blocks], [b.merge_ddp for b in model.blocks]) \
            if hasattr(model, 'blocks') else ([], [b.merge_ddp for b in model.compressed_blocks()]):
        kept.append([int(pick(p.kept_token_candidate)) + p.class_token_num for p in block_proxies] or None)
    if hasattr(model, 'blocks'):
        model.set_kept_num(*kept)
        gflops = model.calculate_flop_inference() / 1e9
        model.set_kept_num(*saved)
    else:
        from diffrate.flops import caformer_gflops
        gflops = caformer_gflops(*model._geometry(), kept[1])
    return gflops


def smallest_reachable_gflops(model):
    return reachable_gflops(model, min)


def save_schedule(args, model, epoch=None):
    """The learned schedule as a compression_rate.json entry in <output_dir>/compression_rate.json."""
    prune, merge = model.get_kept_num()
    if args.output_dir and is_main_process():
        path = os.path.join(args.output_dir, 'compression_rate.json')
        schedules.write_entry(path, args.model, args.target_flops, prune, merge)
    return {'prune_kept_num': prune, 'merge_kept_num': merge, 'model': args.model,
            'target_flops': args.target_flops, 'epoch': epoch}


def main(args, model=None, require_weights=False):
    """The entry script's run. `model`: an already patched DiffRate model holding its weights (Python callers such as
    diffrate/compare.py, whose baseline is not one of the reference's names); it replaces --model/--finetune, so that
    the search runs in train mode as the reference's does without --finetune. `require_weights` (the command line,
    unless --allow-random-weights): a search without weights stops instead of running on random ones."""
    init_distributed_mode(args)
    print(args)
    device = torch.device(args.device)
    seed_per_rank(args.seed, python_random=True)  # RandAugment draws from python's random
    torch.backends.cudnn.benchmark = True
    amp = amp_enabled(args, device)

    # bad inputs stop before any data is read or model weights are touched
    if model is None:
        patch_kind(args.model)
    if args.load_compression_rate:
        schedule = schedules.lookup(args.model, args.target_flops, args.compression_rate_file)

    dataset_train, args.nb_classes = build_dataset(is_train=True, args=args)
    dataset_val, _ = build_dataset(is_train=False, args=args)
    # the reference's loaders: distributed samplers even as a world of one, eval at the training batch size, workers
    # kept between epochs
    data_loader_train, data_loader_val = build_loaders(args, dataset_train, dataset_val, eval_batch_size=args.batch_size,
                                                       samplers_always_distributed=True, persistent_workers=True)
    mixup_fn = build_mixup(args, args.nb_classes)

    if model is None:
        print(f'Creating model: {args.model}')
        model = build_diffrate_model(args, require_weights=require_weights and not args.eval)
    if args.load_compression_rate:
        model.set_kept_num(*schedule)
    if not args.eval:
        floor = smallest_reachable_gflops(model)
        if args.target_flops < floor:
            raise UserError(f'--target_flops {args.target_flops} is below the smallest FLOPs {floor:.3f}G that '
                            f'{args.model} can reach with --granularity {args.granularity}')
        full = reachable_gflops(model, max)
        if args.target_flops > full:
            raise UserError(f'--target_flops {args.target_flops} is above the FLOPs of the full {args.model} '
                            f'({full:.3f}G at --input-size {args.input_size}): nothing to search; give a smaller target')
        check_train_batches(dataset_train, args)
    # the network is frozen: only the proxies' logits learn (the reference leaves requires_grad on and simply
    # keeps the weights out of the optimizer; the architecture gradients are the same)
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device)
    model, model_without_ddp = wrap_ddp(model, args)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters())
    print(f'number of params: {n_parameters}')
    scale_lr(args)  # logged only: the network is frozen

    optimizer = torch.optim.AdamW(model_without_ddp.arch_parameters(), lr=args.arch_lr, weight_decay=0)
    loss_scaler = NativeScaler(device, amp)
    lr_scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs, lr_min=args.arch_min_lr,
                                     cycle_decay=args.decay_rate)
    criterion = build_criterion(args, mixup_fn).base_criterion

    # the schedule of the last finished epoch: written to compression_rate.json and stored in the checkpoint
    schedule_info = {}

    def train_epoch(epoch):
        stats = train_one_epoch(model, criterion, data_loader_train, optimizer, device, epoch, loss_scaler,
                                args.clip_grad, mixup_fn, set_training_mode=args.finetune == '',
                                target_flops=args.target_flops, warm_up=args.warmup_compression_rate, amp=amp,
                                print_freq=getattr(args, 'print_freq', 10), accum_iter=args.accum_iter)
        # the schedule that is evaluated, saved and reloaded is the one of the logits after the last step
        if args.finetune == '':
            model_without_ddp.refresh_kept_numbers()
        schedule_info.clear()
        schedule_info.update(save_schedule(args, model_without_ddp, epoch))
        return stats

    def evaluate_epoch(epoch):
        return evaluate(data_loader_val, model, device, amp)

    trainer = Trainer(args, model_without_ddp, optimizer, lr_scheduler, loss_scaler, train_loader=data_loader_train,
                      train_epoch=train_epoch, evaluate=evaluate_epoch, n_parameters=n_parameters,
                      bests=(Best(filename='model_best.pth'),), val_images=len(dataset_val),
                      checkpoint_fields=lambda: {'diffrate_schedule': dict(schedule_info)})
    checkpoint = trainer.resume()
    if checkpoint is not None and not args.load_compression_rate:
        # kept numbers are plain attributes (not in the state dict): take the schedule the checkpoint recorded, else
        # recompute them from the loaded logits (the reference evaluates the untrained full numbers here)
        saved = checkpoint.get('diffrate_schedule') if isinstance(checkpoint, dict) else None
        if saved:
            model_without_ddp.set_kept_num(saved['prune_kept_num'], saved['merge_kept_num'])
            schedule_info.update(saved)
        else:
            model_without_ddp.refresh_kept_numbers()

    if args.eval:
        test_stats = evaluate(data_loader_val, model, device, amp)
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
        return test_stats

    trainer.fit()
    output_dir = Path(args.output_dir) if args.output_dir else None
    print('Learned compression rate schedule:')
    log_kept_numbers(model)
    if schedule_info and output_dir and is_main_process():
        print(f"saved as {{'{schedules.MODEL_KEYS.get(args.model, args.model)}': "
              f"{{'{schedules.target_key(args.target_flops)}': ...}}}} in {output_dir / 'compression_rate.json'} "
              f"(evaluate with --eval --load_compression_rate --compression-rate-file "
              f"{output_dir / 'compression_rate.json'}, or --eval --resume {output_dir / 'checkpoint.pth'})")
    return schedule_info or None


if __name__ == '__main__':
    parser = CheckedArgumentParser('DiffRate search and evaluation script', parents=[get_args_parser()])
    args = check_args(parser.parse_args(), parser)
    if args.output_dir:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    run_cli(main, args, require_weights=not args.allow_random_weights)
