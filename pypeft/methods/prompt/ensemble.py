"""pypeft.prompt_ensemble(): several prompt adapters over one frozen model,
trained together and combined at inference (Lester et al. 2021, §7: "prompt
ensembling"), in one batched forward:

    with pypeft.prompt_ensemble(model, ["p1", "p2", "p3"], reduce="mean"):
        out = model(**batch)              # out.logits: the ensemble's, [batch, ...]
        out.loss.backward()               # training: every named adapter's mean loss, averaged

Inside the block, each input row is replicated once per named adapter
(row r of the batch the model runs is input r // K with adapter names[r % K],
through the mixed-batch machinery: each replica gets its adapter's prompts and
its own head copy). The model's loss is then the mean over the K replicas of
each adapter's loss, so one backward trains all K adapters (and their heads)
as K separate runs would, up to the 1/K factor. The returned logits combine
the K predictions per input:

    reduce="mean"   log of the mean of the K softmax distributions (argmax:
                    the class of highest mean probability; differentiable)
    reduce="vote"   each class's share of the K argmax votes (ties: the
                    lower class index, torch.argmax's rule)

Forwards over whole inputs only (classification, scoring): a call with a
filled cache (generate) is refused. In the block, exactly the named adapters'
parameters (prompts, heads) require grad; the flags are restored after it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

REDUCES = ("mean", "vote")


def replicate(rewriter, call: dict, frame) -> dict:
    """The call with every per-row tensor repeated K times (row r: input r // K)."""
    names, reduce = rewriter.calls.ensemble
    cache = call.get("cache", call.get("past_key_values"))
    filled = cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0
    if filled or call.get("encoder_outputs") is not None:
        raise ValueError("pypeft.prompt_ensemble: runs forwards over whole inputs (classification, scoring); "
                         "generate() and calls with a filled cache are not supported")
    first = next((call[k] for k in ("input_ids", "inputs_embeds") if isinstance(call.get(k), torch.Tensor)), None)
    if first is None:
        raise ValueError("pypeft.prompt_ensemble: the model was called with neither input_ids nor inputs_embeds")
    batch, k = first.shape[0], len(names)
    for key, value in list(call.items()):
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
            call[key] = value.repeat_interleave(k, dim=0)
    context = rewriter.adapters.forward_context
    frame.ensemble = (names, reduce, batch, context.mixed_rows)
    context.mixed_rows = names * batch
    return call


def combine(rewriter, frame, output):
    """The model's output with the K replicas' logits combined per input."""
    names, reduce, batch, before = frame.ensemble
    rewriter.adapters.forward_context.mixed_rows = before
    if output is None or getattr(output, "logits", None) is None:
        return None
    logits = output.logits
    per = logits.view(batch, len(names), *logits.shape[1:])
    if reduce == "mean":
        combined = torch.logsumexp(F.log_softmax(per.float(), dim=-1), dim=1) - math.log(len(names))
    else:
        votes = F.one_hot(per.argmax(-1), per.shape[-1]).sum(1)
        combined = votes.float() / len(names)
    output.logits = combined.to(logits.dtype)
    return output


@contextlib.contextmanager
def prompt_ensemble(model: nn.Module, names, reduce: str = "mean") -> Iterator[nn.Module]:
    """Run the model's forwards in the block as an ensemble of the prompt
    adapters `names` (see the module docstring), in this thread."""
    from pypeft.layer import pypeft_layers
    from pypeft.methods.prompt.method import record_of
    from pypeft.modules_to_save import TrainableCopies
    from pypeft.state import merged_out, require_state

    state = require_state(model, "prompt_ensemble")
    record = record_of(state)
    known = sorted(record.adapters.encoders) if record is not None else []
    if isinstance(names, str) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"pypeft.prompt_ensemble: argument 'names': expected a non-empty list of prompt adapter "
                         f"names (of {known}), got {names!r}")
    names = list(names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"pypeft.prompt_ensemble: argument 'names': {unknown[0]!r} is not a prompt or P-tuning "
                         f"adapter of the model; expected names of {known}")
    if len(set(names)) != len(names):
        raise ValueError(f"pypeft.prompt_ensemble: argument 'names': names an adapter twice: {names}")
    if reduce not in REDUCES:
        raise ValueError(f"pypeft.prompt_ensemble: argument 'reduce': expected one of {list(REDUCES)}, got {reduce!r}")
    calls = record.rewriter.calls
    if calls.ensemble is not None:
        raise ValueError("pypeft.prompt_ensemble: an ensemble is running in this thread already (blocks do not nest)")
    with merged_out(model, state):
        calls.ensemble = (names, reduce)
        try:
            for layer in pypeft_layers(model):  # the named adapters train in the block, and their heads; nothing else
                layer.activate(None)  # (rows run by the mixed-batch routing, not by the active adapter)
                held = layer.encoders if layer is record.adapters else \
                    layer.copies if isinstance(layer, TrainableCopies) else {}
                for name in names:
                    if name in held:
                        held[name].requires_grad_(True)
            yield model
        finally:
            calls.ensemble = None
            with state.lock:
                for layer in pypeft_layers(model):
                    layer.activate(state.active)
