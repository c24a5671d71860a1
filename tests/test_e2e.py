"""e2e_rlhf.py with a fake preset per step (no training): order, a log per step, resume from the step that
did not finish, --force, --dry_run passed on, a failed step's exit code, and --step2-algo dpo."""
import os
import stat

import pytest

import e2e_rlhf

FAKE = """#!/usr/bin/env bash
echo "step STEP args: $*"
echo "STEP $*" >> "{calls}"
if [ -e "{fail_dir}/failSTEP" ]; then echo "step STEP broke" >&2; exit 7; fi
"""


@pytest.fixture
def fake_presets(tmp_path, monkeypatch):
    calls, fail_dir = tmp_path / "calls.txt", tmp_path / "fail"
    fail_dir.mkdir()
    scripts = {}
    for key in ("1", "2", "3", "dpo"):  # DPO's preset records itself as "dpo"
        path = tmp_path / f"fake{key}.sh"
        path.write_text(FAKE.replace("STEP", key).format(calls=calls, fail_dir=fail_dir))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
        scripts[key] = str(path)
    seen = []

    def preset(step, deployment, family, algo="rm"):
        seen.append((step, deployment, family))
        return scripts["dpo" if step == 2 and algo == "dpo" else str(step)]
    monkeypatch.setattr(e2e_rlhf, "preset_script", preset)

    def read_calls():
        return calls.read_text().splitlines() if calls.exists() else []
    return read_calls, fail_dir, seen


def test_runs_steps_in_order_with_logs(fake_presets, tmp_path, capsys):
    read_calls, _, seen = fake_presets
    out = tmp_path / "out"
    rc = e2e_rlhf.main(["--step", "3", "1", "2", "--actor-model", "meta-llama/Llama-2-7b-hf", "--deployment-type",
                        "single_node", "--actor-zero-stage", "3", "--output-dir", str(out)])
    assert rc == 0
    assert [c.split()[0] for c in read_calls()] == ["1", "2", "3"]
    assert {s[2] for s in seen} == {"llama"} and {s[1] for s in seen} == {"single_node"}
    step1 = read_calls()[0].split()
    assert step1[1:3] == [str(out / "step1"), "3"] and "meta-llama/Llama-2-7b-hf" in step1
    for step in (1, 2, 3):
        assert f"step {step} args:" in (out / "logs" / f"step{step}.log").read_text()
    printed = capsys.readouterr().out
    assert "wall time per step" in printed and "what changed" in printed


def test_failure_exit_code_and_resume_from_unfinished_step(fake_presets, tmp_path, capsys):
    read_calls, fail_dir, _ = fake_presets
    out = tmp_path / "out"
    argv = ["--deployment-type", "cpu", "--output-dir", str(out)]
    (fail_dir / "fail2").touch()
    assert e2e_rlhf.main(argv) == 7
    assert [c.split()[0] for c in read_calls()] == ["1", "2"]
    assert "step 2 broke" in (out / "logs" / "step2.log").read_text()
    assert "resume from step 2" in capsys.readouterr().err
    (fail_dir / "fail2").unlink()
    assert e2e_rlhf.main(argv) == 0
    assert [c.split()[0] for c in read_calls()] == ["1", "2", "2", "3"]  # step 1 was not run again
    assert "finished before" in capsys.readouterr().out
    assert e2e_rlhf.main(argv + ["--force", "--step", "1"]) == 0
    assert [c.split()[0] for c in read_calls()][-1] == "1"


def test_dry_run_is_passed_on_and_leaves_no_marker(fake_presets, tmp_path):
    read_calls, _, _ = fake_presets
    out = tmp_path / "out"
    assert e2e_rlhf.main(["--deployment-type", "cpu", "--dry_run", "--output-dir", str(out)]) == 0
    calls = read_calls()
    assert len(calls) == 3 and all(c.endswith("--dry_run") for c in calls)
    # step 3 of a pipeline not yet run is planned from the base models instead of missing outputs
    assert "--actor_model_name_or_path smollm2-135m-instruct" in calls[2]
    assert not os.path.exists(e2e_rlhf.marker_path(str(out), 1))


