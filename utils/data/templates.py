"""How a prompt (chat messages) and a reply become text: the ONE rendering used by every stage.

With a tokenizer that has a chat template, the template renders the prompt (with the generation
cue) and the reply is followed by the template's end-of-turn marker (e.g. "<|im_end|>"), so the
model learns to close its turn the way it will be prompted at inference.

Without a chat template (OPT, GPT-2, base Llama), DeepSpeed-Chat's hh text is used, exactly the
layout of Dahoas/rm-static and Anthropic/hh-rlhf:
    "\\n\\nHuman: {user}\\n\\nAssistant: {assistant}\\n\\nHuman: {user}\\n\\nAssistant:"
and the reply is " " + reply, so prompt + reply reproduces a Dahoas row (prompt + chosen) byte for
byte. A system message is put first as plain text. The EOS token id is appended at tokenisation
(datasets.py), not here.
"""
from __future__ import annotations

import hashlib

HH_USER = "\n\nHuman: "
HH_ASSISTANT = "\n\nAssistant:"
_SENTINEL = "\u2063REPLY\u2063"
_end_of_turn_cache: dict[str, str] = {}


def uses_chat_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def render_hh_text(messages) -> str:
    """DeepSpeed-Chat hh text for a prompt, ending with the "\\n\\nAssistant:" cue."""
    parts = []
    for msg in messages:
        if msg["role"] == "system":
            parts.append(msg["content"])
        elif msg["role"] == "user":
            parts.append(HH_USER + msg["content"])
        else:
            parts.append(HH_ASSISTANT + " " + msg["content"])
    return "".join(parts) + HH_ASSISTANT


def format_prompt(tokenizer, messages) -> str:
    """Prompt text ready for generation: the chat template if the tokenizer has one, else hh text."""
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True,
                                             tokenize=False)
    return render_hh_text(messages)


def end_of_turn(tokenizer) -> str:
    """The text a chat template puts right after an assistant message (trailing whitespace dropped),
    found by rendering a one-exchange conversation; "" when there is no template."""
    if not uses_chat_template(tokenizer):
        return ""
    template = tokenizer.chat_template
    if template not in _end_of_turn_cache:
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}],
                tokenize=False)
            cut = text.rfind(_SENTINEL)
            marker = text[cut + len(_SENTINEL):].rstrip() if cut >= 0 else ""
        except Exception:  # noqa: BLE001 - an odd template just gets no end-of-turn marker
            marker = ""
        _end_of_turn_cache[template] = marker
    return _end_of_turn_cache[template]


def response_text(tokenizer, reply: str) -> str:
    """What follows the prompt in training text: reply + end-of-turn (chat template) or " " + reply."""
    if uses_chat_template(tokenizer):
        return reply + end_of_turn(tokenizer)
    return " " + reply


def template_id(tokenizer) -> str:
    """A short name of the rendering in use, for cache keys and logs."""
    if uses_chat_template(tokenizer):
        return "chat:" + hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()[:16]
    return "hh-text"


# Markers that open a user turn / close it, for the common chat layouts (ChatML, Llama-2/3, Gemma, hh text).
_USER_TURNS = (("<|im_start|>user", "<|im_end|>"), ("<|start_header_id|>user<|end_header_id|>", "<|eot_id|>"),
               ("<start_of_turn>user", "<end_of_turn>"), ("[INST]", "[/INST]"), ("Human:", "Assistant:"))


def last_user_message(prompt_text: str) -> str:
    """The last user turn of a rendered prompt (what a person asked), for tables and logs; the whole text
    when no known layout matches. A Llama-2 <<SYS>> block inside the turn is dropped."""
    for opener, closer in _USER_TURNS:
        start = prompt_text.rfind(opener)
        if start < 0:
            continue
        body = prompt_text[start + len(opener):]
        end = body.find(closer)
        body = body[:end] if end >= 0 else body
        if "<</SYS>>" in body:
            body = body.split("<</SYS>>", 1)[1]
        return body.strip()
    return prompt_text.strip()
