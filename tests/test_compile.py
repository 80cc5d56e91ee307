"""torch.compile on every inference path: the plain ViT, ToMe and folded ToCom at a fixed r, DiffRate with a loaded
schedule, TAVT with an installed gene, A-ViT zipped and ToE at a stage.

What is pinned (dynamo's `explain`, per path, on the CPU):
- one graph and no break where the token counts are fixed by the settings (plain, ToMe, ToCom, DiffRate, TAVT), so
  these compile with `fullgraph=True`;
- A-ViT zipped: how many tokens stay active is read from the data (`.item()` in the packing step), one break per read
  with dynamo's defaults; with `capture_scalar_outputs=True` the count is an unbacked size and the forward is one
  graph (fullgraph);
- ToE: the seed/rest split is boolean-mask indexing (`nonzero`, a data-dependent output shape) in toe/token_select.py,
  so dynamo breaks there under either setting.
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
    'toe_stage': ({}, 11, 10),
}
# A-ViT zipped with dynamo's defaults: breaks at every `.item()` of the packing step
AVIT_DEFAULT_CONFIG = (6, 5)
# the 12-block models (heavy): only the data-dependent paths change with depth
EXPECTED_FULL_DEPTH = {'avit_zipped_default': (9, 8), 'toe_stage': (11, 10)}


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


def test_toe_breaks_on_the_boolean_mask_of_its_seeds():
    explained = explain(reduced_models.toe_stage(depth=DEPTH), reduced_models.images(2))
    sites = {(os.path.basename(b.user_stack[-1].filename), b.user_stack[-1].name) for b in explained.break_reasons}
    assert ('token_select.py', 'seed_indices') in sites


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
