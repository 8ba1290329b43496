import pytest
import torch

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU visible (torch.cuda.is_available() is False)")

# Devices every op test runs on; CUDA joins when a GPU is present.
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
