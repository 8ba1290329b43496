"""pypeft bottleneck adapters (Houlsby, Pfeiffer) and AdapterFusion against the
same math composed the plain way from nn modules, as the `adapters` library
does (benchmarks/eager_bottleneck.py), on a MiniLM-shaped BERT classifier.

Groups (--which):
  houlsby, pfeiffer  train step (forward + backward; the adapter and the head
                     train, the backbone is frozen): pypeft vs eager, and the
                     frozen network with gradients flowing back to the
                     embeddings (no adapter: the backward every adapter pays
                     for at least) as a floor.
  fusion             AdapterFusion of 3 Pfeiffer adapters, stage 2 (the fusion
                     layers and the head train; adapters and backbone frozen).
  inference          eval, no_grad, batch 1, --infer-tokens tokens: Pfeiffer
                     and Houlsby (pypeft and eager) vs the unpatched model, and
                     pypeft's under pypeft.disabled (the hooks alone).

Figures: step-time ratios (median over rounds of the ratio within a round,
candidates alternated in one process), saved-activation bytes of one
forward (distinct storages packed by saved_tensors_hooks, parameters and
buffers excluded) for the whole model and for the adapter blocks alone: the
storages first saved while the part replacing LayerNorm(h + x) runs (pypeft:
its bottleneck site and the exit's LayerNorm; eager: its Bottleneck module,
which calls that LayerNorm), i.e. what the adapters add to what the backbone
keeps anyway. Before any timing, each group checks on a small batch without
dropout that pypeft and eager give the same loss and gradients: the
comparison is of equal math.

--adapters-library [PYTHON] also runs the train step with the real `adapters`
library (its own venv: transformers 4.57) in a subprocess
(benchmarks/adapters_library_step.py) and reports its step time, saved bytes
and step / frozen-floor ratio there: a separate-process reference, not a
paired ratio. Without PYTHON it uses the oracle venv of
tests/adapters_oracle/venv.py if that has been made (never makes it).

    python benchmarks/bench_bottleneck.py [--which houlsby,pfeiffer,fusion,inference] [--rounds 7]
                                          [--seq 256 --batch 8 --dropout 0.1] [--device cuda --dtype bfloat16]
                                          [--adapters-library [PYTHON]]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import importlib
import json
import os
import statistics
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import eager_bottleneck as eager  # noqa: E402
from common import (DTYPES, add_device_options, alternate_samples, classification_batch,  # noqa: E402
                    machine_description, minilm_shaped, paired_ratio, reference_models,
                    saved_activation_bytes_split, synchronize, train_step)

import pypeft  # noqa: E402

GROUPS = ("houlsby", "pfeiffer", "fusion", "inference")
FUSED = ("a", "b", "c")
TARGETS = {  # issue 13
    "houlsby": {"saved": 0.85, "step": 0.9}, "pfeiffer": {"saved": 0.85, "step": 0.9},
    "fusion": {"saved": 0.6, "step": 0.9}, "inference": {"pfeiffer": 1.08, "houlsby": 1.15},
}


# --- the candidates -----------------------------------------------------------------------
def site(model, layer: int, where: str):
    return model.get_submodule(f"bert.encoder.layer.{layer}.pypeft_bottleneck.{where}")


def pypeft_adapters(base, preset: str, adapter_dropout: float):
    return pypeft.patch(copy.deepcopy(base), method="bottleneck", preset=preset, dropout=adapter_dropout)


def pypeft_fusion(base, fusion_dropout: float):
    model = copy.deepcopy(base)
    for name in FUSED:
        pypeft.patch(model, method="bottleneck", preset="pfeiffer", adapter_name=name)
    return pypeft.patch(model, method="fusion", adapters=list(FUSED), dropout_prob=fusion_dropout)


def paired_parameters(ours, plain) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pypeft parameter, eager parameter) for every adapter, fusion and head
    parameter, found by place: the eager model is built from pypeft's values
    and its gradients are compared with pypeft's."""
    pairs = []
    for (i, where), block in ((k, m.bottleneck) for k, m in eager.exits(plain).items()
                              if isinstance(m, eager.AdaptedOutput)):
        s = site(ours, i, where)
        for name, a in block.adapters.items():
            w = s.adapters[name]
            pairs += [(w.down_weight, a.adapter_down[0].weight), (w.down_bias, a.adapter_down[0].bias),
                      (w.up_weight, a.adapter_up.weight), (w.up_bias, a.adapter_up.bias)]
        if block.fusion is not None:
            (f,) = s.fusions.values()
            pairs += [(f.query_weight, block.fusion.query.weight), (f.query_bias, block.fusion.query.bias),
                      (f.key_weight, block.fusion.key.weight), (f.key_bias, block.fusion.key.bias),
                      (f.value_weight, block.fusion.value.weight)]
    head = [p for n, p in ours.named_parameters() if p.requires_grad and n.startswith("classifier.")]
    pairs += list(zip(head, plain.classifier.parameters()))
    return pairs


