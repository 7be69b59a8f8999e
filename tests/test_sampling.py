"""Logprobs, prompt scoring, penalties, biases and n > 1 in the engine, against transformers
on the built-in model (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from cluster.engine.sequence import SamplingParams
from cluster.tokenizer import Tokenizer
from tests.test_engine import make_engine

TEXTS = ["hello world, this is a test of the", "The quick brown fox jumps over the lazy dog. " * 4]


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(model_dir):
    tok = Tokenizer(model_dir)
    return [tok.encode(t) for t in TEXTS]


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row i is the log-distribution of the token after ids[: i + 1]."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def run(eng, reqs: dict[str, tuple[list[int], SamplingParams]], after=None):
    for rid, (ids, p) in reqs.items():
        eng.add_request(rid, ids, p, after=(after or {}).get(rid))
    got = {rid: {"tokens": [], "lps": [], "plps": None, "reason": None} for rid in reqs}
    while eng.has_work():
        for o in eng.step():
            g = got[o.request_id]
            g["tokens"] += o.new_token_ids
            g["lps"] += o.logprobs or []
            g["plps"] = o.prompt_logprobs or g["plps"]
            g["reason"] = o.finish_reason or g["reason"]
    return got


def test_logprobs_equal_transformers(model_dir, hf, prompts):
    eng = make_engine(model_dir)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)
    got = run(eng, {f"r{i}": (p, params) for i, p in enumerate(prompts)})
    for i, p in enumerate(prompts):
        g = got[f"r{i}"]
        ref = hf_logprobs(hf, p + g["tokens"])[len(p) - 1: -1]
        assert len(g["lps"]) == 12
        for row, (chosen, top_ids, top_lps), tok in zip(ref, g["lps"], g["tokens"],
                                                        strict=True):
            assert abs(chosen - row[tok].item()) < 1e-4
            assert top_ids[0] == tok  # greedy: the chosen token is the top one
            ref_top = row.topk(5)
            assert torch.allclose(torch.tensor(top_lps), ref_top.values, atol=1e-4)
            assert top_ids == ref_top.indices.tolist()


@pytest.mark.parametrize("budget", [512, 16], ids=["one_prefill", "chunked"])
def test_prompt_logprobs_equal_transformers_and_ignore_the_prefix_cache(model_dir, hf,
                                                                        prompts, budget):
    """Echo scoring: token 0 has none; every other prompt token's logprob is HF's, with
    chunked prefill, and again when the prompt's blocks are already cached."""
    eng = make_engine(model_dir, max_num_batched_tokens=budget)
    p = prompts[1]
    ref = hf_logprobs(hf, p)
    plain = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    scored = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, prompt_logprobs=2)
    run(eng, {"warm": (p, plain)})  # its blocks are cached now
    hits = eng.blocks.prefix_hits
    got = run(eng, {"s": (p, scored)})["s"]["plps"]
    assert eng.blocks.prefix_hits == hits  # the scoring request computed every position
    assert got[0] is None and len(got) == len(p)
    for j in range(1, len(p)):
        chosen, top_ids, top_lps = got[j]
        assert abs(chosen - ref[j - 1, p[j]].item()) < 1e-4
        assert top_ids == ref[j - 1].topk(2).indices.tolist()


def test_repetition_penalty_equals_hf_logits_processor(model_dir, hf, prompts):
    """Each step's processed distribution (the logprobs returned) is HF's
    RepetitionPenaltyLogitsProcessor over prompt and output tokens."""
    from transformers import RepetitionPenaltyLogitsProcessor

    proc = RepetitionPenaltyLogitsProcessor(1.5)
    p = prompts[1]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3,
                            repetition_penalty=1.5)
    got = run(make_engine(model_dir), {"r": (p, params)})["r"]
    seen = p[:]
    for tok, (chosen, top_ids, _) in zip(got["tokens"], got["lps"], strict=True):
        with torch.no_grad():
            logits = hf(torch.tensor([seen])).logits[:, -1].float()
        ref = proc(torch.tensor([seen]), logits)[0].log_softmax(-1)
        assert tok == int(ref.argmax()) and abs(chosen - ref[tok].item()) < 1e-4
        assert top_ids == ref.topk(3).indices.tolist()
        seen.append(tok)
    assert ref[p[0]] < hf_logprobs(hf, seen)[-2][p[0]]  # a prompt token was pushed down


