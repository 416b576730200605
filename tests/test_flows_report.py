"""`fbta report`: reports/metrics.json rebuilt from the stages' fragments, and the results table."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from fbta.cli import main
from fbta.io.metrics import publish_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_report_rebuilds_metrics_from_fragments_and_prints_the_table(tmp_path: Path, capsys):
    reports = tmp_path / "reports"
    publish_metrics(reports, "evaluate_vanilla", {"classification": {"vanilla": {"auc": 0.75, "acc": 0.5, "f1": 0.4,
                                                                                  "arch": "abmil"}}})
    publish_metrics(reports, "infer_fbta", {"classification": {"fbta": {"auc": 0.9, "acc": 0.8, "f1": 0.8},
                                                               "fbta_reextract": {"auc": 0.875}}})
    publish_metrics(reports, "seg_teacher", {"segmentation": {"teacher": {"f1": 0.7, "iou": 0.55}}})
    # a key no fragment carries any more (a removed stage, an old run): must not survive the rebuild
    stale = json.loads((reports / "metrics.json").read_text())
    stale["classification"]["old_variant"] = {"auc": 0.1}
    (reports / "metrics.json").write_text(json.dumps(stale))

    assert main(["report", f"data.out={tmp_path}"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((reports / "metrics.json").read_text())
    assert set(metrics["classification"]) == {"vanilla", "fbta", "fbta_reextract"}
    assert metrics["segmentation"]["teacher"] == {"f1": 0.7, "iou": 0.55}
    assert "rebuilt from 3 fragment(s)" in out
    row = next(line for line in out.splitlines() if line.startswith("vanilla "))
    assert row.split()[1:4] == ["0.750", "0.500", "0.400"] and "arch=abmil" in row
    assert next(line for line in out.splitlines() if line.startswith("fbta_reextract")).split()[1:3] == ["0.875", "-"]


def test_report_names_a_broken_fragment_and_exits_2(tmp_path: Path, capsys):
    frag = tmp_path / "reports" / "metrics" / "seg_distill.json"
    frag.parent.mkdir(parents=True)
    frag.write_text("{not json")
    assert main(["report", f"data.out={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(frag) in err[0] and "not valid JSON" in err[0]


def test_report_stage_owns_metrics_json_and_stages_declare_only_fragments():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    owners = {name for name, st in stages.items()
              for m in st.get("metrics", []) for path in (m if isinstance(m, dict) else {m: None})
              if path.endswith("reports/metrics.json")}
    assert owners == {"report"}
    assert "data/reports/metrics" in stages["report"]["deps"]
    for name, st in stages.items():
        for m in st.get("metrics", []):
            path = next(iter(m)) if isinstance(m, dict) else m
            assert name == "report" or "/reports/metrics/" in path, f"{name} declares {path}, not a fragment"