def eager_twin(base, ours, group: str, adapter_dropout: float, fusion_dropout: float):
    """The eager composition of what `ours` (pypeft) computes, with its weights,
    training what it trains."""
    plain = copy.deepcopy(base)
    if group == "fusion":
        for name in FUSED:
            eager.add_adapter(plain, name, "pfeiffer", adapter_dropout)
        trained = eager.add_fusion(plain, fusion_dropout)
    else:
        trained = eager.add_adapter(plain, "default", group, adapter_dropout)
    plain.requires_grad_(False)
    for module in trained.values():
        module.requires_grad_(True)
    plain.classifier.requires_grad_(True)
    with torch.no_grad():
        for p_ours, p_plain in paired_parameters(ours, plain):
            p_plain.copy_(p_ours)
    return plain


def build(base, group: str, args):
    ours = pypeft_fusion(base, args.fusion_dropout) if group == "fusion" else \
        pypeft_adapters(base, group, args.adapter_dropout)
    return ours, eager_twin(base, ours, group, args.adapter_dropout, args.fusion_dropout)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_equal_math(group: str) -> dict:
    """pypeft and eager on one small batch, float32 on the CPU, every dropout
    off: the losses and every trained parameter's gradient must agree. Raises
    if they do not (the timings would compare different computations)."""
    base = minilm_shaped(0.0)
    quiet = argparse.Namespace(adapter_dropout=0.0, fusion_dropout=0.0)
    ours, plain = build(base, group, quiet)
    batch = classification_batch(2, 32)
    loss_ours, loss_plain = ours(**batch).loss, plain(**batch).loss
    loss_ours.backward()
    loss_plain.backward()
    pairs = [(a, b) for a, b in paired_parameters(ours, plain) if a.requires_grad or b.requires_grad]
    if trainable(ours) != trainable(plain) or any(a.requires_grad != b.requires_grad for a, b in pairs) or \
            len(pairs) != sum(1 for p in plain.parameters() if p.requires_grad):
        raise AssertionError(f"{group}: pypeft and eager train different parameters ({trainable(ours)} vs "
                             f"{trainable(plain)} values)")
    torch.testing.assert_close(loss_ours, loss_plain, rtol=1e-5, atol=1e-6)
    grad_diff = 0.0
    for p_ours, p_plain in pairs:
        torch.testing.assert_close(p_ours.grad, p_plain.grad, rtol=1e-4, atol=1e-6)
        grad_diff = max(grad_diff, (p_ours.grad - p_plain.grad).abs().max().item())
    return {"loss_difference": abs(loss_ours.item() - loss_plain.item()), "max_grad_difference": grad_diff,
            "trained_tensors": len(pairs)}


