"""tools/compare.py protocol for A-ViT (see shared/compare_api.py).

The baseline ViT becomes an A-ViT in place (avit.models_act.adaptive_from_timm; A-ViT adds no parameters), which
is fine-tuned with A-ViT's own loss (task + ponder + KL prior, avit.engine_act), once per gate centre of the sweep.
Variants are evaluated with the zipped path; their GFLOPs are data dependent: the forward returns one value per image
(from the depth counters), so the report gives their mean and spread.

Budget and gates (the shipped artefacts under shared/assets/compare/avit are made with these defaults; the
measurements are in avit/README.md, "tools/compare.py"):
- The paper fine-tunes a converged DeiT for 100 epochs, a third of its 300 pre-training epochs, at DeiT's own
  learning rate (5e-4 at batch 512), ponder weight 5e-4, KL prior weight 1e-3. Here the baseline was trained for 120
  epochs at 5e-4: DEFAULT_EPOCHS fine-tuning epochs at lr 5e-4 (unscaled, cosine, no warm-up: the weights start
  converged, and under DeiT's `scheduler.step(epoch)` a one-epoch warm-up would spend two epochs at 1e-6). The
  paper's ratio would be 40 epochs; 10 is what a 2-core machine affords, and the mean depth has settled by then.
- The gate h = sigmoid(gamma * x[..., 0] - beta) only learns when it is not saturated at the start. The paper's
  centres (30 for DeiT-T, 75 for DeiT-S, gamma 10) match DeiT's residual stream; on this width-64 baseline channel 0
  stays within +-1 in every block, so at beta = 10 or more h starts near 1e-4 or below, its gradient vanishes and no
  token ever halts. Centres 5 and 7 put h at about 2e-2 and 2e-3 on the baseline's median activation: tokens halt
  from the first epoch and the ponder loss can trade depth for accuracy.
- The ponder weight is 10x the paper's (5e-3): the digits' task loss sits near its label-smoothing floor, far below
  ImageNet's.
"""
import os

import torch

from shared.compare_api import MissingArtefact, Variant, artefact_dir, epochs_for, load_base_model
from shared.errors import UserError
from shared.provenance import file_sha256
from avit.engine_act import act_loss_fn, per_image_macs
from avit.models_act import adaptive_from_timm

METHODS = ('avit',)

DEFAULT_EPOCHS = 10
DEFAULT_CENTERS = (5., 7.)


def add_args(parser):
    g = parser.add_argument_group('A-ViT')
    g.add_argument('--avit-gate-centers', type=float, nargs='+', default=list(DEFAULT_CENTERS),
                   help='gate centres (beta) to fine-tune, one variant each (see avit/compare.py for the choice)')
    g.add_argument('--avit-gate-scale', type=float, default=10.)
    g.add_argument('--avit-ponder', type=float, default=0.005, help='ponder loss weight (paper: 0.0005)')
    g.add_argument('--avit-prior', type=float, default=0.001, help='KL prior weight (paper: 0.001)')
    g.add_argument('--avit-lr', type=float, default=5e-4, help='fine-tuning learning rate, not scaled by the batch')
    g.add_argument('--avit-checkpoint', default=None, metavar='PATH',
                   help='a fine-tuned A-ViT checkpoint of the baseline (e.g. the official small-10-75.pth): evaluated '
                        'as one variant, no fine-tuning; gates from its file name <name>-<scale>-<center>.pth, else '
                        'from --avit-gate-scale and a single --avit-gate-centers')


def _avit_from_base(ctx, gate_scale, gate_center):
    """The baseline itself turned into an A-ViT (its own layers, norms and weights; any supported timm ViT family,
    others refused with the reason by avit.models_act.adaptive_from_timm)."""
    return adaptive_from_timm(load_base_model(ctx), gate_scale, gate_center)


def artefact_name(ctx, args, center):
    """The artefact folder's name: every setting the fine-tuned weights depend on, the baseline's content included."""
    return (f'{ctx.model_name}-base{file_sha256(ctx.base_checkpoint)[:10]}-g{args.avit_gate_scale:g}-c{center:g}'
            f'-pond{args.avit_ponder:g}-kl{args.avit_prior:g}-lr{args.avit_lr:g}'
            f'-ep{epochs_for(ctx, DEFAULT_EPOCHS)}-s{ctx.seed}{"-quick" if ctx.quick else ""}')


def _train_args(ctx, args):
    from avit.main_act import get_args_parser
    a = get_args_parser(add_help=False).parse_args([])
    for k, v in vars(ctx.data_args).items():
        setattr(a, k, v)
    epochs = epochs_for(ctx, DEFAULT_EPOCHS)
    a.lr, a.epochs, a.warmup_epochs = args.avit_lr, epochs, 0
    a.mixup, a.cutmix, a.model_ema = 0., 0., False
    a.ponder_token_scale, a.distr_prior_alpha, a.unscale_lr = args.avit_ponder, args.avit_prior, True
    a.print_freq = 10 ** 6
    # the baseline was trained without RandAugment on these 32 px digits
    a.aa = None
    return a


