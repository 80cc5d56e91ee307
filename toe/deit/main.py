"""ToE on DeiT: `torchrun --nproc_per_node=N toe/deit/main.py --model deit_small_patch16_224 --expansion-step 0 100 200
--keep-rate 0.5 0.75 1.0 --initialization-keep-rate 0.25 --expansion-multiple-stage 2 ...` (ToE/deit/main.py).

DeiT's trainer with one change per epoch: the TokenSelect stage is set from the epoch and reduction is switched on for
training, then off for evaluating the online model (on with --sparse-eval). The EMA copy is always evaluated on all
tokens (its flag is never set in the original either).
"""
import datetime
import os
import time

import torch
import torch.backends.cudnn as cudnn

from shared.amp import amp_enabled
from shared.args import deit_parser
from shared.checkpoint import (CheckpointError, auto_resume, load_finetune, load_weights, resume, safe_load,
                               save_checkpoint, to_timm_state_dict)
from shared.datasets import DatasetLayoutError, build_dataset, build_loaders
from shared.distributed import init_distributed_mode, is_main_process, seed_per_rank, wrap_ddp
from shared.engine import build_criterion, build_mixup, build_model_ema, build_optimization, evaluate, log_epoch
from toe.deit.engine import train_one_epoch
from toe.deit.models import create_model
from toe.token_select import add_toe_args, build_token_select, check_toe_args, enter_epoch


def get_args_parser(add_help=True):
    parser = deit_parser('ToE DeiT training and evaluation script', add_help=add_help)
    # ToE's DeiT main defaults (r0 0.4, k 5) differ from the class and the other two sub-projects (0.25, 2).
    add_toe_args(parser, initialization_keep_rate=0.4, expansion_multiple_stage=5)
    parser.add_argument('--patch-size', default=16, type=int,
                        help='images patch size (parsed and unused, as in the original: the model name decides)')
    return parser


