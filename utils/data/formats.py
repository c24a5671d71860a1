"""Field conventions: one function per source layout, mapping a raw record (dict) to a PreferenceRow.

A mapper takes (record, origin) - the reader has checked that record is a dict - and returns a
validated PreferenceRow, or None for a record that is not a preference by construction (a webgpt
tie). It raises DataError for a bad record.
The Hub conventions follow DeepSpeed-Chat's raw_datasets.py, with two deliberate differences:
webgpt ties are dropped (upstream silently called answer_0 the winner) and only numeric citations
like "[1]" are stripped (upstream also deleted every parenthesised phrase).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

from utils.data.rows import (MISSING, DataError, PreferenceRow, check_text, make_row, parse_hh_text,
                             prompt_messages, require_text)

Mapper = Callable[[dict, str], Optional[PreferenceRow]]

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
_CITATION = re.compile(r"\s?\[\d+(?:\s*[,\-\u2013]\s*\d+)*\]")


REPLY_FIELDS = ("chosen", "response", "completion", "output")  # an SFT reply, in order of precedence


def map_generic(record: dict, origin: str) -> PreferenceRow:
    """Local files: {"prompt","chosen","rejected"} (a preference); {"prompt"} + one of chosen, response,
    completion, output (SFT-only); {"prompt"} alone (prompt-only, step 3); Alpaca's {"instruction",
    "input", "output"}; or sharegpt. Which stage can use a row is checked later (rows.stage_problem)."""
    if "conversations" in record:
        return map_sharegpt(record, origin)
    if "prompt" not in record and "instruction" in record:
        return map_alpaca(record, origin)
    if "prompt" not in record:
        raise DataError.at(origin, "prompt", "missing", "missing_field")
    prompt = prompt_messages(record["prompt"], origin)
    if "rejected" in record:
        return make_row(origin, prompt, require_text(record, "chosen", origin),
                        require_text(record, "rejected", origin))
    reply = next((name for name in REPLY_FIELDS if name in record), None)
    if reply is None:
        return make_row(origin, prompt, None, None)
    return make_row(origin, prompt, require_text(record, reply, origin), None, ("prompt", reply, "rejected"))


def map_alpaca(record: dict, origin: str) -> PreferenceRow:
    """Alpaca: the instruction, then the optional input after a blank line, is the prompt; output the reply."""
    text = require_text(record, "instruction", origin).strip()
    extra = record.get("input")
    if extra is not None and check_text(extra, "input", origin).strip():
        text = f"{text}\n\n{extra.strip()}"
    reply = require_text(record, "output", origin) if "output" in record else None
    return make_row(origin, [{"role": "user", "content": text}], reply, None, ("instruction", "output", "rejected"))


def _sharegpt_turn(turn, where: str, origin: str) -> tuple[str, str]:
    if isinstance(turn, str):  # a bare string reply is accepted for chosen/rejected
        return "assistant", turn
    if not isinstance(turn, dict):
        raise DataError.at(origin, where, f"expected a {{'from','value'}} object, got {type(turn).__name__}",
                           "not_object")
    speaker = check_text(turn.get("from", turn.get("role", MISSING)), where + ".from", origin)
    if speaker not in SHAREGPT_ROLES:
        raise DataError.at(origin, where + ".from",
                           f"unsupported speaker {speaker!r} (use human, gpt or system)")
    value = check_text(turn.get("value", turn.get("content", MISSING)), where + ".value", origin)
    return SHAREGPT_ROLES[speaker], value


def map_sharegpt(record: dict, origin: str) -> PreferenceRow:
    """{"conversations":[{"from","value"}...], "chosen":{...}, "rejected":{...}} (LLaMA-Factory DPO);
    without chosen/rejected, a conversation ending with a gpt turn is an SFT-only row."""
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise DataError.at(origin, "conversations", f"expected a list, got {type(turns).__name__}")
    messages = [{"role": "system", "content": check_text(record["system"], "system", origin).strip()}] \
        if record.get("system") else []
    for i, turn in enumerate(turns):
        role, value = _sharegpt_turn(turn, f"conversations[{i}]", origin)
        messages.append({"role": role, "content": value.strip()})
    if "chosen" not in record and "rejected" not in record:
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError.at(origin, "chosen", "missing (and the conversation does not end with a "
                               "gpt turn to train on)", "missing_field")
        reply = messages.pop()["content"]
        return make_row(origin, messages, reply, None, ("conversations", "conversations", "rejected"))
    for name in ("chosen", "rejected"):
        if record.get(name) is None:
            raise DataError.at(origin, name, "missing" if name not in record else "null", "missing_field")
    _, chosen = _sharegpt_turn(record["chosen"], "chosen", origin)
    _, rejected = _sharegpt_turn(record["rejected"], "rejected", origin)
    return make_row(origin, messages, chosen, rejected, ("conversations", "chosen.value", "rejected.value"))


def map_hh_prompt(record: dict, origin: str) -> PreferenceRow:
    """Dahoas/rm-static, Dahoas/full-hh-rlhf: prompt is hh text ending "\\n\\nAssistant:", replies
    start with a space."""
    prompt = parse_hh_text(require_text(record, "prompt", origin))
    return make_row(origin, prompt, require_text(record, "chosen", origin),
                    require_text(record, "rejected", origin))


def map_plain_prompt(record: dict, origin: str) -> PreferenceRow:
    """Dahoas/synthetic-instruct-gptj-pairwise: a plain-text instruction and two plain replies."""
    prompt = [{"role": "user", "content": require_text(record, "prompt", origin).strip()}]
    return make_row(origin, prompt, require_text(record, "chosen", origin),
                    require_text(record, "rejected", origin))


def map_yitingxie(record: dict, origin: str) -> PreferenceRow:
    """yitingxie/rlhf-reward-datasets: hh-text prompt without the final "Assistant:"; replies may be
    prefixed " Assistant:" - upstream keeps the text after the last "Assistant:"."""
    prompt = parse_hh_text(require_text(record, "prompt", origin) + "Assistant:")
    chosen = require_text(record, "chosen", origin).split("Assistant:")[-1]
    rejected = require_text(record, "rejected", origin).split("Assistant:")[-1]
    return make_row(origin, prompt, chosen, rejected)


def split_last_assistant(transcript: str, field_name: str, origin: str) -> tuple[str, str]:
    """Split an hh transcript at its LAST "\\n\\nAssistant:" into (prompt text, reply)."""
    cut = transcript.rfind("\n\nAssistant:")
    if cut < 0:
        raise DataError.at(origin, field_name, 'no "\\n\\nAssistant:" turn to split the reply from')
    return transcript[:cut + len("\n\nAssistant:")], transcript[cut + len("\n\nAssistant:"):]


def map_anthropic_hh(record: dict, origin: str) -> PreferenceRow:
    """Anthropic/hh-rlhf: only full transcripts. The prompt is the chosen transcript up to its last
    Assistant turn; each reply is what follows the last Assistant turn of its own transcript."""
    prompt_text, chosen = split_last_assistant(require_text(record, "chosen", origin), "chosen", origin)
    _, rejected = split_last_assistant(require_text(record, "rejected", origin), "rejected", origin)
    return make_row(origin, parse_hh_text(prompt_text), chosen, rejected, ("chosen", "chosen", "rejected"))


def strip_citations(text: str) -> str:
    return _CITATION.sub("", text)


def _number(record: dict, name: str, origin: str) -> float:
    value = record.get(name)
    if value is None:
        raise DataError.at(origin, name, "missing" if name not in record else "null", "missing_field")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError.at(origin, name, f"expected a number, got {type(value).__name__}")
    return float(value)


def map_webgpt(record: dict, origin: str) -> PreferenceRow | None:
    """openai/webgpt_comparisons: question.full_text, answer_0/1 with score_0/1; ties are dropped."""
    question = record.get("question")
    if not isinstance(question, dict):
        raise DataError.at(origin, "question", "missing or not an object", "missing_field")
    text = check_text(question.get("full_text", MISSING), "question.full_text", origin)
    score_0, score_1 = _number(record, "score_0", origin), _number(record, "score_1", origin)
    if score_0 == score_1:
        return None
    answers = [strip_citations(require_text(record, f"answer_{i}", origin)) for i in (0, 1)]
    best = 0 if score_0 > score_1 else 1
    field_names = ("question.full_text", f"answer_{best}", f"answer_{1 - best}")
    return make_row(origin, [{"role": "user", "content": text.strip()}], answers[best], answers[1 - best],
                    field_names)


def map_shp(record: dict, origin: str) -> PreferenceRow:
    """stanfordnlp/SHP: history (a Reddit post), human_ref_A/B, labels = 1 when A is preferred."""
    history = require_text(record, "history", origin)
    label = record.get("labels")
    if label not in (0, 1) or isinstance(label, bool):
        raise DataError.at(origin, "labels", f"expected 0 or 1, got {label!r}",
                           "missing_field" if label is None else "bad_value")
    ref_a, ref_b = require_text(record, "human_ref_A", origin), require_text(record, "human_ref_B", origin)
    chosen, rejected = (ref_a, ref_b) if label == 1 else (ref_b, ref_a)
    names = ("history", "human_ref_A", "human_ref_B") if label == 1 else ("history", "human_ref_B", "human_ref_A")
    return make_row(origin, [{"role": "user", "content": history.strip()}], chosen, rejected, names)


@dataclass(frozen=True)
class HubSet:
    name: str
    mapper: Mapper
    eval_splits: tuple[str, ...] = ("test",)   # first one present is the eval split; none -> carve


HUB_SETS = {s.name: s for s in (
    HubSet("Dahoas/rm-static", map_hh_prompt),
    HubSet("Dahoas/full-hh-rlhf", map_hh_prompt),
    HubSet("Dahoas/synthetic-instruct-gptj-pairwise", map_plain_prompt, ()),
    HubSet("yitingxie/rlhf-reward-datasets", map_yitingxie),
    HubSet("Anthropic/hh-rlhf", map_anthropic_hh),
    HubSet("openai/webgpt_comparisons", map_webgpt, ()),
    HubSet("stanfordnlp/SHP", map_shp, ("validation", "test")),
)}


def hub_set_for(name: str) -> HubSet | None:
    """Known Hub set by exact name, or by a path whose last two components spell it (case-insensitive)."""
    parts = name.replace("\\", "/").rstrip("/").split("/")
    tail = "/".join(parts[-2:]).lower()
    for hub in HUB_SETS.values():
        if hub.name.lower() == tail:
            return hub
    return None
