"""Prompt layout of the local causal-LM helper: framing and truncation."""

import copy

import pytest

from pix2cap.modeling.caption_head.tokenizer import build_caption_tokenizer
from pix2cap.modeling.language_model import PromptLayout

PROMPT = "a large red striped circle to the left of the blue star " * 8


@pytest.fixture(scope="module")
def tokenizer():
    # A copy: the cached caption tokenizer is shared and must not gain a chat template.
    return copy.deepcopy(build_caption_tokenizer())


def test_raw_prompt_is_framed_and_cut_inside_the_text(tokenizer):
    layout = PromptLayout(tokenizer, use_chat_template=False)
    text = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    full = layout.prompt_ids(PROMPT)
    assert full == [tokenizer.cls_token_id] + text + [tokenizer.sep_token_id]
    cut = layout.prompt_ids(PROMPT, max_tokens=12)
    assert cut == [tokenizer.cls_token_id] + text[:10] + [tokenizer.sep_token_id]
    assert layout.prompt_ids(PROMPT, max_tokens=len(full)) == full
    with pytest.raises(ValueError, match="no room for text"):
        layout.prompt_ids(PROMPT, max_tokens=2)


def test_chat_prompt_keeps_the_generation_prompt_when_cut(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = (
        # Special tokens the tokenizer knows stand in for a real template's turn markers.
        "{% for m in messages %}[CLS] {{ m['content'] }} [SEP]{% endfor %}"
        "{% if add_generation_prompt %} [MASK]{% endif %}"
    )
    layout = PromptLayout(chat)
    assert layout.chat
    full = layout.prompt_ids(PROMPT)
    marker = chat.mask_token_id
    assert full[-1] == marker
    cut = layout.prompt_ids(PROMPT, max_tokens=20)
    assert len(cut) <= 20
    # The turn is closed and the answer marker follows, although the text was cut.
    assert cut[-2:] == [chat.sep_token_id, marker]
    assert cut[:3] == full[:3]
