"""Check data files before training: every problem, one line each, then a summary.

    python -m utils.data.validate FILE [FILE...] [--stage 1|2|3] [--max_seq_len N] [--max_chars N]
                                  [--tokenizer DIR]

Reads each source with the training readers in skip mode (so the rules are exactly the ones training
applies), then adds checks that need the whole set: what `--stage` needs of each row (step 1 a reply,
step 2 chosen and rejected, step 3 a prompt), the per-field character cap training applies before
tokenising (--max_field_chars, default 20 x --max_seq_len; flagged here, cut or refused in training
per --on_bad_rows), prompt length (characters of the rendered prompt with --max_chars, or tokens with
--tokenizer) and exact duplicates across all the files given. An empty source is a problem.
Prints "FILE:LINE: field 'F': problem" per problem and "N rows, K problems (kind: count, ...)".
Exit status: 0 clean, 1 problems found, 2 a file is missing/unreadable (or the arguments are wrong).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from utils.data.readers import read_source
from utils.data.rows import DataError, PreferenceRow, long_fields, stage_problem
from utils.data.templates import format_prompt
from utils.options import ConfigError, check_fields, opt, parse_config

SOURCE_FATAL = ("unreadable", "unknown_source")
DEFAULT_MAX_SEQ_LEN = 512  # the stages' default --max_seq_len
CHARS_PER_TOKEN = 20       # as utils.data.pipeline.CHARS_PER_TOKEN (not imported: that module needs torch)


def prompt_length_problems(rows: list[PreferenceRow], max_chars: int | None, tokenizer,
                           max_seq_len: int | None) -> list[DataError]:
    problems = []
    for row in rows:
        text = format_prompt(tokenizer, row.prompt)
        if max_chars is not None and len(text) > max_chars:
            problems.append(DataError.at(row.origin, "prompt", f"too long: {len(text)} characters "
                                         f"(limit {max_chars})", "too_long"))
        if tokenizer is not None and max_seq_len is not None:
            from utils.data.datasets import tokenize_prompt
            n_tokens = len(tokenize_prompt(tokenizer, row.prompt))
            if n_tokens >= max_seq_len:
                problems.append(DataError.at(row.origin, "prompt", f"too long: {n_tokens} tokens leave no "
                                             f"room for a reply in max_seq_len {max_seq_len}", "too_long"))
    return problems


def row_problems(rows: list[PreferenceRow], stage: int | None, field_cap: int | None) -> list[DataError]:
    """What `stage` (1, 2, 3) needs of each row, and fields over the character cap."""
    problems = []
    for row in rows:
        problem = stage_problem(row, stage - 1) if stage else None
        if problem is not None:
            problems.append(problem)
        for name, n in long_fields(row, field_cap) if field_cap else []:
            problems.append(DataError.at(row.origin, name, f"too long: {n} characters, over the cap of {field_cap} "
                                         "(20 x max_seq_len); training cuts it (--on_bad_rows skip) or stops "
                                         "(error)", "too_long"))
    return problems


def validate(paths: list[str], max_chars: int | None = None, tokenizer=None, max_seq_len: int | None = None,
             out=None, stage: int | None = None, field_cap: int | None = None) -> int:
    """Print every problem and the summary (to `out`, default stdout); return the exit status."""
    out = out or sys.stdout
    seen: dict = {}  # shared, so duplicates are found across files too
    n_rows, kinds, fatal = 0, Counter(), False
    for path in paths:
        try:
            source = read_source(path, on_bad_rows="skip", seen=seen)
        except DataError as err:
            print(str(err), file=out)
            kinds[err.kind] += 1
            fatal = fatal or err.kind in SOURCE_FATAL
            continue
        parts = [source.train] + ([source.eval] if source.eval else [])
        for part in parts:
            for message in part.skipped:
                print(message, file=out)
            kinds.update(part.kinds)
            n_rows += len(part.rows) + len(part.skipped)
            problems = row_problems(part.rows, stage, field_cap) + \
                prompt_length_problems(part.rows, max_chars, tokenizer, max_seq_len)
            for problem in problems:
                print(str(problem), file=out)
                kinds[problem.kind] += 1
    total = sum(kinds.values())
    by_kind = ", ".join(f"{kind}: {count}" for kind, count in sorted(kinds.items()))
    print(f"{n_rows} rows, {total} problems" + (f" ({by_kind})" if by_kind else ""), file=out)
    return 2 if fatal else (1 if total else 0)


@dataclass
class ValidateConfig:
    files: list = opt([], "files, directories or dataset names (as --data_path)", positional=True)
    stage: Optional[int] = opt(None, "also check what this stage needs: 1 a reply, 2 chosen and rejected, 3 a prompt",
                               choices=[1, 2, 3])
    max_chars: Optional[int] = opt(None, "flag prompts longer than this")
    tokenizer: Optional[str] = opt(None, "tokenizer directory for the token-length check")
    max_seq_len: Optional[int] = opt(None, f"the training --max_seq_len: the token-length check (with --tokenizer) "
                                           f"and the per-field character cap, {CHARS_PER_TOKEN} x it (default "
                                           f"{DEFAULT_MAX_SEQ_LEN})")
    max_field_chars: int = opt(0, "the training --max_field_chars (0 = 20 x --max_seq_len)", min=0)

    def validate(self):
        check_fields(self)
        if self.tokenizer is not None and self.max_seq_len is None:
            raise ConfigError("--tokenizer needs --max_seq_len (the token-length check)")


def main(argv=None) -> int:
    args = parse_config(ValidateConfig, argv, description="Validate preference/SFT/prompt data files.",
                        formatter_class=argparse.HelpFormatter)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        except (OSError, ValueError) as err:
            print(f"{args.tokenizer}: cannot load tokenizer: {str(err).splitlines()[0]}", file=sys.stderr)
            return 2
    field_cap = args.max_field_chars or CHARS_PER_TOKEN * (args.max_seq_len or DEFAULT_MAX_SEQ_LEN)
    return validate(args.files, args.max_chars, tokenizer, args.max_seq_len if tokenizer else None,
                    stage=args.stage, field_cap=field_cap)


if __name__ == "__main__":
    raise SystemExit(main())
