"""ml_collections configurations of ViT-pytorch (the models TAVT's `--model_type` names).

`split`/`slide_step` select TransFG's patch split; `train.py` always overwrites them from the command line, so every
config carries them here (the original left them out of the L and H configs). Each call returns a fresh ConfigDict:
the original kept module-level singletons in `CONFIGS` and mutated them, which leaks between models in one process.
"""
import ml_collections


def _base(patch, hidden, mlp, heads, layers):
    """A ViT-pytorch config; nested dicts become nested ConfigDicts, in this key order."""
    return ml_collections.ConfigDict(dict(
        patches=dict(size=(patch, patch)), split='non-overlap', slide_step=12, hidden_size=hidden,
        transformer=dict(mlp_dim=mlp, num_heads=heads, num_layers=layers, attention_dropout_rate=0.0,
                         dropout_rate=0.1),
        classifier='token', representation_size=None))


def get_b16_config():
    """ViT-B/16."""
    return _base(16, 768, 3072, 12, 12)


def get_b32_config():
    """ViT-B/32."""
    return _base(32, 768, 3072, 12, 12)


def get_l16_config():
    """ViT-L/16."""
    return _base(16, 1024, 4096, 16, 24)


def get_l32_config():
    """ViT-L/32."""
    return _base(32, 1024, 4096, 16, 24)


def get_h14_config():
    """ViT-H/14."""
    return _base(14, 1280, 5120, 16, 32)


def get_tiny_test_config():
    """A 12-layer ViT small enough for CPU tests (not in the original). Twelve layers so that TAVT's
    `--num_model_layer 12` default and the search's 12-layer helper apply unchanged."""
    return _base(16, 32, 64, 2, 12)


def get_digits_config():
    """The embedded default's baseline (shared.models.DIGITS_VIT: 32 px, patch 4, width 64, MLP 256, 4 heads,
    12 layers) in ViT-pytorch's layout, so that tools/compare.py's TAVT variants and tools/flops.py name the same model
    (not in the original)."""
    return vit_config(4, 64, 256, 4, 12)


def vit_config(patch, hidden, mlp, heads, layers):
    """A config of these dimensions (e.g. one matching a timm ViT whose weights are converted, see tavt/compare.py)."""
    return _base(patch, hidden, mlp, heads, layers)


CONFIG_FUNCTIONS = {
    'ViT-B_16': get_b16_config,
    'ViT-B_32': get_b32_config,
    'ViT-L_16': get_l16_config,
    'ViT-L_32': get_l32_config,
    'ViT-H_14': get_h14_config,
    'tiny-test': get_tiny_test_config,
    'ViT-digits': get_digits_config,
}


def get_config(model_type):
    if model_type not in CONFIG_FUNCTIONS:
        raise ValueError(f"unknown model type {model_type!r}; choose one of {sorted(CONFIG_FUNCTIONS)}")
    return CONFIG_FUNCTIONS[model_type]()
