"""TokenLabeling's loss: cls_weight * CE(class token) + dense_weight * CE(every patch token), soft targets.

`target` is either (B, classes) (no token labels: every token gets the image target) or (B, classes, 2 + L*L) as
built from the label maps: [:, :, 0] ground truth one-hot, [:, :, 1] class-token label, [:, :, 2:] token labels.
Under MixToken the class target is mixed with the flipped batch by the box area. With ToE the dense loss also covers
the zero-filled positions of dropped tokens (their logits are the head bias), as in the original.
"""
from torch import nn
from timm.loss import SoftTargetCrossEntropy


class TokenLabelCrossEntropy(nn.Module):
    def __init__(self, dense_weight=1.0, cls_weight=1.0, mixup_active=True, classes=1000, ground_truth=False):
        super().__init__()
        if dense_weight + cls_weight <= 0:
            raise ValueError('--dense-weight + --cls-weight must be > 0')
        self.ce = SoftTargetCrossEntropy()
        self.dense_weight, self.cls_weight = dense_weight, cls_weight
        self.mixup_active, self.classes, self.ground_truth = mixup_active, classes, ground_truth

    def forward(self, outputs, target):
        output, aux_output, (bbx1, bby1, bbx2, bby2) = outputs
        B, N, C = aux_output.shape
        if target.dim() == 2:
            target_cls = target
            target_aux = target.repeat(1, N).reshape(B * N, C)
        else:
            target_cls = target[:, :, 1]
            if self.ground_truth:
                # lean on the ground truth more when the teacher's class label disagrees with it
                gt = target[:, :, 0]
                ratio = (0.9 - 0.4 * (gt.max(-1)[1] == target_cls.max(-1)[1])).unsqueeze(-1)
                target_cls = target_cls * ratio + gt * (1 - ratio)
            target_aux = target[:, :, 2:].transpose(1, 2).reshape(-1, C)
        lam = 1 - ((bbx2 - bbx1) * (bby2 - bby1) / N)
        if lam < 1:
            target_cls = lam * target_cls + (1 - lam) * target_cls.flip(0)
        return self.cls_weight * self.ce(output, target_cls) + \
            self.dense_weight * self.ce(aux_output.reshape(-1, C), target_aux)


class TokenLabelSoftTargetCrossEntropy(nn.Module):
    """TokenLabeling's loss for `--token-label-size 1` (models without the dense head): soft-target CE of the class
    output against the class-token label [:, :, 1] of a (B, classes, 2) target, or against a (B, classes) target."""

    def __init__(self):
        super().__init__()
        self.ce = SoftTargetCrossEntropy()

    def forward(self, output, target):
        if target.dim() == 3 and target.shape[-1] == 2:
            target = target[:, :, 1]
        return self.ce(output, target)
