# coding=utf-8
"""TAVT's entry script (ViT-pytorch's train.py with LAT's method), one script for the three runs of the README:

  baseline fine-tune   (neither --do_distil nor --do_search; the original defines train() but never calls it)
  --do_distil          patch-drop training with sandwich-rule in-place distillation
  --do_search          evolutionary search of per-layer token counts, Pareto frontier written as TSV files

torchrun (or `python -m torch.distributed.launch`, `--local_rank`/`--local-rank`), single process and CPU all work.

Training writes, besides the original's best-model file <output_dir>/<name>_checkpoint.bin, the training state
<output_dir>/<name>_state.bin after every validation (and at the end) and one JSON line per validation to
<output_dir>/<name>_log.txt. A run restarted with the same --output_dir and --name continues from that state by itself
(--no_auto_resume to refuse instead), bit-identical to an uninterrupted run; a NaN/Inf loss or weight stops the run
before anything is saved.
"""
import argparse
import logging
import math
import os
import random
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from shared.args import CheckedArgumentParser
from shared.checkpoint import atomic_save, rng_state, safe_load, save_checkpoint, set_rng_state
from shared.distributed import (barrier, get_rank, get_world_size, init_distributed_mode, is_dist_avail_and_initialized,
                                is_main_process, unwrap_model)
from shared.errors import UserError, run_cli
from shared.rundir import RunDir
from shared.trainer import check_finite_loss, check_finite_weights
from tavt.data_utils import DATASETS, get_loader, num_classes_of
from tavt.evolution import DUMMY_BATCH, Evolution, seed_ratios
from tavt.length_drop import sample_layer_configuration, sample_length_configuration
from tavt.models.modeling import build_model, count_parameters, gene_macs
from tavt.scheduler import build_scheduler

logger = logging.getLogger(__name__)

MODEL_TYPES = ["ViT-B_16", "ViT-B_32", "ViT-L_16", "ViT-L_32", "ViT-H_14", "tiny-test", "ViT-digits"]


