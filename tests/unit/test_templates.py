"""rlhf_ops.data.templates (and SFT's row_segments): rows -> [Segment(text, train)].

Expected strings are written out by hand from the tiny chat format (BOS, then
`<|role|>\\n{content}<|end|>\\n` per message, `<|assistant|>\\n` as generation prompt), not
produced by the code under test.
"""
from __future__ import annotations

import json

import pytest

from rlhf_ops.data.sources import DataError
from rlhf_ops.data.templates import (Segment, as_messages, multiturn_segments, pair_segments, prompt_text,
                                     text_of)
from rlhf_ops.trainers.sft import SFTConfig, build_sft_set, row_segments

TEMPLATE = "User: {}\nAssistant: "
Q, A = "What is 47 + 38 - 19?", "47 + 38 = 85\n85 - 19 = 66\nAnswer: 66"


def chat_prompt(*users_and_assistants: str) -> str:
    """Hand-rendered tiny chat: alternating user/assistant contents, then the generation prompt."""
    out = "<|bos|>"
    for i, content in enumerate(users_and_assistants):
        role = "user" if i % 2 == 0 else "assistant"
        out += f"<|{role}|>\n{content}<|end|>\n"
    return out + "<|assistant|>\n"


def sft_cfg(**kw) -> SFTConfig:
    base = dict(pretrain="tiny-model", dataset="unused", input_key="input", output_key="output")
    return SFTConfig(**{**base, **kw})


def read_rows(d, name, split="train", n=None):
    lines = (d / name / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(x) for x in lines[:n]]


# --- plain input / output ----------------------------------------------------------------------


def test_input_template_renders_prompt_exactly_and_response_verbatim(tiny_tokenizer):
    segs = pair_segments(Q, A, tiny_tokenizer, apply_chat_template=False, input_template=TEMPLATE, where="r0")
    assert segs == [Segment("User: What is 47 + 38 - 19?\nAssistant: ", False), Segment(A, True)]


def test_without_input_template_the_prompt_is_the_raw_input(tiny_tokenizer):
    segs = pair_segments(Q, A, tiny_tokenizer, apply_chat_template=False, input_template=None, where="r0")
    assert segs == [Segment(Q, False), Segment(A, True)]


def test_row_segments_plain_uses_input_and_output_keys(tiny_tokenizer):
    segs = row_segments({"input": Q, "output": A}, sft_cfg(input_template=TEMPLATE), tiny_tokenizer, "r0")
    assert segs == [Segment(TEMPLATE.format(Q), False), Segment(A, True)]


def test_pretrain_mode_row_is_one_trained_segment_of_input_plus_output(tiny_tokenizer):
    segs = row_segments({"input": Q, "output": A}, sft_cfg(pretrain_mode=True), tiny_tokenizer, "r0")
    assert segs == [Segment(Q + A, True)]
    segs = row_segments({"text": "Just text."}, sft_cfg(pretrain_mode=True, input_key="text", output_key=None),
                        tiny_tokenizer, "r0")
    assert segs == [Segment("Just text.", True)]


def test_message_list_input_without_chat_template_raises_data_error_naming_the_row(tiny_tokenizer):
    msgs = [{"role": "user", "content": Q}]
    with pytest.raises(DataError, match=r"data\.jsonl \(train\) row 3: input is a list; .*--apply_chat_template"):
        pair_segments(msgs, A, tiny_tokenizer, apply_chat_template=False, input_template=TEMPLATE,
                      where="data.jsonl (train) row 3")
    with pytest.raises(DataError, match=r"row 5: output is a list; .*--apply_chat_template"):
        pair_segments(Q, [{"role": "assistant", "content": A}], tiny_tokenizer, apply_chat_template=False,
                      input_template=None, where="row 5")
    with pytest.raises(DataError, match=r"row 9: input is a list; .*--apply_chat_template"):
        prompt_text(msgs, tiny_tokenizer, apply_chat_template=False, input_template=None, where="row 9")


