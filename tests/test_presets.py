"""Every preset under */training_scripts/ starts: run each script with `deepspeed`/`python` replaced by a shim
that records its argv, then parse and validate that argv with the stage's own config (no model, no data, no
training). A preset whose options the stage rejects would otherwise be found by a user after a long queue wait."""
import glob
import os
import re
import stat
import subprocess

import pytest

from step1_sft.config import SFTConfig
from step2_dpo.config import DPOConfig
from step2_reward_model.config import RewardConfig
from step3_rlhf.config import RLHFConfig
from tests.conftest import REPO
from utils.options import parse_config

SCRIPTS = sorted(glob.glob(os.path.join(REPO, "step*", "training_scripts", "**", "*.sh"), recursive=True))
CONFIGS = {"step1_sft/main.py": SFTConfig, "step2_reward_model/main.py": RewardConfig,
           "step2_dpo/main.py": DPOConfig, "step3_rlhf/main.py": RLHFConfig}
NOT_A_STAGE = {"step3_rlhf/warm_start.py"}  # data preparation a recipe runs first; it trains nothing

SHIM = """#!/usr/bin/env bash
# records one launch: the argv after the launcher's own options, NUL-separated
n=$(ls "$CAPTURE" | wc -l)
printf '%s\\0' "$(basename "$0")" "$@" > "$CAPTURE/$(printf %03d "$n")"
"""


def captured_launches(script, tmp_path, extra_args=()):
    """[(program, argv)] the script would have started (its required positional arguments filled in)."""
    shims, capture, work = tmp_path / "bin", tmp_path / "capture", tmp_path / "work"
    for d in (shims, capture, work):
        d.mkdir(parents=True)
    for name in ("deepspeed", "python", "python3"):
        (shims / name).write_text(SHIM)
        (shims / name).chmod(stat.S_IRWXU)
    text = open(script).read()
    required = sorted({int(n) for n in re.findall(r"\$\{(\d+):\?", text)})
    args = [str(tmp_path / f"arg{n}") for n in range(1, max(required, default=0) + 1)]
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "CAPTURE": str(capture),
           "HOSTFILE": str(tmp_path / "hostfile")}
    proc = subprocess.run(["bash", script, *args, *extra_args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"{script}: {proc.stderr[-2000:]}"
    launches = []
    for f in sorted(os.listdir(capture)):
        argv = open(capture / f).read().split("\0")[:-1]
        py = next(i for i, a in enumerate(argv) if a.endswith(".py"))  # the launcher's own options come before
        launches.append((os.path.relpath(argv[py], REPO), argv[py + 1:]))
    return launches


def test_every_stage_has_presets():
    names = {os.path.relpath(s, REPO).split(os.sep)[0] for s in SCRIPTS}
    assert names == {"step1_sft", "step2_reward_model", "step2_dpo", "step3_rlhf"}
    assert any("recipes" in s for s in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=[os.path.relpath(s, REPO) for s in SCRIPTS])
def test_preset_options_pass_the_stage_checks(script, tmp_path, capsys):
    launches = captured_launches(script, tmp_path)
    assert launches, f"{script} starts no stage"
    for program, argv in launches:
        if program in NOT_A_STAGE:
            continue
        assert program in CONFIGS, f"{script} runs {program}, which this test does not know"
        try:
            parse_config(CONFIGS[program], argv)
        except SystemExit as e:
            pytest.fail(f"{os.path.relpath(script, REPO)}: {program} rejects its options (exit {e.code}): "
                        f"{capsys.readouterr().err.strip()}")


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_step3_single_node_offloads_the_reference_at_zero3(family, tmp_path):
    script = os.path.join(REPO, "step3_rlhf", "training_scripts", family, "single_node.sh")
    (_, argv), = captured_launches(script, tmp_path, [str(tmp_path / "out"), "3", "3"])
    cfg = parse_config(RLHFConfig, argv)
    assert cfg.actor_zero_stage == 3 and cfg.offload_reference_model
    (_, argv), = captured_launches(script, tmp_path / "again", [])
    assert not parse_config(RLHFConfig, argv).offload_reference_model  # ZeRO-2 default: no offload


def test_a_broken_preset_is_caught(tmp_path, capsys):
    """The check can fail: the old single_node.sh (--offload_reference_model at ZeRO-2) is rejected."""
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/usr/bin/env bash\ndeepspeed "%s/step3_rlhf/main.py" --actor_model_name_or_path a '
                   '--critic_model_name_or_path b --actor_zero_stage 2 --offload_reference_model\n' % REPO)
    (program, argv), = captured_launches(str(bad), tmp_path)
    with pytest.raises(SystemExit):
        parse_config(CONFIGS[program], argv)
    assert "--offload_reference_model needs --actor_zero_stage 3" in capsys.readouterr().err


def test_comments_name_the_zero_stage_the_script_uses():
    """A preset's first comment line says which ZeRO stage it runs; it must be the script's default."""
    for script in SCRIPTS:
        text = open(script).read()
        said = re.findall(r"ZeRO-(\d)", text.splitlines()[1])
        defaults = set(re.findall(r"ZERO_STAGE=\$\{\d+:-(\d)\}", text))
        if said and defaults:
            assert set(said) == defaults, f"{os.path.relpath(script, REPO)}: comment says ZeRO-{said}, " \
                                          f"default {defaults}"