def get_args_parser():
    # checked (shared.args.validate_common): --num_steps, --eval_every, --gradient_accumulation_steps, --img_size at
    # least 1, --length_drop_ratio_bound in [0, 1]; no abbreviated flags
    p = CheckedArgumentParser('TAVT', add_help=True)
    p.add_argument("--name", required=True, help="Name of this run: checkpoint <output_dir>/<name>_checkpoint.bin, "
                                                 "TensorBoard logs/<name>, search folder <evo_path>/<name>.")
    p.add_argument("--dataset", choices=list(DATASETS), default="CUB_200_2011", help="Which dataset.")
    p.add_argument('--data_root', type=str, default='./dataset', help="Parent folder; the data is <data_root>/<dataset>.")
    p.add_argument("--model_type", choices=MODEL_TYPES, default="ViT-B_16",
                   help="Which variant to use ('tiny-test' is a 12-layer toy for tests, 'ViT-digits' the embedded "
                        "default's baseline of tools/compare.py; neither is in the original).")
    p.add_argument("--pretrained_dir", type=str, default="./pretrained/ViT-B_16.npz",
                   help="Google .npz weights, always loaded first.")
    p.add_argument("--pretrained_model", type=str, default=None,
                   help="A checkpoint of this script ({'model': state_dict}), loaded strictly over the npz weights.")
    p.add_argument("--output_dir", default="./output", type=str, help="Where checkpoints are written.")
    p.add_argument("--img_size", default=448, type=int, help="Resolution size")
    p.add_argument("--train_batch_size", default=16, type=int,
                   help="Training batch per process (divided by --gradient_accumulation_steps).")
    p.add_argument("--eval_batch_size", default=8, type=int, help="Evaluation batch per process.")
    p.add_argument("--eval_every", default=100, type=int, help="Validate every so many optimizer steps.")
    p.add_argument("--learning_rate", default=3e-2, type=float, help="The initial learning rate for SGD.")
    p.add_argument("--weight_decay", default=0, type=float, help="SGD weight decay.")
    p.add_argument("--num_steps", default=10000, type=int, help="Total number of optimizer steps.")
    p.add_argument("--decay_type", choices=["cosine", "linear"], default="cosine", help="How to decay the learning rate.")
    p.add_argument("--warmup_steps", default=500, type=int, help="Linear learning-rate warm-up steps.")
    p.add_argument("--max_grad_norm", default=1.0, type=float, help="Max gradient norm.")
    p.add_argument("--local_rank", "--local-rank", dest='local_rank', type=int, default=-1,
                   help="Set by torch.distributed.launch; torchrun's LOCAL_RANK is read from the environment.")
    p.add_argument('--seed', type=int, default=42, help="random seed for initialization")
    p.add_argument('--gradient_accumulation_steps', type=int, default=1,
                   help="Micro-batches per optimizer step.")
    p.add_argument('--fp16', action='store_true', help="Mixed precision (torch.amp float16 autocast + GradScaler on "
                                                       "CUDA; ignored on the CPU).")
    p.add_argument('--fp16_opt_level', type=str, default='O2',
                   help="apex opt level, used only with --apex (torch.amp has no levels).")
    p.add_argument('--loss_scale', type=float, default=0, help="Parsed but unused, as in the original (the initial "
                                                                "dynamic scale is 2**20).")
    p.add_argument('--smoothing_value', type=float, default=0.0, help="Unused (a TransFG leftover), as in the original.")
    p.add_argument('--split', type=str, default='non-overlap', choices=['non-overlap', 'overlap'],
                   help="Patch split (TransFG): 'overlap' uses a conv stride of --slide_step.")
    p.add_argument('--slide_step', type=int, default=12, help="Slide step for the overlap split.")
    p.add_argument('--num_sandwich', type=int, default=2, help="Random-length sub-networks per step (besides the full "
                                                               "and the smallest).")
    p.add_argument('--length_drop_ratio_bound', type=float, default=0.2,
                   help="Largest fraction of tokens dropped per layer; also defines the search's lower-bound gene.")
    p.add_argument('--layer_dropout_prob', type=float, default=0.2, help="LayerDrop probability per layer, in every "
                                                                         "distillation pass (0 turns it off).")
    p.add_argument('--layer_dropout_bound', type=int, default=0,
                   help="LAT's deterministic LayerDrop depth (no effect while --layer_dropout_prob is set).")
    p.add_argument('--max_seq_length', type=int, default=785, help="Tokens incl. the class token = (img/patch)^2 + 1.")
    p.add_argument('--num_model_layer', type=int, default=12, help="Encoder depth (must equal the model's).")
    p.add_argument("--do_search", action="store_true", help="Run the evolutionary search.")
    p.add_argument("--do_distil", action="store_true", help="Run patch-drop training with in-place distillation.")
    p.add_argument("--evo_path", type=str, default="./evo", help="Search output root.")
    p.add_argument('--population_size', type=int, default=20, help="Constant-ratio genes seeded at the start.")
    p.add_argument('--mutation_prob', type=float, default=0.5, help="Per-layer mutation probability.")
    p.add_argument('--mutation_size', type=int, default=30, help="Successful mutations per iteration.")
    p.add_argument('--crossover_size', type=int, default=30, help="Successful crossovers per iteration.")
    p.add_argument('--evo_iter', type=int, default=30, help="Search iterations.")
    # Not in the original:
    p.add_argument('--evo_max_tries', type=int, default=1000,
                   help="Attempts per mutation/crossover loop before giving up with a warning (the original retried "
                        "forever).")
    p.add_argument('--num_workers', type=int, default=4, help="Data-loader workers per process.")
    p.add_argument('--apex', action='store_true', help="With --fp16, use NVIDIA apex AMP (needs apex installed).")
    p.add_argument('--no_auto_resume', '--no-auto-resume', action='store_false', dest='auto_resume',
                   help="Do not continue from <output_dir>/<name>_state.bin; an existing one is then refused instead "
                        "of overwritten.")
    return p


class SetupError(UserError, ValueError):
    """Flags that do not fit the model or the data (a ValueError too, as before)."""


class MissingInputError(UserError, FileNotFoundError):
    """--data_root or --pretrained_dir names nothing (a FileNotFoundError too, as before)."""


def check_input_paths(args):
    """Every missing input in one message, before a process group, a model or an output file exists: the data folder
    <data_root>/<dataset> and the --pretrained_dir npz (both are needed by every run)."""
    missing = []
    data_dir = os.path.join(args.data_root, args.dataset)
    if not os.path.isdir(data_dir):
        missing.append(f"--data_root {args.data_root}: no folder {data_dir} (the data of --dataset {args.dataset})")
    if not os.path.isfile(args.pretrained_dir):
        missing.append(f"--pretrained_dir {args.pretrained_dir}: no such .npz file (Google's ViT weights, e.g. "
                       "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz)")
    if missing:
        raise MissingInputError('; '.join(missing))


