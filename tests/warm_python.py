"""An interpreter for the recipes' ``PY`` whose commands start warm: each is a real process, forked from one
that has imported torch, transformers and the scripts' modules once.

``PY=CLIENT python SCRIPT.py ARGS`` as the recipes run it: the client (a Python started without site
packages, milliseconds) hands its argument list, working folder, environment and its stdin, stdout and
stderr to the server, which forks; the child runs the script as ``python`` would, on the client's
descriptors, and its exit status becomes the client's. A child whose client dies (a killed
reproduction) dies with it. A command that is no script (``-m ...``, ``-c ...``) runs in a fresh
interpreter. Modules read some variables once on import (HF_HUB_OFFLINE...): the server starts with
the environment the commands get.
"""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SERVER = """\
import atexit, json, os, runpy, socket, sys, threading, traceback
import peft, pycocoevalcap, torch, transformers
import clipcap.captioner, clipcap.cli.evaluate, clipcap.cli.parse_captions, clipcap.cli.parse_coco
import clipcap.cli.parse_conceptual, clipcap.cli.parse_nocaps, clipcap.cli.train, clipcap.clipscore, clipcap.evaluation
import clipcap.extraction, clipcap.text_encoder
from transformers import CLIPModel, GPT2LMHeadModel, Qwen2ForCausalLM, SiglipModel  # the tiny backbones' classes

def child(conn, fds, request):
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    if not argv or not argv[0].endswith(".py"):
        os.execv(sys.executable, [sys.executable, *argv])
    def orphaned():  # the client died: so does its command
        while conn.recv(16):
            pass
        os._exit(137)
    threading.Thread(target=orphaned, daemon=True).start()
    sys.argv, sys.path[0] = list(argv), os.path.dirname(os.path.abspath(argv[0]))
    code = 0
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:  # as python ends on it
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # then out, without tearing down torch's and transformers' modules (seconds)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)

listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
listener.bind(sys.argv[1])
listener.listen(8)
print("ready", flush=True)
while True:
    conn, _ = listener.accept()
    message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        listener.close()
        child(conn, fds, json.loads(message))
    for fd in fds:
        os.close(fd)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    try:
        conn.send(str(status if status >= 0 else 128 - status).encode())
    except OSError:
        pass
    conn.close()
"""

CLIENT = """\
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect({socket!r})
request = {{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}
socket.send_fds(s, [json.dumps(request).encode()], [0, 1, 2])
status = s.recv(16)
sys.exit(int(status) if status else 1)
"""


@contextlib.contextmanager
def warm_python(folder: Path, env: dict[str, str]):
    """Start the server in ``folder`` with ``env``; yields the client's path, to be the recipes' PY."""
    folder.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="warm")) / "socket"  # short: a socket's path has at most 107 bytes
    client = folder / "python"
    client.write_text(f"#!{sys.executable} -S\n" + CLIENT.format(socket=str(path)))
    client.chmod(0o755)
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "ready\n", "the warm interpreter did not start"
        yield str(client)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(path.parent, ignore_errors=True)
