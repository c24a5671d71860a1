"""Multi-turn chat: the second question's prompt is the whole conversation rendered as in training, ending
with that question and the generation cue; truncation drops the oldest exchanges, never the newest turn."""
import pytest

from inference.chatbot import ChatModel, chat_turn, fit_history
from utils.data.datasets import tokenize_prompt
from utils.data.templates import format_prompt

FIRST, SECOND = "What is the capital of France?", "How many legs does a spider have?"
HISTORY = [{"role": "user", "content": FIRST}, {"role": "assistant", "content": "Paris."}]


@pytest.fixture(params=[True, False], ids=["chat_template", "hh_text"])
def tokenizer(request, tmp_path):
    from tests.tiny import build_tiny_tokenizer
    return build_tiny_tokenizer(str(tmp_path), chat_template=request.param)


def test_second_turn_prompt_ends_with_second_question(tokenizer):
    messages, ids = fit_history(tokenizer, HISTORY, SECOND, budget=None)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    cue = "<|im_start|>assistant\n" if tokenizer.chat_template else "\n\nAssistant:"
    rendered = format_prompt(tokenizer, messages)
    assert rendered.endswith(SECOND + ("<|im_end|>\n" if tokenizer.chat_template else "") + cue)
    assert rendered.index(FIRST) < rendered.index("Paris.") < rendered.index(SECOND)  # in order, once each
    assert rendered.count(FIRST) == 1 and rendered.count(SECOND) == 1
    assert text.replace(" ", "").endswith((SECOND + ("<|im_end|>\n" if tokenizer.chat_template else "")
                                           + cue).replace(" ", ""))


def test_truncation_keeps_the_newest_turns(tokenizer):
    history = HISTORY + [{"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]
    full = len(tokenize_prompt(tokenizer, history[2:] + [{"role": "user", "content": SECOND}]))
    messages, ids = fit_history(tokenizer, history, SECOND, budget=full)
    assert [m["content"] for m in messages] == ["And of Italy?", "Rome.", SECOND]  # oldest exchange dropped
    # a budget below the newest turn alone: its LAST tokens (question + cue) are kept, not the oldest question
    messages, ids = fit_history(tokenizer, history, SECOND, budget=8)
    assert len(ids) == 8 and messages == [{"role": "user", "content": SECOND}]
    assert ids == tokenize_prompt(tokenizer, messages)[-8:]


def test_chat_turn_feeds_the_history_to_generation(tokenizer, monkeypatch):
    seen = []

    def fake_reply(chat, prompt_ids, args, stream):
        seen.append(chat.tokenizer.decode(prompt_ids, skip_special_tokens=False).replace(" ", ""))
        return ["Paris.", "Eight."][len(seen) - 1]
    monkeypatch.setattr("inference.chatbot.generate_reply", fake_reply)
    chat = ChatModel("m", model=None, tokenizer=tokenizer, budget=None)
    chat_turn([chat], None, FIRST, None, 1)
    records = chat_turn([chat], None, SECOND, None, 2)
    assert records[0]["answer"] == "Eight."
    assert "Paris." in seen[1] and seen[1].index(FIRST.replace(" ", "")) < seen[1].index(SECOND.replace(" ", ""))
    assert [m["content"] for m in chat.history] == [FIRST, "Paris.", SECOND, "Eight."]
