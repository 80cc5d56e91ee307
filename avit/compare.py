"""tools/compare.py protocol for A-ViT (see shared/compare_api.py).

The baseline ViT's weights go into an AdaptiveVisionTransformer of the same shape (A-ViT adds no parameters), which
is fine-tuned with A-ViT's own loss (task + ponder + KL prior, avit.engine_act) for `ctx.epochs`, once per gate
centre of the sweep. Variants are evaluated with the zipped path; their GFLOPs are data dependent (per batch, from
the depth counters)."""
import os

import torch

from shared.compare_api import epochs_for, MissingArtefact, Variant, data_args, load_base_model  # noqa: F401
from avit.engine_act import act_loss_fn, per_image_macs
from avit.models_act import AdaptiveVisionTransformer

METHODS = ('avit',)


def add_args(parser):
    g = parser.add_argument_group('A-ViT')
    g.add_argument('--avit-gate-centers', type=float, nargs='+', default=[10., 20.],
                   help='gate centres (beta) to fine-tune, one variant each')
    g.add_argument('--avit-gate-scale', type=float, default=10.)
    g.add_argument('--avit-ponder', type=float, default=0.005, help='ponder loss weight (README: 0.0005)')
    g.add_argument('--avit-prior', type=float, default=0.001, help='KL prior weight (README: 0.001)')
    g.add_argument('--avit-lr', type=float, default=5e-4)


def _avit_from_base(ctx, gate_scale, gate_center):
    base = load_base_model(ctx)
    cfg = dict(img_size=base.patch_embed.img_size, patch_size=base.patch_embed.patch_size, embed_dim=base.embed_dim,
               depth=len(base.blocks), num_heads=base.blocks[0].attn.num_heads,
               mlp_ratio=base.blocks[0].mlp.fc1.out_features / base.embed_dim,
               num_classes=base.head.out_features, norm_layer=type(base.norm))
    model = AdaptiveVisionTransformer(gate_scale=gate_scale, gate_center=gate_center, **cfg)
    model.load_state_dict(base.state_dict())
    return model


def _train_args(ctx, args):
    from avit.main_act import get_args_parser
    a = get_args_parser(add_help=False).parse_args([])
    for k, v in vars(ctx.data_args).items():
        setattr(a, k, v)
    a.lr, a.epochs, a.warmup_epochs, a.mixup, a.cutmix, a.model_ema = args.avit_lr, epochs_for(ctx, 2), 0, 0., 0., False
    a.ponder_token_scale, a.distr_prior_alpha, a.unscale_lr = args.avit_ponder, args.avit_prior, True
    a.print_freq = 10 ** 6
    # a few epochs on 32 px digits learn more without RandAugment
    a.aa = None
    return a


def _fine_tune(ctx, args, model, path):
    from shared.datasets import build_dataset, build_loaders
    from shared.engine import build_criterion, build_optimization, train_one_epoch
    targs = _train_args(ctx, args)
    dataset_train, _ = build_dataset(True, targs)
    dataset_val, _ = build_dataset(False, targs)
    loader, _ = build_loaders(targs, dataset_train, dataset_val)
    model.to(ctx.device)
    optimizer, scaler, scheduler = build_optimization(targs, model, ctx.device)
    criterion = build_criterion(targs, None)
    epochs = epochs_for(ctx, 2)
    for epoch in range(epochs):
        train_one_epoch(model, criterion, loader, optimizer, ctx.device, epoch, scaler, print_freq=10 ** 6,
                        loss_fn=act_loss_fn(targs, criterion, optimizer))
        scheduler.step(epoch)
    from shared.checkpoint import atomic_save
    atomic_save({'model': model.state_dict()}, path)


def _forward(model, images):
    logits = model(images)
    return logits, {'gflops': float(per_image_macs(model, model.counter_token).mean()) / 1e9}


def variants(method, ctx, args):
    from shared.checkpoint import safe_load
    torch.manual_seed(ctx.seed)
    out = []
    cache = os.path.join(ctx.cache_dir, 'avit')
    os.makedirs(cache, exist_ok=True)
    for center in args.avit_gate_centers:
        model = _avit_from_base(ctx, args.avit_gate_scale, center)
        path = os.path.join(cache, f'avit-{args.avit_gate_scale:g}-{center:g}-ep{epochs_for(ctx, 2)}'
                                   f'{"-quick" if ctx.quick else ""}.pth')
        if not os.path.isfile(path):
            _fine_tune(ctx, args, model, path)
        model.load_state_dict(safe_load(path)['model'])
        model.zip_tokens = True
        model.to(ctx.device).eval()
        out.append(Variant(method='avit', label=f'beta={center:g}',
                           settings={'gate_scale': args.avit_gate_scale, 'gate_center': center,
                                     'ponder_token_scale': args.avit_ponder, 'distr_prior_alpha': args.avit_prior,
                                     'epochs': epochs_for(ctx, 2), 'zipped': True},
                           model=model, gflops=None, forward=_forward, artefacts={'checkpoint': path}))
    return out
