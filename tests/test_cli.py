"""The command-line entry point and its demo."""

import subprocess
import sys
from pathlib import Path

from baracuda_kernels.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_demo_small_problem(capsys):
    assert main(["demo", "--seq-len", "1024", "--heads", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for word in ("problem", "pattern", "backend", "relative error", "speedup"):
        assert word in out


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "baracuda_kernels", "--help"], capture_output=True,
                         text=True, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and "demo" in out.stdout
