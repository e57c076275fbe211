"""jaxcrit as an lm-evaluation-harness model (jaxcrit/evaluate/lmeval.py), offline, on a tiny random llama.

The test writes two local JSONL tasks (multiple choice: loglikelihood requests; generation:
generate_until) and their YAMLs, runs lm_eval.simple_evaluate with model "jaxcrit" clean and with
a neuron set zeroed (given as a critical.json file), and checks every logged response against
transformers on the same token ids: the summed log-probability and greedy flag of each choice,
and the greedy continuation cut at the task's stop string, the masked ones with PyTorch forward
hooks zeroing the same channels; the masked log-probabilities also against the engine's per-token
NLL. loglikelihood_rolling is checked on a text longer than max_length (several windows).
"""
from __future__ import annotations

import json

import lm_eval
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

import hf_models
from jaxcrit import engine as E
from jaxcrit.convert.load import load
from jaxcrit.evaluate.lmeval import JaxcritLM

WORDS = 210            # w0..w209 are ids 1..210; [UNK] is 0: every id of the model decodes to a word
EOS = 201              # w200; BOS stays 1 (w0)
NEURONS = [("down_proj", 1, 5), ("act_fn", 0, 7), ("v_proj", 1, 3)]


def words(rng, n: int) -> str:
    return " ".join(f"w{i}" for i in rng.integers(2, WORDS, n))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    torch_model = hf_models.build("llama", d, layers=2, initializer_range=0.2)
    for name in ("config.json", "generation_config.json"):   # EOS w200: its text is inside no other word
        f = d / name
        f.write_text(json.dumps({**json.loads(f.read_text()), "eos_token_id": EOS}))
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i + 1 for i in range(WORDS)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    rng = np.random.default_rng(0)
    mc = [{"question": words(rng, 30 + i), "choices": [words(rng, 1 + (i + j) % 3) for j in range(3)], "answer": i % 3}
          for i in range(5)]
    gen = [{"prompt": words(rng, 33 + 2 * i), "target": "w7"} for i in range(3)]
    tasks = tmp_path_factory.mktemp("tasks")
    for name, rows in (("mc", mc), ("gen", gen)):
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = lambda name: (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / name}.jsonl\n"
                         f"  cache_dir: {tasks / 'cache'}\ntest_split: test\n")
    (tasks / "jc_mc.yaml").write_text("task: jc_mc\n" + data("mc") + (
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"))
    (tasks / "jc_gen.yaml").write_text("task: jc_gen\n" + data("gen") + (
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['w57 ']\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"))
    critical = tmp_path_factory.mktemp("run") / "critical.json"
    critical.write_text(json.dumps({"n": 3, "neurons": [{"site": s, "layer": l, "channel": c} for s, l, c in NEURONS]}))
    with hf_models.one_thread():
        yield d, torch_model, tok, tasks, critical


def evaluate(model_dir, tasks, neurons: str = ""):
    from lm_eval.tasks import TaskManager
    out = lm_eval.simple_evaluate(model="jaxcrit", model_args=f"model={model_dir},dtype=float32,neurons={neurons},batch_size=4",
                                  tasks=["jc_mc", "jc_gen"],
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                  log_samples=True, bootstrap_iters=0)
    return out["samples"]


def ref_loglikelihood(model, ids: list[int], n_cont: int) -> tuple[float, bool]:
    with torch.no_grad():
        z = model(torch.tensor([ids])).logits[0, :-1].double()
    tgt = torch.tensor(ids[1:])
    lp = torch.log_softmax(z, -1)[torch.arange(len(tgt)), tgt][-n_cont:]
    return float(lp.sum()), bool((z.argmax(-1) == tgt)[-n_cont:].all())


@pytest.mark.parametrize("masked", [False, True])
def test_simple_evaluate_matches_transformers(setup, masked):
    model_dir, torch_model, tok, tasks, critical = setup
    samples = evaluate(model_dir, tasks, str(critical) if masked else "")
    ids = lambda s: tok.encode(s).ids
    with hf_models.zeroed(torch_model, NEURONS, masked) as ref:
        for s in samples["jc_mc"]:
            ctx = ids(s["doc"]["question"])
            for (ll, greedy), choice in zip((r[0] for r in s["resps"]), s["doc"]["choices"]):
                cont = ids(" " + choice)
                want = ref_loglikelihood(ref, ctx + cont, len(cont))
                assert abs(float(ll) - want[0]) < 1e-4 and bool(greedy) == want[1], (s["doc_id"], choice)
        outs = []
        for s in samples["jc_gen"]:
            p = ids(s["doc"]["prompt"])
            with torch.no_grad():
                g = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 do_sample=False, max_new_tokens=12, eos_token_id=EOS, pad_token_id=0)
            text = tok.decode(g[0, len(p):].tolist())
            want = text.split("w57 ")[0].split("w200")[0]     # the task's stop string, then the EOS's text
            assert s["resps"][0][0] == want
            outs.append(want)
    assert any(outs), "every continuation is empty: the comparison would not see a wrong generation"
    if masked:   # the masked log-probabilities are the engine's, and masking moved them
        m = load(str(model_dir), "float32")
        abl = E.make(np.array([[s for s, _, _ in NEURONS]]), [[l for _, l, _ in NEURONS]],
                     [[c for _, _, c in NEURONS]], cfg=m.cfg)
        s = samples["jc_mc"][0]
        seq = ids(s["doc"]["question"]) + ids(" " + s["doc"]["choices"][0])
        n = len(ids(" " + s["doc"]["choices"][0]))
        eng = E.Engine(m.cfg, m.params, E.Texts.from_ids([seq]), chunk=1, progress=False)
        assert abs(-eng.losses(abl, per_token=True)[0, 0, -n:].sum() - float(s["resps"][0][0][0])) < 1e-4
        assert abs(eng.losses(None, per_token=True)[0, 0, -n:].sum() - eng.losses(abl, per_token=True)[0, 0, -n:].sum()) > 1e-3


def test_loglikelihood_rolling_over_several_windows(setup):
    """A 40-word text, max_length 16: lm-eval's disjoint windows (the first after the BOS prefix),
    each scored by transformers on its own, summed."""
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    model_dir, torch_model, tok, _, _ = setup
    lm = JaxcritLM(model=str(model_dir), dtype="float32", max_length=16, batch_size=3)
    text = words(np.random.default_rng(1), 40)
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(tok.encode(text).ids, 1, 16, 1)]
    assert len(windows) == 3
    want = sum(ref_loglikelihood(torch_model, ctx + cont, len(cont))[0] for ctx, cont in windows)
    assert abs(got - want) < 1e-3


def test_bad_model_args(setup, tmp_path):
    from jaxcrit.errors import JaxcritError
    model_dir = setup[0]
    with pytest.raises(JaxcritError, match="no such file"):
        JaxcritLM(model=str(model_dir), neurons=str(tmp_path / "missing.json"))
    with pytest.raises(JaxcritError, match="like model.layers.11.mlp.down_proj"):
        JaxcritLM(model=str(model_dir), neurons="down_proj:1:5")
    with pytest.raises(JaxcritError, match="channel 999 out of range"):
        JaxcritLM(model=str(model_dir), neurons="model.layers.1.mlp.down_proj[999]")
    lm = JaxcritLM(model=str(model_dir), neurons="model.layers.1.mlp.down_proj[5]+model.layers.0.mlp.act_fn[7]")
    assert lm.neurons.keys() == [("down_proj", 1, 5), ("act_fn", 0, 7)]
