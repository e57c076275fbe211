"""The tasks built from a corpus (jaxcrit/evaluate/tasks.py) and the tasks stage that scores them through lm-eval.

The builder on a WikiText-style corpus written here, whose articles, paragraphs and sentences the
test knows: each item against the paragraph it came from, distractors from other articles, the
same files for the same seed. The stage on a tiny random llama with an alphabetic word-level
tokenizer: its acc, acc_norm and stderr for the clean model and a masked set against
transformers, one unbatched forward per choice (forward hooks zeroing the set's channels), and the
metrics computed by hand. Half of the corpus's last words are what the clean model predicts, so
last_word's acc is neither 0 nor 1.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

import hf_models
from jaxcrit.evaluate import tasks as T

VOCAB = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"]   # 80 alphabetic words
SPECIAL = ["[UNK]", ".", ","]                                   # ids 0, 1, 2; the words follow


def sentence(rng, lo: int, hi: int) -> list[str]:
    """A WikiText sentence: words, a ' , ' or ' @-@ ' inside, ending in '.'."""
    words = [str(w) for w in rng.choice(VOCAB, int(rng.integers(lo, hi + 1)))]
    words.insert(int(rng.integers(1, len(words))), str(rng.choice([",", "@-@"])))
    return words + ["."]


def write_corpus(path, articles: list[list[list[list[str]]]]) -> None:
    """WikiText rows: a row before the first title, titles, a section heading, a short row, and
    each paragraph as ' sentence sentence ... '."""
    rows = [" A preamble row that belongs to no article and is long enough to be kept . "]
    for a, art in enumerate(articles):
        rows += [f" = Article {a} = ", "", " = = Section = = ", " short row . "]
        rows += [" " + " ".join(" ".join(s) for s in para) + " " for para in art]
    path.write_text("\n".join(rows) + "\n")


def corpus(rng, n_articles: int = 5, paragraphs: int = 6) -> list:
    return [[[sentence(rng, 6, 14) for _ in range(int(rng.integers(1, 6)))] for _ in range(paragraphs)]
            for _ in range(n_articles)]


def words_before(sentences: list[list[str]], limit: int) -> list[str]:
    """The whole sentences ending the list within `limit` words (how a context is cut)."""
    out: list[str] = []
    for s in sentences[::-1]:
        if len(out) + len(s) > limit:
            break
        out = s + out
    return out


def test_detokenize():
    assert T.detokenize("It 's a long @-@ term , 1 @,@ 000 ( about $ 3 @.@ 5 ) deal ; do n't .".split()) == \
        "It's a long-term, 1,000 (about $3.5) deal; don't."


def test_builder_items_against_their_paragraphs(tmp_path):
    rng = np.random.default_rng(0)
    arts = corpus(rng)
    path = tmp_path / "corpus.raw"
    write_corpus(path, arts)
    arts = [[p for p in art if len(" ".join(" ".join(s) for s in p)) > 50] for art in arts]   # rows read_paragraphs keeps
    assert T.articles(path) == arts and sum(map(len, arts)) < 30

    built = T.write(path, tmp_path / "a", 20, seed=3)
    again = T.write(path, tmp_path / "b", 20, seed=3)
    other = T.write(path, tmp_path / "c", 20, seed=4)
    assert built == again
    for name in T.TASKS:
        assert (tmp_path / "a" / f"{name}.jsonl").read_text() == (tmp_path / "b" / f"{name}.jsonl").read_text()
    assert (tmp_path / "a" / "next_sentence.jsonl").read_text() != (tmp_path / "c" / "next_sentence.jsonl").read_text()
    rows = {name: [json.loads(x) for x in (tmp_path / "a" / f"{name}.jsonl").read_text().splitlines()] for name in T.TASKS}

    # next_sentence: the true choice ends the paragraph the context comes from; the others are
    # sentences of other articles, of about its length
    where = {T.detokenize(s): (a, s) for a, art in enumerate(arts) for para in art for s in para}
    eligible = [(a, para) for a, art in enumerate(arts) for para in art
                if len(para) >= 2 and 6 <= len(para[-1]) <= 30 and words_before(para[:-1], T.CONTEXT_WORDS)]
    assert built["next_sentence"]["items"] == len(rows["next_sentence"]) == min(20, len(eligible))
    answers = []
    for item in rows["next_sentence"]:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        a, para = next((a, p) for a, p in eligible if T.detokenize(p[-1]) == item["choices"][item["answer"]])
        assert item["context"] == T.detokenize(words_before(para[:-1], T.CONTEXT_WORDS))
        true_len = len(para[-1])
        for i, choice in enumerate(item["choices"]):
            if i != item["answer"]:
                b, s = where[choice]
                assert b != a and abs(len(s) - true_len) <= T.LENGTH_SLACK * true_len
        answers.append(item["answer"])
    assert len(set(answers)) > 1

    # last_word: the context and the word are the paragraph's end, the word is in the context
    ends = {}
    for art in arts:
        for para in art:
            *before, last = para
            context = words_before(before + [last[:-2]], T.CONTEXT_WORDS)
            if last[-2] in context:
                ends[T.detokenize(context)] = (context, last[-2])
    assert built["last_word"]["items"] == len(rows["last_word"]) == min(20, len(ends)) > 5
    for item in rows["last_word"]:
        context, word = ends[item["context"]]
        assert item["target"] == word and item["distinct_words"] == len({w for w in context if w.isalpha()})
    assert built["last_word"]["chance"]["acc"] == pytest.approx(np.mean([1 / x["distinct_words"] for x in rows["last_word"]]))
    assert built["next_sentence"]["chance"] == {"acc": 0.25, "acc_norm": 0.25}

    for name, t in built.items():
        cfg = yaml.safe_load((tmp_path / "a" / f"{name}.yaml").read_text())
        assert cfg["task"] == t["lm_eval"] == T.PREFIX + name and cfg["dataset_path"] == "json"
        assert cfg["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "a" / f"{name}.jsonl").resolve())


def test_builder_refuses_a_corpus_without_articles(tmp_path):
    from jaxcrit.errors import JaxcritError
    (tmp_path / "plain.txt").write_text("a row of plain text without any title, long enough to be read . \n" * 5)
    with pytest.raises(JaxcritError, match="no paragraph gives a next_sentence item"):
        T.write(tmp_path / "plain.txt", tmp_path / "out", 10, seed=0)


# ----------------------------------------------------------------------------- the stage, through lm-eval

MASKED = [("down_proj", layer, ch) for layer in (0, 1) for ch in range(0, 64, 2)] + [("act_fn", 1, 7)]


def log_probs(model, ids: list[int]):
    """[len(ids), V] log p of the token after each position, one unbatched float64 forward."""
    import torch
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer random llama and a WordLevel tokenizer of SPECIAL + VOCAB; torch on one thread
    for the ~400 reference forwards (hf_models.one_thread)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    d = tmp_path_factory.mktemp("tiny_llama")
    model = hf_models.build("llama", d, layers=2, initializer_range=0.2)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIAL + VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    with hf_models.one_thread():
        yield d, model, tok


def stage_corpus(rng, model, tok, n_articles: int = 4, paragraphs: int = 6) -> list:
    """Paragraphs of two sentences whose last word occurs earlier in them; in every other one it
    is the clean model's greedy prediction there, in the rest it is not."""
    arts = []
    for a in range(n_articles):
        arts.append([])
        while len(arts[-1]) < paragraphs:
            first, second = sentence(rng, 8, 14), sentence(rng, 6, 12)[:-1]
            before = first + second
            greedy = tok.id_to_token(int(log_probs(model, tok.encode(T.detokenize(before)).ids)[-1].argmax()))
            seen = [w for w in dict.fromkeys(before) if w.isalpha()]
            want_hit = len(arts[-1]) % 2 == 0
            if want_hit and greedy not in seen:
                continue
            word = greedy if want_hit else next(w for w in seen if w != greedy)
            arts[-1].append([first, second + [word, "."]])
    return arts


