"""Held-out correctness of the base, step-1 and step-3 models: `python -m inference.heldout OUTPUT_DIR`.

The reward model can like a wrong answer, and the synthetic tasks have exact answers, so beside the mean reward
this counts the answers that are right by rule (utils.data.synthetic_check, not the reward model). Every model
answers the same prompts, greedily: the first --n_prompts rows of the synthetic set's eval pool, which is carved
off before the stage split (utils.data.splits), so no stage trained on them. Writes OUTPUT_DIR/heldout_eval.json
(read by inference.summary and inference.report) and prints the table (utils.report_tables.correctness_table).
"""
from __future__ import annotations

import gc
import json
import os
import sys
from dataclasses import dataclass

import torch

from inference.common import load_for_inference, quiet_transformers, score_items
from utils.data.datasets import pad_sequences, tokenize_prompt
from utils.data.splits import load_stage_rows
from utils.data.synthetic_check import check, is_synthetic
from utils.models import OFFLINE_DEFAULT, ModelLoadError
from utils.options import opt, parse_config
from utils.report_tables import HELDOUT_FILE, correctness_table


REFERENCE = "reference"  # the synthetic row's chosen (right) reply


@dataclass
class HeldoutConfig:
    output_dir: str = opt("", "The pipeline's output dir (step1/, step2/, step3/actor).", positional=True)
    base: str = opt(OFFLINE_DEFAULT, "The model step 1 started from (the 'base' column).")
    n_prompts: int = opt(32, "Held-out prompts each model answers.", min=1)
    max_new_tokens: int = opt(32, "Tokens generated per answer (the demo's step-3 answer length).", min=1)
    batch_size: int = opt(8, "Prompts generated / scored together.", min=1)
    data_split: str = opt("2,4,4", "The stages' --data_split (with --seed it fixes the held-out pool).")
    seed: int = opt(1234, "The stages' --seed.")
    eval_fraction: float = opt(0.1, "The stages' --eval_fraction.", min=0)
    dtype: str = opt("auto", "Inference dtype.", choices=["auto", "fp32", "bf16", "fp16"])
    threads: int = opt(0, "CPU threads (0 = torch's default).", min=0)
    quiet: bool = opt(False, "Print where the result went, not the table (the pipeline's summary shows it).")


def heldout_rows(n: int, data_split: str = "2,4,4", seed: int = 1234, eval_fraction: float = 0.1):
    """The first `n` synthetic rows of the eval pool, in pool order (a fixed rule, not a pick)."""
    _, eval_rows, _ = load_stage_rows(["synthetic"], data_split, 0, seed, eval_fraction)
    return [row for row in eval_rows if is_synthetic(row)][:n]


def model_paths(output_dir: str, base: str) -> list[tuple[str, str]]:
    """(label, path) of the models to compare; a stage that has not written its model yet is left out."""
    found = [("base", base)]
    for label, path in (("step 1", os.path.join(output_dir, "step1")),
                        ("DPO", os.path.join(output_dir, "step2_dpo")),  # e2e_rlhf.py --step2-algo dpo
                        ("step 3", os.path.join(output_dir, "step3", "actor"))):
        if os.path.isfile(os.path.join(path, "config.json")):
            found.append((label, path))
    return found


@torch.inference_mode()
def generate_greedy(model, tokenizer, prompts, max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """One greedy answer per prompt (a list of chat messages), rendered as the stages render prompts; left
    padding, so every prompt of a batch ends where generation starts."""
    from inference.chatbot import stop_token_ids
    device = next(model.parameters()).device
    encoded = [tokenize_prompt(tokenizer, list(messages)) for messages in prompts]
    replies = []
    for start in range(0, len(encoded), batch_size):
        ids, mask = (t.to(device) for t in pad_sequences(encoded[start:start + batch_size], tokenizer.pad_token_id,
                                                         left=True))
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(model, tokenizer))
        replies += [tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True).strip() for row in out]
    return replies


def grade(rows, responses: list[str], scores: list[float] | None = None) -> dict:
    """Correct count by rule, mean reward (None without a reward model) and every sample, in prompt order."""
    samples = []
    for i, (row, response) in enumerate(zip(rows, responses)):
        sample = {"prompt": row.prompt[-1]["content"], "response": response, "correct": check(row, response)}
        if scores is not None:
            sample["score"] = float(scores[i])
        samples.append(sample)
    return {"n": len(samples), "correct": sum(s["correct"] for s in samples),
            "reward_mean": sum(scores) / len(scores) if scores else None, "samples": samples}


def _answers(path: str, messages, cfg: HeldoutConfig) -> list[str]:
    model, tokenizer = load_for_inference(path, dtype=cfg.dtype)
    return generate_greedy(model, tokenizer, messages, cfg.max_new_tokens, cfg.batch_size)


def _scores(reward_path: str, messages, answers: dict, cfg: HeldoutConfig) -> dict:
    model, tokenizer = load_for_inference(reward_path, kind="value", dtype=cfg.dtype)
    return {label: score_items(model, tokenizer, list(zip(messages, responses)), batch_size=cfg.batch_size)[0]
            for label, responses in answers.items()}


def evaluate(cfg: HeldoutConfig) -> dict:
    """Generate with each model, score with step 2's reward model (when there is one), grade by rule. One model
    is in memory at a time (each helper's model is freed when it returns): the demo machine is small."""
    rows = heldout_rows(cfg.n_prompts, cfg.data_split, cfg.seed, cfg.eval_fraction)
    messages = [list(row.prompt) for row in rows]
    answers = {}
    for label, path in model_paths(cfg.output_dir, cfg.base):
        answers[label] = _answers(path, messages, cfg)
        gc.collect()
        print(f"{label}: answered {len(rows)} held-out prompts ({path})", flush=True)
    reward_path = os.path.join(cfg.output_dir, "step2")
    # the data set's right answer to each prompt is scored too, so a wrong answer can be set against it
    scores = _scores(reward_path, messages, {**answers, REFERENCE: [row.chosen for row in rows]}, cfg) \
        if os.path.isfile(os.path.join(reward_path, "config.json")) else {}
    models = {label: grade(rows, responses, scores.get(label)) for label, responses in answers.items()}
    if scores:
        for part in models.values():
            for sample, ref in zip(part["samples"], scores[REFERENCE]):
                sample["reference_score"] = float(ref)
    return {"prompts": len(rows), "decoding": f"greedy, at most {cfg.max_new_tokens} new tokens",
            "reward_model": reward_path if scores else None, "models": models}


def write_result(result: dict, output_dir: str) -> str:
    path = os.path.join(output_dir, HELDOUT_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    os.replace(path + ".tmp", path)  # a reader never sees half a file
    return path


def main(argv=None) -> int:
    cfg = parse_config(HeldoutConfig, argv, description=__doc__.splitlines()[0], prog="python -m inference.heldout")
    if not os.path.isdir(cfg.output_dir):
        print(f"error: {cfg.output_dir} does not exist", file=sys.stderr)
        return 2
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    quiet_transformers()
    try:
        result = evaluate(cfg)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(write_result(result, cfg.output_dir), flush=True)
    if not cfg.quiet:
        print(correctness_table(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
