"""tools/compare_runs.py: results must match between two runs; wall times may not."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import compare_runs  # noqa: E402


def _run(root: Path, weight: float, seconds: float) -> Path:
    (root / "models/m").mkdir(parents=True)
    (root / "reports").mkdir()
    torch.save({"w": torch.full((2,), weight)}, root / "models/m/best.pt")
    (root / "reports/metrics.json").write_text(json.dumps({"classification": {"fbta": {"auc": 0.9,
                                                                                        "seconds": seconds}}}))
    (root / "models/m/history.csv").write_text(f"epoch,train_loss,seconds\n0,0.5,{seconds}\n")
    return root


def test_wall_times_may_differ_results_may_not(tmp_path: Path):
    a = _run(tmp_path / "a", 1.0, 3.0)
    assert compare_runs.compare(a, _run(tmp_path / "b", 1.0, 7.5)) == []
    assert compare_runs.compare(a, _run(tmp_path / "c", 1.0 + 1e-7, 3.0)) == ["models/m/best.pt"]
