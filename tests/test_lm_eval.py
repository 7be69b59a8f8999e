"""lm-eval, a real client, scores a small local multiple-choice task through tandem's
completions endpoint (`local-completions`: token-id prompts, echo + logprobs) the same as
through its own `hf` model on the same checkpoint: every (doc, choice) loglikelihood, and acc."""

from __future__ import annotations

import json
from importlib.util import find_spec

import pytest

from tests.skips import skip_or_fail

MODEL = "tandem-tiny"
TASK = "tandem_tiny_mc"
TOL = 1e-3

QUESTIONS = [
    ("What colour is the sky on a clear day?", ["blue", "green", "red", "purple"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten"], 1),
    ("Which planet is closest to the sun?", ["Venus", "Earth", "Mercury", "Mars"], 2),
    ("What is frozen water called?", ["steam", "ice", "sand"], 1),
    ("Which animal barks?", ["cat", "cow", "dog", "fish"], 2),
    ("What do bees make?", ["honey", "milk", "silk"], 0),
    ("How many days are in a week?", ["five", "seven", "nine", "twelve"], 1),
    ("What is the opposite of hot?", ["warm", "loud", "cold"], 2),
]

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_task(tmp_path) -> None:
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n"
                            for q, c, y in QUESTIONS))
    (tmp_path / f"{TASK}.yaml").write_text(
        TASK_YAML.format(task=TASK, data=data, cache=tmp_path / "hf_datasets"))


def per_choice(samples: list[dict]) -> dict[tuple[int, int], tuple[float, bool]]:
    """(doc_id, choice index) -> (loglikelihood, is_greedy), from log_samples' entries."""
    out = {}
    for s in samples:
        for j, resp in enumerate(s["filtered_resps"]):
            ll, greedy = resp
            out[(s["doc_id"], j)] = (float(ll), bool(greedy))
    return out


def test_lm_eval_scores_through_tandem_like_its_hf_model(app_url, model_dir, tmp_path,
                                                          monkeypatch):
    try:
        import lm_eval
        import requests
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        skip_or_fail(f"lm-eval is not importable: {err}")
    # local-completions needs lm-eval's `api` extra and the hf model its `hf` extra (each
    # raises ModuleNotFoundError without): the `lm-eval` dependency alone brings neither.
    missing = [m for m in ("aiohttp", "tenacity", "tqdm", "accelerate") if find_spec(m) is None]
    if missing:
        skip_or_fail(f"lm-eval's api/hf extras are not installed (lm-eval[api,hf]): "
                     f"missing {missing}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    write_task(tmp_path)
    tm = TaskManager(include_path=str(tmp_path))
    assert TASK in tm.all_tasks

    # A spy, not a change: every body lm-eval posts is recorded, then sent unchanged.
    sent: list[dict] = []
    real_post = requests.post

    def post(url, *args, **kwargs):
        sent.append(kwargs.get("json"))
        r = real_post(url, *args, **kwargs)
        if not r.ok:  # what tandem refused, and why, in the failure rather than a log line
            pytest.fail(f"tandem answered {r.status_code} to lm-eval's request\n"
                        f"body: {json.dumps(kwargs.get('json'))}\nanswer: {r.text}",
                        pytrace=False)
        return r

    monkeypatch.setattr(requests, "post", post)

    # BOS on both sides: the hf model's default follows the tokenizer (adds it), the API
    # model's default is not to; token-id prompts so tandem scores exactly lm-eval's tokens.
    common = dict(add_bos_token=True, max_length=512)
    api = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=dict(model=MODEL, base_url=f"{app_url}/v1/completions",
                        tokenizer_backend="huggingface", tokenizer=str(model_dir),
                        tokenized_requests=True, num_concurrent=1, max_retries=1,
                        timeout=120, **common),
        tasks=[TASK], task_manager=tm, log_samples=True, batch_size=4, bootstrap_iters=0)
    hf = lm_eval.simple_evaluate(
        model="hf",
        model_args=dict(pretrained=str(model_dir), dtype="float32", device="cpu", **common),
        tasks=[TASK], task_manager=tm, log_samples=True, batch_size=4, bootstrap_iters=0)

    n_choices = sum(len(c) for _, c, _ in QUESTIONS)
    assert sent, "lm-eval sent nothing to tandem"
    body = sent[0]
    assert body["echo"] is True and body["logprobs"] and body["model"] == MODEL, body
    prompts = [p for b in sent for p in b["prompt"]]
    assert len(prompts) == n_choices, f"{len(prompts)} prompts sent for {n_choices} choices"
    assert all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompts), \
        f"lm-eval did not send token-id prompts: {body}"

    a, h = per_choice(api["samples"][TASK]), per_choice(hf["samples"][TASK])
    assert len(a) == len(h) == n_choices, (len(a), len(h), n_choices)
    assert a.keys() == h.keys()
    diffs = {k: abs(a[k][0] - h[k][0]) for k in a}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < TOL, (
        f"loglikelihoods differ by up to {diffs[worst]:.3g} (doc {worst[0]}, choice "
        f"{worst[1]}: tandem {a[worst][0]:.6f}, hf {h[worst][0]:.6f}); "
        f"{sum(d >= TOL for d in diffs.values())}/{len(diffs)} over {TOL}; "
        f"first request body: {json.dumps(body)}")
    greedy = [k for k in a if a[k][1] != h[k][1]]
    assert not greedy, f"is_greedy differs for (doc, choice) {greedy}"

    acc_api = api["results"][TASK]["acc,none"]
    acc_hf = hf["results"][TASK]["acc,none"]
    assert acc_api == acc_hf, (f"acc: tandem {acc_api}, hf {acc_hf} "
                               f"(max |Δ loglikelihood| {diffs[worst]:.3g})")
    print(f"\nlm-eval {getattr(lm_eval, '__version__', '?')}: "
          f"{len(sent)} requests, max |Δ loglikelihood| {diffs[worst]:.3g}, acc {acc_api}; "
          f"first body: {json.dumps(body)}")
