"""The LSE merge that lets a prefill chunk after cached keys run on square (flash / cuDNN) kernels.

On CPU the two halves run through the explicit-softmax reference; the merge must equal SDPA with
a lower-right causal mask over all keys. The CUDA kernels are compared in tests/test_cuda.py.
"""

from __future__ import annotations

import pytest

from arbor_core.errors import UsageError
import torch
import torch.nn.functional as F

from arbor_torch.prefix_attention import _expand_kv, attention_after_prefix, choose_kernel


def lower_right_reference(q, k, v):
    T, S = q.shape[2], k.shape[2]
    allowed = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]
    k, v = _expand_kv(k, v, q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("prefix,chunk", [(1, 5), (37, 16), (200, 64)])
def test_merged_halves_equal_lower_right_causal_attention(heads, kv_heads, prefix, chunk):
    g = torch.Generator().manual_seed(prefix * 100 + chunk + heads)
    q = torch.randn(2, heads, chunk, 32, generator=g, dtype=torch.float64)
    k = torch.randn(2, kv_heads, prefix + chunk, 32, generator=g, dtype=torch.float64)
    v = torch.randn(2, kv_heads, prefix + chunk, 32, generator=g, dtype=torch.float64)
    got = attention_after_prefix(q, k, v, kernel="math")
    # the reference is float64; the math path scores in float32, so compare at float32 precision
    torch.testing.assert_close(got.float(), lower_right_reference(q, k, v).float(), rtol=2e-5, atol=2e-5)


def test_a_query_that_sees_one_huge_score_gets_that_value():
    q = torch.zeros(1, 1, 2, 4)
    k = torch.zeros(1, 1, 6, 4)
    v = torch.arange(6, dtype=torch.float32).view(1, 1, 6, 1).expand(1, 1, 6, 4).contiguous()
    k[0, 0, 1] = 100.0  # position 1, in the prefix: dominates every query
    q[0, 0] = 1.0
    got = attention_after_prefix(q, k, v, kernel="math")
    assert torch.allclose(got, torch.full_like(got, 1.0), atol=1e-4)


def test_kernel_choice_honours_the_override_and_refuses_unknown_names(monkeypatch):
    monkeypatch.setenv("ARBOR_PREFILL_ATTENTION", "flash")
    assert choose_kernel(torch.device("cpu")) == "flash"
    monkeypatch.setenv("ARBOR_PREFILL_ATTENTION", "fastest")
    with pytest.raises(UsageError, match="ARBOR_PREFILL_ATTENTION must be one of"):  # one line, exit 2
        choose_kernel(torch.device("cpu"))
    monkeypatch.delenv("ARBOR_PREFILL_ATTENTION")
    assert choose_kernel(torch.device("cpu")) == "efficient"
