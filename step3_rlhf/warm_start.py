"""Step-1 warm-start data for the R1-Zero tasks: prompts with worked solutions in the think/answer format.

A small model never writes `<think> ... </think> <answer> ... </answer>` on its own, so a rule reward
gives it nothing to learn from (every sample scores 0). The classic pipeline's answer is a short SFT
first. This writes that SFT set:

* Countdown: the project's solver (`tasks.countdown.solution_text`) writes each solution, spelling
  out the intermediate operations in the think part;
* GSM8K: the data set's own worked solution (calculator notes `<<a*b=c>>` removed) is the think part,
  the number after `####` the answer.

Each task supplies its solution text (`Task.solution` in step3_rlhf/tasks), so any registered task with one
works here.

Rows use the SFT-only layout the data layer reads (`{"prompt": [messages], "response": text}`, see
utils/data/formats.map_generic), with the SAME system/user messages `--task TASK` puts in
front of the policy in step 3. Step 1 renders them with the chat template, the step-3 prompt is that
same rendering followed by "<think>", and every response here starts with "<think>": so the tokens of
a step-3 prompt are exactly the first tokens of a step-1 sequence (`rendering_matches` checks it), and
SFT teaches precisely the text the step-3 rewards score. Only the chat style can be written this way
(step 1 has no raw-text prompt layout).

    python step3_rlhf/warm_start.py --task countdown --data_path generate --n 2000 --out warm.jsonl \\
        --tokenizer smollm2-135m-instruct
    python step1_sft/main.py --data_path warm.jsonl --data_split 1,0,0 ...
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass

if __package__ in (None, ""):  # `python step3_rlhf/warm_start.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from step3_rlhf.tasks import Task, TaskChoices, get_task  # noqa: E402
from step3_rlhf.tasks.prompts import THINK_OPEN, TaskPrompt  # noqa: E402
from utils.data.synthetic import write_json_lines as write_jsonl  # noqa: E402
from utils.options import opt, parse_config  # noqa: E402


def sft_row(task_prompt: TaskPrompt, reply: str) -> dict:
    """One SFT-only row: the task's chat messages and the reply (which starts with the think tag)."""
    if task_prompt.messages is None:
        raise ValueError("a warm start needs --prompt_style chat: step 1 renders prompts with the chat template, "
                         "so the base-model text prompt of step 3 cannot be reproduced there")
    if not reply.startswith(task_prompt.assistant_prefix):
        raise ValueError(f"the reply must start with {task_prompt.assistant_prefix!r} (the end of the step-3 prompt)")
    return {"prompt": [dict(m) for m in task_prompt.messages], "response": reply}


def task_rows(task: Task, rows: list[dict], style: str = "chat", trace: str = "direct", max_tries: int = 2,
              seed: int = 1234) -> list[dict]:
    """Warm-start rows for a task's rows; rows without a solution (the task raises ValueError) are left out.
    trace "search" shows up to `max_tries` failed attempts before each solution (tasks with a search_solution)."""
    solution = task.solution
    if trace == "search":
        if task.search_solution is None:
            raise ValueError(f"task {task.name!r} has no search trace (--trace search)")
        solution = functools.partial(task.search_solution, max_tries=max_tries, seed=seed)
    if solution is None:
        raise ValueError(f"task {task.name!r} has no warm-start solution text")
    out = []
    for row in rows:
        try:
            reply = solution(row)
        except ValueError:
            continue
        out.append(sft_row(task.prompt(row, style), reply))
    return out


def countdown_rows(tasks: list[dict], style: str = "chat", trace: str = "direct", max_tries: int = 2) -> list[dict]:
    """Rows for Countdown tasks `{target, nums}`; unsolvable tasks are left out."""
    return task_rows(get_task("countdown"), tasks, style, trace, max_tries)


