"""tools/compare.py protocol for TAVT (see shared/compare_api.py).

The baseline timm ViT is converted to TAVT's ViT-pytorch model (same weights, module names of ViT-pytorch: qkv split
into query/key/value, `tavt.models.npz.timm_to_vit_pytorch`; with the full gene its logits are the timm model's).
Then TAVT's own code runs the README's second and third steps on the comparison data, into an artefact folder
(`shared.compare_api.artefact_dir`: the shipped one of the embedded default, else `<cache_dir>/tavt/<settings>`)
holding `distilled.bin` (the best weights) and `frontier.tsv`; TAVT's run folder is its `work/` subfolder:
  --do_distil   tavt/train.py's `run_training(distil=True)`: SGD, warm-up + cosine, sandwich-rule in-place
                distillation (full network on labels, the smallest and `--num_sandwich` random patch-drop
                sub-networks on its logits, LayerDrop `--tavt-layer-drop`), best checkpoint kept;
  --do_search   tavt/train.py's `search`: LAT's evolutionary search over per-layer token counts on the test split
                (as the original), its last Pareto frontier (population-iter<evo_iter>.tsv) copied to frontier.tsv.
TAVT's `--dataset` names only its fine-grained sets, so the comparison's data sets (the baseline's transforms, no
RandAugment) are handed to those functions directly; ViT-pytorch's config keeps its 0.1 dropout in training.
Variants: the full gene and `--tavt-genes` frontier genes nearest to MACs levels spread evenly from the cheapest
gene to the full model, each the distilled model with the gene installed (`set_length_config`), GFLOPs from
`gene_macs` (the project's convention; the figure `tools/flops.py --method tavt --model_type ViT-digits --img_size 32
--num_classes 10 --config <gene>` prints).

Budget and settings (the shipped artefact under shared/assets/compare/tavt is made with these defaults; the
measurements are in tavt/README.md, "tools/compare.py"):
- The README distils for as many steps as its baseline was fine-tuned (10,000 each). The sandwich rule costs about
  four forward-backward passes per image, so that ratio (120 passes here) is out of reach on a CPU; DEFAULT_PASSES
  passes over the training data (`--tavt-epochs`, else --epochs), validation after every pass from the second on
  (TAVT skips the first) and the best checkpoint kept. The learning-rate warm-up is the original's share of the
  steps (500 of 10,000).
- SGD lr 1e-3 (`--tavt-lr`): the original's 3e-2 is the lr its baseline was fine-tuned with by SGD; this baseline was
  trained with AdamW, and at 1e-2 the full model fell to 20 % after two passes.
- LayerDrop 0 (`--tavt-layer-drop`; TAVT's --layer_dropout_prob, original 0.2). The search never drops layers, so
  LayerDrop only regularises the distillation; a width-64 baseline is not robust to it (72.7 % mean top-1 with
  layers dropped at 0.2, 20-98 % over draws), and with it the full model ended at 89.4 % (best of 6 passes).
- The search's population and breeding sizes are small (`--tavt-population`, ...; original 20 / 30 / 30 iterations).
"""
import contextlib
import io
import logging
import os
import sys

import torch

from shared.provenance import file_sha256
from shared.compare_api import MissingArtefact, Variant, artefact_dir, data_args, epochs_for, load_base_model

METHODS = ('tavt',)

WARMUP_SHARE = 500 / 10000  # the README's --warmup_steps default over its --num_steps
DEFAULT_PASSES = 4


def add_args(parser):
    g = parser.add_argument_group('TAVT')
    g.add_argument('--tavt-genes', type=int, default=2, help='searched frontier genes to evaluate besides the full one')
    g.add_argument('--tavt-epochs', type=int, default=None,
                   help=f'distillation passes over the training data (default: --epochs, else {DEFAULT_PASSES})')
    g.add_argument('--tavt-lr', type=float, default=1e-3,
                   help='distillation SGD learning rate (original: 3e-2 at 4 x 16 images, the lr its baseline was '
                        'fine-tuned with; here 1e-2 diverges from the AdamW-trained baseline, see the docstring)')
    g.add_argument('--tavt-layer-drop', type=float, default=0.0,
                   help="LayerDrop probability of the distillation (TAVT's --layer_dropout_prob, original 0.2; see the "
                        'docstring for why 0 here)')
    g.add_argument('--tavt-batch-size', type=int, default=32, help='distillation batch size (original: 16)')
    g.add_argument('--tavt-population', type=int, default=6, help='seeded genes of the search (original: 20)')
    g.add_argument('--tavt-breed', type=int, default=3,
                   help='mutations and crossovers per search iteration, each (original: 30)')
    g.add_argument('--tavt-evo-iter', type=int, default=3, help='search iterations (original: 30)')
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
        from shared.backbones import UnsupportedBackbone
        raise UnsupportedBackbone(
            f'TAVT cannot be applied to {type(timm_model).__name__}: its distillation and search run on its own '
            f'ViT-pytorch model, which needs {"; ".join(problems)} (a searched gene can still be evaluated on this '
            'backbone with tavt.length_drop.apply_patch_drop)')
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
            '--num_workers', str(d.num_workers), '--layer_dropout_prob', str(args.tavt_layer_drop),
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


def distillation_passes(ctx, args):
    """--tavt-epochs when given, else shared.compare_api's budget (--epochs, 1 in tests, DEFAULT_PASSES)."""
    return args.tavt_epochs if args.tavt_epochs is not None else epochs_for(ctx, DEFAULT_PASSES)