def adapter_blocks(model) -> list[torch.nn.Module]:
    """What replaces LayerNorm(h + x) at each adapted exit."""
    plain = eager.bottleneck_blocks(model)
    if plain:
        return plain
    blocks = []
    for i, layer in enumerate(model.bert.encoder.layer):
        for where, output in (("attention", layer.attention.output), ("feed_forward", layer.output)):
            if hasattr(layer, "pypeft_bottleneck") and where in layer.pypeft_bottleneck:
                blocks += [site(model, i, where), output.LayerNorm]
    return blocks


# --- the groups ---------------------------------------------------------------------------
def train_group(group: str, base, batch, device, args) -> dict:
    equal = check_equal_math(group)
    ours, plain = build(base, group, args)
    models = {"pypeft": ours, "eager": plain}
    if args.floor:
        models["frozen_floor"] = reference_models(base)["frozen_floor"]
    for m in models.values():
        m.train().to(device)
    saved, in_blocks = {}, {}
    for name, m in models.items():
        saved[name], in_blocks[name] = saved_activation_bytes_split(
            lambda m=m: m(**batch).loss, [*m.parameters(), *m.buffers()], adapter_blocks(m))
    samples = alternate_samples({n: train_step(m, batch) for n, m in models.items()}, device, args.rounds,
                                warmup=1)
    ratio = functools.partial(paired_ratio, samples)
    ratios = {"step_pypeft_vs_eager": ratio("pypeft", "eager"),
              "saved_pypeft_vs_eager": saved["pypeft"] / saved["eager"],
              "saved_blocks_pypeft_vs_eager": in_blocks["pypeft"] / in_blocks["eager"]}
    if args.floor:
        ratios.update(step_pypeft_vs_floor=ratio("pypeft", "frozen_floor"),
                      step_eager_vs_floor=ratio("eager", "frozen_floor"),
                      step_floor_vs_eager=ratio("frozen_floor", "eager"))
    target = TARGETS[group]
    result = {
        "equal_math_check": equal,
        "trainable_parameters": {n: trainable(m) for n, m in models.items()},
        "median_ms_train_step": {n: round(statistics.median(s) * 1e3, 1) for n, s in samples.items()},
        "saved_mib": {n: round(v / 2**20, 2) for n, v in saved.items()},
        "saved_mib_adapter_blocks": {n: round(v / 2**20, 2) for n, v in in_blocks.items() if n != "frozen_floor"},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets_met": {f"saved <= {target['saved']}x eager": ratios["saved_pypeft_vs_eager"] <= target["saved"],
                        f"step <= {target['step']}x eager": ratios["step_pypeft_vs_eager"] <= target["step"]},
    }
    if group == "fusion":
        result["pypeft_fusion_op"] = fusion_kind()
    return result


def fusion_kind() -> str:
    # By module path: pypeft.ops re-exports the function under the module's name.
    if hasattr(importlib.import_module("pypeft.ops.adapter_fusion"), "_op"):
        return "native pypeft::adapter_fusion"
    return "eager stand-in (pypeft/ops/adapter_fusion.py)"


def inference_group(base, device, args) -> dict:
    batch = {"input_ids": classification_batch(1, args.infer_tokens, device=device)["input_ids"]}
    models = {"base": copy.deepcopy(base)}
    for preset in ("pfeiffer", "houlsby"):
        ours = pypeft_adapters(base, preset, args.adapter_dropout)
        models[f"pypeft_{preset}"] = ours
        models[f"eager_{preset}"] = eager_twin(base, ours, preset, args.adapter_dropout, args.fusion_dropout)
    for m in models.values():
        m.eval().to(device)

    def forward(m):
        def run():
            with torch.no_grad():
                m(**batch)
        return run

    def disabled_forward():
        with torch.no_grad(), pypeft.disabled(models["pypeft_pfeiffer"]):
            models["pypeft_pfeiffer"](**batch)

    steps = {n: forward(m) for n, m in models.items()}
    steps["pypeft_pfeiffer_disabled"] = disabled_forward
    samples = alternate_samples(steps, device, args.infer_rounds, warmup=3)
    ratios = {f"latency_{n}_vs_base": round(paired_ratio(samples, n, "base"), 3) for n in steps if n != "base"}
    target = TARGETS["inference"]
    return {
        "median_ms": {n: round(statistics.median(s) * 1e3, 2) for n, s in samples.items()},
        "ratios": ratios,
        "targets_met": {f"{p} <= {t}x base": ratios[f"latency_pypeft_{p}_vs_base"] <= t for p, t in target.items()},
    }


