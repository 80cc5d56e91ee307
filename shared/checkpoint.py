"""Checkpoints: safe loading, atomic saving, DeiT-style save / resume / auto-resume, strict weight loading with
readable errors, and conversions of the published formats into timm's key layout.

A checkpoint is loaded with `torch.load(weights_only=True)`: tensors, containers and plain values, plus the few
harmless classes DeiT-style checkpoints store (`argparse.Namespace`, numpy scalars and dtypes). Anything else is
refused before a single object is built, so a malicious `.pth` cannot run code.
"""
import argparse
import os
import pickle
import random
import shutil
import tempfile
import zipfile

import numpy as np
import torch

from shared.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be used (missing, truncated, unsafe, wrong format)."""


class UnsafeCheckpointError(CheckpointError):
    """The file refers to Python globals outside the allowed harmless types; it was not unpickled."""


class CheckpointMismatchError(CheckpointError):
    """The weights do not fit the model (missing, unexpected or differently shaped keys)."""


# ---------------------------------------------------------------------------------------------------------------
# Safe loading


def _harmless_globals():
    """Classes a DeiT-style checkpoint may hold besides tensors: the run's argparse.Namespace, numpy scalars (e.g. a
    best accuracy stored as np.float64), arrays and dtypes. numpy 1 files name numpy.core.*, numpy 2 numpy._core.*:
    both spellings are allowed."""
    try:
        multiarray = np._core.multiarray
    except AttributeError:  # numpy < 2
        multiarray = np.core.multiarray
    allowed = [argparse.Namespace, np.ndarray, np.dtype,
               (multiarray.scalar, 'numpy.core.multiarray.scalar'),
               (multiarray.scalar, 'numpy._core.multiarray.scalar'),
               (multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
               (multiarray._reconstruct, 'numpy._core.multiarray._reconstruct')]
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith('DType')]
    return allowed


def _unsafe_globals(path):
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) files cannot be scanned without unpickling
        return []


def safe_load(path, map_location='cpu'):
    """torch.load(path, weights_only=True) with the harmless types above allowed; a missing, truncated or unsafe
    file raises a CheckpointError naming the file (an unsafe one is never unpickled)."""
    path = os.fspath(path)
    if str(path).startswith(('http://', 'https://')):
        raise CheckpointError(f'{path}: checkpoints are never downloaded here; download it yourself and pass the '
                              'local file')
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        with torch.serialization.safe_globals(_harmless_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        names = _unsafe_globals(path)
        if 'Unsupported' in str(e) or 'global' in str(e).lower() or names:
            what = ', '.join(names) if names else 'Python objects other than tensors'
            raise UnsafeCheckpointError(
                f'{path}: refused to load: the file holds {what}, which loading would execute; it was not unpickled '
                '(only tensors, containers, argparse.Namespace and numpy values are read). Convert it where you trust '
                'its source, e.g. torch.save({"model": state_dict}, ...)') from None
        raise CheckpointError(f'{path}: not a readable torch checkpoint ({e})') from None
    except (KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError) as e:
        # what torch's legacy unpickler raises on a text or other non-checkpoint file (e.g. KeyError: 101)
        raise CheckpointError(f'{path}: not a torch checkpoint (a text or other file; reading it failed with '
                              f'{type(e).__name__}: {e})') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        size = os.path.getsize(path)
        raise CheckpointError(f'{path}: cannot read this checkpoint ({size} bytes; truncated or not a torch file): '
                              f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None


def _atomic_write(path, write):
    """write(f) into `.<name>.<random>.tmp` beside `path`, then os.replace: a crash while writing leaves the
    previous file intact (rename within one file system is atomic), and the next run's RunDir removes the leftover."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path):
    """torch.save, atomically (see _atomic_write)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text, path):
    _atomic_write(path, lambda f: f.write(text.encode()))


def atomic_copy(src, dst):
    """Copy a file so that `dst` is either its old self or a complete copy, never a truncated one."""
    def copy(f):
        with open(src, 'rb') as s:
            shutil.copyfileobj(s, f, 1 << 20)
    _atomic_write(dst, copy)


# ---------------------------------------------------------------------------------------------------------------
# RNG states (so that a resumed run draws the same augmentations, mixup and sampler orders as an uninterrupted one)


# Random streams of a method's own (ToCom's (r_tgt, r_src) pair draws, ...): registered once by the entry script,
# saved with each rank's global RNG states and restored with them.
_RANDOM_STREAMS = {}


def register_random_stream(name, rng):
    """Save and restore `rng` (a random.Random, numpy Generator or torch.Generator) with every checkpoint."""
    _RANDOM_STREAMS[name] = rng
    return rng


def _stream_state(rng):
    if isinstance(rng, random.Random):
        return rng.getstate()
    if isinstance(rng, torch.Generator):
        return rng.get_state()
    return rng.bit_generator.state  # numpy Generator: a dict of ints and strings


def _set_stream_state(rng, state):
    if isinstance(rng, random.Random):
        rng.setstate(_tuplify(state))
    elif isinstance(rng, torch.Generator):
        rng.set_state(state)
    else:
        rng.bit_generator.state = state


def rng_state():
    """This process's RNG states as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    if _RANDOM_STREAMS:
        state['streams'] = {name: _stream_state(rng) for name, rng in _RANDOM_STREAMS.items()}
    return state


