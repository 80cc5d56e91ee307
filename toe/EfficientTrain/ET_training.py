"""EfficientTrain's curriculum driving ToE (ToE/EfficientTrain/ET_training.py): five chunks of toe/EfficientTrain/main.py
sharing one --output_dir (each resumes from the previous chunk's last checkpoint), e.g.

    python toe/EfficientTrain/ET_training.py --data_path DATA --output_dir OUT --model deit_small_patch16_224 \
        --final_bs 256 --epochs 300 --num_gpus 8 --num_workers 8

Chunk i (0..4) ends at epoch int(epochs / 5 * (i + 1)), trains at input size [160, 160, 160, 192, 224][i] with
RandAugment magnitude 2i+1, per-process batch 2 x final_bs (final_bs in the last chunk) and gradient accumulation
int(4096 / num_gpus / batch) (a global batch of 4096). A chunk that fails is retried once with half the batch and
twice the accumulation. The ToE settings strings are the original's per-model ones; the expansion steps are absolute
epochs of the whole run.

Differences: chunks are launched with torchrun (the original's `python -m torch.distributed.launch` without
--use-env); `--master_port` is a flag (default 6666 as the original's first attempt; the retry lets torchrun pick);
only the DeiT models of the tables can be built by this port's main.py (the others are listed, and refused there).
"""
import argparse
import os
import shlex
import subprocess
import sys

from shared.errors import UserError, run_cli

HERE = os.path.dirname(os.path.abspath(__file__))

# drop-path rates of the original table (from the models' papers)
DEFAULT_DROP_PATH = {
    'resnet50': 0.0, 'convnext_tiny': 0.1, 'convnext_small': 0.4, 'convnext_base': 0.5,
    'deit_tiny_patch16_224': 0.1, 'deit_small_patch16_224': 0.1,
    'swin_tiny': 0.2, 'swin_small': 0.3, 'swin_base': 0.5,
    'CSWin_64_12211_tiny_224': 0.2, 'CSWin_64_24322_small_224': 0.4, 'CSWin_96_24322_base_224': 0.5,
}
_TOE = ('--use_amp true --clip_grad 5.0 --expansion-step 0 100 200 --keep-rate 0.6 0.8 1.0 '
        '--initialization-keep-rate 0.3 --expansion-multiple-stage 2')
# per-model extra flags of the original; only the DeiTs carry ToE settings
ADDITIONAL_CONFIGS = {
    'resnet50': '',
    'convnext_tiny': '--model_ema true --model_ema_eval true',
    'convnext_small': '--model_ema true --model_ema_eval true',
    'convnext_base': '--model_ema true --model_ema_eval true',
    'deit_tiny_patch16_224': _TOE,
    'deit_small_patch16_224': _TOE,
    'swin_tiny': '--use_amp true --clip_grad 5.0',
    'swin_small': '--use_amp true --clip_grad 5.0',
    'swin_base': '--use_amp true --clip_grad 5.0',
    'CSWin_64_12211_tiny_224': '--use_amp true --model_ema true --model_ema_eval true',
    'CSWin_64_24322_small_224': '--use_amp true --model_ema true --model_ema_eval true',
    'CSWin_96_24322_base_224': '--use_amp true --model_ema true --model_ema_eval true',
}
INPUT_SIZES = [160] * 3 + [192] + [224]


def get_args_parser():
    p = argparse.ArgumentParser(description='EfficientTrain (+ToE)')
    p.add_argument('--data_path', type=str)
    p.add_argument('--output_dir', default='output/EfficientTrain', type=str)
    p.add_argument('--model', type=str, choices=sorted(DEFAULT_DROP_PATH))
    p.add_argument('--final_bs', default=256, type=int)
    p.add_argument('--num_gpus', default=8, type=int)
    p.add_argument('--epochs', default=300, type=int)
    p.add_argument('--num_workers', default=10, type=int)
    p.add_argument('--master_port', default=6666, type=int, help='first attempt of each chunk (0: torchrun picks)')
    p.add_argument('--extra', default='', type=str,
                   help='more flags appended to every chunk command (e.g. "--device cpu"); not in the original')
    return p


def chunk_command(args, index, retry=False):
    batch = args.final_bs * 2 if index < 4 else args.final_bs
    if retry:
        batch = max(batch // 2, 1)
    update_freq = max(int(4096 / args.num_gpus / batch), 1)
    launcher = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={args.num_gpus}']
    launcher += ['--standalone'] if retry or not args.master_port else [f'--master_port={args.master_port}']
    cmd = launcher + [os.path.join(HERE, 'main.py'), '--model', args.model,
                      '--drop_path', str(DEFAULT_DROP_PATH[args.model]), '--batch_size', str(batch), '--lr', '4e-3',
                      '--update_freq', str(update_freq), '--data_path', str(args.data_path),
                      '--output_dir', args.output_dir, '--num_workers', str(args.num_workers),
                      '--epochs', str(args.epochs), '--warmup_epochs', '20',
                      '--end_epoch', str(int(args.epochs / 5 * (index + 1))),
                      '--input_size', str(INPUT_SIZES[index]), '--aa', f'rand-m{2 * index + 1}-mstd0.5-inc1']
    return cmd + shlex.split(ADDITIONAL_CONFIGS[args.model]) + shlex.split(args.extra)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if not args.model:
        raise UserError('--model is required')
    if args.data_path is None:
        raise UserError('--data_path is required')
    print('EfficientTrain_b_list:', INPUT_SIZES)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
        [os.path.dirname(os.path.dirname(HERE))] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else []))}
    for index in range(5):
        cmd = chunk_command(args, index)
        print(' '.join(map(shlex.quote, cmd)), flush=True)
        if subprocess.call(cmd, env=env):
            cmd = chunk_command(args, index, retry=True)
            print('chunk failed; retrying with half the batch:', ' '.join(map(shlex.quote, cmd)), flush=True)
            if subprocess.call(cmd, env=env):
                # the original goes on to the next chunk regardless; stopping here names the failure instead
                raise UserError(f'EfficientTrain chunk {index} failed twice')


if __name__ == '__main__':
    run_cli(main)
