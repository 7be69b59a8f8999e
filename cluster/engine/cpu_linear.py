"""How an fp32 projection multiplies on the CPU: two weight layouts, chosen per shape.

- `sgemm`: the weight transposed, [in, out] contiguous, through torch.mm (MKL's sgemm
  with B not transposed). It keeps no state per row count.
- `onednn`: the weight reordered once into oneDNN's blocked layout
  (`mkldnn._linear_pointwise`). oneDNN keeps memory for every row count it sees (a replica
  grew by 305 MB over 1,000 abandoned streams of mixed lengths), so rows are padded to a
  few counts (`padded_rows`).

Neither wins everywhere (`python -m cluster.bench.projections`: a step's projections with
distinct weights, streamed from cache or memory as a step does; one core of this project's
2-core Xeon, AVX-512): the default model's 17 (256 wide, ~20 MB of weights, which the
caches hold) at 16 / 64 rows take 1,158 / 3,109 us through sgemm and 1,520 / 3,739 through
oneDNN; Qwen2.5-0.5B's 97 (896 wide, 2 GB streamed from memory) at 8 rows 324 ms against
212 (at 1 row 136 against 166, at 64 equal). A layer timed alone (its weight hot in cache)
prefers sgemm for every shape of both models but the 0.5B LM head, so the choice is made
for the whole model from its own forward pass: `decide` times one at decode row counts
(TUNE_ROWS) in each layout and takes oneDNN where it is clearly faster (ONEDNN_MARGIN). Once
per process and model shape: every engine in it multiplies alike (two engines compared
token for token must round alike). Either layout replaces the plain weight: one copy in
memory, not two.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TUNE_ROWS = (8, 32)
ONEDNN_MARGIN = 0.9  # oneDNN only if its pass takes under 0.9x sgemm's time
LAYOUTS = ("sgemm", "onednn")
_chosen: dict[tuple, str] = {}  # model shape -> layout, decided once per process


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and \
        hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def padded_rows(m: int) -> int:
    """The row count oneDNN multiplies: up to 8, to a multiple of 8 up to 64, then to a
    quarter of the power of two below m (four counts an octave: 80, 96, 112, 128, 160, ...),
    so a prefill chunk pads by at most a quarter and a few counts bound oneDNN's per-count
    memory (36 up to 8,192 rows). Padding 65-255 rows to 256 made a 80-token chunk cost
    what a 256-token one does (51 ms against 17 ms at 64 on the KV tier benchmark's shape)."""
    if m <= 8:
        return 8
    if m <= 64:
        return -(-m // 8) * 8
    step = (1 << ((m - 1).bit_length() - 1)) // 4
    return -(-m // step) * step


def to_layout(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """The plain [out, in] weight in `layout`."""
    if layout == "onednn":
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
    return weight.t().contiguous()


def matmul(x: torch.Tensor, packed: torch.Tensor, layout: str,
           bias: torch.Tensor | None) -> torch.Tensor:
    if layout == "sgemm":
        return torch.mm(x, packed) if bias is None else torch.addmm(bias, x, packed)
    m = x.shape[0]
    rows = padded_rows(m)
    if rows != m:
        x = torch.cat([x, x.new_zeros(rows - m, x.shape[1])])
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")[:m]


def dense(packed: torch.Tensor, layout: str) -> torch.Tensor:
    """The plain [out, in] weight back."""
    return packed.to_dense() if layout == "onednn" else packed.t()


def decide(key: tuple, seconds: Callable[[str], float]) -> str:
    """The layout of a model shape (`key`) in this process: the one whose forward pass
    (`seconds(layout)`, the model packed that way) is clearly faster, decided the first
    time the shape is seen."""
    if key not in _chosen:
        if not onednn_available():
            _chosen[key] = "sgemm"
        else:
            took = {name: seconds(name) for name in LAYOUTS}
            _chosen[key] = "onednn" if took["onednn"] < ONEDNN_MARGIN * took["sgemm"] \
                else "sgemm"
    return _chosen[key]


def chosen() -> dict:
    """This process's choices, model shape -> layout."""
    return dict(_chosen)