def set_rng_state(state):
    random.setstate(_tuplify(state['python']))
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        cuda_states = state['cuda']
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    for stream, stream_state in state.get('streams', {}).items():
        if stream in _RANDOM_STREAMS:
            _set_stream_state(_RANDOM_STREAMS[stream], stream_state)


def _tuplify(x):
    # random.setstate needs tuples; a checkpoint round trip keeps them, but be lenient with lists.
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def all_rank_rng_states():
    """Every rank's RNG states, indexed by rank (a collective when distributed: call it on every rank)."""
    from shared.distributed import get_world_size, is_dist_avail_and_initialized
    mine = rng_state()
    if not is_dist_avail_and_initialized():
        return [mine]
    states = [None] * get_world_size()
    torch.distributed.all_gather_object(states, mine)
    return states


# ---------------------------------------------------------------------------------------------------------------
# DeiT-style save / resume


def ema_module(model_ema):
    """The averaged module of timm's ModelEma (`.ema`) or ModelEmaV2/V3 (`.module`)."""
    if model_ema is None:
        return None
    return getattr(model_ema, 'ema', None) or getattr(model_ema, 'module')


def save_checkpoint(path, *, model, optimizer=None, lr_scheduler=None, epoch=None, loss_scaler=None, model_ema=None,
                    args=None, all_ranks=True, **extra):
    """Write DeiT's checkpoint dict (model, optimizer, lr_scheduler, epoch, model_ema, scaler, args) plus every
    rank's RNG state (key `rng`, a list indexed by rank) and any `extra` entries. `model` is a module or the state
    dict to store (e.g. only the trainable weights).

    Call it on EVERY rank: the RNG states are gathered collectively (calling it on rank 0 alone would wait forever);
    only rank 0 writes, atomically. From code that runs on rank 0 only, pass all_ranks=False: then only rank 0's
    RNG state is stored, and a multi-process resume says it cannot restore the others."""
    from shared.distributed import is_main_process, unwrap_model
    states = all_rank_rng_states() if all_ranks else [rng_state()]
    if not is_main_process():
        return
    obj = {'model': model if isinstance(model, dict) else unwrap_model(model).state_dict()}
    if optimizer is not None:
        obj['optimizer'] = optimizer.state_dict()
    if lr_scheduler is not None:
        obj['lr_scheduler'] = lr_scheduler.state_dict()
    if epoch is not None:
        obj['epoch'] = epoch
    if model_ema is not None:
        obj['model_ema'] = unwrap_model(ema_module(model_ema)).state_dict()
    if loss_scaler is not None:
        obj['scaler'] = loss_scaler.state_dict()
    if args is not None:
        obj['args'] = args
    obj['rng'] = states
    obj.update(extra)
    atomic_save(obj, path)