def test_tasks_stage_against_transformers(tiny, tmp_path):
    """Clean and masked scores of both tasks against transformers, one forward per choice; the
    greedy set holds the critical set's neurons in another order, so it is scored once."""
    import torch  # noqa: F401
    from jaxcrit import findings
    from jaxcrit.models.neurons import NeuronSet
    from jaxcrit.critical.stage2 import Critical
    from jaxcrit.run.runner import Run, prepare_workdir
    from jaxcrit.run.stages import STAGES
    from tiny_run import tiny_config
    model_dir, model, tok = tiny
    rng = np.random.default_rng(2)
    write_corpus(tmp_path / "corpus.raw", stage_corpus(rng, model, tok))
    c = tiny_config(model_dir, evaluate__file=str(tmp_path / "corpus.raw"), evaluate__sets=("greedy",),
                    tasks__enabled=True, tasks__limit=100, tasks__batch=5)
    wd = tmp_path / "run"
    prepare_workdir(wd, c, STAGES)
    crit = NeuronSet.of(MASKED)
    greedy = [{"site": s, "layer": l, "channel": ch} for s, l, ch in MASKED[::-1]]
    run = Run(c, wd, stages=STAGES, values={"critical": Critical(crit, len(crit), 1.0, 1.0, 1.0), "greedy": greedy})
    got = run["tasks"]
    assert json.loads((wd / "tasks.json").read_text()) == got
    assert list(got["sets"]) == ["base", "critical", "greedy"]
    assert got["sets"]["greedy"]["same_as"] == "critical" and got["sets"]["greedy"]["scores"] == got["sets"]["critical"]["scores"]
    assert got["sets"]["critical"]["n"] == len(MASKED) and got["sets"]["base"]["n"] == 0

    items = {name: [json.loads(x) for x in (wd / "tasks" / f"{name}.jsonl").read_text().splitlines()] for name in T.TASKS}
    assert [got["tasks"][k]["items"] for k in T.TASKS] == [len(items[k]) for k in T.TASKS] == [24, 24]
    ids = lambda s: tok.encode(s).ids
    stderr = lambda x: float(np.std(x, ddof=1) / math.sqrt(len(x)))
    want = {}
    for name, on in (("base", False), ("critical", True)):
        with hf_models.zeroed(model, MASKED, on) as m:
            acc, acc_norm, word = [], [], []
            for item in items["next_sentence"]:
                ctx = ids(item["context"])
                lls = []
                for choice in item["choices"]:
                    cont = ids(choice)
                    lp = log_probs(m, ctx + cont)
                    lls.append(lp[np.arange(len(ctx) - 1, len(ctx) + len(cont) - 1), cont].sum())
                acc.append(int(np.argmax(lls) == item["answer"]))
                acc_norm.append(int(np.argmax(np.array(lls) / [len(x) for x in item["choices"]]) == item["answer"]))
            for item in items["last_word"]:
                ctx, cont = ids(item["context"]), ids(item["target"])
                lp = log_probs(m, ctx + cont)[len(ctx) - 1:-1]
                word.append(int((lp.argmax(-1) == cont).all()))
        want[name] = {"next_sentence": {"acc": acc, "acc_norm": acc_norm}, "last_word": {"acc": word}}
        for task, metrics in want[name].items():
            for metric, x in metrics.items():
                score = got["sets"][name]["scores"][task][metric]
                assert score["value"] == pytest.approx(np.mean(x), abs=1e-12), (name, task, metric)
                assert score["stderr"] == pytest.approx(stderr(x), abs=1e-12), (name, task, metric)
    assert np.mean(want["base"]["last_word"]["acc"]) == 0.5               # the hits the corpus was written with
    assert want["base"] != want["critical"]                               # masking changed what is scored

    page = "\n".join(findings.q8_generations(findings.Results(wd)))
    base, masked = got["sets"]["base"]["scores"], got["sets"]["critical"]["scores"]
    for task, metric in (("next_sentence", "acc"), ("next_sentence", "acc_norm"), ("last_word", "acc")):
        row = next(line for line in page.splitlines() if line.startswith(f"| {task} | {metric} |"))
        assert f"{base[task][metric]['value']:.3f} ± {base[task][metric]['stderr']:.3f}" in row
        assert f"{masked[task][metric]['value']:.3f} ± {masked[task][metric]['stderr']:.3f}" in row
    assert "critical = greedy" in page