def parse_args(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_toe_args(parser, args)
    return args


def set_attn_only(model):
    for name, p in model.named_parameters():
        p.requires_grad = '.attn.' in name
    head = getattr(model, 'head', None) or getattr(model, 'fc')
    head.weight.requires_grad = True
    head.bias.requires_grad = True
    if hasattr(model, 'pos_embed'):
        model.pos_embed.requires_grad = True
    for p in model.patch_embed.parameters():
        p.requires_grad = False


def build_teacher(args, device):
    import timm
    if not args.teacher_path:
        raise SystemExit('--distillation-type {} needs --teacher-path'.format(args.distillation_type))
    print(f'Creating teacher model: {args.teacher_model}')
    teacher = timm.create_model(args.teacher_model, pretrained=False, num_classes=args.nb_classes, global_pool='avg')
    load_weights(teacher, to_timm_state_dict(safe_load(args.teacher_path)), source=args.teacher_path)
    return teacher.to(device).eval()


def main(args):
    init_distributed_mode(args)
    print(args)
    device = torch.device(args.device)
    amp = amp_enabled(args, device)
    seed_per_rank(args.seed)
    cudnn.benchmark = True

    try:
        dataset_train, args.nb_classes = build_dataset(is_train=True, args=args)
        dataset_val, _ = build_dataset(is_train=False, args=args)
    except DatasetLayoutError as e:
        raise SystemExit(f'error: {e}')
    data_loader_train, data_loader_val = build_loaders(args, dataset_train, dataset_val)
    mixup_fn = build_mixup(args, args.nb_classes)

    print(f'Creating model: {args.model}')
    model = create_model(args.model, num_classes=args.nb_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                         drop_block_rate=None, img_size=args.input_size)
    model.token_select = build_token_select(args)
    if args.finetune:
        load_finetune(model, args.finetune)
    if args.attn_only:
        set_attn_only(model)
    model.to(device)

    # created before any stage is set: its TokenSelect keeps sparse_inference False (full-token EMA eval)
    model_ema = build_model_ema(model, args, legacy=True)

    model, model_without_ddp = wrap_ddp(model, args)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print('number of params:', n_parameters)

    optimizer, loss_scaler, lr_scheduler = build_optimization(args, model_without_ddp, device)
    teacher_model = build_teacher(args, device) if args.distillation_type != 'none' else None
    criterion = build_criterion(args, mixup_fn, teacher_model)

    if args.output_dir and is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
    if not args.eval:
        auto_resume(args)
    try:
        resume(args, model_without_ddp, optimizer, lr_scheduler, loss_scaler, model_ema)
    except CheckpointError as e:
        raise SystemExit(f'error: --resume {args.resume}: {e}')
    num_patches = model_without_ddp.patch_embed.num_patches
    token_select = model_without_ddp.token_select
    try:
        token_select.check_num_patches(num_patches)
    except ValueError as e:
        raise SystemExit(f'error: {e}')

    if args.eval:
        token_select.sparse_inference = False  # stage 0 / flag off: full tokens, as the original's --eval
        test_stats = evaluate(data_loader_val, model, device, amp=amp)
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
        if model_ema is not None and args.resume:
            test_stats = evaluate(data_loader_val, model_ema.ema, device, amp=amp)
            print(f"Accuracy of the model_ema on the {len(dataset_val)} test images: {test_stats['acc1']:.2f}%")
        return test_stats

    print(f'Start training for {args.epochs} epochs')
    start_time = time.time()
    max_accuracy, ema_max_accuracy = 0.0, 0.0
    log_stats = {}
    for epoch in range(args.start_epoch, args.epochs):
        if args.distributed:
            data_loader_train.sampler.set_epoch(epoch)
        enter_epoch(token_select, epoch, num_patches)
        train_stats = train_one_epoch(model, criterion, data_loader_train, optimizer, device, epoch, loss_scaler,
                                      args.clip_grad, model_ema, mixup_fn, set_training_mode=args.train_mode,
                                      args=args, amp=amp, print_freq=args.print_freq)
        lr_scheduler.step(epoch)
        checkpoint_state = dict(model=model_without_ddp, optimizer=optimizer, lr_scheduler=lr_scheduler, epoch=epoch,
                                loss_scaler=loss_scaler, model_ema=model_ema, args=args)
        if args.output_dir:
            save_checkpoint(os.path.join(args.output_dir, 'checkpoint.pth'), **checkpoint_state)

        token_select.sparse_inference = bool(args.sparse_eval)
        test_stats = evaluate(data_loader_val, model, device, amp=amp)
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
        if max_accuracy < test_stats['acc1']:
            max_accuracy = test_stats['acc1']
            if args.output_dir:
                save_checkpoint(os.path.join(args.output_dir, 'best_checkpoint.pth'), **checkpoint_state)
        print(f'Max accuracy: {max_accuracy:.2f}%')
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                     **{f'test_{k}': v for k, v in test_stats.items()},
                     'epoch': epoch, 'n_parameters': n_parameters,
                     'expansion_stage': token_select.expansion_stage,
                     'train_kept_tokens': token_select.kept_tokens(num_patches)}
        if model_ema is not None:
            # The original updates the EMA copy's stage but sets the flag on the online model: the EMA copy's flag
            # stays False, so the EMA is evaluated on all tokens.
            model_ema.ema.token_select.update_current_stage(epoch)
            ema_test_stats = evaluate(data_loader_val, model_ema.ema, device, amp=amp)
            print(f"Accuracy of the model_ema on the {len(dataset_val)} test images: {ema_test_stats['acc1']:.2f}%")
            if ema_max_accuracy < ema_test_stats['acc1']:
                ema_max_accuracy = ema_test_stats['acc1']
                if args.output_dir:
                    save_checkpoint(os.path.join(args.output_dir, 'ema_best_checkpoint.pth'), **checkpoint_state)
            print(f'Max accuracy of model_ema: {ema_max_accuracy:.2f}%\n')
            log_stats.update({f'ema_test_{k}': v for k, v in ema_test_stats.items()})
        log_epoch(args.output_dir, log_stats)

    total_time = time.time() - start_time
    print('Training time {}'.format(str(datetime.timedelta(seconds=int(total_time)))))
    return log_stats


if __name__ == '__main__':
    main(parse_args())
