"""Evidence a third party can check: the typing pass evaluates every leaf's evidence before emitting it
(a false witness or inverse becomes GRAY), ``--emit json`` (``bwskc.ir/2``) records what is needed to
rebuild each claim, and ``bwskc check-evidence`` re-verifies the claims with torch alone, reporting a
tampered file as failed (exit 1)."""
from __future__ import annotations

import copy
import json
from unittest import mock

import pytest
import torch
from torch import nn

import bwskc
from bwskc import emit
from bwskc.check_evidence import EvidenceError, check_document, resolve
from bwskc.cli import main
from bwskc.evidence import GRAY, K, S, erasing, injective
from bwskc.passes.typing import table as leaf_rules


class Small(nn.Module):
    """LayerNorm (K, shift), a square linear map (S, rank), tanh (S, inverse), ReLU and GELU (K), a
    narrowing linear map (K, null vector), a slice (K), a transpose (S, data movement), scaling (S)."""

    def __init__(self, d=4):
        super().__init__()
        self.ln, self.fc, self.down = nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, 2)

    def forward(self, x):
        y = torch.tanh(self.fc(self.ln(x)))
        return self.down(torch.relu(y) + nn.functional.gelu(y)), x[:, :2], x.transpose(0, 1) * 3


_CACHE: dict = {}


def typed(module_fn, x, key):
    """(program typed, its JSON document), lowered once per key."""
    if key not in _CACHE:
        torch.manual_seed(0)
        q = bwskc.run_passes(bwskc.lower(module_fn(), (x,)), ["typing"])
        _CACHE[key] = q, json.loads(emit.to_json(q))
    return _CACHE[key]


def small():
    return typed(Small, torch.randn(3, 4), "small")


def wide():
    """Inputs above the 64 elements written out: the witness is a documented construction."""
    return typed(lambda: Small(32), torch.randn(5, 32), "wide")


def node_of(doc, op, kind=None):
    for n in doc["nodes"]:
        if n["op"] == op and (kind is None or n["type"] == kind):
            return n
    raise AssertionError(f"no {op} node of type {kind}")


def check(tmp_path, doc, *extra) -> tuple[int, list[str]]:
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(doc))
    return _run(tmp_path, ["check-evidence", str(path), *extra])


def _run(tmp_path, argv):
    out = tmp_path / "out.txt"
    with open(out, "w") as f, mock.patch("sys.stdout", f):
        code = main(argv)
    return code, out.read_text().splitlines()


# ------------------------------------------------------------------------------------ re-verification

@pytest.mark.parametrize("make", [small, wide], ids=["values", "constructions"])
def test_json_reverifies_with_no_failure(tmp_path, make):
    _, doc = make()
    code, lines = check(tmp_path, doc)
    assert code == 0, lines
    counts = lines[0].split(": ", 1)[1]
    verified = int(counts.split(" verified")[0])
    assert " 0 failed" in counts and len(lines) == 1
    outcomes = check_document(doc)
    kinds = {(o.claim, o.status) for o in outcomes}
    # every kind of claim is actually re-run, not just counted
    assert {("collision", "verified"), ("rank", "verified"), ("round trip", "verified")} <= kinds
    assert verified == sum(o.status == "verified" for o in outcomes)
    ks = [n for n in doc["nodes"] if n["type"] == "K"]
    assert ks and all(o.status == "verified" for o in outcomes if o.claim == "collision")


def test_wide_witness_is_a_construction_not_values():
    _, doc = wide()
    col = node_of(doc, "aten.layer_norm.default", "K")["evidence"]["collision"]
    assert col["a"] == {"random": {"seed": 0, "scale": 1.0}}
    assert "shift" in col["b"][0]  # x + 1.5 as a shift, not 160 listed values


def _tamper(doc, op, kind, edit):
    doc = copy.deepcopy(doc)
    edit(node_of(doc, op, kind)["evidence"])
    return doc


def test_tampered_witness_input_fails(tmp_path):
    _, doc = small()

    def edit(ev):
        b = ev["collision"]["b"][0]["values"]["values"]
        b[0] = b[0] + 1.0  # one element of one row moved: LN of that row changes
    code, lines = check(tmp_path, _tamper(doc, "aten.layer_norm.default", "K", edit))
    assert code == 1
    assert " 1 failed" in lines[0] and "witness did not collide: max |f(a)-f(b)| =" in lines[1]


def test_tampered_witness_equal_inputs_fails(tmp_path):
    _, doc = small()

    def edit(ev):
        ev["collision"]["b"] = [{"same": True}]
    code, lines = check(tmp_path, _tamper(doc, "aten.relu.default", "K", edit))
    assert code == 1 and "the two inputs are equal" in lines[1]


def test_inflated_inverse_error_fails(tmp_path):
    _, doc = small()

    def edit(ev):
        ev["round_trip"]["relative_error"] = 0.5
    code, lines = check(tmp_path, _tamper(doc, "aten.tanh.default", "S", edit))
    assert code == 1 and "recorded round-trip error 0.5 exceeds" in lines[1]


