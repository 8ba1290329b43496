"""Prompt tuning's and P-tuning's place in pypeft.

Both keep one PromptRecord per model, shared (method_states holds it under
each method's name that has adapters): the PromptAdapters layer, a child
of the top-level model holding every prompt / P-tuning adapter, and the
CallRewriter's hooks. The last adapter's deletion or unpatch() removes both,
leaving the model exactly as it was. Neither merges into the base weights.
With TokenTune (either order) the CallRewriter's pre-hook runs first and
tells TokenTune's selection where the virtual slots are (pypeft.layer.
VIRTUAL_TOKENS_ATTR), which it always selects; the PromptAdapters layer is
`outside_sequence`, so TokenTune leaves the prompt encoders as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pypeft.methods.prompt import format as fmt
from pypeft.methods.prompt.config import PTuningConfig, PromptTuningConfig
from pypeft.methods.prompt.encoders import PromptEmbedding, PromptEncoder
from pypeft.methods.prompt.layer import ATTR, PromptAdapters, PromptSpec
from pypeft.methods.prompt.rewrite import CallRewriter
from pypeft.registry import Method, Plan
from pypeft.state import PatchState
from pypeft.targets import find_modules_to_save

PROMPT_METHODS = ("prompt_tuning", "p_tuning")
# Methods a prompt adapter cannot sit beside, and why (one message for all:
# patch() shows the composition_note of either method).
# (TokenTune composes: it always selects the virtual slots, see pypeft/methods/tokentune/selection.py.)
REFUSED = {"read", "prefix_tuning"}
NOTE = ("prompt and P-tuning compose with neither READ (it runs the backbone without autograd) nor prefix tuning "
        "(one kind of virtual tokens per model)")


@dataclass
class PromptRecord:
    adapters: PromptAdapters
    rewriter: CallRewriter


@dataclass
class Resolved:
    """What plan() resolved: the facts attach() builds the adapter from."""

    token_dim: int
    submodules: int
    dtype: torch.dtype
    device: torch.device
    init_ids: torch.Tensor | None  # init="text": the token ids, cut or repeated to length


def record_of(state: PatchState | None) -> PromptRecord | None:
    if state is None:
        return None
    return next((state.method_states[m] for m in PROMPT_METHODS if m in state.method_states), None)


def _prompt_dtype(model: nn.Module) -> torch.dtype:
    """peft keeps prompts in float32 beside a half-precision model (cast to the
    inputs' dtype when used); a float32 / float64 model's dtype otherwise."""
    dtype = next(model.parameters()).dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _text_ids(config: PromptTuningConfig, total: int, vocab: int, owner: str) -> torch.Tensor:
    """peft's PromptEmbedding: init_text's ids, cut to `total` or repeated until long enough."""
    tokenizer = config.tokenizer
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"{owner}: argument 'tokenizer': could not load a tokenizer offline from "
                             f"{config.tokenizer!r} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not callable(tokenizer):
        raise ValueError(f"{owner}: argument 'tokenizer': expected a tokenizer (callable on text) or a path, "
                         f"got {type(tokenizer).__name__}")
    ids = list(tokenizer(config.init_text)["input_ids"])
    if not ids:
        raise ValueError(f"{owner}: argument 'init_text': {config.init_text!r} tokenises to no tokens")
    ids = (ids * -(-total // len(ids)))[:total]
    if max(ids) >= vocab or min(ids) < 0:
        raise ValueError(f"{owner}: argument 'tokenizer': it gives token id {max(ids)} but the model's input "
                         f"embedding has {vocab} rows (a tokenizer of another model?)")
    return torch.tensor(ids, dtype=torch.long)


class PromptMethodBase(Method):
    can_merge = False
    composition_note = NOTE
    head_prefix = "base_model."  # peft's prompt-learning models do not wrap the model twice

    def composes_with(self, other: str) -> bool:
        return other not in REFUSED

    # --- patching ------------------------------------------------------------------
    def plan(self, model: nn.Module, state: PatchState | None, config) -> Plan:
        owner = f"pypeft.patch(method={self.name!r})"
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if not isinstance(embedding, nn.Module) or not isinstance(getattr(embedding, "weight", None), torch.Tensor):
            raise ValueError(f"{owner}: argument 'model': expected a transformers model with an input embedding "
                             f"(get_input_embeddings()), got {type(model).__name__}")
        if getattr(model, "config", None) is None:
            raise ValueError(f"{owner}: argument 'model': expected a transformers model (with a .config), "
                             f"got {type(model).__name__}")
        token_dim = embedding.weight.shape[1]
        dims = fmt.model_dims(model)
        if dims["token_dim"] is not None and dims["token_dim"] != token_dim:
            raise ValueError(f"{owner}: argument 'model': its config's hidden size {dims['token_dim']} differs from "
                             f"its input embedding's width {token_dim}; prompts must have the embedding's width")
        to_save = find_modules_to_save(model, config.modules_to_save, owner=owner)
        submodules = 2 if getattr(model.config, "is_encoder_decoder", False) else 1
        total = config.num_virtual_tokens * submodules
        init_ids = None
        if isinstance(config, PromptTuningConfig) and config.init == "text" and not config.inference_mode:
            init_ids = _text_ids(config, total, embedding.weight.shape[0], owner)
        resolved = Resolved(token_dim, submodules, _prompt_dtype(model), embedding.weight.device, init_ids)
        return Plan(self, config, [], to_save, extra=resolved)

    def make_encoder(self, model: nn.Module, config, r: Resolved) -> nn.Module:
        """The new adapter's prompt encoder (each subclass: its method's)."""
        raise NotImplementedError

    def attach(self, model: nn.Module, state: PatchState, plan: Plan) -> None:
        record = record_of(state)
        if record is None:
            adapters = PromptAdapters()
            adapters.train(model.training)
            adapters.bind(state.context)
            model.add_module(ATTR, adapters)
            record = PromptRecord(adapters, CallRewriter(model, adapters))
        state.method_states[self.name] = record
        config, r = plan.config, plan.extra
        if config.inference_mode:  # loaded: the embeddings themselves (peft's inference mode)
            encoder = PromptEmbedding(config.num_virtual_tokens * r.submodules, r.token_dim, r.dtype, r.device)
        else:
            encoder = self.make_encoder(model, config, r)
        spec = PromptSpec(self.name, config.num_virtual_tokens, r.submodules)
        record.adapters.add_adapter(plan.adapter_name, encoder, spec)

    def adapter_deleted(self, model: nn.Module, state: PatchState, name: str) -> None:
        left = {r.config.method for r in state.adapters.values()}
        if self.name not in left:
            record = state.method_states.pop(self.name, None)
            if record is not None and record_of(state) is None:
                _remove(model, record)

    def detach(self, model: nn.Module, state: PatchState) -> None:
        record = state.method_states.pop(self.name, None)
        if record is not None and record_of(state) is None:
            _remove(model, record)

    # --- disk ----------------------------------------------------------------------
    def recognises(self, fields: dict) -> bool:
        return fields.get("peft_type") == fmt.PEFT_TYPES[self.name]

    def format_name(self) -> str:
        return f"PEFT's {fmt.PEFT_TYPES[self.name]}"

    def format_hint(self) -> str:
        return f"peft's (peft_type {fmt.PEFT_TYPES[self.name]!r})"

    def to_disk(self, model: nn.Module, state: PatchState, name: str):
        adapters = record_of(state).adapters
        spec = adapters.specs[name]
        fields = fmt.config_json(model, state.adapters[name].config, spec.submodules)
        encoder = adapters.encoders[name]
        was_training = encoder.training
        encoder.eval()  # what inference computes: no dropout between LSTM layers
        try:
            with torch.no_grad():
                prompts = adapters.prompts(name).detach().clone()
        finally:
            encoder.train(was_training)
        return fields, {fmt.TENSOR: prompts}

    def config_from_disk(self, fields: dict, adapter_name: str):
        return fmt.config_from_json(self.name, fields, adapter_name)

    def expected_tensors(self, model: nn.Module, state: PatchState | None, plan: Plan, fields: dict,
                         tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
        r = plan.extra
        fmt.check_model(fields, r.token_dim, r.submodules)
        record = record_of(state) if state is not None else None
        encoders = record.adapters.encoders if record is not None else {}
        encoder = encoders[plan.adapter_name] if plan.adapter_name in encoders else None
        if encoder is not None and not isinstance(encoder, PromptEmbedding):
            # Copied into the encoder's input embedding, the prompts would be encoded a second time
            # by weights the files do not hold (peft itself does that when resuming P-tuning).
            raise ValueError(f"adapter {plan.adapter_name!r} trains {self.name}'s prompt encoder "
                             f"({type(encoder).__name__}), and peft's format holds only the prompts it computes, "
                             "not the encoder's weights: they cannot be copied back into it (pypeft.load_adapter "
                             "loads them for inference; PypeftTrainer's checkpoints keep the encoder beside them)")
        return {fmt.TENSOR: (plan.config.num_virtual_tokens * r.submodules, r.token_dim)}

    def load_tensors(self, model: nn.Module, state: PatchState, plan: Plan,
                     tensors: dict[str, torch.Tensor]) -> None:
        encoder = record_of(state).adapters.encoders[plan.adapter_name]
        encoder.embedding.weight.copy_(tensors[fmt.TENSOR])

    def training_state(self, model: nn.Module, state: PatchState, name: str) -> dict[str, torch.Tensor]:
        # A prompt encoder (P-tuning's MLP / LSTM) is what trains; the format keeps only its output.
        encoder = record_of(state).adapters.encoders[name]
        return {} if isinstance(encoder, PromptEmbedding) else dict(encoder.state_dict())

    def load_training_state(self, model: nn.Module, state: PatchState, name: str,
                            tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            record_of(state).adapters.encoders[name].load_state_dict(tensors)  # copies in place


def _remove(model: nn.Module, record: PromptRecord) -> None:
    record.rewriter.remove()
    if getattr(model, ATTR, None) is record.adapters:
        delattr(model, ATTR)


class PromptTuningMethod(PromptMethodBase):
    name = "prompt_tuning"
    config_class = PromptTuningConfig

    def make_encoder(self, model: nn.Module, config: PromptTuningConfig, r: Resolved) -> nn.Module:
        total = config.num_virtual_tokens * r.submodules
        encoder = PromptEmbedding(total, r.token_dim, r.dtype, r.device)
        embedding = model.get_input_embeddings()
        if config.init == "sample_vocab":
            ids = torch.randint(0, embedding.weight.shape[0], (total,), dtype=torch.long)
            encoder.init_from_vocabulary(embedding, ids)
        elif config.init == "text":
            encoder.init_from_vocabulary(embedding, r.init_ids)
        return encoder


class PTuningMethod(PromptMethodBase):
    name = "p_tuning"
    config_class = PTuningConfig

    def make_encoder(self, model: nn.Module, config: PTuningConfig, r: Resolved) -> nn.Module:
        return PromptEncoder(config.num_virtual_tokens * r.submodules, r.token_dim, config.encoder,
                             config.encoder_hidden_size or r.token_dim, config.encoder_num_layers,
                             config.encoder_dropout, r.dtype, r.device)
