"""params.yaml is validated: typos and wrong types fail loudly with one line, exit 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fbta.cli import main
from fbta.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_matches_the_schema():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.tile.target_mpp == 0.5 and cfg.tile.patch_size == 256


def test_override_changes_a_value_with_its_type():
    cfg = load_config(None, ["tile.target_mpp=1.0", "tile.patch_size=224", "tile.default_mpp=0.25"])
    assert cfg.tile.target_mpp == 1.0 and cfg.tile.patch_size == 224 and cfg.tile.default_mpp == 0.25


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"unknown key 'tile\.patchsize'"):
        load_config(None, ["tile.patchsize=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"tile\.patch_size"):
        load_config(None, ["tile.patch_size=big"])


def test_typo_in_params_file_names_file_and_key(tmp_path: Path):
    p = tmp_path / "params.yaml"
    p.write_text("tile:\n  target_mmp: 0.5\n")
    with pytest.raises(ConfigError, match=r"params\.yaml: unknown key 'tile\.target_mmp'"):
        load_config(p)


def test_malformed_override_and_missing_params_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["tile.patch_size"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_a_choice_outside_its_set_is_refused_at_load_time_naming_key_and_choices(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"seg.distill.kd='blokwise' must be one of fusion, blockwise"):
        load_config(ROOT / "params.yaml", ["seg.distill.kd=blokwise"])
    with pytest.raises(ConfigError, match=r"fbta.views\[1\]='xb' must be one of fb, eb, tb"):
        load_config(ROOT / "params.yaml", ["fbta.views=[fb,xb]"])
    bad = tmp_path / "params.yaml"
    bad.write_text("heatmap:\n  normalize: rank\n")
    with pytest.raises(ConfigError, match=r"params.yaml: heatmap.normalize='rank' must be one of percentile, minmax"):
        load_config(bad)


def test_choices_behave_as_their_strings_in_comparisons_files_and_logs(tmp_path: Path):
    import json

    from fbta.config import save_config
    from omegaconf import OmegaConf

    cfg = load_config(ROOT / "params.yaml", ["seg.distill.kd=blockwise"])
    kd = cfg.seg.distill.kd
    assert kd == "blockwise" and f"{kd}" == str(kd) == "blockwise" and kd in ("fusion", "blockwise")
    assert '"kd": "blockwise"' in json.dumps(OmegaConf.to_container(cfg.seg.distill))  # fingerprints, meta.json
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").seg.distill.kd == "blockwise"  # a saved config loads back


def test_config_is_read_only():
    cfg = load_config(None)
    with pytest.raises(Exception):
        cfg.tile.patch_size = 1


def test_cli_config_error_is_one_line_and_exit_2(capsys):
    assert main(["tile", "tile.nonsense=1", "--params", str(ROOT / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tile.nonsense" in err[0]


def test_cli_help_lists_the_stage_commands():
    out = subprocess.run([sys.executable, "-m", "fbta", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("synth", "tile"):
        assert cmd in out
