"""Task definitions: what a task reads, how it is prompted, and how it is scored.

A task is data, not code. Adding one means adding an entry to ``TASKS`` and declaring
its sources under ``collect.sources.<name>`` in params.yaml (files committed under
``data/sources/<name>/``); no stage changes. Templates are Jinja2 over the record's fields.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Task:
    name: str
    kind: Literal["generation", "classification"]
    fields: tuple[str, ...]
    group_key: str  # records sharing this field always land in the same split
    prompt: str  # Jinja2 template of the tuned model's input
    target: str  # Jinja2 template of what the model learns to produce
    zero_shot: str  # hand-written instruction for the untuned base model (chat template)
    target_field: str
    labels: dict[str, str] = field(default_factory=dict)  # label value -> verbalizer
    max_target_words: int = 80
    text_fields: tuple[str, ...] = ()  # fields the length filters apply to
    primary_metric: str = "bleu"


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            name="e2e",
            kind="generation",
            fields=("mr", "ref"),
            group_key="mr",  # all references of one meaning representation share a split
            prompt="Attributes: {{ mr }}\nDescription:",
            target=" {{ ref }}",
            zero_shot=(
                "Write one fluent sentence that describes a restaurant using exactly these "
                "attributes, and nothing else.\nAttributes: {{ mr }}"
            ),
            target_field="ref",
            text_fields=("mr", "ref"),
            primary_metric="bleu",
        ),
        Task(
            name="sst2",
            kind="classification",
            fields=("sentence", "label"),
            group_key="sentence",
            prompt="Review: {{ sentence }}\nSentiment:",
            target=" {{ verbalizer }}",
            zero_shot=(
                "Is the sentiment of this movie review positive or negative? "
                "Answer with one word.\nReview: {{ sentence }}"
            ),
            target_field="label",
            labels={"0": "negative", "1": "positive"},
            text_fields=("sentence",),
            primary_metric="accuracy",
        ),
        Task(
            # Stack Exchange question -> its accepted answer. The dirty corpus: raw HTML
            # bodies, code blocks, LaTeX, duplicates (the clean stage turns them into text).
            name="stackexchange_qa",
            kind="generation",
            fields=("title", "question", "answer"),
            group_key="title",  # one question per record; equal titles (reposts) share a split
            prompt="Question: {{ title }}\n{{ question }}\nAnswer:",
            target=" {{ answer }}",
            zero_shot=(
                "Answer this question from a Stack Exchange site in a few sentences.\n"
                "Question: {{ title }}\n{{ question }}"
            ),
            target_field="answer",
            text_fields=("title", "question", "answer"),
            primary_metric="rouge_l",  # answers are free text with many valid wordings; BLEU is too strict
        ),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; defined tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def label_key(value, labels: dict[str, str]) -> str | None:
    """The one of ``labels`` a label field's value names, or None: a string as it is; a
    number or boolean by its value (SST-2's 1 -> "1", 1.0 -> "1"; true -> "true" where the
    task has that label, else "1"). Collect and tokenize judge a label by this one rule."""
    if isinstance(value, str):
        names: tuple[str, ...] = (value,)
    elif isinstance(value, bool):
        names = (json.dumps(value), str(int(value)))
    elif isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        names = (str(int(value)),)
    else:
        return None
    return next((n for n in names if n in labels), None)
