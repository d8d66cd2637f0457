"""torchrun for the tests, its processes forked from a Python that has already imported torch,
transformers and the training code.

    python tests/forked_torchrun.py --nproc_per_node 2 SCRIPT.py ARGS...

Each process gets the environment torchrun gives it (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), runs SCRIPT as ``__main__`` and joins a real gloo process group, as under
torchrun; the exit status is non-zero when any process failed. What it saves is the seconds each new
Python spends on imports: one import per launch instead of one per process plus torchrun's own, and
none per launch for :class:`ForkedTorchrun`, which keeps the importing Python between launches.
torchrun's launcher itself runs in test_extraction.py.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import clipcap.extraction  # noqa: F401  (what the processes import, imported once before they fork)
import clipcap.training  # noqa: F401


def run_script(script: str, argv: list[str]) -> int:
    sys.argv, sys.path[0] = [script, *argv], os.path.dirname(os.path.abspath(script))
    try:
        runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1


def launch(world: int, script: str, argv: list[str], env: dict[str, str], logs: str | None = None) -> int:
    """SCRIPT in ``world`` forked processes, each with its stdout and stderr in ``logs`` if given."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pids = []
    for rank in range(world):
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            if logs:
                for fd, kind in ((1, "out"), (2, "err")):
                    os.dup2(os.open(f"{logs}/rank{rank}.{kind}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                              LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            code = run_script(script, argv)
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    return 1 if any(codes) else 0


class ForkedTorchrun:
    """``run(script, *args, env=...)`` as ``subprocess.run`` of ``torchrun --nproc_per_node N script ARGS``
    would return it (returncode, the processes' stdout and stderr one after the other), from one
    importing Python kept between launches."""

    def __init__(self, logs: Path, processes: int = 2):
        self.logs, self.processes, self.launches = logs, processes, 0
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.server = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=env)

    def run(self, script: Path, *args: str, env: dict[str, str] | None = None) -> SimpleNamespace:
        self.launches += 1
        logs = self.logs / f"launch{self.launches}"
        logs.mkdir(parents=True)
        request = {"world": self.processes, "script": str(script), "argv": list(map(str, args)), "env": env or {},
                   "logs": str(logs)}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        reply = self.server.stdout.readline()
        assert reply, "the forking Python died"
        out, err = ("".join((logs / f"rank{r}.{kind}").read_text() for r in range(self.processes))
                    for kind in ("out", "err"))
        return SimpleNamespace(returncode=json.loads(reply), stdout=out, stderr=err)

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nproc_per_node", type=int, default=2)
    parser.add_argument("--serve", action="store_true", help="launch what each line of stdin asks (JSON)")
    parser.add_argument("script", nargs="?")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if not args.serve:
        return launch(args.nproc_per_node, args.script, args.args, {})
    for line in sys.stdin:
        print(json.dumps(launch(**json.loads(line))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