# ---------------------------------------------------------------------------------------------------------------
# set-up

def set_seed(args):
    """Python's, NumPy's and torch's generators (torch.manual_seed also seeds every CUDA device)."""
    for seed_generator in (random.seed, np.random.seed, torch.manual_seed):
        seed_generator(args.seed)


def load_checkpoint_model(path, model):
    """Load `{'model': state_dict}` (the original's format; a bare state dict or DDP's `module.` prefix also work)
    strictly, naming mismatched keys; apex O2 checkpoints hold fp16 tensors, cast here."""
    from shared.checkpoint import load_weights, safe_load
    ckpt = safe_load(path)
    state = ckpt['model'] if isinstance(ckpt, dict) and 'model' in ckpt else ckpt
    own = model.state_dict()
    state = {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state.items()}
    state = {k: (v.to(own[k].dtype) if k in own and torch.is_tensor(v) else v) for k, v in state.items()}
    load_weights(model, state, strict=True, source=f'--pretrained_model {path}')


def setup(args):
    num_classes = num_classes_of(args.dataset)
    model = build_model(args.model_type, args.img_size, num_classes, zero_head=True, split=args.split,
                        slide_step=args.slide_step)
    model.load_from(args.pretrained_dir)
    if args.pretrained_model is not None:
        load_checkpoint_model(args.pretrained_model, model)
    if model.num_layers != args.num_model_layer:
        raise SetupError(f"--num_model_layer {args.num_model_layer} but {args.model_type} has {model.num_layers} "
                         f"layers: pass --num_model_layer {model.num_layers}")
    if model.num_tokens != args.max_seq_length:
        raise SetupError(f"--max_seq_length {args.max_seq_length} but {args.model_type} at --img_size "
                         f"{args.img_size} ({args.split}) has {model.num_tokens} tokens: pass --max_seq_length "
                         f"{model.num_tokens}")
    model.to(args.device)
    logger.info("{}".format(model.config))
    logger.info("Training parameters %s", args)
    logger.info("Total Parameter: \t%2.1fM" % count_parameters(model))
    return args, model


class Precision:
    """--fp16: torch.amp float16 autocast with a GradScaler starting at 2**20 (the original forced apex's dynamic
    scale to that), one scaled backward per pass and one step per optimizer step; apex only with --apex."""

    def __init__(self, args, model, optimizer):
        self.device = torch.device(args.device)
        self.apex = None
        self.enabled = bool(args.fp16) and self.device.type == 'cuda'
        if args.fp16 and not self.enabled:
            logger.warning("--fp16 ignored: no CUDA device, running in float32")
        if self.enabled and args.apex:
            from shared.amp import apex_available
            if not apex_available():
                raise RuntimeError("--apex asked for but NVIDIA apex is not installed")
            from apex import amp
            model, optimizer = amp.initialize(models=model, optimizers=optimizer, opt_level=args.fp16_opt_level)
            amp._amp_state.loss_scalers[0]._loss_scale = 2 ** 20
            self.apex = amp
        self.model, self.optimizer = model, optimizer
        self.scaler = torch.amp.GradScaler('cuda', init_scale=2 ** 20, enabled=self.enabled and self.apex is None)

    def autocast(self):
        if not self.enabled or self.apex is not None:
            import contextlib
            return contextlib.nullcontext()
        return torch.autocast('cuda', dtype=torch.float16)

    def backward(self, loss):
        if self.apex is not None:
            with self.apex.scale_loss(loss, self.optimizer) as scaled:
                scaled.backward()
        else:
            self.scaler.scale(loss).backward()

    def clip_and_step(self, scheduler, max_grad_norm):
        params = self.apex.master_params(self.optimizer) if self.apex is not None else self.model.parameters()
        allreduce_gradients(self.model)
        if self.apex is None:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        with warnings.catch_warnings():  # the order is deliberate: update k uses step k's factor, as the original
            warnings.filterwarnings('ignore', message='Detected call of')
            scheduler.step()
        if self.apex is None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad()

    def state_dict(self):
        return self.apex.state_dict() if self.apex is not None else self.scaler.state_dict()

    def load_state_dict(self, state):
        (self.apex if self.apex is not None else self.scaler).load_state_dict(state)


