"""Segment centres of both official schemes and the 5-frame window (official semantics, 0-based)."""

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


def test_window_can_wrap_its_start_to_the_end_as_the_official_video_path():
    # decord's video_list[p - 1] with p from centre - 1: indices -2, -1 are the last two frames
    np.testing.assert_array_equal(sampling.window(np.array([0, 1, 29]), 30, wrap_start=True),
                                  [[28, 29, 0, 1, 2], [29, 0, 1, 2, 3], [27, 28, 29, 29, 29]])
    np.testing.assert_array_equal(sampling.window(np.array([0]), 1, wrap_start=True), [[0, 0, 0, 0, 0]])


@pytest.mark.parametrize("bad", [dict(num_frames=0, num_segments=8), dict(num_frames=10, num_segments=0)])
def test_bad_arguments_name_the_problem(bad):
    with pytest.raises(ValueError, match="num_frames|num_segments"):
        sampling.val_centres(**bad)


def test_kinetics_val_and_test_centres_are_the_official_segment_starts():
    # n=300, T=8: tick 37.5; val int(37.5*i); 4 test clips start at linspace(0, 36.5, 4) -> 0, 12, 24, 36
    val = [0, 37, 75, 112, 150, 187, 225, 262]
    np.testing.assert_array_equal(sampling.kinetics_val_centres(300, 8), val)
    test = sampling.kinetics_test_centres(300, 8, 4)
    np.testing.assert_array_equal(test[:, 0], [0, 12, 24, 36])
    np.testing.assert_array_equal(test[1], [12, 49, 87, 124, 162, 199, 237, 274])
    np.testing.assert_array_equal(test[0], val)


def test_kinetics_train_centres_cover_each_rounded_segment_with_both_ends():
    # n=30, T=4: seg 7.25, bounds round(7.25*i) = 0, 7, 14, 22, 29; segment i draws from [b_i, b_{i+1}]
    rng = np.random.default_rng(2)
    bounds = [0, 7, 14, 22, 29]
    seen = [set() for _ in range(4)]
    for _ in range(600):
        for i, c in enumerate(sampling.kinetics_train_centres(30, 4, rng)):
            seen[i].add(int(c))
    assert seen == [set(range(bounds[i], bounds[i + 1] + 1)) for i in range(4)]


def test_kinetics_test_starts_truncate_toward_zero_for_videos_shorter_than_t():
    # n=2, T=3: starts linspace(0, -1/3, 2) = [0, -0.33] -> [0, 0] (numpy 2's integer linspace would floor to -1)
    np.testing.assert_array_equal(sampling.kinetics_test_centres(2, 3, 2), [[0, 0, 1], [0, 0, 1]])


@pytest.mark.parametrize("num_frames", [1, 3, 8, 30, 301])
def test_kinetics_short_videos_stay_in_range(num_frames):
    rng = np.random.default_rng(3)
    for centres in (sampling.kinetics_train_centres(num_frames, 8, rng), sampling.kinetics_val_centres(num_frames, 8),
                    sampling.kinetics_test_centres(num_frames, 8, 3)):
        assert centres.min() >= 0 and centres.max() < num_frames


def test_clip_centres_picks_the_scheme_and_split():
    rng = np.random.default_rng(4)
    np.testing.assert_array_equal(sampling.clip_centres("kinetics", "val", 300, 8), [sampling.kinetics_val_centres(300, 8)])
    np.testing.assert_array_equal(sampling.clip_centres("something", "val", 300, 8), [sampling.val_centres(300, 8)])
    assert sampling.clip_centres("kinetics", "test", 300, 8, 3).shape == (3, 8)
    assert sampling.clip_centres("something", "train", 300, 8, rng=rng).shape == (1, 8)
    with pytest.raises(ValueError, match="sampling must be one of"):
        sampling.clip_centres("tsn", "val", 300, 8)
