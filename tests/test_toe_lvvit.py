"""LV-ViT with ToE: kept tokens restored to their grid positions with zeros elsewhere; token-labelling loss."""
import torch

from toe.lvvit.loss import TokenLabelCrossEntropy
from toe.lvvit.models import create_model
from toe.token_select import TokenSelect


def _model(name='lvvit_t', img=64):
    torch.manual_seed(0)
    m = create_model(name, num_classes=5, img_size=img)
    m.token_select = TokenSelect([0, 1, 2], [0.4, 0.7, 1.0], 0.2, 2)
    m.token_select.sparse_inference = True
    return m


def test_restore_zero_fills_dropped_positions():
    m = _model(img=224).eval()
    x = torch.randn(1, 3, 224, 224)
    for epoch, kept in [(0, 78), (1, 136), (2, 196)]:
        m.token_select.update_current_stage(epoch)
        with torch.no_grad():
            feat = m.forward_features(x)
        assert feat.shape == (1, 197, 240)
        assert (feat[0, 1:].abs().sum(-1) != 0).sum().item() == kept  # 118 zero rows at stage 1 (spec §3.2)


def test_train_forward_and_loss_goes_down():
    import numpy as np
    np.random.seed(0)  # MixToken boxes
    m = _model().train()
    x, y = torch.randn(4, 3, 64, 64), torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 5).float()
    m.token_select.update_current_stage(0)
    crit = TokenLabelCrossEntropy(classes=5)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        cls, aux, box = m(x)
        assert cls.shape == (4, 5) and aux.shape == (4, 16, 5)
        loss = crit((cls, aux, box), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    dense = torch.rand(4, 5, 2 + 16).softmax(1)
    assert torch.isfinite(crit(m(x), dense))