def auto_resume(args, filename='checkpoint.pth'):
    """When no --resume was given, --auto-resume is on and <output_dir>/checkpoint.pth exists, resume from it (a run
    restarted with the same output dir continues from its last checkpoint). Returns args.resume."""
    output_dir = getattr(args, 'output_dir', '')
    if not getattr(args, 'resume', '') and getattr(args, 'auto_resume', False) and output_dir:
        candidate = os.path.join(output_dir, filename)
        if os.path.isfile(candidate):
            print(f'| auto-resume from {candidate}')
            args.resume = candidate
    return getattr(args, 'resume', '')


def restore_rank_rng(states, source):
    """Set this rank's RNG states from a checkpoint's per-rank list; with another number of processes they are left
    as they are, saying so."""
    from shared.distributed import get_rank, get_world_size
    if not states:
        return
    if len(states) != get_world_size():
        print(f'| {source} was written by {len(states)} processes, this run has {get_world_size()}: RNG states not '
              'restored (augmentations will differ from an uninterrupted run)')
        return
    set_rng_state(states[get_rank()])


def resume(args, model, optimizer=None, lr_scheduler=None, loss_scaler=None, model_ema=None):
    """DeiT's `--resume`: load the model strictly; unless --eval, also the optimizer, scheduler, epoch (training
    continues at epoch + 1), EMA and loss scaler, then this rank's RNG state. Returns args.start_epoch."""
    load_training_state(args, model, optimizer, lr_scheduler, loss_scaler, model_ema)
    return getattr(args, 'start_epoch', 0)


def load_training_state(args, model, optimizer=None, lr_scheduler=None, loss_scaler=None, model_ema=None,
                        trainable_only=False):
    """The body of `resume`; returns the loaded checkpoint dict (None without --resume) so that the caller can read
    its own fields. trainable_only: the checkpoint holds only the parameters that require grad (ToCom's
    compensator); they must all be there, the frozen rest comes from the model as built."""
    from shared.distributed import unwrap_model
    if not getattr(args, 'resume', ''):
        return None
    checkpoint = safe_load(args.resume)
    state_dict = checkpoint['model'] if isinstance(checkpoint, dict) and 'model' in checkpoint else checkpoint
    if not isinstance(state_dict, dict):
        raise CheckpointError(f'{args.resume}: not a checkpoint (it holds a {type(state_dict).__name__}, not a dict of '
                              'tensors)')
    bare = unwrap_model(model)
    if trainable_only:
        missing = sorted(n for n, p in bare.named_parameters() if p.requires_grad and n not in state_dict)
        if missing:
            raise CheckpointMismatchError(f'--resume {args.resume} lacks trainable weights of the model: '
                                          f'{_short(missing)}')
    load_weights(bare, state_dict, strict=not trainable_only, source=args.resume)
    if (not getattr(args, 'eval', False) and optimizer is not None and lr_scheduler is not None
            and all(k in checkpoint for k in ('optimizer', 'lr_scheduler', 'epoch'))):
        optimizer.load_state_dict(checkpoint['optimizer'])
        lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
        args.start_epoch = checkpoint['epoch'] + 1
        if model_ema is not None and checkpoint.get('model_ema') is not None:
            load_weights(unwrap_model(ema_module(model_ema)), checkpoint['model_ema'], strict=True,
                         source=f'{args.resume} (model_ema)')
        if loss_scaler is not None and 'scaler' in checkpoint:
            loss_scaler.load_state_dict(checkpoint['scaler'])
        # DeiT calls lr_scheduler.step(start_epoch) here, which sets the lr one epoch ahead of what an uninterrupted
        # run uses (its loop steps with the finished epoch's index). The optimizer state already holds the lr of the
        # saved moment, so nothing is stepped: the resumed run continues exactly.
        restore_rank_rng(checkpoint.get('rng'), args.resume)
        print(f"| resumed from {args.resume}: epoch {checkpoint['epoch']} done, starting epoch {args.start_epoch}")
    return checkpoint


