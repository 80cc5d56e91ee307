"""tools/compare.py protocol for TAVT (see shared/compare_api.py).

The baseline timm ViT is converted to TAVT's ViT-pytorch model (same weights, module names of ViT-pytorch: qkv split
into query/key/value, `tavt.models.npz.timm_to_vit_pytorch`; with the full gene its logits are the timm model's).
Then TAVT's own code runs the README's second and third steps on the comparison data, cached under
`<cache_dir>/tavt`:
  --do_distil   tavt/train.py's `run_training(distil=True)`: SGD, warm-up + cosine, sandwich-rule in-place
                distillation (full network on labels, the smallest and `--num_sandwich` random patch-drop
                sub-networks on its logits, LayerDrop 0.2), best checkpoint kept;
  --do_search   tavt/train.py's `search`: LAT's evolutionary search over per-layer token counts on the test split
                (as the original), Pareto frontier written as population-iter<evo_iter>.tsv.
TAVT's `--dataset` names only its fine-grained sets, so the comparison's data sets (the baseline's transforms, no
RandAugment) are handed to those functions directly; ViT-pytorch's config keeps its 0.1 dropout in training.
Variants: the full gene and `--tavt-genes` frontier genes nearest to MACs levels spread evenly from the cheapest
gene to the full model, each the distilled model with the gene installed (`set_length_config`), GFLOPs from
`gene_macs` (the project's convention; the figure `tools/flops.py --method tavt --model_type ViT-digits --img_size 32
--num_classes 10 --config <gene>` prints).

Budget (the sandwich rule costs ~2.5 forward-backward passes per image, so `ctx.epochs` is not used):
`--tavt-epochs` passes over the training data (default 1), validation every pass; TAVT neither validates nor saves
during the first pass, so after a single pass the hook saves the final weights itself. The learning-rate warm-up is
the original's share of the steps (500 of 10,000); the learning rate is 1e-2 (see --tavt-lr). The search's
population, breeding sizes and iterations are small (`--tavt-population`, ...).
"""
import contextlib
import hashlib
import io
import logging
import os

import torch

from shared.compare_api import MissingArtefact, Variant, data_args, load_base_model

METHODS = ('tavt',)

WARMUP_SHARE = 500 / 10000  # the README's --warmup_steps default over its --num_steps


def add_args(parser):
    g = parser.add_argument_group('TAVT')
    g.add_argument('--tavt-genes', type=int, default=2, help='searched frontier genes to evaluate besides the full one')
    g.add_argument('--tavt-epochs', type=int, default=1, help='distillation passes over the training data')
    g.add_argument('--tavt-lr', type=float, default=1e-2,
                   help='distillation SGD learning rate (original: 3e-2 at 4 x 16 images; on a 10-epoch digits '
                        'baseline 1e-2 kept the full model best of 3e-2 / 1e-2 / 3e-3)')
    g.add_argument('--tavt-batch-size', type=int, default=32, help='distillation batch size (original: 16)')
    g.add_argument('--tavt-population', type=int, default=4, help='seeded genes of the search (original: 20)')
    g.add_argument('--tavt-breed', type=int, default=2,
                   help='mutations and crossovers per search iteration, each (original: 30)')
    g.add_argument('--tavt-evo-iter', type=int, default=2, help='search iterations (original: 30)')
    g.add_argument('--tavt-checkpoint-path', default=None,
                   help='a distilled tavt/train.py checkpoint of the baseline (skips the distillation)')


# ---------------------------------------------------------------------------------------------------------------
# the baseline in TAVT's model

def config_of(timm_model):
    """A ViT-pytorch config with the timm model's dimensions; stops on what ViT-pytorch's model cannot express."""
    from tavt.models.configs import vit_config
    problems = []
    if getattr(timm_model, 'cls_token', None) is None or getattr(timm_model, 'num_prefix_tokens', 1) != 1:
        problems.append('a single class token')
    if getattr(timm_model, 'global_pool', 'token') != 'token':
        problems.append("the class-token classifier (global_pool='token')")
    if getattr(timm_model, 'no_embed_class', False):
        problems.append('a position embedding covering the class token')
    blk = timm_model.blocks[0]
    if blk.attn.qkv.bias is None or not isinstance(blk.ls1, torch.nn.Identity) or \
            not isinstance(getattr(blk.attn, 'q_norm', torch.nn.Identity()), torch.nn.Identity):
        problems.append('qkv biases, no layer scale, no q/k norm')
    if problems:
        raise ValueError(f'TAVT (ViT-pytorch) needs a plain ViT: {"; ".join(problems)}')
    patch = timm_model.patch_embed.patch_size
    return vit_config(patch[0], timm_model.embed_dim, blk.mlp.fc1.out_features, blk.attn.num_heads,
                      len(timm_model.blocks))


