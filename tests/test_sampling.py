"""TSN segment centres and the 5-frame window (official semantics, 0-based)."""

import numpy as np
import pytest

from pipelines import sampling


def test_train_centres_fall_in_their_segments():
    rng = np.random.default_rng(0)
    ticks = [0, 7, 15, 22, 30]  # i*n//T for n=30, T=4
    hits = np.zeros(30, dtype=int)
    for _ in range(400):
        centres = sampling.train_centres(30, 4, rng)
        for i, c in enumerate(centres):
            assert ticks[i] <= c < ticks[i + 1]
        hits[centres] += 1
    assert (hits > 0).all()  # uniform over each segment: every frame gets drawn


def test_train_centres_short_video_uses_every_frame_then_random_extras_sorted():
    rng = np.random.default_rng(1)
    for _ in range(20):
        centres = sampling.train_centres(3, 8, rng)
        assert len(centres) == 8 and (np.diff(centres) >= 0).all()
        assert set(centres) == {0, 1, 2}
    np.testing.assert_array_equal(sampling.train_centres(4, 4, rng), [0, 1, 2, 3])


def test_val_centres_formula():
    # seg = 29/4 = 7.25: round(7.25*i) = 0, 7, 14, 22 (half to even), + int(3.625) = 3
    np.testing.assert_array_equal(sampling.val_centres(30, 4), [3, 10, 17, 25])
    np.testing.assert_array_equal(sampling.val_centres(1, 3), [0, 0, 0])


def test_test_centres_k_clips():
    # shifts int(7.25/3*1) = 2 and int(7.25/3*2) = 4
    np.testing.assert_array_equal(sampling.test_centres(30, 4, 2), [[2, 9, 16, 24], [4, 11, 18, 26]])
    np.testing.assert_array_equal(sampling.test_centres(30, 4, 1)[0], sampling.val_centres(30, 4))


def test_window_clamps_at_both_ends():
    np.testing.assert_array_equal(sampling.window(np.array([0, 15, 29]), 30),
                                  [[0, 0, 0, 1, 2], [13, 14, 15, 16, 17], [27, 28, 29, 29, 29]])
    assert sampling.window(sampling.test_centres(30, 8, 3), 30).shape == (3, 8, 5)


@pytest.mark.parametrize("bad", [dict(num_frames=0, num_segments=8), dict(num_frames=10, num_segments=0)])
def test_bad_arguments_name_the_problem(bad):
    with pytest.raises(ValueError, match="num_frames|num_segments"):
        sampling.val_centres(**bad)
