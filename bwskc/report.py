"""``--emit report``: per-layer and total tables (markdown, in the seeds' style) of what the passes found:
S, K and GRAY counts and ratios, degrees of freedom erased per example, barriers per axis, phases (by
their role, ``Def.role``: S-phases and residual chains) and the reversible rewrite's chains."""
from __future__ import annotations

from collections import Counter, defaultdict

from bwskc import ir
from bwskc.ir import Program, TensorType
from bwskc.sites import sites


def layer_of(module: str) -> str:
    """The layer a module belongs to: its path up to the first numbered component (``transformer.h.3``,
    ``bwskc.ir.layer_of``), else its first component (``lm_head``), or ``(model)`` for the model itself
    and constants."""
    layer = ir.layer_of(module)
    if layer is not None:
        return layer
    return module.split(".", 1)[0] if module else "(model)"


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def report(program: Program) -> str:
    typing, calm = program.analyses.get("typing"), program.analyses.get("calm")
    all_sites = [s for s in sites(program) if not s.is_const and s.inputs]
    batch = program.entry.inputs[0].shape[0] if program.entry.inputs and isinstance(
        program.entry.inputs[0], TensorType) and program.entry.inputs[0].shape else 1
    axes = list(calm.axes) if calm is not None else []
    layers: dict[str, list] = defaultdict(list)
    for s in all_sites:
        layers[layer_of(s.module)].append(s)
    phases = [d for d in program.defs.values() if d.kind == "phase"]
    phases_by_layer = Counter(layer_of(d.module) for d in phases)

    out = [f"# bwskc report: {program.name}", ""]
    ran = getattr(program.analyses.get("passes"), "order", [])
    out.append(f"Passes: {', '.join(ran) or 'none'}. {len(all_sites)} operations (constants excluded), "
               f"batch {batch}. Degrees of freedom (DOF) erased are per example: input dimension minus "
               "the generic rank of each operation's Jacobian, summed; `+n` counts operations whose "
               "erasure is data-dependent (ReLU, max, dropout).")
    out.append("")
    head = ["Layer", "Ops", "S", "K", "GRAY", "S ratio", "K ratio", "DOF erased"]
    head += [f"Barriers ({a})" for a in axes] + ["Phases"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join("---" for _ in head) + "|")
    totals = Counter()
    total_dof, total_unknown = 0, 0
    for name, group in layers.items():
        row, dof, unknown = _row(name, group, typing, calm, axes, batch, phases_by_layer[name])
        totals.update(row)
        total_dof += dof
        total_unknown += unknown
        out.append(_cells(name, row, dof, unknown, axes, batch))
    out.append(_cells("**Total**", totals, total_dof, total_unknown, axes, batch))
    out.append("")
    if typing is not None:
        out += _ops_table(all_sites, typing)
        out += _evidence_lines(all_sites, typing)
    if calm is not None:
        out += _calm_section(calm)
    if calm is not None or program.analyses.get("shard"):
        out += _comm_section(program, calm)
    if phases:
        out += ["## Phases", "", "| Phase | Kind | Operations |", "|---|---|---|"]
        for d in phases:
            kind = "residual chain" if d.role in ("residual", "coupling") else "S-phase"
            n = sum(1 for s in sites(program) if s.scope == d.name)
            if n == 0 and kind == "residual chain":  # its operations are all in the blocks it calls
                continue
            out.append(f"| `{d.name}` | {kind} | {n} |")
        out.append("")
    rev = program.analyses.get("reversible")
    if rev is not None:
        out += _reversible_section(rev)
    return "\n".join(out) + "\n"


def _reversible_section(rev) -> list[str]:
    out = ["## Reversible rewrite", "", "| Chain | Residual blocks | Coupling layers | Shared inputs |",
           "|---|---|---|---|"]
    out += [f"| `{c['name']}` | {c['blocks']} | {c['couplings']} | {c['shared']} |" for c in rev.chains]
    if not rev.chains:
        out.append("| (none) | 0 | 0 | - |")
    out.append("")
    if rev.not_lowered:
        out += ["Not lowered (activations stored as before):", ""]
        out += [f"* `{r['where']}`: {r['reason']}" for r in rev.not_lowered]
        out.append("")
    return out


