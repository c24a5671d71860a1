"""The one row type every reader produces, the one error type every reader raises, and row validation.

Every source format (local JSON/JSONL, sharegpt, DeepSpeed-Chat hh text, Hub sets) is mapped to
`PreferenceRow` by `make_row`, so all formats are checked by the same rules:
  - text fields must be strings of valid unicode (undecodable bytes read with `surrogateescape`
    show up here as lone surrogates, so non-UTF-8 input is caught with the field that holds it);
  - the prompt is a non-empty list of chat messages ending with a user turn;
  - chosen is non-empty after stripping, and differs from rejected.
Problems are `DataError("ORIGIN: field 'F': problem")`, one line, with a `kind` used for summaries.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")
_SURROGATE = re.compile("[\ud800-\udfff]")

# hh text ("\n\nHuman: ...\n\nAssistant: ..."), the layout of Dahoas/rm-static and Anthropic/hh-rlhf.
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
# DeepSpeed-Chat's one-line form (" Human: ... Assistant:"), used by its synthetic/SHP/webgpt prompts.
_INLINE_TURN = re.compile(r"(?:^|\s)(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class PreferenceRow:
    prompt: tuple[dict, ...]   # chat messages, ends with a user turn
    chosen: str | None         # preferred assistant reply, stripped; None for prompt-only rows (step 3)
    rejected: str | None       # None for SFT-only and prompt-only rows
    origin: str                # "path:line" or "hub-name[split]:index", used in every error message


class DataError(ValueError):
    """A data problem, as one line "ORIGIN: field 'F': problem". `kind` groups problems in summaries.

    kinds: bad_json, not_object, missing_field, null_field, not_string, not_utf8, empty, same_reply,
    bad_value, duplicate, too_long, wrong_stage (row problems); bad_file, unreadable, unknown_source,
    empty_source, all_bad (whole-source problems).
    """

    def __init__(self, message: str, kind: str = "bad_value"):
        super().__init__(message)
        self.kind = kind

    @classmethod
    def at(cls, origin: str, field_name: str, problem: str, kind: str = "bad_value") -> "DataError":
        return cls(f"{origin}: field '{field_name}': {problem}", kind)


@dataclass
class ReadReport:
    """Rows read from one source part, plus the messages (and kinds) of the rows dropped in skip mode."""
    rows: list[PreferenceRow]
    skipped: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)     # fields cut to the character cap (skip mode)


MISSING = object()  # a field that is absent, as opposed to present with the value null


def check_text(value, field_name: str, origin: str) -> str:
    """Return `value` if it is a string of valid unicode, else raise a DataError naming the field.
    Pass MISSING for an absent field; None is a field given as JSON null."""
    if value is MISSING:
        raise DataError.at(origin, field_name, "missing", "missing_field")
    if value is None:
        raise DataError.at(origin, field_name, "null (expected a string)", "null_field")
    if not isinstance(value, str):
        got = "dict" if isinstance(value, dict) else type(value).__name__  # readers give dict subclasses
        raise DataError.at(origin, field_name, f"expected a string, got {got}", "not_string")
    if _SURROGATE.search(value):
        raise DataError.at(origin, field_name,
                           "not valid UTF-8 text (undecodable bytes or lone surrogates)", "not_utf8")
    return value


def require_text(record: dict, field_name: str, origin: str) -> str:
    return check_text(record.get(field_name, MISSING), field_name, origin)


def looks_like_hh_text(text: str) -> bool:
    stripped = text.lstrip()
    return "\n\nHuman:" in text or "\n\nAssistant:" in text or stripped.startswith("Human:")


def parse_hh_text(text: str) -> list[dict]:
    """Turn "\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:" into chat messages.

    Text before the first turn becomes a system message; consecutive turns of one role are merged
    (hh data has a few "Assistant: ...\\n\\nAssistant: ..." runs, which most chat templates reject);
    the trailing empty "Assistant:" (the generation cue) is dropped.
    """
    body = text.strip()
    pattern = _HH_TURN if ("\n\nHuman:" in body or "\n\nAssistant:" in body) else _INLINE_TURN
    parts = pattern.split(body)
    messages: list[dict] = []
    if parts[0].strip():
        messages.append({"role": "system", "content": parts[0].strip()})
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role, content = _HH_ROLE[speaker], content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1] = {"role": role, "content": (messages[-1]["content"] + "\n\n" + content).strip()}
        else:
            messages.append({"role": role, "content": content})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def prompt_messages(value, origin: str, field_name: str = "prompt") -> list[dict]:
    """A prompt given as plain text, hh text, or a list of {"role","content"} messages -> messages."""
    if isinstance(value, list):
        messages = []
        for i, msg in enumerate(value):
            where = f"{field_name}[{i}]"
            if not isinstance(msg, dict):
                raise DataError.at(origin, where, f"expected a message object, got {type(msg).__name__}",
                                   "not_object")
            role = check_text(msg.get("role", MISSING), where + ".role", origin)
            if role not in ROLES:
                raise DataError.at(origin, where + ".role", f"unknown role {role!r} (use {', '.join(ROLES)})")
            content = check_text(msg.get("content", MISSING), where + ".content", origin)
            messages.append({"role": role, "content": content.strip()})
        return messages
    text = check_text(value, field_name, origin)
    if looks_like_hh_text(text):
        return parse_hh_text(text)
    return [{"role": "user", "content": text.strip()}]


def make_row(origin: str, prompt: list[dict], chosen, rejected, field_names=("prompt", "chosen", "rejected")
             ) -> PreferenceRow:
    """Validate and build a row. `rejected=None` means an SFT-only row, `chosen=rejected=None` a prompt-only
    row (step 3); `field_names` name the source fields in error messages (e.g. "conversations")."""
    f_prompt, f_chosen, f_rejected = field_names
    if not prompt:
        raise DataError.at(origin, f_prompt, "empty prompt (no messages)", "empty")
    if prompt[-1]["role"] != "user":
        raise DataError.at(origin, f_prompt, f"must end with a user turn, ends with {prompt[-1]['role']}")
    if not prompt[-1]["content"]:
        raise DataError.at(origin, f_prompt, "the last user turn is empty", "empty")
    if chosen is None and rejected is None:
        return PreferenceRow(prompt=tuple(prompt), chosen=None, rejected=None, origin=origin)
    chosen = check_text(chosen, f_chosen, origin).strip()
    if not chosen:
        raise DataError.at(origin, f_chosen, "empty reply", "empty")
    if rejected is not None:
        rejected = check_text(rejected, f_rejected, origin).strip()
        if not rejected:
            raise DataError.at(origin, f_rejected, "empty reply", "empty")
        if rejected == chosen:
            raise DataError.at(origin, f_rejected, "identical to chosen", "same_reply")
    return PreferenceRow(prompt=tuple(prompt), chosen=chosen, rejected=rejected, origin=origin)


def row_key(row: PreferenceRow) -> tuple:
    """Hashable identity of a row's content (for exact-duplicate detection)."""
    return (tuple((m["role"], m["content"]) for m in row.prompt), row.chosen, row.rejected)


