"""The package pins live in pyproject.toml; the conda environment must list exactly the same ones."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_pins() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + project["optional-dependencies"]["test"]


def test_conda_environment_pins_equal_pyproject():
    env = yaml.safe_load((ROOT / "envs" / "weakseg.yaml").read_text())
    pip = next(entry["pip"] for entry in env["dependencies"] if isinstance(entry, dict))
    assert sorted(pip) == sorted(_pyproject_pins())
    python = next(e for e in env["dependencies"] if isinstance(e, str) and e.startswith("python="))
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python == "python=3.11" and requires == ">=3.11,<3.12"
