"""Structured outputs: request fields -> constraint -> llguidance matcher -> masks on logits.

The model here is random logits: whatever it "wants", the masks plus accept() must still
produce text that the constraint accepts.
"""

from __future__ import annotations

import json
import random
import re
import shutil

import jsonschema
import msgpack
import numpy as np
import pytest
import torch

from cluster import structured as st
from cluster.engine.structured_mask import allowed_tokens, apply_bitmask
from cluster.tokenizer import Tokenizer

PADDED_VOCAB = 4100  # the tokenizer has 4096 ids: 4 padding rows, not a multiple of 32


@pytest.fixture(scope="module")
def padded_model(model_dir, tmp_path_factory):
    """The built-in model's tokenizer with 4 embedding rows past its vocabulary, and EOS ids
    split between config.json (<|im_end|>) and tokenizer_config.json (<|end_of_text|>)."""
    d = tmp_path_factory.mktemp("padded")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, d / name)
    cfg = json.loads((model_dir / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"vocab_size": PADDED_VOCAB,
                                                     "eos_token_id": 3}))
    return d


@pytest.fixture(scope="module")
def tok(padded_model):
    return st.tokenizer_info(padded_model)


@pytest.fixture(scope="module")
def text_of(model_dir):
    return Tokenizer(model_dir).decode


def allowed_ids(state: st.GrammarState, tok) -> set[int]:
    bm = st.allocate_bitmask(1, tok.vocab_size)
    state.fill_mask(bm, 0)
    return set(np.flatnonzero(allowed_tokens(torch.from_numpy(bm), tok.vocab_size)[0]).tolist())


def feed(state: st.GrammarState, tok, text: str) -> bool:
    return all(state.accept(t) for t in tok.tokenize_str(text))


def drive(specs: list[st.GrammarSpec], tok, seed: int, max_steps: int = 600) -> list[list[int]]:
    """Generates for a batch of constraints from seeded random logits, through the engine's
    path: fill_masks -> apply_bitmask -> argmax -> accept, until each grammar finishes."""
    gen = torch.Generator().manual_seed(seed)
    states = [st.GrammarState(s, tok) for s in specs]
    out: list[list[int]] = [[] for _ in specs]
    live = list(range(len(specs)))
    bitmask = st.allocate_bitmask(len(specs), tok.vocab_size)
    for _ in range(max_steps):
        if not live:
            break
        st.fill_masks([(states[i], row) for row, i in enumerate(live)], bitmask)
        logits = torch.randn(len(live), tok.vocab_size, generator=gen)
        apply_bitmask(logits, torch.from_numpy(bitmask[: len(live)]))
        still = []
        for i, t in zip(live, logits.argmax(-1).tolist(), strict=True):
            assert states[i].accept(t), states[i].error()
            if t in tok.eos_tokens:
                continue
            out[i].append(t)
            if not states[i].is_finished():
                still.append(i)
        live = still
    assert not live, f"{len(live)} grammars unfinished after {max_steps} steps"
    return out


# -- request fields -> spec --------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize("fields, expected", [
    ({}, None),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, st.GrammarSpec("json_object")),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     st.GrammarSpec("json_schema", SCHEMA)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     st.GrammarSpec("json_object")),
    ({"guided_json": SCHEMA}, st.GrammarSpec("json_schema", SCHEMA)),
    ({"guided_json": json.dumps(SCHEMA)}, st.GrammarSpec("json_schema", SCHEMA)),
    ({"guided_regex": "[0-9]+"}, st.GrammarSpec("regex", "[0-9]+")),
    ({"guided_choice": ["yes", "no"]}, st.GrammarSpec("choice", ["yes", "no"])),
    ({"guided_grammar": 'start: "a"'}, st.GrammarSpec("grammar", 'start: "a"')),
    ({"structured_outputs": {"json": SCHEMA}}, st.GrammarSpec("json_schema", SCHEMA)),
    ({"structured_outputs": {"regex": "a+", "choice": None, "json_object": False}},
     st.GrammarSpec("regex", "a+")),
    ({"structured_outputs": {"choice": ["a", "b"]}}, st.GrammarSpec("choice", ["a", "b"])),
    ({"structured_outputs": {"grammar": 'start: "a"'}}, st.GrammarSpec("grammar", 'start: "a"')),
    ({"structured_outputs": {"json_object": True}}, st.GrammarSpec("json_object")),
    ({"response_format": {"type": "text"}, "guided_regex": "a"}, st.GrammarSpec("regex", "a")),
])
def test_spec_from_request(fields, expected):
    spec = st.spec_from_request(fields)
    assert spec == expected
    if spec is not None:  # the wire form survives msgpack and JSON
        assert st.GrammarSpec.from_wire(msgpack.unpackb(msgpack.packb(spec.to_wire()))) == spec
        assert st.GrammarSpec.from_wire(json.loads(json.dumps(spec.to_wire()))) == spec


