"""Conversations: the records of a chat task, read, checked and rendered.

A chat task's record holds one field, ``messages``: a list of turns ``{"role", "content"}``
(OpenAI's layout). ``collect`` reads it from a column in OpenAI's layout (a content may be
an array of text parts, stored joined) or ShareGPT's (``{"from": "human" | "gpt" |
"system", "value"}``), or builds it from flat columns with a source's ``turns`` templates,
and stores it in OpenAI's layout. A conversation is an
optional system turn, then user and assistant turns alternating, starting with the user
and ending with the assistant; anything else is quarantined with its reason
(``problem``).

Rendering is the base model's chat template. The loss falls on every assistant turn:
``render`` finds each assistant turn's characters in the rendered text by rendering the
conversation up to the turn (with the generation prompt) and through it, so the markup
that ends the turn (ChatML's ``<|im_end|>``) is learned too (a tuned model must learn to
stop), while the markup that opens it is not. Transformers' ``return_assistant_tokens_mask``
would do this only for templates that carry ``{% generation %}`` markers, which most
(SmolLM2's, Llama's) do not; the prefix rendering works for every template whose
rendering of a conversation begins with its rendering of any earlier part, and a template
that does not is refused by name.
"""
from __future__ import annotations

import json
from typing import Any, NamedTuple

from pipelines.common import StageError

FIELD = "messages"  # a chat task's one field
ROLES = ("system", "user", "assistant")
# ShareGPT's speaker names (and OpenAI's own; ``developer`` is OpenAI's newer name for the system turn)
# -> the roles a chat template knows
_SPEAKERS = {"system": "system", "developer": "system", "human": "user", "user": "user", "gpt": "assistant",
             "assistant": "assistant"}


def role_of(speaker: str) -> str | None:
    """The chat-template role of a speaker's name (OpenAI's or ShareGPT's); None if unknown."""
    return _SPEAKERS.get(speaker)


Messages = list[dict[str, str]]


class Problem(NamedTuple):
    reason: str  # unknown_role | bad_content | empty_content | turn_order | no_assistant_turn | bad_value
    detail: str


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), f"a {type(value).__name__}")


def read(value: Any) -> tuple[Messages | None, Problem | None]:
    """A conversation as a source holds it -> (turns in OpenAI's layout, None) or (None, why not)."""
    if isinstance(value, str):  # a CSV or TSV cell holding the conversation as JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, Problem("bad_value", "a string that is not a JSON array of turns")
    if not isinstance(value, (list, tuple)) or not value:
        what = "an empty array" if isinstance(value, (list, tuple)) else _kind(value)
        return None, Problem("bad_value", f"{what}, not an array of turns ({{role, content}} or {{from, value}})")
    turns: Messages = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            return None, Problem("bad_value", f"turn {i} is {_kind(turn)}, not an object")
        layout = ("role", "content") if "role" in turn else ("from", "value") if "from" in turn else None
        if layout is None:
            return None, Problem("bad_value", f"turn {i} has neither `role` (OpenAI) nor `from` (ShareGPT)")
        speaker, content = turn.get(layout[0]), turn.get(layout[1])
        role = role_of(speaker) if isinstance(speaker, str) else None
        if role is None:
            return None, Problem("unknown_role", f"turn {i}: {layout[0]} {speaker!r} is none of "
                                                 f"{sorted(_SPEAKERS)}")
        if (text := content_text(content)) is None:
            return None, Problem("bad_content", f"turn {i} ({role}): {layout[1]} is {_kind(content)}, not a string "
                                                "or an array of text parts ({type: text, text})")
        content = text
        if not content.strip():
            return None, Problem("empty_content", f"turn {i} ({role}): {layout[1]} is empty or only whitespace")
        turns.append({"role": role, "content": content})
    return turns, order_problem(turns)


def content_text(content: Any) -> str | None:
    """A turn's content as text: a string as it is, or OpenAI's array of text parts
    (``[{"type": "text", "text": ...}, ...]``) joined; None for anything else (an image part).
    The server reads a message's content by this rule too."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) and len(p) == 2
            for p in content):
        return "".join(p["text"] for p in content)
    return None


def order_problem(turns: Messages) -> Problem | None:
    """Why ``turns`` is not [system], user, assistant, user, assistant, ..., assistant; or None."""
    if not any(t["role"] == "assistant" for t in turns):
        return Problem("no_assistant_turn", f"{len(turns)} turn(s), none of them the assistant's: nothing to learn")
    body = turns[1:] if turns[0]["role"] == "system" else turns
    for i, turn in enumerate(body, len(turns) - len(body)):
        expected = "user" if (i - (len(turns) - len(body))) % 2 == 0 else "assistant"
        if turn["role"] != expected:
            return Problem("turn_order", f"turn {i} is {turn['role']}'s where {expected}'s was due (a system turn "
                                         "only first, then user and assistant alternating from the user)")
    if body[-1]["role"] != "assistant":
        return Problem("turn_order", f"the last turn ({len(turns) - 1}) is the user's: a conversation ends "
                                     "with the answer it teaches")
    return None


def with_system(turns: Messages, system: str) -> Messages:
    """``turns`` opening with the task's default system prompt where they have none of their own."""
    if system and turns and turns[0]["role"] != "system":
        return [{"role": "system", "content": system}, *turns]
    return turns


def opening(turns: Messages) -> str:
    """What a conversation's group is judged by: its system prompt and first user turn (the same
    question asked twice, answered differently, is one group and lands in one split)."""
    head = turns[:2] if turns[0]["role"] == "system" else turns[:1]
    return "\n".join(t["content"] for t in head)


def as_text(turns: Messages) -> str:
    """A conversation as one text (dedup, previews): each turn as ``role: content``."""
    return "\n".join(f"{t['role']}: {t['content']}" for t in turns)


class Rendered(NamedTuple):
    text: str  # the conversation in the chat template
    spans: list[tuple[int, int]]  # [start, end) characters of each assistant turn, its closing markup included


def _template(tokenizer, turns: Messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)


def render(tokenizer, turns: Messages) -> Rendered:
    """The conversation in ``tokenizer``'s chat template, and where each assistant turn is in it."""
    text = _template(tokenizer, turns, False)
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before, through = _template(tokenizer, turns[:i], True), _template(tokenizer, turns[:i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise StageError("the base model's chat template renders a conversation's start differently from the "
                             "whole conversation, so the assistant turns cannot be located for the loss; a chat "
                             "task needs a template whose rendering grows turn by turn (ChatML, Llama's, ...)")
        spans.append((len(before), len(through)))
    return Rendered(text, spans)


def prompt(tokenizer, turns: Messages) -> str:
    """The input for the conversation's next assistant turn: ``turns`` and the generation prompt."""
    return _template(tokenizer, turns, True)
