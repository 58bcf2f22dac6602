"""Lowering time and IR size against depth (GPT-2 configs), and the meta-device Pythia-1B config.

    python benchmarks/lower.py            # GPT-2 at 2, 12, 24, 48 layers (d=768, 12 heads) + Pythia-1B meta

Each configuration runs in a fresh process, so timings include nothing cached by an earlier one.
Reported: export time (torch.export + decomposition), lowering time, definitions, primitive leaves,
text bytes, and peak resident memory of the process.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

CONFIGS = {
    "gpt2-2": ("gpt2", 2), "gpt2-12": ("gpt2", 12), "gpt2-24": ("gpt2", 24), "gpt2-48": ("gpt2", 48),
    "pythia-1b-meta": ("pythia1b", 16),
}


def one(kind: str, layers: int) -> dict:
    import resource
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    import transformers as T
    from bwskc.frontend import default_inputs, export_module
    from bwskc.lowering import lower_exported
    meta = kind == "pythia1b"
    if meta:
        config = T.GPTNeoXConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=8,
                                 num_hidden_layers=layers, vocab_size=50304, rotary_pct=0.25)
        with torch.device("meta"):
            model = T.GPTNeoXForCausalLM(config)
    else:
        model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=layers, n_embd=768, n_head=12))
    args, kwargs = default_inputs(model, device="meta" if meta else "cpu", batch=1, seq=128)
    t0 = time.perf_counter()
    loaded = export_module(model, args, kwargs)
    ep = loaded.exported.run_decompositions({})
    t1 = time.perf_counter()
    program = lower_exported(ep, loaded.name, decompose=False)
    t2 = time.perf_counter()
    text = program.text()
    t3 = time.perf_counter()
    return {"layers": layers, "export_s": round(t1 - t0, 2), "lower_s": round(t2 - t1, 2),
            "print_s": round(t3 - t2, 2), "defs": len(program.defs), "leaves": program.num_prims(),
            "text_bytes": len(text.encode()),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main():
    if len(sys.argv) == 3:
        print(json.dumps(one(sys.argv[1], int(sys.argv[2]))))
        return
    print("| config | layers | export s | lower s | print s | defs | leaves | text bytes | bytes/layer | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (kind, layers) in CONFIGS.items():
        out = subprocess.run([sys.executable, __file__, kind, str(layers)], capture_output=True, text=True)
        if out.returncode:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {name} | {r['layers']} | {r['export_s']} | {r['lower_s']} | {r['print_s']} | {r['defs']} | "
              f"{r['leaves']} | {r['text_bytes']} | {r['text_bytes'] // r['layers']} | {r['peak_rss_mb']} |",
              flush=True)


if __name__ == "__main__":
    main()
