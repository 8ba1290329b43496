"""DistributedDataParallel over a patched model, 2 processes over gloo on
127.0.0.1 (tests/distributed_helpers.py): for every method, each rank's
gradients after one DDP step (find_unused_parameters=False, so a parameter
registered as trainable but unused fails, peft #899) equal one process's
over the union of the ranks' batches, on the tiny BERT classifier and on a
tiny Llama causal LM and T5 with their own LM losses (every method each
family supports, D.FAMILY_CASES). TokenTune draws each rank's selection
from seed + rank. save_adapter from rank 0 while the others wait; loading on
every rank gives the same model; mixed-adapter inference per rank.

The DDP runs of all cases of a family happen in one spawn (a module fixture,
run once per family: starting processes that import torch and transformers
is most of the cost); each case records its own traceback, so each test fails
alone.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import distributed_helpers as D
import tiny_models


def _ddp_step(family: str, case: str, rank: int) -> dict:
    import pypeft

    model = D.build(case, family=family)
    seen = []
    state = pypeft.state_of(model)
    if "tokentune" in state.method_states:  # registered after TokenTune's hook: sees its selection
        selection = state.method_states["tokentune"].selection
        model.register_forward_pre_hook(lambda *_: seen.append(selection.positions.clone()))
    ddp = DDP(model, find_unused_parameters=False)
    ddp(**D.rank_batch(rank, family)).loss.backward()
    return {"grads": D.trainable_grads(model), "selection": seen}


def ddp_worker(rank, world, tmp_path, family, cases):
    return D.run_cases(cases, functools.partial(_ddp_step, family), rank)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """family -> each rank's results of all its cases, one spawn per family, on first use."""
    runs = {}

    def results(family: str) -> list:
        if family not in runs:
            runs[family] = D.run_ranks(ddp_worker, tmp_path_factory.mktemp(f"ddp_{family}"), family,
                                       list(D.FAMILY_CASES[family]), timeout=300)
        return runs[family]
    return results


@pytest.fixture(scope="module")
def ddp_results(ddp_runs):
    return ddp_runs(D.FAMILY)


@pytest.mark.parametrize("family, case", D.FAMILY_CASE_PARAMS)
def test_ddp_gradients_equal_one_process_over_the_union_batch(ddp_runs, family, case):
    expected = D.reference_grads(case, family)
    assert expected and any(g.abs().sum() > 0 for g in expected.values())
    for rank, results in enumerate(ddp_runs(family)):
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


def lifecycle_worker(rank, world, tmp_path):
    """Inactive adapters under DDP; save on rank 0 while the others wait;
    load on every rank; mixed-adapter inference per rank."""
    import pypeft

    out = {}
    model = D.two_lora_adapters()
    ddp = DDP(model, find_unused_parameters=False)  # only "b" is trainable: "a" must not be registered
    D.sgd_step(ddp, D.rank_batch(rank))
    out["trained"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        pypeft.save_adapter(model, tmp_path / "adapter_b", adapter_name="b")
    dist.barrier()  # the others wait for the files
    fresh = pypeft.load_adapter(D.no_dropout(tiny_models.make(D.FAMILY, seed=0)), tmp_path / "adapter_b")
    out["loaded_logits"] = tiny_models.output(fresh.eval(), D.union_batch())
    model.eval()
    rows = D.MIXED_ROWS[rank * D.PER_RANK:(rank + 1) * D.PER_RANK]
    with torch.no_grad(), pypeft.mixed_batch(model, rows):
        out["mixed_logits"] = ddp(**D.rank_batch(rank)).logits
    return out


@pytest.fixture(scope="module")
def lifecycle_results(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ddp_lifecycle")
    return directory, D.run_ranks(lifecycle_worker, directory, timeout=180)


@pytest.fixture(scope="module")
def one_process_trained():
    """What the DDP step must give: one process, the union batch."""
    model = D.two_lora_adapters()
    D.sgd_step(model, D.union_batch())
    return model


@pytest.mark.slow
def test_ddp_trains_only_the_active_adapter_as_one_process(lifecycle_results, one_process_trained):
    _, results = lifecycle_results
    expected = {n: p for n, p in one_process_trained.named_parameters() if p.requires_grad}
    assert expected and all(".b." in n or n.endswith(".b") or "classifier" in n for n in expected), sorted(expected)
    for rank, got in enumerate(results):
        assert sorted(got["trained"]) == sorted(expected)
        for name, value in expected.items():
            torch.testing.assert_close(got["trained"][name], value.detach(), **D.TOL, msg=f"rank {rank}: {name}")


@pytest.mark.slow
def test_adapter_saved_on_rank_0_loads_alike_on_every_rank(lifecycle_results, one_process_trained):
    import peft
    import pypeft

    directory, results = lifecycle_results
    model = one_process_trained.eval()
    pypeft.set_adapter(model, "b")
    expected = tiny_models.output(model, D.union_batch())
    for rank, got in enumerate(results):
        torch.testing.assert_close(got["loaded_logits"], expected, **D.TOL, msg=f"rank {rank}")
    # the file is peft's format: peft loads it to the same model
    theirs = peft.PeftModel.from_pretrained(D.no_dropout(tiny_models.make(D.FAMILY, seed=0)), directory / "adapter_b")
    torch.testing.assert_close(tiny_models.output(theirs.eval(), D.union_batch()), expected, **D.TOL)


@pytest.mark.slow
def test_mixed_adapter_inference_per_rank_equals_one_process(lifecycle_results, one_process_trained):
    import pypeft

    _, results = lifecycle_results
    model = one_process_trained.eval()
    with pypeft.mixed_batch(model, D.MIXED_ROWS):
        expected = tiny_models.output(model, D.union_batch())
    got = torch.cat([r["mixed_logits"] for r in results])
    torch.testing.assert_close(got, expected, **D.TOL)


def test_lifecycle_calls_on_a_wrapped_model_name_the_wrapper():
    import pypeft

    model = pypeft.patch(tiny_models.make(D.FAMILY), method="lora", r=2)
    wrapped = torch.nn.DataParallel(model)  # CPU: it only holds the model, as DDP does
    with pytest.raises(ValueError, match=r"pypeft.save_adapter: the model is not patched \(DataParallel wraps a "
                                         r"patched model: pass its .module\)"):
        pypeft.save_adapter(wrapped, "unused")
    with pytest.raises(ValueError, match=r"call pypeft.patch first"):
        pypeft.save_adapter(tiny_models.make(D.FAMILY), "unused")
