"""The sampling features on a GPU (CUDA graphs on): a batch mixing plain greedy rows with
logprobs, penalties, prompt scoring and a JSON schema, against transformers on the GPU.
Run on the device: python -m pytest -m gpu tests/gpu
"""

from __future__ import annotations

import json

import pytest
import torch

from cluster.config import DEFAULT_MODEL_DIR, EngineConfig
from cluster.engine.engine import LLMEngine
from cluster.engine.sequence import SamplingParams
from cluster.model_init import build
from cluster.structured import GrammarSpec
from cluster.tokenizer import Tokenizer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# n bounded: an unbounded integer let a sampled (temperature 1) row write digits past
# max_tokens on an H100 where an H200's numerics stopped in time
SCHEMA = {"type": "object",
          "properties": {"k": {"enum": ["a", "b"]},
                         "n": {"type": "integer", "minimum": 0, "maximum": 999}},
          "required": ["k", "n"], "additionalProperties": False}


def test_mixed_features_batch_on_cuda_matches_transformers():
    from transformers import AutoModelForCausalLM

    folder = str(build(DEFAULT_MODEL_DIR))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    tok = Tokenizer(folder)
    prompts = [tok.encode(t) for t in ["hello there", "The quick brown fox " * 5, "x = 1\n" * 9]]
    eng = LLMEngine(folder, EngineConfig(device="cuda", dtype="float32", max_model_len=512,
                                         max_num_seqs=16, max_num_batched_tokens=256))
    assert eng.runner.graphs, "decode CUDA graphs captured"
    plain = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    reqs = {
        "plain0": (prompts[0], plain), "plain1": (prompts[1], plain),
        "lp": (prompts[2], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                          logprobs=4)),
        "pen": (prompts[1], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                           frequency_penalty=1.0, presence_penalty=0.5,
                                           logprobs=0)),
        "echo": (prompts[1], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)),
        "json": (prompts[0], SamplingParams(temperature=1.0, seed=4, max_tokens=100,
                                            grammar=GrammarSpec("json_schema", SCHEMA)
                                            .to_wire())),
    }
    for rid, (ids, p) in reqs.items():
        eng.add_request(rid, ids, p)
    got = {rid: {"t": [], "lp": [], "plp": None, "why": None} for rid in reqs}
    while eng.has_work():
        for o in eng.step():
            g = got[o.request_id]
            g["t"] += o.new_token_ids
            g["lp"] += o.logprobs or []
            g["plp"] = o.prompt_logprobs or g["plp"]
            g["why"] = o.finish_reason or g["why"]

    def logprobs(ids):
        with torch.no_grad():
            return hf(torch.tensor([ids], device="cuda")).logits[0].float().log_softmax(-1)

    for rid, i in (("plain0", 0), ("plain1", 1)):
        ids = torch.tensor([prompts[i]], device="cuda")
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=16, min_new_tokens=16)[0, ids.shape[1]:].tolist()
        assert got[rid]["t"] == want
    p, g = prompts[2], got["lp"]
    ref = logprobs(p + g["t"])[len(p) - 1: -1]
    for row, (chosen, top_ids, _), t in zip(ref, g["lp"], g["t"], strict=True):
        assert abs(chosen - row[t].item()) < 1e-3 and top_ids == row.topk(4).indices.tolist()
    out: list[int] = []
    for t, (chosen, _, _) in zip(got["pen"]["t"], got["pen"]["lp"], strict=True):
        logits = logprobs(prompts[1] + out)[-1]  # log-softmax shifts every logit alike
        c = torch.bincount(torch.tensor(out, dtype=torch.int64, device="cuda"),
                           minlength=logits.shape[0]).float()
        pen = logits - 1.0 * c - 0.5 * (c > 0).float()
        assert t == int(pen.argmax()) and abs(chosen - pen.log_softmax(-1)[t].item()) < 1e-3
        out.append(t)
    ref = logprobs(prompts[1])
    plp = got["echo"]["plp"]
    assert plp[0] is None and len(plp) == len(prompts[1])
    assert max(abs(plp[j][0] - ref[j - 1, prompts[1][j]].item())
               for j in range(1, len(prompts[1]))) < 1e-3
    g = got["json"]
    assert g["why"] == "stop"
    doc = json.loads(tok.decode([t for t in g["t"] if t not in eng.eos]))
    assert doc["k"] in ("a", "b") and isinstance(doc["n"], int)


