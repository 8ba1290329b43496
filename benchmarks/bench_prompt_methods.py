"""pypeft's soft-prompt methods (prompt tuning, P-tuning, prefix tuning) against
`peft`'s implementation of each, on two models:

  llama   a Llama-shaped causal LM (4 layers, hidden 512, 8 query / 2 KV heads,
          FFN 1376, vocab 32000, random weights), seq 256, batch 8, labels =
          the input ids (the causal-LM loss);
  minilm  the MiniLM-shaped BERT classifier of benchmarks/common.py (6 layers,
          hidden 384, 12 heads), seq 128, batch 16, 5 labels; the head trains
          too (peft's modules_to_save).

Per model and method: step time (forward + backward + AdamW step on the
trainable parameters) of pypeft and peft, alternated in one process, and the
median over rounds of the within-round ratio pypeft / peft; saved bytes of one
forward (distinct storages packed by saved_tensors_hooks, parameters
excluded) and their ratio. Both start from the same weights (peft's trained
tensors copied into pypeft's, matched by name), and a check on a small batch,
dropout off, asserts the same loss and the same gradient norms of the trained
tensors before anything is timed.

peft 0.21 cannot prefix-tune BERT under transformers 5 (the classifier takes
no past_key_values: "Model does not support past key values"); there pypeft
runs alone, patched with the same options, and the row says why there is no
ratio.

Also prefix tuning on the Llama-shaped model with gradient checkpointing on
(transformers' non-reentrant checkpointing of each decoder layer; peft refuses
it for prefix tuning): pypeft's saved bytes and step time against pypeft
without it.

Targets (issue 14): step time <= 0.9x peft's and saved bytes <= peft's, per
method.

    python benchmarks/bench_prompt_methods.py [--models llama,minilm] [--methods prompt_tuning,p_tuning,prefix_tuning]
                                              [--rounds 5] [--num-virtual-tokens 20] [--device cuda --dtype bfloat16]
                                              [--quick]   (tiny shapes, one round: a smoke run)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (DTYPES, add_device_options, classification_batch, machine_description,  # noqa: E402
                    minilm_shaped, paired_ratio, saved_activation_bytes, synchronize)

import pypeft  # noqa: E402

METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")
MODELS = ("llama", "minilm")
TARGETS = {"step_ratio": 0.9, "saved_ratio": 1.0}  # pypeft / peft, issue 14
PEFT_TASK = {"llama": "CAUSAL_LM", "minilm": "SEQ_CLS"}


# --- models and batches -----------------------------------------------------------------------
def llama_shaped(quick: bool, dtype: torch.dtype):
    import transformers

    size = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2) if quick else \
        dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(max_position_embeddings=2048, **size)).to(dtype)


def minilm_model(quick: bool, dropout: float, dtype: torch.dtype):
    if not quick:
        return minilm_shaped(dropout, dtype=dtype)
    import transformers

    cfg = transformers.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, hidden_dropout_prob=dropout,
                                  attention_probs_dropout_prob=dropout, num_labels=5)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).to(dtype)


def make_batch(model_kind: str, base, batch: int, seq: int, device) -> dict:
    if model_kind == "minilm":
        ids = classification_batch(batch, seq, device="cpu")
        ids["input_ids"] = ids["input_ids"] % base.config.vocab_size
        return {k: v.to(device) for k, v in ids.items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


# --- the candidates ---------------------------------------------------------------------------
def peft_config(method: str, task: str, args):
    import peft

    common = dict(task_type=task, num_virtual_tokens=args.num_virtual_tokens)
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(prompt_tuning_init="RANDOM", **common)
    if method == "p_tuning":
        return peft.PromptEncoderConfig(encoder_reparameterization_type="MLP",
                                        encoder_hidden_size=args.encoder_hidden_size, **common)
    return peft.PrefixTuningConfig(prefix_projection=False, **common)


def pypeft_options(method: str, args) -> dict:
    """The same adapter as peft_config, as pypeft.patch takes it."""
    options = {"num_virtual_tokens": args.num_virtual_tokens}
    if method == "p_tuning":
        options.update(encoder="mlp", encoder_hidden_size=args.encoder_hidden_size)
    if method == "prefix_tuning":
        options.update(prefix_projection=False)
    return options


def pypeft_has(method: str) -> bool:
    from pypeft.registry import methods

    return method in methods()


def trained(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def build_pair(base, model_kind: str, method: str, args) -> tuple[dict, dict]:
    """({name: model}, {name: why it is missing}) for peft and pypeft, the same weights."""
    import peft

    models, missing = {}, {}
    torch.manual_seed(1)  # the adapter's initial values
    try:
        models["peft"] = peft.get_peft_model(copy.deepcopy(base), peft_config(method, PEFT_TASK[model_kind], args))
        models["peft"](**make_batch(model_kind, base, 1, 4, "cpu"))  # peft raises for what it cannot run at the call
    except (ValueError, TypeError, NotImplementedError) as e:
        models.pop("peft", None)
        missing["peft"] = f"peft cannot run {method} on this model: {str(e).splitlines()[0]}"
    if not pypeft_has(method):
        missing["pypeft"] = f"pypeft has no method {method!r} in this checkout"
        return models, missing
    models["pypeft"] = pypeft.patch(copy.deepcopy(base), method=method, **pypeft_options(method, args))
    if "peft" in models:
        copy_trained(models["peft"], models["pypeft"], f"{model_kind}/{method}")
    return models, missing


def copy_trained(source, dest, what: str) -> None:
    """dest's trained tensors := source's, matched by their names after the
    adapter's name ("prompt_encoder.default.mlp_head.0.weight" in peft and
    "pypeft_prompts.encoders.default.mlp_head.0.weight" in pypeft; a head's
    "weight" and "bias"). A peft p-tuning adapter on disk holds the encoder's
    output only (peft's format), so loading a saved one would not train the
    same tensors: the values are copied instead."""
    def by_key(model):
        return {n.split(".default.")[-1]: p for n, p in model.named_parameters() if p.requires_grad}
    src, dst = by_key(source), by_key(dest)
    if src.keys() != dst.keys() or any(src[k].shape != dst[k].shape for k in src):
        raise AssertionError(f"{what}: pypeft and peft train different tensors: "
                             f"{ {k: tuple(v.shape) for k, v in dst.items()} } vs "
                             f"{ {k: tuple(v.shape) for k, v in src.items()} }")
    with torch.no_grad():
        for k, p in dst.items():
            p.copy_(src[k])


def check_equal_math(models: dict, model_kind: str, base) -> dict:
    """pypeft and peft on a small batch in eval mode (dropout off): the same loss
    and the same gradient norms of the trained tensors (sorted: the two name
    them differently). Raises if not: the timings would compare different math."""
    batch = make_batch(model_kind, base, 2, 24, next(base.parameters()).device)
    losses, norms = {}, {}
    for name, model in models.items():
        model.eval()
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        losses[name] = loss.detach()
        norms[name] = sorted((p.numel(), p.grad.norm().item()) for p in trained(model) if p.grad is not None)
        model.zero_grad(set_to_none=True)
        model.train()
    torch.testing.assert_close(losses["pypeft"], losses["peft"], rtol=1e-4, atol=1e-5)
    if [n for n, _ in norms["pypeft"]] != [n for n, _ in norms["peft"]]:
        raise AssertionError(f"trained tensors differ: pypeft {norms['pypeft']}, peft {norms['peft']}")
    torch.testing.assert_close(torch.tensor([g for _, g in norms["pypeft"]]),
                               torch.tensor([g for _, g in norms["peft"]]), rtol=1e-3, atol=1e-6)
    return {"loss_difference": abs(losses["pypeft"].item() - losses["peft"].item()),
            "trained_tensors": len(norms["peft"])}


def train_step(model, batch: dict):
    optimizer = torch.optim.AdamW(trained(model), lr=1e-3)

    def run():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run


def alternate_samples(candidates: dict, device, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """common.alternate_samples, but the order of the candidates reverses every
    round: on a CPU the one that runs right after the other pays for the
    memory the other just freed (page faults: half the CPU time was system
    time on the shared 2-core machine), which a fixed order books to one side."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            synchronize(device)
            start = time.perf_counter()
            candidates[name]()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def saved_bytes(model, batch: dict) -> int:
    return saved_activation_bytes(lambda: model(**batch).loss, list(model.parameters()))


# --- the groups -------------------------------------------------------------------------------
def model_group(model_kind: str, args, device) -> dict:
    dtype = DTYPES[args.dtype]
    base = llama_shaped(args.quick, dtype) if model_kind == "llama" else minilm_model(args.quick, args.dropout, dtype)
    shape = {"llama": (2, 16) if args.quick else (8, 256), "minilm": (2, 16) if args.quick else (16, 128)}[model_kind]
    batch = make_batch(model_kind, base, *shape, device)
    out = {"batch": shape[0], "seq": shape[1]}
    for method in args.methods:
        models, missing = build_pair(base, model_kind, method, args)
        row: dict = {"missing": missing} if missing else {}
        for m in models.values():
            m.to(device).train()
        if len(models) == 2:
            row["equal_math_check"] = check_equal_math(models, model_kind, base.to(device))
        row["trainable_params"] = {k: sum(p.numel() for p in trained(m)) for k, m in models.items()}
        row["saved_mib"] = {k: round(saved_bytes(m, batch) / 2**20, 2) for k, m in models.items()}
        samples = alternate_samples({k: train_step(m, batch) for k, m in models.items()}, device, args.rounds)
        row["step_ms"] = {k: round(1e3 * sorted(s)[len(s) // 2], 1) for k, s in samples.items()}
        if len(models) == 2:
            row["step_ratio"] = round(paired_ratio(samples, "pypeft", "peft"), 3)
            row["saved_ratio"] = round(row["saved_mib"]["pypeft"] / row["saved_mib"]["peft"], 3)
            row["targets_met"] = {"step": row["step_ratio"] <= TARGETS["step_ratio"],
                                  "saved": row["saved_ratio"] <= TARGETS["saved_ratio"]}
        out[method] = row
        del models
    return out


def checkpointing_group(args, device) -> dict:
    """pypeft prefix tuning on the Llama-shaped model with and without gradient
    checkpointing: saved bytes (and step time) of the same adapter."""
    if not pypeft_has("prefix_tuning"):
        return {"missing": "pypeft has no method 'prefix_tuning' in this checkout"}
    base = llama_shaped(args.quick, DTYPES[args.dtype])
    batch = make_batch("llama", base, *((2, 16) if args.quick else (8, 256)), device)
    torch.manual_seed(1)
    plain = pypeft.patch(copy.deepcopy(base), method="prefix_tuning", **pypeft_options("prefix_tuning", args))
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    models = {"prefix": plain, "prefix_checkpointed": ckpt}
    for m in models.values():
        m.to(device).train()
    losses = {k: m(**batch).loss.item() for k, m in models.items()}
    saved = {k: saved_bytes(m, batch) for k, m in models.items()}
    samples = alternate_samples({k: train_step(m, batch) for k, m in models.items()}, device, args.rounds)
    return {"loss": losses, "saved_mib": {k: round(v / 2**20, 2) for k, v in saved.items()},
            "saved_ratio": round(saved["prefix_checkpointed"] / saved["prefix"], 3),
            "step_ms": {k: round(1e3 * sorted(s)[len(s) // 2], 1) for k, s in samples.items()},
            "step_ratio": round(paired_ratio(samples, "prefix_checkpointed", "prefix"), 3)}


def _list(choices):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(choices)}, got {text!r}")
        return items
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_list(MODELS), default=list(MODELS))
    p.add_argument("--methods", type=_list(METHODS), default=list(METHODS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--num-virtual-tokens", type=int, default=20)
    p.add_argument("--encoder-hidden-size", type=int, default=128, help="P-tuning's MLP width (default: 128)")
    p.add_argument("--dropout", type=float, default=0.1, help="the classifier backbone's dropout (default: 0.1)")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="skip prefix tuning with gradient checkpointing")
    p.add_argument("--quick", action="store_true", help="tiny shapes and one round: a smoke run")
    add_device_options(p)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = 1
    device = torch.device(args.device)
    import peft
    import transformers

    report = {"benchmark": "prompt_methods", "date": datetime.date.today().isoformat(),
              "machine": machine_description(device), "torch": torch.__version__,
              "transformers": transformers.__version__, "peft": peft.__version__, "config": vars(args),
              "targets": TARGETS}
    for kind in args.models:
        report[kind] = model_group(kind, args, device)
        synchronize(device)
    if args.checkpointing and "prefix_tuning" in args.methods:
        report["prefix_checkpointing"] = checkpointing_group(args, device)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
