"""Chat with a model of any stage, or compare several side by side (DeepSpeed-Chat's chatbot + prompt_eval).

    python -m inference.chatbot --model_name_or_path runs/step3/actor
    python -m inference.chatbot --model_name_or_path runs/step1 runs/step3/actor --prompts prompts.txt \\
        --reward_model runs/step2 --output answers.jsonl

One model: a multi-turn chat, the answer streamed as it is generated. Two or more: COMPARE mode, each prompt
goes through every model (each keeps its own conversation) and the answers are printed in columns labelled
with the last two parts of each model's path. Prompts come from --prompts (one per line, or JSONL with
"prompt") or from stdin (a terminal or a pipe). Commands: `clear` resets the conversation, `quit`/`exit` ends.
The prompt is the model's chat template (or DeepSpeed-Chat's "Human: ... Assistant:" text) rendered from the
conversation by utils.data.templates; the oldest exchanges are dropped when prompt + max_new_tokens would not
fit the model's context.
"""
from __future__ import annotations

import itertools
import json
import shutil
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Optional

from inference.common import (context_limit, effective_max_len, load_for_inference, model_label,
                              quiet_transformers, score_items)
from utils.data.datasets import tokenize_prompt
from utils.data.readers import parse_json_line
from utils.data.rows import DataError
from utils.data.templates import end_of_turn
from utils.models import ModelLoadError
from utils.options import opt, parse_config

COMMANDS_CLEAR = ("clear",)
COMMANDS_QUIT = ("quit", "exit")


class ChatError(Exception):
    """A setting that cannot work with a model (printed as one line, exit 2)."""


@dataclass
class ChatModel:
    label: str
    model: object
    tokenizer: object
    budget: int | None                       # prompt tokens that still leave room for max_new_tokens
    history: list = field(default_factory=list)  # user/assistant messages so far


# ------------------------------------------------------------------------------------------ pure helpers
def unique_labels(paths: list[str]) -> list[str]:
    """model_label of each path; a repeated label gets "#2", "#3", ... so columns stay distinguishable."""
    labels, seen = [], {}
    for path in paths:
        label = model_label(path)
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return labels


def fit_history(tokenizer, history: list[dict], user_text: str, budget: int | None):
    """(messages, prompt ids) for history + the new user turn, dropping the oldest exchanges (user + assistant
    pairs) until the prompt has at most `budget` tokens; a single turn still too long keeps its last tokens."""
    history = list(history)
    while True:
        messages = history + [{"role": "user", "content": user_text}]
        ids = tokenize_prompt(tokenizer, messages)
        if budget is None or len(ids) <= budget:
            return messages, ids
        if not history:
            return messages, ids[len(ids) - budget:]
        history = history[2:]


def side_by_side(columns: list[tuple[str, list[str]]], width: int, sep: str = " | ") -> str:
    """Columns (header, text lines) wrapped to fit `width` characters in total."""
    col = max(10, (width - len(sep) * (len(columns) - 1)) // len(columns))
    blocks = []
    for header, lines in columns:
        block = textwrap.wrap(header, col) + ["-" * col]
        for line in lines:
            for paragraph in line.splitlines() or [""]:
                block += textwrap.wrap(paragraph, col) or [""]
        blocks.append(block)
    rows = itertools.zip_longest(*blocks, fillvalue="")
    return "\n".join(sep.join(cell.ljust(col) for cell in row).rstrip() for row in rows)


def read_prompt_file(path: str) -> list[str]:
    """One prompt per line, or JSONL objects with a "prompt" string; blank lines are skipped."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read: {getattr(err, 'strerror', None) or err}", "unreadable") from None
    prompts = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            prompts.append(line.strip())
            continue
        origin = f"{path}:{lineno}"
        record = parse_json_line(line, origin)
        if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise DataError.at(origin, "prompt", "missing or not a non-empty string", "missing_field")
        prompts.append(record["prompt"].strip())
    return prompts


# ------------------------------------------------------------------------------------------ generation
def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS of the tokenizer and the model's generation config, plus the chat template's end-of-turn token
    (what an SFT model emits to close its reply) when it is a single token."""
    ids = {tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    marker = end_of_turn(tokenizer)
    if marker:
        marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(marker_ids) == 1:
            ids.add(marker_ids[0])
    return sorted(i for i in ids if i is not None)


def generation_config(model, tokenizer, args):
    from transformers import GenerationConfig
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, pad_token_id=tokenizer.pad_token_id,
              eos_token_id=stop_token_ids(model, tokenizer), repetition_penalty=args.repetition_penalty)
    if args.do_sample:  # sampling knobs only when sampling, else transformers warns they are unused
        kw.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    return GenerationConfig(**kw)


def generate_reply(chat: ChatModel, prompt_ids: list[int], args, stream: bool) -> str:
    import torch
    from transformers import TextStreamer, set_seed
    device = next(chat.model.parameters()).device
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    streamer = TextStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    set_seed(args.seed)  # every model and turn starts from the same seed: comparisons are reproducible
    with torch.inference_mode():
        out = chat.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                  generation_config=generation_config(chat.model, chat.tokenizer, args),
                                  streamer=streamer)
    return chat.tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True).strip()


