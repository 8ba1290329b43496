"""One process, no spawn (the default run): what the DDP / FSDP2 tests on the
Llama and T5 families (tests/test_ddp.py, tests/test_fsdp2.py) rest on.

- Their LM losses are means over label tokens; DDP averages the ranks'
  means. The two agree only when every rank holds as many label tokens, so
  for every case the union batch's loss must be the mean of the ranks'.
- What they leave out on T5 is refused at patch, saying why.
"""

from __future__ import annotations

import pytest
import torch

import distributed_helpers as D
import tiny_models

LM_PAIRS = [(f, c) for f, c in D.FAMILY_CASE_PAIRS if f in D.LM_FAMILIES]


@pytest.mark.parametrize("family, case", LM_PAIRS)
@torch.no_grad()
def test_lm_loss_over_the_union_batch_is_the_mean_of_the_ranks_losses(family, case):
    model = D.build(case, family=family)
    union = model(**D.union_batch(family)).loss
    ranks = torch.stack([model(**D.rank_batch(r, family)).loss for r in range(D.WORLD)])
    assert not torch.allclose(ranks[0], ranks[1])  # the ranks' rows differ: the mean is a real average
    torch.testing.assert_close(union, ranks.mean(), **D.TOL)


# (case, what the error must say)
T5_REFUSALS = {
    "tokentune": r"pypeft.patch\(method='tokentune'\): argument 'model': T5ForConditionalGeneration is an "
                 r"encoder-decoder model; TokenTune supports encoder-only and decoder-only models",
    "lora+tokentune": r"T5ForConditionalGeneration is an encoder-decoder model; TokenTune supports",
    "bottleneck": r"pypeft.patch\(method='bottleneck'\): argument 'model': T5ForConditionalGeneration has 2 stacks "
                  r"of transformer layers; bottleneck adapters support encoder-only and decoder-only models",
    "fusion": r"T5ForConditionalGeneration has 2 stacks of transformer layers",
}


@pytest.mark.parametrize("case", D.T5_REFUSED)
def test_t5_refuses_what_the_distributed_tests_leave_out_saying_why(case):
    import pypeft

    model = D.no_dropout(tiny_models.make("t5"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attention = model.config._attn_implementation
    with pytest.raises(ValueError, match=T5_REFUSALS[case]):
        for method, options in D.CASES[case]:
            pypeft.patch(model, method=method, **options)
    assert model.config._attn_implementation == attention
    state = pypeft.state_of(model)
    if case == "lora+tokentune":  # LoRA went on first; TokenTune's refusal added nothing to it
        assert list(state.adapters) == ["default"] and "tokentune" not in state.method_states
        pypeft.unpatch(model)
    else:
        assert state is None
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
