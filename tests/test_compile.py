"""torch.compile on every inference path: the plain ViT, ToMe and folded ToCom at a fixed r, DiffRate with a loaded
schedule, TAVT with an installed gene, A-ViT zipped and ToE at a stage.

What is pinned (dynamo's `explain`, per path, on the CPU):
- one graph and no break where the token counts are fixed by the settings (plain, ToMe, ToCom, DiffRate, TAVT, ToE
  at a stage), so these compile with `fullgraph=True`;
- A-ViT zipped: how many tokens stay active is read from the data (`.item()` in the packing step), one break per read
  with dynamo's defaults; with `capture_scalar_outputs=True` the count is an unbacked size and the forward is one
  graph (fullgraph);
- ToE: its seed/rest split (toe/token_select.py) is slices of one `arange`, every size a Python int of the stage, so
  it is one graph too (it was boolean-mask indexing before, `nonzero`, 10 breaks at 2 blocks).
The inductor runs (heavy: each compile takes tens of seconds on one core) check that compiled logits equal eager within
1e-5 and that a second batch of the same size does not recompile.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import reduced_models  # noqa: E402

TOLERANCE = 1e-5
# two blocks keep a dynamo trace at a few seconds on one core; the break counts below are for this depth
DEPTH = 2
# path -> (dynamo config, graphs, graph breaks) at DEPTH blocks
EXPECTED = {
    'baseline': ({}, 1, 0),
    'tome': ({}, 1, 0),
    'tocom_folded': ({}, 1, 0),
    'diffrate': ({}, 1, 0),
    'tavt': ({}, 1, 0),
    'avit_zipped': ({'capture_scalar_outputs': True}, 1, 0),
    'toe_stage': ({}, 1, 0),
}
# A-ViT zipped with dynamo's defaults: breaks at every `.item()` of the packing step
AVIT_DEFAULT_CONFIG = (6, 5)
# the 12-block models (heavy): only the data-dependent paths change with depth
EXPECTED_FULL_DEPTH = {'avit_zipped_default': (9, 8), 'toe_stage': (1, 0)}


def explain(model, x, **config):
    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(**config):
        return torch._dynamo.explain(model)(x)


@pytest.mark.parametrize('path', sorted(EXPECTED))
def test_graph_break_count(path):
    config, graphs, breaks = EXPECTED[path]
    explained = explain(reduced_models.BUILDERS[path](depth=DEPTH), reduced_models.images(2), **config)
    assert (explained.graph_count, explained.graph_break_count) == (graphs, breaks), explained.break_reasons


def test_avit_zipped_breaks_on_item_with_default_config():
    explained = explain(reduced_models.avit_zipped(depth=DEPTH), reduced_models.images(2))
    assert (explained.graph_count, explained.graph_break_count) == AVIT_DEFAULT_CONFIG
    assert all('item' in str(b.reason) for b in explained.break_reasons)


def test_toe_seed_split_equals_the_boolean_mask_it_replaces():
    """seed_indices against the mask it replaced, written independently here: every `stride`-th position up to
    `n_seed` seeds, the rest ascending; over sizes and rates whose float arithmetic is uneven (1 // 0.1 == 9)."""
    from toe.token_select import TokenSelect
    for rate in (0.1, 0.2, 0.25, 0.3, 0.33, 0.5, 0.7):
        select = TokenSelect(keep_rate=(max(rate, 0.5), 0.75, 1.0), initialization_keep_rate=rate)
        for n in (1, 7, 10, 49, 64, 196, 197, 576):
            n_seed, stride = int(n * rate), int(1 // rate)
            is_seed = torch.zeros(n, dtype=torch.bool)
            is_seed[list(range(0, n, stride))[:n_seed]] = True
            seeds, rest = select.seed_indices(n, torch.device('cpu'))
            assert torch.equal(seeds, torch.arange(n)[is_seed]) and torch.equal(rest, torch.arange(n)[~is_seed])


def test_tome_fullgraph_without_recompiling():
    """The eager backend runs the traced graph as is: logits bit-equal, and a second batch of the same size reuses
    the graph (dynamo would raise on a recompile)."""
    model = reduced_models.tome(depth=DEPTH)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend='eager', fullgraph=True)
    with torch.no_grad():
        first = compiled(reduced_models.images(2, seed=1))
        with torch._dynamo.config.patch(error_on_recompile=True):
            x = reduced_models.images(2, seed=2)
            second = compiled(x)
        assert torch.equal(second, model(x))
    assert first.shape == second.shape == (2, 10)
    torch._dynamo.reset()


@pytest.mark.heavy
@pytest.mark.parametrize('path', sorted(EXPECTED))
def test_inductor_equals_eager_without_recompiling(path):
    config, _, breaks = EXPECTED[path]
    model = reduced_models.BUILDERS[path](depth=DEPTH)
    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(**config):
        compiled = torch.compile(model, fullgraph=breaks == 0)
        for seed in (1, 2):
            x = reduced_models.images(2, seed=seed)
            with torch._dynamo.config.patch(error_on_recompile=seed > 1):
                out = compiled(x)
            assert (out - model(x)).abs().max().item() < TOLERANCE
    torch._dynamo.reset()


@pytest.mark.heavy
@pytest.mark.parametrize('path', ['baseline', 'tome', 'tocom_folded', 'diffrate', 'tavt'])
def test_full_depth_static_paths_are_one_graph(path):
    explained = explain(reduced_models.BUILDERS[path](), reduced_models.images(2))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


@pytest.mark.heavy
def test_full_depth_data_dependent_breaks():
    avit = explain(reduced_models.avit_zipped(), reduced_models.images(2))
    toe = explain(reduced_models.toe_stage(), reduced_models.images(2))
    assert (avit.graph_count, avit.graph_break_count) == EXPECTED_FULL_DEPTH['avit_zipped_default']
    assert (toe.graph_count, toe.graph_break_count) == EXPECTED_FULL_DEPTH['toe_stage']
    captured = explain(reduced_models.avit_zipped(), reduced_models.images(2), capture_scalar_outputs=True)
    assert (captured.graph_count, captured.graph_break_count) == (1, 0)
