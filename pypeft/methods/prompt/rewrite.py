"""How a model's call changes while a prompt / P-tuning adapter runs: hooks
on the model (no wrapper), added by attach() and removed by detach().

A forward pre-hook (with kwargs; positional arguments bound by the model's
forward signature) on the top-level transformers model rewrites the call as
peft's PeftModelFor*.forward does, and better where peft drops things:

- input_ids -> inputs_embeds through the model's input embedding, the
  prompts in front; attention_mask gets ones in front; labels (causal LM)
  -100 in front; token_type_ids zeros in front (peft drops them for causal
  LMs with a warning: kept here).
- position_ids (peft drops them with a warning): where the forward takes
  them, computed from the extended attention mask (cumsum - 1, plus the
  family's offset: RoBERTa counts from padding_idx + 1). Equal to peft's at
  the real tokens of unpadded and right-padded rows, and right for left
  padding, where peft's arange shifts every real token.
- Causal-LM generation with a KV cache: on the step whose cache is empty the
  prompts go in front; on later steps (the cache holds prompts + tokens) the
  2D mask gets num_virtual_tokens ones in front, position_ids come from that
  mask and a given cache_position moves by num_virtual_tokens. (transformers
  5.x passes `cache`, a 2D mask and position_ids each step; peft 0.21's
  prepare_inputs_for_generation looks for `past_key_values` and inserts the
  prompts again on every step there, so its generate diverges after the first
  new token.)
- Sequence classifiers that pool the last non-pad token of input_ids
  (Llama/GPT-2/Mistral/Qwen2/OPT *ForSequenceClassification): given
  inputs_embeds, transformers reads the last position, a pad token's under
  right padding (peft's bug). A forward hook on the backbone puts each row's
  last real token's hidden state (by the attention mask) at the position the
  head reads.
- Encoder-decoders (T5): peft's num_transformer_submodules = 2, of which its
  forward uses the first num_virtual_tokens rows, in front of the encoder's
  input; the decoder's inputs, mask and labels stay as they are (peft's).
  generate() runs the encoder directly: a pre-hook on the encoder puts the
  prompts in front there, and the decoding steps' attention_mask (the
  cross-attention's) gets its ones when the encoder output is longer by
  num_virtual_tokens.

Every row may have its own adapter (pypeft.mixed_batch; rows of other
methods' adapters and "base" rows have none), with its own number of
virtual tokens: each call gets M = the largest count of virtual slots, and a
row with fewer fills the rest with masked pad slots (zeros); positions come
from the mask, so each row computes what it computes alone. Where the pad
slots go depends on what the model reads: in front of the row's prompts for
causal LMs and last-token classifiers (generate and the head read the end;
the row is then left-padded), after the row's tokens for bidirectional
encoders and T5's encoder (BERT's pooler, RoBERTa's and DistilBERT's heads
read position 0, the first prompt as in peft; T5's positions are relative).
pypeft.prompt_ensemble (ensemble.py) replicates each input once per adapter
through the same per-row machinery.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from pypeft.layer import PerThread
from pypeft.methods.prompt import ensemble
from pypeft.methods.prompt.layer import PromptAdapters
from pypeft.models import task_type


class _Frame:
    """One top-level call in flight."""

    def __init__(self):
        self.last = None      # the rows' last real token positions, for the backbone hook (None: nothing to do)
        self.ensemble = None  # (names, reduce, batch, mixed rows before) while a prompt ensemble runs


class _Calls(PerThread):
    """Per thread: a frame per top-level call in flight, and the prompt
    ensemble (names, reduce) the calls run, if any (pypeft.prompt_ensemble)."""

    def __init__(self):
        self.frames: list[_Frame] = []
        self.ensemble: tuple[list[str], str] | None = None


def _bind(signature: inspect.Signature, args, kwargs) -> dict:
    """The call's arguments by name (extra keyword arguments flattened)."""
    bound = signature.bind_partial(*args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError("pypeft prompt tuning: extra positional arguments to the model's forward")
        else:
            out[name] = value
    return out


def _cached_length(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


def _position_offset(model: nn.Module) -> int:
    """Where the family's positions start: RoBERTa-like embeddings count from
    padding_idx + 1 (transformers' create_position_ids_from_inputs_embeds)."""
    for module in model.modules():
        if hasattr(type(module), "create_position_ids_from_inputs_embeds") and hasattr(module, "padding_idx"):
            return int(module.padding_idx) + 1
    return 0


def _hidden_of(output):
    if isinstance(output, torch.Tensor):
        return output
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def _with_hidden(output, hidden):
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    output.last_hidden_state = hidden  # a ModelOutput: sets the field and its dict entry
    return output


def _in_front(mask: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"pypeft prompt tuning: argument 'attention_mask': expected a 2D [batch, length] mask, "
                         f"got {shape}")
    return torch.cat((slots.to(mask.dtype), mask), dim=1)


class CallRewriter:
    def __init__(self, model: nn.Module, adapters: PromptAdapters):
        self.model, self.adapters = model, adapters
        config = getattr(model, "config", None)
        self.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        self.task = task_type(model)
        self.signature = inspect.signature(model.forward)
        self.accepts_position_ids = "position_ids" in self.signature.parameters
        self.position_offset = _position_offset(model)
        self.calls = _Calls()
        self.handles = [model.register_forward_pre_hook(self.before, with_kwargs=True),
                        model.register_forward_hook(self.after, always_call=True)]
        self.last_token_head = (self.task == "SEQ_CLS" and not self.encoder_decoder
                                and isinstance(getattr(model, "score", None), nn.Module))
        # Where a row's pad slots go when rows have fewer virtual tokens than others (mixed batches):
        # in front of its prompts where the end is read (causal LMs: generate; last-token heads), after
        # its tokens where position 0 is (BERT-like heads; T5's encoder, whose positions are relative).
        self.front = not self.encoder_decoder and (self.task == "CAUSAL_LM" or self.last_token_head)
        if self.last_token_head:
            backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
            if not isinstance(backbone, nn.Module):
                raise ValueError(f"pypeft prompt tuning: argument 'model': {type(model).__name__} has a 'score' head "
                                 "but no backbone module named by its base_model_prefix")
            self.handles.append(backbone.register_forward_hook(self.backbone_output))
        if self.encoder_decoder:
            encoder = model.get_encoder()
            self.encoder_signature = inspect.signature(encoder.forward)
            self.handles.append(encoder.register_forward_pre_hook(self.before_encoder, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    # --- the hooks ----------------------------------------------------------------------------
    def before(self, module, args, kwargs):
        frame = _Frame()
        self.calls.frames.append(frame)  # popped by after() (always called), whatever happens below
        if self.calls.ensemble is None and not self.adapters.may_run():
            return None  # the call as it came (another method's adapter, the base)
        call = _bind(self.signature, args, kwargs)
        if self.calls.ensemble is not None and not self.adapters.is_disabled():
            call = ensemble.replicate(self, call, frame)
        names = self._rows(call)
        if names is None:
            return None
        if self.encoder_decoder:
            call = self._seq2seq(call, names)
        else:
            call, frame.last = self._decoder(call, names)
        return (), call

    def after(self, module, args, output):
        frame = self.calls.frames.pop() if self.calls.frames else None
        if frame is not None and frame.ensemble is not None:
            return ensemble.combine(self, frame, output)
        return None

    def backbone_output(self, module, args, output):
        frames = self.calls.frames
        last = frames[-1].last if frames else None
        if last is None:
            return None
        frames[-1].last = None  # once per call
        hidden = _hidden_of(output)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        picked = hidden[rows, last.to(hidden.device)].unsqueeze(1)
        return _with_hidden(output, torch.cat((hidden[:, :-1], picked), dim=1))

    def before_encoder(self, module, args, kwargs):
        if self.calls.frames or not self.adapters.may_run():  # inside the model's own call: done in before()
            return None
        call = _bind(self.encoder_signature, args, kwargs)
        names = self._rows(call)
        if names is None:
            return None
        return (), self._encoder_inputs(call, names)

    # --- the virtual slots ----------------------------------------------------------------------
    def _rows(self, call: dict) -> list[str | None] | None:
        for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
            value = call.get(key)
            if isinstance(value, torch.Tensor):
                return self.adapters.row_adapters(value.shape[0])
        if call.get("encoder_outputs") is not None:
            return self.adapters.row_adapters(_hidden_of(call["encoder_outputs"]).shape[0])
        return None

    def _counts(self, names: list[str | None]) -> tuple[list[int], int]:
        counts = [0 if n is None else self.adapters.specs[n].num_virtual_tokens for n in names]
        return counts, max(counts)

    @staticmethod
    def _slot_mask(counts: list[int], width: int, front: bool, like: torch.Tensor) -> torch.Tensor:
        """[batch, width]: 1 on a row's prompt slots, 0 on its pad slots (in front of them or after)."""
        j = torch.arange(width, device=like.device)
        n = torch.tensor(counts, device=like.device).unsqueeze(1)
        slots = j >= width - n if front else j < n
        return slots.to(like.dtype)

    def _slot_embeds(self, names, counts, width: int, front: bool, like: torch.Tensor) -> torch.Tensor:
        """[batch, width, dim]: each row's adapter's prompts, zeros on its pad slots."""
        prompts = {n: self.adapters.prompts(n) for n in dict.fromkeys(names) if n is not None}
        rows = []
        for name, n in zip(names, counts):
            p = prompts[name][:n].to(like.dtype) if name is not None else like.new_zeros(0, like.shape[-1])
            pad = like.new_zeros(width - n, like.shape[-1])
            rows.append(torch.cat((pad, p) if front else (p, pad)))
        if len(prompts) == 1 and all(c == width for c in counts):  # one adapter: one tensor, expanded
            return rows[0].unsqueeze(0).expand(len(rows), -1, -1)
        return torch.stack(rows)

    @staticmethod
    def _pads_last(counts: list[int], width: int, length: int, device) -> torch.Tensor | None:
        """For the layout with pad slots at the end: per row, the order that moves the pad slots
        of [prompts, pads, tokens] behind the tokens (None: there are none)."""
        if all(c == width for c in counts):
            return None
        order = [torch.cat((torch.arange(n), torch.arange(width, width + length), torch.arange(n, width)))
                 for n in counts]
        return torch.stack(order).to(device)

    @staticmethod
    def _reorder(t: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
        if order is None:
            return t
        index = order.view(*order.shape, *([1] * (t.dim() - 2))).expand_as(t)
        return t.gather(1, index)

    def _embeds(self, call: dict) -> torch.Tensor:
        ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
        if embeds is None:
            if ids is None:
                raise ValueError("pypeft prompt tuning: the model was called with neither input_ids nor inputs_embeds")
            embeds = self.model.get_input_embeddings()(ids)
        return embeds

    # --- rewriting ----------------------------------------------------------------------------
    def _encoder_inputs(self, call: dict, names) -> dict:
        """Bidirectional encoders (and T5's): [prompts; tokens] with a row's pad slots at the end, so
        that position 0 (what BERT's pooler and DistilBERT / RoBERTa heads read) is its first prompt."""
        counts, width = self._counts(names)
        x = self._embeds(call)
        batch, length = x.shape[:2]
        order = self._pads_last(counts, width, length, x.device)
        call["inputs_embeds"] = self._reorder(torch.cat((self._slot_embeds(names, counts, width, False, x), x), 1),
                                              order)
        call["input_ids"] = None
        mask = call.get("attention_mask")
        if mask is not None or order is not None:
            mask = mask if mask is not None else torch.ones(batch, length, dtype=torch.long, device=x.device)
            call["attention_mask"] = self._reorder(_in_front(mask, self._slot_mask(counts, width, False, mask)), order)
        types = call.get("token_type_ids")
        if types is not None:
            call["token_type_ids"] = self._reorder(torch.cat((types.new_zeros(batch, width), types), 1), order)
        self._positions(call, width, width + length, prefill=True)
        return call

    def _seq2seq(self, call: dict, names) -> dict:
        encoded = call.get("encoder_outputs")
        if encoded is None:
            return self._encoder_inputs(call, names)
        # generate(): the encoder ran on its own (before_encoder put the prompts in); its mask follows.
        counts, width = self._counts(names)
        mask = call.get("attention_mask")
        length = _hidden_of(encoded).shape[1]
        if mask is not None and mask.dim() == 2 and mask.shape[1] + width == length:
            order = self._pads_last(counts, width, mask.shape[1], mask.device)
            call["attention_mask"] = self._reorder(_in_front(mask, self._slot_mask(counts, width, False, mask)), order)
        return call

    def _decoder(self, call: dict, names):
        if not self.front:
            return self._encoder_inputs(call, names), None
        counts, width = self._counts(names)
        full = all(c == width for c in counts)
        cache = call.get("cache", call.get("past_key_values"))
        mask = call.get("attention_mask")
        past = _cached_length(cache)
        if past == 0:
            ids = call.get("input_ids")
            x = self._embeds(call)
            batch, length = x.shape[:2]
            call["inputs_embeds"] = torch.cat((self._slot_embeds(names, counts, width, True, x), x), dim=1)
            if "input_ids" in call or "input_ids" in self.signature.parameters:
                call["input_ids"] = None
            if mask is None and not full:
                mask = torch.ones(batch, length, dtype=torch.long, device=x.device)
            if mask is not None:
                call["attention_mask"] = _in_front(mask, self._slot_mask(counts, width, True, mask))
            labels = call.get("labels")
            if labels is not None and self.task == "CAUSAL_LM" and labels.dim() == 2:
                call["labels"] = torch.cat((labels.new_full((labels.shape[0], width), -100), labels), dim=1)
            types = call.get("token_type_ids")
            if types is not None:
                call["token_type_ids"] = torch.cat((types.new_zeros(types.shape[0], width), types), dim=1)
            total = width + length
            if call.get("cache_position") is not None:
                call["cache_position"] = torch.arange(total, device=call["cache_position"].device)
            self._positions(call, width, total, prefill=True)
            last = self._last_tokens(call, ids, width, total) if self.last_token_head else None
            return call, last
        current = call.get("input_ids") if call.get("input_ids") is not None else call.get("inputs_embeds")
        if current is None:
            raise ValueError("pypeft prompt tuning: the model was called with neither input_ids nor inputs_embeds")
        if mask is None and not full:  # the cache holds width slots and past - width tokens
            mask = torch.ones(current.shape[0], past - width + current.shape[1], dtype=torch.long,
                              device=current.device)
        if mask is not None:
            call["attention_mask"] = _in_front(mask, self._slot_mask(counts, width, True, mask))
        if call.get("cache_position") is not None:
            call["cache_position"] = call["cache_position"] + width
        self._positions(call, width, current.shape[1], prefill=False)
        return call, None

    def _positions(self, call: dict, n: int, length: int, prefill: bool) -> None:
        if not self.accepts_position_ids:
            return
        mask = call.get("attention_mask")
        given = call.get("position_ids")
        if mask is not None:
            positions = mask.long().cumsum(-1) - 1
            positions = positions.masked_fill(mask == 0, 0) + self.position_offset
            call["position_ids"] = positions[:, -length:]
        elif given is not None:  # no mask: the caller's positions, moved past the prompts
            if prefill:
                front = torch.arange(n, device=given.device, dtype=given.dtype) + self.position_offset
                front = front.expand(*given.shape[:-1], n)
                call["position_ids"] = torch.cat((front, given + n), dim=-1)
            else:
                call["position_ids"] = given + n

    def _last_tokens(self, call: dict, ids, n: int, length: int):
        """Each row's last real token position (the one the head must read), or None: the last one."""
        mask = call.get("attention_mask")
        if mask is not None:
            real = mask != 0
        else:
            pad = getattr(getattr(self.model, "config", None), "pad_token_id", None)
            if ids is None or pad is None:
                return None
            real = torch.cat((torch.ones_like(ids[:, :1], dtype=torch.bool).expand(-1, n), ids != pad), dim=1)
        positions = torch.arange(length, device=real.device)
        return (positions * real).argmax(-1)
