"""bench/countdown_algorithms.py (the once-only test measurement, the per-step sample count) and
countdown_pass_at_k.py (pass@k), countdown_failures.py (failure classes): no model runs."""
import json
import os
import types

from bench import countdown_algorithms as bench


def test_test_once_pairs_each_run_with_the_warm_start(tmp_path, monkeypatch):
    data = tmp_path / "data" / "countdown"
    data.mkdir(parents=True)
    tasks = [{"target": 10 + i, "nums": [1, 2, 3]} for i in range(4)] + [{"target": 5, "nums": [1, 2, 3, 4]}]
    (data / "test.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    flags = {"/ws": [1, 0, 0, 1], "r/actor": [1, 1, 0, 1]}  # per model: right on which of the 4 3-number tasks
    seen = []

    def fake_run_child(cmd, log_path):
        model, tests, out = cmd[4], cmd[5], cmd[6]
        seen.append(model)
        assert sum(1 for _ in open(tests)) == 4  # the 4-number task is not a 3-number test task
        c = flags["/ws" if model == "/ws" else "r/actor"]
        with open(out, "w") as f:
            json.dump({"accuracy": sum(c) / 4, "format_rate": 1.0, "mean_response_tokens": 50.0,
                       "correct_per_task": c}, f)
        return 1.0, 1

    monkeypatch.setattr(bench, "run_child", fake_run_child)
    args = types.SimpleNamespace(test_after=10, data_dir=str(tmp_path / "data"), eval_batch=2, threads=1)
    work = tmp_path / "work"
    work.mkdir()
    runs = {"r": {"algo": "grpo"}, "broken": {"algo": "grpo", "failed": "x"}}
    report = bench.test_once(args, "/ws", runs, str(work))
    assert report["n"] == 4 and report["warm_start"]["accuracy"] == 0.5
    r = report["runs"]["r"]
    assert r["accuracy"] == 0.75 and r["gain"] == 0.25  # (0 + 1 + 0 + 0) / 4, by hand
    assert r["gain_ci95"][0] <= 0.25 <= r["gain_ci95"][1] and "broken" not in report["runs"]
    bench.test_once(args, "/ws", runs, str(work))  # a second call reads the kept results
    assert seen == ["/ws", os.path.join(str(work), "r", "actor")]


def test_samples_per_step_follow_the_runs_generation_batch(tmp_path):
    history = [{"time/generation": 1.0, "reward/mean": 0.5, "dynamic_sampling/refill_rounds": 1},
               {"time/generation": 1.0, "reward/mean": 0.5}]
    summary = {"history": history, "before": {"full_marks": {"countdown": 0.2}},
               "after": {"full_marks": {"countdown": 0.3, "format": 1.0}, "samples": []}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    flags = ["--per_device_generation_batch_size", "8"]
    result = bench.summarize_run(str(tmp_path), "grpo", flags, 10.0, 100)
    assert result["samples_per_second"] == (8 * 8 * 2 + 8 * 8) / 2.0  # a refill round samples a batch again
    assert bench.summarize_run(str(tmp_path), "grpo", [], 10.0, 100)["samples_per_second"] == (32 * 2 + 32) / 2.0


def test_pass_at_k_by_hand():
    from bench.countdown_pass_at_k import pass_at_k
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 8, 1) == 1.0
    assert abs(pass_at_k(8, 1, 1) - 1 / 8) < 1e-12  # pass@1 is the share of right samples
    assert pass_at_k(8, 1, 8) == 1.0  # every draw of 8 from 8 holds the right one
    assert abs(pass_at_k(8, 2, 2) - (1 - 15 / 28)) < 1e-12  # 1 - C(6,2)/C(8,2)


def test_failure_classes_by_hand():
    """bench/countdown_failures.py on answers written by hand: one right answer to its own task, then wrong ones for
    nums [14, 4, 14], target 49 (reached by 14 / 4 * 14, which none of them writes)."""
    from bench.countdown_failures import classify, summarize, task_of
    assert classify(" 6 + 3 = 9. 9 - 2 = 7. That reaches 7. </think> <answer>(6 + 3) - 2</answer>", [6, 3, 2], 7) \
        == "right"
    nums, target = [14, 4, 14], 49
    assert classify(" 14 + 4 = 18. 18 + 14 = 32. 32 + 14 = 4", nums, target) == "no_answer"  # cut off, no tags
    # an earlier failed try with a false step does not count: only the last attempt (after ", not N.") is read
    made_up = " 14 + 4 = 19. 19 + 14 = 33, not 49. 14 * 4 = 56. 56 - 14 = 49. That reaches 49. </think> " \
              "<answer>(14 * 4) - 14</answer>"
    assert classify(made_up, nums, target) == "false_step"
    honest_miss = " 14 * 4 = 56. 56 - 14 = 42. That reaches 49. </think> <answer>(14 * 4) - 14</answer>"
    assert classify(honest_miss, nums, target) == "true_steps_miss"
    assert classify(" 14 / 0 = 49. </think> <answer>14 / 4 + 14</answer>", nums, target) == "false_step"
    # the last try was rejected ("not 49") and no new one follows: the claim is about no step at all
    rejected = " 14 + 4 = 18. 18 + 14 = 32, not 49. That reaches 49. </think> <answer>(14 + 4) + 14</answer>"
    assert classify(rejected, nums, target) == "no_step"
    prompt = "Using the numbers [14, 4, 14], create an equation that equals 49. You can use ..."
    assert task_of(prompt) == ([14, 4, 14], 49)
    s = summarize([{"prompt": prompt, "response": made_up}, {"prompt": prompt, "response": honest_miss}])
    assert s["counts"] == {"right": 0, "no_answer": 0, "false_step": 1, "no_step": 0, "true_steps_miss": 1, "other": 0}
    assert s["shares"]["false_step"] == 0.5