def _row(name, group, typing, calm, axes, batch, n_phases):
    row = Counter({"ops": len(group), "phases": n_phases})
    dof, unknown = 0, 0
    if typing is not None:
        for s in group:
            v = typing.verdicts[s.id]
            row[v.type] += 1
            if v.dof_lost is None:
                unknown += 1
            else:
                dof += v.dof_lost
    if calm is not None:
        for s in group:
            for a in axes:
                if calm.coordination.get(s.id, {}).get(a):
                    row[f"barrier:{a}"] += 1
    return row, dof, unknown


def _cells(name, row, dof, unknown, axes, batch) -> str:
    n = row["S"] + row["K"] + row["GRAY"]
    per = dof / batch
    dof_text = (f"{per:.0f}" if per == int(per) else f"{per:.1f}") + (f" +{unknown}" if unknown else "")
    cells = [name, str(row["ops"]), str(row["S"]), str(row["K"]), str(row["GRAY"]), _pct(row["S"], n),
             _pct(row["K"], n), dof_text]
    cells += [str(row[f"barrier:{a}"]) for a in axes] + [str(row["phases"])]
    return "| " + " | ".join(cells) + " |"


def _ops_table(all_sites, typing) -> list[str]:
    out = ["## Operations", "", "| Op | Count | Type | Rule | Claim |", "|---|---|---|---|---|"]
    seen: dict[tuple, list] = {}
    for s in all_sites:
        v = typing.verdicts[s.id]
        key = (s.prim.op, v.type, v.rule)
        seen.setdefault(key, [0, v.claim])[0] += 1
    for (op, t, rule), (count, claim) in sorted(seen.items()):
        out.append(f"| `{op}` | {count} | {t} | {rule} | {claim.replace('|', '/')} |")
    out.append("")
    return out


def _evidence_lines(all_sites, typing) -> list[str]:
    """How many leaf verdicts had their evidence evaluated, and which were refused (GRAY) because it
    failed: a false witness or inverse is never reported as K or S."""
    checked = sum(1 for s in all_sites if "checked" in typing.verdicts[s.id].extra)
    rejected = [(s, typing.verdicts[s.id]) for s in all_sites if "rejected" in typing.verdicts[s.id].extra]
    out = [f"Evidence: {checked} of {len(all_sites)} leaf verdicts had their witness or inverse evaluated "
           f"on the op before being reported; {len(rejected)} whose evidence failed are GRAY "
           "(`bwskc check-evidence` re-verifies the JSON).", ""]
    seen = set()
    for s, v in rejected:
        key = (s.prim.op, v.extra["rejected"]["why"])
        if key not in seen:
            seen.add(key)
            out.append(f"* `{s.prim.op}` ({v.extra['rejected']['type']} refused): {key[1]}")
    return out + ([""] if seen else [])


def _mb(b: float) -> str:
    return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB" if b >= 2**10 else f"{b:.0f} B"


