"""Knowledge distillation from a teacher model (`--distillation-type none|soft|hard`), on top of a base criterion."""
import torch
import torch.nn.functional as F

DISTILLATION_TYPES = ('none', 'soft', 'hard')


def _class_and_distill_logits(outputs):
    """Models with a distillation token return (class logits, distillation logits); the others one tensor, which
    then serves both."""
    if isinstance(outputs, torch.Tensor):
        return outputs, outputs
    class_logits, distill_logits = outputs
    return class_logits, distill_logits


def soft_distillation(student_logits, teacher_logits, tau):
    """KL(teacher || student) of the temperature-`tau` distributions, summed over every element and divided by the
    number of logits (not by the batch size), times tau^2."""
    student_log_probs = F.log_softmax(student_logits / tau, dim=1)
    teacher_log_probs = F.log_softmax(teacher_logits / tau, dim=1)
    kl_sum = F.kl_div(student_log_probs, teacher_log_probs, reduction='sum', log_target=True)
    return kl_sum * (tau * tau) / student_logits.numel()


def hard_distillation(student_logits, teacher_logits):
    """Cross-entropy to the teacher's top-1 class."""
    return F.cross_entropy(student_logits, teacher_logits.argmax(dim=1))


class DistillationLoss(torch.nn.Module):
    """criterion(inputs, outputs, labels) = (1 - alpha) * base + alpha * distillation term, where the teacher sees
    the same `inputs`; with type 'none' it is `base_criterion(outputs, labels)` alone and the teacher is not run."""

    def __init__(self, base_criterion, teacher_model, distillation_type, alpha, tau):
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise ValueError(f'distillation type {distillation_type!r} is not one of {DISTILLATION_TYPES}')
        self.distillation_type = distillation_type
        self.base_criterion = base_criterion
        self.teacher_model = teacher_model  # a submodule, as before: .to()/.eval() on the criterion reach it
        self.alpha, self.tau = alpha, tau  # weight of the distillation term; softmax temperature ('soft')

    def forward(self, inputs, outputs, labels):
        class_logits, distill_logits = _class_and_distill_logits(outputs)
        base = self.base_criterion(class_logits, labels)
        if self.distillation_type == 'none':
            return base
        with torch.no_grad():
            teacher_logits = self.teacher_model(inputs)
        if self.distillation_type == 'soft':
            distill = soft_distillation(distill_logits, teacher_logits, self.tau)
        else:
            distill = hard_distillation(distill_logits, teacher_logits)
        return base * (1 - self.alpha) + distill * self.alpha
