"""Score responses with a reward model, or evaluate it on a preference file.

    python -m inference.score --reward_model DIR --prompt "Hi" --response "Hello!"
    python -m inference.score --reward_model DIR --input items.jsonl [--output scored.jsonl | --format table]
    cat items.jsonl | python -m inference.score --reward_model DIR
    python -m inference.score --reward_model DIR --pairs prefs.jsonl [--bootstrap 1000 --seed 1234] [--output r.json]

Items are JSON objects {"prompt", "response"} ("answer" is accepted too, so chatbot --output rows can be
scored); a prompt may be plain text, hh text ("\\n\\nHuman: ...") or a list
of chat messages. --pairs reads any file/dir/Hub layout the data layer reads (utils.data.readers). The reward
model sees exactly what step 2 trains on: format_prompt(prompt) + response_text(response) + EOS.
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from typing import Optional

from inference.common import (TRUNCATION_RULE, effective_max_len, encode_replies, load_for_inference,
                              quiet_transformers, score_items, score_sequences)
from utils.data.readers import parse_json_line, read_rows
from utils.data.rows import DataError, check_text, prompt_messages
from utils.preference_losses import pair_credit, pairwise_outcomes
from utils.models import ModelLoadError
from utils.options import ConfigError, check_fields, opt, parse_config


# ------------------------------------------------------------------------------------------ pure statistics
def bootstrap_ci(correct: list[float], n_resamples: int, seed: int, level: float = 0.95):
    """Percentile bootstrap interval of the mean of `correct` (each pair's credit: 1, 0.5 for a tie, or 0;
    resample pairs with replacement);
    None when n_resamples is 0 or there is no pair. Same seed -> same interval."""
    if n_resamples <= 0 or not correct:
        return None
    import numpy as np
    rng = np.random.default_rng(seed)
    values = np.asarray(correct, dtype=np.float64)
    means = values[rng.integers(0, len(values), size=(n_resamples, len(values)))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def pairwise_summary(chosen: list[float], rejected: list[float], n_resamples: int = 1000, seed: int = 1234) -> dict:
    """Accuracy (a tie counts half), strict accuracy (a tie counts wrong), ties, mean scores, mean margin,
    bootstrap CI of the accuracy."""
    n = len(chosen)
    credit = [pair_credit(c, r) for c, r in zip(chosen, rejected)]
    return {
        "n_pairs": n,
        **(pairwise_outcomes(chosen, rejected) if n else {"accuracy": 0.0, "accuracy_strict": 0.0,
                                                          "tie_fraction": 0.0}),
        "ci95": bootstrap_ci(credit, n_resamples, seed),
        "bootstrap": n_resamples,
        "seed": seed,
        "ties": sum(c == r for c, r in zip(chosen, rejected)),
        "mean_chosen": sum(chosen) / n if n else 0.0,
        "mean_rejected": sum(rejected) / n if n else 0.0,
        "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / n if n else 0.0,
    }


# ------------------------------------------------------------------------------------------ input
def parse_item(record, origin: str):
    """A {"prompt", "response"} object (or "answer", as the chatbot writes) -> (raw prompt, prompt messages,
    response). Checked like data rows, except that an empty response is scored (a model may answer nothing)."""
    if not isinstance(record, dict):
        raise DataError.at(origin, "(row)", f"expected a JSON object, got {type(record).__name__}", "not_object")
    if record.get("prompt") is None:
        raise DataError.at(origin, "prompt", "missing", "missing_field")
    response = record.get("response", record.get("answer"))  # "answer": the chatbot's --output rows
    if response is None:
        raise DataError.at(origin, "response", "missing", "missing_field")
    messages = prompt_messages(record["prompt"], origin)
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"]:
        raise DataError.at(origin, "prompt", "must end with a non-empty user turn", "empty")
    return record["prompt"], messages, check_text(response, "response", origin).strip()


def read_items(lines, name: str):
    """JSON Lines (blank lines skipped) -> parsed items; a bad line raises DataError "name:LINE: ..."."""
    items = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        origin = f"{name}:{lineno}"
        record = parse_json_line(line, origin)
        items.append(parse_item(record, origin))
    return items


def load_items(args):
    if args.prompt is not None:
        return [parse_item({"prompt": args.prompt, "response": args.response}, "--prompt")]
    if args.input:
        try:
            with open(args.input, encoding="utf-8", errors="surrogateescape") as fh:
                return read_items(fh, args.input)
        except OSError as err:
            raise DataError(f"{args.input}: cannot read: {err.strerror or err}", "unreadable") from None
    if sys.stdin.isatty():
        raise DataError("nothing to score: give --prompt/--response, --input FILE.jsonl, --pairs FILE, "
                        "or JSON lines on stdin", "unreadable")
    return read_items(sys.stdin, "<stdin>")


def read_pairs(path: str, on_bad_rows: str):
    report = read_rows(path, on_bad_rows)
    for message in report.skipped:
        print(f"skipped: {message}", file=sys.stderr)
    rows = []
    for row in report.rows:
        if row.rejected is None:
            raise DataError.at(row.origin, "rejected", "missing: an SFT-only row has no pair to compare",
                               "missing_field")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no preference pairs to evaluate", "empty")
    return rows


# ------------------------------------------------------------------------------------------ output
def _short(text: str, width: int) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[:max(1, width - 3)] + "..."


def format_table(records: list[dict]) -> str:
    """A readable table: #, score, prompt, response, each cell on one line (cut with "...")."""
    width = shutil.get_terminal_size((120, 24)).columns
    text_width = max(20, (width - 6 - 11 - 6) // 2)
    lines = [f"{'#':>4}  {'score':>9}  {'prompt':<{text_width}}  response", "-" * min(width, 120)]
    for i, rec in enumerate(records, 1):
        prompt = prompt_messages(rec["prompt"], "table")[-1]["content"]  # the question being answered
        lines.append(f"{i:>4}  {rec['score']:>9.4f}  {_short(prompt, text_width):<{text_width}}  "
                     f"{_short(rec['response'], text_width)}")
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    ci = summary["ci95"]
    ci_text = (f"95% CI [{ci[0]:.4f}, {ci[1]:.4f}] ({summary['bootstrap']} bootstrap resamples, "
               f"seed {summary['seed']})") if ci else "no bootstrap"
    return "\n".join([
        f"reward model:  {summary['reward_model']}",
        f"pairs:         {summary['n_pairs']} from {summary['pairs_file']} ({summary['n_truncated']} truncated "
        f"to max_seq_len {summary['max_seq_len']})",
        f"accuracy:      {summary['accuracy']:.4f}  {ci_text}  (a tie counts half)",
        f"ties:          {summary['ties']} ({summary['tie_fraction']:.1%}); strict accuracy (a tie counts wrong) "
        f"{summary['accuracy_strict']:.4f}",
        f"mean chosen:   {summary['mean_chosen']:+.4f}",
        f"mean rejected: {summary['mean_rejected']:+.4f}",
        f"mean margin:   {summary['mean_margin']:+.4f}",
    ])


def _open_output(path):
    return open(path, "w", encoding="utf-8") if path else sys.stdout


# ------------------------------------------------------------------------------------------ modes
def run_pairs(args, model, tokenizer, rows) -> dict:
    max_len = effective_max_len(model, args.max_seq_len)
    encoded = [encode_replies(tokenizer, row.prompt, [row.chosen, row.rejected], max_len) for row in rows]
    sequences = [e.input_ids for pair in encoded for e in pair]  # chosen_0, rejected_0, chosen_1, ...
    scores = score_sequences(model, sequences, tokenizer.pad_token_id, args.batch_size, not args.no_progress)
    summary = pairwise_summary(scores[0::2], scores[1::2], args.bootstrap, args.seed)
    summary.update(reward_model=args.reward_model, pairs_file=args.pairs, max_seq_len=max_len,
                   n_truncated=sum(c.truncated or r.truncated for c, r in encoded), truncation=TRUNCATION_RULE)
    return summary


def run_items(args, model, tokenizer, items) -> list[dict]:
    max_len = effective_max_len(model, args.max_seq_len)
    scores, truncated = score_items(model, tokenizer, [(messages, response) for _, messages, response in items],
                                    max_len, args.batch_size, not args.no_progress)
    records = []
    for (raw_prompt, _, response), score, cut in zip(items, scores, truncated):
        records.append({"prompt": raw_prompt, "response": response, "score": score, **({"truncated": True}
                                                                                          if cut else {})})
    return records


@dataclass
class ScoreConfig:
    reward_model: str = opt("", "Reward model dir (step 2 output) or Hub name.", required=True)
    prompt: Optional[str] = opt(None, "One prompt to score (with --response).")
    response: Optional[str] = opt(None, "The response to --prompt.")
    input: Optional[str] = opt(None, "JSONL file of {\"prompt\", \"response\"} objects (default: stdin).")
    pairs: Optional[str] = opt(None, "Preference file/dir/Hub set: report pairwise accuracy instead of scores.")
    output: Optional[str] = opt(None, "Write the JSONL scores (or the --pairs JSON report) here, not stdout.")
    format: str = opt("jsonl", "Output of item scores.", choices=["jsonl", "table"])
    batch_size: int = opt(8, "Sequences per forward pass.", min=1)
    max_seq_len: int = opt(512, "Max prompt+response tokens (0 = the model's context); see the truncation rule "
                                "below.", min=0)
    bootstrap: int = opt(1000, "Bootstrap resamples for the accuracy CI (0 = off).", min=0)
    seed: int = opt(1234, "Seed of the bootstrap.")
    on_bad_rows: str = opt("error", "A malformed --pairs row stops the run (exit 2) or is skipped and listed.",
                           choices=["error", "skip"])
    dtype: str = opt("auto", "Model dtype.", choices=["auto", "fp32", "bf16"])
    trust_remote_code: bool = opt(False, "Allow a Hub model's own code to run.")
    no_progress: bool = opt(False, "No tqdm progress bar.")

    def validate(self):
        check_fields(self)
        if (self.prompt is None) != (self.response is None):
            raise ConfigError("--prompt and --response go together")
        if self.pairs and (self.prompt is not None or self.input):
            raise ConfigError("--pairs evaluates a preference file; do not combine it with --prompt or --input")


def main(argv=None) -> int:
    args = parse_config(ScoreConfig, argv, description=__doc__.split("\n\n")[0], prog="python -m inference.score",
                        epilog=f"Truncation (--max_seq_len): {TRUNCATION_RULE}.")
    quiet_transformers()
    try:
        data = read_pairs(args.pairs, args.on_bad_rows) if args.pairs else load_items(args)
        model, tokenizer = load_for_inference(args.reward_model, kind="value", dtype=args.dtype,
                                              trust_remote_code=args.trust_remote_code)
        if args.pairs:
            summary = run_pairs(args, model, tokenizer, data)
            print(format_summary(summary))
            if args.output:
                with open(args.output, "w", encoding="utf-8") as fh:
                    json.dump(summary, fh, indent=2)
                    fh.write("\n")
            return 0
        records = run_items(args, model, tokenizer, data)
    except (DataError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = _open_output(args.output)
    try:
        if args.format == "table":
            out.write(format_table(records) + "\n")
        else:
            for rec in records:
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
