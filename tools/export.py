#!/usr/bin/env python
"""Export a token-reduced model at fixed settings to ONNX (opset >= 17), for onnxruntime and other runtimes.

    python tools/export.py --method tome --model deit_small_patch16_224 --checkpoint deit_s.pth --r 13 tome.onnx
    python tools/export.py --method tocom --model deit_base_patch16_224_tocom --checkpoint deit_b.pth \\
        --tocom-checkpoint tocom.pth --r 16 --r-src 8 tocom.onnx           # compensator folded into qkv
    python tools/export.py --method diffrate --model vit_deit_small_patch16_224 --target-flops 2.9 diffrate.onnx
    python tools/export.py --method tavt --model ViT-B_16 --img-size 448 --gene lower tavt.onnx

The reduction is fixed at export time: r (ToMe, ToCom), the kept-token schedule (DiffRate), the gene (TAVT) decide
the graph's token counts, so the graph has static shapes except the batch axis. A-ViT cannot be exported: how many
tokens each block runs on depends on the image (data-dependent halting), which an ONNX graph of fixed operators does
not express without running every block on every token.

The exporter is torch's TorchScript-based one (`dynamo=False`): it needs only onnx, while torch's newer
torch.export-based exporter also needs onnxscript. ONNX has no mean reduction for ScatterElements
(pytorch#101535), so `scatter_reduce(..., reduce='mean')` (DiffRate's merge) is exported as a scatter-add of the
values divided by a scatter-add of the counts, both including the destination itself; the PyTorch model keeps its op.
"""
import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout too

import torch  # noqa: E402

from shared.errors import UserError, run_cli  # noqa: E402

METHODS = ('tome', 'tocom', 'diffrate', 'tavt', 'avit')
NOT_EXPORTABLE = {
    'avit': "A-ViT halts tokens depending on the image (data-dependent halting): each block's token count is "
            'decided at run time, which a fixed ONNX graph cannot express; export the DeiT it starts from, or use '
            'torch.compile for A-ViT',
}
MIN_OPSET = 17


# --------------------------------------------------------------------------------------- exportable scatter mean
def _scatter_reduce_symbolic(g, self, dim, index, src, reduce, include_self):
    """ONNX for aten::scatter_reduce with the mean reduction spelled as sum / count (ScatterElements 'add')."""
    from torch.onnx import symbolic_helper
    dim = symbolic_helper._get_const(dim, 'i', 'dim')
    reduce = symbolic_helper._get_const(reduce, 's', 'reduce')
    include_self = symbolic_helper._get_const(include_self, 'b', 'include_self')
    if not include_self:
        raise UserError('scatter_reduce without the destination itself (include_self=False) has no ONNX form')
    onnx_reduction = {'sum': 'add', 'prod': 'mul', 'amax': 'max', 'amin': 'min', 'mean': 'add'}
    if reduce not in onnx_reduction:
        raise UserError(f"scatter_reduce(reduce='{reduce}') has no ONNX form")
    total = g.op('ScatterElements', self, index, src, axis_i=dim, reduction_s=onnx_reduction[reduce])
    if reduce != 'mean':
        return total
    # every destination counts itself once, plus once per source scattered into it
    ones_self = g.op('Expand', g.op('Constant', value_t=torch.ones(1)), g.op('Shape', self))
    ones_src = g.op('Expand', g.op('Constant', value_t=torch.ones(1)), g.op('Shape', src))
    ones_self = g.op('CastLike', ones_self, self)
    ones_src = g.op('CastLike', ones_src, src)
    count = g.op('ScatterElements', ones_self, index, ones_src, axis_i=dim, reduction_s='add')
    return g.op('Div', total, count)


def register_scatter_mean(opset):
    torch.onnx.register_custom_op_symbolic('aten::scatter_reduce', _scatter_reduce_symbolic, opset)