# ---------------------------------------------------------------- per-stage needs and the character cap

STAGE_NEEDS = ("chosen", "rejected", None)  # the reply field each stage (0 SFT, 1 reward, 2 RLHF) cannot do without
_STAGE_WHY = ("step 1 (SFT) trains on a reply: give chosen, response, completion or output",
              "step 2 (reward model) compares two replies: give chosen and rejected", "")


def stage_problem(row: PreferenceRow, stage: int) -> DataError | None:
    """What this row lacks for `stage` (0, 1, 2), or None."""
    need = STAGE_NEEDS[stage] if 0 <= stage < len(STAGE_NEEDS) else None
    if need and getattr(row, need) is None:
        return DataError.at(row.origin, need, f"missing: {_STAGE_WHY[stage]}", "wrong_stage")
    return None


def long_fields(row: PreferenceRow, cap: int) -> list[tuple[str, int]]:
    """(field, characters) of every text field of `row` longer than `cap` characters."""
    out = [(f"prompt[{i}].content", len(m["content"])) for i, m in enumerate(row.prompt) if len(m["content"]) > cap]
    return out + [(name, len(text)) for name, text in (("chosen", row.chosen), ("rejected", row.rejected))
                  if text is not None and len(text) > cap]


def cap_row(row: PreferenceRow, cap: int | None, on_bad_rows: str, report: ReadReport) -> PreferenceRow:
    """Enforce the per-field character cap before tokenisation (a 5 MB field would otherwise be tokenised
    whole, then truncated): "error" raises naming the first long field; "skip" cuts each long field - a
    prompt keeps its END (the question), a reply its START, as token truncation would - and notes it."""
    if not cap:
        return row
    found = long_fields(row, cap)
    if not found:
        return row
    name, n = found[0]
    if on_bad_rows == "error":
        raise DataError.at(row.origin, name, f"too long: {n} characters, over the cap of {cap} (20 x max_seq_len, "
                           "--max_field_chars); --on_bad_rows skip cuts it", "too_long")
    report.cut.append(f"{row.origin}: field '{name}': {n} characters cut to {cap}")
    prompt = tuple({**m, "content": m["content"][-cap:]} for m in row.prompt)
    cut = lambda text: None if text is None else text[:cap]  # noqa: E731
    return PreferenceRow(prompt=prompt, chosen=cut(row.chosen), rejected=cut(row.rejected), origin=row.origin)
