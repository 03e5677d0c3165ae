"""weight_mm: the CPU split of skinny products against a base weight (DoRA's P W0 and (cQ) W0^T)."""
import pytest
import torch

from lycoris_kohya.algos.torch_ops import weight_mm


def product(a, w):
    """a @ w as a broadcast sum, independent of any GEMM."""
    return (a[:, :, None] * w[None]).sum(1)


@pytest.fixture
def bmm_calls(monkeypatch):
    calls, real = [], torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda x, y: calls.append(tuple(x.shape)) or real(x, y))
    return calls


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("transposed", [False, True])
def test_a_skinny_product_runs_as_one_slice_per_thread_and_equals_the_product(k, transposed, bmm_calls, threads):
    gen = torch.Generator().manual_seed(k)
    a = torch.randn(8, 1536, generator=gen, dtype=torch.float64)
    w = torch.randn(300, 1536, generator=gen, dtype=torch.float64).T if transposed else \
        torch.randn(1536, 300, generator=gen, dtype=torch.float64)
    threads(k)
    got = weight_mm(a, w)
    assert bmm_calls == [(k, 8, 1536 // k)]
    assert torch.allclose(got, product(a, w), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows,inner,k", [(33, 1536, 2), (8, 1537, 2), (8, 256, 2), (8, 1536, 1)])
def test_products_that_are_not_skinny_or_do_not_split_evenly_stay_one_product(rows, inner, k, bmm_calls, threads):
    gen = torch.Generator().manual_seed(rows + inner)
    a = torch.randn(rows, inner, generator=gen, dtype=torch.float64)
    w = torch.randn(inner, 40, generator=gen, dtype=torch.float64)
    threads(k)
    got = weight_mm(a, w)
    assert bmm_calls == []
    assert torch.allclose(got, product(a, w), rtol=1e-12, atol=1e-12)
