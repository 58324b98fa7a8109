"""Run snippets of code against the lalora:: ops in a worker process, so that a crash (a segfault or
an abort in a kernel) is a failing test with the snippet that caused it, not a dead test runner.

The worker reads one JSON line per case (``code``), executes it with ``torch``, ``ops``
(``torch.ops.lalora``) and ``reference`` (the reference implementation of each op) in scope, and
answers one JSON line: the value of ``result`` or the exception's type and message.
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r"""
import json, sys
import torch
import lalora_kernels
from lalora_kernels.ops import KERNELS
ops = torch.ops.lalora
reference = {name: k.torch for name, k in KERNELS.items()}
for line in sys.stdin:
    scope = {"torch": torch, "ops": ops, "reference": reference}
    try:
        exec(json.loads(line)["code"], scope)
        out = {"ok": True, "result": scope.get("result")}
    except Exception as exc:
        out = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
    print(json.dumps(out), flush=True)
"""


class Worker:
    """One worker process with ``env`` added to the environment; restarted after a crash."""

    def __init__(self, **env):
        self.env = {**os.environ, **env, "PYTHONPATH": str(Path(__file__).parents[1])}
        self.proc = None

    def _start(self):
        self.stderr = tempfile.TemporaryFile(mode="w+")      # a file, so that warnings never fill a pipe
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, env=self.env)

    def run(self, code: str) -> dict:
        """The case's answer, or ``{"crashed": returncode, "stderr": ...}`` if the worker died on it."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps({"code": code}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            self.stderr.seek(0)
            err = self.stderr.read()[-3000:]
            self.proc = None
            return {"crashed": rc, "stderr": err}
        return json.loads(line)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
