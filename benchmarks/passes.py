"""Pass pipeline time against IR size: GPT-2 configs (d=768, 12 heads, seq 128, batch 1) at 2 to 48 layers.

    python benchmarks/passes.py             # 2, 6, 12, 24, 48 layers, one fresh process each
    python benchmarks/passes.py gpt2 12     # one configuration, JSON on stdout

Reported per configuration: export, lowering, and each pass (typing with real weights, calm, fusion)
in seconds, the number of leaf sites, and the pass time per 1000 sites (flat when the passes are linear).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

DEPTHS = (2, 6, 12, 24, 48)


def one(layers: int) -> dict:
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    import transformers as T
    from bwskc.frontend import default_inputs, export_module
    from bwskc.lowering import lower_exported
    from bwskc.passes.manager import get_pass, run_passes
    from bwskc.sites import sites
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=layers, n_embd=768, n_head=12)).eval()
    args, kwargs = default_inputs(model, batch=1, seq=128)
    t0 = time.perf_counter()
    loaded = export_module(model, args, kwargs)
    t1 = time.perf_counter()
    program = lower_exported(loaded.exported, loaded.name)
    t2 = time.perf_counter()
    times = {}
    current = program
    for name in ("typing", "calm", "fusion"):
        try:
            get_pass(name)
        except Exception:  # a pass not in this checkout: skip it rather than fail the others
            continue
        start = time.perf_counter()
        current = run_passes(current, [name], verify=False)
        times[name] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    from bwskc.verify import verify_program
    verify_program(program)
    verify_s = round(time.perf_counter() - start, 2)
    n = len(sites(program))
    passes_s = sum(times.values())
    return {"layers": layers, "export_s": round(t1 - t0, 2), "lower_s": round(t2 - t1, 2),
            "verify_s": verify_s, **{f"{k}_s": v for k, v in times.items()}, "sites": n,
            "passes_s": round(passes_s, 2), "passes_ms_per_1k_sites": round(1e6 * passes_s / n / 1000, 1),
            "lower_plus_passes_s": round(t2 - t1 + passes_s + verify_s, 2)}


def main():
    if len(sys.argv) == 3:
        print(json.dumps(one(int(sys.argv[2]))))
        return
    rows = []
    for layers in DEPTHS:
        out = subprocess.run([sys.executable, __file__, "gpt2", str(layers)], capture_output=True, text=True)
        if out.returncode:
            print(f"gpt2-{layers}: failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "|".join("---" for _ in keys) + "|")
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "-")) for k in keys) + " |")


if __name__ == "__main__":
    main()
