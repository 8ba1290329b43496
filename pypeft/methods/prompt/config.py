"""PromptTuningConfig and PTuningConfig: what pypeft.patch(model,
method="prompt_tuning" | "p_tuning", ...) takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pypeft.methods.config_checks import check_common

INITS = ("random", "sample_vocab", "text")
ENCODERS = ("mlp", "lstm")


def _check_tokens(owner: str, n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{owner}: argument 'num_virtual_tokens': expected an int >= 1, got {n!r}")


@dataclass
class PromptTuningConfig:
    """Options of pypeft.patch(model, method="prompt_tuning", ...) (Lester et
    al. 2021; peft's PromptEmbedding).

    num_virtual_tokens: trainable embeddings put in front of every input.
    init: "random" (torch.nn.Embedding's N(0, 1), peft's RANDOM),
        "sample_vocab" (rows copied from the embeddings of random vocabulary
        ids) or "text" (the embeddings of `init_text`'s tokens, cut or
        repeated to length, as peft's TEXT).
    init_text, tokenizer: for init="text": the text, and a tokenizer object or
        a path that transformers.AutoTokenizer loads offline.
    modules_to_save: modules trained in full beside it (default: a sequence
        classifier's head, as peft).
    inference_mode: the adapter holds its embeddings only, as peft loads a
        saved one (load_adapter sets it; nothing to initialise).
    """

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    tokenizer: Any = None
    adapter_name: str = "default"
    modules_to_save: list[str] | None = None
    inference_mode: bool = False
    method: str = field(default="prompt_tuning", init=False)

    def __post_init__(self):
        owner = "PromptTuningConfig"
        _check_tokens(owner, self.num_virtual_tokens)
        if self.init not in INITS:
            raise ValueError(f"{owner}: argument 'init': expected one of {list(INITS)}, got {self.init!r}")
        if self.init == "text" and not self.inference_mode:  # loaded adapters initialise nothing
            if not isinstance(self.init_text, str) or not self.init_text:
                raise ValueError(f"{owner}: argument 'init_text': init='text' needs a non-empty str, "
                                 f"got {self.init_text!r}")
            if self.tokenizer is None:
                raise ValueError(f"{owner}: argument 'tokenizer': init='text' needs a tokenizer (an object, or a "
                                 "path AutoTokenizer loads offline), got None")
        elif self.init != "text" and (self.init_text is not None or self.tokenizer is not None):
            given = "init_text" if self.init_text is not None else "tokenizer"
            raise ValueError(f"{owner}: argument '{given}': only used with init='text', got init={self.init!r}")
        check_common(owner, self)


@dataclass
class PTuningConfig:
    """Options of pypeft.patch(model, method="p_tuning", ...) (Liu et al.
    2021, "GPT Understands, Too"; peft's PromptEncoder).

    num_virtual_tokens: virtual tokens put in front of every input; their
        embeddings are an encoder's output over trainable input embeddings.
    encoder: "mlp" (Linear-ReLU-Linear-ReLU-Linear, peft's MLP) or "lstm"
        (a bidirectional LSTM of encoder_num_layers layers, dropout
        encoder_dropout between them, then Linear-ReLU-Linear; peft's LSTM),
        the LSTM run on pypeft.ops.recurrent_scan.
    encoder_hidden_size: the encoder's width (None: the model's hidden size,
        as peft).
    encoder_num_layers: the LSTM's layers. peft's MLP has exactly two hidden
        layers and ignores this with a warning; pypeft refuses another value
        with encoder="mlp" instead of ignoring it.
    """

    num_virtual_tokens: int = 20
    encoder: str = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    adapter_name: str = "default"
    modules_to_save: list[str] | None = None
    inference_mode: bool = False
    method: str = field(default="p_tuning", init=False)

    def __post_init__(self):
        owner = "PTuningConfig"
        _check_tokens(owner, self.num_virtual_tokens)
        if self.encoder not in ENCODERS:
            raise ValueError(f"{owner}: argument 'encoder': expected one of {list(ENCODERS)}, got {self.encoder!r}")
        h = self.encoder_hidden_size
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
            raise ValueError(f"{owner}: argument 'encoder_hidden_size': expected None or an int >= 1, got {h!r}")
        n = self.encoder_num_layers
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{owner}: argument 'encoder_num_layers': expected an int >= 1, got {n!r}")
        if self.encoder == "mlp" and n != 2 and not self.inference_mode:
            raise ValueError(f"{owner}: argument 'encoder_num_layers': the MLP encoder has exactly 2 hidden layers "
                             f"(peft's; it ignores the option), got {n}; use encoder='lstm' for a depth of choice")
        p = self.encoder_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"{owner}: argument 'encoder_dropout': expected a probability in [0, 1), got {p!r}")
        check_common(owner, self)
