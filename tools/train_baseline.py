#!/usr/bin/env python
"""Train and evaluate a plain timm ViT the way DeiT's main.py does, on the shared modules.

With no arguments it trains the embedded default, a small ViT (`vit_digits_patch4_32`) on scikit-learn's digits
upscaled to 32 px, for two epochs on the CPU, printing DeiT's logs and writing output/baseline/{checkpoint.pth,
log.txt} (and TensorBoard events). Every DeiT flag parses and does what it does in DeiT; the defaults differ only
where the embedded default needs it (model, data set, input size, epochs, batch size, lr, no mixup/RandAugment).

    python tools/train_baseline.py
    torchrun --nproc_per_node=2 tools/train_baseline.py --output_dir output/baseline2
    python tools/train_baseline.py --model deit_small_patch16_224 --data-set IMNET --data-path /data/imagenet \
        --input-size 224 --epochs 300 --batch-size 256 --lr 5e-4 --aa rand-m9-mstd0.5-inc1 --mixup .8 --cutmix 1 \
        --reprob .25 --drop-path .1 --model-ema --output_dir output/deit_s
A run restarted with the same --output_dir continues from its checkpoint (--no-auto-resume to start over).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run from a plain checkout too

from shared.args import deit_parser  # noqa: E402
from shared.checkpoint import load_finetune  # noqa: E402
from shared.datasets import build_dataset, build_loaders  # noqa: E402
from shared.engine import (TensorboardLogger, build_criterion, build_mixup, build_optimization,  # noqa: E402
                           evaluate, prepare_model, start_run, train_one_epoch)
from shared.errors import run_cli  # noqa: E402
from shared.models import create_model  # noqa: E402
from shared.trainer import Trainer  # noqa: E402

# The embedded default: what DeiT's defaults become so that `python tools/train_baseline.py` runs end to end in
# about a minute on two idle CPU cores (~45 CPU-seconds per epoch: 45 MMACs per image forward). Two epochs only
# show the loss starting to fall: the 12-block digits ViT needs tens of epochs to learn the digits (tools/compare.py
# asks for 30). lr 8e-3 x 64 / 512 = 1e-3 after DeiT's linear scaling; no warm-up, which DeiT's per-epoch
# scheduler would spend the first two epochs on.
DEMO_DEFAULTS = dict(model='vit_digits_patch4_32', data_set='DIGITS', input_size=32, epochs=2, batch_size=64,
                     lr=8e-3, warmup_epochs=0, min_lr=1e-5, cooldown_epochs=0, drop_path=0.0, model_ema=False,
                     aa='', reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1, repeated_aug=False, num_workers=0,
                     output_dir='output/baseline', print_freq=10)


def get_args_parser():
    return deit_parser('DeiT-style baseline training and evaluation', **DEMO_DEFAULTS)


def main(args):
    device, amp, _ = start_run(args)

    dataset_train, nb_classes = build_dataset(is_train=True, args=args)
    dataset_val, _ = build_dataset(is_train=False, args=args)
    data_loader_train, data_loader_val = build_loaders(args, dataset_train, dataset_val)
    mixup_fn = build_mixup(args, nb_classes)

    print(f'Creating model: {args.model}')
    model = create_model(args.model, num_classes=nb_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                         img_size=args.input_size)
    if args.finetune:
        load_finetune(model, args.finetune)
    model, model_without_ddp, model_ema, n_parameters = prepare_model(model, args, device)

    optimizer, loss_scaler, lr_scheduler = build_optimization(args, model_without_ddp, device)
    criterion = build_criterion(args, mixup_fn)
    tb_logger = TensorboardLogger(args.output_dir) if not args.eval else None

    def train_epoch(epoch):
        return train_one_epoch(model, criterion, data_loader_train, optimizer, device, epoch, loss_scaler,
                               args.clip_grad, model_ema, mixup_fn, set_training_mode=args.train_mode, amp=amp,
                               bce_loss=args.bce_loss, print_freq=args.print_freq, tb_logger=tb_logger,
                               accum_iter=args.accum_iter)

    def evaluate_epoch(epoch):
        stats = evaluate(data_loader_val, model, device, amp=amp, print_freq=args.print_freq)
        if tb_logger is not None:
            tb_logger.log(stats, epoch, prefix='test')
        return stats

    trainer = Trainer(args, model_without_ddp, optimizer, lr_scheduler, loss_scaler, train_loader=data_loader_train,
                      train_epoch=train_epoch, evaluate=evaluate_epoch, model_ema=model_ema,
                      n_parameters=n_parameters, tb_logger=tb_logger, val_images=len(dataset_val))
    trainer.resume()
    if args.eval or args.start_epoch >= args.epochs:
        if args.start_epoch >= args.epochs and not args.eval:
            print(f'Training already finished ({args.epochs} epochs in {args.resume}); evaluating it')
        test_stats = evaluate(data_loader_val, model, device, amp=amp, print_freq=args.print_freq)
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
        return test_stats
    log_stats = trainer.fit()
    return {k[len('test_'):]: v for k, v in log_stats.items() if k.startswith('test_')}


if __name__ == '__main__':
    run_cli(main, get_args_parser().parse_args())
