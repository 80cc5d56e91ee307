"""Tiny instances of every inference path (the plain baseline and the five methods at fixed settings), shared by the
compile and export tests. All are built on the project's 32 px digits ViT layout (64 patches + class token, width 64,
12 blocks) with seeded random weights, so that each runs in milliseconds on one CPU core."""
import torch

from shared.models import DIGITS_VIT

IMG_SIZE = DIGITS_VIT['img_size']
# tokens to merge per layer (ToMe, ToCom), the ToCom compensation pair, a DiffRate schedule and a TAVT gene; the
# DiffRate and TAVT schedules count the class token, like the methods' own files
TOME_R = 4
TOCOM_R_TGT, TOCOM_R_SRC = 4, 2
DIFFRATE_PRUNE = [65, 60, 56, 50, 46, 40, 36, 32, 28, 24, 20, 16]
DIFFRATE_MERGE = [65, 58, 52, 48, 42, 38, 34, 30, 26, 22, 18, 14]
TAVT_GENE = (60, 54, 50, 44, 40, 36, 30, 26, 22, 18, 14, 10)
DEPTH = DIGITS_VIT['depth']


def images(batch, seed=0):
    return torch.randn(batch, 3, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(seed))


def _digits_vit(seed, depth):
    import timm
    torch.manual_seed(seed)
    return timm.create_model('vit_digits_patch4_32', depth=depth)


def _perturb(model, std=0.02, seed=1):
    """Non-zero weights everywhere (timm zeroes the class token and some biases at init, ToCom its up-projections),
    so that every parameter reaches the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)
    return model


def baseline(seed=0, depth=DEPTH):
    return _perturb(_digits_vit(seed, depth)).eval()


def tome(seed=0, depth=DEPTH, r=TOME_R):
    from shared.tome import apply_patch
    model = apply_patch(baseline(seed, depth), prop_attn=True)
    model.r = r
    return model.eval()


def tocom_folded(seed=0, depth=DEPTH, r_tgt=TOCOM_R_TGT, r_src=TOCOM_R_SRC):
    from shared.tome import apply_patch
    from tocom.models import add_compensator, fold_compensator
    model = add_compensator(apply_patch(baseline(seed, depth), prop_attn=True), tocom_dim=32)
    _perturb(model, std=0.05, seed=2)  # the compensator's up-projections start at zero
    return fold_compensator(model.eval(), r_tgt, r_src).eval()


def diffrate(seed=0, depth=DEPTH, prune=DIFFRATE_PRUNE, merge=DIFFRATE_MERGE):
    from diffrate.vit import apply_deit_patch
    from tools.export import LogitsOnly  # the forward returns (logits, FLOPs); deployment reads the logits
    model = apply_deit_patch(baseline(seed, depth))
    model.set_kept_num(list(prune[:depth]), list(merge[:depth]))
    return LogitsOnly(model.eval()).eval()


def tavt(seed=0, depth=DEPTH, gene=TAVT_GENE):
    from tavt.models.configs import vit_config
    from tavt.models.modeling import VisionTransformer
    torch.manual_seed(seed)
    config = vit_config(DIGITS_VIT['patch_size'], DIGITS_VIT['embed_dim'], 4 * DIGITS_VIT['embed_dim'],
                        DIGITS_VIT['num_heads'], depth)  # ViT-digits of tavt.models.configs at any depth
    model = _perturb(VisionTransformer(config, IMG_SIZE, num_classes=10), std=0.05)
    model.set_length_config(gene[:depth])
    return model.eval()


def avit_zipped(seed=0, depth=DEPTH):
    from avit.models_act import _create_avit
    torch.manual_seed(seed)
    model = _create_avit(qkv_bias=True, **{**DIGITS_VIT, 'depth': depth})
    # gates low enough that tokens halt at different depths with random weights
    model.gate_scale, model.gate_center = 5., 0.5
    _perturb(model)
    model.zip_tokens = True
    return model.eval()


def toe_stage(seed=0, depth=DEPTH, stage_epoch=0):
    from toe.deit.models import create_model
    from toe.token_select import TokenSelect
    torch.manual_seed(seed)
    model = _perturb(create_model('vit_digits_patch4_32', depth=depth))
    model.token_select = TokenSelect()
    model.token_select.update_current_stage(stage_epoch)
    model.token_select.sparse_inference = True
    return model.eval()


BUILDERS = {
    'baseline': baseline, 'tome': tome, 'tocom_folded': tocom_folded, 'diffrate': diffrate, 'tavt': tavt,
    'avit_zipped': avit_zipped, 'toe_stage': toe_stage,
}
