"""DistributedDataParallel over a patched model, 2 processes over gloo on
127.0.0.1 (tests/distributed_helpers.py): for every method, each rank's
gradients after one DDP step (find_unused_parameters=False, so a parameter
registered as trainable but unused fails, peft #899) equal one process's
over the union of the ranks' batches. TokenTune draws each rank's selection
from seed + rank. save_adapter from rank 0 while the others wait; loading on
every rank gives the same model; mixed-adapter inference per rank.

The DDP runs of all cases happen in one spawn (a module fixture: starting
processes that import torch and transformers is most of the cost); each case
records its own traceback, so each test fails alone.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import distributed_helpers as D
import tiny_models


def _ddp_step(case: str, rank: int) -> dict:
    import pypeft

    model = D.build(case)
    seen = []
    state = pypeft.state_of(model)
    if "tokentune" in state.method_states:  # registered after TokenTune's hook: sees its selection
        selection = state.method_states["tokentune"].selection
        model.register_forward_pre_hook(lambda *_: seen.append(selection.positions.clone()))
    ddp = DDP(model, find_unused_parameters=False)
    ddp(**D.rank_batch(rank)).loss.backward()
    return {"grads": D.trainable_grads(model), "selection": seen}


def ddp_worker(rank, world, tmp_path, cases):
    out = {}
    for case in cases:
        try:
            out[case] = _ddp_step(case, rank)
        except Exception:  # recorded per case; a rank that stops early would hang the other's collectives
            out[case] = traceback.format_exc()
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return D.run_ranks(ddp_worker, tmp_path_factory.mktemp("ddp"), list(D.CASES), timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(D.CASES))
def test_ddp_gradients_equal_one_process_over_the_union_batch(ddp_results, case):
    expected = D.reference_grads(case)
    assert expected and any(g.abs().sum() > 0 for g in expected.values())
    for rank, results in enumerate(ddp_results):
        got = results[case]
        assert not isinstance(got, str), f"rank {rank}:\n{got}"
        assert sorted(got["grads"]) == sorted(expected), f"rank {rank}"
        for name, grad in expected.items():
            torch.testing.assert_close(got["grads"][name], grad, **D.TOL, msg=f"rank {rank}: {name}")


@pytest.mark.slow
def test_tokentune_ranks_draw_different_reproducible_selections(ddp_results):
    selections = [results["tokentune"]["selection"] for results in ddp_results]
    assert all(len(s) == 1 for s in selections)
    assert not torch.equal(selections[0][0], selections[1][0])
    for rank in range(D.WORLD):  # what one process draws from seed + rank
        model = D.build("tokentune", tokentune_seed=D.TOKENTUNE_SEED + rank)
        import pypeft
        selection = pypeft.state_of(model).method_states["tokentune"].selection
        seen = []
        model.register_forward_pre_hook(lambda *_: seen.append(selection.positions.clone()))
        model(**D.rank_batch(rank))
        torch.testing.assert_close(selections[rank][0], seen[0], rtol=0, atol=0)
