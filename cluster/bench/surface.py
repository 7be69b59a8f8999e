"""What the OpenAI surface costs under load: a plain load, then the same load where every
fourth request asks for logprobs (top 5), presence / frequency / repetition penalties and
a JSON schema, against the same served app.

    python -m cluster.bench.surface --concurrency 16 --num-prompts 64 --input-len 128 \\
        --output-len 128 [--url URL] [--json]

Prints each load's output tok/s and their ratio (the target: mixed >= 0.85 x plain).
Plain requests are greedy with ignore_eos; the schema (an object holding a list of
strings) lets a random-weight model write until max_tokens, so both loads make about the
same number of tokens. Exits non-zero if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from cluster.bench.path import served, workload
from cluster.bench.progress import stdout_to_stderr

SCHEMA = {"type": "object", "properties": {"items": {"type": "array",
                                                     "items": {"type": "string"}}},
          "required": ["items"]}
FEATURES = {"logprobs": 5, "presence_penalty": 0.5, "frequency_penalty": 0.5,
            "repetition_penalty": 1.1,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "items", "schema": SCHEMA}}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.bench.surface", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="deployments/local.yaml",
                   help="the app to start, or with --url the one running (its model)")
    p.add_argument("--url", help="a running tandem app (default: start a local cluster)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--every", type=int, default=4, help="one request in this many asks for "
                   "the features")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from cluster.arch import ModelArch
    from cluster.config import load_serve_config

    doc, cfg = load_serve_config(args.config)
    cfg.model_pool.num_replicas = 1
    cfg.model_pool.autoscaling = None
    cfg.engine.max_num_seqs = max(cfg.engine.max_num_seqs, args.concurrency)
    doc["applications"][0]["args"] = cfg.model_dump(mode="json")
    prompts = workload(args.num_prompts, args.input_len, args.output_len,
                       ModelArch.from_hf(cfg.model.path).vocab_size, args.seed)
    extras = [FEATURES if i % args.every == 0 else {} for i in range(len(prompts))]

    def both(url: str) -> dict:
        run = lambda desc, ex: asyncio.run(served(url, cfg.model.name, prompts,  # noqa: E731
                                                  args.output_len, args.concurrency, desc, ex))
        return {"plain": run("plain", None), "mixed": run("mixed", extras)}

    with stdout_to_stderr():
        if args.url:
            res = both(args.url)
        else:
            from cluster import local_cluster

            with local_cluster.serving(doc, cfg) as url:
                res = both(url)
    res["workload"] = {"concurrency": args.concurrency, "num_prompts": args.num_prompts,
                       "input_len": args.input_len, "output_len": args.output_len,
                       "featured_share": 1 / args.every}
    if not res["plain"]["output_tok_s"]:  # every plain request failed: say why, no ratio
        print(f"plain load: no tokens; first error: {res['plain'].get('first_error')}",
              file=sys.stderr)
        return 1
    res["mixed_vs_plain"] = res["mixed"]["output_tok_s"] / res["plain"]["output_tok_s"]
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for name in ("plain", "mixed"):
            r = res[name]
            print(f"{name:6s} {r['output_tok_s']:8.1f} output tok/s  ({r['tokens']} tokens, "
                  f"{r['errors']} errors; TTFT p50 {r['ttft_ms']['p50']:.0f} ms, TPOT p50 "
                  f"{r['tpot_ms']['p50']:.1f} ms)")
        print(f"mixed / plain: {res['mixed_vs_plain']:.2f} (target >= 0.85)")
    return 0 if res["plain"]["errors"] == res["mixed"]["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
