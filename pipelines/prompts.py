"""Rendering a task's Jinja2 templates for a record (training, evaluation, baselines).

Templates run in Jinja2's immutable sandbox (a template can neither reach Python
internals nor change its inputs) with ``StrictUndefined``: a template naming a field the
record lacks fails with the field and the record's id, never renders an empty string
into the training data.

``PromptFormat`` is how ``tokenize`` turns a record into a source and a target: the
task's prompt, optionally preceded by few-shot demonstrations (``FEW_SHOT``), optionally
wrapped by the base model's chat template (each demonstration a user/assistant
exchange, the prompt the last user turn); the target is the task's target template (the
assistant's answer in chat mode).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Sequence

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipelines import conversations
from pipelines.common import StageError, sha256_text
from pipelines.tasks import Task, label_key

_ENV = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                                     autoescape=False)
# Demonstrations in plain (non-chat) mode: each a rendered prompt and target, then a blank
# line, then the example's own prompt, so the model sees the task's format k times.
FEW_SHOT = "{% for d in demonstrations %}{{ d.prompt }}{{ d.target }}\n\n{% endfor %}{{ prompt }}"


@lru_cache(maxsize=64)
def _template(source: str) -> tuple[jinja2.Template, tuple[str, ...]]:
    """The compiled template and the variables it reads (sorted)."""
    return _ENV.from_string(source), tuple(sorted(jinja2.meta.find_undeclared_variables(_ENV.parse(source))))


def json_type(value) -> str:
    """The JSON name of a value's type, as a person reading the JSONL file sees it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _described(value) -> str:
    if value is None:
        return "JSON null"
    return f"a JSON {json_type(value)} ({json.dumps(value, ensure_ascii=False, default=str)[:40]})"


def is_text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def field_problem(task: Task, record: dict) -> str | None:
    """Why ``record`` cannot be rendered for ``task``, or None.

    Jinja2 renders any value: a null ``mr`` would become the prompt "Attributes: None" and a
    number the target "12345", silently. So a field the task uses as text must be a
    non-empty string (an optional field a string, empty or absent), and the label field of
    a classification task a string, number or boolean that names one of its labels.
    """
    if missing := [name for name in task.required_fields if name not in record]:
        return (f"no field {', '.join(map(repr, missing))} (task {task.name} needs "
                f"{', '.join(task.required_fields)})")
    for name in task.fields:
        value = record.get(name, "")  # only an optional field may be absent
        if name in task.optional_fields:
            if not isinstance(value, str):
                return f"optional field {name!r} holds {_described(value)}, not text (empty is allowed)"
        elif task.labels and name == task.target_field:
            if label_key(value, task.labels) is None:
                return (f"label field {name!r} holds {_described(value)}, which names none of task "
                        f"{task.name}'s labels {sorted(task.labels)}")
        elif not isinstance(value, str):
            return f"field {name!r} holds {_described(value)}, not text"
        elif not value.strip():
            return f"field {name!r} holds {_described(value)}: empty, but task {task.name} uses it as text"
    return None


def context(task: Task, record: dict) -> dict:
    """The template variables of ``record``; a StageError naming the record and the field
    if a value is not what the task renders (``field_problem``)."""
    if problem := field_problem(task, record):
        raise StageError(f"record {record.get('id', '?')}: {problem}; re-run the clean stage (`dvc repro clean`)")
    ctx = {f: record.get(f, "") for f in task.fields}
    if task.labels:
        ctx["verbalizer"] = task.labels[label_key(record[task.target_field], task.labels)]
    return ctx


def render(source: str, ctx: dict, record_id: str = "?") -> str:
    try:
        return _template(source)[0].render(ctx)
    except jinja2.TemplateError as exc:  # UndefinedError, SecurityError, a template syntax slip
        raise StageError(f"record {record_id}: template {source!r}: {exc}") from None


def render_prompt(task: Task, record: dict) -> str:
    return render(task.prompt, context(task, record), record.get("id", "?"))


def render_target(task: Task, record: dict) -> str:
    return render(task.target, context(task, record), record.get("id", "?"))


def render_zero_shot(task: Task, record: dict, tokenizer) -> str:
    """The hand-written instruction, wrapped in the base model's chat template if it has one."""
    text = render(task.zero_shot, context(task, record), record.get("id", "?"))
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text + "\n"


class Example(NamedTuple):
    """A record rendered: the model's input, what it should answer, and how many of the
    values substituted into them were not text (non-empty, or empty where the field is
    optional; the shards require 0)."""
    prompt: str
    target: str
    non_text: int


class SourceParts(NamedTuple):
    """A source without demonstrations, cut around the prompt: the chat template's markup
    before and after it, kept whole when truncation cuts the prompt."""
    before: str
    prompt: str
    after: str


@dataclass(frozen=True)
class Demo:
    """A few-shot demonstration: a train record's rendered prompt and target."""
    id: str
    group: str
    prompt: str
    target: str