def test_rank_certificate_with_too_small_a_tolerance_fails(tmp_path):
    _, doc = small()

    def edit(ev):
        ev["rank"]["tolerance"] = 1e-30
    tampered = _tamper(doc, "aten.linear.default", "S", edit)
    code, lines = check(tmp_path, tampered)
    assert code == 1 and "below the float64 SVD rounding bound" in lines[1]
    tampered.pop("weights")  # without the weight: the recorded numbers alone refute it
    code, lines = check(tmp_path, tampered)
    assert code == 1 and "below the float64 SVD rounding bound" in lines[1]


def test_rank_deficient_weight_in_the_file_fails(tmp_path):
    """A weight changed to have a dependent column: the recomputed sigma_min is below the tolerance."""
    _, doc = small()
    doc = copy.deepcopy(doc)
    name = node_of(doc, "aten.linear.default", "S")["call"]["args"][1]["tensor"]
    w = doc["weights"][name]["values"]
    for r in range(4):
        w[4 * r + 3] = 2 * w[4 * r]  # column 3 = 2 column 0, exactly (a power of two scales exactly)
    code, lines = check(tmp_path, doc)
    assert code == 1 and any("numerically rank-deficient" in line for line in lines), lines


def test_weights_not_embedded_are_not_recheckable_until_given(tmp_path):
    program, _ = small()
    with mock.patch.object(emit, "WEIGHT_EMBED_LIMIT", 0):
        doc = json.loads(emit.to_json(program))
    assert doc["weights"] == {}
    code, lines = check(tmp_path, doc, "-v")
    assert code == 0
    assert any("not re-checkable without weights: fc.weight" in line for line in lines)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in program.weights.items()}, str(tmp_path / "w.safetensors"))
    code, lines = check(tmp_path, doc, "--weights", str(tmp_path / "w.safetensors"), "-v")
    assert code == 0 and not any("without weights" in line for line in lines)