# --- the adapters library, in its own process -----------------------------------------------
def library_python(arg: str) -> tuple[str | None, str | None]:
    """(python, None), or (None, why not)."""
    if arg != "oracle":
        return (arg, None) if os.path.exists(arg) else (None, f"{arg} does not exist")
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from adapters_oracle.venv import venv_path  # noqa: E402

    python = venv_path() / "bin" / "python"
    if not python.exists():
        return None, (f"the adapters oracle venv is absent ({venv_path()}); make it with "
                      "`python tests/adapters_oracle/venv.py` or pass --adapters-library PYTHON")
    return str(python), None


def library_group(python: str, group: str, args) -> dict:
    cmd = [python, os.path.join(HERE, "adapters_library_step.py"), "--group", group, "--seq", str(args.seq),
           "--batch", str(args.batch), "--dropout", str(args.dropout), "--adapter-dropout",
           str(args.adapter_dropout), "--fusion-dropout", str(args.fusion_dropout), "--rounds", str(args.rounds),
           "--device", args.device, "--dtype", args.dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr).strip().splitlines()[-10:]}
    return json.loads(proc.stdout)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", default=",".join(GROUPS), help=f"comma-separated, of {','.join(GROUPS)}")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.1, help="the model's dropout")
    p.add_argument("--adapter-dropout", type=float, default=None,
                   help="dropout on the adapters' output (the presets' default is 0.0); default: --dropout")
    p.add_argument("--fusion-dropout", type=float, default=None,
                   help="dropout on the fusion scores; default: --dropout (the library takes the model's "
                        "attention_probs_dropout_prob)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--infer-tokens", type=int, default=128)
    p.add_argument("--infer-rounds", type=int, default=50)
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="leave the frozen-network floor out of the train groups")
    p.add_argument("--adapters-library", nargs="?", const="oracle", default=None, metavar="PYTHON",
                   help="also time the train groups with the `adapters` library run by PYTHON (default: the "
                        "oracle venv's python, if made)")
    add_device_options(p)
    args = p.parse_args(argv)
    which = [w for w in args.which.split(",") if w]
    unknown = [w for w in which if w not in GROUPS]
    if unknown:
        p.error(f"argument --which: expected names from {list(GROUPS)}, got {unknown}")
    if args.adapter_dropout is None:
        args.adapter_dropout = args.dropout
    if args.fusion_dropout is None:
        args.fusion_dropout = args.dropout
    device = torch.device(args.device)
    base = minilm_shaped(args.dropout, dtype=DTYPES[args.dtype])
    batch = classification_batch(args.batch, args.seq, device=device)
    report = {"benchmark": "bottleneck", "date": datetime.date.today().isoformat(),
              "machine": machine_description(device), "torch": torch.__version__, "config": vars(args)}
    for group in which:
        if group == "inference":
            report[group] = inference_group(base, device, args)
        else:
            report[group] = train_group(group, base, batch, device, args)
        synchronize(device)
    if args.adapters_library is not None:
        python, why = library_python(args.adapters_library)
        if python is None:
            print(f"bench_bottleneck: --adapters-library skipped: {why}", file=sys.stderr)
            report["adapters_library"] = {"skipped": why}
        else:
            report["adapters_library"] = {g: library_group(python, g, args) for g in which if g != "inference"}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
