"""FSDP2 (torch.distributed.fsdp.fully_shard over each transformer layer and
the root) over a patched model, 2 processes over gloo on 127.0.0.1: frozen
base and trainable adapters share each group. For every method, the full
gradients (gathered from the DTensor grads) equal one process's over the
union batch, on the tiny BERT classifier and on a tiny Llama causal LM and
T5 with their own LM losses (every method each family supports,
D.FAMILY_CASES; one spawn per family). pypeft.distributed.save_adapter
gathers the adapter and rank 0 writes it in peft's format (peft loads it to
the same model; for Llama and T5 too: LoRA, and Llama's prompt tuning); plain
pypeft.save_adapter on a sharded model says to use it; a sharded model loads
an adapter, and a loaded model shards, to the same outputs.

NF4 (QLoRA): the frozen uint8 codes are sharded with the float adapters in
one group. FSDP2 needs one dtype only among a group's *trainable*
parameters (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py,
_init_mp_dtypes: "FSDP expects uniform original parameter dtype"); frozen
ones of other dtypes are all-gathered as bytes (_fsdp_collectives.py,
foreach_all_gather: a uint8 all-gather when dtypes differ). So QLoRA shards
as it is, which the nf4+lora case checks (its codes are DTensors on each rank),
and its adapter saved from the sharded model loads over a fresh NF4 base.
"""

from __future__ import annotations

import functools
import traceback

import pytest
import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import distributed_helpers as D
import tiny_models


def layers(model, family: str) -> list:
    """The transformer layers each family's users shard one by one."""
    if family == "t5":
        return [*model.encoder.block, *model.decoder.block]
    return list(model.model.layers if family == "llama" else model.bert.encoder.layer)


def shard(model, family: str = D.FAMILY):
    for layer in layers(model, family):
        fully_shard(layer)
    fully_shard(model)
    return model


def _fsdp_step(family: str, case: str, rank: int) -> dict:
    model = shard(D.build(case, family=family), family)
    model(**D.rank_batch(rank, family)).loss.backward()
    sharded = {n: (p.dtype, tuple(p.to_local().shape), tuple(p.shape)) for n, p in model.named_parameters()
               if isinstance(p, DTensor)}
    return {"grads": {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad},
            "sharded": sharded}


def _save_and_load(rank: int, tmp_path) -> dict:
    import pypeft

    out = {}
    model = shard(D.build("lora"))
    try:
        pypeft.save_adapter(model, tmp_path / "unused")
    except ValueError as e:
        out["plain_save_error"] = str(e)
    pypeft.distributed.save_adapter(model, tmp_path / "lora")  # every rank; rank 0 writes
    fresh = pypeft.load_adapter(D.no_dropout(tiny_models.make(D.FAMILY, seed=0)), tmp_path / "lora")
    out["loaded"] = tiny_models.output(fresh.eval(), D.union_batch())
    then_sharded = pypeft.load_adapter(D.no_dropout(tiny_models.make(D.FAMILY, seed=0)), tmp_path / "lora")
    out["loaded_then_sharded"] = tiny_models.output(shard(then_sharded).eval(), D.union_batch())
    sharded = shard(D.build("lora", randomise_seed=9))  # another adapter, sharded, loads the saved one
    pypeft.load_adapter(sharded, tmp_path / "lora", adapter_name="loaded")
    pypeft.set_adapter(sharded, "loaded")
    out["sharded_loads"] = tiny_models.output(sharded.eval(), D.union_batch())
    qlora = shard(D.build("nf4+lora"))  # QLoRA: the sharded uint8 codes stay out of the adapter
    pypeft.distributed.save_adapter(qlora, tmp_path / "qlora")
    base = D.no_dropout(tiny_models.make(D.FAMILY, seed=0))
    pypeft.load_adapter(pypeft.quantize(base), tmp_path / "qlora")
    out["qlora_loaded"] = tiny_models.output(base.eval(), D.union_batch())
    return out


# Adapters of the LM families saved from the sharded model (peft loads them: test below).
LM_SAVED = {"llama": ["lora", "prompt_tuning"], "t5": ["lora"]}


def _save_lm(rank: int, tmp_path, family: str) -> dict:
    """Each LM_SAVED case: sharded, saved with pypeft.distributed.save_adapter
    (rank 0 writes), loaded by pypeft on every rank into a fresh base."""
    import pypeft

    out = {}
    for case in LM_SAVED[family]:
        model = shard(D.build(case, family=family), family)
        pypeft.distributed.save_adapter(model, tmp_path / case)
        fresh = pypeft.load_adapter(D.no_dropout(tiny_models.make(family, seed=0)), tmp_path / case)
        out[case] = tiny_models.output(fresh.eval(), D.union_batch(family))
    return out


def fsdp_worker(rank, world, tmp_path, family, cases):
    out = D.run_cases(cases, functools.partial(_fsdp_step, family), rank)
    try:
        out["save_and_load"] = (_save_and_load(rank, tmp_path) if family == D.FAMILY
                                else _save_lm(rank, tmp_path, family))
    except Exception:
        out["save_and_load"] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """family -> (directory, each rank's results), one spawn per family, on first use."""
    runs = {}

    def results(family: str) -> tuple:
        if family not in runs:
            directory = tmp_path_factory.mktemp(f"fsdp2_{family}")
            runs[family] = directory, D.run_ranks(fsdp_worker, directory, family, list(D.FAMILY_CASES[family]),
                                                  timeout=300)
        return runs[family]
    return results


