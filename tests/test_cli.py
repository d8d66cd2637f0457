"""The installed commands: the package installed into a fresh virtual environment, each command run by its script in bin/."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from clipcap.cli import run

REPO = Path(__file__).resolve().parents[1]
COMMANDS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A virtual environment holding this repository installed (not editable), its dependencies seen
    through a .pth file naming the test's own site-packages; built offline, without build isolation."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"  # a copy, so that the build leaves nothing in the repository
    for package in ("clipcap", "testing"):  # testing/ too: the build must leave it out
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    env = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", str(source)], check=True)
    shutil.rmtree(source)  # the installed package must stand alone
    return env


def test_every_command_is_a_run_function(monkeypatch):
    """Each installed command is a plain function of clipcap.cli that runs its own module's main."""
    import importlib
    import inspect

    import clipcap.cli

    assert sorted(COMMANDS) == sorted(f"clipcap-{m.removeprefix('run_').replace('_', '-')}"
                                      for m in dir(clipcap.cli) if m.startswith("run_"))
    for name, target in COMMANDS.items():
        module = name.removeprefix("clipcap-").replace("-", "_")
        assert target == f"clipcap.cli:run_{module}"
        command = getattr(clipcap.cli, f"run_{module}")
        assert command.__qualname__ == f"run_{module}"  # written out, not made by a factory
        assert f"from .{module} import main" in inspect.getsource(command)
        ran = []
        monkeypatch.setattr(importlib.import_module(f"clipcap.cli.{module}"), "main", lambda: ran.append(module))
        command()
        assert ran == [module]


RUN_COMMANDS = """\
import contextlib, importlib.metadata, importlib.util, io, json, runpy, sys
import clipcap.app

seen = {"page": [str(clipcap.app.PAGE), clipcap.app.PAGE.is_file()],
        "files": [str(f) for f in importlib.metadata.files("clipcap")],
        "testing": importlib.util.find_spec("testing") is not None}
for script in sys.argv[1:]:
    sys.argv, out, err, code = [script, "--help"], io.StringIO(), io.StringIO(), None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code
    seen[script.rpartition("/")[2]] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def installed(venv) -> dict:
    """What one process of the venv saw: each command's script in bin/ run with --help as its own process
    runs it (exit status, stdout, stderr), and where clipcap.app finds its page. One process for all, as
    each command alone would spend seconds importing torch; test_bad_input_from_an_installed_command_is_one_line
    starts one as a process of its own."""
    done = subprocess.run([venv / "bin" / "python", "-c", RUN_COMMANDS, *(venv / "bin" / c for c in COMMANDS)],
                          capture_output=True, text=True, cwd=venv)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_installed_command_runs(installed, command):
    code, out, err = installed[command]
    assert code == 0 and err == "", err
    assert out.startswith(f"usage: {command} ") or out.startswith(f"usage: {command}\n")


def test_installed_package_has_the_web_page(installed, venv):
    """clipcap-app serves clipcap/app.html from the installed package, not from a checkout."""
    page, found = installed["page"]
    assert Path(page).is_relative_to(venv) and found


def test_installed_package_is_the_library_alone(installed):
    """The wheel holds clipcap/ and its commands; the test support (testing/: tiny backbones, the original's
    decoders) stays in the checkout."""
    files = [Path(f) for f in installed["files"]]
    assert {f.parts[0] for f in files if f.parts[0] != ".."} == {"clipcap", "clipcap-0.1.0.dist-info"}
    assert Path("clipcap/model.py") in files and Path("clipcap/cli/train.py") in files
    assert not [f for f in files if f.stem in ("tiny", "reference")] and not installed["testing"]


def test_bad_input_from_an_installed_command_is_one_line(venv, tmp_path):
    done = subprocess.run([venv / "bin" / "clipcap-predict", "--checkpoint", str(tmp_path / "absent.pt"),
                           "--features", str(tmp_path / "absent.pkl")], capture_output=True, text=True, cwd=venv)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'absent.pkl'}: feature file not found"], done.stderr


def test_run_turns_clipcap_errors_into_exit_status_2(capsys):
    from clipcap.files import ClipCapError

    def fail():
        raise ClipCapError("x.pt: broken")

    with pytest.raises(SystemExit) as exit_info:
        run(fail)
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: x.pt: broken\n"
