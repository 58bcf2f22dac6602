"""CALM sequence sharding (issue 19, item 5): per-process activation memory and bytes communicated per
step of a GPT-2 split along the sequence over N processes, against the analysis' prediction.

Model: ``transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=<longest seq>,
vocab_size=50257)``, ``GPT2LMHeadModel``, random weights (seed 0), every dropout 0 (a training capture's
dropout is equal to one process's only in distribution under sharding), ``attn_implementation="sdpa"``,
training mode, batch 1, token ids drawn with seed 1. For each sequence of ``--seqs``:

* **sharded**: N spawned processes (gloo on this machine, ``torch.set_num_threads(cores // N)``; the
  spawning is ``bwskc.sharding.check``'s), each compiling the model with
  ``bwskc.compile(model, (ids,), shard={"sequence": N})`` and running one forward + backward step on the
  same whole ids. The loss is ``sum(logits * w) / seq`` on the returned whole logits, ``w`` a fixed
  random vector over the vocabulary (seed 2), computed alike on every process (it saves only ``w``:
  cross entropy would keep a second logits-sized tensor, which at 8192 tokens and 2 processes does not
  fit this 24 GB machine). Each rank measures:

  - ``saved``: bytes saved for backward by the module's forward (``bwskc.runtime.memory.saved_bytes``:
    storages packed by ``saved_tensors_hooks``, each counted once, parameters excluded; the loss's own
    saved tensors are not counted, on either side);
  - ``peak``: the step's resident-memory high-water mark above the resident memory before it
    (``VmHWM`` after resetting it through ``/proc/self/clear_refs``, as benchmarks/long_context.py does);
  - the forward collectives the call ran (``module.comm.log``: site, collective, payload bytes) and the
    schedule's prediction of them (``module.schedule.comm``), and whether they are equal entry by entry;
  - received bytes per process (``passes/calm/schedule.py``'s ``comm_volume``: ring algorithms, an
    all-gather or reduce-scatter receives (N-1)/N of its payload, an all-reduce 2(N-1)/N). Convention:
    forward = the logged collectives; backward = their transposes with the same payloads (an
    all-gather's backward is a reduce-scatter, an all-reduce's an all-reduce); gradients = one
    all-reduce of every parameter that received a gradient (its total bytes, once per step; tied
    weights once). Per-call payloads sum the logged bytes.

* **single**: one process (all cores), ``bwskc.compile(model, (ids,))`` (conventional mode, no shard),
  the same step; its ``saved`` and ``peak``.

The prediction for activation memory, derived from the schedule: ``single / N`` (the sharded values,
1/N of every saved activation) ``+ (N-1)/N x`` the payload of every all-gather the schedule makes at a
site (a gathered operand, the keys and values of attention, is saved whole, not as a shard; the
outputs gathered to be returned whole, site None, are not saved). Values the program keeps replicated
(computed from parameters only) count 1/N there though every process holds them whole: the measured
excess over the prediction is that.

    python benchmarks/shard.py                         # --seqs 2048,4096,8192 --nproc 2
    python benchmarks/shard.py --seqs 2048 --write     # the section in docs/benchmarks.md
    python benchmarks/shard.py --quick                 # 2 layers, d 64, seqs 64,128 (the smoke test)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
HEADING = "## CALM sequence sharding (GPT-2 12 x 768, 2 processes)"
FULL = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
QUICK = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=1000)
DROPOUT = dict(attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, summary_first_dropout=0.0)
MB = 1e6

sys.path.insert(0, HERE)
from long_context import MALLOC_ENV, _reset_peak_rss, _status, machine  # noqa: E402


def _build(spec: dict):
    """The eager model and its ids (the same on every process: seeded)."""
    import torch
    import transformers
    config = transformers.GPT2Config(**spec["config"], n_positions=spec["n_positions"], **DROPOUT,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).train()
    ids = torch.randint(0, config.vocab_size, (1, spec["seq"]), generator=torch.Generator().manual_seed(1))
    return model, ids


def measure(spec: dict, rank: int, nproc: int) -> dict:
    """One step of the sharded (``spec["shard"]``) or single-process module on this process."""
    import warnings
    warnings.filterwarnings("ignore")
    import torch

    import bwskc
    from bwskc._deep import run_deep
    from bwskc.passes.calm.schedule import comm_volume
    from bwskc.runtime.memory import saved_bytes
    from bwskc.sharding.check import _first
    model, ids = _build(spec)
    t0 = time.perf_counter()
    if spec["shard"]:
        module = bwskc.compile(model, (ids,), shard={"sequence": nproc})
    else:
        module = bwskc.compile(model, (ids,), mode="conventional")
    compile_s = time.perf_counter() - t0
    module.train()
    del model
    gc.collect()
    weight = torch.randn(spec["config"]["vocab_size"], generator=torch.Generator().manual_seed(2))

    def step():
        t0 = time.perf_counter()
        saved, out = saved_bytes(module, ids)
        # sum of the logits times a fixed random weight over the vocabulary, the same on every process:
        # it saves only the weight (cross entropy would keep a second logits-sized tensor)
        loss = (_first(out) * weight).sum() / ids.shape[1]
        del out  # the whole logits are not kept past the loss
        t1 = time.perf_counter()
        loss.backward()
        return saved, loss, t0, t1, time.perf_counter()
    base = _status("VmRSS")
    _reset_peak_rss()
    # on bwskc's big-stack thread: a ShardedModule runs its program there (run_deep), and the
    # saved-tensor hooks saved_bytes installs are the calling thread's only
    saved, loss, t0, t1, t2 = run_deep(step)
    peak = max(_status("VmHWM") - base, 0)
    grads = {p.untyped_storage().data_ptr(): p.numel() * p.element_size() for p in module.parameters()
             if p.grad is not None}
    row = {"rank": rank, "saved_bytes": saved, "peak_bytes": peak, "base_bytes": base,
           "compile_s": round(compile_s, 2), "forward_s": round(t1 - t0, 2), "backward_s": round(t2 - t1, 2),
           "loss": loss.item(), "threads": torch.get_num_threads(), "param_bytes": sum(grads.values())}
    if spec["shard"]:
        log = [list(x) for x in module.comm.log]
        predicted = [list(x) for x in module.schedule.comm]
        n = nproc
        row.update({
            "log": log, "predicted": predicted, "log_equals_prediction": log == predicted,
            "forward_payload_bytes": sum(b for _, _, b in log),
            "forward_recv_bytes": sum(comm_volume(b, c, n) for _, c, b in log),
            "backward_recv_bytes": sum(comm_volume(b, c, n) for _, c, b in log),  # the transposes
            "grad_recv_bytes": comm_volume(sum(grads.values()), "all-reduce", n),
            "gathered_at_sites_bytes": sum(b for s, c, b in predicted if s is not None and c == "all-gather"),
            "barrier_sites": len(module.schedule.barrier_sites()),
        })
        row["total_recv_bytes"] = row["forward_recv_bytes"] + row["backward_recv_bytes"] + row["grad_recv_bytes"]
    return row


def _worker(rank: int, nproc: int, port: int, spec: dict, out_dir: str) -> None:
    import torch
    torch.set_num_threads(max(1, spec["cores"] // nproc))
    dist = None
    if spec["shard"]:
        import torch.distributed as dist
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=nproc)
    try:
        try:
            row = measure(spec, rank, nproc)
        except Exception as exc:  # noqa: BLE001 - a failing point is a result
            row = {"rank": rank, "error": f"{type(exc).__name__}: {exc}"}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(row, f)
    finally:
        if dist is not None:
            dist.destroy_process_group()


def _group(spec: dict, nproc: int) -> list[dict]:
    """``spec`` run on ``nproc`` spawned processes (``check_sharded``'s pattern); every rank's row."""
    import torch.multiprocessing as mp

    from bwskc.sharding.check import _free_port
    with tempfile.TemporaryDirectory() as d:
        try:
            mp.start_processes(_worker, args=(nproc, _free_port(), spec, d), nprocs=nproc,
                               start_method="spawn")
        except mp.ProcessExitedException as exc:  # killed (out of memory: SIGKILL) or crashed
            return [{"rank": exc.error_index, "error": f"process exited: {exc}"}]
        rows = []
        for r in range(nproc):
            with open(os.path.join(d, f"rank{r}.json")) as f:
                rows.append(json.load(f))
        return rows


def point(seq: int, a) -> dict:
    """One sequence: the sharded group, then the single process; the comparison."""
    base = {"config": a.config, "n_positions": a.n_positions, "seq": seq, "cores": a.cores}
    t0 = time.perf_counter()
    ranks = _group({**base, "shard": True}, a.nproc)
    sharded_wall = time.perf_counter() - t0
    if any("error" in r for r in ranks):
        return {"seq": seq, "nproc": a.nproc, "ranks": ranks, "error": next(r["error"] for r in ranks
                                                                          if "error" in r)}
    t0 = time.perf_counter()
    (single,) = _group({**base, "shard": False}, 1)
    single_wall = time.perf_counter() - t0
    row = {"seq": seq, "nproc": a.nproc, "ranks": ranks, "single": single,
           "sharded_wall_s": round(sharded_wall, 1), "single_wall_s": round(single_wall, 1)}
    errors = [r["error"] for r in ranks + [single] if "error" in r]
    if errors:
        row["error"] = errors[0]
        return row
    n = a.nproc
    r0 = ranks[0]
    predicted = single["saved_bytes"] / n + (n - 1) / n * r0["gathered_at_sites_bytes"]
    worst = max(r["saved_bytes"] for r in ranks)
    row.update({
        "saved_per_process_bytes": worst,
        "saved_ranks_equal": len({r["saved_bytes"] for r in ranks}) == 1,
        "single_saved_bytes": single["saved_bytes"],
        "predicted_saved_bytes": round(predicted),
        "saved_over_predicted": worst / predicted,
        "saved_over_single_share": worst / (single["saved_bytes"] / n),
        "log_equals_prediction": all(r["log_equals_prediction"] for r in ranks),
        "logs_equal_across_ranks": all(r["log"] == r0["log"] for r in ranks),
        "forward_collectives": len(r0["log"]),
        "loss_rel_diff": max(abs(r["loss"] - single["loss"]) for r in ranks) / max(abs(single["loss"]), 1e-30),
    })
    for k in ("forward_payload_bytes", "forward_recv_bytes", "backward_recv_bytes", "grad_recv_bytes",
              "total_recv_bytes", "gathered_at_sites_bytes", "barrier_sites"):
        row[k] = r0[k]
    return row


def table(rows: list[dict]) -> str:
    def mb(v):
        return f"{v / MB:,.1f}"
    head = ["seq", "single saved MB", "per-process saved MB", "predicted MB", "measured / predicted",
            "per-process / (single / N)", "peak MB single / per process", "fwd collectives (log = prediction)",
            "fwd payload MB", "recv MB fwd / bwd / grads / total", "step s single / sharded"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['seq']} | error: {r['error']} |" + " |" * (len(head) - 2))
            continue
        s, ranks = r["single"], r["ranks"]
        peaks = " / ".join(mb(x["peak_bytes"]) for x in ranks)
        step_single = s["forward_s"] + s["backward_s"]
        step_sharded = max(x["forward_s"] + x["backward_s"] for x in ranks)
        cells = [str(r["seq"]), mb(r["single_saved_bytes"]),
                 " / ".join(mb(x["saved_bytes"]) for x in ranks), mb(r["predicted_saved_bytes"]),
                 f"{r['saved_over_predicted']:.3f}", f"{r['saved_over_single_share']:.3f}",
                 f"{mb(s['peak_bytes'])} / {peaks}",
                 f"{r['forward_collectives']} ({'yes' if r['log_equals_prediction'] else 'NO'})",
                 mb(r["forward_payload_bytes"]),
                 " / ".join(mb(r[k]) for k in ("forward_recv_bytes", "backward_recv_bytes", "grad_recv_bytes",
                                               "total_recv_bytes")),
                 f"{step_single:.1f} / {step_sharded:.1f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def section(rows: list[dict], meta: dict) -> str:
    c = meta["config"]
    m = meta["machine"]
    n = meta["nproc"]
    lines = [HEADING, "",
             f"Command: `{meta['command']}` (each sequence: {n} spawned gloo processes, then one process; "
             "`--from JSONL...` renders rows of several runs).",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, no GPU; python {m['python']}, "
             f"torch {m['torch']}, transformers {m['transformers']}; measured from {m['date_utc']} UTC. "
             f"Threads: {max(1, meta['cores'] // n)} per sharded process, {meta['cores']} single.",
             f"Model: GPT-2 {c['n_layer']} layers, d {c['n_embd']}, {c['n_head']} heads, vocabulary "
             f"{c['vocab_size']}, n_positions {meta['n_positions']}, random weights, dropout 0, sdpa attention, "
             f"training capture, batch 1; loss: sum(logits x w) / seq on the whole logits, w a fixed random "
             f"vector over the vocabulary (seed 2), alike on every process. Sharded: `bwskc.compile(model, (ids,), shard={{'sequence': {n}}})`; single: "
             f"`bwskc.compile(model, (ids,))` (conventional).",
             "",
             table(rows),
             "",
             "\"saved\" is bytes saved for backward by the module's forward (`bwskc.runtime.memory.saved_bytes`: "
             "storages packed by `saved_tensors_hooks`, each once, parameters excluded; the loss's own not "
             "counted). \"predicted\" is the analysis' figure, derived from the schedule: single / N plus "
             "(N-1)/N of the payload of every all-gather the schedule makes at a site (attention's keys and "
             "values are saved whole). \"peak\" is the step's VmHWM above the resident memory before it. "
             "\"fwd collectives\": the entries of `module.comm.log` (the forward collectives the call ran), "
             "and whether they equal `module.schedule.comm` entry by entry on every rank. Received bytes "
             "per process use `comm_volume` (ring: an all-gather or reduce-scatter receives (N-1)/N of its "
             "payload, an all-reduce 2(N-1)/N): forward = the logged collectives; backward = their "
             "transposes with the same payloads (all-gather -> reduce-scatter); grads = one all-reduce of "
             "every parameter's gradient (the parameters' total bytes, once per step, the tied embedding "
             "once). \"step s\" is forward + backward wall time (sharded: the slower rank)."]
    for r in rows:
        if "error" in r:
            continue
        lines.append("")
        lines.append(f"seq {r['seq']}: {r['barrier_sites']} barrier sites, {r['forward_collectives']} forward "
                     f"collectives ({r['gathered_at_sites_bytes'] / MB:,.1f} MB gathered at sites, the rest the "
                     f"whole outputs); loss |sharded - single| / |single| {r['loss_rel_diff']:.1e}; wall s sharded "
                     f"{r['sharded_wall_s']} (compile {max(x['compile_s'] for x in r['ranks'])}), single "
                     f"{r['single_wall_s']} (compile {r['single']['compile_s']}).")
    return "\n".join(lines).rstrip() + "\n"


def merge(doc: str, text: str) -> None:
    """Replace (or add) the section ``HEADING`` of ``doc``."""
    from gpu_results import replace_section
    with open(doc) as f:
        new = replace_section(f.read(), rf"^{re.escape(HEADING)}[ \t]*$", text)
    with open(doc, "w") as f:
        f.write(new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default=None, help="sequence lengths (default 2048,4096,8192; --quick 64,128)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--n-positions", type=int, default=None,
                    help="the config's n_positions (default: the longest of --seqs)")
    ap.add_argument("--quick", action="store_true", help="tiny: 2 layers, d 64, seqs 64,128 (the smoke test)")
    ap.add_argument("--jsonl", metavar="PATH", help="write the rows here too, one JSON line each")
    ap.add_argument("--write", action="store_true", help=f"put the section into {os.path.relpath(DOC, ROOT)}")
    ap.add_argument("--doc", default=DOC, help="the document --write updates")
    ap.add_argument("--from", dest="sources", metavar="JSONL", nargs="+",
                    help="run nothing: render (and with --write, write) the rows of earlier --jsonl files")
    a = ap.parse_args(argv)
    if a.sources:
        metas, rows = [], []
        for path in a.sources:
            with open(path) as f:
                for obj in (json.loads(ln) for ln in f if ln.strip()):
                    (metas if "meta" in obj else rows).append(obj.get("meta", obj))
        rows.sort(key=lambda r: r["seq"])
        meta = dict(metas[0], command="; ".join(m["command"] for m in metas),
                    seqs=[r["seq"] for r in rows])
        text = section(rows, meta)
        print(text)
        if a.write:
            merge(a.doc, text)
            print(f"wrote the section into {a.doc}")
        return 0
    seqs = [int(s) for s in (a.seqs or ("64,128" if a.quick else "2048,4096,8192")).split(",")]
    a.config = QUICK if a.quick else FULL
    a.n_positions = a.n_positions or max(seqs)
    a.cores = os.cpu_count() or 1
    os.environ.update(MALLOC_ENV)  # the spawned processes return freed memory: peaks are the step's
    command = "python " + " ".join([os.path.relpath(os.path.abspath(__file__), ROOT)]
                                   + list(sys.argv[1:] if argv is None else argv))
    meta = {"command": command, "machine": machine("cpu"), "config": a.config, "n_positions": a.n_positions,
            "nproc": a.nproc, "cores": a.cores, "seqs": seqs}
    jsonl = open(a.jsonl, "w") if a.jsonl else None

    def emit(obj):
        line = json.dumps(obj)
        print(line, flush=True)
        if jsonl:
            jsonl.write(line + "\n")
            jsonl.flush()
    emit({"meta": meta})
    rows = []
    t0 = time.perf_counter()
    for seq in seqs:
        row = point(seq, a)
        rows.append(row)
        emit(row)
    if jsonl:
        jsonl.close()
    text = section(rows, meta)
    print()
    print(text)
    print(f"total wall time: {time.perf_counter() - t0:.1f} s")
    if a.write:
        merge(a.doc, text)
        print(f"wrote the section into {a.doc}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