def export_onnx(model, example, path, opset=MIN_OPSET, dynamic_batch=True):
    """Export `model` (eval mode, logits out) traced on `example` to `path`; input 'images', output 'logits'."""
    if opset < MIN_OPSET:
        raise UserError(f'--opset {opset}: the merges need ScatterElements with a reduction; use {MIN_OPSET} or later')
    register_scatter_mean(opset)
    axes = {'images': {0: 'batch'}, 'logits': {0: 'batch'}} if dynamic_batch else None
    model.eval()
    # the tracer warns where token counts become Python ints; fixing them is the point of exporting at fixed settings
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        warnings.simplefilter('ignore', DeprecationWarning)  # the TorchScript exporter is chosen on purpose, above
        torch.onnx.export(model, (example,), path, dynamo=False, opset_version=opset, input_names=['images'],
                          output_names=['logits'], dynamic_axes=axes)
    return path


# --------------------------------------------------------------------------------------------------- the models
class LogitsOnly(torch.nn.Module):
    """DiffRate's patched forward returns (logits, FLOPs); the exported graph returns the logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x, return_flop=False)


def _state_dict(path, flag='--checkpoint'):
    from shared.args import load_checkpoint
    checkpoint = load_checkpoint(path, flag)
    return checkpoint.get('model', checkpoint) if isinstance(checkpoint, dict) else checkpoint


def _load_weights(model, path):
    try:
        model.load_state_dict(_state_dict(path), strict=True)
    except RuntimeError as e:
        raise UserError(f'--checkpoint {path} does not fit the model: {str(e).splitlines()[0]}') from None


def _model_kwargs(args):
    kwargs = {'num_classes': args.num_classes}
    if args.input_size:
        kwargs['img_size'] = args.input_size
    return kwargs


def build_tome(args):
    from tocom.models import create_tocom_model, fold_compensator, is_tocom, load_compensator, set_r
    try:
        model = create_tocom_model(args.model, **_model_kwargs(args))
    except ValueError as e:
        raise UserError(f'--model {args.model}: {e}') from None
    if not hasattr(model, '_tome_info'):
        raise UserError(f'--model {args.model} is not a timm VisionTransformer, which ToMe patches')
    if args.checkpoint:
        state = _state_dict(args.checkpoint)
        # a backbone checkpoint for a ToCom model has no compensator weights: those come from --tocom-checkpoint
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not ('.q_tocom.' in k or '.v_tocom.' in k)]
        if missing or unexpected:
            raise UserError(f'--checkpoint {args.checkpoint} does not fit --model {args.model}: '
                            f'missing {missing[:3]}, unexpected {unexpected[:3]}')
    if args.method == 'tocom':
        if not is_tocom(model):
            raise UserError(f'--method tocom needs a model with a compensator (a *_tocom name), got {args.model}')
        if args.tocom_checkpoint:
            load_compensator(model, args.tocom_checkpoint)
        r_src = args.r if args.r_src is None else args.r_src
        try:
            return fold_compensator(model.eval(), args.r, r_src)
        except ValueError as e:
            raise UserError(f'--r/--r-src: {e}') from None
    if is_tocom(model):
        raise UserError(f'--model {args.model} has a compensator: export it with --method tocom')
    return set_r(model, args.r)


def build_diffrate(args):
    from diffrate import schedules
    from diffrate.models import apply_diffrate, create_model
    try:
        model = apply_diffrate(create_model(args.model, **_model_kwargs(args)), args.model, 1)
    except ValueError as e:
        raise UserError(f'--model {args.model}: {e}') from None
    if args.checkpoint:
        state = _state_dict(args.checkpoint)
        state = {k: v for k, v in state.items() if 'ddp' not in k}  # a search checkpoint's proxies: not needed here
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if 'ddp' not in k]
        if missing or unexpected:
            raise UserError(f'--checkpoint {args.checkpoint} does not fit --model {args.model}: '
                            f'missing {missing[:3]}, unexpected {unexpected[:3]}')
    if args.prune_kept is not None or args.merge_kept is not None:
        if args.prune_kept is None or args.merge_kept is None:
            raise UserError('--prune-kept and --merge-kept go together (one kept-token count per block each)')
        prune, merge = args.prune_kept, args.merge_kept
    elif args.target_flops is not None:
        try:
            prune, merge = schedules.lookup(args.model, args.target_flops)
        except KeyError as e:
            raise UserError(f'--target-flops {args.target_flops}: {e}') from None
    else:
        raise UserError('--method diffrate needs a schedule: --target-flops F (compression_rate.json) or '
                        '--prune-kept and --merge-kept')
    tokens = model.patch_embed.num_patches + 1
    for name, counts in (('--prune-kept', prune), ('--merge-kept', merge)):
        if any(not 1 <= int(c) <= tokens for c in counts):
            raise UserError(f'{name} {counts}: each count must be within 1..{tokens} (class token included)')
    try:
        model.set_kept_num(list(prune), list(merge))
    except ValueError as e:
        raise UserError(f'--prune-kept/--merge-kept: {e}') from None
    return LogitsOnly(model)


def build_tavt(args):
    from tavt.measure import parse_gene
    from tavt.models.modeling import GeneError, build_model
    try:
        model = build_model(args.model, args.input_size or 224, args.num_classes, zero_head=False)
    except ValueError as e:
        raise UserError(f'--model {args.model}: {e}') from None
    if args.checkpoint:
        _load_weights(model, args.checkpoint)
    try:
        model.set_length_config(parse_gene(args.gene, model.num_tokens, model.num_layers))
    except (GeneError, ValueError) as e:
        raise UserError(f'--gene {args.gene}: {e}') from None
    return model


BUILDERS = {'tome': build_tome, 'tocom': build_tome, 'diffrate': build_diffrate, 'tavt': build_tavt}


def input_size_of(model):
    inner = model.model if isinstance(model, LogitsOnly) else model
    if hasattr(inner, 'patch_embed'):
        return tuple(inner.patch_embed.img_size)
    size = inner.img_size
    return (size, size) if isinstance(size, int) else tuple(size)


# --------------------------------------------------------------------------------------------------------- CLI
def _counts(text):
    return [int(v) for v in text.replace(',', ' ').split()]


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument('--method', required=True, choices=METHODS)
    parser.add_argument('--model', required=True,
                        help='tome/tocom: a DeiT/timm ViT name (tocom: *_tocom); diffrate: a DiffRate model name; '
                             'tavt: a ViT-pytorch model type (ViT-B_16, ...)')
    parser.add_argument('--checkpoint', default='', help='weights (a state dict or {"model": state dict})')
    parser.add_argument('--input-size', '--img-size', dest='input_size', default=None, type=int)
    parser.add_argument('--num-classes', default=1000, type=int)
    parser.add_argument('--r', default=0, type=int, help='tome/tocom: tokens merged per layer (ToCom: r_tgt)')
    parser.add_argument('--r-src', default=None, type=int, help='tocom: the r the compensator was trained from')
    parser.add_argument('--tocom-checkpoint', default='', help='tocom: the compensator weights')
    parser.add_argument('--target-flops', default=None, type=float, help='diffrate: schedule of compression_rate.json')
    parser.add_argument('--prune-kept', default=None, type=_counts, help='diffrate: kept tokens after pruning, per block')
    parser.add_argument('--merge-kept', default=None, type=_counts, help='diffrate: kept tokens after merging, per block')
    parser.add_argument('--gene', default='full', help="tavt: 'full', 'lower' or comma-separated counts per layer")
    parser.add_argument('--batch-size', default=1, type=int, help='batch of the example input the graph is traced on')
    parser.add_argument('--static-batch', action='store_true', help='fix the batch axis (default: dynamic)')
    parser.add_argument('--opset', default=MIN_OPSET, type=int)
    parser.add_argument('output', help='the .onnx file to write')
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.method in NOT_EXPORTABLE:
        raise UserError(f'--method {args.method} cannot be exported to ONNX: {NOT_EXPORTABLE[args.method]}')
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
    except ImportError:
        raise UserError("ONNX export needs the onnx package: pip install '.[export]'") from None
    if args.batch_size < 1:
        raise UserError(f'--batch-size {args.batch_size}: must be at least 1')
    model = BUILDERS[args.method](args).eval()
    example = torch.randn(args.batch_size, 3, *input_size_of(model))
    export_onnx(model, example, args.output, args.opset, dynamic_batch=not args.static_batch)
    print(f'wrote {args.output} ({args.method}, {args.model}, opset {args.opset}, input {tuple(example.shape)})')
    return args.output


if __name__ == '__main__':
    run_cli(main)
