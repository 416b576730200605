"""Every figure has one source: reports/bench/*.json → tools/gen_benchmarks.py → BENCHMARKS.md and docs/results/.

A hand edit of BENCHMARKS.md, a row without its JSON, a JSON without its script, or two JSONs for one
(benchmark, command) fails here."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


gen = _load("gen_benchmarks", ROOT / "tools" / "gen_benchmarks.py")


def test_generated_files_are_up_to_date_and_every_json_follows_the_convention():
    assert gen.stale(ROOT) == [], "run: .venv/bin/python tools/gen_benchmarks.py"


def test_every_row_of_benchmarks_md_links_an_existing_json_and_every_json_has_a_row():
    text = (ROOT / "BENCHMARKS.md").read_text()
    linked = re.findall(r"\[[^\]]+\]\(reports/bench/([^)]+\.json)\) \|$", text, flags=re.M)
    rows = [ln for ln in text.splitlines() if re.match(r"^\| \d{4}-", ln)]
    assert len(linked) == len(rows), "a row without its JSON link"
    assert all((ROOT / "reports" / "bench" / j).exists() for j in linked)
    assert sorted(linked) == sorted(p.name for p in (ROOT / "reports" / "bench").glob("*.json"))


def test_every_json_names_a_script_that_exists_and_where_it_ran():
    for r in gen.load(ROOT / "reports" / "bench"):
        assert r.script and (ROOT / r.script).exists(), r.path.name
        assert {"cores", "device"} <= set(r.data["machine"]), r.path.name
        assert r.data["commit"], r.path.name


def _root_with(tmp_path: Path, payloads: dict[str, dict]) -> Path:
    (tmp_path / "reports" / "bench").mkdir(parents=True)
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "tile.py").write_text("")
    for name, d in payloads.items():
        (tmp_path / "reports" / "bench" / name).write_text(json.dumps(d))
    return tmp_path


GOOD = {"benchmark": "tile", "command": "python benchmarks/tile.py", "date": "2026-12-07 12:00", "commit": "abc1234",
        "machine": {"cores": 2, "device": "cpu", "arch": "x86_64"}, "headline": "0.19 × reading the patches once"}


def test_the_check_names_a_json_whose_script_is_gone_and_a_duplicate_pair(tmp_path):
    root = _root_with(tmp_path, {"tile.json": GOOD, "tile@1.json": GOOD,
                                 "old.json": {**GOOD, "benchmark": "old", "command": "python benchmarks/old.py"}})
    bad = gen.problems(gen.load(root / "reports" / "bench"), root)
    assert any("old.json: its script benchmarks/old.py does not exist" in b for b in bad)
    assert any("same benchmark and command" in b for b in bad)


def test_a_run_in_progress_does_not_stop_another_benchmark_from_recording_and_is_named_until_it_ends(tmp_path):
    """Defect guarded: a protocol's resumable state (no provenance yet) in reports/bench made every other
    benchmark's record() crash while the protocol ran (KeyError in the table), losing that run's JSON."""
    root = _root_with(tmp_path, {"tile.json": GOOD, "fbta_protocol_x.json": {"settings": {}, "units": {}}})
    gen.write_all(root)
    assert "0.19 × reading the patches once" in (root / "BENCHMARKS.md").read_text()
    assert not (root / "docs" / "results" / "fbta_protocol_x.md").exists()
    assert any("fbta_protocol_x.json: missing" in b for b in gen.problems(gen.load(root / "reports" / "bench"), root))


def test_a_hand_edit_of_benchmarks_md_is_caught_and_a_rerun_restores_it(tmp_path):
    root = _root_with(tmp_path, {"tile.json": GOOD})
    gen.write_all(root)
    assert gen.stale(root) == []
    md = root / "BENCHMARKS.md"
    md.write_text(md.read_text().replace("0.19 ×", "0.09 ×"))
    assert gen.stale(root) == ["BENCHMARKS.md: differs from tools/gen_benchmarks.py's output (run it)"]
    (root / "reports" / "bench" / "tile.json").unlink()
    assert "docs/results/tile.md: no JSON renders this page (run tools/gen_benchmarks.py)" in gen.stale(root)


def test_a_legacy_json_is_adopted_from_its_row_with_unknowns_marked(tmp_path):
    legacy = {k: v for k, v in GOOD.items() if k not in ("headline", "commit")}
    legacy["machine"] = "x86_64, 2 CPU cores, no GPU, torch 2.14.1+cu130"
    root = _root_with(tmp_path, {"tile.json": legacy})
    assert any("missing commit, headline" in b for b in gen.problems(gen.load(root / "reports" / "bench"), root))
    (root / "BENCHMARKS.md").write_text("| 2026-12-07 12:00 | tile | x86_64, 2 CPU cores, no GPU, torch 2.14.1+cu130 | "
                                        "`python benchmarks/tile.py` | 0.19 × | tail | with | pipes |\n")
    gen.write_all(root)
    d = json.loads((root / "reports" / "bench" / "tile.json").read_text())
    assert d["headline"] == "0.19 × | tail | with | pipes"
    assert d["commit"] == "unknown" and d["backfilled"]["fields"] == ["commit", "headline", "machine"]
    assert d["machine"] == {"arch": "x86_64", "cores": 2, "device": "cpu", "card": None, "torch": "2.14.1+cu130"}
    assert gen.stale(root) == []
    assert "0.19 × \\| tail \\| with \\| pipes" in (root / "BENCHMARKS.md").read_text()


def test_a_new_command_keeps_the_previous_commands_json(tmp_path, monkeypatch):
    common = _load("bench_common", ROOT / "benchmarks" / "common.py")
    latest = tmp_path / "tile.json"
    latest.write_text(json.dumps({**GOOD, "command": "python benchmarks/tile.py --side 8192"}))
    common.keep_other_command(latest, "python benchmarks/tile.py")
    kept = tmp_path / f"tile@{common.command_key('python benchmarks/tile.py --side 8192')}.json"
    assert kept.exists() and not latest.exists()
    latest.write_text(json.dumps({**GOOD}))
    common.keep_other_command(latest, "python benchmarks/tile.py --side 8192")  # re-run of the kept command
    assert not kept.exists(), "the older run of the same command is superseded, not kept twice"
    assert (tmp_path / f"tile@{common.command_key('python benchmarks/tile.py')}.json").exists()
