"""The docs site builds strictly, its configuration reference is the schema's, and every results JSON it cites exists.

`mkdocs build --strict` fails on a broken link, a missing page or a bad anchor; the configuration
reference is generated from fbta/schema.py + params.yaml + dvc.yaml, so a new key, a changed default
or a stage that starts reading a section shows up here until `tools/gen_config_ref.py` is re-run."""
from __future__ import annotations

import dataclasses
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MKDOCS = Path(sys.executable).with_name("mkdocs")
# JSON files of the pipeline (not of reports/bench) that the docs name
PIPELINE_JSON = {"metrics", "meta", "best", "localisation", "confusion_vanilla", "tile", "extract", "gpu_check"}


def _gen():
    spec = importlib.util.spec_from_file_location("gen_config_ref", ROOT / "tools" / "gen_config_ref.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gen_config_ref"] = mod  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_the_configuration_reference_is_generated_from_the_current_schema():
    gen = _gen()
    assert (ROOT / "docs" / "reference" / "configuration.md").read_text() == gen.render(ROOT), \
        "stale: run .venv/bin/python tools/gen_config_ref.py"


def test_the_reference_lists_every_schema_key_with_its_default_and_the_stages_that_read_it():
    gen = _gen()
    from fbta.schema import Config

    keys = list(gen.walk(Config))
    text = gen.render(ROOT)
    assert len(keys) > 150 and all(f"| `{k.path}` |" in text for k in keys)
    row = next(ln for ln in text.splitlines() if ln.startswith("| `seg.distill.kd` |"))
    assert "fusion, blockwise" in row and "`seg_distill`" in row and "`fusion`" in row
    row = next(ln for ln in text.splitlines() if ln.startswith("| `cluster.n_clusters` |"))
    assert "`100`" in row and "`16`" in row and "`cluster`" in row and "`train_fbta`" in row  # schema, demo, stages
    assert dataclasses.is_dataclass(Config)


def test_mkdocs_builds_strictly_offline(tmp_path):
    proc = subprocess.run([str(MKDOCS), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pages = list((tmp_path / "site").rglob("*.html"))
    assert len(pages) > 20
    fetched = {m for p in pages for m in re.findall(r'(?:src|href)="(https?://[^"]+\.(?:js|css))"', p.read_text())}
    assert not fetched, f"pages load assets from the network: {sorted(fetched)[:5]}"


def test_every_results_json_the_docs_cite_exists():
    bench = {p.stem for p in (ROOT / "reports" / "bench").glob("*.json")}
    written = [ROOT / "README.md", *[p for p in (ROOT / "docs").rglob("*.md") if "results" not in p.parts
                                     and p.name != "configuration.md"]]
    missing = {(p.name, m) for p in written
               for m in re.findall(r"(?:(?<![\w/{},*@-])|reports/bench/)([a-z0-9_]+(?:@[0-9a-f]{8})?)\.json\b",
                                   p.read_text())
               if m not in bench and m not in PIPELINE_JSON}
    assert not missing, f"cited but not in reports/bench/: {sorted(missing)}"
