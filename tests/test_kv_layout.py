"""The ring-cache and mask arithmetic both backends share (arbor_cli/kv_layout.py), on ints and numpy."""

import numpy as np
import pytest

from arbor_core import kv_layout


def test_a_cache_has_as_many_slots_as_positions_unless_the_planner_gives_fewer():
    assert kv_layout.cache_slots(128) == 128
    assert kv_layout.cache_slots(128, 15) == 15
    assert kv_layout.cache_slots(12, 15) == 12  # a context within the ring size is a plain cache


def test_max_chunk_leaves_every_query_its_whole_window():
    assert kv_layout.max_chunk(128, 128, None) == 128
    assert kv_layout.max_chunk(12, 12, 9) == 12
    assert kv_layout.max_chunk(128, 15, 9) == 7  # 15 slots = window 9 + chunk 7 - 1


def test_a_write_that_fits_is_one_span_and_one_that_wraps_is_two():
    assert kv_layout.write_spans(3, 4, 15) == [(3, 7, 0, 4)]
    assert kv_layout.write_spans(18, 4, 15) == [(3, 7, 0, 4)]  # position 18 is slot 3
    assert kv_layout.write_spans(13, 5, 15) == [(13, 15, 0, 2), (0, 3, 2, 5)]
    assert kv_layout.write_spans(0, 15, 15) == [(0, 15, 0, 15)]


def test_a_write_larger_than_the_cache_is_refused():
    with pytest.raises(ValueError, match="a chunk of 16 tokens does not fit a 15-slot cache"):
        kv_layout.write_spans(0, 16, 15)


def test_a_ring_write_moves_the_oldest_position_held():
    assert kv_layout.oldest_held(0, 10, 15) == 0
    assert kv_layout.oldest_held(0, 60, 15) == 45
    assert kv_layout.oldest_held(50, 60, 15) == 50


def test_each_slot_of_a_wrapped_ring_holds_the_latest_position_congruent_to_it():
    slots, end = 15, 60
    got = kv_layout.slot_positions(np.arange(slots), end, slots)
    np.testing.assert_array_equal(got % slots, np.arange(slots))
    assert sorted(got.tolist()) == list(range(end - slots, end))
    assert kv_layout.slot_positions(2, 40, 15) == 32  # ints too


def simulate_ring(writes: list[int], slots: int) -> tuple[np.ndarray, int]:
    """Positions per slot after writing chunks of the given sizes from position 0, by brute force."""
    held, start, oldest = np.full(slots, -1), 0, 0
    for count in writes:
        for a, b, i, j in kv_layout.write_spans(start, count, slots):
            held[a:b] = np.arange(start + i, start + j)
        start += count
        oldest = kv_layout.oldest_held(oldest, start, slots)
    return held, oldest


def test_spans_and_slot_positions_agree_with_a_brute_force_ring():
    rng = np.random.default_rng(0)
    for _ in range(50):
        writes = rng.integers(1, 8, size=rng.integers(3, 20)).tolist()
        held, oldest = simulate_ring(writes, 15)
        end = sum(writes)
        if end > 15:
            np.testing.assert_array_equal(kv_layout.slot_positions(np.arange(15), end, 15), held)
        assert oldest == max(0, end - 15) and held.max() == end - 1


def test_truncate_keeps_what_the_next_query_needs_or_nothing():
    # window 9, a ring holding positions 45..59
    assert kv_layout.kept_length(54, 60, 9, 45) == 54  # the query at 54 needs 46..53: held
    assert kv_layout.kept_length(50, 60, 9, 45) == 0  # it needs 42..49: 42..44 are overwritten
    assert kv_layout.kept_length(80, 60, 9, 45) == 60  # never more than is valid
    assert kv_layout.kept_length(-3, 60, 9, 45) == 0
    assert kv_layout.kept_length(10, 60, None, 45) == 10  # no window: a plain cache keeps any prefix


def test_the_first_visible_key_and_whether_the_window_cuts_in():
    assert kv_layout.first_visible_key(5, None) == 0
    assert kv_layout.first_visible_key(5, 9) == 0 and kv_layout.first_visible_key(20, 9) == 12
    assert not kv_layout.window_cuts_in(None, 100, 0)
    assert not kv_layout.window_cuts_in(9, 8, 0)  # queries up to position 8 see keys 0..8: nothing hidden
    assert kv_layout.window_cuts_in(9, 9, 0)  # the query at 9 no longer sees key 0
    assert not kv_layout.window_cuts_in(9, 9, 1)


def test_visible_is_causal_within_the_window():
    q, k = np.arange(3, 6), np.arange(0, 6)
    np.testing.assert_array_equal(kv_layout.visible(q, k, None), k[None, :] <= q[:, None])
    got = kv_layout.visible(q, k, 2)
    np.testing.assert_array_equal(got, [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]])


def test_visible_takes_a_wrapped_rings_slot_positions():
    slots, end, window = 5, 12, 3
    key_pos = kv_layout.slot_positions(np.arange(slots), end, slots)  # [10, 11, 7, 8, 9]
    got = kv_layout.visible(np.array([11]), key_pos, window)
    np.testing.assert_array_equal(got, [[True, True, False, False, True]])
