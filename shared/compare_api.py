"""The protocol between tools/compare.py and the methods.

Each method package provides a module `<pkg>/compare.py` with:

    METHODS = ('avit',)                 # the method names it provides (tocom.compare provides 'tome' and 'tocom')
    def add_args(parser): ...           # optional: its sweep flags (e.g. --r 4 8 16, --target-flops 2.9 3.1);
                                        # flags must not clash with other methods' (prefix them when in doubt)
    def variants(method, ctx, args) -> list[Variant]

`variants` derives the method's models from the shared baseline with the method's OWN code path (its engine, its
search, its fine-tuning, with small budgets from `ctx.epochs`), caching what it trains under `ctx.cache_dir/<method>`
so a second run reuses it, and returns one `Variant` per setting of the sweep. tools/compare.py then evaluates every
variant on the same data (accuracy, GFLOPs, throughput, latency, memory, params) and writes the report.

When the user points a method at artefacts that do not exist (`ctx.artefacts`), raise `MissingArtefact` naming the
file and the command that makes it. A method that does not support the backbone refuses it itself (a UserError).

The method's `kind` in shared/methods.py says how compare reports it:

- 'inference': every Variant is a point (accuracy, GFLOPs, throughput ...). A data-dependent variant's `forward` may
  return `(logits, {'gflops': x})`, x a float (the batch's mean) or, better, a 1-D tensor of each image's GFLOPs:
  compare reports the mean and the spread over the evaluated images (p5/p95, min/max).
- 'training' (ToE): the benefit is training cost, so the Variant is not an inference point; compare evaluates its
  model's top-1 and reports `extra['training']` in a table of its own:
      {'epochs', 'wall_s_total', 'wall_s_per_epoch', 'wall_s_per_epoch_min', 'wall_s_per_epoch_max', 'acc1',
       'baseline_wall_s_total', 'baseline_wall_s_per_epoch', 'baseline_wall_s_per_epoch_min',
       'baseline_wall_s_per_epoch_max', 'baseline_acc1', 'speedup',
       'measured': {'source': 'this run' or what the record is (e.g. 'shipped record'), 'device_name', 'threads',
                    'git_commit', 'date'},
       'commands': [the exact commands that trained both runs]}
  (wall seconds, top-1 in percent; None when nothing was measured, e.g. a checkpoint given by the user).
"""
import argparse
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from shared.errors import UserError


@dataclass
class Context:
    base_checkpoint: str             # timm-style state dict of the baseline ViT (the shared starting point)
    model_name: str                  # its timm model name (e.g. 'vit_digits_patch4_32' for the embedded default)
    model_kwargs: dict               # kwargs to rebuild it (num_classes, img_size, ...)
    data_args: argparse.Namespace    # for shared.datasets.build_dataset/build_loaders (data_set, data_path, input_size,
                                     # batch_size, num_workers, ...)
    cache_dir: str                   # method artefacts go under cache_dir/<method>
    device: torch.device
    seed: int = 0
    epochs: Optional[int] = None     # --epochs: overrides every method's own training budget (epochs_for)
    artefacts: dict = field(default_factory=dict)   # user-given paths: {'tocom_path': ..., 'schedule': ...}
    quick: bool = False              # tests: smallest possible budgets
    shipped_root: Optional[str] = None   # shared/assets/compare when this is the embedded default, else None
    retrain: bool = False            # --retrain: ignore the shipped artefacts, derive (and cache) them again


@dataclass
class Variant:
    method: str
    label: str                       # e.g. 'r=8', 'target=0.03'
    settings: dict                   # the exact settings (reported verbatim)
    model: torch.nn.Module           # ready for eval (weights loaded, patched)
    gflops: Optional[float] = None   # static GFLOPs per image; None when data-dependent
    forward: Optional[Callable] = None   # (model, images) -> logits, or (logits, {'gflops': float or (B,) tensor})
    artefacts: dict = field(default_factory=dict)   # name -> path of files this variant used (hashed in the report)
    extra: dict = field(default_factory=dict)       # anything else worth reporting ('training': see above)


class MissingArtefact(UserError, FileNotFoundError):
    def __init__(self, what, path, command):
        self.what, self.path, self.command = what, path, command
        super().__init__(f'{what} not found at {path}; make it with: {command}')


def epochs_for(ctx, default):
    """The training budget of a method's artefact: 1 in tests, --epochs when given, else the method's own default
    (the budget its shipped artefact was made with)."""
    if ctx.quick:
        return 1
    return ctx.epochs if ctx.epochs is not None else default


def artefact_dir(ctx, method, name):
    """Where a method's artefact `name` (a folder name that encodes every setting it depends on) lives: the shipped
    copy under `ctx.shipped_root/<method>/<name>` when one exists and --retrain was not given (read it, never write
    into it), else `ctx.cache_dir/<method>/<name>`, where the method derives and caches it. A finished artefact folder
    holds a file `done`."""
    if ctx.shipped_root and not ctx.retrain and not ctx.quick:
        shipped = os.path.join(ctx.shipped_root, method, name)
        if os.path.isfile(os.path.join(shipped, 'done')):
            return shipped
    return os.path.join(ctx.cache_dir, method, name)


def load_base_model(ctx, **overrides):
    """The baseline timm model with ctx.base_checkpoint's weights."""
    from shared.checkpoint import load_weights, safe_load, to_timm_state_dict
    from shared.models import create_model
    model = create_model(ctx.model_name, **{**ctx.model_kwargs, **overrides})
    load_weights(model, to_timm_state_dict(safe_load(ctx.base_checkpoint)))
    return model


def make_data_args(data_set='DIGITS', data_path='', input_size=32, batch_size=128, num_workers=0, seed=0):
    """The data settings every method of a comparison evaluates and derives its models with (DeiT's augmentation
    flags at their defaults, no random erasing, single process)."""
    return argparse.Namespace(
        data_set=data_set, data_path=data_path, input_size=input_size, batch_size=batch_size, num_workers=num_workers,
        pin_mem=False, eval_crop_ratio=0.875 if input_size >= 224 else 1.0, color_jitter=0.3,
        aa='rand-m9-mstd0.5-inc1', train_interpolation='bicubic', reprob=0.0, remode='pixel', recount=1,
        repeated_aug=False, distributed=False, dist_eval=False, inat_category='name', seed=seed, fake_size=256,
        fake_classes=10, ThreeAugment=False, src=False)


def data_args(ctx, **overrides):
    return argparse.Namespace(**{**vars(ctx.data_args), **overrides})


