"""DeiT's training run, written once for every DeiT-style entry script: each epoch trains, evaluates, checks the
weights, writes the checkpoint and the best checkpoints, and appends one line to log.txt.

A method brings only its own logic, as callables: its epoch (`train_epoch(epoch) -> stats`, the paper's step in the
method's engine), its evaluation (`evaluate(epoch) -> stats`, or None where the original evaluates nothing), and
optional hooks (`before_epoch`, `after_evaluate` for extra log entries such as an EMA evaluation,
`checkpoint_fields` for extra checkpoint entries).

The resume contract (the same in every script):
- a run restarted with the same --output_dir continues from <output_dir>/checkpoint.pth by itself; with auto-resume
  switched off, an output dir that already holds a checkpoint is refused instead of overwritten;
- the checkpoint is written after evaluation and holds every rank's RNG states (and the method's registered random
  streams), the best accuracies so far and the log history, so the resumed run ends bit-identical to an
  uninterrupted one, and log.txt holds each finished epoch exactly once;
- every file is written atomically; leftovers of an interrupted save are removed at the next start; a second live run
  in the same output dir is refused; a NaN/Inf loss or weight stops the run before anything is saved.
"""
import datetime
import math
import os
import time

from shared.checkpoint import (atomic_copy, atomic_save, auto_resume, load_training_state, nonfinite_tensors,
                               save_checkpoint)
from shared.distributed import is_main_process, unwrap_model
from shared.errors import TrainingDiverged, UserError
from shared.rundir import RunDir

CHECKPOINT = 'checkpoint.pth'


def check_finite_loss(loss_value, epoch, step=None):
    """Stop on a NaN/Inf loss, before the step that would spread it into the weights."""
    if not math.isfinite(loss_value):
        where = f'epoch {epoch}' + (f', step {step}' if step is not None else '')
        raise TrainingDiverged(f'loss is {loss_value} at {where}; stopping before anything is saved (the last '
                               'checkpoint is kept). Lower --lr or check the data')


def check_finite_weights(module, what='model'):
    """Stop when a floating-point tensor of `module`'s state holds NaN/Inf, naming the first such tensor."""
    broken = nonfinite_tensors(unwrap_model(module).state_dict())
    if broken:
        raise TrainingDiverged(f'{what} tensor {broken[0]} holds NaN/Inf values; stopping before anything is saved '
                               '(the last checkpoint is kept)')


class Best:
    """One best-so-far file: the value of `key` in the epoch's log entry, the file written when it improves, and
    the line printed each epoch."""

    def __init__(self, key='test_acc1', filename='best_checkpoint.pth', label='Max accuracy', suffix='%'):
        self.key, self.filename, self.label, self.suffix = key, filename, label, suffix


