"""Step 3 (RLHF) options: every PPO/GRPO constant is a documented flag with DeepSpeed-Chat's default."""
import dataclasses
import typing
from dataclasses import dataclass
from typing import ClassVar

from step3_rlhf.algorithms import ALGORITHMS, algorithm
from step3_rlhf.rollout import BACKENDS as ROLLOUT_BACKENDS
from step3_rlhf.tasks import TaskChoices, task_names, task_of_rule
from utils.options import (ConfigError, DataOptions, DeviceOptions, LoggingOptions, RunOptions,
                           check_common, opt)
from utils.policy_losses import IS_LEVELS, KL_ESTIMATORS, LOSS_AGGS, LOSS_TYPES

ALGOS = tuple(ALGORITHMS)
# The two trained models of PPO and what each role's help says about it (DeepSpeed-Chat's actor_*/critic_* flags).
ROLES = {
    "actor": dict(Role="Actor", role="actor", frozen="and reference",
                  checkpointing_note=" (with the critic's: peak RSS 5.4 instead of 5.7-5.8 GB on bench W, about "
                                     "5%% slower)",  # %% : argparse formats help text
                  dropout_note=" (0 keeps old/new log-probs comparable)"),
    "critic": dict(Role="Critic", role="critic", frozen="and reward model", checkpointing_note="", dropout_note=""),
}


def role_options(*specs):
    """A dataclass with the fields actor_NAME and critic_NAME for each (NAME, type, default, help, opt
    keywords) spec: one option per trained model. A default may be a {role: value} dict; the help is a
    template filled from ROLES."""
    fields = []
    for name, tp, default, help_template, kw in specs:
        for role, words in ROLES.items():
            value = default[role] if isinstance(default, dict) else default
            fields.append((f"{role}_{name}", tp, opt(value, help_template.format(**words), **kw)))
    cls = dataclasses.make_dataclass("RoleOptions", fields)
    cls.__module__ = __name__
    return cls


RoleOptions = role_options(
    ("learning_rate", float, {"actor": 9.65e-6, "critic": 5e-6}, "{Role} learning rate.", dict(min=0)),
    ("weight_decay", float, 0.0, "{Role} AdamW weight decay.", dict(min=0)),
    ("zero_stage", int, 0, "{Role} ({frozen}) ZeRO stage.", dict(choices=[0, 1, 2, 3])),
    ("gradient_checkpointing", bool, False, "Gradient checkpointing for the {role}{checkpointing_note}.", {}),
    ("dropout", float, 0.0, "{Role} dropout{dropout_note}.", dict(min=0)),
    ("lora_dim", int, 0, "{Role} LoRA rank (0 = full).", dict(min=0)),
    ("lora_module_name", str, "layers.", "Linear layers of the {role} that get LoRA.", {}),
    ("lora_learning_rate", float, 5e-4, "{Role} LoRA learning rate.", dict(min=0)),
)


