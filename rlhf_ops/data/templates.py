"""Turn a data row into text segments, each marked as trained-on or not.

Every stage that tokenizes conversations (SFT, RM, DPO, RL prompts) goes through here, so the
chat template and `--input_template` mean the same thing everywhere. A row becomes a list of
`Segment(text, train)`; tokenizing the segments one by one and concatenating gives token ids
whose loss mask is exact, with no search for the response boundary afterwards.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

from rlhf_ops.data.sources import DataError


class Segment(NamedTuple):
    text: str
    train: bool


Messages = list[dict[str, str]]


def as_messages(value: Any, where: str, role: str = "user") -> Messages:
    """A message list from a row value: a string becomes one message of `role`."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, (list, tuple)) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{where}: expected a string or a list of {{role, content}} messages, got {str(value)[:80]!r}")


def chat(tokenizer: Any, messages: Messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _suffix(full: str, prefix: str, where: str) -> str:
    if not full.startswith(prefix):
        raise DataError(f"{where}: the chat template does not render the conversation as an extension of its "
                        "prompt, so the response boundary is ambiguous; pass --tokenizer_chat_template with one that does")
    return full[len(prefix):]


def prompt_text(value: Any, tokenizer: Any, *, apply_chat_template: bool, input_template: str | None, where: str) -> str:
    """The text a policy is prompted with (RL prompts, SFT/RM/DPO prompt part)."""
    if apply_chat_template:
        return chat(tokenizer, as_messages(value, where), add_generation_prompt=True)
    if not isinstance(value, str):
        raise DataError(f"{where}: input is a {type(value).__name__}; message lists need --apply_chat_template")
    return input_template.format(value) if input_template else value


def pair_segments(prompt: Any, response: Any, tokenizer: Any, *, apply_chat_template: bool,
                  input_template: str | None, where: str) -> list[Segment]:
    """[prompt (no loss), response (loss)] for one prompt/response pair.

    With the chat template, `prompt` may be a string or messages and `response` a string or an
    assistant message list; `prompt=None` means `response` is the whole conversation and its last
    assistant turn is the response.
    """
    if apply_chat_template:
        if prompt is None:
            msgs = as_messages(response, where)
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"{where}: the last message must be the assistant's, got role {msgs[-1]['role']!r}")
            head, msgs_all = msgs[:-1], msgs
        else:
            head = as_messages(prompt, where)
            tail = as_messages(response, where, role="assistant")
            msgs_all = head + tail
        p = chat(tokenizer, head, add_generation_prompt=True)
        return [Segment(p, False), Segment(_suffix(chat(tokenizer, msgs_all), p, where), True)]
    if not isinstance(response, str):
        raise DataError(f"{where}: output is a {type(response).__name__}; message lists need --apply_chat_template")
    p = "" if prompt is None else prompt_text(prompt, tokenizer, apply_chat_template=False,
                                               input_template=input_template, where=where)
    return [Segment(p, False), Segment(response, True)]


def multiturn_segments(messages: Any, tokenizer: Any, where: str) -> list[Segment]:
    """Loss on every assistant turn of a conversation (`--multiturn`)."""
    msgs = as_messages(messages, where)
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: a --multiturn conversation has no assistant message")
    segments: list[Segment] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = chat(tokenizer, msgs[:i], add_generation_prompt=True)
        upto = chat(tokenizer, msgs[: i + 1])
        segments.append(Segment(_suffix(prefix, done, where), False))
        segments.append(Segment(_suffix(upto, prefix, where), True))
        done = upto
    return [s for s in segments if s.text]


def text_of(segments: Sequence[Segment]) -> str:
    return "".join(s.text for s in segments)
