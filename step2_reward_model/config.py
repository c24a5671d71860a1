"""Step 2 (pairwise reward model) options: every default in one place, with its help text."""
from dataclasses import dataclass

from utils.options import (DataOptions, DeepSpeedOptions, LoggingOptions, LoraOptions, ModelOptions, TrainOptions,
                           check_common, opt)


@dataclass
class RewardConfig(DataOptions, ModelOptions, TrainOptions, DeepSpeedOptions, LoraOptions, LoggingOptions):
    """Step 2: train a scalar reward model on chosen/rejected pairs with -logsigmoid(r_chosen - r_rejected)."""

    center_coef: float = opt(0.0, "Weight of mean((r_c + r_r)^2), which keeps scores centred near 0 so a score's "
                                  "sign means something.")
    head_init_std: float = opt(0.0, "Std of the value head's initial weights (0 = zeros, so every pair starts "
                                    "at a tie and the loss is exactly log 2).")
    compare_before: bool = opt(True, "Evaluate once before training so the summary shows before -> after.")

    def validate(self):
        check_common(self)
