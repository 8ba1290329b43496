"""`pypeft finetune --nproc N`: the job over N data-parallel processes.

    pypeft finetune --nproc 2 ...                      # one machine: pypeft starts torchrun itself
    torchrun --nproc-per-node 2 -m pypeft finetune ... # the same, started by hand
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        --nproc-per-node 8 -m pypeft finetune ...      # several machines (torchrun's rendezvous)

Each process (a rank) loads the model, patches it, wraps it in
DistributedDataParallel and trains on its share of every batch: --batch-size
is the global batch, split evenly over the ranks (it must be a multiple of
their number). The loss is normalised by the whole batch's item count (rows
or answer tokens, summed over the ranks), so the gradients are those of one
process over the whole batch however the items fall. Evaluation is shared
too (each rank scores every N-th example; the counts are summed); rank 0
prints, shows progress and saves. Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pypeft.finetune.errors import UsageError

ENV = "WORLD_SIZE"  # torchrun sets it in every process it starts
ARGV_ENV = "PYPEFT_LAUNCH_ARGV"  # the command line launch() hands its processes


def launched() -> bool:
    """Whether this process is one of torchrun's (or another launcher's that sets WORLD_SIZE)."""
    return int(os.environ.get(ENV, "1")) > 1


def launch(argv: list[str], nproc: int) -> int:
    """Run `pypeft <argv>` under torchrun with nproc processes on this machine; its exit status.

    The command line travels in the environment, not after torchrun's own
    arguments: torchrun's parser would read abbreviations of its options in
    them (--nproc, --r)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "pypeft.finetune.parallel"]
    env = dict(os.environ, **{ARGV_ENV: json.dumps(argv)})
    # torchrun would set OMP_NUM_THREADS=1 (with a warning); each rank chooses its share of the CPUs instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(command, env=env).returncode


@dataclass
class Ranks:
    """This process's place among the data-parallel ranks (world 1: no process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    comm: str = "cpu"   # where collectives' tensors live (NCCL's are on the GPU)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def join(cls, device: torch.device, nproc: int) -> "Ranks":
        """Join torchrun's process group (when launched), checking it has nproc ranks."""
        if not launched():
            return cls()
        world = int(os.environ[ENV])
        if nproc not in (1, world):
            raise UsageError(f"argument --nproc: expected {world} (the launcher's WORLD_SIZE) or 1, got {nproc}")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        comm = f"cuda:{local_rank}" if dist.get_backend() == "nccl" else "cpu"
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, comm)

    def leave(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def device(self, device: torch.device) -> torch.device:
        """cuda -> this rank's GPU (cuda:LOCAL_RANK); cpu stays."""
        if self.world > 1 and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def wrap(self, model):
        """DistributedDataParallel over the model (itself when alone)."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [model.device.index] if getattr(model, "device", torch.device("cpu")).type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def share(self, indices: list[int]) -> list[int]:
        """This rank's share of a batch (every world-th item)."""
        return indices[self.rank::self.world]

    def total(self, *values: float) -> list[float]:
        """The sums over the ranks of each value."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.comm)
        dist.all_reduce(t)
        return t.tolist()

    def gathered(self, items: list) -> list:
        """Every rank's list joined, in rank order."""
        if self.world == 1:
            return list(items)
        out = [None] * self.world
        dist.all_gather_object(out, items)
        return [x for part in out for x in part]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


if __name__ == "__main__":  # one of launch()'s processes
    from pypeft.cli import main

    sys.exit(main(json.loads(os.environ.pop(ARGV_ENV))))
