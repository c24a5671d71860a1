"""bench/hh_ppo_judge.py's pure parts: the three disjoint slices and the judge's statistics, checked by hand."""
import pytest

from bench.hh_ppo_judge import compare, split_three


def test_slices_are_disjoint_cover_every_row_and_depend_only_on_the_seed():
    parts = split_three(20, 3, 5, seed=7)
    assert [len(parts[k]) for k in ("heldout", "judge", "pipeline")] == [3, 5, 12]
    assert sorted(parts["heldout"] + parts["judge"] + parts["pipeline"]) == list(range(20))
    assert split_three(20, 3, 5, seed=7) == parts and split_three(20, 3, 5, seed=8) != parts


def test_no_pipeline_rows_left_is_an_error():
    with pytest.raises(SystemExit, match="pipeline rows"):
        split_three(10, 4, 6, seed=0)


def test_means_difference_and_win_rate_with_ties_counting_half():
    # diffs 1, 0, -1, 2: mean 0.5; wins 1, 0.5, 0, 1: 0.625; means 1.5 -> 2.0
    out = compare([0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 5.0])
    assert (out["step1_mean"], out["final_mean"], out["diff_mean"], out["win_rate"], out["n"]) == (1.5, 2.0, 0.5,
                                                                                                   0.625, 4)
    # the bootstrap intervals stay inside what a resample of these four values can give
    assert -1.0 <= out["diff_ci95"][0] <= 0.5 <= out["diff_ci95"][1] <= 2.0
    assert 0.0 <= out["win_rate_ci95"][0] <= 0.625 <= out["win_rate_ci95"][1] <= 1.0


def test_an_actor_that_wins_everywhere_has_a_win_rate_of_one_with_no_spread():
    out = compare([0.1, 0.2, 0.3], [0.2, 0.3, 0.4])
    assert out["win_rate"] == 1.0 and out["win_rate_ci95"] == [1.0, 1.0]
    assert out["diff_mean"] == pytest.approx(0.1) and out["diff_ci95"] == pytest.approx([0.1, 0.1])