def test_preset_choice_follows_upstream_layout():
    assert e2e_rlhf.model_family("facebook/opt-1.3b") == "opt"
    assert e2e_rlhf.model_family("meta-llama/Llama-2-7b-hf") == "llama"
    assert e2e_rlhf.hub_name("1.3b") == "facebook/opt-1.3b" and e2e_rlhf.hub_name("out/actor") == "out/actor"
    for step in (1, 2, 3):
        for dep in ("single_gpu", "single_node", "multi_node", "cpu"):
            assert os.path.isfile(e2e_rlhf.preset_script(step, dep, "opt"))


def test_dpo_runs_step1_then_step2_dpo_and_no_step3(fake_presets, tmp_path, capsys):
    read_calls, _, _ = fake_presets
    out = tmp_path / "out"
    argv = ["--step2-algo", "dpo", "--deployment-type", "single_gpu", "--actor-zero-stage", "3",
            "--output-dir", str(out)]
    assert e2e_rlhf.main(argv) == 0
    calls = [c.split() for c in read_calls()]
    assert [c[0] for c in calls] == ["1", "dpo"]
    # the step-1 model is DPO's policy (and reference); its ZeRO stage is the actor's
    assert calls[1][1:] == [str(out / "step1"), str(out / "step2_dpo"), "3"]
    assert "args:" in (out / "logs" / "step2_dpo.log").read_text() and not (out / "logs" / "step2.log").exists()
    printed = capsys.readouterr().out
    assert "step 2 (step2_dpo)" in printed and "no step 3" in printed and "what changed" in printed
    assert os.path.exists(e2e_rlhf.marker_path(str(out), 2, "dpo"))
    assert not os.path.exists(e2e_rlhf.marker_path(str(out), 2))  # a later rm run still trains its reward model
    assert e2e_rlhf.main(argv) == 0  # resume: both finished, nothing reruns
    assert len(read_calls()) == 2 and "finished before" in capsys.readouterr().out
    assert e2e_rlhf.main(argv + ["--step", "2", "--force"]) == 0
    assert [c.split()[0] for c in read_calls()] == ["1", "dpo", "dpo"]


def test_dpo_dry_run_on_cpu_plans_from_the_base_model(fake_presets, tmp_path, capsys):
    read_calls, _, _ = fake_presets
    out = tmp_path / "out"
    assert e2e_rlhf.main(["--step2-algo", "dpo", "--deployment-type", "cpu", "--dry_run", "--actor-zero-stage", "2",
                          "--output-dir", str(out)]) == 0
    calls = read_calls()
    assert [c.split()[0] for c in calls] == ["1", "dpo"] and all(c.endswith("--dry_run") for c in calls)
    dpo = calls[1].split()[1:]
    assert dpo[:2] == [str(out / "step1"), str(out / "step2_dpo")]  # demo.sh takes STEP1_DIR OUTPUT_DIR
    assert "--model_name_or_path smollm2-135m-instruct" in calls[1] and "--zero_stage 2" in calls[1]
    assert not os.path.exists(e2e_rlhf.marker_path(str(out), 2, "dpo"))
    assert "no step 3" in capsys.readouterr().out


def test_dpo_rejects_step3_and_a_reward_model(capsys):
    with pytest.raises(SystemExit):
        e2e_rlhf.parse_args(["--step2-algo", "dpo", "--step", "1", "2", "3"])
    assert "no step 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        e2e_rlhf.parse_args(["--step2-algo", "dpo", "--reward-model", "facebook/opt-350m"])
    assert e2e_rlhf.parse_args([]).step == [1, 2, 3] and e2e_rlhf.parse_args(["--step2-algo", "dpo"]).step == [1, 2]


def test_dpo_presets_exist_for_every_deployment():
    for dep in ("single_gpu", "single_node", "multi_node", "cpu"):
        for family in ("opt", "llama"):
            script = e2e_rlhf.preset_script(2, dep, family, "dpo")
            assert os.path.isfile(script) and "step2_dpo" in script
