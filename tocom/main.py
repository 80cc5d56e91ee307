"""ToCom (Token Compensator, ECCV 2024): pre-training, downstream fine-tuning and evaluation, DeiT's main with ToCom's
flags. Every command of the original README runs with `torchrun --nproc_per_node=N tocom/main.py ...` (or plain
`python tocom/main.py ...` single-process, CPU included):

    # pre-train the compensator on ImageNet (frozen DeiT-B, self-distillation over random (r_tgt, r_src) pairs)
    --model deit_base_patch16_224_tocom --finetune deit_base.pth --distillation-type soft --distillation-alpha 1.0
        --teacher-model deit_base_patch16_224 --teacher-path deit_base.pth --warmup-epochs 0 --lr 1e-3 --r_src -1
    # downstream off-the-shelf model with ToMe at r = k
    --model deit_base_patch16_224 --data-set CIFAR --finetune deit_base.pth --r_src k
    # evaluate it at r_tgt with the compensator r_src -> r_tgt
    --model deit_base_patch16_224_tocom --data-set CIFAR --finetune best_checkpoint.pth --eval --r_src k --r_tgt t
        --tocom_scale 0.1 --tocom_path tocom/checkpoint.pth

A run restarted with the same --output_dir continues from its checkpoint, (r_tgt, r_src) pair draws included
(--no-auto-resume to start over instead, which refuses an output dir that already holds one).
"""
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a plain checkout works too

import torch  # noqa: E402
import torch.backends.cudnn as cudnn  # noqa: E402

from shared.amp import amp_enabled  # noqa: E402
from shared.args import deit_parser  # noqa: E402
from shared.checkpoint import load_finetune, load_weights, register_random_stream, safe_load  # noqa: E402
from shared.datasets import build_dataset, build_loaders  # noqa: E402
from shared.distributed import init_distributed_mode, seed_per_rank, wrap_ddp  # noqa: E402
from shared.engine import build_criterion, build_mixup, build_model_ema, build_optimization, evaluate  # noqa: E402
from shared.errors import UserError, run_cli  # noqa: E402
from shared.trainer import Trainer  # noqa: E402
from tocom.engine import make_loss_fn, train_one_epoch  # noqa: E402
from tocom.models import (DEFAULT_STEPS, create_tocom_model, fold_compensator, is_tocom,  # noqa: E402
                          load_compensator, set_r)


def get_args_parser(add_help=True):
    parser = deit_parser('ToCom training and evaluation script', add_help=add_help)
    g = parser.add_argument_group('ToCom')
    g.add_argument('--tocom_scale', default=0.1, type=float,
                   help='scale s of the compensation (pre-training and evaluation); 0 disables ToCom')
    g.add_argument('--tocom_dim', default=2, type=int, help='compensator channels per r-step (width = steps * this)')
    g.add_argument('--tocom_path', default=None, type=str, help='compensator checkpoint (pre-training checkpoint.pth)')
    g.add_argument('--r_src', default=0, type=int,
                   help='-1: ToCom pre-training; k >= 0: ToMe fine-tuning at r = k / the r the evaluated model used')
    g.add_argument('--r_tgt', default=0, type=int, help='evaluation: the r used for merging')
    # beyond the original
    g.add_argument('--tocom_steps', default=DEFAULT_STEPS, type=int,
                   help='largest r the compensator covers (one step per unit of r; upstream: 16)')
    g.add_argument('--tocom_fold', action='store_true', default=True,
                   help='evaluation: fold the compensator into the qkv weights (zero extra FLOPs; default on)')
    g.add_argument('--no-tocom_fold', action='store_false', dest='tocom_fold')
    g.add_argument('--allow-random-weights', action='store_true',
                   help='let --r_src -1 pre-training run without --finetune, on randomly initialised weights (tests); '
                        'otherwise it stops and asks for --finetune')
    return parser


def check_args(args):
    """Fail early, naming the problem, on settings the original would crash on deep inside the model."""
    S = args.tocom_steps
    if args.tocom_dim < 1 or S < 1:
        raise UserError(f'--tocom_dim ({args.tocom_dim}) and --tocom_steps ({S}) must be positive')
    if not -1 <= args.r_src <= S:
        raise UserError(f'--r_src {args.r_src} is outside the supported range: -1 (pre-training) or 0..{S}')
    if args.eval and args.r_src == -1:
        raise UserError('--r_src -1 means pre-training; with --eval give the r the downstream model was trained with')
    if not 0 <= args.r_tgt <= S:
        raise UserError(f'--r_tgt {args.r_tgt} is outside the range the compensator covers (0..{S})')
    if args.r_src == -1 and not args.eval:
        if not args.model.endswith('_tocom'):
            raise UserError(f'--r_src -1 (ToCom pre-training) needs a compensator model such as '
                            f'deit_base_patch16_224_tocom, got --model {args.model}')
        if not args.finetune and not args.allow_random_weights:
            # a compensator learns the merging error of the weights it is trained on: random ones teach it nothing
            raise UserError('--r_src -1 (ToCom pre-training) trains the compensator of the frozen DeiT given by '
                            '--finetune <checkpoint>, and none was given (or pass --allow-random-weights to train '
                            'it for random weights anyway)')
        if args.distillation_type == 'none' or not args.teacher_path:
            raise UserError('--r_src -1 (ToCom pre-training) distils from the plain ToMe model: give '
                            '--distillation-type soft --teacher-model deit_base_patch16_224 --teacher-path <DeiT>')