def _fine_tune(ctx, args, model, path, label):
    """A-ViT's fine-tuning (DeiT's engine with avit.engine_act's loss); writes {'model': state_dict} to `path`."""
    from shared.checkpoint import atomic_save
    from shared.datasets import build_dataset, build_loaders
    from shared.engine import build_criterion, build_optimization, train_one_epoch
    targs = _train_args(ctx, args)
    # seeded per variant, so that an artefact does not depend on which others were already cached
    torch.manual_seed(ctx.seed)
    dataset_train, _ = build_dataset(True, targs)
    dataset_val, _ = build_dataset(False, targs)
    if ctx.quick:  # tests: a few batches
        dataset_train = torch.utils.data.Subset(dataset_train, range(min(len(dataset_train), 2 * targs.batch_size)))
    loader, _ = build_loaders(targs, dataset_train, dataset_val)
    model.to(ctx.device)
    optimizer, scaler, scheduler = build_optimization(targs, model, ctx.device)
    criterion = build_criterion(targs, None)
    loss_fn = act_loss_fn(targs, criterion, optimizer)
    for epoch in range(targs.epochs):
        print(f'| avit {label}: fine-tuning epoch {epoch + 1}/{targs.epochs}', flush=True)
        stats = train_one_epoch(model, criterion, loader, optimizer, ctx.device, epoch, scaler, print_freq=10 ** 6,
                                loss_fn=loss_fn, header=f'avit {label} epoch [{epoch + 1}/{targs.epochs}]')
        scheduler.step(epoch)  # DeiT's convention (shared.trainer)
        print(f'| avit {label}: epoch {epoch + 1}/{targs.epochs} loss {stats["loss"]:.4f} mean depth '
              f'{stats["cnt_token_mean"]:.2f} / {len(model.blocks)}', flush=True)
    atomic_save({'model': model.state_dict()}, path)


def forward(model, images):
    """Logits and the GFLOPs of each image (1-D, from its depth counters; shared.flops' convention)."""
    logits = model(images)
    return logits, {'gflops': per_image_macs(model, model.counter_token) / 1e9}


def _checkpoint_gates(args):
    from avit.main_act import gates_from_file_name
    gates = gates_from_file_name(args.avit_checkpoint)
    if gates is not None:
        return gates
    if len(args.avit_gate_centers) != 1:
        raise UserError(f'--avit-checkpoint {args.avit_checkpoint}: its file name does not name its gates '
                        '(<name>-<scale>-<center>.pth); give the ones it was fine-tuned with as --avit-gate-scale S '
                        '--avit-gate-centers C (one centre)')
    return args.avit_gate_scale, args.avit_gate_centers[0]


def _given_checkpoint_variant(ctx, args):
    from shared.checkpoint import load_weights, safe_load, to_timm_state_dict
    path = args.avit_checkpoint
    if not os.path.isfile(path):
        raise MissingArtefact('A-ViT fine-tuned checkpoint', path,
                              'python avit/main_act.py --model avit_small_patch16_224 --pretrained --gate_scale 10 '
                              '--gate_center 75 ... (the A-ViT README), or the official a-vit-weights/small-10-75.pth')
    scale, center = _checkpoint_gates(args)
    model = _avit_from_base(ctx, scale, center)
    load_weights(model, to_timm_state_dict(safe_load(path)), strict=True, source=f'--avit-checkpoint {path}')
    model.zip_tokens = True
    model.to(ctx.device).eval()
    return Variant(method='avit', label=f'given beta={center:g}',
                   settings={'gate_scale': scale, 'gate_center': center, 'checkpoint': path, 'zipped': True},
                   model=model, gflops=None, forward=forward, artefacts={'checkpoint': path})


def variants(method, ctx, args):
    from shared.checkpoint import safe_load
    if getattr(args, 'avit_checkpoint', None):
        return [_given_checkpoint_variant(ctx, args)]
    out = []
    epochs = epochs_for(ctx, DEFAULT_EPOCHS)
    for center in args.avit_gate_centers:
        label = f'beta={center:g}'
        folder = artefact_dir(ctx, 'avit', artefact_name(ctx, args, center))
        path = os.path.join(folder, 'checkpoint.pth')
        model = _avit_from_base(ctx, args.avit_gate_scale, center)
        if not os.path.isfile(os.path.join(folder, 'done')):
            os.makedirs(folder, exist_ok=True)
            _fine_tune(ctx, args, model, path, label)
            with open(os.path.join(folder, 'done'), 'w') as f:
                f.write(f'{epochs} fine-tuning epochs\n')
        model.load_state_dict(safe_load(path)['model'])
        model.zip_tokens = True
        model.to(ctx.device).eval()
        out.append(Variant(method='avit', label=label,
                           settings={'gate_scale': args.avit_gate_scale, 'gate_center': center,
                                     'ponder_token_scale': args.avit_ponder, 'distr_prior_alpha': args.avit_prior,
                                     'lr': args.avit_lr, 'epochs': epochs,
                                     'zipped': True},
                           model=model, gflops=None, forward=forward, artefacts={'checkpoint': path}))
    return out
