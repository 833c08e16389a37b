"""Served names, resolved only through the registry, and each version's prompt format.

Names (``GET /v1/models`` lists them):
- ``base``: the bare base model;
- ``<artifact>``: that artifact's ``prod`` version (GTO), whichever it is now;
- ``<artifact>@<version>``: one registered version.

A name is looked up in the tables read from GTO's git tags and nowhere else: it never
becomes a path. A version is fetched at its commit from the DVC cache or remote (as
``ptune evaluate`` fetches one) into ``.ptune/serve/<artifact>/<version>/``: the adapter
directory and the shards' manifest and demonstrations, which say how its training
prompts were built (``evaluate.TunedPrompts``: template, chat template switch, few-shot
demonstrations). The engine serves it under its exact name, ``<artifact>@<version>``;
``<artifact>`` is an alias moved by ``refresh`` when prod moves. Requests already
submitted hold the exact version, so a swap fails none of them, and the old version stays
loaded (reachable as ``@version``) until it is the least recently used of more than
``max_versions``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

from pipelines import conversations, lineage, registry
from pipelines.common import ConfigError, StageError, atomic_dir, read_json, sha256_file, write_json
from pipelines.evaluate import TunedPrompts, adapter_info
from pipelines.prompts import _template
from pipelines.shards import read_manifest
from pipelines.tasks import Task, manifest_task
from serving.engine import BASE, Engine
from serving.types import MAX_VERSIONS, POLL_SECONDS, Decoding, Request, UnknownModel

log = logging.getLogger("ptune.serve")  # the CLI shows ptune.* at INFO: swaps and loads are news

CACHE = Path(".ptune/serve")  # under the served project, git-ignored
SHARDS = "data/shards"  # tokenize's output: its manifest and demonstrations are the prompt format
MARKER = "ptune_serve.json"  # written last: a version directory without it is incomplete
# Names that may become directory names (GTO's own artifact and version syntax is narrower).
SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")


class BadRequest(ValueError):
    """A request the client can fix; ``param`` names the field (OpenAI's error ``param``)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class NotServable(RuntimeError):
    """A registered version that cannot be served here (data not fetchable, other base model)."""


@dataclass(frozen=True)
class Served:
    """A name the engine decodes, and how a request's input becomes its prompt."""

    name: str  # exact: "base" or "<artifact>@<version>"
    method: str  # base | prompt | ptuning | prefix | lora | full
    artifact: str | None = None
    version: str | None = None
    commit: str | None = None
    task: Task | None = None
    prompts: TunedPrompts | None = None  # None for base: its text is used as sent

    @property
    def input_fields(self) -> tuple[str, ...]:
        """The task's fields a request supplies (all but the target)."""
        return self.task.input_fields if self.task else ()

    def describe(self) -> dict:
        """What a client needs to prompt it (the ``ptune`` block of ``GET /v1/models``)."""
        out = {"method": self.method, "artifact": self.artifact, "version": self.version, "commit": self.commit}
        if self.prompts is not None:
            out.update(task=self.task.name, input_fields=list(self.input_fields),
                       optional_fields=list(self.task.optional_fields), template=self.task.prompt,
                       chat_template=self.prompts.fmt.chat, few_shot=self.prompts.few_shot)
        return out

    def format_text(self, text: str, param: str = "prompt") -> str:
        """The prompt for ``text``: for an adapter, the value of its task's one required input
        field (optional ones left empty), rendered as tokenize rendered training sources; for
        ``base``, ``text`` itself."""
        if self.prompts is None:
            return text
        if self.task.chat:  # the text is the user's message
            return self.format_chat([{"role": "user", "content": text}], self.prompts.fmt.tokenizer, param)
        required = [f for f in self.input_fields if f not in self.task.optional_fields]
        if len(required) != 1:
            raise BadRequest(param, f"{self.name} is an adapter for task {self.task.name}, whose input has the fields "
                                    f"{', '.join(self.input_fields)}; send them as an object "
                                    f"(prompt: {{{', '.join(repr(f) + ': ...' for f in self.input_fields)}}})")
        return self.format_fields({required[0]: text}, param)

    def format_fields(self, fields: dict, param: str = "prompt") -> str:
        """The prompt for a record's input fields (optionally its ``id`` and ``group``, which
        seed the few-shot demonstrations as ``evaluate`` drew them for that record)."""
        if self.prompts is None:
            raise BadRequest(param, f"{BASE} has no task template to fill; send the text itself")
        if self.task.chat:
            raise BadRequest(param, f"{self.name} is an adapter for chat task {self.task.name}: send its messages "
                                    "to /v1/chat/completions (or the user's message as text)")
        allowed = (*self.input_fields, "id", "group")
        if unknown := [k for k in fields if k not in allowed]:
            raise BadRequest(param, f"{', '.join(map(repr, unknown))}: not an input field of task "
                                    f"{self.task.name} (expected {', '.join(self.input_fields)})")
        for name in self.input_fields:
            value = fields.get(name, "" if name in self.task.optional_fields else None)
            if name in self.task.optional_fields:
                if not isinstance(value, str):
                    raise BadRequest(f"{param}.{name}", f"must be text, or left out (optional in task "
                                                        f"{self.task.name}'s input)")
            elif not isinstance(value, str) or not value.strip():
                raise BadRequest(f"{param}.{name}", f"must be non-empty text (task {self.task.name}'s input)")
        for name in ("id", "group"):
            if name in fields and not isinstance(fields[name], (str, int)):
                raise BadRequest(f"{param}.{name}", "must be a string or an integer")
        record = {name: fields.get(name, "") for name in self.input_fields}
        # A record id seeds the draw of demonstrations; without one, the input's own hash does,
        # so the same input always gets the same demonstrations.
        record["id"] = str(fields.get("id") or "serve:" + hashlib.sha256(
            json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16])
        if "group" in fields:
            record["group"] = str(fields["group"])
        # The prompt template reads no target (checked when the version is loaded); the
        # placeholder only satisfies the record check that rendering shares with training.
        record[self.task.target_field] = next(iter(self.task.labels), "-")
        try:
            return self.prompts.source(record)
        except StageError as exc:
            raise BadRequest(param, str(exc)) from None

    def format_chat(self, messages: list[dict], tokenizer, param: str = "messages") -> str:
        """``base``: the messages in the base model's chat template, ready for the assistant's
        turn. An adapter was trained on single prompts of its task, not conversations: one
        user message holds its input (formatted as ``format_text``)."""
        if self.prompts is None:
            if not getattr(tokenizer, "chat_template", None):
                raise BadRequest(param, f"the base model's tokenizer has no chat template; use /v1/completions")
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if self.task.chat:
            return self._conversation(messages, param)
        if len(messages) != 1 or messages[0]["role"] != "user":
            wrap = "its template and the chat template are" if self.prompts.fmt.chat else "its template is"
            raise BadRequest(param, f"{self.name} is an adapter for task {self.task.name}, trained on single "
                                    f"prompts, not conversations: send one user message holding its input "
                                    f"({', '.join(self.input_fields)}); {wrap} applied here")
        return self.format_text(messages[0]["content"], f"{param}.0.content")

    def _conversation(self, messages: list[dict], param: str) -> str:
        """A chat adapter's prompt: the conversation (the task's system prompt where it brings
        none) in the chat template with the generation prompt, as ``evaluate`` prompts a test
        conversation for its final answer. It must end with the user's turn."""
        if messages and messages[-1].get("role") == "assistant":
            raise BadRequest(param, "the last message is the assistant's: a chat adapter answers the user's last "
                                    "message")
        # checked as a conversation with the answer still to come (a placeholder, dropped below)
        turns, problem = conversations.read(list(messages) + [{"role": "assistant", "content": "-"}])
        if problem:
            raise BadRequest(param, problem.detail)
        turns = conversations.with_system(turns[:-1], self.task.system)
        return conversations.prompt(self.prompts.fmt.tokenizer, turns)


@dataclass
class _Registered:
    """The registry as last read: artifact -> version -> commit, and each prod version."""

    tags: str | None = None  # `git for-each-ref refs/tags` then: unchanged tags, unchanged registry
    versions: dict[str, dict[str, str]] = field(default_factory=dict)
    prod: dict[str, str | None] = field(default_factory=dict)


class Models:
    """The served names over one engine, kept in step with the registry of ``repo``."""

    def __init__(self, engine: Engine, repo: Path, base: Path, *, cache: Path | None = None,
                 max_versions: int = MAX_VERSIONS):
        self.engine, self.repo, self.base = engine, Path(repo).resolve(), Path(base)
        self.cache = Path(cache) if cache else self.repo / CACHE
        self.max_versions = max_versions
        self._base_sha: str | None = None
        self._lock = threading.Lock()  # the tables below
        self._refreshing = threading.Lock()  # one registry read and swap at a time
        self._loading: dict[str, threading.Lock] = {}
        self._reg = _Registered()
        self._alias: dict[str, str] = {}  # artifact -> the exact name serving it
        self._loaded: OrderedDict[str, Served] = OrderedDict({BASE: Served(BASE, "base")})  # LRU order
        self._failed: dict[str, str] = {}  # exact name -> why it cannot be served
        self.swaps = 0  # prod moves served since start (a metric)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # -- names ----------------------------------------------------------------------

    def resolve(self, name: str) -> Served:
        """The served version ``name`` stands for, loading a registered version on first use.
        Raises UnknownModel (its message lists what is served) or NotServable."""
        if not isinstance(name, str) or not name:
            raise UnknownModel(self.not_served(name))
        artifact, sep, version = name.partition("@")
        for attempt in (0, 1):
            with self._lock:
                exact = (name if name in self._loaded else None) if sep else \
                    (BASE if name == BASE else self._alias.get(name))
                if exact is not None:
                    self._loaded.move_to_end(exact)
                    return self._loaded[exact]
                if not sep:
                    version = self._reg.prod.get(name)
                known = version is not None and version in self._reg.versions.get(artifact, {})
            if known:
                break
            if attempt == 0:
                self.refresh(load=False)  # tags made since the last poll (a `ptune register` just now)
        else:
            raise UnknownModel(self.not_served(name))
        if sep:
            return self._load(artifact, version)
        self._point(artifact, version)  # `ptune generate` loads only the prod version it is asked for
        return self.resolve(name)

    def served(self) -> list[dict]:
        """Every name a request may use: base, each prod alias, each registered version."""
        with self._lock:
            out = [{"id": BASE, "root": BASE, "loaded": True, **self._loaded[BASE].describe()}]
            for artifact, exact in sorted(self._alias.items()):
                out.append({"id": artifact, "root": exact, "loaded": True, **self._loaded[exact].describe()})
            for artifact, versions in sorted(self._reg.versions.items()):
                for version, commit in versions.items():
                    exact = f"{artifact}@{version}"
                    s = self._loaded.get(exact)
                    entry = {"id": exact, "root": exact, "loaded": s is not None}
                    entry.update(s.describe() if s else {"artifact": artifact, "version": version, "commit": commit})
                    if exact in self._failed:
                        entry["not_servable"] = self._failed[exact]
                    out.append(entry)
            return out

    def aliases(self) -> dict[str, str]:
        with self._lock:
            return dict(self._alias)

    def failures(self) -> dict[str, str]:
        with self._lock:
            return dict(self._failed)

    def not_served(self, name) -> str:
        """What an unknown name is told: every name served (and a hint where one helps)."""
        with_prod = sorted(a for a, v in self._reg.prod.items() if v)
        names = [BASE, *with_prod, *(f"{a}@{v}" for a, vs in sorted(self._reg.versions.items()) for v in vs)]
        hint = ""
        if isinstance(name, str) and name in self._reg.versions and name not in with_prod:
            hint = f" ({name} has no version in prod; ask for one by <artifact>@<version>)"
        shown = repr(name[:80] + ("..." if len(name) > 80 else "")) if isinstance(name, str) else repr(name)
        return f"model {shown} is not served{hint}; served: {', '.join(names)}"

    def request(self, name: str, build: Callable[[Served], tuple[tuple[int, ...], Decoding]]) -> tuple[Served, Request]:
        """(the served version, the engine request ``build`` makes for it)."""
        served = self.resolve(name)
        ids, decoding = build(served)
        return served, Request(served.name, ids, decoding)

    def submit(self, name: str, build: Callable[[Served], tuple[tuple[int, ...], Decoding]], on_event):
        """Resolve, build and submit -> (served, request, handle). A version evicted between
        resolving and submitting is loaded again and the request resubmitted, once."""
        for attempt in (0, 1):
            served, request = self.request(name, build)
            try:
                return served, request, self.engine.submit(request, on_event)
            except UnknownModel:
                if attempt:
                    raise
                with self._lock:
                    self._loaded.pop(served.name, None)
        raise AssertionError("unreachable")

    # -- the registry ---------------------------------------------------------------

    def refresh(self, load: bool = True) -> list[str]:
        """Read the registry if its tags changed; with ``load``, serve each artifact's prod
        version under the artifact's name (loading it first: the alias moves only once the
        new version can answer; each move is logged). -> the prod versions that cannot be
        served, one line each."""
        with self._refreshing:  # the read only: loading a version must not hold up a lookup
            tags = self._tags()
            if tags != self._reg.tags:
                versions, prod = {}, {}
                for artifact in registry.artifacts(self.repo):
                    versions[artifact] = {v["version"]: v["commit"] for v in registry.list_versions(self.repo, artifact)}
                    p = registry.prod_version(self.repo, artifact)
                    prod[artifact] = p["version"] if p else None
                with self._lock:
                    self._reg = _Registered(tags, versions, prod)
        if not load:
            return []
        failures = []
        with self._lock:
            wanted = dict(self._reg.prod)
        for artifact in sorted(set(wanted) | set(self.aliases())):
            old = self.aliases().get(artifact)
            try:
                self._point(artifact, wanted.get(artifact))
            except NotServable as exc:
                # Prod keeps being served by what served it: a broken promotion takes nothing down.
                failures.append(f"{artifact}: prod is now {wanted[artifact]}, which cannot be served: {exc}"
                                + (f"; still serving {old}" if old else ""))
        return failures

    def _point(self, artifact: str, version: str | None) -> None:
        """Move the alias ``artifact`` to ``version`` once that version is loaded (None: remove
        the alias, prod was unassigned). Raises NotServable, the alias unmoved."""
        exact = f"{artifact}@{version}" if version else None
        old = self.aliases().get(artifact)
        if exact == old:
            return
        if exact is not None:
            self._load(artifact, version)
        with self._lock:
            if self._reg.prod.get(artifact) != version or self._alias.get(artifact) != old:
                return  # the registry moved on while this version loaded: the newer move wins
            if exact is None:
                self._alias.pop(artifact, None)
            else:
                self._alias[artifact] = exact
            self.swaps += 1
        if exact is None:
            message = f"{artifact}: no version in prod any more (was {old})"
        else:
            message = f"{artifact}: now {exact}" + (f" (was {old}, still served as itself)" if old else "")
        log.info("%s", message)

    def _tags(self) -> str:
        """A fingerprint of every git tag: GTO's registry is tags, so equal fingerprints mean
        an equal registry, and a poll costs one git call (GTO's read costs ~0.3 s)."""
        proc = subprocess.run(["git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/tags"],
                              cwd=self.repo, capture_output=True, text=True)
        if proc.returncode != 0:
            raise StageError(f"{self.repo}: cannot read its git tags (the registry): {proc.stderr.strip()}")
        return proc.stdout

    def watch(self, interval: float = POLL_SECONDS) -> None:
        """Poll the registry every ``interval`` seconds on a background thread (``close`` stops it)."""
        if self._watcher is not None:
            return
        reported: set[str] = set()

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    for failure in self.refresh():
                        if failure not in reported:  # once, not every poll
                            reported.add(failure)
                            log.error("%s", failure)
                except Exception:  # a git or GTO hiccup must not end the watching
                    log.exception("reading the registry of %s failed; trying again in %.0f s",
                                  self.repo, interval)

        self._watcher = threading.Thread(target=loop, name="ptune-registry-watch", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()

    # -- loading --------------------------------------------------------------------

    def _load(self, artifact: str, version: str) -> Served:
        exact = f"{artifact}@{version}"
        with self._lock:
            gate = self._loading.setdefault(exact, threading.Lock())
        with gate:  # one load per version; concurrent requests for it wait for that one
            with self._lock:
                if exact in self._loaded:
                    self._loaded.move_to_end(exact)
                    return self._loaded[exact]
                commit = self._reg.versions.get(artifact, {}).get(version)
            if commit is None:
                raise UnknownModel(self.not_served(exact))
            try:
                served = self._fetch_and_add(artifact, version, commit)
            except NotServable as exc:
                with self._lock:
                    self._failed[exact] = str(exc)
                raise
            with self._lock:
                self._failed.pop(exact, None)
                self._loaded[exact] = served
                evict = self._evictable(keep=exact)
            for name in evict:
                self._evict(name)
            return served

    def _evictable(self, keep: str) -> list[str]:
        """Least recently used versions beyond ``max_versions``; never base, a prod target or
        ``keep`` (the version just loaded for a request)."""
        pinned = {BASE, keep, *self._alias.values()}
        others = [n for n in self._loaded if n not in pinned]
        return others[:max(0, len(others) - self.max_versions)]

    def _evict(self, name: str) -> None:
        with self._lock:
            if self._loaded.pop(name, None) is None:
                return
        try:
            self.engine.remove(name)  # its requests in flight finish first
        except UnknownModel:
            pass
        log.info("unloaded %s (least recently used beyond %d versions)", name, self.max_versions)

    def _fetch_and_add(self, artifact: str, version: str, commit: str) -> Served:
        exact = f"{artifact}@{version}"
        if not (SAFE.fullmatch(artifact) and SAFE.fullmatch(version)):
            raise NotServable(f"{exact}: the name is not usable as a cache directory name")
        where = self.cache / artifact / version
        try:
            self._materialize(commit, where)
            info = adapter_info(where / "adapter")
            trained_on = info.get("base_model_sha256")
            if trained_on != self.base_sha():
                raise NotServable(f"{exact} was trained on another base model (model.safetensors sha256 "
                                  f"{str(trained_on)[:12]}) than the one served, {self.base} "
                                  f"({self.base_sha()[:12]}); serve it with --base pointing at its base model")
            manifest = read_manifest(where / "shards")
            task = manifest_task(manifest, str(where / "shards"))
            if self._reads_target(task):
                raise NotServable(f"{exact}: task {task.name}'s prompt template reads its target field")
            prompts = TunedPrompts.from_dir(task, self.engine.tokenizer, where / "shards", self.base, check=False)
            self.engine.add(exact, where / "adapter")
        except (StageError, ConfigError, KeyError) as exc:
            raise NotServable(f"{exact} (commit {commit[:10]}): {exc}") from None
        method = self.engine.models()[exact]
        log.info("loaded %s (%s, task %s, commit %s)", exact, method, task.name, commit[:10])
        return Served(exact, method, artifact, version, commit, task, prompts)

    @staticmethod
    def _reads_target(task: Task) -> bool:
        return bool({task.target_field, "verbalizer"} & set(_template(task.prompt)[1]))

    def _materialize(self, commit: str, where: Path) -> None:
        """The version's adapter directory, manifest and demonstrations in ``where`` (reused
        when a complete copy of the same commit is there already)."""
        marker = where / MARKER
        if marker.is_file() and read_json(marker).get("commit") == commit:
            return
        with atomic_dir(where) as staging:
            lineage.materialize(self.repo, commit, lineage.ADAPTER, staging / "adapter")
            shards = staging / "shards"
            shards.mkdir()
            lineage.materialize(self.repo, commit, f"{SHARDS}/manifest.json", shards / "manifest.json")
            if "demonstrations.jsonl" in read_manifest(shards).get("files", {}):
                lineage.materialize(self.repo, commit, f"{SHARDS}/demonstrations.jsonl",
                                    shards / "demonstrations.jsonl")
            write_json(staging / MARKER, {"commit": commit})

    def base_sha(self) -> str:
        if self._base_sha is None:
            path = self.base / "model.safetensors"
            if not path.is_file():
                raise StageError(f"{path}: missing; pass --base with the base model directory "
                                 "(data/models/base after `dvc repro base_model`)")
            self._base_sha = sha256_file(path)
        return self._base_sha


class Generated(NamedTuple):
    """``ptune generate``'s answer: the model that gave it, the prompt's length in tokens,
    each choice (``Finished``: the text, tokens, their log-probabilities where asked, why it
    stopped) and the tokenizer (to show tokens as text)."""
    served: Served
    prompt_tokens: int
    choices: list
    tokenizer: object


def generate(repo: Path, base: Path, name: str, decoding: Decoding, *, text: str | None = None,
             fields: dict | None = None, raw: bool = False, chat: bool = False) -> Generated:
    """``ptune generate``: one request through the path the server answers with (the same
    names, prompt formats and engine), without a server. ``text``: the task's input (``raw``: the model's input as it is; ``chat``:
    one user message); ``fields``: the task's input fields."""
    engine = Engine(base, max_batch=max(decoding.n, 1))
    try:
        models = Models(engine, repo, base)

        def build(served: Served):
            if fields is not None:
                prompt = served.format_fields(fields, "--field")
            elif chat:
                prompt = served.format_chat([{"role": "user", "content": text}], engine.tokenizer, "TEXT")
            else:
                prompt = text if raw else served.format_text(text, "TEXT")
            return engine.encode(prompt), decoding

        try:
            served, request = models.request(name, build)
            (choices,) = engine.generate([request])
        except UnknownModel as exc:
            raise StageError(f"--model: {exc.args[0]} (`ptune registry` lists the versions)") from None
        except (NotServable, ValueError) as exc:  # BadRequest, the engine's field checks
            raise StageError(str(exc).replace("prompt_ids:", "TEXT:")) from None
        return Generated(served, len(request.prompt_ids), choices, engine.tokenizer)
    finally:
        engine.close()
