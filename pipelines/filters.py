"""The cleaning steps: one signature, ``step(fields) -> Keep | Drop``.

A step gets a record's task fields (name -> text) and never mutates them. A filter
answers ``KEEP`` or ``Drop(reason, detail)``; a transforming step answers ``Keep`` with
the fields it changed and counts of what it changed (PII placeholders by kind, ...).
A step that does not apply to a record (a text below its word floor) answers
``Keep(skipped=True)``, so its skips are counted, not confused with passes.

Which steps run, in which order and with which thresholds is ``clean.filters`` in
params.yaml (``pipelines.config.FiltersConfig``); ``build_steps`` turns it into the list.
"""
from __future__ import annotations

import functools
import html
import ipaddress
import re
import sys
import unicodedata
from collections import Counter
from typing import Callable, Mapping, NamedTuple

import lxml.html

from pipelines.config import (FiltersConfig, GopherQualityConfig, GopherRepetitionConfig, LanguageConfig,
                              LengthConfig, PiiConfig, UnicodeConfig)
from pipelines.tasks import Task


class Keep(NamedTuple):
    fields: Mapping[str, str] = {}  # values this step changed; empty: the record is unchanged
    counts: Mapping[str, int] = {}  # what it changed, by kind
    skipped: bool = False  # the step did not apply to this record


class Drop(NamedTuple):
    reason: str  # the file name under removed/, so [a-z0-9_]
    detail: str


KEEP = Keep()
SKIP = Keep(skipped=True)
Step = Callable[[Mapping[str, str]], Keep | Drop]
FENCE = "```"  # code blocks are Markdown-fenced: readable, and easy to tell from prose
_FENCED = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
_MATH = re.compile(r"\$\$.+?\$\$|\\begin\{([a-z]+\*?)\}.+?\\end\{\1\}|\$[^$\n]+\$", re.S)


def prose(text: str) -> str:
    """The text without fenced code and LaTeX math: what the prose heuristics measure
    (a matrix or a loop is repetitive and symbol-heavy by nature, not low quality)."""
    if FENCE in text:
        text = _FENCED.sub("\n", text)
    return _MATH.sub(" ", text) if "$" in text or "\\begin" in text else text


# --- transforming steps --------------------------------------------------------------

@functools.cache
def _invisible() -> dict[int, None]:
    """Control and format characters (zero-width spaces, BOMs, bidi marks): invisible noise
    to a tokenizer. Newline and tab stay for the whitespace step. A str.translate table."""
    return {c: None for c in range(sys.maxunicode + 1)
            if unicodedata.category(chr(c)) in ("Cc", "Cf") and chr(c) not in "\n\t"}


def unicode_step(cfg: UnicodeConfig, fields: tuple[str, ...]) -> Step:
    invisible = _invisible() if cfg.strip_control else {}

    def clean_chars(text: str) -> str:
        return unicodedata.normalize(cfg.form, text).translate(invisible)

    def step(rec: Mapping[str, str]) -> Keep:
        changed = {f: new for f in fields if (new := clean_chars(rec[f])) != rec[f]}
        return Keep(changed) if changed else KEEP
    return step


# Only known tags mark a text as HTML: "What does <T> mean?" in a plain-text title is text.
_HTML_TAG = re.compile(r"</?(?:a|b|i|s|u|p|br|hr|em|strong|code|pre|kbd|sup|sub|span|div|img|ul|ol|li|dl|dt|dd|"
                       r"blockquote|h[1-6]|table|thead|tbody|tr|td|th|strike|del|ins)(?:\s[^<>]*)?/?>", re.I)
_ENTITY = re.compile(r"&(?:#\d+|#x[0-9a-fA-F]+|[a-zA-Z][a-zA-Z0-9]*);")
_BLOCK = frozenset("p div h1 h2 h3 h4 h5 h6 ul ol table tr hr section article header footer dl dt dd "
                   "figure figcaption details summary".split())