class Trainer:
    def __init__(self, args, model, optimizer, lr_scheduler, loss_scaler, *, train_loader, train_epoch, evaluate=None,
                 model_ema=None, n_parameters=None, tb_logger=None, bests=(Best(),), before_epoch=None,
                 after_evaluate=None, checkpoint_fields=None, model_state=None, best_payload=None,
                 trainable_only=False, val_images=None):
        self.args = args
        self.model = model
        self.optimizer, self.lr_scheduler, self.loss_scaler = optimizer, lr_scheduler, loss_scaler
        self.model_ema = model_ema
        self.train_loader = train_loader
        self.train_epoch, self.evaluate = train_epoch, evaluate
        self.before_epoch, self.after_evaluate = before_epoch, after_evaluate
        self.checkpoint_fields = checkpoint_fields
        self.model_state = model_state            # () -> the state dict stored as 'model' (default: all of it)
        self.best_payload = best_payload          # () -> what a best file holds (default: a copy of the checkpoint)
        self.trainable_only = trainable_only
        self.tb_logger = tb_logger
        self.bests = list(bests) if evaluate is not None else []
        self.best_values = {b.key: 0.0 for b in self.bests}
        self.history = []
        self.val_images = val_images
        self.n_parameters = n_parameters if n_parameters is not None else sum(
            p.numel() for p in unwrap_model(model).parameters() if p.requires_grad)
        self.output_dir = getattr(args, 'output_dir', '') or ''
        self.run_dir = RunDir(self.output_dir, active=is_main_process())

    # ------------------------------------------------------------------ start

    def resume(self):
        """Take the output dir (lock, leftovers), pick the checkpoint to continue from and load it. Call it before an
        --eval branch too, so that `--eval --resume` loads the weights. Returns the checkpoint dict or None."""
        args = self.args
        if not getattr(args, 'eval', False):
            self.run_dir.acquire()
            existing = os.path.join(self.output_dir, CHECKPOINT) if self.output_dir else ''
            if getattr(args, 'auto_resume', True):
                auto_resume(args, CHECKPOINT)
            elif existing and os.path.isfile(existing) and not getattr(args, 'resume', ''):
                raise UserError(f'{existing} holds an earlier run and auto-resume is off: continue it by rerunning '
                                'without --no-auto-resume, or pass another --output_dir')
        checkpoint = load_training_state(args, self.model, self.optimizer, self.lr_scheduler, self.loss_scaler,
                                         self.model_ema, trainable_only=self.trainable_only)
        if checkpoint is not None and not getattr(args, 'eval', False) and 'epoch' in checkpoint:
            self.best_values.update(checkpoint.get('best', {}))
            if 'log' in checkpoint:
                self.history = list(checkpoint['log'])
                self.run_dir.restore_log(self.history)
        return checkpoint

    # ------------------------------------------------------------------ the loop

    def fit(self):
        args = self.args
        start_epoch, epochs = getattr(args, 'start_epoch', 0), args.epochs
        if start_epoch >= epochs:
            self.run_dir.release()
            print(f'Training already finished ({epochs} epochs)')
            return self.history[-1] if self.history else {}
        print(f'Start training for {epochs} epochs')
        start_time = time.time()
        log_stats = {}
        try:
            for epoch in range(start_epoch, epochs):
                log_stats = self.run_epoch(epoch)
        finally:
            self.run_dir.release()
            if self.tb_logger is not None:
                self.tb_logger.close()
        print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
        return log_stats

    def run_epoch(self, epoch):
        if self.before_epoch is not None:
            self.before_epoch(epoch)
        set_epoch = getattr(self.train_loader.sampler, 'set_epoch', None)
        if set_epoch is not None:
            set_epoch(epoch)
        train_stats = self.train_epoch(epoch)
        self.lr_scheduler.step(epoch)
        check_finite_weights(self.model)

        log_stats = {f'train_{k}': v for k, v in train_stats.items()}
        if self.evaluate is not None:
            test_stats = self.evaluate(epoch)
            if self.val_images is not None:
                print(f"Accuracy of the network on the {self.val_images} test images: {test_stats['acc1']:.1f}%")
            log_stats.update({f'test_{k}': v for k, v in test_stats.items()})
        log_stats.update(epoch=epoch, n_parameters=self.n_parameters)
        if self.after_evaluate is not None:
            self.after_evaluate(epoch, log_stats)

        improved = []
        for best in self.bests:
            value = log_stats.get(best.key)
            if value is not None and value > self.best_values[best.key]:
                self.best_values[best.key] = value
                improved.append(best)
        for best in self.bests:
            if best.key in log_stats:
                print(f'{best.label}: {self.best_values[best.key]:.2f}{best.suffix}')

        self.history.append(log_stats)
        self.save(epoch, improved)
        self.run_dir.append_log(log_stats)
        if self.tb_logger is not None:
            self.tb_logger.flush()
        return log_stats

    # ------------------------------------------------------------------ saving

    def save(self, epoch, improved=()):
        """checkpoint.pth (every rank takes part: the RNG states are gathered), then the improved best files."""
        if not self.output_dir:
            return
        path = os.path.join(self.output_dir, CHECKPOINT)
        fields = dict(self.checkpoint_fields() if self.checkpoint_fields is not None else {})
        model = self.model_state() if self.model_state is not None else self.model
        save_checkpoint(path, model=model, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, epoch=epoch,
                        loss_scaler=self.loss_scaler, model_ema=self.model_ema, args=self.args,
                        best=dict(self.best_values), log=list(self.history), **fields)
        if not is_main_process():
            return
        for best in improved:
            target = os.path.join(self.output_dir, best.filename)
            if self.best_payload is not None:
                atomic_save(self.best_payload(), target)
            else:
                atomic_copy(path, target)