def tavt_model(ctx, state_dict=None):
    """TAVT's VisionTransformer holding the baseline's weights (or `state_dict`, a TAVT checkpoint's)."""
    from shared.checkpoint import load_weights
    from tavt.models.modeling import VisionTransformer
    from tavt.models.npz import timm_to_vit_pytorch
    base = load_base_model(ctx)
    model = VisionTransformer(config_of(base), base.patch_embed.img_size[0], base.num_classes, zero_head=False)
    if state_dict is None:
        state_dict = timm_to_vit_pytorch(base.state_dict(), len(base.blocks))
    load_weights(model, state_dict, strict=True)
    return model


# ---------------------------------------------------------------------------------------------------------------
# TAVT's distillation and search on the comparison data

def _datasets(ctx):
    from shared.datasets import build_dataset
    # the baseline's recipe; no RandAugment (its posterize at the top magnitude asks PIL >= 10 for 0 bits)
    d = data_args(ctx, aa='')
    trainset, testset = build_dataset(True, d)[0], build_dataset(False, d)[0]
    if ctx.quick:  # tests: a few batches instead of passes over the data
        trainset = torch.utils.data.Subset(trainset, range(min(len(trainset), 128)))
        testset = torch.utils.data.Subset(testset, range(min(len(testset), 64)))
    return trainset, testset


def _train_args(ctx, args, model, name, out, num_steps, eval_every):
    from tavt.train import get_args_parser
    d = ctx.data_args
    quick = ctx.quick
    argv = ['--name', name, '--output_dir', out, '--evo_path', os.path.join(out, 'evo'),
            '--img_size', str(d.input_size), '--train_batch_size', str(args.tavt_batch_size),
            '--eval_batch_size', str(d.batch_size), '--learning_rate', str(args.tavt_lr),
            '--num_steps', str(num_steps), '--eval_every', str(eval_every),
            '--warmup_steps', str(max(1, round(WARMUP_SHARE * num_steps))), '--seed', str(ctx.seed),
            '--num_workers', str(d.num_workers),
            '--population_size', str(2 if quick else args.tavt_population),
            '--mutation_size', str(2 if quick else args.tavt_breed),
            '--crossover_size', str(2 if quick else args.tavt_breed),
            '--evo_iter', str(1 if quick else args.tavt_evo_iter), '--evo_max_tries', '200',
            # what setup() checks against the model
            '--max_seq_length', str(model.num_tokens), '--num_model_layer', str(model.num_layers)]
    targs = get_args_parser().parse_args(argv)
    targs.device = str(ctx.device)
    targs.distributed, targs.local_rank = False, -1
    return targs


