"""torchrun for the tests, run by tests/warm_python.py's interpreter: the processes are forked from it,
so they start with torch, transformers and the training code already imported.

    WARM_PYTHON tests/forked_torchrun.py --nproc_per_node 2 SCRIPT.py ARGS...

Each process gets the environment torchrun gives it (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), runs SCRIPT as ``__main__`` and joins a real gloo process group, as under
torchrun; the exit status is non-zero when any process failed. What it saves is the seconds each new
Python spends on imports. torchrun's launcher itself runs in test_extraction.py.
"""
from __future__ import annotations

import argparse
import os
import runpy
import socket
import sys
import traceback


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


def launch(world: int, script: str, argv: list[str]) -> int:
    """SCRIPT in ``world`` forked processes, as torchrun's environment places each."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pids = []
    for rank in range(world):
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                              LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            code = run_script(script, argv)
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    return 1 if any(codes) else 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nproc_per_node", type=int, default=2)
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    return launch(args.nproc_per_node, args.script, args.args)


if __name__ == "__main__":
    sys.exit(main())