def artefact_name(ctx, args, given=None):
    """The artefact folder's name: every setting the distilled weights and the frontier depend on."""
    search = 'quick' if ctx.quick else f'pop{args.tavt_population}_br{args.tavt_breed}_it{args.tavt_evo_iter}'
    if given:
        start = f'given{file_sha256(given)[:10]}'
    else:
        start = (f'{ctx.model_name}_base{file_sha256(ctx.base_checkpoint)[:10]}_p{distillation_passes(ctx, args)}'
                 f'_lr{args.tavt_lr:g}_ld{args.tavt_layer_drop:g}_b{args.tavt_batch_size}')
    return f'{start}_s{ctx.seed}_{search}'


class _StageLines(logging.Handler):
    """One console line per distillation pass and per search iteration, read from TAVT's log records (the full log
    goes to the run folder's run.log; stdout is redirected there meanwhile, hence the explicit `console`)."""

    def __init__(self, console, passes, evo_iter):
        super().__init__(logging.INFO)
        self.console, self.passes, self.evo_iter = console, passes, evo_iter
        self.done_passes, self.valid = 0, None

    def emit(self, record):
        message = record.getMessage()
        line = None
        if message.startswith('Valid Accuracy: '):
            self.valid = message.split(':', 1)[1].strip()
        elif message.startswith('single epoch train accuracy so far: '):
            self.done_passes += 1
            valid = f', valid accuracy {self.valid}' if self.valid is not None else ''
            line = (f'| tavt: distillation pass {self.done_passes}/{self.passes} done, train accuracy '
                    f'{message.rsplit(":", 1)[1].strip()}{valid}')
            self.valid = None
        elif message.startswith('| Start Iteration '):
            line = f'| tavt: search iteration {message.split()[-1].rstrip(":")}/{self.evo_iter}'
        if line is not None:
            print(line, file=self.console, flush=True)


def derive(ctx, args):
    """Distil then search with tavt/train.py's functions; returns (distilled checkpoint, frontier TSV). Both are in
    the artefact folder (artefact_dir: shipped or cached); TAVT's run folder (training state, logs, search stores)
    is its `work/` subfolder, which a shipped copy leaves out."""
    given = ctx.artefacts.get('tavt_checkpoint_path') or getattr(args, 'tavt_checkpoint_path', None)
    if given and not os.path.isfile(given):
        raise MissingArtefact('TAVT distilled checkpoint', given,
                              f'python tools/compare.py --methods tavt --cache-dir {ctx.cache_dir} (it writes '
                              f'{os.path.join(ctx.cache_dir, "tavt", "*", "distilled.bin")}), or '
                              'python tavt/train.py --do_distil --name NAME --pretrained_model ... on your data set')
    passes = distillation_passes(ctx, args)
    folder = os.path.abspath(artefact_dir(ctx, 'tavt', artefact_name(ctx, args, given)))
    ckpt = given or os.path.join(folder, 'distilled.bin')
    frontier = os.path.join(folder, 'frontier.tsv')
    if os.path.isfile(os.path.join(folder, 'done')):
        return ckpt, frontier
    from shared.checkpoint import atomic_copy, atomic_save, safe_load
    from tavt import train
    out = os.path.join(folder, 'work')
    os.makedirs(out, exist_ok=True)
    trainset, testset = _datasets(ctx)
    steps_per_pass = len(trainset) // args.tavt_batch_size
    num_steps = passes * steps_per_pass
    model = tavt_model(ctx)
    name = 'baseline_adaptive'
    targs = _train_args(ctx, args, model, name, out, num_steps, eval_every=steps_per_pass)
    log = io.StringIO()
    handler, stages = logging.StreamHandler(log), _StageLines(sys.stdout, passes, targs.evo_iter)
    tavt_logger = logging.getLogger('tavt')
    tavt_logger.addHandler(handler)
    tavt_logger.addHandler(stages)
    saved_level = tavt_logger.level
    tavt_logger.setLevel(logging.INFO)
    console = stages.console
    try:
        # tqdm and TensorBoard: bars off (stderr is not a tty here), runs under <out>/logs
        with contextlib.chdir(out), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            if not given:
                run_ckpt = os.path.join(out, f'{name}_checkpoint.bin')
                if os.path.isfile(run_ckpt):  # left by an interrupted run
                    os.remove(run_ckpt)
                train.set_seed(targs)
                model.to(ctx.device)
                print(f'| tavt: distillation, {passes} pass(es) of {steps_per_pass} steps', file=console, flush=True)
                best = train.run_training(targs, model, distil=True, datasets=(trainset, testset))
                if not os.path.isfile(run_ckpt):  # no evaluation after the first pass saved anything
                    atomic_save({'model': model.state_dict()}, run_ckpt)
                log.write(f'distillation: best accuracy {best}\n')
                # the best checkpoint's weights only (no optimizer or scaler state)
                state = safe_load(run_ckpt)
                atomic_save({'model': state['model'] if 'model' in state else state}, ckpt)
            model = tavt_model(ctx).to(ctx.device)
            train.load_checkpoint_model(ckpt, model)
            train.set_seed(targs)
            print(f'| tavt: search, population {targs.population_size}, {targs.evo_iter} iteration(s)',
                  file=console, flush=True)
            train.search(targs, model, datasets=(trainset, testset))
    finally:
        tavt_logger.removeHandler(handler)
        tavt_logger.removeHandler(stages)
        tavt_logger.setLevel(saved_level)
        with open(os.path.join(out, 'run.log'), 'w') as f:
            f.write(log.getvalue())
    atomic_copy(os.path.join(out, 'evo', name, f'population-iter{targs.evo_iter}.tsv'), frontier)
    with open(os.path.join(folder, 'done'), 'w') as f:
        f.write(f'{passes} distillation passes, search iterations {targs.evo_iter}\n')
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