def derive(ctx, args):
    """Distil then search with tavt/train.py's functions; returns (checkpoint, frontier TSV), cached."""
    given = ctx.artefacts.get('tavt_checkpoint_path') or getattr(args, 'tavt_checkpoint_path', None)
    if given and not os.path.isfile(given):
        raise MissingArtefact('TAVT distilled checkpoint', given,
                              f'python tools/compare.py --methods tavt --cache-dir {ctx.cache_dir} (it writes '
                              f'{os.path.join(ctx.cache_dir, "tavt", "*", "baseline_adaptive_checkpoint.bin")}), or '
                              'python tavt/train.py --do_distil --name NAME --pretrained_model ... on your data set')
    passes = max(1, args.tavt_epochs)
    search_tag = '_quick' if ctx.quick else f'_pop{args.tavt_population}_br{args.tavt_breed}_it{args.tavt_evo_iter}'
    if given:
        digest = hashlib.sha1(os.path.abspath(given).encode()).hexdigest()[:10]
        tag = f'given_{digest}_s{ctx.seed}{search_tag}'
    else:
        tag = f'{ctx.model_name}_p{passes}_lr{args.tavt_lr:g}_b{args.tavt_batch_size}_s{ctx.seed}{search_tag}'
    out = os.path.abspath(os.path.join(ctx.cache_dir, 'tavt', tag))
    name = 'baseline_adaptive'
    ckpt = given or os.path.join(out, f'{name}_checkpoint.bin')
    if os.path.isfile(os.path.join(out, 'done')):
        with open(os.path.join(out, 'done')) as f:
            frontier = f.read().strip()
        return ckpt, frontier
    from shared.checkpoint import atomic_save
    from tavt import train
    os.makedirs(out, exist_ok=True)
    trainset, testset = _datasets(ctx)
    steps_per_pass = len(trainset) // args.tavt_batch_size
    num_steps = passes * steps_per_pass
    model = tavt_model(ctx)
    targs = _train_args(ctx, args, model, name, out, num_steps, eval_every=steps_per_pass)
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    tavt_logger = logging.getLogger('tavt')
    tavt_logger.addHandler(handler)
    saved_level = tavt_logger.level
    tavt_logger.setLevel(logging.INFO)
    try:
        # tqdm and TensorBoard: bars off (stderr is not a tty here), runs under <out>/logs
        with contextlib.chdir(out), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            if not given:
                if os.path.isfile(ckpt):  # left by an interrupted run
                    os.remove(ckpt)
                train.set_seed(targs)
                model.to(ctx.device)
                best = train.run_training(targs, model, distil=True, datasets=(trainset, testset))
                if not os.path.isfile(ckpt):  # no evaluation after the first pass saved anything
                    atomic_save({'model': model.state_dict()}, ckpt)
                log.write(f'distillation: best accuracy {best}\n')
            model = tavt_model(ctx).to(ctx.device)
            train.load_checkpoint_model(ckpt, model)
            train.set_seed(targs)
            train.search(targs, model, datasets=(trainset, testset))
    finally:
        tavt_logger.removeHandler(handler)
        tavt_logger.setLevel(saved_level)
        with open(os.path.join(out, 'run.log'), 'w') as f:
            f.write(log.getvalue())
    frontier = os.path.join(out, 'evo', name, f'population-iter{targs.evo_iter}.tsv')
    with open(os.path.join(out, 'done'), 'w') as f:
        f.write(frontier)
    return ckpt, frontier


def pick_genes(frontier_rows, count, num_tokens):
    """`count` distinct (gene, MACs, score) rows of the frontier nearest to MACs levels spread evenly from its cheapest
    gene up to (not including) the full model's MACs; the full gene itself is left out (it is always evaluated)."""
    searched = sorted((r for r in frontier_rows if any(length != num_tokens for length in r[0])), key=lambda r: r[1])
    if count <= 0 or len(searched) <= count:
        return searched[:max(count, 0)]
    full_macs = max(r[1] for r in frontier_rows)
    low = searched[0][1]
    picked = []
    for i in range(count):
        level = low + i * (full_macs - low) / count
        best = min((r for r in searched if r not in picked), key=lambda r: abs(r[1] - level))
        picked.append(best)
    return sorted(picked, key=lambda r: r[1])


def variants(method, ctx, args):
    from shared.checkpoint import safe_load
    from tavt.evolution import read_population
    from tavt.models.modeling import gene_macs
    ckpt, frontier = derive(ctx, args)
    rows = read_population(frontier)
    state = safe_load(ckpt)
    state = state['model'] if 'model' in state else state
    made = []
    num_tokens = tavt_model(ctx, state).num_tokens
    for gene, macs, score in [(None, None, None)] + pick_genes(rows, args.tavt_genes, num_tokens):
        model = tavt_model(ctx, state)
        model.set_length_config(gene)
        # deployment: the drop-and-restore copy changes no logit (only the class token reaches the head)
        model.transformer.encoder.restore_dropped = False
        model.eval()
        gflops = gene_macs(model, gene) / 1e9
        # short label for the table and plots; the gene itself is in the settings
        label = 'full' if gene is None else f'gene@{gflops / (gene_macs(model, None) / 1e9):.0%}'
        settings = {'gene': list(gene) if gene is not None else 'full', 'search_accuracy': score,
                    'search_macs_batch8': macs, 'distilled': True}
        made.append(Variant(method='tavt', label=label, settings=settings, model=model,
                            gflops=gflops,
                            artefacts={'baseline': ctx.base_checkpoint, 'tavt_checkpoint': ckpt,
                                       'frontier': frontier}))
    return made
