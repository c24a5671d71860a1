"""Step 1 (supervised fine-tuning) options: every default in one place, with its help text."""
from dataclasses import dataclass
from typing import ClassVar

from utils.options import (DataOptions, DeepSpeedOptions, LoggingOptions, LoraOptions, ModelOptions, TrainOptions,
                           check_common, opt)


@dataclass
class SFTConfig(DataOptions, ModelOptions, TrainOptions, DeepSpeedOptions, LoraOptions, LoggingOptions):
    """Step 1: fine-tune a causal LM on prompt + chosen response (loss on the response by default)."""
    stage_name: ClassVar[str] = "step1_sft"
    data_split_index: ClassVar[int] = 0

    train_on_prompt: bool = opt(False, "Also put the loss on prompt tokens (DeepSpeed-Chat's behaviour).")
    compare_before: bool = opt(True, "Evaluate once before training so the summary shows before -> after.")

    def validate(self):
        check_common(self)