_SKIP_TAGS = frozenset("script style img head".split())  # no readable text (SE's img alt is boilerplate)
_BREAKS = _BLOCK | {"pre", "li", "br", "blockquote"}
_SPACE = re.compile(r"[ \t\r\n\f\v]+")


def html_to_text(fragment: str) -> str:
    """Readable text of an HTML fragment (a Stack Exchange body, say).

    ``<pre>`` becomes a fenced code block with its content verbatim; inline ``<code>``
    keeps backticks; ``<li>`` a "- " bullet; ``<blockquote>`` "> " lines; paragraphs a
    blank line. Link targets are dropped (a reader sees the link text). LaTeX is text
    to HTML, so ``$...$`` comes through untouched.
    """
    root = lxml.html.fragment_fromstring(fragment, create_parent="div")
    return "".join(_render(root)).strip()


def _inline(text: str | None) -> str:
    return _SPACE.sub(" ", text) if text else ""  # HTML collapses whitespace outside <pre>


def _render(el) -> list[str]:
    out = [_inline(el.text)]
    for child in el:
        out.extend(_element(child))
        tail = _inline(child.tail)
        if tail.strip() or child.tag not in _BREAKS:  # source indentation between blocks is no text
            out.append(tail)
    return out


def _element(el) -> list[str]:
    tag = el.tag if isinstance(el.tag, str) else ""  # comments, processing instructions
    if not tag or tag in _SKIP_TAGS:
        return []
    if tag == "pre":
        code = el.text_content().strip("\n")
        return [f"\n\n{FENCE}\n{code}\n{FENCE}\n\n"]
    if tag == "code":
        return ["`", el.text_content(), "`"]
    if tag == "br":
        return ["\n"]
    if tag == "li":
        return ["\n- ", "".join(_render(el)).strip()]
    if tag == "blockquote":
        inner = tidy_whitespace("".join(_render(el)))
        return ["\n\n", "\n".join(f"> {line}" if line else "" for line in inner.split("\n")), "\n\n"]
    if tag in ("td", "th"):
        return [" ", *_render(el), " "]
    if tag in _BLOCK:
        return ["\n\n", *_render(el), "\n\n"]
    return _render(el)


def html_step(fields: tuple[str, ...]) -> Step:
    def to_text(text: str) -> str:
        if _HTML_TAG.search(text):
            return html_to_text(text)
        return html.unescape(text) if _ENTITY.search(text) else text

    def step(rec: Mapping[str, str]) -> Keep:
        changed = {f: new for f in fields if (new := to_text(rec[f])) != rec[f]}
        return Keep(changed) if changed else KEEP
    return step


_HSPACE = re.compile(r"[^\S\n]+")  # whitespace other than newline (NBSP and tabs included)
_BLANK_RUN = re.compile(r"\n{3,}")


def tidy_whitespace(text: str) -> str:
    """One space for runs of spaces in prose, at most one blank line; code blocks verbatim."""
    parts, pos = [], 0
    for m in _FENCED.finditer(text) if FENCE in text else ():
        parts.append(_tidy_prose(text[pos:m.start()]))
        parts.append(m.group(0).rstrip())
        pos = m.end()
    parts.append(_tidy_prose(text[pos:]))
    return "\n\n".join(p for p in parts if p).strip()


def _tidy_prose(text: str) -> str:
    lines = (_HSPACE.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_RUN.sub("\n\n", "\n".join(lines)).strip()


def whitespace_step(fields: tuple[str, ...]) -> Step:
    def step(rec: Mapping[str, str]) -> Keep:
        changed = {f: new for f in fields if (new := tidy_whitespace(rec[f])) != rec[f]}
        return Keep(changed) if changed else KEEP
    return step


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
PII_PATTERNS = {
    "EMAIL": r"(?<![\w.+-])[\w.%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])",
    "IP_ADDRESS": (rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)"
                   r"|(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){3,7}[0-9A-Fa-f]{0,4}(?![\w:])"),
    # International (+CC ...) or North American (NNN) NNN-NNNN; digit count checked below.
    "PHONE": (r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\w)"
              r"|(?<![\w(])(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\w)"),
}
PII_KINDS = {"email": "EMAIL", "phone": "PHONE", "ip_address": "IP_ADDRESS"}


