"""The conda environment and the pip/Makefile set-up install the same things."""
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_environment_yml_lists_the_pyproject_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"]) \
        | set(project["optional-dependencies"]["app"]) | set(project["optional-dependencies"]["data"])
    wanted = {d for d in wanted if not d.startswith("torch")} | {"-c constraints.txt", "torch==2.13.0", "-e ."}
    conda = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert set(pip) == wanted
    assert pip[:2] == ["-c constraints.txt", "torch==2.13.0"]  # the exact versions, and torch's own pin first


def test_makefile_installs_the_same_torch_first():
    makefile = (REPO / "Makefile").read_text()
    assert "TORCH := torch==2.13.0" in makefile
    assert makefile.index("$(TORCH)") < makefile.index('-e ".[dev,app,data]"')
    assert "-c constraints.txt $(TORCH)" in makefile and '-c constraints.txt -e ".[dev,app,data]"' in makefile


def test_constraints_pin_every_dependency_within_its_pyproject_range():
    """constraints.txt, the exact versions `make` installs, satisfies pyproject's ranges."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for extra in (project["dependencies"], *project["optional-dependencies"].values()):
        for requirement in map(Requirement, extra):
            if requirement.name != "torch":  # pinned by the Makefile
                assert requirement.specifier.contains(pins[canonicalize_name(requirement.name)]), requirement
