"""Rendering a task's Jinja2 templates for a record (training, evaluation, baselines)."""
from __future__ import annotations

from functools import lru_cache

import jinja2

from pipelines.common import sha256_text
from pipelines.tasks import Task

_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                          autoescape=False)


@lru_cache(maxsize=64)
def _template(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


def context(task: Task, record: dict) -> dict:
    ctx = {f: record[f] for f in task.fields}
    if task.labels:
        ctx["verbalizer"] = task.labels.get(str(record[task.target_field]), "")
    return ctx


def render_prompt(task: Task, record: dict) -> str:
    return _template(task.prompt).render(context(task, record))


def render_target(task: Task, record: dict) -> str:
    return _template(task.target).render(context(task, record))


def render_zero_shot(task: Task, record: dict, tokenizer) -> str:
    """The hand-written instruction, wrapped in the base model's chat template if it has one."""
    text = _template(task.zero_shot).render(context(task, record))
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text + "\n"


def verbalizers(task: Task) -> dict[str, str]:
    """label -> the target text the tuned model is scored on (the rendered target)."""
    return {label: _template(task.target).render(verbalizer=word) for label, word in task.labels.items()}


def template_hash(task: Task) -> str:
    return sha256_text("\x1e".join([task.prompt, task.target, task.zero_shot]))