def pii_regex(kinds: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(f"(?P<{PII_KINDS[k]}>{PII_PATTERNS[PII_KINDS[k]]})" for k in kinds))


def _is_pii(kind: str, value: str) -> bool:
    if kind == "PHONE":
        return 8 <= sum(c.isdigit() for c in value) <= 15  # E.164 allows at most 15 digits
    if kind == "IP_ADDRESS" and ":" in value:
        try:  # the IPv6 pattern is loose (hex groups and colons); the address must parse
            ipaddress.IPv6Address(value)
        except ValueError:
            return False
    return True


def scrub_pii(text: str, regex: re.Pattern) -> tuple[str, Counter]:
    """``text`` with each email, phone number and IP address replaced by ``<KIND>``."""
    counts: Counter = Counter()

    def placeholder(m: re.Match) -> str:
        kind = m.lastgroup
        if not _is_pii(kind, m.group(0)):
            return m.group(0)
        counts[kind] += 1
        return f"<{kind}>"
    return regex.sub(placeholder, text), counts


_PII_HINT = re.compile(r"[@\d:]")  # every pattern needs one of these: most texts skip the full regex


def count_pii(text: str, regex: re.Pattern) -> int:
    return sum(scrub_pii(text, regex)[1].values()) if _PII_HINT.search(text) else 0


def pii_step(cfg: PiiConfig, fields: tuple[str, ...]) -> Step:
    regex = pii_regex(cfg.kinds)

    def step(rec: Mapping[str, str]) -> Keep:
        changed, counts = {}, Counter()
        for f in fields:
            if _PII_HINT.search(rec[f]):
                new, found = scrub_pii(rec[f], regex)
                if found:
                    changed[f] = new
                    counts.update(found)
        return Keep(changed, counts) if changed else KEEP
    return step


# --- filters ----------------------------------------------------------------------

def length_step(cfg: LengthConfig, fields: tuple[str, ...], optional: tuple[str, ...] = ()) -> Step:
    """Bounds on the characters and words of ``fields`` together; a required one left empty drops."""
    def step(rec: Mapping[str, str]) -> Keep | Drop:
        empty = [f for f in fields if not rec[f] and f not in optional]
        if empty:
            return Drop("empty_field", f"{', '.join(empty)} empty after cleaning")
        chars = sum(len(rec[f]) for f in fields)
        words = sum(len(rec[f].split()) for f in fields)
        for value, bound, name, too in ((chars, cfg.min_chars, "min_chars", "too_short"),
                                        (words, cfg.min_words, "min_words", "too_short")):
            if value < bound:
                return Drop(too, f"{value} < {bound} ({name})")
        for value, bound, name in ((chars, cfg.max_chars, "max_chars"), (words, cfg.max_words, "max_words")):
            if value > bound:
                return Drop("too_long", f"{value} > {bound} ({name})")
        return KEEP
    return step


def label_step(task: Task) -> Step:
    allowed = sorted(task.labels)

    def step(rec: Mapping[str, str]) -> Keep | Drop:
        value = rec[task.target_field]
        return KEEP if value in task.labels else Drop("bad_label", f"label {value!r} not in {allowed}")
    return step


_WORD = re.compile(r"\w+")


