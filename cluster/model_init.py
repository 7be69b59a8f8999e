"""Builds the default model: a small Llama checkpoint with seeded random weights and a real
byte-level BPE tokenizer trained on text generated here, in Hugging Face format. (DeepSeek
shapes: the same tokenizer, the weights made and saved by transformers; deepseek_shapes.py.)

Its output text is noise (the weights are random); it exists so that the whole serving path
runs anywhere without downloading weights, through the same loader as a real checkpoint.
"""

from __future__ import annotations

import json
import pydoc
import random
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from cluster.bench.progress import progress
from cluster.deepseek_shapes import DEEPSEEK_SHAPES, write_checkpoint

BOS, EOS, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"
# ChatML; with `tools`, Qwen2.5's way: the tools' JSON in the system turn, calls as
# <tool_call> blocks (the "hermes" tool parser reads them), results as <tool_response> blocks
# in a user turn. A call's arguments may be a JSON string (OpenAI) or an object (HF).
CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages and messages[0].role == 'system' %}
        {{- messages[0].content or '' }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
        'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and '
        'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n'
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- endif %}
{%- for m in messages %}
    {%- if m.role == 'system' and loop.first and tools %}
    {%- elif m.role == 'assistant' and m.tool_calls %}
        {{- '<|im_start|>assistant' }}
        {%- if m.content %}
            {{- '\n' + m.content }}
        {%- endif %}
        {%- for call in m.tool_calls %}
            {%- set f = call.function if call.function is defined else call %}
            {{- '\n<tool_call>\n{"name": "' + f.name + '", "arguments": ' }}
            {{- f.arguments if f.arguments is string else f.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif m.role == 'tool' %}
        {%- if loop.first or loop.previtem.role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + m.content + '\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + m.role + '\n' + (m.content or '') + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""
SHAPE = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
# the same tokenizer on a bigger body, for serving runs on a GPU: the layers of
# Qwen2.5-0.5B (random weights, bf16; the vocabulary stays the tokenizer's)
SHAPES = {"tiny": SHAPE,
          "qwen2.5-0.5b": dict(SHAPE, hidden_size=896, intermediate_size=4864,
                               num_hidden_layers=24, num_attention_heads=14,
                               num_key_value_heads=2, max_position_embeddings=32768)}
SEED = 1234
# multi-byte text, so that some characters end up split across tokens
UNICODE_LINES = ["héllo wörld, café, naïve, Ærøskøbing", "你好，世界。机器学习模型服务。",
                 "Привет, мир! Καλημέρα κόσμε", "emoji: 🚀✨🙂 ∑∫≈ ≠ ∞",
                 "日本語のテキスト、한국어 텍스트"]


def corpus() -> list[str]:
    """Deterministic English-ish text: the docs of the Python modules that ship with Python."""
    lines: list[str] = []
    for name in ("json", "random", "pathlib", "collections", "itertools", "functools", "string",
                 "textwrap", "argparse", "logging", "re", "os", "typing", "dataclasses"):
        try:
            lines += pydoc.render_doc(name, renderer=pydoc.plaintext).splitlines()
        except Exception:  # pragma: no cover - a trimmed Python may lack a module
            continue
    rng = random.Random(SEED)
    lines += [rng.choice(UNICODE_LINES) for _ in range(2000)]
    return [ln for ln in lines if ln.strip()]


def train_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, IM_START, IM_END]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos)])
    return tok


def random_weights(cfg: dict, layer_done=lambda: None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * dim

    def w(*shape, std=0.05):
        return (torch.randn(*shape, generator=g) * std).contiguous()

    t = {"model.embed_tokens.weight": w(cfg["vocab_size"], h, std=1.0),
         "model.norm.weight": torch.ones(h), "lm_head.weight": w(cfg["vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(kv, h),
              p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, h),
              p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
              p + "mlp.down_proj.weight": w(h, inter),
              p + "input_layernorm.weight": torch.ones(h),
              p + "post_attention_layernorm.weight": torch.ones(h)}
        layer_done()
    return t


def build(out: Path, force: bool = False, shape: str = "tiny") -> Path:
    out = Path(out).expanduser()
    if (out / "model.safetensors").exists() and not force:
        _update_template(out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    if shape in DEEPSEEK_SHAPES:
        return _build_deepseek(out, shape)
    dims = SHAPES[shape]
    # steps: the tokenizer, each layer's weights, the save
    with progress(total=dims["num_hidden_layers"] + 2, desc=f"building {out.name}",
                  unit="step") as bar:
        tok = train_tokenizer(dims["vocab_size"])
        bar.update()
        _write(out, dims, tok, torch.float32 if shape == "tiny" else torch.bfloat16, bar)
    return out


def _build_deepseek(out: Path, shape: str) -> Path:
    """The default model's tokenizer (its ids are below the shape's vocabulary) and files,
    then the config and weights as transformers writes them."""
    with progress(total=2, desc=f"building {out.name}", unit="step") as bar:
        tok = train_tokenizer(SHAPE["vocab_size"])
        bar.update()
        tok.save(str(out / "tokenizer.json"))
        _write_tokenizer_config(out, DEEPSEEK_SHAPES[shape]["max_position_embeddings"])
        write_checkpoint(out, shape, tok.token_to_id(BOS),
                         [tok.token_to_id(EOS), tok.token_to_id(IM_END)], SEED)
        bar.update()
    return out


def _write_tokenizer_config(out: Path, max_len: int) -> None:
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "pad_token": EOS, "add_bos_token": True, "model_max_length": max_len,
        "chat_template": CHAT_TEMPLATE}, indent=2))


def _update_template(out: Path) -> None:
    """A checkpoint built before the chat template last changed gets the current one (the
    weights and the tokenizer stay)."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    if cfg.get("chat_template") != CHAT_TEMPLATE:
        cfg["chat_template"] = CHAT_TEMPLATE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cfg, indent=2))
        tmp.replace(path)  # whole or not at all, for a server reading it meanwhile


def _write(out: Path, dims: dict, tok: Tokenizer, dtype: torch.dtype, bar) -> None:
    """The checkpoint's files; model.safetensors last."""
    tok.save(str(out / "tokenizer.json"))
    eos_ids = [tok.token_to_id(EOS), tok.token_to_id(IM_END)]
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **dims,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
           "tie_word_embeddings": False, "attention_bias": False,
           "torch_dtype": str(dtype).removeprefix("torch."),
           "bos_token_id": tok.token_to_id(BOS), "eos_token_id": eos_ids}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": eos_ids}, indent=2))
    _write_tokenizer_config(out, dims["max_position_embeddings"])
    tmp = out / "model.safetensors.tmp"
    weights = {k: v.to(dtype) for k, v in random_weights(cfg, bar.update).items()}
    save_file(weights, str(tmp), metadata={"format": "pt"})
    bar.update()
    tmp.rename(out / "model.safetensors")  # last: its presence marks a complete model
