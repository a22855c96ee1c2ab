"""Web text -> unlabelled passages: the candidate outputs that self-augmentation labels.

The paper takes 502k segments from the English part of ClueWeb: a segment is the text
under an HTML header (with its sub-headers), kept if it is 600 to 3,000 characters
long, has no repetitive sentences (n-gram Jaccard similarity between sentence pairs)
and no navigation headers (arXiv:2308.06259v3, Section 3.1 and Appendix E). Our inputs
are plain text with no HTML headers, so this is a minimal version of that, with every
bound a parameter:

1. **Paragraphs.** A document is split into paragraphs: at blank lines if it has any
   (hard-wrapped text keeps its inner line breaks), else at every line break (C4 puts
   one paragraph per line). A document with no line break at all (Wikipedia dumps
   that lost them glue "...end.Next paragraph") is split where a sentence end is
   directly followed by a capitalised word. Spaces inside a line are collapsed.
2. **Segments.** With no headers to cut at, consecutive paragraphs of one document
   are packed into a passage while it stays within ``max_chars``: a web paragraph is
   often one or two sentences, while an answer usually spans several. A single
   paragraph longer than ``max_chars`` is dropped (``dropped_too_long``, counted per
   paragraph).
3. **Filters**, per passage: shorter than ``min_chars`` (``dropped_too_short``); a
   share of letters among non-space characters below ``min_alpha_frac``
   (``dropped_low_alpha``: tables of numbers, lists of links); two sentences whose
   word-trigram Jaccard similarity reaches ``max_sentence_similarity``
   (``dropped_repetitive``: templated boilerplate, "Thread: X" / "X" echoes); exact
   duplicates (``dropped_duplicate``).

Defaults: 600 <= length <= 3,000 characters, as in the paper (roughly 150 to 750 Llama
tokens); letters >= 50% of non-space characters; sentence similarity < 0.7 (the paper
gives no threshold). Deliberately, nothing here judges *quality* beyond that:
rejecting promotional text or forum chatter is the job of self-curation, the step the
paper introduces.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

from data.hub import resolve
from data.pairs import DataError, Pair, dedupe, iter_jsonl, make_id

MIN_CHARS = 600
MAX_CHARS = 3000
MIN_ALPHA_FRAC = 0.5
MAX_SENTENCE_SIMILARITY = 0.7

# "...socialism.Humans lived": a lowercase letter or digit, sentence punctuation, then a
# capitalised word with no space. The lowercase letter before the punctuation keeps
# "U.S.Army" whole; the lowercase letter after the capital keeps "e.g.NASA" whole.
_GLUED_SENTENCE = re.compile(r"(?<=[a-z0-9)][.!?])(?=[A-Z][a-z])")
_SPACES = re.compile(r"[ \t\u00a0]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n")
_WORD = re.compile(r"\w+")


def split_paragraphs(document: str) -> list[str]:
    """Non-empty, whitespace-tidied paragraphs of one document (rule 1 above)."""
    document = document.strip()  # trailing blank lines must not look like a layout
    if "\n\n" in document:
        blocks = re.split(r"\n\s*\n", document)
    elif "\n" in document:
        blocks = document.split("\n")
    else:
        blocks = _GLUED_SENTENCE.split(document)
    paragraphs = []
    for block in blocks:
        lines = [_SPACES.sub(" ", line).strip() for line in block.split("\n")]
        text = "\n".join(line for line in lines if line)
        if text:
            paragraphs.append(text)
    return paragraphs


def alpha_fraction(text: str) -> float:
    """Share of letters (any script) among the non-whitespace characters."""
    chars = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in chars) / len(chars) if chars else 0.0


def sentence_similarity(text: str) -> float:
    """Highest word-trigram Jaccard similarity between two sentences of ``text``.

    1.0 means some sentence is repeated verbatim; sentences under three words are
    ignored. Quadratic in the number of sentences, which is fine for passages of a
    few thousand characters.
    """
    grams = []
    for sentence in _SENTENCE_END.split(text):
        words = _WORD.findall(sentence.lower())
        if len(words) >= 3:
            grams.append({tuple(words[i:i + 3]) for i in range(len(words) - 2)})
    return max((len(a & b) / len(a | b) for a, b in itertools.combinations(grams, 2)), default=0.0)


def segment(
    document: str, *, min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS
) -> tuple[list[str], dict[str, int]]:
    """Pack one document's paragraphs into passages (rules 1-2, plus the length floor).

    Returns:
        (passages, counts) with counts ``paragraphs``, ``dropped_too_long`` and
        ``dropped_too_short``.
    """
    counts = dict(paragraphs=0, dropped_too_long=0, dropped_too_short=0)
    passages: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            text = "\n".join(current)
            if len(text) >= min_chars:
                passages.append(text)
            else:
                counts["dropped_too_short"] += 1
            current.clear()

    for para in split_paragraphs(document):
        counts["paragraphs"] += 1
        if len(para) > max_chars:
            flush()  # the passage must not jump over the dropped paragraph
            counts["dropped_too_long"] += 1
            continue
        if current and len("\n".join(current)) + 1 + len(para) > max_chars:
            flush()
        current.append(para)
    flush()
    return passages, counts


def _documents(path: Path) -> list[str]:
    """Documents of a JSONL file (field ``text``) or a plain-text file (one per line)."""
    name = path.name.removesuffix(".gz")
    if name.endswith((".jsonl", ".json")):
        docs = []
        for lineno, row in iter_jsonl(path):
            if not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{lineno}: expected a string field 'text'")
            docs.append(row["text"])
        return docs
    try:
        docs = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not docs:
        raise DataError(f"{path}: file is empty; expected one document per line")
    return docs


def read_web(
    source: str | Path,
    *,
    min_chars: int = MIN_CHARS,
    max_chars: int = MAX_CHARS,
    min_alpha_frac: float = MIN_ALPHA_FRAC,
    max_sentence_similarity: float = MAX_SENTENCE_SIMILARITY,
) -> tuple[list[Pair], dict[str, int]]:
    """Unlabelled passages (``instruction == ""``) from a web-text file.

    Args:
        source: a ``.jsonl``/``.json`` file (optionally ``.gz``) with a ``text`` field per
            row, any other file as plain text with one document per line, or a hub id
            naming the file (``owner/name/path/to/file.jsonl``).
        min_chars, max_chars, min_alpha_frac, max_sentence_similarity: the filters of
            the module docstring (``max_sentence_similarity > 1`` turns that one off).

    Returns:
        (pairs, stats) with stats keys ``documents``, ``paragraphs``, ``kept``,
        ``dropped_too_long`` (paragraphs), ``dropped_too_short``,
        ``dropped_low_alpha``, ``dropped_repetitive``, ``dropped_duplicate`` (passages).
    """
    if not 0 < min_chars <= max_chars:
        raise ValueError(f"need 0 < min_chars <= max_chars, got {min_chars}, {max_chars}")
    path = resolve(source, None)
    stats = dict(documents=0, paragraphs=0, kept=0, dropped_too_long=0, dropped_too_short=0,
                 dropped_low_alpha=0, dropped_repetitive=0, dropped_duplicate=0)
    pairs: list[Pair] = []
    for document in _documents(path):
        stats["documents"] += 1
        passages, counts = segment(document, min_chars=min_chars, max_chars=max_chars)
        for key, value in counts.items():
            stats[key] += value
        for passage in passages:
            if alpha_fraction(passage) < min_alpha_frac:
                stats["dropped_low_alpha"] += 1
                continue
            if sentence_similarity(passage) >= max_sentence_similarity:
                stats["dropped_repetitive"] += 1
                continue
            pairs.append(Pair(make_id("web", "", passage), "", passage, "web"))
    pairs, stats["dropped_duplicate"] = dedupe(pairs)
    stats["kept"] = len(pairs)
    return pairs, stats
