"""Step 2 (pairwise reward model) options: every default in one place, with its help text."""
from dataclasses import dataclass
from typing import ClassVar, Optional

from utils.options import (DataOptions, DeepSpeedOptions, LoggingOptions, LoraOptions, ModelOptions, TrainOptions,
                           check_common, opt, restate)


@dataclass
class RewardConfig(DataOptions, ModelOptions, TrainOptions, DeepSpeedOptions, LoraOptions, LoggingOptions):
    """Step 2: train a scalar reward model on chosen/rejected pairs with -logsigmoid(r_chosen - r_rejected)."""
    stage_name: ClassVar[str] = "step2_reward_model"
    data_split_index: ClassVar[int] = 1

    # Step 2's own defaults, chosen on a dev slice of hh pairs (bench/reward_model_bench.py --eval_on dev):
    # lr 5e-5 + a small random head + linear decay reached 0.655 there (0.634 on the test pairs; the shared
    # defaults 1e-5, zero head, cosine: 0.604). A zero head gives the body no gradient until it has grown.
    learning_rate: float = restate(TrainOptions, "learning_rate", 5e-5,
                                   "Peak learning rate (DeepSpeed-Chat's OPT step-2 scripts use 5e-5 too).")
    lr_scheduler_type: str = restate(TrainOptions, "lr_scheduler_type", "linear")
    center_coef: float = opt(0.0, "Weight of mean((r_c + r_r)^2), which keeps scores centred near 0 so a score's "
                                  "sign means something.")
    head_init_std: float = opt(0.02, "Std of the value head's initial weights (0 = zeros, so every pair starts "
                                     "at a tie and the loss is exactly log 2, but the body learns nothing until the "
                                     "head has grown).", min=0)
    forward_chunk: Optional[int] = opt(
        None, "Sequences per forward pass: a batch's 2B chosen+rejected sequences are sorted by length and run this "
        "many at a time, each chunk cut to its own longest, so short ones skip the longest one's padding (the loss "
        "and its one backward are the same; about 2x faster on CPU for hh-style data). 0 = one padded forward of "
        "the batch. Default: 4 on CPU; 0 on a GPU, as DeepSpeed-Chat (there each extra forward costs launches, and "
        "under ZeRO-3 a gather of every weight, more than the padding saves). Under ZeRO-3 the training forward "
        "is always one (0): several forwards before one backward break ZeRO-3's prefetch trace once weights are "
        "released between uses, as on large models ('tracing error'); evaluation forwards still chunk.", min=0)
    head_learning_rate: float = opt(0.0, "Learning rate of the value head (0 = --learning_rate). With a zero head "
                                         "(--head_init_std 0) the body gets no gradient until the head has grown; a "
                                         "larger head rate (e.g. 1e-3) gets it learning sooner.", min=0)
    num_frozen_layers: int = opt(0, "Freeze the embeddings and this many of the lowest transformer blocks (backward "
                                    "stops above them: faster steps, fewer trained weights).", min=0)
    score_offset: int = opt(0, "Where the score is read: 0 = the last non-pad token (the EOS / end-of-turn token "
                               "closing every reply); 1 = the token before it (the reply's last word).",
                            choices=[0, 1])
    loss_positions: str = opt("score", "Where the pairwise loss -log sigmoid(chosen - rejected) is taken: score = "
                                       "at the score token only; divergence = at every position from where the two "
                                       "replies first differ to the end of the longer one, averaged (DeepSpeed-Chat's "
                                       "RewardModel loss; a shorter reply's value is held at its score past its end; "
                                       "on hh dev pairs 0.60 against 0.655 for score).",
                              choices=["score", "divergence"])
    lm_loss_coef: float = opt(0.0, "Weight of the chosen sequences' next-token loss, added to the pairwise loss: "
                                    "the LM head (the input embeddings, tied) reads the hidden states the value head "
                                    "reads, so the body stays a language model while it learns to rank (the SFT "
                                    "regulariser of GRM, Yang et al. 2024). Needs tied embeddings. 0 = off (on hh "
                                    "dev pairs 0.1 gave 0.64 against 0.655 without).", min=0)
    chat_template: str = opt("auto", "auto = the tokenizer's chat template when it has one; none = DeepSpeed-Chat's "
                                      "hh text (' Human: ... Assistant:') even for a chat model.",
                             choices=["auto", "none"])
    eval_scores_path: str = opt("", "Also write every eval pair's chosen/rejected score here as JSON Lines.")
    compare_before: bool = opt(True, "Evaluate once before training so the summary shows before -> after.")

    def chunk_for(self, device_type: str, training: bool = False) -> int:
        """--forward_chunk, or its default for the device the stage runs on; 0 for a ZeRO-3 training forward."""
        if training and self.zero_stage == 3:
            return 0
        if self.forward_chunk is not None:
            return self.forward_chunk
        return 4 if device_type == "cpu" else 0

    def validate(self):
        check_common(self)