def test_frequency_and_presence_penalties_follow_openai(model_dir, hf, prompts):
    """logit - frequency x count - presence x [seen], over output tokens only; the logprobs
    returned are those of the penalized distribution."""
    p = prompts[0]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=0,
                            frequency_penalty=0.7, presence_penalty=0.4)
    got = run(make_engine(model_dir), {"r": (p, params)})["r"]
    out = []
    for tok, (chosen, _, _) in zip(got["tokens"], got["lps"], strict=True):
        with torch.no_grad():
            logits = hf(torch.tensor([p + out])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.int64),
                                minlength=logits.shape[0]).float()
        logits = logits - 0.7 * counts - 0.4 * (counts > 0).float()
        assert tok == int(logits.argmax())
        assert abs(chosen - logits.log_softmax(-1)[tok].item()) < 1e-4
        out.append(tok)


def test_logit_bias_min_tokens_and_min_p(model_dir, prompts):
    eng = make_engine(model_dir)
    eos = min(eng.eos)
    forced = SamplingParams(temperature=1.0, max_tokens=5, seed=3, logit_bias=[(42, 100.0)])
    assert eng.generate([prompts[0]], forced) == [[42] * 5]
    # EOS biased up: it is masked until min_tokens are out, then ends the request at once
    early = SamplingParams(temperature=0.0, max_tokens=20, min_tokens=4,
                           logit_bias=[(eos, 100.0)])
    got = run(eng, {"m": (prompts[0], early)})["m"]
    assert got["tokens"][-1] == eos and len(got["tokens"]) == 5 and got["reason"] == "stop"
    # min_p = 1 keeps only the top token: sampling gives the greedy output
    greedy = eng.generate([prompts[1]], SamplingParams(temperature=0.0, max_tokens=8,
                                                       ignore_eos=True))
    cut = eng.generate([prompts[1]], SamplingParams(temperature=1.5, max_tokens=8, seed=1,
                                                    min_p=1.0, ignore_eos=True))
    assert cut == greedy


def test_n_choices_share_the_prompt_and_are_reproducible(model_dir, prompts):
    """Siblings wait for the first choice's prefill and take its prompt blocks from the
    prefix cache; seeded choices give the same text run after run, and differ."""
    p = prompts[1]

    def choices():
        eng = make_engine(model_dir)
        reqs = {f"c{i}": (p, SamplingParams(temperature=1.0, max_tokens=8, seed=100 + i,
                                            ignore_eos=True)) for i in range(3)}
        got = run(eng, reqs, after={"c1": "c0", "c2": "c0"})
        full = (len(p) - 1) // eng.cfg.block_size
        return [got[f"c{i}"]["tokens"] for i in range(3)], eng.blocks.prefix_hits, full

    first, hits, full = choices()
    assert hits == 2 * full  # both siblings found every full prompt block cached
    again, _, _ = choices()
    assert first == again and len({tuple(c) for c in first}) > 1


def test_grammar_constrained_output_is_schema_valid(model_dir, prompts):
    """The random-weight model, sampled, under a JSON schema: the text validates; the
    request ends (stop) once the grammar is complete."""
    import json

    import jsonschema

    from cluster.structured import GrammarSpec

    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        # bounded: an unbounded integer lets a sampled row write digits past max_tokens
        "n": {"type": "integer", "minimum": 0, "maximum": 999}}, "required": ["name", "tags", "n"],
        "additionalProperties": False}
    eng = make_engine(model_dir)
    tok = Tokenizer(model_dir)
    reqs = {f"g{i}": (prompts[i % 2], SamplingParams(
        temperature=1.0, seed=i, max_tokens=120,
        grammar=GrammarSpec("json_schema", schema).to_wire())) for i in range(4)}
    reqs["plain"] = (prompts[0], SamplingParams(temperature=0.0, max_tokens=10,
                                                ignore_eos=True))
    got = run(eng, reqs)
    for i in range(4):
        g = got[f"g{i}"]
        assert g["reason"] == "stop", g
        text = tok.decode([t for t in g["tokens"] if t not in eng.eos])
        jsonschema.validate(json.loads(text), schema)
    assert len(got["plain"]["tokens"]) == 10