def load_weights(model, state_dict, strict=True, source='state dict'):
    """model.load_state_dict with a readable error. strict=True: missing, unexpected and shape-mismatched keys all
    raise CheckpointMismatchError, naming them. strict=False: shape-mismatched keys still raise (torch would too);
    missing/unexpected ones are returned like torch does."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}'
                  for k in own if k in state_dict and hasattr(state_dict[k], 'shape')
                  and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if mismatched or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f'missing keys ({len(missing)}): {_short(missing)}')
        if unexpected:
            parts.append(f'unexpected keys ({len(unexpected)}): {_short(unexpected)}')
        if mismatched:
            parts.append(f'shape mismatch ({len(mismatched)}): {_short(mismatched)}')
        raise CheckpointMismatchError(f'{source} does not fit {type(model).__name__}: ' + '; '.join(parts) +
                                      ' (is it a checkpoint of another model or number of classes?)')
    return model.load_state_dict(state_dict, strict=strict)


def _short(items, limit=8):
    return ', '.join(items[:limit]) + (f', ... (+{len(items) - limit} more)' if len(items) > limit else '')


# ---------------------------------------------------------------------------------------------------------------
# Conversions into timm's ViT key layout


def _state_dict_of(obj):
    """The tensor dict inside a checkpoint: DeiT/MAE `{'model': ...}`, `{'state_dict': ...}`, or the dict itself."""
    if not isinstance(obj, dict):
        raise CheckpointError(f'expected a state dict or a checkpoint dict, got {type(obj).__name__}')
    for key in ('model', 'state_dict', 'module'):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"no tensors found (top-level keys: {sorted(obj)[:10]}); expected a state dict or "
                              "{'model': state_dict}")
    return tensors


# MAE pre-training checkpoints also carry the decoder and the mask token; the fine-tuned ones do not. Neither is
# part of a classifier.
_MAE_PRETRAIN_ONLY = ('decoder_', 'mask_token')


def to_timm_state_dict(obj, model=None, pos_embed_mode='bicubic', align_corners=False):
    """Convert DeiT `.pth` ({'model': ...}), plain timm state dicts, DDP `module.`-prefixed dicts and MAE fine-tuned
    checkpoints ({'model': ...} with `fc_norm.*` instead of `norm.*`, matching timm's ViT with global_pool='avg')
    into timm's ViT key layout. With `model`, the position embedding is resized to the model's grid when it
    differs."""
    state_dict = dict(_state_dict_of(obj))
    while state_dict and all(k.startswith('module.') for k in state_dict):
        state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
    state_dict = {k.replace('module.', '', 1) if k.startswith('module.') else k: v for k, v in state_dict.items()}
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_MAE_PRETRAIN_ONLY)}
    if model is not None:
        _fit_pos_embed(state_dict, model, pos_embed_mode, align_corners)
    return state_dict


def _fit_pos_embed(state_dict, model, mode, align_corners):
    pos = state_dict.get('pos_embed')
    target = getattr(model, 'pos_embed', None)
    if pos is None or target is None or tuple(pos.shape) == tuple(target.shape):
        return
    prefix = 0 if getattr(model, 'no_embed_class', False) else getattr(model, 'num_prefix_tokens', 1)
    grid = model.patch_embed.grid_size
    state_dict['pos_embed'] = resize_pos_embed(pos, grid, prefix, mode=mode, align_corners=align_corners)


def resize_pos_embed(posemb, new_grid, num_prefix_tokens=1, mode='bicubic', align_corners=False, antialias=False):
    """Resample a (1, prefix + g*g, D) position embedding to `new_grid` (int or (h, w)), keeping the prefix (class,
    distillation) rows. DeiT/timm use bicubic, align_corners=False; ViT-pytorch/TAVT's scipy zoom(order=1) equals
    bilinear with align_corners=True."""
    if isinstance(new_grid, int):
        new_grid = (new_grid, new_grid)
    new_grid = tuple(int(g) for g in new_grid)
    prefix, grid_tokens = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    old = int(round(grid_tokens.shape[1] ** 0.5))
    if old * old != grid_tokens.shape[1]:
        raise CheckpointError(f'position embedding with {grid_tokens.shape[1]} grid tokens (after '
                              f'{num_prefix_tokens} prefix tokens) is not a square grid')
    if (old, old) == new_grid:
        return posemb
    dim = grid_tokens.shape[-1]
    dtype = grid_tokens.dtype
    grid_tokens = grid_tokens.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    kwargs = {} if mode == 'nearest' else {'align_corners': align_corners}
    grid_tokens = torch.nn.functional.interpolate(grid_tokens, size=new_grid, mode=mode, antialias=antialias,
                                                  **kwargs)
    grid_tokens = grid_tokens.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(dtype)
    return torch.cat([prefix, grid_tokens], dim=1)


def load_npz(path):
    """A Google ViT `.npz` as a dict of numpy arrays (allow_pickle off: an .npz cannot smuggle objects)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:
        raise CheckpointError(f'{path}: not a readable .npz ({str(e).splitlines()[0] if str(e) else e!r})') from None


def npz_to_timm_state_dict(npz, model, pos_embed_mode='bilinear', align_corners=True, load_head=None):
    """Google ViT `.npz` (key layout in specs/tavt.md §3.4; also with an `opt/target/` prefix) -> timm ViT state
    dict for `model`. The position embedding is resized to the model grid with `pos_embed_mode` (default: TAVT's
    scipy-zoom equivalent). The head is taken when its shape fits the model (or as `load_head` says);
    `pre_logits` is ignored."""
    w = load_npz(npz) if isinstance(npz, (str, os.PathLike)) else dict(npz)
    prefix = next((p for p in ('', 'opt/target/', 'params/') if f'{p}embedding/kernel' in w), None)
    if prefix is None:
        raise CheckpointError("not a Google ViT .npz: no 'embedding/kernel' entry "
                              f"(has {sorted(w)[:6]}{' ...' if len(w) > 6 else ''})")

    def get(key, transpose=True):
        full = prefix + key
        if full not in w:
            raise CheckpointError(f"Google ViT .npz lacks '{full}' needed by {type(model).__name__}")
        a = w[full]
        if transpose:
            a = {4: lambda x: x.transpose(3, 2, 0, 1), 2: lambda x: x.T}.get(a.ndim, lambda x: x)(a)
        return torch.from_numpy(np.ascontiguousarray(a)).float()

    sd = {'patch_embed.proj.weight': get('embedding/kernel'), 'patch_embed.proj.bias': get('embedding/bias'),
          'cls_token': get('cls', False),
          'pos_embed': get('Transformer/posembed_input/pos_embedding', False),
          'norm.weight': get('Transformer/encoder_norm/scale'), 'norm.bias': get('Transformer/encoder_norm/bias')}
    for i in range(len(model.blocks)):
        blk = f'Transformer/encoderblock_{i}/'
        att = blk + 'MultiHeadDotProductAttention_1/'
        qkv_w = [get(f'{att}{n}/kernel', False).flatten(1).T for n in ('query', 'key', 'value')]  # (D,H,d)->(Hd,D)
        qkv_b = [get(f'{att}{n}/bias', False).flatten() for n in ('query', 'key', 'value')]
        sd.update({
            f'blocks.{i}.norm1.weight': get(blk + 'LayerNorm_0/scale'), f'blocks.{i}.norm1.bias': get(blk + 'LayerNorm_0/bias'),
            f'blocks.{i}.attn.qkv.weight': torch.cat(qkv_w), f'blocks.{i}.attn.qkv.bias': torch.cat(qkv_b),
            f'blocks.{i}.attn.proj.weight': get(att + 'out/kernel', False).flatten(0, 1).T,  # (H,d,D)->(D,Hd)
            f'blocks.{i}.attn.proj.bias': get(att + 'out/bias'),
            f'blocks.{i}.norm2.weight': get(blk + 'LayerNorm_2/scale'), f'blocks.{i}.norm2.bias': get(blk + 'LayerNorm_2/bias'),
            f'blocks.{i}.mlp.fc1.weight': get(blk + 'MlpBlock_3/Dense_0/kernel'),
            f'blocks.{i}.mlp.fc1.bias': get(blk + 'MlpBlock_3/Dense_0/bias'),
            f'blocks.{i}.mlp.fc2.weight': get(blk + 'MlpBlock_3/Dense_1/kernel'),
            f'blocks.{i}.mlp.fc2.bias': get(blk + 'MlpBlock_3/Dense_1/bias'),
        })
    head = getattr(model, 'head', None)
    if prefix + 'head/kernel' in w and isinstance(head, torch.nn.Linear):
        head_w = get('head/kernel')
        fits = tuple(head_w.shape) == tuple(head.weight.shape)
        if load_head or (load_head is None and fits):
            sd['head.weight'], sd['head.bias'] = head_w, get('head/bias')
    _fit_pos_embed(sd, model, pos_embed_mode, align_corners)
    return sd


def convert_checkpoint(src, model, pos_embed_mode=None, align_corners=None):
    """Any supported file (`.npz`, DeiT/timm/MAE `.pth`) -> timm state dict fitted to `model`."""
    src = os.fspath(src)
    if src.endswith('.npz'):
        return npz_to_timm_state_dict(src, model, pos_embed_mode or 'bilinear',
                                      True if align_corners is None else align_corners)
    return to_timm_state_dict(safe_load(src), model, pos_embed_mode or 'bicubic', bool(align_corners))


_HEAD_KEYS = ('head.weight', 'head.bias', 'head_dist.weight', 'head_dist.bias')


def load_finetune(model, path, what='--finetune', ignore_missing=(), head_keys=_HEAD_KEYS):
    """DeiT's `--finetune`: the checkpoint's weights (any file `convert_checkpoint` reads), a classifier of another
    class count dropped, the position embedding resampled to the model's grid, loaded non-strictly (see
    `load_finetune_state`)."""
    if not os.path.isfile(path):
        raise CheckpointError(f'{what}: checkpoint not found: {path}')
    return load_finetune_state(model, convert_checkpoint(path, model), f'{what} {path}', ignore_missing, head_keys)


def nonfinite_tensors(state_dict):
    """Names of the floating-point tensors of a state dict that hold NaN or Inf."""
    return [k for k, v in state_dict.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(v.isfinite().all())]


def load_finetune_state(model, state, source, ignore_missing=(), head_keys=_HEAD_KEYS):
    """Load a timm-layout state dict for fine-tuning. Classifier weights (`head_keys`) of another shape are dropped,
    as DeiT does. Unlike DeiT, a checkpoint that does not fit the model's body stops here with the keys named: one
    sharing no weight with the model, or lacking some of its non-classifier weights (but those whose name contains one
    of `ignore_missing`, e.g. modules a method adds to the backbone)."""
    state = dict(state)
    broken = nonfinite_tensors(state)
    if broken:
        raise CheckpointError(f'{source}: non-finite (NaN/Inf) values in {_short(broken, 5)}; these weights are '
                              'broken, refusing them')
    own = model.state_dict()
    _fit_pos_embed(state, model, 'bicubic', False)
    for k in head_keys:
        if k in state and k in own and state[k].shape != own[k].shape:
            print(f'Removing key {k} from pretrained checkpoint')
            del state[k]
    heads = tuple(k.rsplit('.', 1)[0] for k in head_keys)
    body = [k for k in own if not k.startswith(heads)]
    if not any(k in state for k in body):
        raise CheckpointError(f'{source}: none of the model weights are in it (keys like {list(state)[:3]}); '
                              f'is it a checkpoint of {type(model).__name__}?')
    result = load_weights(model, state, strict=False, source=source)
    missing = [k for k in result.missing_keys
               if not k.startswith(heads) and not any(part in k for part in ignore_missing)]
    if missing:
        raise CheckpointError(f'{source} lacks {len(missing)} weights of the model: {_short(missing)}')
    if result.unexpected_keys:
        print(f'{source}: keys not used by the model: {_short(result.unexpected_keys)}')
    return result
