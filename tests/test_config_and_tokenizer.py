"""Config validation errors, and the tokenizer pool's text handling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.config import ConfigError, load_serve_config
from cluster.tokenizer import IncrementalDetokenizer, StopStrings, Tokenizer

LOCAL = Path(__file__).parent.parent / "deployments" / "local.yaml"


def write_variant(tmp_path: Path, edit) -> Path:
    doc = yaml.safe_load(LOCAL.read_text())
    edit(doc["applications"][0]["args"])
    out = tmp_path / "bad.yaml"
    out.write_text(yaml.safe_dump(doc))
    return out


def test_shipped_configs_are_valid():
    _, cfg = load_serve_config(LOCAL)
    assert cfg.frontend_pool.label_selector == {"cpu-arch": "kunpeng"}
    assert cfg.model_pool.label_selector == {"node-role": "model"}


def test_unknown_key_names_file_and_field(tmp_path):
    bad = write_variant(tmp_path, lambda a: a["engine"].update(max_num_seqz=3))
    with pytest.raises(ConfigError) as e:
        load_serve_config(bad)
    assert str(bad) in str(e.value) and "engine.max_num_seqz" in str(e.value)


def test_wrong_value_says_what_is_allowed(tmp_path):
    bad = write_variant(tmp_path, lambda a: a["engine"].update(device="tpu"))
    with pytest.raises(ConfigError) as e:
        load_serve_config(bad)
    msg = str(e.value)
    assert "engine.device" in msg and "'auto', 'cpu' or 'cuda'" in msg


def test_cli_refuses_bad_config(tmp_path):
    bad = write_variant(tmp_path, lambda a: a["model_pool"].update(num_replicas=0))
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "up", "--config", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "model_pool.num_replicas" in r.stderr


def test_detokenizer_holds_split_utf8(model_dir):
    tok = Tokenizer(model_dir)
    text = "naïve 你好 🚀✨ Ærøskøbing"
    ids = tok.encode(text, add_special_tokens=False)
    # byte-level BPE splits some of these characters across tokens
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    d = IncrementalDetokenizer(tok)
    deltas = [d.push([i]) for i in ids]
    assert not any("\ufffd" in x for x in deltas)
    assert "".join(deltas) + d.flush() == text


def test_detokenizer_in_chunks_equals_one_decode(model_dir):
    """Ids arrive one or several per step (a resumed stream, a multi-token step); the deltas
    of any split, and the flush, add up to one decode of them all, specials skipped or kept."""
    import random

    tok = Tokenizer(model_dir)
    text_ids = tok.encode("naïve 你好 🚀✨ Ærøskøbing, ok", add_special_tokens=False)
    for seed in range(40):
        rng = random.Random(seed)
        ids = text_ids if seed % 4 == 0 else [rng.randrange(tok.vocab_size)
                                              for _ in range(rng.randrange(1, 80))]
        for skip in (True, False):
            d, deltas, at = IncrementalDetokenizer(tok, skip), [], 0
            while at < len(ids):
                n = rng.choice([1, 1, 2, 5])
                deltas.append(d.push(ids[at:at + n]))
                at += n
            assert "".join(deltas) + d.flush() == tok.decode(ids, skip), (seed, skip)


def test_chat_template_renders_roles(model_dir):
    tok = Tokenizer(model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|begin_of_text|><|im_start|>user\nhi<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")


def test_stop_strings_across_chunks():
    s = StopStrings(["STOP", "xyz"])
    out = []
    for piece in ["hello S", "TO", "P world"]:
        text, hit = s.feed(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "hello " and hit
    s = StopStrings(["END"])
    assert s.feed("abcE")[0] == "ab" and s.feed("Nx")[0] == "cE" and s.flush() == "Nx"