def test_sampled_decode_runs_ahead_through_the_graphs_with_the_same_seeded_text():
    """temperature / top-k / top-p traffic on the GPU: decode steps replay the CUDA graphs
    and are launched one ahead (sampled on the device), and seeded texts equal those of
    steps run one at a time."""
    folder = str(build(DEFAULT_MODEL_DIR))
    prompts = [[3 + i, 40 + i, 7] * (4 + i) for i in range(24)]
    params = [SamplingParams(temperature=1.0, top_p=0.95 if i % 2 else 1.0,
                             top_k=50 if i % 3 == 0 else 0, max_tokens=24, seed=i,
                             ignore_eos=True) for i in range(24)]

    def run(overlap: bool):
        cfg = EngineConfig(device="cuda", dtype="float32", max_model_len=512, max_num_seqs=32,
                           num_kv_blocks=256, overlap_steps=overlap)
        eng = LLMEngine(folder, cfg)
        assert eng.runner.graphs
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
            eng.add_request(str(i), p, sp)
        got, ahead = {str(i): [] for i in range(24)}, 0
        while eng.has_work():
            for o in eng.step():
                got[o.request_id] += o.new_token_ids
            ahead += eng._flight is not None
        return [got[str(i)] for i in range(24)], ahead

    one_ahead, ahead = run(True)
    one_at_a_time, none = run(False)
    assert ahead >= 16 and none == 0
    assert one_ahead == one_at_a_time
    assert all(len(t) == 24 for t in one_ahead) and len({tuple(t) for t in one_ahead}) > 12


def _engine(folder: str, **kw) -> LLMEngine:
    cfg = EngineConfig(device="cuda", dtype="float32", max_model_len=512, max_num_seqs=32,
                       num_kv_blocks=256, **kw)
    return LLMEngine(folder, cfg)


def test_temperature_traffic_is_drawn_inside_the_decode_graph():
    """Unseeded temperature rows (OpenAI's default traffic) are drawn by the decode graph's
    own draw, launched one ahead; a greedy row beside them keeps the text it has beside
    greedy rows (the same batch shapes, so the same kernels)."""
    folder = str(build(DEFAULT_MODEL_DIR))
    prompts = [[3 + i, 40 + i, 7] * (4 + i) for i in range(16)]

    def run(temperature: float):
        eng = _engine(folder)
        draws0 = eng.runner.decode_graphs.draws
        got, ahead = {}, 0
        for i, p in enumerate(prompts):
            eng.add_request(str(i), p, SamplingParams(
                temperature=0.0 if i == 0 else temperature, max_tokens=24, ignore_eos=True))
        while eng.has_work():
            for o in eng.step():
                got.setdefault(o.request_id, []).extend(o.new_token_ids)
            ahead += eng._flight is not None
        return [got[str(i)] for i in range(16)], eng.runner.decode_graphs.draws - draws0, ahead

    greedy, no_draws, _ = run(0.0)
    sampled, draws, ahead = run(0.8)
    assert no_draws == 0 and draws >= 16 and ahead >= 16
    assert sampled[0] == greedy[0]
    assert all(len(t) == 24 for t in sampled)
    assert len({tuple(t) for t in sampled[1:]}) == 15 and sampled[1:] != greedy[1:]


def test_the_decode_graphs_draw_follows_the_distribution_with_fresh_noise_per_replay():
    """The captured draw, replayed over fixed logits: sampled rows follow softmax(l / T)
    within 4 sigma (so every replay draws new noise from the generator), greedy rows keep
    their argmax."""
    folder = str(build(DEFAULT_MODEL_DIR))
    eng = _engine(folder)
    graphs = eng.runner.decode_graphs
    bs = 32
    g = graphs.graphs[bs]
    with torch.inference_mode():  # the graphs' buffers are inference tensors
        g.logits.fill_(-30.0)
        g.logits[:, :4] = torch.tensor([2.0, 1.0, 0.0, -1.0], device=g.logits.device)
        g.tokens.zero_()
        graphs.buf.dev["temps"][:bs] = 0.7
        graphs.buf.dev["sampled"][:bs] = torch.arange(bs, device=g.logits.device) % 8 != 0
        outs = []
        for _ in range(1500):
            g.draw.replay()
            outs.append(g.drawn.clone())
    out = torch.stack(outs).cpu()  # [replays, bs]
    assert (out[:, ::8] == 0).all()
    drawn = out[:, torch.arange(bs) % 8 != 0].flatten()
    freq = torch.bincount(drawn, minlength=4)[:4].float() / len(drawn)
    probs = (torch.tensor([2.0, 1.0, 0.0, -1.0]) / 0.7).softmax(-1)
    sigma = (probs * (1 - probs) / len(drawn)).sqrt()
    assert ((freq - probs).abs() <= 4 * sigma + 1e-9).all(), (freq, probs)
    assert (out[0] != out[1]).any()
