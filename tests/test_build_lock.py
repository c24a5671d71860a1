"""Stale build locks (issue 19 point 1): removed when their builder is gone, named when it cannot be told."""
import os
import shutil
import subprocess
import sys
import time

from utils.build_lock import clear_stale_locks, find_locks, judge

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP = "deepspeed_shm_comm"  # the op DeepSpeed JIT-builds for its CPU backend (init_distributed loads it)


def plant_lock(root, op=OP, age=600.0):
    build = os.path.join(root, op)
    os.makedirs(build, exist_ok=True)
    lock = os.path.join(build, "lock")
    open(lock, "w").close()
    old = time.time() - age
    for path in [lock, build] + [os.path.join(build, n) for n in os.listdir(build)]:
        os.utime(path, (old, old))
    return lock


def test_stale_lock_removed_with_one_line(tmp_path):
    lock = plant_lock(str(tmp_path))
    lines = []
    assert clear_stale_locks(lines.append, roots=[str(tmp_path)]) == [lock]
    assert not os.path.exists(lock)
    assert lines == [f"removed a stale build lock left by a killed run: {lock} (no process holds it and its build "
                     f"dir is unchanged for {lines[0].split('unchanged for ')[1]}"]


def test_lock_held_by_a_live_builder_is_kept(tmp_path):
    lock = plant_lock(str(tmp_path))
    fd = os.open(lock, os.O_RDONLY)  # what torch's FileBaton does: the builder keeps the descriptor open
    try:
        lines = []
        assert clear_stale_locks(lines.append, roots=[str(tmp_path)]) == []
        assert os.path.exists(lock) and f"process {os.getpid()} is building it" in lines[0]
    finally:
        os.close(fd)


def test_recent_unheld_lock_is_named_with_the_command_that_clears_it(tmp_path):
    lock = plant_lock(str(tmp_path), age=0)
    lines = []
    t = time.time()
    assert clear_stale_locks(lines.append, roots=[str(tmp_path)]) == []
    assert time.time() - t < 10 and os.path.exists(lock)
    assert len(lines) == 1 and lines[0].startswith(f"a build lock may block this start: {lock}")
    assert lines[0].endswith(f"clear it with: rm -f {lock}")
    assert judge(lock, now=time.time() + 3600)[0] == "stale"  # the same lock, an hour later


def test_torch_extensions_dir_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = plant_lock(str(tmp_path), op="cpu_adam")
    assert find_locks() == [lock]


def _built_op_dir():
    """A built copy of the op, so the stage below does not compile it (a minute on a busy machine)."""
    import glob
    found = glob.glob(os.path.expanduser(f"~/.cache/torch_extensions/*/{OP}/{OP}.so"))
    return os.path.dirname(found[0]) if found else None


def test_stage_starts_despite_a_stale_lock(tmp_path, tiny_model_dir):
    ext = tmp_path / "ext"
    built = _built_op_dir()
    if built:
        shutil.copytree(built, ext / OP, ignore=shutil.ignore_patterns("lock"))  # copy2 keeps mtimes: no rebuild
    lock = plant_lock(str(ext))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"prompt": "q{i}", "response": "a{i}"}}\n' for i in range(8)))
    argv = ["step1_sft/main.py", "--model_name_or_path", tiny_model_dir, "--data_path", str(data), "--data_split",
            "1,0,0", "--output_dir", str(tmp_path / "out"), "--max_seq_len", "32", "--per_device_train_batch_size",
            "4", "--dtype", "fp32", "--max_steps", "1", "--threads", "1", "--disable_progress_bar", "--eval_fraction",
            "0"]
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)}
    r = subprocess.run([sys.executable] + argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # on a stale lock without the check: a hang
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert f"removed a stale build lock left by a killed run: {lock}" in out
    assert os.path.exists(tmp_path / "out" / "config.json")