def broadcast_parameters(model):
    if is_dist_avail_and_initialized():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def allreduce_gradients(model):
    """Average the gradients over ranks once per optimizer step, after all passes of all micro-batches (apex DDP's
    delay_allreduce, which the original used for distillation). Parameters a pass skipped (LayerDrop) contribute
    zeros, so no parameter is ever left out of the collective."""
    if not is_dist_avail_and_initialized():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def save_model(args, model, precision):
    model_to_save = unwrap_model(model)
    checkpoint = {'model': model_to_save.state_dict()}
    if args.fp16 and precision.enabled:
        checkpoint['amp'] = precision.state_dict()
    path = os.path.join(args.output_dir, "%s_checkpoint.bin" % args.name)
    atomic_save(checkpoint, path)
    logger.info("Saved model checkpoint to [DIR: %s]", args.output_dir)


def state_path(args):
    return os.path.join(args.output_dir, "%s_state.bin" % args.name)


def gather_per_rank(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not is_dist_avail_and_initialized():
        return [obj]
    objs = [None] * get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


class Progress:
    """Where the step loop stands, so that a restarted run continues exactly where the last saved state left it.

    Validation (and so a save) may fall in the middle of a pass over the data: the state then holds each rank's RNG
    states from just before the pass's loader was created and how many micro-batches of the pass were used. A resumed
    run rebuilds the loader from those states, draws the used micro-batches again without training on them (the same
    sampler order and augmentation draws), then puts back the RNG states of the saved moment."""

    def __init__(self):
        self.global_step, self.epoch, self.best_acc = 0, 0, 0
        self.batches_done, self.correct, self.seen = 0, 0, 0
        self.pass_rng = None        # this rank's RNG states before the current pass's loader was built
        self.history = []           # one entry per validation (the lines of <name>_log.txt)
        self.finished = False
        self.resume_rng = None      # set by load(): this rank's states at the saved moment, applied after the replay

    def save(self, args, model, optimizer, scheduler, precision):
        """<name>_state.bin, on every rank (the RNG states are gathered); the weights are checked first."""
        check_finite_weights(model)
        per_rank = gather_per_rank({'pass_rng': self.pass_rng, 'correct': self.correct, 'seen': self.seen})
        save_checkpoint(state_path(args), model=model, optimizer=optimizer, lr_scheduler=scheduler,
                        precision=precision.state_dict(), args=args, global_step=self.global_step, epoch=self.epoch,
                        best_acc=self.best_acc, batches_done=self.batches_done, per_rank=per_rank,
                        log=list(self.history), finished=self.finished)

    def load(self, path, model, optimizer, scheduler, precision):
        from shared.checkpoint import load_weights
        ckpt = safe_load(path)
        if get_world_size() != len(ckpt['rng']):
            raise UserError(f"{path} was written by {len(ckpt['rng'])} processes, this run has {get_world_size()}: "
                            "continue it with the same number of processes, or pass another --output_dir/--name")
        load_weights(unwrap_model(model), ckpt['model'], strict=True, source=path)
        optimizer.load_state_dict(ckpt['optimizer'])
        scheduler.load_state_dict(ckpt['lr_scheduler'])
        if ckpt.get('precision'):
            precision.load_state_dict(ckpt['precision'])
        mine = ckpt['per_rank'][get_rank()]
        self.global_step, self.epoch, self.best_acc = ckpt['global_step'], ckpt['epoch'], ckpt['best_acc']
        self.batches_done, self.correct, self.seen = ckpt['batches_done'], mine['correct'], mine['seen']
        self.pass_rng, self.resume_rng = mine['pass_rng'], ckpt['rng'][get_rank()]
        self.history, self.finished = list(ckpt['log']), ckpt['finished']
        logger.info("Resumed from %s: %d steps done", path, self.global_step)

    def start_pass(self, loader):
        """enumerate(loader) for the next pass; after a resume, positioned where the saved state left off."""
        if self.resume_rng is None:
            self.pass_rng = rng_state()
            self.batches_done = self.correct = self.seen = 0
            return enumerate(loader)
        set_rng_state(self.pass_rng)
        batches = enumerate(loader)
        for _ in range(self.batches_done):
            next(batches)
        set_rng_state(self.resume_rng)
        self.resume_rng = None
        return batches


def reduce_counts(correct, total):
    """Exact accuracy over all ranks: summed correct predictions over summed images (the original averaged per-rank
    accuracies over torch.cuda.device_count(), which breaks on CPU and weighs padded duplicates)."""
    if is_dist_avail_and_initialized():
        t = torch.tensor([correct, total], dtype=torch.float64)
        dist.all_reduce(t)
        correct, total = t.tolist()
    return correct / max(total, 1)


@torch.no_grad()
def evaluate(args, model, test_loader, desc="Validating... (loss=X.X)"):
    """Top-1 accuracy (a fraction) and mean loss of `model` (with whatever gene is installed) on the test split."""
    model.eval()
    losses, correct, total = [], 0, 0
    it = tqdm(test_loader, desc=desc, bar_format="{l_bar}{r_bar}", dynamic_ncols=True,
              disable=not is_main_process() or not sys.stderr.isatty())
    for x, y in it:
        x, y = x.to(args.device), y.to(args.device)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        losses.append(loss.item())
        correct += (logits.argmax(-1) == y).sum().item()
        total += y.numel()
        it.set_description("Validating... (loss=%2.5f)" % losses[-1])
    mean_loss = reduce_counts(sum(losses), len(losses))
    return reduce_counts(correct, total), mean_loss


def valid(args, model, writer, test_loader, global_step):
    logger.info("***** Running Validation *****")
    logger.info("  Num steps = %d", len(test_loader))
    logger.info("  Batch size = %d", args.eval_batch_size)
    accuracy, loss = evaluate(args, model, test_loader)
    logger.info("\n")
    logger.info("Validation Results")
    logger.info("Global Steps: %d" % global_step)
    logger.info("Valid Loss: %2.5f" % loss)
    logger.info("Valid Accuracy: %2.5f" % accuracy)
    if writer is not None:
        writer.add_scalar("test/accuracy", scalar_value=accuracy, global_step=global_step)
    return accuracy, loss


# ---------------------------------------------------------------------------------------------------------------
# training (baseline) and distillation share the loop; they differ in the passes per micro-batch and the save rule

def baseline_passes(args, model, precision, x, y):
    with precision.autocast():
        loss, logits = model(x, y)
    loss = loss.mean()
    if args.gradient_accumulation_steps > 1:
        loss = loss / args.gradient_accumulation_steps
    precision.backward(loss)
    loss_value = loss.item()
    return loss_value, logits, (loss_value,)


def distil_passes(args, model, precision, x, y):
    """The sandwich rule: the full network on the labels, then the smallest and `num_sandwich` random sub-networks
    against its detached logits. Every pass is divided by K = num_sandwich + 2 and back-propagated at once."""
    k = args.num_sandwich + 2
    layer_config = sample_layer_configuration(args.num_model_layer, layer_dropout_prob=args.layer_dropout_prob,
                                              layer_dropout=0)
    with precision.autocast():
        loss, logits = model(x, y, layer_config=layer_config, length_config=None)
    # The original adds 0 * sum(params) here so that apex DDP sees every parameter; gradients are all-reduced
    # explicitly here (allreduce_gradients), so the term is not needed. Not divided by the accumulation (as there).
    full_loss = loss.mean() / k
    precision.backward(full_loss)
    values = [full_loss.item()]
    teacher = logits.detach()
    for i in range(args.num_sandwich + 1):
        layer_config = sample_layer_configuration(
            args.num_model_layer, layer_dropout_prob=args.layer_dropout_prob,
            layer_dropout=(args.layer_dropout_bound if i == 0 else None), layer_dropout_bound=args.layer_dropout_bound)
        length_config = sample_length_configuration(
            args.max_seq_length, args.num_model_layer, layer_config,
            length_drop_ratio=(args.length_drop_ratio_bound if i == 0 else None),  # i == 0: the smallest
            length_drop_ratio_bound=args.length_drop_ratio_bound)
        with precision.autocast():
            _, sub_logits = model(x, y, layer_config=layer_config, length_config=length_config)
        # LAT's argument order: input = the teacher's log-probabilities, target = the student's probabilities, so
        # the value is KL(p_student || p_teacher) and the gradient flows through the target.
        kd = F.kl_div(F.log_softmax(teacher.float(), -1), F.softmax(sub_logits.float(), -1), reduction='batchmean')
        kd = kd / k
        if args.gradient_accumulation_steps > 1:
            kd = kd / args.gradient_accumulation_steps
        precision.backward(kd)
        values.append(kd.item())
    return values[-1], logits, values


def take_run_dir(args):
    """Lock <output_dir> (rank 0) and say where the run starts: the state file to continue from, or None."""
    run_dir = RunDir(args.output_dir, active=is_main_process(), log_name="%s_log.txt" % args.name)
    run_dir.acquire()
    barrier()  # leftovers of an interrupted save are gone before any rank looks for the state
    path = state_path(args)
    if not os.path.isfile(path):
        return run_dir, None
    if not args.auto_resume:
        run_dir.release()
        raise UserError(f"{path} holds an earlier run and auto-resume is off: continue it by rerunning without "
                        "--no_auto_resume, or pass another --output_dir or --name")
    return run_dir, path


def run_training(args, model, distil, datasets=None):
    """The original's train() (distil=False) and distil() (distil=True); `datasets`: see data_utils.get_loader."""
    if is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
    run_dir, resume_from = take_run_dir(args)
    try:
        return _train_steps(args, model, distil, datasets, run_dir, resume_from)
    finally:
        run_dir.release()


def _train_steps(args, model, distil, datasets, run_dir, resume_from):
    writer = None
    if is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=os.path.join("logs", args.name))

    args.train_batch_size = args.train_batch_size // args.gradient_accumulation_steps
    train_loader, test_loader = get_loader(args, datasets=datasets)

    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=0.9,
                                weight_decay=args.weight_decay)
    t_total = args.num_steps
    scheduler = build_scheduler(optimizer, args.decay_type, args.warmup_steps, t_total)
    precision = Precision(args, model, optimizer)
    model, optimizer = precision.model, precision.optimizer
    broadcast_parameters(model)

    logger.info("***** Running training *****")
    accumulation = args.gradient_accumulation_steps
    for what, count in (("Total optimization steps", args.num_steps),
                        ("Instantaneous batch size per GPU", args.train_batch_size),
                        ("Total train batch size (w. parallel, distributed & accumulation)",
                         args.train_batch_size * accumulation * get_world_size()),
                        ("Gradient Accumulation steps", accumulation)):
        logger.info("  %s = %d", what, count)

    passes = distil_passes if distil else baseline_passes
    model.zero_grad()
    set_seed(args)
    progress = Progress()
    if resume_from is not None:
        progress.load(resume_from, model, optimizer, scheduler, precision)
        run_dir.restore_log(progress.history)
    if progress.finished:
        logger.info("Training already finished (%d steps in %s)", progress.global_step, resume_from)
        if writer is not None:
            writer.close()
        return progress.best_acc
    start_time = time.time()
    while True:
        model.train()
        it = tqdm(train_loader, desc="Training (X / X Steps) (loss=X.X)", bar_format="{l_bar}{r_bar}",
                  dynamic_ncols=True, disable=not is_main_process() or not sys.stderr.isatty())
        batches = progress.start_pass(it)
        # a run resumed from the state saved at its last step has no step left in this pass
        for step, (x, y) in (batches if progress.global_step < t_total else ()):
            x, y = x.to(args.device), y.to(args.device)
            loss_value, logits, pass_losses = passes(args, model, precision, x, y)
            for value in pass_losses:
                check_finite_loss(value, progress.epoch, step=progress.global_step + 1)
            progress.correct += (logits.argmax(-1) == y).sum().item()
            progress.seen += y.numel()
            progress.batches_done = step + 1
            if (step + 1) % args.gradient_accumulation_steps == 0:
                # The logged loss is the last pass's (for distillation: the last sub-network's KD / K), as there.
                loss_logged = loss_value * args.gradient_accumulation_steps
                precision.clip_and_step(scheduler, args.max_grad_norm)
                progress.global_step += 1
                global_step = progress.global_step
                it.set_description("Training (%d / %d Steps) (loss=%2.5f)" % (global_step, t_total, loss_logged))
                if writer is not None:
                    writer.add_scalar("train/loss", scalar_value=loss_logged, global_step=global_step)
                    writer.add_scalar("train/lr", scalar_value=scheduler.get_last_lr()[0], global_step=global_step)
                # Distillation skips validation during the first pass over the data.
                if global_step % args.eval_every == 0 and not (distil and progress.epoch == 0):
                    validate_and_save(args, model, optimizer, scheduler, precision, writer, test_loader, progress,
                                      distil, run_dir)
                    model.train()
                if global_step % t_total == 0:
                    break
        train_accuracy = reduce_counts(progress.correct, progress.seen)
        logger.info("%s accuracy so far: %f" % ("single epoch train" if distil else "train", train_accuracy))
        progress.epoch += 1
        if progress.global_step % t_total == 0:
            break
    progress.finished = True
    if args.output_dir:
        progress.save(args, model, optimizer, scheduler, precision)
    if writer is not None:
        writer.close()
    logger.info("Best Accuracy: \t%f" % progress.best_acc)
    logger.info("End Training!")
    logger.info("Total Training Time: \t%f" % ((time.time() - start_time) / 3600))
    return progress.best_acc


