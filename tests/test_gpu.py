"""The inference paths on CUDA (marker `gpu`, skipped without a GPU; run with `pytest -m gpu`).

- fp32 on CUDA gives the CPU's logits within TOLERANCE, with TF32 off (cuDNN's convolutions, i.e. the patch
  embedding, use TF32 by default, which alone moves logits by ~1e-3); where a method decides from the data (which
  tokens merge, halt or are selected), the decisions are compared first, so a flipped near-tie is named as such;
- autocast float16 and bfloat16 forwards are finite;
- A-ViT's zipped path waits for the device at most once per block boundary (depth - 1 per forward, the bound its
  docstring states), counted with CUDA's sync debug mode, which warns at every synchronising call.

The models are tests/reduced_models.py's (12-block 32 px digits ViT, seeded random weights)."""
import copy
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import reduced_models  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]

TOLERANCE = 1e-4
BATCH = 8


@pytest.fixture
def exact_fp32():
    """Full fp32 matrix products and convolutions on CUDA while the test runs."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _decisions(model):
    """The data-dependent choices a forward left behind (None for the paths with none to read)."""
    if hasattr(model, 'counter_token'):  # A-ViT: each token's depth
        return model.counter_token
    return None


@pytest.mark.parametrize('path', sorted(reduced_models.BUILDERS))
def test_cuda_fp32_equals_cpu(path, exact_fp32):
    x = reduced_models.images(BATCH, seed=5)
    cpu_model = reduced_models.BUILDERS[path]()
    cuda_model = copy.deepcopy(cpu_model).cuda()
    with torch.no_grad():
        expected = cpu_model(x)
        out = cuda_model(x.cuda())
    decided = _decisions(cpu_model)
    if decided is not None:
        assert torch.equal(_decisions(cuda_model).cpu(), decided), f'{path}: CUDA took other data-dependent decisions'
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert (out.cpu() - expected).abs().max().item() < TOLERANCE


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['float16', 'bfloat16'])
@pytest.mark.parametrize('path', sorted(reduced_models.BUILDERS))
def test_autocast_forward_is_finite(path, dtype):
    model = reduced_models.BUILDERS[path]().cuda()
    with torch.no_grad(), torch.autocast('cuda', dtype=dtype):
        out = model(reduced_models.images(BATCH, seed=6).cuda())
    assert out.shape == (BATCH, 10)
    assert torch.isfinite(out).all()


def count_syncs(fn):
    """Synchronising CUDA calls made by fn(), from the warnings of CUDA's sync debug mode."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum('synchronizing' in str(w.message) for w in caught)


def test_sync_counter_sees_a_host_read():
    """The counter itself: one `.item()` on a CUDA tensor is one synchronising call."""
    t = torch.ones(3, device='cuda')
    assert count_syncs(lambda: t.sum().item()) == 1


@pytest.mark.parametrize('batch', [1, BATCH])
def test_avit_zipped_syncs_at_most_once_per_block_boundary(batch):
    model = reduced_models.avit_zipped().cuda()
    x = reduced_models.images(batch, seed=7).cuda()
    with torch.no_grad():
        model(x)  # first call: the library handles and kernels are set up here, not counted
        syncs = count_syncs(lambda: model(x))
        depths = model.counter_token
    assert syncs <= len(model.blocks) - 1, f'{syncs} host synchronisations in one zipped forward'
    # tokens halted at different depths, so the count was taken on a forward that packed
    assert depths.min() < depths.max()
