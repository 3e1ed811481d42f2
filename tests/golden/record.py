"""Record the golden outputs of the recipe (tests/golden/recipe.py) from one checkout of sr_lab.

    .venv/bin/python tests/golden/record.py --repo /tmp/golden_head --out tests/golden/data

``--repo`` is the checkout whose code and ``conf/`` run (typically a ``git worktree`` of the commit to pin);
``--python`` the interpreter with sr_lab's dependencies (default: this one). Written under ``--out`` (its
previous contents are replaced):

* ``weights/<preset>.safetensors``: the export's ``trainable.safetensors`` verbatim, for the smallest exports
  up to 8 MB in all; ``weights/<preset>.json``: per-tensor shape, dtype, float64 sum, sum of squares, sum of
  |x|, first 16 and 16 evenly spaced values for the others (``recipe.plan_weight_storage``);
* ``records.safetensors``: every tensor of the stablesr_latents shards, keys ``<shard stem>/<key>``;
* ``images/<run>/seed_<k>/<stem>.png``: every SR PNG written by inference, byte for byte;
* ``inputs/``: the LR inputs the recipe generated (for looking at; the test checks their sha256);
* ``manifest.json``: commit, command lines, library versions, storage plan, input hashes, timings.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import recipe


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def clear_out(out: Path) -> None:
    """Empty ``out`` if it is a previous golden folder (has manifest.json) or empty; refuse otherwise."""
    if out.exists():
        entries = list(out.iterdir())
        if entries and not (out / "manifest.json").is_file():
            raise SystemExit(f"--out {out} is not empty and holds no manifest.json; refusing to overwrite it")
        for e in entries:
            shutil.rmtree(e) if e.is_dir() and not e.is_symlink() else e.unlink()
    out.mkdir(parents=True, exist_ok=True)


def record(repo: Path, out: Path, python: str, work: Path) -> dict:
    commit = git(repo, "rev-parse", "HEAD")
    dirty = git(repo, "status", "--porcelain", "--untracked-files=no")
    env = recipe.checkout_env(repo)
    res = recipe.run_recipe(work, python, env)
    print(f"recipe: {res['wall_s']:.1f} s wall, {res['cpu_s']:.1f} CPU s, sr_lab from {res['versions']['sr_lab']}")
    got = recipe.collect(res)
    wdir = Path(res["out_dir"])

    clear_out(out)
    (out / "weights").mkdir()
    sizes = {p: (wdir / e / "trainable.safetensors").stat().st_size for p, e in res["exports"].items()}
    plan = recipe.plan_weight_storage(sizes)
    for preset, mode in plan.items():
        src = wdir / res["exports"][preset] / "trainable.safetensors"
        if mode == "copy":
            shutil.copyfile(src, out / "weights" / f"{preset}.safetensors")
        else:
            stats = {k[len(preset) + 1:]: recipe.tensor_stats(v) for k, v in got["weights"].items()
                     if k.startswith(preset + "/")}
            (out / "weights" / f"{preset}.json").write_text(json.dumps({"mode": "stats", "tensors": stats}, indent=1))

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in got["records"].items()}, str(out / "records.safetensors"))
    for rel in res["sr_images"]:
        dst = out / "images" / Path(rel).relative_to("sr")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(wdir / rel, dst)
    for name, info in res["inputs"].items():
        if name.startswith("inputs/"):
            dst = out / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(wdir / info["path"], dst)

    manifest = {
        "recorded_at": _dt.datetime.now().isoformat(timespec="seconds"),
        "commit": commit,
        "commit_subject": git(repo, "log", "-1", "--format=%s"),
        "worktree_dirty": bool(dirty),
        "recorded_with": {"repo": str(repo), "interpreter": python, **res["versions"]},
        "cpu": recipe.cpu_model(),
        "torch_version": res["versions"]["torch"],
        "recipe": {"wall_s": res["wall_s"], "cpu_s": res["cpu_s"], "workers": recipe.WORKERS,
                   "threads_per_process": recipe.THREADS},
        "commands": [{"name": j["name"], "command": recipe.portable_command(j["argv"], res["out_dir"], res["repo"]),
                      "seconds": j["seconds"], "cpu_s": j["cpu_s"]} for j in res["jobs"]],
        "command_note": "run as <python> <command> with cwd=<REPO>, PYTHONPATH=<REPO>, SR_LAB_ROOT=<REPO>, "
                        "OMP/MKL threads 1 (recipe.checkout_env); <OUT> = the recipe's output folder",
        "inputs_sha256": {k: v["sha256"] for k, v in res["inputs"].items()},
        "weights": {p: {"storage": plan[p], "bytes": sizes[p],
                        "file": f"weights/{p}.{'safetensors' if plan[p] == 'copy' else 'json'}",
                        "tensors": sum(1 for k in got["weights"] if k.startswith(p + "/"))} for p in plan},
        "records": sorted(got["records"]),
        "images": sorted(Path(r).relative_to("sr").as_posix() for r in res["sr_images"]),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True, type=Path, help="checkout of sr_lab whose code is recorded")
    ap.add_argument("--out", required=True, type=Path, help="golden folder to (re)write, e.g. tests/golden/data")
    ap.add_argument("--python", default=sys.executable, help="interpreter with sr_lab's dependencies")
    ap.add_argument("--work", type=Path, default=None, help="where the recipe runs (default: a temporary folder)")
    args = ap.parse_args()
    repo = args.repo.resolve()
    if not (repo / "sr_lab").is_dir() or not (repo / "conf").is_dir():
        raise SystemExit(f"--repo {repo} is not an sr_lab checkout")
    out = args.out.resolve()
    if args.work is not None:
        m = record(repo, out, args.python, args.work.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="sr_lab_golden_") as tmp:
            m = record(repo, out, args.python, Path(tmp))
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    storage = ", ".join(f"{p}={w['storage']}" for p, w in m["weights"].items())
    print(f"recorded commit {m['commit'][:10]} (torch {m['torch_version']}) into {out}: {len(m['images'])} images, "
          f"{len(m['records'])} record tensors, weights {storage}; "
          f"{total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