def rendering_matches(tokenizer, task_prompt: TaskPrompt, row: dict) -> bool:
    """True when the step-3 prompt tokens are exactly the first tokens of the step-1 sequence of `row`.

    Step 1 tokenises prompt and response separately (utils/data/datasets.py); step 3 tokenises the
    rendered prompt text (step3_rlhf/prompt_data.py). Both paths are called here, not re-implemented."""
    from step3_rlhf.prompt_data import _tokenize_task
    from utils.data.datasets import tokenize_prompt, tokenize_response
    rl_ids = _tokenize_task(tokenizer, task_prompt, max_len=10 ** 9)["prompt_input_ids"]
    sft_ids = tokenize_prompt(tokenizer, row["prompt"]) + tokenize_response(tokenizer, row["response"])
    return list(sft_ids[:len(rl_ids)]) == list(rl_ids)


def build_rows(task: str, data_path: str, n: int = 0, seed: int = 1234, num_count: int = 0,
               style: str = "chat", trace: str = "direct", max_tries: int = 2) -> list[dict]:
    """Read (or generate) tasks and return at most `n` warm-start rows (0 = all).

    `num_count` keeps only tasks of that size (Countdown: that many numbers; 0 = any)."""
    spec = get_task(task)
    if num_count and spec.size is None:
        raise ValueError(f"--num_count: task {task!r} has no task size")
    if data_path in ("generate", "synthetic"):
        if spec.generate is None:
            raise ValueError(f"--data_path {data_path}: task {task!r} has no generator; pass a JSONL file")
        rows = spec.generate(n or 2000, seed, num_count)
    else:
        rows = [r for r in spec.load(data_path) if not num_count or spec.size(r) == num_count]
    return task_rows(spec, rows[:n] if n else rows, style, trace, max_tries, seed)


@dataclass
class WarmStartConfig:
    task: str = opt("countdown", "A task of step3_rlhf/tasks.", choices=TaskChoices())
    data_path: str = opt("generate", "A JSONL of tasks ({target, nums} or {question, answer}); 'generate' for "
                                     "built-in Countdown.")
    out: str = opt("", "Output JSONL (prompt/response rows for step 1).", required=True)
    n: int = opt(0, "Rows to write (0 = every task; 2000 when generating).")
    num_count: int = opt(0, "Only tasks of this size, e.g. Countdown tasks with this many numbers (0 = any).")
    seed: int = opt(1234, "Seed of the built-in Countdown generator.")
    prompt_style: str = opt("chat", "Must match step 3's --prompt_style (only chat can be rendered by step 1).",
                            choices=["chat"])
    tokenizer: str = opt("", "Check that step 1 and step 3 render the first row to the same prompt tokens.")
    trace: str = opt("direct", "direct = the solution's steps only (a chain that always reaches the target); "
                               "search = first up to --max_tries honest failed attempts, each ending 'not TARGET', "
                               "then the solution (Countdown), so the model learns to check and try again.",
                     choices=["direct", "search"])
    max_tries: int = opt(2, "With --trace search: failed attempts shown before a solution (0 to this many, drawn "
                            "per task).", min=0)


def main(argv=None) -> int:
    args = parse_config(WarmStartConfig, argv, description=__doc__.split("\n\n")[0])
    try:
        rows = build_rows(args.task, args.data_path, args.n, args.seed, args.num_count, args.prompt_style,
                          args.trace, args.max_tries)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not rows:
        print("error: no rows (no solvable task matched)", file=sys.stderr)
        return 2
    if args.tokenizer:
        from utils.models import load_tokenizer
        tok = load_tokenizer(args.tokenizer)
        first = rows[0]
        prompt = TaskPrompt(messages=first["prompt"], text=None, assistant_prefix=THINK_OPEN)
        if not rendering_matches(tok, prompt, first):
            print("error: step 1 and step 3 tokenise this prompt differently; the warm start would teach a "
                  "different prompt than the one step 3 uses", file=sys.stderr)
            return 2
        print(f"[warm_start] step-1 and step-3 prompt tokens agree for {args.tokenizer}", file=sys.stderr)
    write_jsonl(rows, args.out)
    print(f"[warm_start] wrote {len(rows)} {args.task} rows to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