@pytest.mark.parametrize("fields, message", [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"},
     "response_format and guided_regex"),
    ({"guided_json": SCHEMA, "structured_outputs": {"choice": ["a"]}},
     "guided_json and structured_outputs.choice"),
    ({"response_format": {"type": "yaml"}}, "'yaml' is not supported"),
    ({"response_format": {"type": "json_schema"}}, "json_schema must be an object"),
    ({"guided_json": "{not json"}, "guided_json is not valid JSON"),
    ({"guided_json": [1]}, "guided_json must be a JSON schema object"),
    ({"guided_choice": []}, "non-empty list of strings"),
    ({"guided_choice": ["a", 1]}, "non-empty list of strings"),
    ({"guided_regex": 5}, "guided_regex must be a string"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structural_tag is not supported"),
])
def test_spec_from_request_errors(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        st.spec_from_request(fields)


# -- validate ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    (st.GrammarSpec("json_schema", {"type": "string", "pattern": "(ab"}), "unclosed group"),
    (st.GrammarSpec("json_schema", {"$ref": "#/$defs/missing"}), "does not exist"),
    (st.GrammarSpec("json_schema", {"type": "array", "uniqueItems": True}), "uniqueItems"),
    (st.GrammarSpec("json_schema", {"type": "integer", "minimum": 5, "maximum": 2}),
     "minimum (5) is greater than maximum (2)"),
    (st.GrammarSpec("regex", "a(b"), "unclosed group"),
    (st.GrammarSpec("grammar", "start: foo"), 'unknown name: "foo"'),
    (st.GrammarSpec("grammar", "start: <|nope|>"), "unknown special token"),
    (st.GrammarSpec("grammar", 'root ::= "a'), "GBNF"),
])
def test_validate_rejects(spec, message, tok):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        st.validate(spec, tok)
    assert str(e.value).startswith(f"invalid {spec.kind} constraint: ")


def test_validate_accepts_gbnf_and_special_tokens(tok, text_of):
    for spec in [st.GrammarSpec("grammar", 'root ::= "yes" | "no"'),
                 st.GrammarSpec("grammar", 'start: "a" <|im_end|>'),
                 st.GrammarSpec("json_object"), st.GrammarSpec("json_schema", SCHEMA)]:
        st.validate(spec, tok)
    [ids] = drive([st.GrammarSpec("grammar", 'root ::= "yes" | "no"')], tok, seed=0)
    assert text_of(ids) in ("yes", "no")


# -- generation from random logits -------------------------------------------------------------

WORDS = ["red", "green", "blue", "a b", 'say "hi"', "héllo", "🚀"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """Nested objects, arrays, enums, bounded strings, integers, booleans, null. Strings are
    bounded and extra properties are off: a random model never closes an open-ended one."""
    r = rng.random()
    if depth >= 3 or r < 0.45:
        kind = rng.choice(["string", "integer", "range", "boolean", "enum", "null"])
        if kind == "string":
            return {"type": "string", "maxLength": rng.randint(0, 8)}
        if kind == "range":
            lo = rng.randint(-100, 100)
            return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 1000)}
        if kind == "enum":
            return {"enum": rng.sample(WORDS, rng.randint(1, 4))}
        return {"type": kind}
    if r < 0.7:
        lo = rng.randint(0, 2)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": lo,
                "maxItems": lo + rng.randint(0, 3)}
    props = {f"k{i}": random_schema(rng, depth + 1) for i in range(rng.randint(1, 4))}
    return {"type": "object", "properties": props, "additionalProperties": False,
            "required": rng.sample(sorted(props), rng.randint(0, len(props)))}


def test_random_schemas_give_valid_json(tok, text_of):
    rng = random.Random(1234)
    schemas = [{"type": "object", "properties": {"root": random_schema(rng, 1),
                                                 "n": {"type": "integer"}},
                "required": ["root"], "additionalProperties": False} for _ in range(32)]
    for start in range(0, len(schemas), 8):
        batch = schemas[start:start + 8]
        specs = [st.GrammarSpec("json_schema", s) for s in batch]
        for spec in specs:
            st.validate(spec, tok)
        for schema, ids in zip(batch, drive(specs, tok, seed=start), strict=True):
            text = text_of(ids)
            jsonschema.validate(json.loads(text), schema)
            assert "\n" not in text  # one line: no whitespace runs between tokens


def test_regex_and_choice(tok, text_of):
    pattern = r"[a-z]{2,5}-\d{3}( (ok|fail))?"
    choices = ["yes", "no", "yes, no", 'say "hi"', "back\\slash", "héllo 🚀", "two\nlines"]
    specs = [st.GrammarSpec("regex", pattern)] * 6 + [st.GrammarSpec("choice", choices)] * 6
    outs = [text_of(ids) for ids in drive(specs, tok, seed=7)]
    assert all(re.fullmatch(pattern, t) for t in outs[:6]), outs[:6]
    assert all(t in choices for t in outs[6:]), outs[6:]


