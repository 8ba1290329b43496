"""Tiny Hugging Face models built from configs (no hub downloads), one per
family the tests cover, with a batch of inputs for each."""

from __future__ import annotations

import torch
import transformers

VOCAB = 96


def _common(**kw):
    return dict(vocab_size=VOCAB, **kw)


def bert():
    cfg = transformers.BertConfig(**_common(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=96, num_labels=3))
    return transformers.BertForSequenceClassification(cfg)


def roberta():
    cfg = transformers.RobertaConfig(**_common(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=96, num_labels=3, pad_token_id=1,
                                               max_position_embeddings=64))
    return transformers.RobertaForSequenceClassification(cfg)


def gpt2():
    cfg = transformers.GPT2Config(**_common(n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                            eos_token_id=0))
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    cfg = transformers.LlamaConfig(**_common(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=96,
                                             max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                                             pad_token_id=0))
    return transformers.LlamaForCausalLM(cfg)


def t5():
    cfg = transformers.T5Config(**_common(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2,
                                          num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    return transformers.T5ForConditionalGeneration(cfg)


def _llama_like(config_class, model_class):
    cfg = config_class(**_common(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=96, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                                 pad_token_id=0))
    return model_class(cfg)


def mistral():
    return _llama_like(transformers.MistralConfig, transformers.MistralForCausalLM)


def qwen2():
    return _llama_like(transformers.Qwen2Config, transformers.Qwen2ForCausalLM)


def distilbert():
    cfg = transformers.DistilBertConfig(**_common(dim=64, hidden_dim=96, n_layers=2, n_heads=4, num_labels=3,
                                                  max_position_embeddings=64))
    return transformers.DistilBertForSequenceClassification(cfg)


def opt():
    cfg = transformers.OPTConfig(**_common(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                                           max_position_embeddings=64, word_embed_proj_dim=64, bos_token_id=0,
                                           eos_token_id=0, pad_token_id=1))
    return transformers.OPTForCausalLM(cfg)


def _seq_cls(family: str):
    """The family's *ForSequenceClassification on the same tiny config (3
    labels; a pad token, which the last-token heads need for batches)."""
    config = {**FAMILIES, **MORE_FAMILIES}[family]().config
    config.num_labels = 3
    if config.pad_token_id is None:
        config.pad_token_id = 1
    return transformers.AutoModelForSequenceClassification.from_config(config)


def llama_mqa():
    """Multi-query attention: one key/value head for all four query heads."""
    cfg = transformers.LlamaConfig(**_common(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=1, intermediate_size=96,
                                             max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                                             pad_token_id=0))
    return transformers.LlamaForCausalLM(cfg)


def llama_seq_cls():
    cfg = transformers.LlamaConfig(**_common(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=96,
                                             max_position_embeddings=64, pad_token_id=0, num_labels=3))
    return transformers.LlamaForSequenceClassification(cfg)


def gpt2_seq_cls():
    cfg = transformers.GPT2Config(**_common(n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                            eos_token_id=0, pad_token_id=0, num_labels=3))
    return transformers.GPT2ForSequenceClassification(cfg)


FAMILIES = {"bert": bert, "roberta": roberta, "gpt2": gpt2, "llama": llama, "t5": t5}
# Llama-likes a few tests add (the families above are what most tests sweep).
MORE_FAMILIES = {"mistral": mistral, "qwen2": qwen2, "distilbert": distilbert, "opt": opt, "llama_mqa": llama_mqa,
                 "llama_seq_cls": llama_seq_cls, "gpt2_seq_cls": gpt2_seq_cls}
# Sequence classifiers of the decoder families ("llama-cls", ...): heads that pool the last non-pad token.
SEQ_CLS_FAMILIES = {f"{f}-cls": (lambda f=f: _seq_cls(f)) for f in ("gpt2", "llama", "mistral", "qwen2", "opt")}


def make(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return {**FAMILIES, **MORE_FAMILIES, **SEQ_CLS_FAMILIES}[family]().eval()


def inputs(family: str, batch: int = 2, length: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -2:] = 0  # some padding, so masks matter
    batch_inputs = {"input_ids": ids, "attention_mask": mask}
    if family == "t5":
        batch_inputs["decoder_input_ids"] = torch.randint(2, VOCAB, (batch, 5), generator=g)
    return batch_inputs


@torch.no_grad()
def output(model, batch) -> torch.Tensor:
    """Logits, under no_grad: kernels chosen for inference can differ from those
    chosen when parameters require grad (CPU attention does), and the tests
    compare models whose parameters differ in requires_grad."""
    return model(**batch).logits


def labels_for(family: str, batch: dict) -> dict:
    """Inputs plus labels, so the model returns a loss."""
    out = dict(batch)
    if family in ("bert", "roberta", "distilbert") or family.endswith(("-cls", "_seq_cls")):
        out["labels"] = torch.tensor([0, 2])[: batch["input_ids"].shape[0]]
    elif family == "t5":
        out["labels"] = batch["decoder_input_ids"]
        del out["decoder_input_ids"]
    else:
        out["labels"] = batch["input_ids"]
    return out
