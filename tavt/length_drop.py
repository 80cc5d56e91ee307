"""LAT's samplers of per-layer token counts ("genes") and of the layers to run (LayerDrop).

They draw from `numpy.random` in the original's order, so a seeded run gives the original's sequence.
"""
import numpy as np


def _shrink_rule(length_drop_prob, length_drop_ratio, length_drop_ratio_bound):
    """How a layer in the layer configuration shrinks the running length n, by the first option that is set."""
    if length_drop_prob is not None:  # each token dropped independently
        return lambda n: n - np.random.binomial(n, length_drop_prob)
    if length_drop_ratio is not None:  # a fixed fraction, the kept count rounded up
        keep = 1 - length_drop_ratio
        return lambda n: int(np.ceil(n * keep))
    if length_drop_ratio_bound is not None:  # a uniform count between the bound's shortest length and n
        keep = 1 - length_drop_ratio_bound
        return lambda n: np.random.randint(int(np.ceil(n * keep)), n + 1)
    return lambda n: n


def sample_length_configuration(max_seq_length, num_hidden_layers, layer_config=None, length_drop_prob=None,
                                length_drop_ratio=None, length_drop_ratio_bound=None, min_length=2):
    """Non-increasing token counts, one per layer, starting from `max_seq_length` (class token included).

    A layer outside `layer_config` keeps the running length. Otherwise the length shrinks by the first rule given:
    a binomial draw (`length_drop_prob`), a fixed ratio (`length_drop_ratio`, ceil(len * (1 - ratio))), or a uniform
    integer in [ceil(len * (1 - bound)), len] (`length_drop_ratio_bound`). Never below `min_length`."""
    shrink = _shrink_rule(length_drop_prob, length_drop_ratio, length_drop_ratio_bound)
    lengths = [max_seq_length]
    for layer in range(num_hidden_layers):
        n = lengths[-1]
        runs = layer_config is None or layer in layer_config
        lengths.append(max(int(shrink(n) if runs else n), min_length))
    return tuple(lengths[1:])


def sample_layer_configuration(num_hidden_layers, layer_dropout_prob=None, layer_dropout=None,
                               layer_dropout_bound=None):
    """The indices of the layers to run, or None for all.

    `layer_dropout_prob`: each layer independently kept when a uniform draw >= prob (LayerDrop; it wins whenever it
    is set, as it always is from TAVT's command line). `layer_dropout`: drop the last k layers. `layer_dropout_bound`:
    drop the last k layers, k uniform in [0, bound]."""
    if layer_dropout_prob is not None:
        return tuple(i for i in range(num_hidden_layers) if np.random.random() >= layer_dropout_prob)
    if layer_dropout is not None:
        layer_dropout = min(layer_dropout, num_hidden_layers - 1)
        return tuple(range(num_hidden_layers - layer_dropout))
    if layer_dropout_bound is not None:
        layer_dropout_bound = min(layer_dropout_bound, num_hidden_layers - 1)
        return tuple(range(num_hidden_layers - np.random.randint(0, layer_dropout_bound + 1)))
    return None