def validate_and_save(args, model, optimizer, scheduler, precision, writer, test_loader, progress, distil, run_dir):
    """Validation, the best-model file when it improved, then the training state and the log line (the state is
    written after validation, whose loader draws from torch's generator)."""
    accuracy, loss = valid(args, model, writer, test_loader, progress.global_step)
    check_finite_weights(model)
    best_acc = progress.best_acc
    if distil:
        # saves on ties at 0.1 % resolution, so `best` may go down slightly (as the original)
        better = math.floor(best_acc * 1000) / 1000 <= math.floor(accuracy * 1000) / 1000
    else:
        better = best_acc < accuracy
    if better:
        if is_main_process():
            save_model(args, model, precision)
        progress.best_acc = accuracy
    if is_main_process():
        logger.info("best accuracy so far: %f", progress.best_acc)
    entry = {'step': progress.global_step, 'epoch': progress.epoch, 'valid_loss': loss, 'valid_accuracy': accuracy,
             'best_accuracy': progress.best_acc}
    progress.history.append(entry)
    progress.save(args, model, optimizer, scheduler, precision)
    run_dir.append_log(entry)


# ---------------------------------------------------------------------------------------------------------------
# search

def search(args, model, datasets=None):
    """The original's evolutionary search; writes store-/population-/parents-iter{i}.tsv under <evo_path>/<name>.
    `datasets`: see data_utils.get_loader."""
    _, test_loader = get_loader(args, train=False, datasets=datasets)
    net = unwrap_model(model)
    out_dir = os.path.join(args.evo_path, args.name)

    def evaluate_gene(gene):
        net.set_length_config(gene)
        return evaluate(args, net, test_loader)[0]

    def macs_of(gene):
        return int(round(gene_macs(net, gene) * DUMMY_BATCH))

    evolution = Evolution(macs_of, evaluate_gene, args.num_model_layer, args.max_seq_length,
                          max_tries=args.evo_max_tries, write=is_main_process())
    evolution.load_store(os.path.join(out_dir, 'store.tsv'))
    if is_main_process():
        os.makedirs(out_dir, exist_ok=True)
    barrier()
    lower_gene = sample_length_configuration(args.max_seq_length, args.num_model_layer,
                                             length_drop_ratio=args.length_drop_ratio_bound)
    upper_gene = (args.max_seq_length,) * args.num_model_layer
    seeds = [sample_length_configuration(args.max_seq_length, args.num_model_layer, length_drop_ratio=r)
             for r in seed_ratios(args.length_drop_ratio_bound, args.population_size)]
    return evolution.run(lower_gene, upper_gene, seeds, args.evo_iter, args.mutation_prob, args.mutation_size,
                         args.crossover_size, out_dir)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    check_input_paths(args)
    args.data_root = '{}/{}'.format(args.data_root, args.dataset)
    args.device = 'cuda'
    init_distributed_mode(args)
    if not args.distributed:
        args.local_rank = -1

    logging.basicConfig(format='%(asctime)s - %(levelname)s - %(name)s - %(message)s', datefmt='%m/%d/%Y %H:%M:%S',
                        level=logging.INFO if is_main_process() else logging.WARN, force=True)
    logger.warning("Process rank: %s, device: %s, n_gpu: %s, distributed training: %s, 16-bits training: %s" %
                   (get_rank(), args.device, torch.cuda.device_count(), args.distributed, args.fp16))
    set_seed(args)
    args, model = setup(args)

    if args.do_distil:
        run_training(args, model, distil=True)
    if args.do_search:
        if args.do_distil:
            # the original searched the in-memory (apex-cast) model; reload the checkpoint just written instead
            args, model = setup(argparse.Namespace(**{**vars(args), 'pretrained_model': os.path.join(
                args.output_dir, "%s_checkpoint.bin" % args.name)}))
        search(args, model)
    if not args.do_distil and not args.do_search:
        run_training(args, model, distil=False)
    barrier()
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