def test_unreadable_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["check-evidence", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not JSON" in err[0]
    assert main(["check-evidence", str(tmp_path / "missing.json")]) == 2


def test_op_resolution_is_the_registry_only():
    assert resolve("aten.add.Tensor") is torch.ops.aten.add.Tensor
    for hostile in ("builtins.eval.default", "aten.from_file.default", "aten.save.default",
                    "os.system.default", "aten.add.__call__", "aten.__class__.default", "aten.add",
                    "torch.ops.load_library"):
        with pytest.raises(EvidenceError):
            resolve(hostile)


def test_hostile_op_in_a_file_is_not_run(tmp_path):
    _, doc = small()
    doc = copy.deepcopy(doc)
    node_of(doc, "aten.relu.default", "K")["op"] = "aten.from_file.default"
    code, lines = check(tmp_path, doc, "-v")
    assert any("refused" in line for line in lines)


# ------------------------------------------------------------------------------ checked before emitted

def _false_witness_rule(leaf):
    """tanh claimed K with a witness that does not collide (tanh is injective)."""
    def witness(g):
        a = leaf.random(g)
        return a, tuple(x + 1 for x in a)
    return erasing("planted", "a false claim", witness, "x and x + 1", 0)


def _false_inverse_rule(leaf):
    """tanh claimed S with the identity as its inverse (wrong)."""
    return injective("planted", "a false claim", lambda y: (y,), "identity")


@pytest.mark.parametrize("rule, why", [(_false_witness_rule, "witness did not collide: max |f(a)-f(b)| ="),
                                       (_false_inverse_rule, "the inverse did not round-trip")])
def test_planted_false_evidence_becomes_gray(rule, why):
    with mock.patch.dict(leaf_rules.RULES, {"aten.tanh": rule, "aten.tanh.default": rule}):
        q = bwskc.run_passes(bwskc.lower(Small(), (torch.randn(3, 4),)), ["typing"])
    result = q.analyses["typing"]
    (site,) = [s for s in result.sites if s.prim.op == "aten.tanh.default"]
    v = result.verdicts[site.id]
    assert v.type == GRAY and why in v.condition, v.condition
    assert v.extra["rejected"]["why"].startswith(why.split(":")[0])
    doc = json.loads(emit.to_json(q))
    node = node_of(doc, "aten.tanh.default")
    assert node["type"] == GRAY and "rejected" in node["evidence"]


# ------------------------------------------------------------------------------------------- schema

V1_NODE_FIELDS = ("id", "op", "type", "shape", "dtype", "module", "evidence")


def test_schema_v2_fields():
    _, doc = small()
    assert doc["schema"] == "bwskc.ir/2"
    assert {"program", "nodes", "summary", "weights"} <= set(doc)
    for n in doc["nodes"]:
        assert set(V1_NODE_FIELDS) <= set(n)
        assert set(n["call"]) == {"args", "kwargs", "holes"}
    k = node_of(doc, "aten.layer_norm.default", K)["evidence"]
    assert k["checked"] is True and isinstance(k["witness"], str)
    col = k["collision"]
    assert {"a", "b", "max_abs_diff", "float64", "domain", "domain_source", "dtype", "tolerance"} <= set(col)
    assert col["domain"] in ("reals", "float") and col["dtype"] == "f32"
    assert col["float64"]["max_abs_diff"] < 1e-6  # LN(x + 1.5) = LN(x) holds in float64 too
    s = node_of(doc, "aten.linear.default", S)["evidence"]
    assert {"method", "tolerance", "sigma_min", "matrix"} <= set(s["rank"])
    assert s["rank"]["sigma_min"] > s["rank"]["tolerance"]
    rt = node_of(doc, "aten.tanh.default", S)["evidence"]["round_trip"]
    assert rt["passed"] and rt["relative_error"] <= 1e-3 and rt["checks"]["f32"]["passed"]


def test_report_counts_refused_evidence():
    from bwskc.report import report
    with mock.patch.dict(leaf_rules.RULES, {"aten.tanh": _false_witness_rule,
                                            "aten.tanh.default": _false_witness_rule}):
        q = bwskc.run_passes(bwskc.lower(Small(), (torch.randn(3, 4),)), ["typing"])
    text = report(q)
    line = next(x for x in text.splitlines() if x.startswith("Evidence: "))
    assert "; 1 whose evidence failed are GRAY" in line
    assert "* `aten.tanh.default` (K refused): witness did not collide" in text


def test_dropout_witness_replays_its_seed(tmp_path):
    """A random op is a function once its seed is fixed: the file records the seed, check-evidence
    replays it, and without it the same inputs do not collide."""
    torch.manual_seed(0)
    q = bwskc.run_passes(bwskc.lower(nn.Dropout(0.5), (torch.randn(4, 8),), train=True), ["typing"])
    doc = json.loads(emit.to_json(q))
    node = node_of(doc, "aten.native_dropout.default", K)
    assert isinstance(node["evidence"]["collision"]["replay_seed"], int)
    code, lines = check(tmp_path, doc)
    assert code == 0 and " 0 failed" in lines[0]
    node["evidence"]["collision"]["replay_seed"] += 1  # another mask: the pair need not collide
    outcome = [o for o in check_document(doc) if o.node == node["id"]]
    assert outcome[0].status == "failed"


def test_hostile_allocation_is_refused_before_it_happens(tmp_path):
    """A constant node asking for 10**12 elements: bounded on the meta device, never allocated."""
    _, doc = small()
    doc = copy.deepcopy(doc)
    node = node_of(doc, "aten.relu.default", "K")
    node["op"] = "aten.repeat.default"
    node["call"]["args"] = [{"hole": 0}, [10 ** 6, 10 ** 6]]
    outcome = [o for o in check_document(doc) if o.node == node["id"]][0]
    assert outcome.status == "not re-checkable" and "more than" in outcome.why
    col = node_of(doc, "aten.layer_norm.default", "K")["evidence"]["collision"]
    col["a"] = {"random": {"seed": "x", "scale": 1.0}}
    outcome = [o for o in check_document(doc) if o.claim == "collision" and o.why.startswith("bad seed")]
    assert outcome and outcome[0].status == "not re-checkable"


def test_without_weights_verdicts_stand_unchecked(tmp_path):
    """IR text has no weights: the op cannot run, so evidence is not evaluated, and says so; the
    verdicts stay what their proofs give (not GRAY for want of a run) and nothing is claimed verified."""
    program, doc = small()
    bare = bwskc.run_passes(bwskc.parse(program.text()), ["typing"])
    result, full = bare.analyses["typing"], program.analyses["typing"]
    ln = next(s for s in result.sites if s.prim.op == "aten.layer_norm.default")
    assert result.verdicts[ln.id].type == K and "unchecked" in result.verdicts[ln.id].extra
    assert not any("rejected" in v.extra for v in result.verdicts.values())
    bare_doc = json.loads(emit.to_json(bare))
    ev = node_of(bare_doc, "aten.layer_norm.default", K)["evidence"]
    assert ev["checked"] is False and "not evaluated" in ev["not_checked"]
    code, lines = check(tmp_path, bare_doc)
    assert code == 0
    by_node = {o.node: o for o in check_document(bare_doc)}
    ln_node = node_of(bare_doc, "aten.layer_norm.default", K)["id"]
    assert by_node[ln_node].status == "not re-checkable"  # reads ln.weight, which the text lacks
    relu = node_of(bare_doc, "aten.relu.default", K)["id"]
    assert by_node[relu].status == "verified"  # no bound tensor: evaluated and re-checked anyway


def test_float64_op_round_trip():
    """An op already in float64 is checked once, in float64 (RMSNorm with eps = 1e-6: S)."""
    torch.manual_seed(0)
    q = bwskc.run_passes(bwskc.lower(nn.RMSNorm(5, eps=1e-6).double(), (torch.randn(3, 5).double(),)),
                         ["typing"])
    result = q.analyses["typing"]
    (site,) = [s for s in result.sites if s.prim.op == "aten.rms_norm.default"]
    v = result.verdicts[site.id]
    assert v.type == S, v.extra.get("rejected")
    rt = v.extra["checked"]["round_trip"]
    assert list(rt["checks"]) == ["f64"] and rt["passed"] and rt["relative_error"] < 1e-6