def test_json_object(tok, text_of):
    state = st.GrammarState(st.GrammarSpec("json_object"), tok)
    first = allowed_ids(state, tok)
    assert first and all(text_of([t]).startswith("{") for t in first)
    assert feed(state, tok, '{"a": [1, {"b": null}], "c": {}}')
    assert state.is_finished() and state.error() is None
    assert not st.GrammarState(st.GrammarSpec("json_object"), tok).accept(
        tok.tokenize_str("[")[0])


def test_json_whitespace(tok):
    for text in ('{"a":1}', '{ "a" : 1 }'):
        state = st.GrammarState(st.GrammarSpec("json_schema", SCHEMA), tok)
        assert feed(state, tok, text) and state.is_finished()
    text = '{\n  "a":  1\n}'
    strict = st.GrammarState(st.GrammarSpec("json_schema", SCHEMA), tok)
    assert not feed(strict, tok, text)
    # a schema can ask for more
    loose = st.GrammarState(st.GrammarSpec(
        "json_schema", SCHEMA | {"x-guidance": {"whitespace_pattern": "[ \n]*"}}), tok)
    assert feed(loose, tok, text) and loose.is_finished()


# -- the matcher's state -----------------------------------------------------------------------

def test_eos_and_padding(tok):
    # EOS = tokenizer_config's eos_token plus config.json's eos_token_id
    assert tok.vocab_size == PADDED_VOCAB and sorted(tok.eos_tokens) == [1, 3]
    state = st.GrammarState(st.GrammarSpec("choice", ["yes", "yesno"]), tok)
    assert max(allowed_ids(state, tok)) < 4096  # padding ids never allowed
    assert feed(state, tok, "yes")
    assert not state.is_finished() and state.is_accepting()
    assert {1, 3} <= allowed_ids(state, tok)  # may stop or go on to "yesno"
    assert feed(state, tok, "no")
    assert state.is_finished() and allowed_ids(state, tok) == {1, 3}  # only EOS is left


def test_rollback_and_error(tok):
    spec = st.GrammarSpec("regex", r"\d{4}")
    state = st.GrammarState(spec, tok)
    before = allowed_ids(state, tok)
    ids = tok.tokenize_str("12")
    assert all(state.accept(t) for t in ids)
    assert allowed_ids(state, tok) != before
    assert state.rollback(len(ids)) and allowed_ids(state, tok) == before
    # the compile cache hands out copies: advancing one sequence leaves another alone
    other = st.GrammarState(spec, tok)
    assert allowed_ids(other, tok) == before
    assert not state.accept(tok.tokenize_str("x")[0])
    assert state.error() and state.is_finished() and allowed_ids(state, tok) == {1, 3}
    assert other.error() is None and allowed_ids(other, tok) == before


# -- masks on logits ---------------------------------------------------------------------------

def unpack_reference(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little").astype(bool)
    return np.pad(bits, ((0, 0), (0, max(0, vocab - bits.shape[1]))))[:, :vocab]


@pytest.mark.parametrize("vocab, words", [(4100, 128), (4100, 129), (4096, 128), (37, 1)])
def test_apply_bitmask(vocab, words):
    gen = torch.Generator().manual_seed(vocab + words)
    bitmask = torch.randint(-2**31, 2**31 - 1, (64, words), dtype=torch.int32, generator=gen)
    bitmask[:, 0] |= 1  # every row allows something
    allowed = unpack_reference(bitmask.numpy(), vocab)
    assert (allowed_tokens(bitmask, vocab).numpy() == allowed).all()
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(64, vocab, generator=gen).to(dtype)
        apply_bitmask(logits, bitmask)
        assert torch.isneginf(logits[torch.from_numpy(~allowed)]).all()
        assert torch.isfinite(logits[torch.from_numpy(allowed)]).all()
        assert allowed[np.arange(64), logits.argmax(-1).numpy()].all()
    if vocab > words * 32:  # embedding rows past the mask are forbidden
        assert torch.isneginf(logits[:, words * 32:]).all()


def test_apply_bitmask_some_rows():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 100, generator=gen)
    original = logits.clone()
    bitmask = torch.from_numpy(st.allocate_bitmask(2, 100))
    bitmask[0] = 0
    bitmask[0, 1] = 1 << 3  # row 1 of the batch: token 35 only
    apply_bitmask(logits, bitmask, rows=torch.tensor([1, 3]))  # bitmask row 1 all ones
    assert logits[1].argmax() == 35 and torch.isfinite(logits[1]).sum() == 1
    keep = [0, 2, 3, 4]
    assert torch.equal(logits[keep], original[keep])
