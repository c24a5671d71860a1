"""Step 2 by DPO (instead of a reward model + step 3) options: every default in one place, with its help text."""
from dataclasses import dataclass
from typing import ClassVar

from utils.options import (ConfigError, DataOptions, DeepSpeedOptions, LoggingOptions, LoraOptions, ModelOptions,
                           TrainOptions, check_common, opt)


@dataclass
class DPOConfig(DataOptions, ModelOptions, TrainOptions, DeepSpeedOptions, LoraOptions, LoggingOptions):
    """Step 2 by DPO: train the step-1 model on chosen/rejected pairs against a frozen copy of itself (the
    reference); no reward model and no RL step (DeepSpeed-Chat's step2_dpo_finetuning)."""
    stage_name: ClassVar[str] = "step2_dpo"
    data_split_index: ClassVar[int] = 1  # the pairs of step 2's --data_split share, as upstream

    beta: float = opt(0.1, "DPO temperature: the implicit reward of a reply is beta * (log pi - log pi_ref); "
                           "smaller keeps the policy looser from the reference (typically 0.1-0.5).",
                      min_exclusive=0)
    loss_type: str = opt("sigmoid", "sigmoid = DPO's -log sigmoid(beta h) (with --label_smoothing > 0 it is cDPO, "
                                    "as DeepSpeed-Chat's); cdpo = the conservative, label-smoothed loss (needs "
                                    "--label_smoothing > 0); ipo = (h - 1/(2 beta))^2 on per-token mean log-probs.",
                         choices=["sigmoid", "ipo", "cdpo"])
    label_smoothing: float = opt(0.0, "cDPO: the assumed probability that a pair's label is flipped (0 = plain "
                                      "DPO).", min=0, max_exclusive=0.5)
    reference_free: bool = opt(False, "No reference model: its log-probs are taken as 0 (saves its memory and "
                                      "forward; the policy is then not held near the step-1 model).")
    offload_reference_model: bool = opt(False, "Keep the reference model's parameters on CPU (ZeRO-3 offload; "
                                               "needs --zero_stage 3). The reference is sharded by ZeRO-3 when "
                                               "the policy is, else held whole on each process, as upstream.")
    logprob_chunk: int = opt(128, "Positions per chunk when log-probs are read from the logits: the fp32 copy is "
                                  "at most [rows, chunk, vocabulary] (0 = all positions at once).", min=0)
    chat_template: str = opt("auto", "auto = the tokenizer's chat template when it has one; none = DeepSpeed-Chat's "
                                      "hh text (' Human: ... Assistant:') even for a chat model.",
                             choices=["auto", "none"])
    compare_before: bool = opt(True, "Evaluate once before training so the summary shows before -> after.")

    def validate(self):
        check_common(self)
        if self.loss_type == "cdpo" and not self.label_smoothing:
            raise ConfigError("--loss_type cdpo needs --label_smoothing > 0 (at 0 it is plain DPO: --loss_type "
                              "sigmoid)")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ConfigError("--label_smoothing applies to --loss_type sigmoid/cdpo; IPO has none")
        if self.offload_reference_model and (self.zero_stage != 3 or self.reference_free):
            raise ConfigError("--offload_reference_model needs --zero_stage 3 and a reference model (DeepSpeed "
                              "offloads the parameters of a frozen model only under ZeRO-3)")
