"""The memory model and context choice, driven with fake memory sizes."""

import pytest

from arbor_core import planner
from arbor_core.config import ArborConfig
from arbor_core.errors import ContextError

GIB = 1 << 30
SMOL = ArborConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192)
WEIGHTS = 538 * (1 << 20)  # SmolLM2-135M in float32


def choose(needed, budget, requested=None, kv_bytes=4):
    return planner.choose_context(SMOL, needed, budget, WEIGHTS, kv_bytes, 4, 512, requested=requested)


def test_kv_bytes_per_token_matches_the_formula():
    # 2 (K and V) x 30 layers x 3 kv heads x 64 dims x 4 bytes
    assert SMOL.kv_bytes_per_token(4) == 2 * 30 * 3 * 64 * 4 == 46080


def test_smallest_bucket_that_holds_the_input():
    assert choose(100, 64 * GIB).context == 4096
    assert choose(5000, 64 * GIB).context == 8192
    assert choose(40_000, 64 * GIB).context == 65536


def test_memory_caps_the_context_and_returns_the_largest_that_fits():
    two_gib = choose(200_000, 2 * GIB)
    assert two_gib.context < 131072
    assert two_gib.bytes <= 2 * GIB
    bigger = planner.bytes_for_context(SMOL, planner.next_smaller(two_gib.context) * 4, WEIGHTS, 4, 4, 512)
    assert bigger > 2 * GIB or two_gib.context == 131072


def test_more_memory_never_gives_less_context():
    contexts = [choose(10**6, gib * GIB).context for gib in (1, 2, 4, 8, 16, 32)]
    assert contexts == sorted(contexts)


def test_half_the_kv_bytes_fit_about_twice_the_context():
    budget = planner.bytes_for_context(SMOL, 65536, WEIGHTS, 2, 4, 512)
    assert choose(10**6, budget, kv_bytes=4).context == 32768
    assert choose(10**6, budget, kv_bytes=2).context == 65536


def test_requested_context_is_honoured_or_refused_with_a_hint():
    assert choose(10, 64 * GIB, requested=20000).context == 20000
    with pytest.raises(ContextError, match="largest that fits is"):
        choose(10, 2 * GIB, requested=131072)


def test_nothing_fits_is_a_clear_error():
    with pytest.raises(ContextError, match="close other programs"):
        choose(10, 100 << 20)


def test_scaling_flag_beyond_trained_context():
    plan = choose(20_000, 64 * GIB)
    assert plan.scaled and plan.factor == 4.0
    assert not choose(100, 64 * GIB).scaled


def test_budget_keeps_a_margin_and_counts_resident_weights():
    assert planner.memory_budget(10 * GIB, 16 * GIB) == 10 * GIB - int(0.05 * 16 * GIB)
    assert planner.memory_budget(100, 16 * GIB) == 0
    assert planner.memory_budget(GIB, 2 * GIB, resident_bytes=GIB) == 2 * GIB - planner.MIN_MARGIN


def test_bucket_table_marks_what_fits():
    rows = planner.bucket_table(SMOL, 3 * GIB, WEIGHTS, 4, 4, 512)
    assert [r.context for r in rows] == list(planner.BUCKETS)
    fits = [r.fits for r in rows]
    assert fits[0] and not fits[-1] and fits == sorted(fits, reverse=True)
    assert all(a.bytes < b.bytes for a, b in zip(rows, rows[1:]))


def test_the_batch_that_fits_grows_with_memory_by_one_cache_a_sequence_up_to_the_most():
    def fits(budget, most=planner.MAX_BATCH):
        return planner.batch_that_fits(SMOL, 8192, budget, WEIGHTS, 4, 4, 512, most=most)

    one_cache = planner.kv_bytes(SMOL, 8192, 4, 512)  # 360 MiB: 46,080 bytes x 8,192 positions
    assert one_cache == 46080 * 8192
    base = WEIGHTS + planner.prefill_workspace_bytes(SMOL, 8192, 512, 4) + 16 * (4 * 576 + 3 * 1536) * 4 + 16 * 49152 * 4
    assert fits(base + 3 * one_cache) == 3 and fits(base + 3 * one_cache - 1) == 2
    assert fits(base - 1) == 0
    assert fits(64 * GIB) == planner.MAX_BATCH and fits(64 * GIB, most=40) == 40
    assert [fits(g * GIB) for g in (1, 2, 4, 8)] == sorted(fits(g * GIB) for g in (1, 2, 4, 8))
