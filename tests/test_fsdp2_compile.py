"""FSDP2 (fully_shard over each layer and the root) with torch.compile
(inductor, its default backend) over a patched tiny BERT classifier, 2 gloo
processes (tests/distributed_helpers.py), one spawn running every case:

  model          shard, then torch.compile(model): FSDP2's hooks are
                 dynamo-disabled by torch ("skipping FSDP hooks",
                 _fsdp_common._dynamo_disable), so the model compiles in pieces
                 between them; a patched model breaks exactly where the
                 unpatched one does (no break of pypeft's own).
  layers_before  layer.compile(fullgraph=True) on each layer, then fully_shard
                 (torchtitan's order): one graph per layer, no break.
  layers_after   fully_shard each layer, then layer.compile(fullgraph=True).

Each case's gradients (gathered from the DTensor grads) equal one process's
over the union batch (D.reference_grads, fp32 tolerance, as the eager
tests/test_fsdp2.py); then one SGD step on the sharded parameters, and the
compiled model's next loss on each rank's rows equals the reference model's
after the same step (the compiled graphs read the updated shards).

Inside FSDP2's forward a layer's parameters are the all-gathered plain
tensors (DTensors only outside it), so pypeft's ops run on plain tensors.

Cost: 13 inductor compiles of the tiny BERT (forward and backward), 154 s on
2 busy cores with inductor's on-disk caches empty (slow).
"""

from __future__ import annotations


import pytest
import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import distributed_helpers as D
import tiny_models
from test_fsdp2 import layers

RECIPES = ("model", "layers_before", "layers_after")
CASES = ("lora", "vera", "nf4+lora", "lora+tokentune")
PLAIN = "plain"  # the unpatched model: where FSDP2 itself breaks a whole-model graph
RUNS = [("model", PLAIN)] + [(recipe, case) for recipe in RECIPES for case in CASES]
LR = 0.5


def _compiled(model, recipe: str):
    """The module to call: model sharded and compiled as recipe says."""
    if recipe == "model":
        for layer in layers(model, D.FAMILY):
            fully_shard(layer)
        return torch.compile(fully_shard(model))
    for layer in layers(model, D.FAMILY):
        if recipe == "layers_before":
            layer.compile(fullgraph=True)
            fully_shard(layer)
        else:
            fully_shard(layer)
            layer.compile(fullgraph=True)
    return fully_shard(model)


def _build(case: str):
    if case == PLAIN:
        return D.no_dropout(tiny_models.make(D.FAMILY, seed=0)).train()
    return D.build(case)


def _compiled_step(run: str, rank: int) -> dict:
    from torch._dynamo.utils import counters

    recipe, case = run.split("/")
    torch._dynamo.reset()  # each run compiles afresh and counts its own graphs and breaks
    counters.clear()
    model = _build(case)
    compiled = _compiled(model, recipe)
    compiled(**D.rank_batch(rank)).loss.backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = {"grads": {n: p.grad.full_tensor() for n, p in params},
           "sharded": sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor)),
           "graphs": counters["stats"]["unique_graphs"],
           "breaks": dict(counters["graph_break"])}
    with torch.no_grad():  # plain SGD on the shards: the next forward must all-gather the updated values
        for _, p in params:
            p -= LR * p.grad
            p.grad = None
    out["next_loss"] = compiled(**D.rank_batch(rank)).loss.detach()
    return out


def compiled_worker(rank, world, tmp_path, runs):
    return D.run_cases([f"{recipe}/{case}" for recipe, case in runs], _compiled_step, rank)


@pytest.fixture(scope="module")
def compiled_results(tmp_path_factory):
    return D.run_ranks(compiled_worker, tmp_path_factory.mktemp("fsdp2_compile"), RUNS, timeout=420)


def _result(results, rank: int, recipe: str, case: str) -> dict:
    got = results[rank][f"{recipe}/{case}"]
    assert not isinstance(got, str), f"rank {rank}, {recipe}:\n{got}"
    return got


def _reference_next_losses(case: str, grads: dict) -> list[torch.Tensor]:
    """One process's model after the SGD step with the union batch's gradients: each rank's loss."""
    model = D.build(case)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p -= LR * grads[n]
    return [model(**D.rank_batch(rank)).loss.detach() for rank in range(D.WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("case", CASES)
def test_fsdp2_compiled_gradients_equal_one_process_over_the_union_batch(compiled_results, recipe, case):
    expected = D.reference_grads(case)
    assert expected and any(g.abs().sum() > 0 for g in expected.values())
    next_losses = _reference_next_losses(case, expected)
    for rank in range(D.WORLD):
        got = _result(compiled_results, rank, recipe, case)
        assert got["sharded"], f"rank {rank}: no parameter was sharded"
        assert got["graphs"] >= 1, f"rank {rank}: nothing was compiled"
        if recipe == "model":  # FSDP2's own hooks break the graph; pypeft adds no break
            plain = _result(compiled_results, rank, "model", PLAIN)["breaks"]
            assert got["breaks"] == plain, f"rank {rank}: breaks {got['breaks']}, the unpatched model's {plain}"
        else:
            assert not got["breaks"], f"rank {rank}: {got['breaks']}"
        assert sorted(got["grads"]) == sorted(expected), f"rank {rank}"
        for name, grad in expected.items():
            torch.testing.assert_close(got["grads"][name], grad, **D.TOL, msg=f"rank {rank}: {name}")
        torch.testing.assert_close(got["next_loss"], next_losses[rank], **D.TOL, msg=f"rank {rank}: next loss")


@pytest.mark.slow
def test_fsdp2_breaks_a_whole_model_compile_at_its_own_hooks(compiled_results):
    """The baseline the patched cases are held to: the unpatched model breaks, at FSDP2's hooks only."""
    for rank in range(D.WORLD):
        breaks = _result(compiled_results, rank, "model", PLAIN)["breaks"]
        assert breaks and all("function `disable`" in reason for reason in breaks), breaks