def test_a_resumed_stream_counts_its_earlier_tokens_as_output(model_dir, prompts):
    """Migration resumes a stream from prompt + tokens made: min_tokens (and penalties,
    the grammar) count those as output, so the resumed stream ends as the unbroken one."""
    eng = make_engine(model_dir)
    eos = min(eng.eos)
    made = [42, 43]
    p = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=4, resumed=len(made),
                       logit_bias=[(eos, 100.0)])
    got = run(eng, {"r": (prompts[0] + made, p)})["r"]
    assert len(got["tokens"]) == 3 and got["tokens"][-1] == eos  # 2 + 2 masked, then EOS


def test_the_device_draw_follows_the_distribution():
    """The inverse-transform draw picks token t with probability
    probs[t]: 40,000 rows of one distribution, each frequency within 4 sigma of it."""
    from cluster.engine.sampler import sample_on_device
    from cluster.engine.sequence import Sequence

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0]).repeat(40_000, 1)
    seqs = [Sequence("r", [1], SamplingParams(temperature=1.0, max_tokens=1))] * len(logits)
    freq = torch.bincount(sample_on_device(logits, seqs), minlength=5).float() / len(logits)
    probs = logits[0].softmax(-1)
    sigma = (probs * (1 - probs) / len(logits)).sqrt()
    assert ((freq - probs).abs() <= 4 * sigma + 1e-9).all(), (freq, probs)
    assert freq[4] == 0  # e^-32 of the mass: never drawn in 40,000


def test_the_graph_draw_follows_the_tempered_distribution_and_keeps_greedy_rows():
    """draw_plain (what the decode CUDA graph replays): sampled rows follow
    softmax(logits / T) within 4 sigma; greedy rows (sampled flag off) keep their argmax,
    failed rows NAN_TOKEN."""
    from cluster.engine.sampler import NAN_TOKEN, draw_plain, greedy_tokens

    n = 40_000
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0]).repeat(n, 1)
    logits[-1, 0] = float("nan")
    temps = torch.full((n,), 0.5)
    sampled = torch.arange(n) % 4 != 0  # every fourth row greedy
    out = draw_plain(logits, greedy_tokens(logits), temps, sampled)
    assert out[-1] == NAN_TOKEN
    assert (out[:-1][~sampled[:-1]] == 0).all()
    drawn = out[:-1][sampled[:-1]]
    freq = torch.bincount(drawn, minlength=5).float() / len(drawn)
    probs = (logits[0] / 0.5).softmax(-1)
    sigma = (probs * (1 - probs) / len(drawn)).sqrt()
    assert ((freq - probs).abs() <= 4 * sigma + 1e-9).all(), (freq, probs)


def test_sampled_steps_run_ahead_and_a_seed_gives_the_same_text_either_way(model_dir,
                                                                           prompts):
    """Temperature / top-k / top-p requests step one ahead (sampled on the device), and a
    seeded one's text is the same with steps run ahead, one at a time, or batched beside a
    penalized request (whose steps take the host sampler)."""
    params = [SamplingParams(temperature=1.0, max_tokens=12, seed=7, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_tokens=12, seed=8,
                             ignore_eos=True)]

    def texts(overlap: bool, beside=None):
        eng = make_engine(model_dir, overlap_steps=overlap)
        reqs = {f"s{i}": (prompts[i % 2], p) for i, p in enumerate(params)}
        if beside:
            reqs["pen"] = (prompts[0], beside)
        ahead = []
        for rid, (ids, p) in reqs.items():
            eng.add_request(rid, ids, p)
        got = {rid: [] for rid in reqs}
        while eng.has_work():
            for o in eng.step():
                got[o.request_id] += o.new_token_ids
            ahead.append(eng._flight is not None)
        return [got[f"s{i}"] for i in range(len(params))], ahead

    one_ahead, ahead = texts(True)
    assert sum(ahead) >= 8  # the decode steps were launched before the last one's tokens
    one_at_a_time, never = texts(False)
    assert not any(never)
    host, _ = texts(True, beside=SamplingParams(temperature=1.0, max_tokens=12, seed=9,
                                                 presence_penalty=1.0, ignore_eos=True))
    assert one_ahead == one_at_a_time == host
    assert all(len(t) == 12 for t in one_ahead)
