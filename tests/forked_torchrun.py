"""torchrun's launch of tests/torchrun_worker.py, its processes forked from one Python that has already
imported torch, transformers and the training code.

Each process gets the environment torchrun gives it (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) and joins a real gloo process group, as under torchrun; what it saves is the
seconds a new Python spends importing. The torchrun launcher itself runs in test_extraction.py and in
the GPU check's rehearsal (test_gpu_check.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

SERVER = r"""
import json, os, socket, sys, traceback
import torchrun_worker

def run_rank(env, argv):
    os.environ.update(env)
    sys.argv = ["torchrun_worker.py", *argv]
    try:
        torchrun_worker.main()
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1

for line in sys.stdin:
    launch = json.loads(line)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world, pids = launch["processes"], []
    for rank in range(world):
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            for fd, name in ((1, "out"), (2, "err")):
                os.dup2(os.open(f"{launch['logs']}/rank{rank}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            env = {**launch["env"], "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                   "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            code = run_rank(env, launch["argv"])
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
        pids.append(pid)
    print(json.dumps([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]), flush=True)
"""


class ForkedTorchrun:
    """``launch(*flags, env=...)`` runs like ``torchrun --nproc_per_node 2 tests/torchrun_worker.py FLAGS``
    and returns what subprocess.run would: returncode (non-zero when any process failed), and the
    processes' stdout and stderr, one after the other."""

    def __init__(self, logs: Path, processes: int = 2):
        self.logs, self.processes, self.count = logs, processes, 0
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
        self.server = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, env=env)

    def launch(self, *flags: str, env: dict[str, str] | None = None) -> SimpleNamespace:
        self.count += 1
        logs = self.logs / f"launch{self.count}"
        logs.mkdir(parents=True)
        self.server.stdin.write(json.dumps({"processes": self.processes, "argv": [str(f) for f in flags],
                                            "env": env or {}, "logs": str(logs)}) + "\n")
        self.server.stdin.flush()
        reply = self.server.stdout.readline()
        assert reply, "the forking process died"
        codes = json.loads(reply)
        read = lambda kind: "".join((logs / f"rank{r}.{kind}").read_text() for r in range(self.processes))  # noqa: E731
        return SimpleNamespace(returncode=max(codes, key=abs), stdout=read("out"), stderr=read("err"))

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)