def _comm_section(program: Program, calm) -> list[str]:
    """Bytes each barrier moves per training step, from the schedule the sharded runtime executes (its
    ``comm`` is the list a ShardedModule's forward logs, entry by entry): the plans the IR carries
    (``--shard``), else 2 processes along every axis the CALM pass found."""
    from bwskc.errors import BwskError
    from bwskc.passes.calm.schedule import comm_volume, schedule
    plans = program.analyses.get("shard") or {}
    wanted = [(a, p.nproc, {a: [(n, q.dim) for n, q in p.inputs.items() if q is not None]})
              for a, p in plans.items()]
    default = not wanted
    if default:
        wanted = [(a, 2, {a: list(where)}) for a, where in calm.axes.items()]
    out = ["## Communication (sharded execution)", "",
           ("Along each axis the CALM pass found, over 2 processes (`--shard AXIS=N` chooses). " if default
            else "Along each axis the IR's `shard` plans name. ") +
           "Bytes per training step: the forward payload is what each collective produces, whole; received "
           "per process assumes ring algorithms ((N-1)/N of the payload for an all-gather, 2(N-1)/N for an "
           "all-reduce); backward runs each forward collective's transpose (a reduce-scatter for an "
           "all-gather, an all-reduce for an all-reduce) on the same bytes, and every parameter's gradient "
           "is all-reduced once. `bwskc.compile(model, args, shard={AXIS: N})` runs exactly the forward "
           "collectives listed (`module.comm.log` equals `module.schedule.comm`).", ""]
    scopes = {s.id: (s.scope, s.prim.op) for s in sites(program)}
    params = gradient_bytes(program)
    for axis, n, axes in wanted:
        try:
            sch = schedule(program, axis, n, axes)
        except BwskError as exc:
            out += [f"{axis}: {exc}", ""]
            continue
        out += [f"### {axis}, {n} processes", ""]
        if sch.problems:
            out += [f"Not runnable on {n} processes: {sch.problems[0]}", ""]
            continue
        rows: dict = {}
        for sid, coll, b in sch.comm:
            r = rows.setdefault((sid, coll), [0, 0])
            r[0] += 1
            r[1] += b
        out += ["| Site | Op | Definition | Collective | Calls | Forward payload | Received per process "
                "(forward + backward) |", "|---|---|---|---|---|---|---|"]
        total_pay = total_recv = 0.0
        for (sid, coll), (calls, pay) in sorted(rows.items(), key=lambda kv: (kv[0][0] is None, kv[0])):
            recv = 2 * comm_volume(pay, coll, n)
            total_pay, total_recv = total_pay + pay, total_recv + recv
            where, op = scopes[sid] if sid is not None else ("(outputs returned whole)", None)
            out.append(f"| {'-' if sid is None else sid} | {f'`{op}`' if op else '-'} | {f'`{where}`' if op else where} | {coll} | {calls} | "
                       f"{_mb(pay)} | {_mb(recv)} |")
        grad = comm_volume(params, "all-reduce", n) if n > 1 else 0.0
        out.append(f"| - | - | (parameter gradients) | all-reduce | 1 | {_mb(params)} | {_mb(grad)} |")
        out.append(f"| **Total** | | | | | {_mb(total_pay + params)} | {_mb(total_recv + grad)} |")
        barriers = len(sch.barrier_sites())
        out += ["", f"{barriers} barrier site(s); {len(sch.comm)} forward collective(s) per step.", ""]
    return out


def gradient_bytes(program: Program) -> int:
    """Bytes of the parameters' gradients one step all-reduces: each parameter the program reads, once
    (a tied weight, one tensor under two names, once; a declared one nothing reads gets no gradient)."""
    read = {n for _, t in ir.walk_terms(program, [program.entry.body, *program.consts])
            if isinstance(t, ir.Prim) for n in t.tensor_refs()}
    seen, total = set(), 0
    for name in read:
        decl = program.tensors.get(name)
        if decl is None or decl.kind != "param" or not decl.type.torch_dtype.is_floating_point:
            continue
        key = id(program.weights[name]) if name in program.weights else name
        if key not in seen:
            seen.add(key)
            total += decl.type.numel * decl.type.torch_dtype.itemsize
    return total


def _calm_section(calm) -> list[str]:
    out = ["## Coordination (CALM)", "", "Free FLOPs: the share of FLOPs in coordination-free operations; "
           "split FLOPs: the share that is free and also divided among the shards (not recomputed on "
           "every shard).", "", "| Axis | Partitions | Barriers | Collectives | Free regions | "
           "Largest region | Free FLOPs | Split FLOPs |", "|---|---|---|---|---|---|---|---|"]
    split = getattr(calm, "partitioned_flops_fraction", {})
    for a, where in calm.axes.items():
        coll = calm.barriers.get(a, {})
        regions = calm.regions.get(a, [])
        part = ", ".join(f"{n}:{d}" for n, d in where)
        out.append(f"| {a} | {part} | {sum(coll.values())} | "
                   f"{', '.join(f'{k} x{v}' for k, v in sorted(coll.items())) or '-'} | {len(regions)} | "
                   f"{max((len(r) for r in regions), default=0)} | "
                   f"{100 * calm.free_flops_fraction.get(a, 0):.1f}% | "
                   f"{100 * split.get(a, 0):.1f}% |")
    out.append("")
    for note in getattr(calm, "notes", []):
        out.append(f"Note: {note}")
    if getattr(calm, "notes", []):
        out.append("")
    return out
