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
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from pypeft.layer import PerThread
from pypeft.methods.prompt.layer import PromptAdapters
from pypeft.models import task_type


class _Calls(PerThread):
    """Per thread: one frame per top-level call in flight (the rows' last real
    token positions for the backbone hook, or None)."""

    def __init__(self):
        self.frames: list = []


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


def _ones_in_front(mask: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"pypeft prompt tuning: argument 'attention_mask': expected a 2D [batch, length] mask, "
                         f"got {shape}")
    return torch.cat((mask.new_ones(mask.shape[0], n), mask), dim=1)


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
        frames = self.calls.frames
        frames.append(None)  # popped by after() (always called), whatever happens below
        name = self.adapters.running()
        if name is None:
            return None
        call = _bind(self.signature, args, kwargs)
        if self.encoder_decoder:
            call = self._seq2seq(call, name)
        else:
            call, frames[-1] = self._decoder(call, name)
        return (), call

    def after(self, module, args, output):
        if self.calls.frames:
            self.calls.frames.pop()
        return None

    def backbone_output(self, module, args, output):
        frames = self.calls.frames
        last = frames[-1] if frames else None
        if last is None:
            return None
        frames[-1] = None  # once per call
        hidden = _hidden_of(output)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        picked = hidden[rows, last.to(hidden.device)].unsqueeze(1)
        return _with_hidden(output, torch.cat((hidden[:, :-1], picked), dim=1))

    def before_encoder(self, module, args, kwargs):
        if self.calls.frames:  # inside the model's own call: before() put the prompts in already
            return None
        name = self.adapters.running()
        if name is None:
            return None
        return (), self._encoder_inputs(_bind(self.encoder_signature, args, kwargs), name)

    # --- rewriting ----------------------------------------------------------------------------
    def _prompted(self, call: dict, name: str, rows: slice) -> tuple[torch.Tensor, int]:
        """inputs_embeds with the prompts in front; (embeds, batch)."""
        ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
        if embeds is None:
            if ids is None:
                raise ValueError("pypeft prompt tuning: the model was called with neither input_ids nor inputs_embeds")
            embeds = self.model.get_input_embeddings()(ids)
        batch = embeds.shape[0]
        prompts = self.adapters.prompts(name)[rows].to(embeds.dtype)
        return torch.cat((prompts.unsqueeze(0).expand(batch, -1, -1), embeds), dim=1), batch

    def _encoder_inputs(self, call: dict, name: str) -> dict:
        n = self.adapters.specs[name].num_virtual_tokens
        call["inputs_embeds"], _ = self._prompted(call, name, slice(0, n))
        call["input_ids"] = None
        if call.get("attention_mask") is not None:
            call["attention_mask"] = _ones_in_front(call["attention_mask"], n)
        return call

    def _seq2seq(self, call: dict, name: str) -> dict:
        n = self.adapters.specs[name].num_virtual_tokens
        encoded = call.get("encoder_outputs")
        if encoded is None:
            return self._encoder_inputs(call, name)
        # generate(): the encoder ran on its own (before_encoder put the prompts in); its mask follows.
        mask = call.get("attention_mask")
        length = _hidden_of(encoded).shape[1]
        if mask is not None and mask.dim() == 2 and mask.shape[1] + n == length:
            call["attention_mask"] = _ones_in_front(mask, n)
        return call

    def _decoder(self, call: dict, name: str):
        n = self.adapters.specs[name].num_virtual_tokens
        cache = call.get("cache", call.get("past_key_values"))
        mask = call.get("attention_mask")
        last = None
        if _cached_length(cache) == 0:
            ids = call.get("input_ids")
            call["inputs_embeds"], batch = self._prompted(call, name, slice(0, n))
            if "input_ids" in call or "input_ids" in self.signature.parameters:
                call["input_ids"] = None
            length = call["inputs_embeds"].shape[1]
            if mask is not None:
                call["attention_mask"] = _ones_in_front(mask, n)
            labels = call.get("labels")
            if labels is not None and self.task == "CAUSAL_LM" and labels.dim() == 2:
                call["labels"] = torch.cat((labels.new_full((labels.shape[0], n), -100), labels), dim=1)
            types = call.get("token_type_ids")
            if types is not None:
                call["token_type_ids"] = torch.cat((types.new_zeros(types.shape[0], n), types), dim=1)
            if call.get("cache_position") is not None:
                call["cache_position"] = torch.arange(length, device=call["cache_position"].device)
            self._positions(call, n, length, prefill=True)
            if self.last_token_head:
                last = self._last_tokens(call, ids, n, length)
        else:
            current = call.get("input_ids") if call.get("input_ids") is not None else call.get("inputs_embeds")
            if current is None:
                raise ValueError("pypeft prompt tuning: the model was called with neither input_ids nor inputs_embeds")
            if mask is not None:
                call["attention_mask"] = _ones_in_front(mask, n)
            if call.get("cache_position") is not None:
                call["cache_position"] = call["cache_position"] + n
            self._positions(call, n, current.shape[1], prefill=False)
        return call, last

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