def gopher_repetition(text: str, cfg: GopherRepetitionConfig) -> Drop | None:
    """Rae et al. (2021), Gopher, appendix A.1.1: repeated lines, paragraphs and n-grams."""
    paragraphs = [p.strip() for p in re.split(r"\n{2,}", text) if p.strip()]
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    for units, name, frac_limit, char_limit in ((lines, "line", cfg.dup_line_frac, cfg.dup_line_char_frac),
                                                (paragraphs, "paragraph", cfg.dup_para_frac, cfg.dup_para_char_frac)):
        seen: set[str] = set()
        dup = dup_chars = 0
        for u in units:
            if u in seen:
                dup += 1
                dup_chars += len(u)
            seen.add(u)
        if units and dup / len(units) > frac_limit:
            return Drop(f"gopher_dup_{name}s", f"{dup}/{len(units)} {name}s repeated > {frac_limit}")
        total = sum(len(u) for u in units)
        if total and dup_chars / total > char_limit:
            return Drop(f"gopher_dup_{name}_chars", f"{dup_chars / total:.2f} of characters in repeated "
                        f"{name}s > {char_limit}")
    words = _WORD.findall(text.lower())
    total = sum(len(w) for w in words)
    if not total:
        return None
    for n, limit in cfg.top_ngram_char_frac.items():
        grams = Counter(zip(*(words[i:] for i in range(n))))
        if grams:
            gram, count = grams.most_common(1)[0]
            frac = count * sum(len(w) for w in gram) / total
            if count > 1 and frac > limit:
                return Drop("gopher_top_ngram", f"top {n}-gram {' '.join(gram)!r} covers {frac:.2f} "
                            f"of characters > {limit}")
    for n, limit in cfg.dup_ngram_char_frac.items():
        seen_grams: set[tuple] = set()
        covered = [False] * len(words)  # a word inside several repeated n-grams counts once
        for i in range(len(words) - n + 1):
            gram = tuple(words[i:i + n])
            if gram in seen_grams:  # the first occurrence is the original, not a duplicate
                covered[i:i + n] = [True] * n
            seen_grams.add(gram)
        frac = sum(len(w) for w, c in zip(words, covered) if c) / total
        if frac > limit:
            return Drop("gopher_dup_ngrams", f"repeated {n}-grams cover {frac:.2f} of characters > {limit}")
    return None


_BULLETS = ("-", "*", "•", "‣", "●", "◦", "▪")
_STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))


def gopher_quality(text: str, cfg: GopherQualityConfig) -> Drop | None:
    """Rae et al. (2021), Gopher, appendix A.1.1: the quality heuristics, length rule aside."""
    tokens = text.split()
    words = _WORD.findall(text)
    mean = sum(len(w) for w in words) / len(words) if words else 0.0
    if not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length:
        return Drop("gopher_word_length", f"mean word length {mean:.1f} outside "
                    f"[{cfg.min_mean_word_length}, {cfg.max_mean_word_length}]")
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / len(tokens) > cfg.max_symbol_word_ratio:
        return Drop("gopher_symbols", f"{symbols} '#'/ellipses per {len(tokens)} words > {cfg.max_symbol_word_ratio}")
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    bullets = sum(ln.startswith(_BULLETS) for ln in lines)
    if lines and bullets / len(lines) > cfg.max_bullet_lines:
        return Drop("gopher_bullet_lines", f"{bullets}/{len(lines)} lines start with a bullet > {cfg.max_bullet_lines}")
    ellipsis = sum(ln.endswith(("...", "…")) for ln in lines)
    if lines and ellipsis / len(lines) > cfg.max_ellipsis_lines:
        return Drop("gopher_ellipsis_lines", f"{ellipsis}/{len(lines)} lines end with an ellipsis "
                    f"> {cfg.max_ellipsis_lines}")
    alpha = sum(any(c.isalpha() for c in t) for t in tokens)
    if alpha / len(tokens) < cfg.min_alpha_words:
        return Drop("gopher_alpha_words", f"{alpha}/{len(tokens)} words have a letter < {cfg.min_alpha_words}")
    stop = _STOP_WORDS.intersection(w.lower() for w in words)
    if len(stop) < cfg.min_stop_words:
        return Drop("gopher_stop_words", f"{len(stop)} of {sorted(_STOP_WORDS)} present < {cfg.min_stop_words}")
    return None


