"""Golden outputs: the short fixed-seed chain of every preset (tests/golden/recipe.py) run with this checkout
must reproduce what was recorded from the pinned commit (tests/golden/data/manifest.json names it).

Compared, by name:

* ``weights/<preset>/<key>``: the trainable tensors of each export. Whole tensors where the golden file is a
  copy (``weights/<preset>.safetensors``), else the per-tensor summary (``weights/<preset>.json``: shape,
  dtype, float64 sum / sum of squares / sum of |x|, first 16 and 16 evenly spaced values).
* ``records/<shard>/<key>``: every tensor of the stablesr_latents shards.
* ``images/<run>/seed_<k>/<stem>.png``: every SR image written by inference.

Tolerances: floating tensors (weights, record latents) equal exactly, or within ``rtol=1e-5, atol=1e-6``
elementwise (``|new - old| <= atol + rtol * |old|``; for the summaries the same bound carried through the
sums); uint8 images and record images identical, or max |difference| <= 1 level (1/255); integer tensors
exactly. Shapes, dtypes and the set of names must match, and every recipe step must succeed (the steps
that do not need a failed one still run and are compared). The failure message names the failed steps with
their output, the differences (up to 8 per output group, with counts), and RENAMES suggested by pairing
golden-only and new-only tensors of identical values.

Intended changes are recorded here, not by re-recording silently:

* ``RENAMES``: old name prefix -> new name prefix, applied to the golden names before comparing (longest
  prefix first), e.g. ``{"weights/ccsr_stage1/adapter.": "weights/ccsr_stage1/branch."}`` when a refactor
  moves the ControlNet from ``adapter`` to ``branch`` in the LightningModule.
* ``KNOWN_DIFFERENCES``: name (after renames) or name prefix -> the written reason why its value may differ or
  it may be missing/new. Covered names are reported but do not fail the test.

An intended change of a command-line key needs the recipe's command changed too (tests/golden/recipe.py
``jobs``; manifest.json keeps the recorded command lines).

Cost: 11 CLI processes, ~110 CPU seconds (mostly interpreter/torch/Lightning start-up), run two at a time:
about a minute on two idle cores, more on a loaded machine.

Re-record (only for an intended change of outputs, with a note in the commit):
``.venv/bin/python tests/golden/record.py --repo <checkout> --out tests/golden/data``.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "data"

RENAMES: dict[str, str] = {
    # the seams refactor: an adapter became a runner (ControlledUNet) over named control branches
    "weights/stablesr_stage1/adapter.": "weights/stablesr_stage1/adapter.branches.sft.",
    "weights/ccsr_stage1/adapter.": "weights/ccsr_stage1/adapter.branches.controlnet.",
}
KNOWN_DIFFERENCES: dict[str, str] = {}

RTOL, ATOL = 1e-5, 1e-6     # floating tensors
IMAGE_MAX_DIFF = 1          # uint8 levels (1/255)
# On another CPU kind or torch build the same run may differ in the last bits, and two Adam steps turn a
# near-zero gradient's rounding into up to ~2 lr = 2e-4 of weight; sampling then moves pixels a little.
# There the comparison still catches a changed computation, at these bounds (stated in the summary).
PORTABLE_RTOL, PORTABLE_ATOL, PORTABLE_IMAGE_MAX_DIFF = 1e-3, 5e-4, 4


def _load_recipe():
    spec = importlib.util.spec_from_file_location("sr_lab_golden_recipe", ROOT / "tests" / "golden" / "recipe.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


# -- golden side ------------------------------------------------------------------------------------------
def load_golden() -> tuple[dict, dict[str, object]]:
    """(manifest, name -> tensor | stats dict | uint8 array) as recorded."""
    from safetensors.torch import load_file

    recipe = _load_recipe()
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    items: dict[str, object] = {}
    for preset, info in manifest["weights"].items():
        path = GOLDEN / info["file"]
        if info["storage"] == "copy":
            for k, v in load_file(str(path)).items():
                items[f"weights/{preset}/{k}"] = v
        else:
            for k, st in json.loads(path.read_text())["tensors"].items():
                items[f"weights/{preset}/{k}"] = {"stats": st}
    for k, v in load_file(str(GOLDEN / "records.safetensors")).items():
        items[f"records/{k}"] = v
    for rel in manifest["images"]:
        items[f"images/{rel}"] = recipe.read_png(GOLDEN / "images" / rel)
    return manifest, items


def rename(name: str, renames: dict[str, str]) -> str:
    for old in sorted(renames, key=len, reverse=True):
        if name.startswith(old):
            return renames[old] + name[len(old):]
    return name


def known_difference(name: str, known: dict[str, str]) -> str | None:
    for key in sorted(known, key=len, reverse=True):
        if name == key or name.startswith(key):
            return known[key]
    return None


# -- comparisons: each returns None (equal / within tolerance) or a one-line description -----------------------
def _fmt(x: float) -> str:
    return f"{x:.3g}"


def compare_tensor(old: torch.Tensor, new: torch.Tensor, image_like: bool = False) -> tuple[str | None, bool]:
    """(difference or None, exactly equal)."""
    if tuple(old.shape) != tuple(new.shape):
        return f"shape {tuple(old.shape)} -> {tuple(new.shape)}", False
    if old.dtype != new.dtype:
        return f"dtype {old.dtype} -> {new.dtype}", False
    if torch.equal(old, new):
        return None, True
    if old.dtype == torch.uint8 and image_like:
        d = (old.to(torch.int16) - new.to(torch.int16)).abs()
        mx = int(d.max())
        if mx <= IMAGE_MAX_DIFF:
            return None, False
        return (f"max |diff| {mx} levels > {IMAGE_MAX_DIFF}, {int((d > IMAGE_MAX_DIFF).sum())}/{d.numel()} values "
                f"beyond, mean |diff| {_fmt(float(d.float().mean()))}"), False
    if not old.is_floating_point():
        d = (old.to(torch.int64) - new.to(torch.int64)).abs()
        return f"integer values differ: {int((d > 0).sum())}/{d.numel()}, max |diff| {int(d.max())}", False
    o, n = old.double(), new.double()
    fo, fn = torch.isfinite(o), torch.isfinite(n)
    if not torch.equal(fo, fn) or not torch.equal(o[~fo].nan_to_num(0.0), n[~fn].nan_to_num(0.0)):
        return f"non-finite values differ: {int((~fo).sum())} in the golden, {int((~fn).sum())} now", False
    o, n = o.where(fo, 0.0), n.where(fn, 0.0)
    d = (o - n).abs()
    bound = ATOL + RTOL * o.abs()
    bad = d > bound
    if not bool(bad.any()):
        return None, False
    rel = float((d / o.abs().clamp_min(1e-30))[bad].max())
    return (f"max |diff| {_fmt(float(d.max()))} (max relative {_fmt(rel)} where beyond), "
            f"{int(bad.sum())}/{d.numel()} elements beyond atol {ATOL} + rtol {RTOL}*|golden|"), False


def compare_stats(old: dict, new_tensor: torch.Tensor, recipe) -> tuple[str | None, bool]:
    new = recipe.tensor_stats(new_tensor)
    if old["shape"] != new["shape"]:
        return f"shape {tuple(old['shape'])} -> {tuple(new['shape'])}", False
    if old["dtype"] != new["dtype"]:
        return f"dtype {old['dtype']} -> {new['dtype']}", False
    exact = all(old[k] == new[k] for k in ("sum", "sumsq", "abs_sum", "first", "strided"))
    if exact:
        return None, True
    n, a, s2 = old["numel"], old["abs_sum"], old["sumsq"]
    # |x - y| <= atol + rtol|x| elementwise carried through the sums:
    bounds = {"sum": ATOL * n + RTOL * a, "abs_sum": ATOL * n + RTOL * a,
              "sumsq": 2 * (ATOL * a + RTOL * s2) + n * (ATOL + RTOL) ** 2 + 1e-12 * s2}
    problems = []
    for key, bound in bounds.items():
        d = abs(old[key] - new[key])
        if not d <= bound:
            problems.append(f"{key} {old[key]:.9g} -> {new[key]:.9g} (|diff| {_fmt(d)} > {_fmt(bound)})")
    for key in ("first", "strided"):
        ov, nv = np.array(old[key]), np.array(new[key])
        if ov.shape != nv.shape:
            problems.append(f"{key}: {len(ov)} -> {len(nv)} values")
            continue
        d = np.abs(ov - nv)
        if not np.all(d <= ATOL + RTOL * np.abs(ov)):
            problems.append(f"{key} values: max |diff| {_fmt(float(d.max()))}")
    return ("; ".join(problems) or None), False


def compare_all(golden: dict[str, object], new: dict[str, object], recipe,
                renames: dict[str, str] | None = None, known: dict[str, str] | None = None,
                broken_steps: set[str] = frozenset()) -> dict:
    """Compare renamed golden items with new ones; returns a report dict (differences, known, counts).
    Golden items of ``broken_steps`` (failed or not run) are counted in ``not_produced``, not listed."""
    renames = RENAMES if renames is None else renames
    known = KNOWN_DIFFERENCES if known is None else known
    renamed = {}
    for name, value in golden.items():
        renamed.setdefault(rename(name, renames), value)
    report = {"differ": [], "known": [], "exact": 0, "tolerance": 0, "within_tolerance": [], "not_produced": 0}

    def note(name: str, what: str) -> None:
        reason = known_difference(name, known)
        if reason is None:
            report["differ"].append(f"{name}: {what}")
        else:
            report["known"].append(f"{name}: {what} (known: {reason})")

    only_golden = []
    for name in sorted(set(renamed) - set(new)):
        if recipe.producer(name) in broken_steps and known_difference(name, known) is None:
            report["not_produced"] += 1
        else:
            note(name, "in the goldens, not produced now")
            only_golden.append(name)
    only_new = sorted(set(new) - set(renamed))
    for name in only_new:
        note(name, "produced now, not in the goldens")
    report["suggested_renames"] = suggest_renames({n: renamed[n] for n in only_golden},
                                                  {n: new[n] for n in only_new}, recipe)
    for name in sorted(set(renamed) & set(new)):
        old, cur = renamed[name], new[name]
        if name.startswith("images/"):
            diff, exact = compare_tensor(torch.from_numpy(np.ascontiguousarray(old)),
                                         torch.from_numpy(np.ascontiguousarray(cur)), image_like=True)
        elif isinstance(old, dict):
            diff, exact = compare_stats(old["stats"], cur, recipe)
        else:
            diff, exact = compare_tensor(old, cur, image_like=name.startswith("records/"))
        if diff is not None:
            note(name, diff)
        elif exact:
            report["exact"] += 1
        else:
            report["tolerance"] += 1
            report["within_tolerance"].append(name)
    return report


def _value_key(value, recipe) -> tuple | None:
    """Exact-value fingerprint shared by full tensors and stored summaries (None for images)."""
    if isinstance(value, dict):
        st = value["stats"]
    elif isinstance(value, torch.Tensor):
        st = recipe.tensor_stats(value)
    else:
        return None
    return (tuple(st["shape"]), st["dtype"], st["sum"], st["sumsq"], tuple(st["first"]), tuple(st["strided"]))


def _split_common_suffix(a: str, b: str) -> tuple[str, str]:
    """Prefixes of ``a`` and ``b`` before their longest common suffix that starts after a '.' or '/'."""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    suffix = a[len(a) - n:]
    cuts = [i for i, ch in enumerate(suffix) if ch in "./"]
    cut = cuts[0] + 1 if cuts else len(suffix)
    return a[:len(a) - n + cut], b[:len(b) - n + cut]


def suggest_renames(only_golden: dict[str, object], only_new: dict[str, object], recipe) -> dict[str, tuple[str, int]]:
    """Pair golden-only and new-only tensors whose values are identical (unique fingerprints on both sides)
    and derive name-prefix renames from the pairs: {old prefix: (new prefix, tensors paired)}. A hint
    for RENAMES, to be checked by a person."""
    from collections import Counter, defaultdict

    def index(items: dict) -> dict:
        by = defaultdict(list)
        for name, v in items.items():
            k = _value_key(v, recipe)
            if k is not None:
                by[k].append(name)
        return {k: names[0] for k, names in by.items() if len(names) == 1}

    g, n = index(only_golden), index(only_new)
    pairs = Counter(_split_common_suffix(g[k], n[k]) for k in set(g) & set(n))
    out: dict[str, tuple[str, int]] = {}
    for (old, new), count in pairs.most_common():
        if old not in out:
            out[old] = (new, count)
    return out


def format_report(report: dict, limit: int = 8) -> list[str]:
    """The differences, at most ``limit`` lines per output group (``weights/<preset>``, ``images/<run>``,
    ``records``), then the suggested renames."""
    from collections import defaultdict

    groups: dict[str, list[str]] = defaultdict(list)
    for line in report["differ"]:
        head = line.split(":", 1)[0].split("/")
        groups["records" if head[0] == "records" else "/".join(head[:2])].append(line)
    lines = []
    for group, items in groups.items():
        lines.append(f"  {group}: {len(items)} difference(s)")
        lines += [f"    {d}" for d in items[:limit]]
        if len(items) > limit:
            lines.append(f"    ... and {len(items) - limit} more")
    if report.get("suggested_renames"):
        lines.append("  suggested RENAMES (tensors with identical values under another name; check before use):")
        lines += [f"    {old!r}: {new!r},  # {count} tensor(s)"
                  for old, (new, count) in report["suggested_renames"].items()]
    return lines


def new_items(got: dict[str, dict]) -> dict[str, object]:
    return {f"{group}/{k}": v for group in ("weights", "records", "images") for k, v in got[group].items()}


# -- the test ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(1800)
def test_golden_outputs_match_the_recorded_commit(tmp_path, monkeypatch):
    if not (GOLDEN / "manifest.json").is_file():
        pytest.fail(f"no goldens in {GOLDEN}: record them with tests/golden/record.py --repo <checkout> --out {GOLDEN}")
    recipe = _load_recipe()
    manifest, golden = load_golden()

    here = (recipe.cpu_model(), torch.__version__)
    there = (manifest.get("cpu"), manifest["torch_version"])
    portable = here != there
    if portable:  # not the recording environment: bit-level equality is not expected
        module = sys.modules[__name__]
        monkeypatch.setattr(module, "RTOL", PORTABLE_RTOL)
        monkeypatch.setattr(module, "ATOL", PORTABLE_ATOL)
        monkeypatch.setattr(module, "IMAGE_MAX_DIFF", PORTABLE_IMAGE_MAX_DIFF)
    res = recipe.run_recipe(tmp_path / "run", sys.executable, recipe.checkout_env(ROOT), keep_going=True)

    # the inputs come from scikit-image's photos: another photo set makes every comparison meaningless
    bad_inputs = [k for k, v in res["inputs"].items() if manifest["inputs_sha256"].get(k) != v["sha256"]]
    assert not bad_inputs, (f"the recipe's generated inputs differ from the recorded ones ({bad_inputs}): "
                            f"scikit-image {res['versions']['skimage']} vs {manifest['recorded_with']['skimage']}? "
                            "the goldens cannot be compared in this environment")

    broken = {f["name"] for f in res["failed"]} | set(res["not_run"])
    report = compare_all(golden, new_items(recipe.collect(res)), recipe, broken_steps=broken)
    env_note = ""
    if portable:
        env_note = (f" (recorded on {there[0]} with torch {there[1]}, running on {here[0]} with torch {here[1]}: "
                    f"portable tolerances rtol {RTOL}, atol {ATOL}, images {IMAGE_MAX_DIFF} levels)")
    summary = (f"{report['exact']} exact, {report['tolerance']} within tolerance, {len(report['differ'])} differ, "
               f"{len(report['known'])} known differences, {report['not_produced']} not produced (failed steps); "
               f"goldens from {manifest['commit'][:10]}{env_note}; recipe {res['wall_s']:.0f} s")
    print(summary)
    for name in report["within_tolerance"]:
        print("  within tolerance, not exact:", name)
    for line in report["known"]:
        print("  known:", line)
    lines = [summary]
    for f in res["failed"]:
        tail = "\n".join("      " + ln for ln in f["output_tail"].strip().splitlines()[-12:])
        lines.append(f"  step {f['name']} FAILED (exit {f['returncode']}): {f['command']}\n{tail}")
    if res["not_run"]:
        lines.append(f"  steps not run (they need a failed step): {', '.join(res['not_run'])}")
    lines += format_report(report)
    if res["failed"] or report["differ"]:
        pytest.fail("\n".join(lines) + "\n(intended? record it in RENAMES / KNOWN_DIFFERENCES in tests/test_golden.py)",
                    pytrace=False)


# -- the comparison itself must be able to fail ------------------------------------------------------------------
def test_golden_comparison_reports_differences():
    recipe = _load_recipe()
    w = torch.linspace(-1, 1, 64).reshape(8, 8)
    img = np.full((4, 4, 3), 100, np.uint8)
    golden = {"weights/a/x": w.clone(), "weights/a/gone": w.clone(), "weights/b/s": {"stats": recipe.tensor_stats(w)},
              "images/r/seed_0/i.png": img, "records/r/lr": torch.zeros(3, dtype=torch.uint8),
              "weights/old/y": w.clone()}
    img2 = img.copy()
    img2[0, 0, 0] = 101          # within 1 level
    new = {"weights/a/x": w + 1e-3, "weights/b/s": w * (1 + 1e-3), "images/r/seed_0/i.png": img2,
           "records/r/lr": torch.tensor([0, 0, 5], dtype=torch.uint8), "weights/a/extra": w,
           "weights/new/y": w.clone()}
    rep = compare_all(golden, new, recipe, renames={"weights/old/": "weights/new/"}, known={})
    text = "\n".join(rep["differ"])
    assert "weights/a/x: max |diff| 0.001" in text
    assert "weights/b/s:" in text and "sum" in text
    assert "weights/a/gone: in the goldens, not produced now" in text
    assert "weights/a/extra: produced now, not in the goldens" in text
    assert "records/r/lr: max |diff| 5 levels" in text
    assert "images/r/seed_0/i.png" not in text and rep["tolerance"] == 1 and rep["exact"] == 1  # renamed y exact
    rep = compare_all(golden, new, recipe, renames={"weights/old/": "weights/new/"},
                      known={"weights/a/": "test", "weights/b/s": "test", "records/": "test"})
    assert rep["differ"] == [] and len(rep["known"]) == 5
    # renamed tensors with identical values give a suggested prefix rename
    g = {"weights/p/adapter.sft.a.weight": w.clone(),
         "weights/p/adapter.sft.b.weight": {"stats": recipe.tensor_stats(w * 2)}}
    n = {"weights/p/branch.sft.a.weight": w.clone(), "weights/p/branch.sft.b.weight": w * 2}
    rep = compare_all(g, n, recipe, renames={}, known={})
    assert rep["suggested_renames"] == {"weights/p/adapter.": ("weights/p/branch.", 2)}
    assert any("suggested RENAMES" in ln for ln in format_report(rep))
    assert compare_all(g, n, recipe, renames={"weights/p/adapter.": "weights/p/branch."}, known={})["differ"] == []
    # tiny float noise passes, shape changes do not
    assert compare_tensor(w, w + 5e-7)[0] is None
    assert "shape" in compare_tensor(w, w.reshape(64))[0]
    assert "non-finite" in compare_tensor(w, w.clone().fill_(float("nan")))[0]
    assert "dtype" in compare_tensor(w, w.double())[0]
    assert compare_stats(recipe.tensor_stats(w), w + 1e-7, recipe)[0] is None
    assert math.isfinite(recipe.tensor_stats(w)["sumsq"])
