"""Prompt and P-tuning adapters in peft's format.

adapter_config.json: peft's fields (peft_type PROMPT_TUNING / P_TUNING,
task_type, num_virtual_tokens, token_dim, num_transformer_submodules,
num_attention_heads, num_layers, the init / encoder options, modules_to_save,
inference_mode, ...). adapter_model.safetensors: `prompt_embeddings`, the
encoder's output [num_virtual_tokens * num_transformer_submodules, token_dim]
(P-tuning's encoder itself is not saved, as in peft), and the heads trained
in full under "base_model.<module>.<key>". Loading works as peft's
inference-mode loading: the adapter holds the embeddings directly.
"""

from __future__ import annotations

from pypeft.methods.peft_fields import check_fields
from pypeft.methods.prompt.config import ENCODERS, INITS, PTuningConfig, PromptTuningConfig
from pypeft.models import task_type
from pypeft.targets import modules_to_save_keys

TENSOR = "prompt_embeddings"
PEFT_TYPES = {"prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING"}

# Fields of every prompt-learning config that pypeft reads or checks.
USED = {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers",
        "modules_to_save"}
# What only shaped the start of training (loaded adapters hold the embeddings directly).
INIT_ONLY = {
    "prompt_tuning": {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"},
    "p_tuning": {"encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout"},
}


def model_dims(model) -> dict:
    """peft's _prepare_prompt_learning_config: the model facts it writes."""
    config = model.config
    get = lambda *keys: next((getattr(config, k) for k in keys if isinstance(getattr(config, k, None), int)),  # noqa
                             None)
    # peft's keys first; then the ones it does not know (DistilBERT's dim, n_layers, n_heads), where a peft
    # user has to pass the value by hand, so that the file always loads into peft.
    return {"num_layers": get("num_hidden_layers", "num_layers", "n_layer", "n_layers"),
            "token_dim": get("hidden_size", "n_embd", "d_model", "dim"),
            "num_attention_heads": get("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads",
                                       "n_heads")}


def _tokenizer_name(tokenizer) -> str | None:
    if tokenizer is None or isinstance(tokenizer, str):
        return tokenizer
    return getattr(tokenizer, "name_or_path", None) or None


def config_json(model, config, submodules: int) -> dict:
    fields = {
        "peft_type": PEFT_TYPES[config.method],
        "task_type": task_type(model),
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
        "revision": None,
        "auto_mapping": None,
        "inference_mode": True,
        "num_virtual_tokens": config.num_virtual_tokens,
        "num_transformer_submodules": submodules,
        "modules_to_save": modules_to_save_keys(model, config.modules_to_save),
        **model_dims(model),
    }
    if config.method == "prompt_tuning":
        init, tokenizer = config.init.upper(), _tokenizer_name(config.tokenizer)
        if init == "TEXT" and tokenizer is None:
            init = "RANDOM"  # peft's config refuses TEXT without a tokenizer path; the init is spent anyway
        fields.update({"prompt_tuning_init": init,
                       "prompt_tuning_init_text": config.init_text if init == "TEXT" else None,
                       "tokenizer_name_or_path": tokenizer if init == "TEXT" else None,
                       "tokenizer_kwargs": None})
    else:
        fields.update({"encoder_reparameterization_type": config.encoder.upper(),
                       "encoder_hidden_size": config.encoder_hidden_size or fields["token_dim"],
                       "encoder_num_layers": config.encoder_num_layers,
                       "encoder_dropout": config.encoder_dropout})
    return fields


def config_from_json(method: str, fields: dict, adapter_name: str):
    check_fields(fields, PEFT_TYPES[method], USED, INIT_ONLY[method], {})
    n = fields.get("num_virtual_tokens")
    to_save = fields.get("modules_to_save") or []
    if method == "prompt_tuning":
        init = str(fields.get("prompt_tuning_init") or "RANDOM").lower()
        if init not in INITS:
            raise ValueError(f"field 'prompt_tuning_init': expected one of {[i.upper() for i in INITS]}, "
                             f"got {fields.get('prompt_tuning_init')!r}")
        text = fields.get("prompt_tuning_init_text") if init == "text" else None
        tokenizer = fields.get("tokenizer_name_or_path") if init == "text" else None
        return PromptTuningConfig(num_virtual_tokens=n, init=init, init_text=text, tokenizer=tokenizer,
                                  adapter_name=adapter_name, modules_to_save=to_save, inference_mode=True)
    encoder = str(fields.get("encoder_reparameterization_type") or "MLP").lower()
    if encoder not in ENCODERS:
        raise ValueError(f"field 'encoder_reparameterization_type': expected one of "
                         f"{[e.upper() for e in ENCODERS]}, got {fields.get('encoder_reparameterization_type')!r}")
    return PTuningConfig(num_virtual_tokens=n, encoder=encoder, encoder_hidden_size=fields.get("encoder_hidden_size"),
                         encoder_num_layers=fields.get("encoder_num_layers", 2),
                         encoder_dropout=fields.get("encoder_dropout", 0.0), adapter_name=adapter_name,
                         modules_to_save=to_save, inference_mode=True)


def check_model(fields: dict, token_dim: int, submodules: int) -> None:
    """The file was saved for a model of this width and kind."""
    for key, here in (("token_dim", token_dim), ("num_transformer_submodules", submodules)):
        saved = fields.get(key)
        if saved is not None and saved != here:
            raise ValueError(f"field {key!r}: saved for {saved}, but this model's is {here} (an adapter for "
                             "another model?)")
