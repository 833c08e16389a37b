"""Task definitions: what a task reads, how it is prompted, and how it is scored.

A task is data, not code. Adding one means adding an entry to ``TASKS`` (and its
source files under ``data/sources/<name>/``); no stage changes. Templates are Jinja2
over the record's fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Source:
    name: str
    path: str  # relative to the project root
    format: Literal["csv", "tsv"]
    columns: dict[str, str]  # column in the file -> field of the task
    # Fractions of this source's groups per split; a source that *is* a split
    # (the SST-2 dev set used as test) says so with {"test": 1.0}.
    splits: dict[str, float]
    quoting: Literal["minimal", "none"] = "minimal"  # GLUE TSVs carry raw quote characters


@dataclass(frozen=True)
class Task:
    name: str
    kind: Literal["generation", "classification"]
    fields: tuple[str, ...]
    group_key: str  # records sharing this field always land in the same split
    sources: tuple[Source, ...]
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
            sources=(
                Source(
                    name="e2e_devel_fixed",
                    path="data/sources/e2e/devel-fixed.no-ol.csv",
                    format="csv",
                    columns={"mr": "mr", "ref": "ref"},
                    splits={"train": 0.8, "validation": 0.05, "test": 0.15},
                ),
            ),
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
            sources=(
                Source(
                    name="sst2_train",
                    path="data/sources/sst2/train.tsv",
                    format="tsv",
                    columns={"sentence": "sentence", "label": "label"},
                    splits={"train": 0.99, "validation": 0.01},
                    quoting="none",
                ),
                Source(
                    name="sst2_dev",
                    path="data/sources/sst2/dev.tsv",
                    format="tsv",
                    columns={"sentence": "sentence", "label": "label"},
                    splits={"test": 1.0},  # GLUE's labelled test set is not public
                    quoting="none",
                ),
            ),
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
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; defined tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]