def load_teacher(args, nb_classes, device):
    print(f'Creating teacher model: {args.teacher_model}')
    # built at --input-size like the student (upstream always built the teacher at 224, so other sizes failed to load)
    teacher = create_tocom_model(args.teacher_model, num_classes=nb_classes, img_size=args.input_size)
    checkpoint = safe_load(args.teacher_path)
    state = checkpoint['model'] if isinstance(checkpoint, dict) and 'model' in checkpoint else checkpoint
    load_weights(teacher, state, strict=False, source=f'--teacher-path {args.teacher_path}')
    teacher.to(device)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad = False
    return teacher


def trainable_state(model):
    """Upstream's checkpoint.pth payload: every trainable parameter by name (ToCom: the compensator only)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def evaluate_tocom(args, model, data_loader_val, device, amp):
    """Set the (r_tgt, r_src) schedule, fold the compensator when asked, evaluate."""
    if is_tocom(model):
        set_r(model, args.r_tgt, args.r_src)
        if args.tocom_fold:
            model = fold_compensator(model, args.r_tgt, args.r_src)
    else:
        if args.r_src != args.r_tgt:
            print(f'note: {args.model} has no compensator; evaluating plain ToMe at r = {args.r_tgt} '
                  f'(use {args.model}_tocom with --tocom_path for ToCom)')
        set_r(model, args.r_tgt)
    return evaluate(data_loader_val, model, device, amp=amp, print_freq=args.print_freq)


def main(args):
    init_distributed_mode(args)
    check_args(args)
    print(args)
    device = torch.device(args.device)

    # python's random drives timm's RandAugment; upstream (DeiT) left it unseeded
    seed = seed_per_rank(args.seed, python_random=True)
    # the (r_tgt, r_src) draws (upstream left python's random unseeded); saved and restored with each checkpoint
    pair_rng = register_random_stream('tocom_pairs', random.Random(seed))
    cudnn.benchmark = True

    dataset_train, args.nb_classes = build_dataset(is_train=True, args=args)
    dataset_val, _ = build_dataset(is_train=False, args=args)
    data_loader_train, data_loader_val = build_loaders(args, dataset_train, dataset_val)
    mixup_fn = build_mixup(args, args.nb_classes)

    print(f'Creating model: {args.model}')
    model = create_tocom_model(args.model, num_classes=args.nb_classes, drop_rate=args.drop,
                               drop_path_rate=args.drop_path, img_size=args.input_size,
                               tocom_scale=args.tocom_scale, tocom_dim=args.tocom_dim * args.tocom_steps,
                               tocom_steps=args.tocom_steps)

    if args.eval and args.tocom_path:
        load_compensator(model, args.tocom_path)
    elif args.eval and is_tocom(model) and args.tocom_scale != 0 and args.r_src != args.r_tgt:
        print('warning: --eval without --tocom_path: the compensator is untrained (zero), results equal plain ToMe')
    if args.finetune:
        load_finetune(model, args.finetune, ignore_missing=('adapter',))

    if args.attn_only:
        for name, p in model.named_parameters():
            p.requires_grad = '.attn.' in name
        for p in model.head.parameters():
            p.requires_grad = True
        model.pos_embed.requires_grad = True
        for p in model.patch_embed.parameters():
            p.requires_grad = False

    model.to(device)
    # upstream keeps (and updates) an EMA it never evaluates nor saves; kept for fidelity of the flag. Nothing reads
    # it, so it stays out of the checkpoint (a full DeiT copy per save) and a resumed run starts it afresh.
    model_ema = None if args.eval else build_model_ema(model, args)

    model, model_without_ddp = wrap_ddp(model, args, find_unused_parameters=True, model_ema=model_ema)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    print('number of params:', n_parameters)
    amp = amp_enabled(args, device)

    if args.eval:
        if args.resume:
            model_without_ddp.load_state_dict(safe_load(args.resume)['model'], strict=False)
        test_stats = evaluate_tocom(args, model_without_ddp, data_loader_val, device, amp)
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
        return test_stats

    optimizer, loss_scaler, lr_scheduler = build_optimization(args, model_without_ddp, device)
    teacher = load_teacher(args, args.nb_classes, device) if args.distillation_type != 'none' else None
    criterion = build_criterion(args, mixup_fn, teacher)

    loss_fn = make_loss_fn(args, criterion, pair_rng, args.tocom_steps)

    def train_epoch(epoch):
        return train_one_epoch(
            model, criterion, data_loader_train, optimizer, device, epoch, loss_scaler, args.clip_grad, model_ema,
            mixup_fn, set_training_mode=args.train_mode, amp=amp, loss_fn=loss_fn, print_freq=args.print_freq,
            accum_iter=args.accum_iter)

    def evaluate_epoch(epoch):
        set_r(model_without_ddp, args.r_src)  # training may have left a pre-training pair or another r set
        return evaluate(data_loader_val, model, device, amp=amp, print_freq=args.print_freq)

    pretraining = args.r_src == -1
    # checkpoint.pth's 'model' holds only the trainable weights under upstream's names (an official loader reads
    # just that: the compensator in pre-training); best_checkpoint.pth holds the whole model, as upstream's does.
    trainer = Trainer(args, model_without_ddp, optimizer, lr_scheduler, loss_scaler, train_loader=data_loader_train,
                      train_epoch=train_epoch, evaluate=None if pretraining else evaluate_epoch,
                      n_parameters=n_parameters, val_images=len(dataset_val),
                      model_state=lambda: trainable_state(model_without_ddp),
                      best_payload=lambda: {'model': model_without_ddp.state_dict()}, trainable_only=True)
    trainer.resume()
    log_stats = trainer.fit()
    return {k[len('test_'):]: v for k, v in log_stats.items() if k.startswith('test_')}


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    if args.output_dir:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    run_cli(main, args)
