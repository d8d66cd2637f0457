"""The conda environment and the pip/Makefile set-up install the same things."""
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_environment_yml_lists_the_pyproject_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"]) \
        | set(project["optional-dependencies"]["app"])
    wanted = {d for d in wanted if not d.startswith("torch")} | {"torch==2.13.0", "-e ."}
    conda = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert set(pip) == wanted
    assert pip[0] == "torch==2.13.0"  # first, so nothing pulls another torch build


def test_makefile_installs_the_same_torch_first():
    makefile = (REPO / "Makefile").read_text()
    assert "TORCH := torch==2.13.0" in makefile
    assert makefile.index("$(TORCH)") < makefile.index('-e ".[dev,app]"')
