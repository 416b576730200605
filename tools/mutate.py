"""``make mutate``: mutation testing of the method cores with mutmut → reports/mutation.json.

How strong are the tests of the five modules the methods rest on (fbta/e2e/step.py, fbta/e2e/translator.py,
fbta/seg/losses.py, fbta/mil/metrics.py, fbta/tiling/tissue.py)? mutmut (pinned in the ``test`` extra;
configured in pyproject.toml ``[tool.mutmut]``) copies ``fbta/`` into ``mutants/`` (gitignored), makes one
small change at a time in these files only (``<`` → ``<=``, a constant + 1, an argument dropped, …) and runs,
forked from one warm process, the tests among ``pytest_add_cli_args_test_selection`` that call the changed
function. A mutant is *killed* when a test fails, *timeout* when it ran past its CPU budget (the change made the
code hang: also detected), *survived* when every test passed — a change no test notices.

Why a sample: all ~1,200 mutants take hours on 2 cores (a forked pytest run each, several seconds for the
torch-heavy tests). ``--per-module N`` draws N mutants per module, evenly spaced over mutmut's own list (every
function gets its share), and re-runs them; ``--per-module 0`` runs every mutant. Results accumulate in
``mutants/`` (re-running continues), and the JSON is written from every mutant checked so far, with the
survivors' diffs.

    python tools/mutate.py [--per-module N] [--out reports/mutation.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["fbta/e2e/step.py", "fbta/e2e/translator.py", "fbta/seg/losses.py", "fbta/mil/metrics.py",
           "fbta/tiling/tissue.py"]
# mutmut's exit codes (mutmut/stats.py) grouped as we report them
KILLED, TIMEOUT, SURVIVED = {1, 3}, {-24, 24, 36, 152, 255}, {0}


def mutmut(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "mutmut"
    # one torch/OpenMP thread: mutmut forks each mutant's run from a warm process, and a forked child of a
    # process whose OpenMP pool already spun up spins on that pool — a "timeout" the mutant did not cause
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # mutmut puts mutants/ first on sys.path; nothing may shadow it
    return subprocess.run([str(exe), *args], cwd=ROOT, env=env, capture_output=True, text=True)


def meta(module: str) -> dict:
    path = ROOT / "mutants" / f"{module}.meta"
    return json.loads(path.read_text()) if path.exists() else {}


def all_names(module: str) -> list[str]:
    return list(meta(module).get("exit_code_by_key", {}))


def evenly(names: list[str], n: int) -> list[str]:
    if n <= 0 or n >= len(names):
        return names
    step = len(names) / n
    return [names[int(i * step)] for i in range(n)]


def ensure_generated() -> None:
    """mutmut lists its mutants only after a run: a first run on one mutant generates them all (+ test stats)."""
    if all(all_names(m) for m in MODULES):
        return
    p = mutmut("run", "--max-children", "2", "fbta.mil.metrics.x_macro_f1__mutmut_1")
    if not all(all_names(m) for m in MODULES):
        raise SystemExit(f"mutate: mutmut generated no mutants:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def diff(name: str) -> str:
    out = mutmut("show", name).stdout
    return "\n".join(line for line in out.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---"))


def summarise(selection: dict[str, list[str]], per_module: int, wall_s: float,
              modules: list[str] = MODULES) -> dict:
    """Scores over every mutant checked so far (earlier runs included); the sample's own coverage beside them.

    Two scores: ``score`` counts timeouts as detected (the mutant made the tests overrun their CPU budget,
    usually a hang); ``score_killed_only`` does not — on a loaded machine a slow torch test can overrun
    without hanging, so the truth lies between the two.
    """
    report: dict = {"tool": "mutmut 3.8.1", "per_module": per_module or "all", "wall_s": round(wall_s),
                    "modules": {}}
    for module in modules:
        codes = meta(module).get("exit_code_by_key", {})
        checked = {k: v for k, v in codes.items() if v is not None and v not in (33, 5)}
        killed = sum(v in KILLED for v in checked.values())
        timeout = sum(v in TIMEOUT for v in checked.values())
        survived = sorted(k for k, v in checked.items() if v in SURVIVED)
        untested = sorted(k for k, v in codes.items() if v in (33, 5))
        sample = selection.get(module, [])
        report["modules"][module] = {
            "mutants": len(codes), "sampled": len(sample),
            "sampled_checked": sum(codes.get(k) is not None for k in sample), "checked": len(checked),
            "killed": killed, "timeout": timeout, "survived": len(survived), "no_tests": len(untested),
            "score": round((killed + timeout) / len(checked), 3) if checked else None,
            "score_killed_only": round(killed / len(checked), 3) if checked else None,
            "survivors": {k: diff(k) for k in survived},
            "not_reached_by_the_selected_tests": {k: diff(k) for k in untested},
        }
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-module", type=int, default=40, help="mutants per module (0: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "mutation.json")
    ap.add_argument("--report-only", action="store_true", help="write the JSON from the results so far")
    ap.add_argument("--note", default="", help="how this run was bounded (written into the JSON)")
    ap.add_argument("--retest-survivors", action="store_true", help="run the survivors so far again (new tests)")
    ap.add_argument("--retest-timeouts", action="store_true", help="run the timed-out mutants so far again")
    ap.add_argument("--modules", nargs="+", choices=MODULES, default=MODULES,
                    help="run these modules only; the others keep their entries from the existing --out JSON")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    ensure_generated()
    selection = {m: evenly(all_names(m), args.per_module) for m in args.modules}
    if not args.report_only:
        again = (SURVIVED if args.retest_survivors else set()) | (TIMEOUT if args.retest_timeouts else set())
        todo = [n for m in args.modules for n, v in meta(m)["exit_code_by_key"].items()
                if (v is None and n in selection[m]) or v in again]
        if todo:
            p = mutmut("run", "--max-children", "2", *todo)
            if p.returncode != 0:
                print(p.stdout[-3000:], p.stderr[-3000:], file=sys.stderr)
                return p.returncode
    report = summarise(selection, args.per_module, time.monotonic() - t0, args.modules)
    if args.note:
        report["note"] = args.note
    if set(args.modules) != set(MODULES) and args.out.exists():  # a partial run: the other modules as they were
        earlier = json.loads(args.out.read_text())
        for module in MODULES:
            if module not in args.modules and module in earlier.get("modules", {}):
                kept = earlier["modules"][module]
                report["modules"][module] = {**kept, "from_earlier_run": kept.get("from_earlier_run")
                                             or earlier.get("note", "") or "an earlier run"}
        report["modules"] = {m: report["modules"][m] for m in MODULES if m in report["modules"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    for module, r in report["modules"].items():
        print(f"mutate: {module}: score {r['score']} ({r['killed']} killed + {r['timeout']} timeout of "
              f"{r['checked']} checked; {r['survived']} survived, {r['no_tests']} reached by no selected test; "
              f"{r['mutants']} mutants in all, {r['sampled_checked']}/{r['sampled']} of the sample checked)")
    print(f"mutate: → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
