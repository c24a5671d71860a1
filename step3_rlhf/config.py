"""Step 3 (RLHF) options: every PPO/GRPO constant is a documented flag with DeepSpeed-Chat's default."""
from dataclasses import dataclass

from utils.options import ConfigError, DataOptions, LoggingOptions, RunOptions, check_common, opt

ALGOS = ("ppo", "grpo", "rloo", "reinforce")


@dataclass
class RLHFConfig(DataOptions, RunOptions, LoggingOptions):
    """Step 3: PPO (actor, frozen reference, critic, frozen reward model) or a critic-free algorithm."""

    # -- models
    actor_model_name_or_path: str = opt("", "The step-1 model (HF dir / Hub name / 'smollm2-135m-instruct').")
    critic_model_name_or_path: str = opt("", "The step-2 reward model; the critic starts from it and it is the "
                                             "frozen reward model unless --reward says otherwise. With --algo "
                                             "ppo and rule rewards only, it defaults to the actor (TinyZero/veRL: "
                                             "the critic starts from the policy with a fresh value head).")
    tokenizer_name_or_path: str = opt("", "Tokenizer, if not the actor's.")
    reward_tokenizer: str = opt("", "The reward model's tokenizer (default: the reward checkpoint's own). When it "
                                    "differs from the actor's, the actor's samples are decoded and re-tokenised "
                                    "with it (and its chat template) for scoring.")
    trust_remote_code: bool = opt(False, "Allow a Hub model's own Python code to run.")
    algo: str = opt("ppo", "RL algorithm: ppo (critic + GAE), grpo, rloo, reinforce (critic-free).", choices=ALGOS)
    reward: list = opt([], "Reward sources: model:PATH (a step-2 model) and/or rules countdown, gsm8k, format, "
                           "length, package.module:function, each optionally NAME=WEIGHT. Default: "
                           "model:CRITIC_MODEL_NAME_OR_PATH.", nargs="*")
    task: str = opt("preference", "Prompt source: preference data (--data_path), or countdown / gsm8k tasks "
                                  "(--data_path FILE.jsonl [EVAL.jsonl], or 'generate[:N]' for N built-in Countdown "
                                  "tasks, default 2000).",
                    choices=["preference", "countdown", "gsm8k"])
    prompt_style: str = opt("chat", "R1-Zero prompt style for countdown/gsm8k: the chat template or base text.",
                            choices=["chat", "base"])
    # -- generation
    max_prompt_seq_len: int = opt(256, "Prompt tokens kept (left-truncated).")
    max_answer_seq_len: int = opt(256, "Most new tokens per response.")
    min_answer_seq_len: int = opt(0, "Fewest new tokens (EOS suppressed before); benchmarks use = max.")
    per_device_generation_batch_size: int = opt(8, "Prompts per generation batch.")
    per_device_training_batch_size: int = opt(8, "Sequences per PPO micro-batch.")
    generation_batches: int = opt(1, "Generation batches collected before each round of PPO updates.")
    num_generations: int = opt(1, "Samples per prompt (G); GRPO/RLOO/REINFORCE need >= 2.")
    temperature: float = opt(1.0, "Sampling temperature.")
    top_p: float = opt(1.0, "Nucleus sampling.")
    top_k: int = opt(0, "Top-k sampling (0 = off).")
    enable_hybrid_engine: bool = opt(False, "DeepSpeed's hybrid engine for generation (GPU, supported models).")
    inference_tp_size: int = opt(1, "Hybrid engine tensor-parallel size.")
    tp_gather_partition_size: int = opt(8, "Hybrid engine: parameters gathered per partition.")
    release_inference_cache: bool = opt(False, "Hybrid engine: free the inference KV cache after generation.")
    unpin_actor_parameters: bool = opt(False, "Hybrid engine: do not pin actor parameters (saves host memory).")
    # -- PPO / GRPO constants
    ppo_epochs: int = opt(1, "Passes over each round's experience.")
    kl_ctl: float = opt(0.1, "PPO: KL penalty coefficient in the per-token reward.")
    clip_reward_value: float = opt(5.0, "PPO: reward-model score clipped to +-this.")
    cliprange: float = opt(0.2, "Policy ratio clip epsilon.")
    cliprange_value: float = opt(0.2, "Value clip range.")
    gamma: float = opt(1.0, "GAE discount.")
    lam: float = opt(0.95, "GAE lambda.")
    beta: float = opt(0.04, "GRPO/RLOO/REINFORCE: weight of the k3 KL-to-reference loss term (0 = no reference).")
    scale_rewards: bool = opt(True, "GRPO/REINFORCE: divide group advantages by the group std (Dr. GRPO: off).")
    loss_agg: str = opt("", "Loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum-norm "
                            "(Dr. GRPO). Default: token-mean for ppo, seq-mean-token-mean otherwise.",
                        choices=["", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
    whiten_advantages: bool = opt(False, "PPO: whiten advantages per batch (DeepSpeed-Chat does not).")
    # -- per-model training options
    actor_learning_rate: float = opt(9.65e-6, "Actor learning rate.")
    critic_learning_rate: float = opt(5e-6, "Critic learning rate.")
    actor_weight_decay: float = opt(0.0, "Actor AdamW weight decay.")
    critic_weight_decay: float = opt(0.0, "Critic AdamW weight decay.")
    actor_zero_stage: int = opt(0, "Actor (and reference) ZeRO stage.", choices=[0, 1, 2, 3])
    critic_zero_stage: int = opt(0, "Critic (and reward model) ZeRO stage.", choices=[0, 1, 2, 3])
    offload: bool = opt(False, "ZeRO offload of the trained engines' state to CPU.")
    offload_reference_model: bool = opt(False, "Keep the reference model's parameters on CPU (ZeRO-3 offload).")
    offload_reward_model: bool = opt(False, "Keep the reward model's parameters on CPU (ZeRO-3 offload).")
    dtype: str = opt("auto", "bf16 where the device has it, else fp32 (CPU) / fp16 (old GPUs).",
                     choices=["auto", "fp32", "bf16", "fp16"])
    actor_gradient_checkpointing: bool = opt(False, "Gradient checkpointing for the actor (with the critic's: peak "
                                             "RSS 5.4 instead of 5.7-5.8 GB on bench W, about 5% slower).")
    critic_gradient_checkpointing: bool = opt(False, "Gradient checkpointing for the critic.")
    length_groups: int = opt(3, "Scoring and training forwards run the rows of a batch in up to this many groups "
                             "by length, each without its all-padding columns (same numbers, fewer FLOPs; 1 = one "
                             "padded batch).")
    actor_dropout: float = opt(0.0, "Actor dropout (0 keeps old/new log-probs comparable).")
    critic_dropout: float = opt(0.0, "Critic dropout.")
    actor_lora_dim: int = opt(0, "Actor LoRA rank (0 = full).")
    actor_lora_module_name: str = opt("layers.", "Linear layers of the actor that get LoRA.")
    critic_lora_dim: int = opt(0, "Critic LoRA rank.")
    critic_lora_module_name: str = opt("layers.", "Linear layers of the critic that get LoRA.")
    lora_alpha: float = opt(0.0, "LoRA scale numerator (0 = rank).")
    only_optimize_lora: bool = opt(False, "Train only LoRA weights.")
    actor_lora_learning_rate: float = opt(5e-4, "Actor LoRA learning rate.")
    critic_lora_learning_rate: float = opt(5e-4, "Critic LoRA learning rate.")
    reference_from_lora: bool = opt(True, "With actor LoRA: the reference is the actor with adapters off (no "
                                          "second copy in memory).")
    # -- extras
    enable_ema: bool = opt(False, "Keep an exponential moving average of the actor (saved as actor_ema/).")
    ema_decay: float = opt(0.992, "EMA decay per step.")
    unsupervised_dataset_name: str = opt("", "Text set for PTX mixing: a Hub name, or a .txt/.jsonl ('text').")
    unsupervised_dataset_config_name: str = opt("", "Hub config of the unsupervised set.")
    unsup_coef: float = opt(27.8, "PTX loss weight (DeepSpeed-Chat's default).")
    reward_guard: float = opt(1e4, "Stop if a |reward| exceeds this (a broken reward model).")
    kl_guard: float = opt(100.0, "Stop if the mean KL exceeds this (a runaway policy).")
    eval_prompts: int = opt(32, "Held-out prompts for the before/after table (0 = none).")
    local_rank: int = opt(-1, "Set by the deepspeed launcher.")
    threads: int = opt(0, "CPU threads for torch (0 = default).")

    def validate(self):
        if not self.actor_model_name_or_path:
            raise ConfigError("--actor_model_name_or_path is required (the step-1 output dir)")
        needs_model_reward = not self.reward or any(r.startswith("model:") for r in self.reward)
        if not self.reward and not self.critic_model_name_or_path:
            raise ConfigError("no reward: pass --critic_model_name_or_path (a step-2 model) or --reward (rules)")
        if self.algo == "ppo" and not self.critic_model_name_or_path:
            if needs_model_reward:
                raise ConfigError("--algo ppo needs --critic_model_name_or_path (the step-2 output dir)")
            self.critic_model_name_or_path = self.actor_model_name_or_path  # rule rewards: critic from the actor
        self._check_rules_match_task()
        if self.algo != "ppo" and self.num_generations < 2:
            raise ConfigError(f"--algo {self.algo} compares samples of one prompt: set --num_generations >= 2")
        if self.length_groups < 1:
            raise ConfigError(f"--length_groups must be >= 1 (1 = one padded batch), got {self.length_groups}")
        if self.min_answer_seq_len > self.max_answer_seq_len:
            raise ConfigError("--min_answer_seq_len is larger than --max_answer_seq_len")
        if self.only_optimize_lora and not self.actor_lora_dim:
            raise ConfigError("--only_optimize_lora needs --actor_lora_dim > 0")
        if self.offload and max(self.actor_zero_stage, self.critic_zero_stage) == 0:
            raise ConfigError("--offload needs a ZeRO stage >= 1 (--actor_zero_stage/--critic_zero_stage)")
        rows = self.per_device_generation_batch_size * self.num_generations
        if rows % self.per_device_training_batch_size:
            raise ConfigError(f"--per_device_training_batch_size {self.per_device_training_batch_size} must "
                              f"divide the {rows} sequences of a generation batch")
        if not self.loss_agg:
            self.loss_agg = "token-mean" if self.algo == "ppo" else "seq-mean-token-mean"
        self.zero_stage = self.actor_zero_stage  # read by shared start-up code
        check_common(self)

    def _check_rules_match_task(self):
        """A task rule reads its answer key from the prompt's meta; on other prompts it would score 0 on
        every sample (and the run would learn nothing) - say so now instead."""
        names = {part.split("=")[0].strip() for value in self.reward for part in value.split(",")}
        for rule in ("countdown", "gsm8k"):
            if rule in names and self.task != rule:
                raise ConfigError(f"--reward {rule} needs --task {rule} (its prompts carry the answer key); "
                                  f"got --task {self.task}")