# ------------------------------------------------------------------------------------------ the loop
def prompt_stream(prompts: list[str] | None):
    """(text, echo) from the --prompts list, else stdin; the prompt is echoed when it was not typed at a
    terminal, so transcripts read as a chat."""
    if prompts is not None:
        for text in prompts:
            yield text, True
    elif sys.stdin.isatty():
        while True:
            try:
                yield input("Human: "), False
            except EOFError:
                print()
                return
    else:
        for line in sys.stdin:
            yield line.rstrip("\r\n"), True


def load_chat_models(args) -> list[ChatModel]:
    chats = []
    for path, label in zip(args.model_name_or_path, unique_labels(args.model_name_or_path)):
        model, tokenizer = load_for_inference(path, "causal", args.dtype, args.trust_remote_code)
        limit = context_limit(model)
        if limit is not None and args.max_new_tokens >= limit:
            raise ChatError(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt in {label}'s "
                            f"context of {limit} tokens")
        chats.append(ChatModel(label, model, tokenizer, None if limit is None else limit - args.max_new_tokens))
    return chats


def chat_turn(chats, reward, user_text: str, args, turn: int) -> list[dict]:
    """Every model answers `user_text` (streamed when there is one model); returns the records of the turn."""
    records = []
    for chat in chats:
        messages, prompt_ids = fit_history(chat.tokenizer, chat.history, user_text, chat.budget)
        if len(chats) == 1:
            print("Assistant: ", end="", flush=True)
        answer = generate_reply(chat, prompt_ids, args, stream=len(chats) == 1)
        chat.history = messages + [{"role": "assistant", "content": answer}]
        record = {"prompt": user_text, "model": chat.label, "answer": answer, "turn": turn}
        if reward is not None:
            rm, rm_tok = reward
            record["score"] = score_items(rm, rm_tok, [(messages, answer)], effective_max_len(rm, None))[0][0]
            if len(chats) == 1:
                print(f"[reward {record['score']:+.4f}]")
        records.append(record)
    if len(chats) > 1:
        width = shutil.get_terminal_size((120, 24)).columns
        print(side_by_side([(r["model"], [r["answer"]] + ([f"[reward {r['score']:+.4f}]"] if "score" in r else []))
                            for r in records], width))
    return records


def run(args) -> int:
    prompts = read_prompt_file(args.prompts) if args.prompts else None  # a bad file fails before loading
    chats = load_chat_models(args)
    reward = load_for_inference(args.reward_model, "value", args.dtype, args.trust_remote_code) \
        if args.reward_model else None
    out = open(args.output, "w", encoding="utf-8") if args.output else None
    if prompts is None and sys.stdin.isatty():
        print(f"chatting with {', '.join(c.label for c in chats)}; 'clear' resets, 'quit' ends", file=sys.stderr)
    try:
        turn = 0
        for text, echo in prompt_stream(prompts):
            command = text.strip().lower()
            if command in COMMANDS_QUIT:
                break
            if command in COMMANDS_CLEAR:
                for chat in chats:
                    chat.history = []
                turn = 0
                print("[conversation cleared]")
                continue
            if not text.strip():
                continue
            turn += 1
            if echo:
                print(f"Human: {text}")
            for record in chat_turn(chats, reward, text, args, turn):
                if out:
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    out.flush()
            print()
    finally:
        if out:
            out.close()
    return 0


@dataclass
class ChatConfig:
    model_name_or_path: list = opt([], "Model dir(s) of any stage, Hub name(s), or 'smollm2-135m-instruct'; two "
                                       "or more = compare mode.", nargs="+", required=True)
    prompts: Optional[str] = opt(None, "File of prompts (one per line, or JSONL with \"prompt\"); default stdin.")
    reward_model: Optional[str] = opt(None, "Reward model dir: print each answer's score.")
    output: Optional[str] = opt(None, "Write each turn as JSONL {prompt, model, answer, turn, score?}.")
    max_new_tokens: int = opt(128, "Tokens generated per answer.", min=1)
    do_sample: bool = opt(False, "Sample (default: greedy).")
    temperature: float = opt(1.0, "Sampling temperature (with --do_sample).")
    top_p: float = opt(1.0, "Nucleus sampling (with --do_sample).")
    top_k: int = opt(50, "Top-k sampling (with --do_sample).")
    repetition_penalty: float = opt(1.0, "1.0 = none.")
    seed: int = opt(1234, "Seed set before every answer.")
    dtype: str = opt("auto", "Model dtype.", choices=["auto", "fp32", "bf16"])
    trust_remote_code: bool = opt(False, "Allow a Hub model's own code to run.")


def main(argv=None) -> int:
    args = parse_config(ChatConfig, argv, description=__doc__.split("\n\n")[0], prog="python -m inference.chatbot")
    quiet_transformers()
    try:
        return run(args)
    except (ModelLoadError, DataError, ChatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
