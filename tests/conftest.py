import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU visible (torch.cuda.is_available() is False)")

# Devices every op test runs on; CUDA joins when a GPU is present.
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def pytest_terminal_summary(terminalreporter):
    # The adapters oracle's own venv (tests/adapters_oracle) is made by the tests
    # on a fresh machine: say whether it was made, in how long, or why not.
    venv = sys.modules.get("adapters_oracle.venv")
    line = venv.summary() if venv is not None else None
    if line:
        terminalreporter.write_line(line)