@dataclass
class RLHFConfig(RoleOptions, DataOptions, RunOptions, DeviceOptions, LoggingOptions):
    """Step 3: PPO (actor, frozen reference, critic, frozen reward model) or a critic-free algorithm."""
    stage_name: ClassVar[str] = "step3_rlhf"
    data_split_index: ClassVar[int] = 2

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
    algo: str = opt("ppo", "RL algorithm: " + ", ".join(f"{a.name} ({a.summary})" for a in ALGORITHMS.values())
                    + ".", choices=ALGOS)
    reward: list = opt([], "Reward sources: model:PATH (a step-2 model) and/or rules (a task's rule, e.g. "
                           "countdown, gsm8k, needs that --task; format, length fit any), package.module:function, "
                           "each optionally NAME=WEIGHT. Default: model:CRITIC_MODEL_NAME_OR_PATH.", nargs="*")
    task: str = opt("preference", "Prompt source: preference data (--data_path), or a task of step3_rlhf/tasks "
                                  f"({', '.join(task_names())}) with --data_path FILE.jsonl [EVAL.jsonl], "
                                  "'generate[:N]' for N built-in Countdown tasks (default 2000), or a GSM8K Hub name.",
                    choices=TaskChoices("preference"))
    prompt_style: str = opt("chat", "R1-Zero prompt style for countdown/gsm8k: the chat template or base text.",
                            choices=["chat", "base"])
    # -- generation
    max_prompt_seq_len: int = opt(256, "Prompt tokens kept (left-truncated).", min=1)
    max_answer_seq_len: int = opt(256, "Most new tokens per response.", min=1)
    min_answer_seq_len: int = opt(0, "Fewest new tokens (EOS suppressed before); benchmarks use = max.")
    per_device_generation_batch_size: int = opt(8, "Prompts per generation batch.", min=1)
    per_device_training_batch_size: int = opt(8, "Sequences per PPO micro-batch.", min=1)
    generation_batches: int = opt(1, "Generation batches collected before each round of PPO updates.", min=1)
    num_generations: int = opt(1, "Samples per prompt (G); grpo/rloo/reinforce need >= 2.", min=1)
    temperature: float = opt(1.0, "Sampling temperature.")
    top_p: float = opt(1.0, "Nucleus sampling.")
    top_k: int = opt(0, "Top-k sampling (0 = off).")
    enable_hybrid_engine: bool = opt(False, "DeepSpeed's hybrid engine for generation (GPU, supported models). A model "
                                     "its kernels cannot run (no policy, grouped-query attention, transformers 5's "
                                     "layers) gets a plain engine, with the reason logged at start.")
    inference_tp_size: int = opt(1, "Hybrid engine tensor-parallel size.", min=1)
    tp_gather_partition_size: int = opt(8, "Hybrid engine: parameters gathered per partition.")
    release_inference_cache: bool = opt(False, "Hybrid engine: free the inference KV cache after generation.")
    unpin_actor_parameters: bool = opt(False, "Hybrid engine: do not pin actor parameters (saves host memory).")
    # -- PPO / GRPO constants
    ppo_epochs: int = opt(1, "Passes over each round's experience.", min=1)
    cliprange_value: float = opt(0.2, "Value clip range.")
    gamma: float = opt(1.0, "GAE discount (ppo) and reward-to-go discount (reinforce_pp).")
    lam: float = opt(0.95, "GAE lambda.")
    clip_reward_value: float = opt(5.0, "ppo/reinforce_pp: reward-model score clipped to +-this.")
    whiten_advantages: bool = opt(False, "PPO: whiten advantages per batch (DeepSpeed-Chat does not).")
    # -- the policy loss of every ratio-based algorithm (ppo, grpo, rloo, reinforce_pp); TRL GRPOConfig names
    cliprange: float = opt(0.2, "Policy ratio clip epsilon: the low side, and the high side unless "
                                "--cliprange_high (TRL: epsilon).", min=0)
    cliprange_high: typing.Optional[float] = opt(None, "High-side ratio clip epsilon (DAPO clip-higher, e.g. 0.28; "
                                                       "TRL: epsilon_high). Default: --cliprange.", min=0)
    importance_sampling_level: str = opt("token", "Importance ratio per token, or per sequence (GSPO: the "
                                                  "length-normalised log-ratio of the response, clipped as one; "
                                                  "GSPO uses tiny epsilons, e.g. --cliprange 3e-4 "
                                                  "--cliprange_high 4e-4). TRL's name.",
                                         choices=list(IS_LEVELS))
    scale_rewards: bool = opt(True, "grpo/reinforce: divide group advantages by the group std (Dr. GRPO: off). rloo "
                                    "never scales; ppo: --whiten_advantages; reinforce_pp always whitens over the "
                                    "batch.")
    loss_agg: str = opt("", "Loss aggregation: token-mean (of a micro-batch), seq-mean-token-mean, "
                            "seq-mean-token-sum-norm (Dr. GRPO), batch-token-mean (DAPO: every token of the step "
                            "weighs the same). Default: the algorithm's (token-mean for ppo and reinforce_pp, "
                            "seq-mean-token-mean otherwise).", choices=["", *LOSS_AGGS])
    loss_type: str = opt("", "TRL GRPOConfig's name for --loss_agg: bnpo = token-mean, grpo = seq-mean-token-mean, "
                             "dr_grpo = seq-mean-token-sum-norm, dapo = batch-token-mean.",
                         choices=["", *LOSS_TYPES])
    # -- KL to the reference (veRL/OpenRLHF names) and the entropy bonus, for every algorithm
    kl_ctl: float = opt(0.1, "KL coefficient in the reward (--kl_in_reward): r_t -= kl_ctl * kl_t per token "
                             "(ppo, reinforce_pp), or the sequence score -= kl_ctl * sum_t kl_t (group algorithms).",
                        min=0)
    beta: float = opt(0.04, "Weight of the KL loss term (--kl_in_loss); 0 with no KL in the reward = no reference "
                            "model.", min=0)
    kl_in_reward: typing.Optional[bool] = opt(None, "KL penalty in the reward with --kl_ctl (veRL: "
                                                    "use_kl_in_reward). Default: on for ppo and reinforce_pp only.")
    kl_in_loss: typing.Optional[bool] = opt(None, "KL as a loss term with --beta (veRL: use_kl_loss). Default: on "
                                                  "for grpo, rloo, reinforce.")
    kl_estimator: str = opt("", "KL estimator (Schulman): k1 = logp - ref, k2 = (logp - ref)^2 / 2, k3 = "
                                "exp(ref - logp) - (ref - logp) - 1. Default: k1 in the reward, k3 in the loss.",
                            choices=["", *KL_ESTIMATORS])
    entropy_coeff: float = opt(0.0, "Entropy bonus: loss -= entropy_coeff * token entropy (veRL's name; 0 = off). "
                                    "Keeps the training forward's softmax for the backward.", min=0)
    # -- per-model training options (the actor_*/critic_* pairs: RoleOptions)
    offload: bool = opt(False, "ZeRO offload of the trained engines' state to CPU.")
    offload_reference_model: bool = opt(False, "Keep the reference model's parameters on CPU (ZeRO-3 offload).")
    offload_reward_model: bool = opt(False, "Keep the reward model's parameters on CPU (ZeRO-3 offload).")
    length_groups: int = opt(3, "Scoring and training forwards run the rows of a batch in up to this many groups "
                             "by length, each without its all-padding columns (same numbers, fewer FLOPs; 1 = one "
                             "padded batch). A ZeRO-3 engine's training forwards are always one group: several "
                             "forwards before one backward break ZeRO-3's prefetch trace once weights are released "
                             "between uses, as on large models ('tracing error').", min=1)
    lora_alpha: float = opt(0.0, "LoRA scale numerator (0 = rank).", min=0)
    only_optimize_lora: bool = opt(False, "Train only LoRA weights.")
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
    eval_interval: int = opt(0, "Also evaluate the held-out prompts every N steps (at --eval_temperature): eval/reward and, per "
                                "rule, eval/<rule>_full (the share of answers with full marks: a correct "
                                "Countdown equation, a well-formed answer) go to TensorBoard and summary.json's "
                                "history - the learning curve on prompts the run never trains on (0 = before/after "
                                "only).", min=0)
    per_device_eval_batch_size: int = opt(0, "Prompts per held-out evaluation batch (0 = "
                                             "--per_device_generation_batch_size).", min=0)
    eval_temperature: typing.Optional[float] = opt(None, "Sampling temperature of the held-out evaluation (0 = "
                                                         "greedy, as benchmarks score; None = --temperature).",
                                                   min=0)
    max_train_seconds: float = opt(0.0, "Stop after the step during which this many seconds of RL (rollouts + "
                                        "updates; evaluation not counted) have passed, then evaluate and save as "
                                        "at the end of --max_steps (0 = no limit). With a decaying schedule the "
                                        "learning rate stops early: use --lr_scheduler_type constant.", min=0)
    reuse_policy_forward: bool = opt(True, "With one PPO epoch, one generation batch and one micro-batch per step, "
                                           "the experience-time actor forward keeps its autograd graph and is also "
                                           "the update's forward (same numbers, one forward less; never with "
                                           "dropout, the hybrid engine or ZeRO-3). --no-reuse_policy_forward runs "
                                           "the two forwards.")
    generation_backend: str = opt("auto", "Who samples the rollouts: fast (our decode loop: a KV cache and no "
                                  "per-token generate() overhead; a plain decoder-only model on one process, no "
                                  "ZeRO-3 partitioning), hf (the model's generate()), hybrid (DeepSpeed's hybrid "
                                  "engine: --enable_hybrid_engine on a GPU, model families DeepSpeed has inference "
                                  "kernels for). auto: hybrid where it can run, else fast where it is exact, else "
                                  "hf; a backend that cannot run falls back to hf. The choice and its reason are "
                                  "logged at start. Every backend samples with --temperature/--top_p/--top_k only "
                                  "(a model's generation_config extras such as repetition_penalty are ignored).",
                                  choices=["auto", *ROLLOUT_BACKENDS])
    # -- experience side: DAPO's dynamic sampling and overlong handling, the detectors (#14 points 2 and 4, #15.5)
    dynamic_sampling: bool = opt(False, "DAPO dynamic sampling (veRL: algorithm.filter_groups): drop the groups of "
                                        "--num_generations samples whose rewards are all equal (no learning signal) "
                                        "and refill the batch with the groups of new prompts.")
    max_refill_rounds: int = opt(3, "--dynamic_sampling: at most this many extra generation batches per step "
                                    "(veRL: max_num_gen_batches); past it the step trains on the groups it has.",
                                 min=0)
    overlong_filter: bool = opt(False, "DAPO overlong filtering: a response with no EOS within "
                                       "--max_answer_seq_len (truncated) is left out of the loss.")
    overlong_buffer_len: int = opt(0, "DAPO soft overlong punishment (veRL: overlong_buffer.len): responses longer "
                                      "than --max_answer_seq_len minus this many tokens get a penalty growing "
                                      "linearly to -(--overlong_penalty_factor) at the maximum, added to the reward "
                                      "(logged as reward/overlong). 0 = off.", min=0)
    overlong_penalty_factor: float = opt(1.0, "Largest overlong penalty (veRL: overlong_buffer.penalty_factor).",
                                         min=0)
    detector_window: int = opt(10, "Reward-hacking detector: steps per window; the last window's mean reward and "
                                   "KL are compared with the window before it (and the first with the last in the "
                                   "end-of-run summary).", min=1)
    detector_kl_growth: float = opt(0.025, "Reward-hacking detector: KL to the reference growing faster than this "
                                           "many nats per step between two windows, while the reward rises, prints "
                                           "a warning (0.025: +0.5 nats, #15's KL bar for hh PPO, in 20 steps).",
                                    min=0)

    @property
    def needs_critic(self) -> bool:
        """Whether the algorithm trains a critic (read by the shared start-up checks in utils/)."""
        return algorithm(self.algo).needs_critic

    def groups_for(self, zero_stage: int, grad: bool) -> int:
        """--length_groups for one forward of an engine at `zero_stage`: 1 where a backward follows at ZeRO-3."""
        return 1 if grad and zero_stage == 3 else self.length_groups

    @property
    def zero_stage(self):
        """The actor's ZeRO stage, named as the shared start-up line reads it."""
        return self.actor_zero_stage

    def uses_data_split(self) -> bool:
        return self.task == "preference"  # task prompts come from their own files or generator

    def data_locations(self) -> list:
        ptx = [("unsupervised_dataset_name", self.unsupervised_dataset_name)] if self.unsupervised_dataset_name else []
        return super().data_locations() + ptx

    def reward_model_paths(self) -> list:
        """The model:PATH entries of --reward (the critic path when none is given); a bad spec -> ConfigError."""
        from step3_rlhf.tasks.rewards import ModelRewardSpec, parse_reward_specs
        try:
            specs = parse_reward_specs(self.reward or [f"model:{self.critic_model_name_or_path}"])
        except ValueError as e:
            raise ConfigError(f"--reward: {e}") from None
        paths = [s.path for s in specs if isinstance(s, ModelRewardSpec)]
        if len(paths) > 1:
            raise ConfigError("--reward: only one model:PATH reward source is supported")
        return paths

    def model_locations(self) -> list:
        """(flag, value) of every model/tokenizer the run loads, for the start-up checks."""
        fields = ["tokenizer_name_or_path", "actor_model_name_or_path"] + \
            (["critic_model_name_or_path"] if self.needs_critic else [])
        out = [(f, getattr(self, f)) for f in fields if getattr(self, f)]
        return out + [("reward", p) for p in self.reward_model_paths() if ("critic_model_name_or_path", p) not in out]

    def validate(self):
        if not self.actor_model_name_or_path:
            raise ConfigError("--actor_model_name_or_path is required (the step-1 output dir)")
        check_common(self)
        needs_model_reward = not self.reward or any(r.startswith("model:") for r in self.reward)
        if not self.reward and not self.critic_model_name_or_path:
            raise ConfigError("no reward: pass --critic_model_name_or_path (a step-2 model) or --reward (rules)")
        algo = algorithm(self.algo)
        if algo.needs_critic and not self.critic_model_name_or_path:
            if needs_model_reward:
                raise ConfigError(f"--algo {self.algo} needs --critic_model_name_or_path (the step-2 output dir)")
            self.critic_model_name_or_path = self.actor_model_name_or_path  # rule rewards: critic from the actor
        self._check_rules_match_task()
        if self.num_generations < algo.min_generations:
            raise ConfigError(f"--algo {self.algo} compares samples of one prompt: set --num_generations >= "
                              f"{algo.min_generations}")
        if self.min_answer_seq_len > self.max_answer_seq_len:
            raise ConfigError("--min_answer_seq_len is larger than --max_answer_seq_len")
        self._check_generation_backend()
        if self.only_optimize_lora and not self.actor_lora_dim:
            raise ConfigError("--only_optimize_lora needs --actor_lora_dim > 0")
        rows = self.per_device_generation_batch_size * self.num_generations
        if rows % self.per_device_training_batch_size:
            raise ConfigError(f"--per_device_training_batch_size {self.per_device_training_batch_size} must "
                              f"divide the {rows} sequences of a generation batch")
        self._check_accumulation(rows)
        self._check_experience_options()
        self._check_deepspeed()
        if not algo.clipped_ratio and (self.cliprange_high is not None or self.importance_sampling_level != "token"):
            raise ConfigError(f"--algo {self.algo} has no importance ratio to clip: --cliprange_high and "
                              "--importance_sampling_level would do nothing; drop them")
        self._resolve_loss_agg(algo)

    def _resolve_loss_agg(self, algo):
        """--loss_type (TRL's name) sets --loss_agg; unset, the algorithm's default."""
        if self.loss_type:
            agg = LOSS_TYPES[self.loss_type]
            if self.loss_agg and self.loss_agg != agg:
                raise ConfigError(f"--loss_type {self.loss_type} means --loss_agg {agg}, but --loss_agg "
                                  f"{self.loss_agg} was given; pass one of the two")
            self.loss_agg = agg
        if not self.loss_agg:
            self.loss_agg = algo.default_loss_agg

    def _check_accumulation(self, rows):
        micro = self.generation_batches * rows // self.per_device_training_batch_size
        # an accumulation window then never mixes two steps' experience nor stays open at the end of the run (but
        # after a micro-batch the non-finite guard skipped: the next one takes its place in the window)
        if micro % self.gradient_accumulation_steps:
            raise ConfigError(f"--gradient_accumulation_steps {self.gradient_accumulation_steps} must divide the "
                              f"{micro} micro-batches of a PPO epoch (--generation_batches x "
                              "--per_device_generation_batch_size x --num_generations / "
                              "--per_device_training_batch_size)")

    def _check_deepspeed(self):
        """Combinations DeepSpeed rejects, or accepts and silently ignores (which is worse)."""
        stages = [self.actor_zero_stage] + ([self.critic_zero_stage] if self.needs_critic else [])
        if self.offload and min(stages) == 0:
            raise ConfigError("--offload needs ZeRO stage 1, 2 or 3 (--actor_zero_stage/--critic_zero_stage); at "
                              "stage 0 DeepSpeed ignores it")
        if self.offload_reference_model and self.actor_zero_stage != 3:
            raise ConfigError("--offload_reference_model needs --actor_zero_stage 3 (DeepSpeed offloads the "
                              "parameters of a frozen model only under ZeRO-3)")
        if self.offload_reward_model and self.critic_zero_stage != 3:
            raise ConfigError("--offload_reward_model needs --critic_zero_stage 3 (DeepSpeed offloads the "
                              "parameters of a frozen model only under ZeRO-3)")
        if self.inference_tp_size > 1 and not (self.enable_hybrid_engine and self.actor_zero_stage == 3):
            raise ConfigError("--inference_tp_size > 1 needs --enable_hybrid_engine and --actor_zero_stage 3 (the "
                              "hybrid engine shards for tensor parallelism only from ZeRO-3)")
        if self.actor_zero_stage == 2 and self.critic_zero_stage == 2 and self.enable_hybrid_engine and \
                self.offload and not self.actor_lora_dim:
            raise ConfigError("ZeRO-2 actor and critic + --enable_hybrid_engine + --offload without actor LoRA is "
                              "unsupported (DeepSpeed-Chat: training instability); use ZeRO-3")

    def _check_generation_backend(self):
        if self.generation_backend == "hybrid" and not self.enable_hybrid_engine:
            raise ConfigError("--generation_backend hybrid needs --enable_hybrid_engine (DeepSpeed builds the hybrid "
                              "engine only then)")
        if self.enable_hybrid_engine and self.actor_lora_dim:
            # DeepSpeed fuses LoRA weights it finds as lora_right_weight/lora_left_weight (maybe_get_lora); ours
            # are lora_A/lora_B, so its kernels would sample from the base model while the adapters train
            raise ConfigError("--enable_hybrid_engine with --actor_lora_dim: DeepSpeed's inference kernels do not "
                              "see our LoRA weights and would generate with the base weights only; drop one of "
                              "the two")

    def _check_rules_match_task(self):
        """A task rule reads its answer key from the prompt's meta; on other prompts it would score 0 on
        every sample (and the run would learn nothing) - say so now instead."""
        names = {part.split("=")[0].strip() for value in self.reward for part in value.split(",")}
        for rule in sorted(names):
            owner = task_of_rule(rule)
            if owner is not None and self.task != owner.name:
                raise ConfigError(f"--reward {rule} needs --task {owner.name} (its prompts carry the answer key); "
                                  f"got --task {self.task}")

    def _check_experience_options(self):
        if self.dynamic_sampling and self.num_generations < 2:
            raise ConfigError("--dynamic_sampling drops groups whose --num_generations samples all got the same "
                              "reward: set --num_generations >= 2")
        if self.overlong_buffer_len > self.max_answer_seq_len:
            raise ConfigError(f"--overlong_buffer_len {self.overlong_buffer_len} is longer than "
                              f"--max_answer_seq_len {self.max_answer_seq_len}")
