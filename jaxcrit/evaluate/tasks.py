"""Downstream tasks built from a corpus, so lm-evaluation-harness scores a masked model offline.

lm-eval's own tasks download their datasets from the Hugging Face hub; these are written from the
corpus the run already reads (`evaluate.file`: the study's WikiText test split), as one JSONL file
of items and one lm-eval task YAML each (`dataset_path: json`), and scored by
jaxcrit/evaluate/lmeval.py's model. Items are drawn with a seeded generator, so a seed and a corpus give
the same files. Each row of TASKS says what its task asks, how it is scored and its chance level:
next_sentence (multiple choice: does the model follow a text's topic and discourse?) and last_word
(LAMBADA-style: can it carry a name or term across a paragraph?).

WikiText rows are tokenized text (` @-@ `, spaces before punctuation); contexts and choices are
given back their plain spelling (DETOKENIZE) before the model sees them.
"""
from __future__ import annotations

import dataclasses
import json
import re
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from jaxcrit.data.texts import PARAGRAPH_CHARS, corpus_file
from jaxcrit.errors import JaxcritError

CONTEXT_WORDS = 60           # contexts are the last whole sentences within this many words
SENTENCE_WORDS = (6, 30)     # next_sentence's true sentences and distractors: words, inclusive
LENGTH_SLACK = 0.25          # a distractor's words are within this share of the true sentence's
CHOICES = 4
ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}   # an lm-eval metric_list row
PREFIX = "jaxcrit_"          # lm-eval's name of a task: PREFIX + its name here

TITLE = re.compile(r" = [^=].* = ")                      # an article's title row; sections are " = = x = = "
SENTENCE_END = re.compile(r"(?<= [.!?]) (?=\S)")         # WikiText sentences end with " ." / " ?" / " !"
DETOKENIZE = (                                           # WikiText spelling -> plain text, in order
    (re.compile(r" @(.)@ "), r"\1"),                     # 1 @,@ 000, long @-@ term
    (re.compile(r" ([.,;:!?%)\]])"), r"\1"),             # no space before closing punctuation
    (re.compile(r"([(\[$]) "), r"\1"),                   # nor after opening
    (re.compile(r" ('s|'re|'ve|'ll|'d|'m|n't)\b"), r"\1"),
)

Article = list[list[list[str]]]   # paragraphs, each its sentences, each its WikiText words


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    what: str                                                          # items, metrics, chance (tasks.json, findings.md)
    build: Callable[[list[Article], int, np.random.Generator], list[dict]]   # (articles, items, rng) -> items
    lm_eval: dict                                                      # the task YAML's fields beyond name and data
    chance: Callable[[list[dict]], dict[str, float]]                   # each metric's chance level on the items


def detokenize(words: list[str]) -> str:
    text = " ".join(words)
    for pattern, plain in DETOKENIZE:
        text = pattern.sub(plain, text)
    return text


def articles(path: str | Path) -> list[Article]:
    """The corpus's articles in file order: each a list of paragraphs (the rows read_paragraphs
    keeps), each a list of sentences of WikiText words. Rows before the first title, and
    headings, belong to no article."""
    out: list[Article] = []
    for row in corpus_file(path).read_text(encoding="utf-8").splitlines():
        text = row.strip()
        if TITLE.fullmatch(row):
            out.append([])
        elif out and len(text) > PARAGRAPH_CHARS and not text.startswith("="):
            out[-1].append([s.split(" ") for s in SENTENCE_END.split(text)])
    return [a for a in out if a]


def tail(sentences: list[list[str]], max_words: int) -> list[str]:
    """The words of the longest run of whole sentences ending the list within max_words words."""
    words: list[str] = []
    for s in reversed(sentences):
        if len(words) + len(s) > max_words:
            break
        words = s + words
    return words


def _pick(candidates: list, items: int, rng: np.random.Generator) -> list:
    """`items` of the candidates drawn without replacement, in corpus order."""
    return [candidates[i] for i in sorted(rng.choice(len(candidates), min(items, len(candidates)), replace=False))]


