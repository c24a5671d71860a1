"""Reliability: kill -9 and resume (each stage), SIGTERM, a crash during a save, broken checkpoints, NaN guards.

The stage runs are real subprocesses (`python stepN/main.py ...`) on a tiny random Llama, CPU fp32. A resumed
run must end with the same weights as an uninterrupted one (max |difference| <= 1e-6 over every tensor).
"""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from safetensors.torch import load_file

from utils.checkpoint import Checkpointer, CheckpointError
from utils.guards import NonFiniteGuard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
ENV.pop("RLHFKIT_INJECT_NAN_AT_STEP", None)


# ---------------------------------------------------------------- helpers


def run(cmd, signal_when=None, sig=signal.SIGKILL, env=None, timeout=240):
    """Run a stage; when the path `signal_when` appears, send `sig`. Returns (returncode, combined log)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if signal_when:
        deadline = time.time() + timeout
        while proc.poll() is None and not os.path.exists(signal_when) and time.time() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(sig)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(errors="replace")


def max_diff(files_a, files_b):
    worst = 0.0
    for fa, fb in zip(files_a, files_b):
        a, b = load_file(fa), load_file(fb)
        assert a.keys() == b.keys()
        worst = max([worst] + [(a[k].double() - b[k].double()).abs().max().item() for k in a])
    return worst


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    from utils.data.synthetic import make_synthetic_preferences, write_jsonl
    d = tmp_path_factory.mktemp("reliability")
    write_jsonl(make_synthetic_preferences(160, seed=5), str(d / "data.jsonl"))
    (d / "ptx.txt").write_text("\n\n".join(f"Paragraph {i}: the fox jumps over the dog." for i in range(20)))
    return {"dir": d, "model": tiny_model_dir, "data": str(d / "data.jsonl"), "ptx": str(d / "ptx.txt")}


def stage_cmd(stage, inputs, out):
    common = ["--data_path", inputs["data"], "--data_split", "1,1,1", "--output_dir", str(out), "--dtype", "fp32",
              "--disable_progress_bar", "--threads", "1", "--seed", "3"]
    sup = ["--model_name_or_path", inputs["model"], "--max_seq_len", "64", "--per_device_train_batch_size", "4",
           "--per_device_eval_batch_size", "16", "--learning_rate", "1e-3", "--no-compare_before",
           "--max_eval_samples", "8", "--dropout", "0.1"]  # dropout: the resumed run must replay its masks
    if stage == 1:
        return [sys.executable, "step1_sft/main.py", "--max_steps", "12", "--save_interval", "3"] + sup + common
    if stage == 2:  # gradient accumulation: DeepSpeed's micro-step counter must line up after resume
        return [sys.executable, "step2_reward_model/main.py", "--max_steps", "8", "--save_interval", "2",
                "--gradient_accumulation_steps", "2"] + sup + common
    return [sys.executable, "step3_rlhf/main.py", "--actor_model_name_or_path", inputs["model"],
            "--critic_model_name_or_path", inputs["model"], "--max_steps", "6", "--save_interval", "2",
            "--max_prompt_seq_len", "48", "--max_answer_seq_len", "8", "--per_device_generation_batch_size", "2",
            "--per_device_training_batch_size", "1", "--actor_learning_rate", "1e-3", "--critic_learning_rate",
            "1e-3", "--enable_ema", "--unsupervised_dataset_name", inputs["ptx"], "--unsup_coef", "0.5",
            "--eval_prompts", "2"] + common


def weights(stage, out):
    return [os.path.join(out, n, "model.safetensors") for n in (["."] if stage < 3 else ["actor", "critic",
                                                                                         "actor_ema"])]


@pytest.fixture(scope="module")
def reference(inputs):
    """Uninterrupted runs, made once per stage and shared by the tests that compare with them."""
    done = {}

    def get(stage):
        if stage not in done:
            out = inputs["dir"] / f"ref{stage}"
            code, log = run(stage_cmd(stage, inputs, out))
            assert code == 0, log[-3000:]
            done[stage] = out
        return done[stage]
    return get


# ---------------------------------------------------------------- kill -9 and resume, SIGTERM


@pytest.mark.parametrize("stage,kill_after", [(1, "step6"), (2, "step4"), (3, "step4")])
def test_sigkill_then_resume_gives_the_same_weights(stage, kill_after, inputs, reference, tmp_path):
    ref = reference(stage)
    out = tmp_path / "run"
    cmd = stage_cmd(stage, inputs, out)
    code, log = run(cmd, signal_when=str(out / "checkpoints" / kill_after))  # the 2nd checkpoint is complete
    assert code == -signal.SIGKILL, log[-2000:]
    assert not os.path.exists(weights(stage, out)[0])  # it really died before the end
    code, log = run(cmd)  # the same command again
    assert code == 0, log[-3000:]
    assert "resuming from" in log
    assert max_diff(weights(stage, ref), weights(stage, out)) <= 1e-6
    if stage == 3:  # the before-table was measured once, before the crash, and reused
        with open(ref / "summary.json") as a, open(out / "summary.json") as b:
            sa, sb = json.load(a), json.load(b)
        assert sa["before"] == sb["before"] and len(sb["history"]) == 6
        assert [h["reward/mean"] for h in sa["history"]] == [h["reward/mean"] for h in sb["history"]]


def test_sigterm_finishes_the_step_saves_and_says_how_to_resume(inputs, reference, tmp_path):
    ref = reference(1)
    out = tmp_path / "run"
    cmd = stage_cmd(1, inputs, out)
    code, log = run(cmd, signal_when=str(out / "checkpoints" / "step3"), sig=signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, log[-2000:]
    line = next(ln for ln in log.splitlines() if "stopped by signal 15" in ln)
    step = int(line.split("after step ")[1].split(";")[0])
    assert 3 <= step < 12 and "Run the same command again to resume" in line
    assert Checkpointer(str(out)).latest()[0] == f"step{step}"  # saved at the step it stopped on
    code, log = run(cmd)
    assert code == 0 and f"(step {step})" in log
    assert max_diff(weights(1, ref), weights(1, out)) <= 1e-6


# ---------------------------------------------------------------- checkpoints: atomic save, pruning, fallback


class FakeEngine:
    """What Checkpointer needs of a DeepSpeed engine: one weight tensor saved with torch.save."""

    def __init__(self, value=0.0, crash_in_save=False):
        self.w = torch.full((3,), float(value))
        self.crash_in_save = crash_in_save

    def save_checkpoint(self, folder, tag, save_latest):
        os.makedirs(os.path.join(folder, tag), exist_ok=True)
        torch.save({"w": self.w}, os.path.join(folder, tag, "mp_rank_00_model_states.pt"))
        if self.crash_in_save:
            os._exit(9)  # the process dies mid-save: no exception handler, no cleanup

    def load_checkpoint(self, folder, tag, **kw):
        self.w = torch.load(os.path.join(folder, tag, "mp_rank_00_model_states.pt"), weights_only=True)["w"]
        return folder, {}


CRASH_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from tests.test_reliability import FakeEngine
from utils.checkpoint import Checkpointer
ck = Checkpointer({out!r}, keep=2)
ck.save({{"model": FakeEngine(1.0)}}, 1, {{"epoch": 0, "next_batch": 1}})
ck.save({{"model": FakeEngine(2.0, crash_in_save=True)}}, 2, {{"epoch": 0, "next_batch": 2}})
"""


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_in_use(tmp_path):
    code = subprocess.run([sys.executable, "-c", CRASH_SCRIPT.format(repo=REPO, out=str(tmp_path))],
                          cwd=REPO, env=ENV).returncode
    assert code == 9
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step1"
    assert not (root / "step2").exists() and (root / ".tmp-step2").exists()  # the half-written one is aside
    ck = Checkpointer(str(tmp_path), keep=2)
    engine = FakeEngine(0.0)
    tag, state, _ = ck.restore({"model": engine})
    assert tag == "step1" and state["next_batch"] == 1 and engine.w.tolist() == [1.0, 1.0, 1.0]
    ck.save({"model": FakeEngine(2.0)}, 2, {"epoch": 0, "next_batch": 2})  # the resumed run saves again
    assert sorted(os.listdir(root)) == ["latest", "step1", "step2"]  # leftover .tmp-step2 cleaned up


