"""tests/distributed_helpers.run_ranks itself: results per rank in rank
order, a worker's exception fails the caller with its traceback, and a hung
worker is killed at the timeout."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessRaisedException

import distributed_helpers as D


def all_reduce_worker(rank, world, tmp_path):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": rank, "world": world, "sum": t}


def raising_worker(rank, world, tmp_path):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def hanging_worker(rank, world, tmp_path):
    (tmp_path / f"pid{rank}").write_text(str(os.getpid()))
    time.sleep(600)


@pytest.mark.slow
def test_run_ranks_returns_each_ranks_result_in_order(tmp_path):
    results = D.run_ranks(all_reduce_worker, tmp_path, timeout=60)
    assert [r["rank"] for r in results] == [0, 1] and all(r["world"] == 2 for r in results)
    assert all(r["sum"].item() == 3.0 for r in results)


@pytest.mark.slow
def test_run_ranks_fails_with_the_workers_traceback(tmp_path):
    with pytest.raises(ProcessRaisedException, match=r"(?s)Traceback.*raising_worker.*ValueError: boom on rank 1"):
        D.run_ranks(raising_worker, tmp_path, timeout=60)


@pytest.mark.slow
def test_run_ranks_kills_workers_past_the_timeout(tmp_path):
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="hanging_worker did not finish within 15 s"):
        D.run_ranks(hanging_worker, tmp_path, timeout=15)
    assert time.monotonic() - start < 40
    for rank in range(D.WORLD):  # killed and reaped: the pid is gone
        with pytest.raises(ProcessLookupError):
            os.kill(int((tmp_path / f"pid{rank}").read_text()), 0)