@pytest.fixture(scope="module")
def fsdp_results(fsdp_runs):
    return fsdp_runs(D.FAMILY)


@pytest.mark.parametrize("family, case", D.FAMILY_CASE_PARAMS)
def test_fsdp2_gradients_equal_one_process_over_the_union_batch(fsdp_runs, family, case):
    _, results = fsdp_runs(family)
    expected = D.reference_grads(case, family)
    assert expected and any(g.abs().sum() > 0 for g in expected.values())
    for rank, result in enumerate(results):
        got = result[case]
        assert not isinstance(got, str), f"rank {rank}:\n{got}"
        assert got["sharded"], f"rank {rank}: no parameter was sharded"
        assert sorted(got["grads"]) == sorted(expected), f"rank {rank}"
        for name, grad in expected.items():
            torch.testing.assert_close(got["grads"][name], grad, **D.TOL, msg=f"rank {rank}: {name}")


@pytest.mark.slow
def test_fsdp2_shards_nf4_codes_beside_float_adapters(fsdp_results):
    _, results = fsdp_results
    for rank, result in enumerate(results):
        sharded = result["nf4+lora"]["sharded"]
        codes = {n: v for n, v in sharded.items() if v[0] == torch.uint8}
        assert codes, f"rank {rank}: no uint8 parameter was sharded"
        for name, (_, local, full) in codes.items():
            assert local[0] * D.WORLD == full[0] and local[1:] == full[1:], (name, local, full)
        assert any(v[0] == torch.float32 and n.split(".")[:5] == next(iter(codes)).split(".")[:5]
                   for n, v in sharded.items()), "codes and float parameters share a layer's group"


@pytest.fixture(scope="module")
def saved(fsdp_results):
    directory, results = fsdp_results
    for rank, result in enumerate(results):
        assert not isinstance(result["save_and_load"], str), f"rank {rank}:\n{result['save_and_load']}"
    return directory, [r["save_and_load"] for r in results]


@pytest.mark.slow
def test_fsdp2_adapter_saved_from_rank_0_in_peft_format(saved):
    import peft

    directory, results = saved
    expected = tiny_models.output(D.build("lora").eval(), D.union_batch())
    theirs = peft.PeftModel.from_pretrained(D.no_dropout(tiny_models.make(D.FAMILY, seed=0)), directory / "lora")
    torch.testing.assert_close(tiny_models.output(theirs.eval(), D.union_batch()), expected, **D.TOL)
    for rank, result in enumerate(results):
        for what in ("loaded", "loaded_then_sharded", "sharded_loads"):
            torch.testing.assert_close(result[what], expected, **D.TOL, msg=f"rank {rank}: {what}")


@pytest.mark.slow
@pytest.mark.parametrize("family, case", [(f, c) for f, cases in LM_SAVED.items() for c in cases])
def test_fsdp2_lm_adapter_saved_from_rank_0_loads_in_peft_alike(fsdp_runs, family, case):
    import peft

    directory, results = fsdp_runs(family)
    batch = D.union_batch(family)
    expected = tiny_models.output(D.build(case, family=family).eval(), batch)
    theirs = peft.PeftModel.from_pretrained(D.no_dropout(tiny_models.make(family, seed=0)), directory / case)
    if case == "prompt_tuning":  # a padded position's logits differ from peft's by design (README): real ones only
        n = expected.shape[1] - batch["input_ids"].shape[1]
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(tiny_models.output(theirs.eval(), batch)[:, n:][real], expected[:, n:][real],
                                   **D.TOL)
    else:
        torch.testing.assert_close(tiny_models.output(theirs.eval(), batch), expected, **D.TOL)
    untrained = tiny_models.output(D.build(case, family=family, randomise_seed=9).eval(), batch)
    assert not torch.allclose(untrained, expected, **D.TOL)  # another adapter's logits differ: the check can fail
    for rank, result in enumerate(results):
        assert not isinstance(result["save_and_load"], str), f"rank {rank}:\n{result['save_and_load']}"
        torch.testing.assert_close(result["save_and_load"][case], expected, **D.TOL, msg=f"rank {rank}")


@pytest.mark.slow
def test_fsdp2_qlora_adapter_saved_from_rank_0_loads_over_nf4(saved):
    import pypeft

    directory, results = saved
    expected = tiny_models.output(D.build("nf4+lora").eval(), D.union_batch())
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["qlora_loaded"], expected, **D.TOL, msg=f"rank {rank}")
    unquantised = pypeft.load_adapter(D.no_dropout(tiny_models.make(D.FAMILY, seed=0)), directory / "qlora")
    assert not torch.allclose(tiny_models.output(unquantised.eval(), D.union_batch()), expected, **D.TOL)


@pytest.mark.slow
def test_plain_save_adapter_of_a_sharded_model_names_the_distributed_helper(saved):
    _, results = saved
    for result in results:
        assert "is sharded (a DTensor" in result["plain_save_error"]
        assert "pypeft.distributed.save_adapter(model, directory) on every rank" in result["plain_save_error"]