def test_save_total_limit_and_no_resume(tmp_path):
    ck = Checkpointer(str(tmp_path), keep=2)
    for step in range(1, 6):
        ck.save({"model": FakeEngine(step)}, step, {"epoch": 0, "next_batch": step})
    assert ck.tags() == ["step5", "step4"]  # --save_total_limit 2
    fresh = Checkpointer(str(tmp_path), keep=2, fresh=True)  # --no_resume: the old run's go at the first save
    fresh.save({"model": FakeEngine(9)}, 1, {"epoch": 0, "next_batch": 1})
    assert fresh.tags() == ["step1"]


def test_a_broken_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    warnings = []
    log = types.SimpleNamespace(info=warnings.append)
    ck = Checkpointer(str(tmp_path), keep=3, log=log)
    for step in (1, 2, 3):
        ck.save({"model": FakeEngine(step)}, step, {"epoch": 0, "next_batch": step})
    pt = tmp_path / "checkpoints" / "step3" / "model" / "ds" / "mp_rank_00_model_states.pt"
    pt.write_bytes(pt.read_bytes()[:-10])  # truncated: the manifest's size no longer matches
    engine = FakeEngine()
    assert ck.restore({"model": engine})[0] == "step2" and engine.w[0].item() == 2.0
    assert "step3 is incomplete or corrupt" in warnings[0]
    pt2 = tmp_path / "checkpoints" / "step2" / "model" / "ds" / "mp_rank_00_model_states.pt"
    pt2.write_bytes(b"\0" * pt2.stat().st_size)  # same size, garbage: fails when loaded
    assert ck.restore({"model": engine})[0] == "step1" and engine.w[0].item() == 1.0
    (tmp_path / "checkpoints" / "step1" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        ck.restore({"model": engine})


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_checkpoint_that_would_run_code_is_refused(protocol, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ck = Checkpointer(str(tmp_path))
    ck.save({"model": FakeEngine(1)}, 1, {"epoch": 0, "next_batch": 1})
    pt = tmp_path / "checkpoints" / "step1" / "model" / "ds" / "mp_rank_00_model_states.pt"
    torch.save({"w": torch.zeros(3), "x": _Exploit()}, str(pt), pickle_protocol=protocol)
    manifest = tmp_path / "checkpoints" / "step1" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["files"]["model/ds/mp_rank_00_model_states.pt"] = pt.stat().st_size
    manifest.write_text(json.dumps(m))  # a consistent-looking, tampered checkpoint
    # protocol 2 (torch's default) is read and the global named; a newer protocol cannot even be checked
    expected = "references posix.system: refusing to unpickle" if protocol == 2 else "no usable checkpoint"
    with pytest.raises(CheckpointError, match=expected):
        ck.restore({"model": FakeEngine()})
    assert not (tmp_path / "PWNED").exists()  # os.system never ran


# ---------------------------------------------------------------- numerical faults


def test_guard_counts_and_stops_in_process(monkeypatch):
    g = NonFiniteGuard(max_bad_steps=2, stage="stageX")
    assert g.check(1, {"loss": torch.tensor(1.0)})
    assert not g.check(2, {"loss": torch.tensor(float("inf"))})  # skipped, 1 in a row
    assert g.check(3, {"loss": torch.tensor(0.5)}) and g.in_a_row == 0 and g.total == 1
    assert not g.check(4, {"policy loss": 1.0, "value loss": float("nan")})
    with pytest.raises(FloatingPointError, match=r"stageX: step 5: 'policy loss' is not finite for 2"):
        g.check(5, {"policy loss": float("nan"), "value loss": float("nan")})
    monkeypatch.setenv("RLHFKIT_INJECT_NAN_AT_STEP", "2:2@value loss")
    g = NonFiniteGuard(max_bad_steps=5, stage="s")
    results = [g.check(2, {"policy loss": 1.0, "value loss": 1.0}) for _ in range(3)]
    assert results == [False, False, True] and g.total == 2


def test_reward_and_kl_guards():
    from step3_rlhf.loop import check_guards
    cfg = types.SimpleNamespace(reward_guard=10.0, kl_guard=5.0)
    check_guards(cfg, {"reward/mean": 1.0, "reward/abs_max": 9.9, "kl/mean": 4.9}, 1)  # under both: no error
    with pytest.raises(FloatingPointError, match=r"step 7: a reward of magnitude 12 is beyond --reward_guard 10"):
        check_guards(cfg, {"reward/mean": 0.0, "reward/abs_max": 12.0}, 7)
    with pytest.raises(FloatingPointError, match=r"step 8: KL to the reference 6 passed --kl_guard 5"):
        check_guards(cfg, {"reward/mean": 0.0, "reward/abs_max": 1.0, "kl/mean": 6.0}, 8)


NAN_ONCE = """
import sys
import torch
sys.path.insert(0, {repo!r})
import step1_sft.main as m
from utils.stage import run_main

class NanGradient(torch.autograd.Function):  # a finite loss whose backward gives NaN gradients
    forward = staticmethod(lambda ctx, x: x.clone())
    backward = staticmethod(lambda ctx, g: g * float("nan"))

orig, calls = m.sft_step, [0]
def sft_step(engine, batch):  # the 3rd micro-batch's loss really is NaN; the 6th one's gradient is
    loss, metrics = orig(engine, batch)
    calls[0] += 1
    if calls[0] == 3:
        loss = loss * float("nan")
    if calls[0] == 6:
        loss = NanGradient.apply(loss)
    return loss, metrics
m.sft_step = sft_step
run_main(m.main, sys.argv[1:])
"""


def test_a_nan_loss_or_gradient_is_skipped_and_counted(inputs, tmp_path):
    cmd = stage_cmd(1, inputs, tmp_path / "run")
    code, log = run([sys.executable, "-c", NAN_ONCE.format(repo=REPO)] + cmd[2:])
    assert code == 0, log[-2000:]
    assert "2 update(s) skipped because the loss or gradient was not finite" in log
    state = load_file(weights(1, tmp_path / "run")[0])
    assert all(torch.isfinite(t).all() for t in state.values())  # the NaN gradient never reached a weight
    with open(tmp_path / "run" / "summary.json") as f:
        assert json.load(f)["steps"] == 12  # the bad micro-batches were replaced, no step lost


def test_consecutive_nan_losses_stop_the_run_naming_stage_step_and_term(inputs, tmp_path):
    cmd = stage_cmd(1, inputs, tmp_path / "run") + ["--max_bad_steps", "2"]
    code, log = run(cmd, env={**ENV, "RLHFKIT_INJECT_NAN_AT_STEP": "5:2"})
    assert code == 3, log[-2000:]
    assert "error: step1_sft: step 5: 'loss' is not finite for 2 update(s) in a row (--max_bad_steps 2)" in log


def test_step3_nan_reward_skips_and_value_loss_nan_stops(inputs, tmp_path):
    # step 1: the reward is NaN -> no update, counted; step 2: the value loss is NaN -> 2 bad in a row -> stop
    cmd = stage_cmd(3, inputs, tmp_path / "run") + ["--max_bad_steps", "2"]
    code, log = run(cmd, env={**ENV, "RLHFKIT_INJECT_NAN_AT_STEP": "1@reward,2@value loss"})
    assert code == 3, log[-2000:]
    assert "error: step3_rlhf: step 2: 'value loss' is not finite for 2 update(s) in a row" in log
