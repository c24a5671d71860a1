"""The one option definition: ranges carried by `opt()`, the actor/critic role table, stage identity declared by
each stage config, tool configs parsed like stage configs, and the ZeRO stage read from the engine."""
import math
import os
import re
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from step1_sft.config import SFTConfig
from step2_reward_model.config import RewardConfig
from step3_rlhf.config import RLHFConfig
from utils.models import zero_stage_of
from utils.options import ConfigError, build_parser, check_fields, opt, parse_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Ranged:
    count: int = opt(1, "at least one", min=1)
    rate: float = opt(0.5, "non-negative", min=0)
    share: float = opt(0.1, "a share", min=0, max_exclusive=1)
    temperature: float = opt(1.0, "strictly positive", min_exclusive=0)
    cap: Optional[int] = opt(None, "unset is fine", min=0)
    name: str = opt("x", "no range")


@pytest.mark.parametrize("field,value,message", [
    ("count", 0, "--count must be >= 1, got 0"),
    ("rate", -0.1, "--rate must be >= 0, got -0.1"),
    ("rate", math.nan, "--rate must be >= 0, got nan"),
    ("share", 1.0, "--share must be in [0, 1), got 1.0"),
    ("share", -0.5, "--share must be in [0, 1), got -0.5"),
    ("temperature", 0.0, "--temperature must be > 0, got 0.0"),
    ("temperature", math.nan, "--temperature must be > 0, got nan"),
    ("cap", -1, "--cap must be >= 0, got -1"),
])
def test_opt_ranges_are_checked_for_every_field(field, value, message):
    cfg = Ranged(**{field: value})
    with pytest.raises(ConfigError) as err:
        check_fields(cfg)
    assert str(err.value) == message


def test_opt_ranges_accept_their_bounds():
    check_fields(Ranged(count=1, rate=0.0, share=0.0, temperature=1e-9, cap=None))
    check_fields(Ranged(cap=0))


def test_config_without_validate_gets_field_checks(capsys):
    assert parse_config(Ranged, ["--count", "3"]).count == 3
    with pytest.raises(SystemExit) as e:
        parse_config(Ranged, ["--count", "0"])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == "error: --count must be >= 1, got 0"


def test_positional_and_required_fields():
    @dataclass
    class Tool:
        files: list = opt([], "inputs", positional=True)
        out: str = opt("", "where", required=True)

    parser = build_parser(Tool)
    args = parser.parse_args(["a", "b", "--out", "o"])
    assert args.files == ["a", "b"] and args.out == "o"
    with pytest.raises(SystemExit):
        parser.parse_args(["a"])  # --out missing


def test_role_table_builds_deepspeed_chat_pairs():
    cfg = parse_config(RLHFConfig, ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c",
                                    "--critic_lora_dim", "4", "--actor_gradient_checkpointing"])
    assert (cfg.actor_learning_rate, cfg.critic_learning_rate) == (9.65e-6, 5e-6)  # DeepSpeed-Chat's defaults
    assert cfg.critic_lora_dim == 4 and cfg.actor_lora_dim == 0
    assert cfg.actor_gradient_checkpointing and not cfg.critic_gradient_checkpointing
    flags = build_parser(RLHFConfig)._option_string_actions
    for name in ("learning_rate", "weight_decay", "zero_stage", "gradient_checkpointing", "dropout", "lora_dim",
                 "lora_module_name", "lora_learning_rate"):
        assert f"--actor_{name}" in flags and f"--critic_{name}" in flags
    assert "(and reward model)" in flags["--critic_zero_stage"].help
    with pytest.raises(SystemExit):
        parse_config(RLHFConfig, ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c",
                                  "--actor_learning_rate", "-1"])


def test_each_stage_config_declares_its_identity():
    assert [(c.stage_name, c.data_split_index) for c in (SFTConfig, RewardConfig, RLHFConfig)] == \
        [("step1_sft", 0), ("step2_reward_model", 1), ("step3_rlhf", 2)]
    rl = RLHFConfig(actor_model_name_or_path="a", critic_model_name_or_path="c", task="countdown",
                    reward=["countdown"])
    assert not rl.uses_data_split() and SFTConfig().uses_data_split()
    assert rl.model_locations() == [("actor_model_name_or_path", "a"), ("critic_model_name_or_path", "c")]


def test_shared_layer_imports_no_stage():
    stage = re.compile(r"^\s*(from|import)\s+step\d", re.M)
    for root, _, names in os.walk(os.path.join(REPO, "utils")):
        for name in names:
            if name.endswith(".py"):
                with open(os.path.join(root, name)) as f:
                    assert not stage.search(f.read()), os.path.join(root, name)


def test_zero_stage_read_from_the_model():
    plain = torch.nn.Linear(2, 2)
    assert zero_stage_of(plain) == 0
    plain.weight.ds_id = 0  # what ZeRO-3 partitioning leaves on every parameter
    assert zero_stage_of(plain) == 3

    class Engine(torch.nn.Module):
        def zero_optimization_stage(self):
            return 2

    assert zero_stage_of(Engine()) == 2