def test_build_sft_set_names_the_file_and_row_of_a_message_list_input(tiny_tokenizer, tmp_path):
    path = tmp_path / "msgs.jsonl"
    rows = [{"input": [{"role": "user", "content": f"q{i}"}], "output": f"a{i}"} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = sft_cfg(dataset=str(path), input_template=TEMPLATE)
    with pytest.raises(DataError) as e:
        build_sft_set(cfg, tiny_tokenizer, str(path), "train")
    assert str(e.value).startswith(f"{path} (train) row 0: input is a list")
    assert "--apply_chat_template" in str(e.value)


# --- chat template -----------------------------------------------------------------------------


def test_chat_pair_masks_prompt_with_generation_prompt_and_trains_content_plus_end(tiny_tokenizer):
    segs = pair_segments(Q, A, tiny_tokenizer, apply_chat_template=True, input_template=None, where="r0")
    assert segs == [Segment(chat_prompt(Q), False), Segment(A + "<|end|>\n", True)]


def test_input_template_is_ignored_with_the_chat_template(tiny_tokenizer):
    with_t = pair_segments(Q, A, tiny_tokenizer, apply_chat_template=True, input_template=TEMPLATE, where="r0")
    without = pair_segments(Q, A, tiny_tokenizer, apply_chat_template=True, input_template=None, where="r0")
    assert with_t == without == [Segment(chat_prompt(Q), False), Segment(A + "<|end|>\n", True)]
    assert "User:" not in text_of(with_t)
    assert prompt_text(Q, tiny_tokenizer, apply_chat_template=True, input_template=TEMPLATE,
                       where="r0") == chat_prompt(Q)


def test_whole_conversation_in_input_key_trains_only_the_last_assistant_turn(tiny_tokenizer):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": Q}, {"role": "assistant", "content": A}]
    cfg = sft_cfg(input_key="messages", output_key=None, apply_chat_template=True)
    segs = row_segments({"messages": conv}, cfg, tiny_tokenizer, "r0")
    assert segs == [Segment(chat_prompt("Hi", "Hello", Q), False), Segment(A + "<|end|>\n", True)]


def test_conversation_not_ending_with_assistant_raises(tiny_tokenizer):
    with pytest.raises(DataError, match=r"row 2: the last message must be the assistant's, got role 'user'"):
        pair_segments(None, [{"role": "user", "content": Q}], tiny_tokenizer, apply_chat_template=True,
                      input_template=None, where="row 2")


def test_chat_template_that_is_not_prefix_stable_raises(tiny_tokenizer):
    class Unstable:  # renders the generation prompt differently from a finished conversation
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            body = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
            return body + ("<assistant>\n" if add_generation_prompt else "")  # a turn has no "\n"

    with pytest.raises(DataError, match=r"row 4: the chat template does not render the conversation as an extension"):
        pair_segments(Q, A, Unstable(), apply_chat_template=True, input_template=None, where="row 4")


def test_as_messages_rejects_malformed_values():
    assert as_messages("x", "w") == [{"role": "user", "content": "x"}]
    assert as_messages("x", "w", role="assistant") == [{"role": "assistant", "content": "x"}]
    with pytest.raises(DataError, match=r"^row 1: expected a string or a list of \{role, content\} messages"):
        as_messages([{"role": "user"}], "row 1")
    with pytest.raises(DataError, match=r"^row 1: expected"):
        as_messages(7, "row 1")


# --- RL prompts --------------------------------------------------------------------------------


def test_prompt_text_for_rl_prompts(tiny_tokenizer, builtin_data_dir):
    plain = read_rows(builtin_data_dir, "prompts", n=3)
    chat_rows = read_rows(builtin_data_dir, "prompts_chat", n=3)
    for p, c in zip(plain, chat_rows):
        q = p["input"]
        assert prompt_text(q, tiny_tokenizer, apply_chat_template=False, input_template=TEMPLATE,
                           where="r") == f"User: {q}\nAssistant: "
        assert prompt_text(q, tiny_tokenizer, apply_chat_template=False, input_template=None, where="r") == q
        assert prompt_text(c["context_messages"], tiny_tokenizer, apply_chat_template=True, input_template=None,
                           where="r") == chat_prompt(q)
        assert prompt_text(q, tiny_tokenizer, apply_chat_template=True, input_template=None,
                           where="r") == chat_prompt(q)


# --- multi-turn --------------------------------------------------------------------------------


def test_multiturn_segments_train_every_assistant_turn_and_no_user_turn(tiny_tokenizer, builtin_data_dir):
    for row in read_rows(builtin_data_dir, "sft_multiturn", n=5):
        msgs = row["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
        u1, a1, u2, a2 = (m["content"] for m in msgs)
        segs = multiturn_segments(msgs, tiny_tokenizer, "r")
        assert segs == [
            Segment(f"<|bos|><|user|>\n{u1}<|end|>\n<|assistant|>\n", False),
            Segment(f"{a1}<|end|>\n", True),
            Segment(f"<|user|>\n{u2}<|end|>\n<|assistant|>\n", False),
            Segment(f"{a2}<|end|>\n", True),
        ]
        assert text_of(segs) == tiny_tokenizer.apply_chat_template(msgs, tokenize=False)


def test_multiturn_with_system_message_and_no_assistant(tiny_tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"}]
    assert multiturn_segments(msgs, tiny_tokenizer, "r") == [
        Segment("<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nq<|end|>\n<|assistant|>\n", False),
        Segment("a<|end|>\n", True)]
    with pytest.raises(DataError, match=r"^row 8: a --multiturn conversation has no assistant message"):
        multiturn_segments(msgs[:2], tiny_tokenizer, "row 8")
