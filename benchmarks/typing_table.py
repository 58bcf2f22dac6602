"""S/K/GRAY ratios of the zoo (tiny configs of bwskc/testing.py, random weights), against the published
prototype's S ratios, with the operations that account for the erasure.

    python benchmarks/typing_table.py       # markdown table on stdout (docs/typing.md)
"""
from __future__ import annotations

import warnings
from collections import Counter

warnings.filterwarnings("ignore")

PROTOTYPE = {"gpt2": 60.8, "pythia": 67.0, "bert": 67.3, "t5": 70.5, "opt": 89.1, "switch": 52.6,
             "vit": 72.1, "mamba": 86.0}


def main():
    from bwskc.testing import ZOO_NAMES, lower_zoo_model

    from bwskc.passes.manager import run_passes
    print("| Model | Prototype S | bwskc S | bwskc K | bwskc GRAY | ops | most frequent K ops | GRAY ops |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ZOO_NAMES:
        program = run_passes(lower_zoo_model(name).program, ["typing"])
        r = program.analyses["typing"]
        s = r.summary()
        kops, gops = Counter(), Counter()
        for i, v in r.verdicts.items():
            site = r.sites[i]
            if site.is_const or not site.inputs:
                continue
            short = site.prim.op.replace("aten.", "").rsplit(".", 1)[0]
            if v.type == "K":
                kops[short] += 1
            elif v.type == "GRAY":
                gops[short] += 1
        n = s["S"] + s["K"] + s["GRAY"]
        proto = f"{PROTOTYPE[name]:.1f}%" if name in PROTOTYPE else "-"
        top = ", ".join(f"{k} {c}" for k, c in kops.most_common(5))
        gray = ", ".join(f"{k} {c}" for k, c in gops.most_common(3)) or "-"
        print(f"| {name} | {proto} | {100 * s['S_ratio']:.1f}% | {100 * s['K_ratio']:.1f}% | "
              f"{100 * s['GRAY_ratio']:.1f}% | {n} | {top} | {gray} |", flush=True)


if __name__ == "__main__":
    main()