def gopher_step(rule: Callable[[str, object], Drop | None], cfg, fields: tuple[str, ...]) -> Step:
    # Each field is judged as a document of its own: an answer quoting its question, or
    # a question restating its title, is no sign of a low-quality text.
    def step(rec: Mapping[str, str]) -> Keep | Drop:
        judged = False
        for f in fields:
            text = prose(rec[f])
            if len(text.split()) < cfg.min_words:
                continue
            judged = True
            if drop := rule(text, cfg):
                return Drop(drop.reason, f"{f}: {drop.detail}")
        return KEEP if judged else SKIP
    return step


_detectors: dict[tuple[str, ...], object] = {}  # one model per process, built on first use


def language_step(cfg: LanguageConfig, fields: tuple[str, ...]) -> Step:
    from lingua import Language, LanguageDetectorBuilder

    names = tuple(sorted({*cfg.candidates, *cfg.keep}))
    if names not in _detectors:
        _detectors[names] = LanguageDetectorBuilder.from_languages(
            *(getattr(Language, n.upper()) for n in names)).build()
    detector = _detectors[names]
    keep = {getattr(Language, n.upper()) for n in cfg.keep}

    def step(rec: Mapping[str, str]) -> Keep | Drop:
        text = prose("\n".join(rec[f] for f in fields))
        if len(text.split()) < cfg.min_words:
            return SKIP
        best = detector.compute_language_confidence_values(text[:cfg.max_chars])[0]
        if best.language not in keep and best.value >= cfg.min_confidence:
            return Drop("language", f"{best.language.name.lower()} ({best.value:.2f})")
        return KEEP
    return step


def build_steps(cfg: FiltersConfig, task: Task, turns: tuple[str, ...] = ()) -> list[tuple[str, Step]]:
    """The enabled steps of ``clean.filters``, in the order params.yaml lists them. A chat
    task's steps run on ``turns``, the names its record's turns are given (each turn's content
    a text field of its own: judged, scrubbed and measured like one)."""
    text, every = (turns, turns) if task.chat else (task.text_fields, task.fields)
    builders: dict[str, Callable[[], Step]] = {
        "html": lambda: html_step(text),
        "unicode": lambda: unicode_step(cfg.unicode, every),
        "whitespace": lambda: whitespace_step(every),
        "pii": lambda: pii_step(cfg.pii, text),
        "length": lambda: length_step(cfg.length, text, task.optional_fields),
        "label": lambda: label_step(task),
        "gopher_repetition": lambda: gopher_step(gopher_repetition, cfg.gopher_repetition, text),
        "gopher_quality": lambda: gopher_step(gopher_quality, cfg.gopher_quality, text),
        "language": lambda: language_step(cfg.language, text),
    }
    return [(name, builders[name]()) for name in step_names(cfg, task)]


def step_names(cfg: FiltersConfig, task: Task) -> list[str]:
    """The steps that run: listed, enabled, and meaningful for the task."""
    return [name for name in cfg.order
            if getattr(cfg, name).enabled and not (name == "label" and not task.labels)]


class Outcome(NamedTuple):
    fields: dict[str, str]  # the record's fields after every step that ran
    drop: Drop | None
    dropped_by: str | None  # the step that dropped it


def apply_steps(steps: list[tuple[str, Step]], fields: Mapping[str, str], events: Counter) -> Outcome:
    """Run ``steps`` in order until one drops the record; ``events`` counts, per step,
    (step, "in"), (step, "changed"), (step, "skipped"), (step, "removed") and
    ("pii", KIND) replacements."""
    current = dict(fields)
    for name, step in steps:
        events[name, "in"] += 1
        verdict = step(current)
        if isinstance(verdict, Drop):
            events[name, "removed"] += 1
            return Outcome(current, verdict, name)
        if verdict.skipped:
            events[name, "skipped"] += 1
        if verdict.fields:
            events[name, "changed"] += 1
            current = {**current, **verdict.fields}
        for kind, n in verdict.counts.items():
            events[name, kind] += n
    return Outcome(current, None, None)