def draw_demos(pool: Sequence[Demo], record: dict, k: int, seed: int) -> list[Demo]:
    """``k`` pool entries for ``record``, seeded by its id (the same in every run and process,
    whatever the order); never the record itself nor its group (another reference of the
    same E2E input would hand the model its answer)."""
    rng = random.Random(f"{seed}\x1f{record['id']}")  # str seeds hash with SHA-512: stable across runs
    rid, gid = str(record["id"]), str(record.get("group", record["id"]))
    chosen, seen = [], set()
    while len(chosen) < k and len(seen) < len(pool):
        i = rng.randrange(len(pool))
        if i not in seen:
            seen.add(i)
            if pool[i].id != rid and pool[i].group != gid:
                chosen.append(pool[i])
    return chosen


class PromptFormat:
    """Source and target text of a record, per the task's ``chat_template`` and few-shot demos."""

    def __init__(self, task: Task, tokenizer=None, chat_template: bool = False):
        if task.chat and not getattr(tokenizer, "chat_template", None):
            raise StageError(f"task {task.name!r} is a chat task, but the base model's tokenizer has no chat "
                             "template to render its conversations with; use an instruct/chat base model")
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise StageError(f"tasks/{task.name}.yaml: chat_template is true, but the base model's tokenizer "
                             "has no chat template; set it to false")
        self.task, self.tokenizer, self.chat = task, tokenizer, chat_template or task.chat
        # Only the variables a template reads key its cache: SST-2's target reads just the
        # verbalizer, so two renders serve 67k records.
        self._render_prompt = self._cached(task.prompt)
        self._render_target = self._cached(task.target)
        self._substituted = tuple(dict.fromkeys(_template(task.prompt)[1] + _template(task.target)[1]))

    @staticmethod
    def _cached(source: str):
        names = _template(source)[1]

        @lru_cache(maxsize=4096)
        def by_values(values: tuple) -> str:
            return _template(source)[0].render(dict(zip(names, values)))

        def render_record(ctx: dict, record_id: str) -> str:
            try:
                return by_values(tuple(ctx[n] for n in names))
            except (KeyError, jinja2.TemplateError):
                return render(source, ctx, record_id)  # the same failure, reported with the record
        return render_record

    def turns(self, record: dict) -> conversations.Messages:
        """A chat task's conversation, with the task's system prompt where it brings none; a
        StageError naming the record if it is not one."""
        turns, problem = conversations.read(record.get(conversations.FIELD))
        if problem:
            raise StageError(f"record {record.get('id', '?')}: field {conversations.FIELD!r}: {problem.detail}; "
                             "re-run the clean stage (`dvc repro clean`)")
        return conversations.with_system(turns, self.task.system)

    def prompt(self, record: dict) -> str:
        if self.task.chat:  # the conversation up to its last answer, and the cue for the answer
            return conversations.prompt(self.tokenizer, self.turns(record)[:-1])
        return self._render_prompt(context(self.task, record), record.get("id", "?"))

    def target(self, record: dict) -> str:
        if self.task.chat:
            return self.turns(record)[-1]["content"]
        return self._chat_target(self._render_target(context(self.task, record), record.get("id", "?")))

    def _chat_target(self, text: str) -> str:
        # The chat template already separates the turns; a leading space would be a token the
        # model never produces after "assistant\n".
        return text.lstrip() if self.chat else text

    def example(self, record: dict) -> Example:
        """The record's prompt and target; ``non_text`` counts the values substituted into them
        that are not non-empty strings, counted on what the templates read, not on the
        checked fields, so that a value ``context`` ever lets through shows up in the
        shards' validation (which requires 0) instead of as "None" in the training text."""
        if self.task.chat:  # one read of the conversation for both
            turns = self.turns(record)
            return Example(conversations.prompt(self.tokenizer, turns[:-1]), turns[-1]["content"], 0)
        ctx, rid = context(self.task, record), record.get("id", "?")
        return Example(self._render_prompt(ctx, rid), self._chat_target(self._render_target(ctx, rid)),
                       sum(not (is_text(ctx[n]) or n in self.task.optional_fields and ctx[n] == "")
                           for n in self._substituted if n in ctx))

    def source(self, prompt: str, demos: Sequence[Demo] = ()) -> str:
        if self.task.chat:  # the prompt is the rendered conversation already (no demonstrations)
            return prompt
        if not self.chat:
            return _template(FEW_SHOT)[0].render(demonstrations=demos, prompt=prompt) if demos else prompt
        turns = []
        for d in demos:
            turns += [{"role": "user", "content": d.prompt}, {"role": "assistant", "content": d.target}]
        turns.append({"role": "user", "content": prompt})
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)

    def split_source(self, prompt: str) -> SourceParts:
        """The demonstration-free source around the prompt, for
        truncation that must cut the prompt but keep the chat template's markup whole."""
        text = self.source(prompt)
        i = text.rfind(prompt) if prompt else -1
        if i < 0:  # a chat template that rewrites the content: cut the whole source
            return SourceParts("", text, "")
        return SourceParts(text[:i], prompt, text[i + len(prompt):])

    @property
    def hash(self) -> str:
        """sha256 of everything that shapes the text: templates, verbalizers, demo layout, chat template."""
        parts = {"prompt": self.task.prompt, "target": self.task.target, "labels": self.task.labels,
                 "few_shot": FEW_SHOT, "chat_template": self.tokenizer.chat_template if self.chat else None}
        if self.task.chat:
            parts["system"] = self.task.system
        return sha256_text(json.dumps(parts, sort_keys=True))
