"""`python main.py`: arguments, environment defaults, and clear start-up errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_main(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, env=env)


def test_missing_config_exits_2_with_a_hint(tmp_path):
    missing = tmp_path / "api.yaml"
    result = run_main("--config", str(missing))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(missing) in lines[0] and "cp api.yaml.example" in lines[0]


def test_config_path_from_environment(tmp_path):
    import os

    missing = tmp_path / "from-env.yaml"
    result = run_main(env={**os.environ, "TOLLGATE_CONFIG": str(missing)})
    assert result.returncode == 2 and str(missing) in result.stderr


def test_invalid_config_exits_2_naming_file_and_line(tmp_path):
    config = tmp_path / "api.yaml"
    config.write_text("providers:\n  - provider: x\n    engine: echo\n    model: [m]\nbogus: 1\n")
    result = run_main("--config", str(config))
    assert result.returncode == 2
    assert f"{config}:5: unknown key 'bogus'" in result.stderr


def test_example_config_is_valid():
    from core.config import load_config

    config = load_config(ROOT / "api.yaml.example")
    assert "echo-1" in config.routes
    assert any(key.is_admin for key in config.keys)
