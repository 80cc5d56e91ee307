"""ToE on DeiT: `torchrun --nproc_per_node=N toe/deit/main.py --model deit_small_patch16_224 --expansion-step 0 100 200
--keep-rate 0.5 0.75 1.0 --initialization-keep-rate 0.25 --expansion-multiple-stage 2 ...` (ToE/deit/main.py).

DeiT's trainer with one change per epoch: the TokenSelect stage is set from the epoch and reduction is switched on for
training, then off for evaluating the online model (on with --sparse-eval). The EMA copy is always evaluated on all
tokens (its flag is never set in the original either).
"""
import torch
import torch.backends.cudnn as cudnn

from shared.amp import amp_enabled
from shared.args import (check_checkpoint_file, check_finite_weights, check_train_batches, deit_parser,
                         load_checkpoint)
from shared.checkpoint import CheckpointError, load_finetune, load_weights, to_timm_state_dict
from shared.datasets import build_dataset, build_loaders
from shared.distributed import init_distributed_mode, seed_per_rank, wrap_ddp
from shared.engine import build_criterion, build_mixup, build_model_ema, build_optimization, evaluate
from shared.errors import UserError, run_cli
from shared.trainer import Best, Trainer
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
        raise UserError('--distillation-type {} needs --teacher-path'.format(args.distillation_type))
    print(f'Creating teacher model: {args.teacher_model}')
    teacher = timm.create_model(args.teacher_model, pretrained=False, num_classes=args.nb_classes, global_pool='avg')
    state_dict = to_timm_state_dict(load_checkpoint(args.teacher_path, '--teacher-path'))
    check_finite_weights(state_dict, args.teacher_path, '--teacher-path')
    load_weights(teacher, state_dict, source=args.teacher_path)
    return teacher.to(device).eval()


def main(args):
    init_distributed_mode(args)
    print(args)
    device = torch.device(args.device)
    amp = amp_enabled(args, device)
    seed_per_rank(args.seed, python_random=True)  # RandAugment draws from python's random
    cudnn.benchmark = True

    # files named on the command line are checked before any data is read
    teacher_path = args.teacher_path if args.distillation_type != 'none' else ''
    for flag, path in (('--finetune', args.finetune), ('--resume', args.resume), ('--teacher-path', teacher_path)):
        if path:
            check_checkpoint_file(path, flag)

    dataset_train, args.nb_classes = build_dataset(is_train=True, args=args)
    if not args.eval:
        check_train_batches(dataset_train, args)
    dataset_val, _ = build_dataset(is_train=False, args=args)
    data_loader_train, data_loader_val = build_loaders(args, dataset_train, dataset_val)
    mixup_fn = build_mixup(args, args.nb_classes)

    print(f'Creating model: {args.model}')
    model = create_model(args.model, num_classes=args.nb_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                         drop_block_rate=None, img_size=args.input_size)
    model.token_select = build_token_select(args)
    if args.finetune:
        load_finetune(model, args.finetune)  # refuses NaN/Inf weights itself
    if args.attn_only:
        set_attn_only(model)
    model.to(device)

    # created before any stage is set: its TokenSelect keeps sparse_inference False (full-token EMA eval)
    model_ema = build_model_ema(model, args, legacy=True)

    model, model_without_ddp = wrap_ddp(model, args, model_ema=model_ema)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print('number of params:', n_parameters)

    optimizer, loss_scaler, lr_scheduler = build_optimization(args, model_without_ddp, device)
    teacher_model = build_teacher(args, device) if args.distillation_type != 'none' else None
    criterion = build_criterion(args, mixup_fn, teacher_model)

    num_patches = model_without_ddp.patch_embed.num_patches
    token_select = model_without_ddp.token_select
    try:
        token_select.check_num_patches(num_patches)
    except ValueError as e:
        raise UserError(str(e)) from None

    def train_epoch(epoch):
        return train_one_epoch(model, criterion, data_loader_train, optimizer, device, epoch, loss_scaler,
                               args.clip_grad, model_ema, mixup_fn, set_training_mode=args.train_mode, args=args,
                               amp=amp, print_freq=args.print_freq)

    def evaluate_online(epoch):
        token_select.sparse_inference = bool(args.sparse_eval)
        return evaluate(data_loader_val, model, device, amp=amp)

    def add_stage_and_ema(epoch, log_stats):
        log_stats['expansion_stage'] = token_select.expansion_stage
        log_stats['train_kept_tokens'] = token_select.kept_tokens(num_patches)
        if model_ema is not None:
            # The original updates the EMA copy's stage but sets the flag on the online model: the EMA copy's flag
            # stays False, so the EMA is evaluated on all tokens.
            model_ema.ema.token_select.update_current_stage(epoch)
            ema_stats = evaluate(data_loader_val, model_ema.ema, device, amp=amp)
            print(f"Accuracy of the model_ema on the {len(dataset_val)} test images: {ema_stats['acc1']:.2f}%")
            log_stats.update({f'ema_test_{k}': v for k, v in ema_stats.items()})

    bests = (Best(), Best(key='ema_test_acc1', filename='ema_best_checkpoint.pth', label='Max accuracy of model_ema',
                          suffix='%\n'))
    trainer = Trainer(args, model_without_ddp, optimizer, lr_scheduler, loss_scaler, train_loader=data_loader_train,
                      train_epoch=train_epoch, evaluate=evaluate_online, model_ema=model_ema,
                      n_parameters=n_parameters, bests=bests, val_images=len(dataset_val),
                      before_epoch=lambda epoch: enter_epoch(token_select, epoch, num_patches),
                      after_evaluate=add_stage_and_ema)
    try:
        trainer.resume()
    except CheckpointError as e:
        raise UserError(f'--resume {args.resume}: {e}') from None

    if args.eval:
        token_select.sparse_inference = False  # stage 0 / flag off: full tokens, as the original's --eval
        test_stats = evaluate(data_loader_val, model, device, amp=amp)
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
        if model_ema is not None and args.resume:
            test_stats = evaluate(data_loader_val, model_ema.ema, device, amp=amp)
            print(f"Accuracy of the model_ema on the {len(dataset_val)} test images: {test_stats['acc1']:.2f}%")
        return test_stats
    return trainer.fit()


if __name__ == '__main__':
    run_cli(main, parse_args())