def next_sentence(arts: list[Article], items: int, rng: np.random.Generator) -> list[dict]:
    """{context, choices, answer} items: the module docstring's next_sentence."""
    lo, hi = SENTENCE_WORDS
    pool = [(a, s) for a, art in enumerate(arts) for para in art for s in para if lo <= len(s) <= hi]
    pool_words = np.array([len(s) for _, s in pool])
    pool_article = np.array([a for a, _ in pool])
    near = lambda a, n: np.flatnonzero((pool_article != a) & (np.abs(pool_words - n) <= LENGTH_SLACK * n))
    found = [(a, context, para[-1]) for a, art in enumerate(arts) for para in art
             if len(para) >= 2 and lo <= len(para[-1]) <= hi and (context := tail(para[:-1], CONTEXT_WORDS))
             and len(near(a, len(para[-1]))) >= CHOICES - 1]
    out = []
    for a, context, true in _pick(found, items, rng):
        others = [pool[i][1] for i in rng.choice(near(a, len(true)), CHOICES - 1, replace=False)]
        answer = int(rng.integers(CHOICES))
        choices = [detokenize(s) for s in others[:answer] + [true] + others[answer:]]
        out.append({"context": detokenize(context), "choices": choices, "answer": answer})
    return out


def last_word(arts: list[Article], items: int, rng: np.random.Generator) -> list[dict]:
    """{context, target, distinct_words} items: the module docstring's last_word."""
    found = []
    for art in arts:
        for para in art:
            *before, last = para
            if len(last) < 3 or last[-1] != "." or not last[-2].isalpha():
                continue
            context = tail(before + [last[:-2]], CONTEXT_WORDS)
            if last[-2] in context:
                found.append((context, last[-2]))
    return [{"context": detokenize(context), "target": word,
             "distinct_words": len({w for w in context if w.isalpha()})} for context, word in _pick(found, items, rng)]


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("next_sentence", f"multiple choice: a paragraph's sentences before its last one (at most {CONTEXT_WORDS} "
         f"words) and {CHOICES} candidates for the last one, the true sentence and {CHOICES - 1} of about its length "
         "from other articles; acc takes the choice with the largest summed log-probability, acc_norm divides that "
         f"by the choice's length in characters; chance 1/{CHOICES}", next_sentence,
         {"output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
          "doc_to_target": "{{answer}}", "metric_list": [ACC, {**ACC, "metric": "acc_norm"}]},
         lambda items: {"acc": 1 / CHOICES, "acc_norm": 1 / CHOICES}),
    Task("last_word", f"LAMBADA-style: a paragraph cut before its last word, a word that occurs earlier in the cut "
         f"context (at most {CONTEXT_WORDS} words); acc counts the word when every one of its tokens is the greedy "
         "continuation; chance: a uniform guess among the context's distinct words", last_word,
         {"output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": " {{target}}",
          "metric_list": [ACC]},
         lambda items: {"acc": float(np.mean([1 / x["distinct_words"] for x in items]))}),
)}


def write(corpus: str | Path, folder: Path, items: int, seed: int) -> dict[str, dict]:
    """Every task's items (at most `items` each) and lm-eval YAML written into folder; per task
    its lm-eval name, what it measures, its item count and chance levels (tasks.json's "tasks")."""
    import yaml
    arts = articles(corpus)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for t in TASKS.values():
        rows = t.build(arts, items, np.random.default_rng([seed, zlib.crc32(t.name.encode())]))
        if not rows:
            raise JaxcritError(f"{corpus}: no paragraph gives a {t.name} item (the tasks need a corpus of "
                               "WikiText-style articles: ' = Title = ' rows, sentences ending in ' .')")
        data = folder / f"{t.name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        config = {"task": PREFIX + t.name, "dataset_path": "json",
                  "dataset_kwargs": {"data_files": {"test": str(data.resolve())},
                                     "cache_dir": str((folder / "cache").resolve())},
                  "test_split": "test", **t.lm_eval, "metadata": {"version": 1}}
        (folder / f"{t.name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        out[t.name] = {"lm_eval": PREFIX + t.name, "what": t.what, "items": len(rows), "chance": t.chance(rows)}
    return out
