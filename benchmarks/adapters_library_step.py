"""One bench_bottleneck train group with the real `adapters` library (AdapterHub
1.3), run by the python of its own venv (tests/adapters_oracle/venv.py: it
pins transformers 4.57, so it cannot share pypeft's process). Prints one JSON
object: median step time, saved bytes of one forward, and the step time over
the frozen network's (the same floor as bench_bottleneck's, alternated here),
the one figure comparable across the two processes.

    <oracle venv>/bin/python benchmarks/adapters_library_step.py --group pfeiffer|houlsby|fusion [...]

It imports neither pypeft nor anything of transformers 5.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (DTYPES, add_device_options, alternate_samples, classification_batch,  # noqa: E402
                    minilm_shaped, paired_ratio, reference_models, saved_activation_bytes, train_step)

import adapters  # noqa: E402
from adapters import AdapterConfig  # noqa: E402
from adapters.composition import Fuse  # noqa: E402

LIBRARY_PRESET = {"pfeiffer": "seq_bn", "houlsby": "double_seq_bn"}
FUSED = ("a", "b", "c")


def library_model(base, group: str, adapter_dropout: float, fusion_dropout: float):
    model = copy.deepcopy(base)
    adapters.init(model)
    if group == "fusion":
        for name in FUSED:
            model.add_adapter(name, config=AdapterConfig.load("seq_bn"))
        model.add_adapter_fusion(Fuse(*FUSED), config="dynamic")
        model.train_adapter_fusion(Fuse(*FUSED))
        for layer in model.bert.encoder.layer:  # Pfeiffer adapters sit after the feed-forward only
            layer.output.adapter_fusion_layer[",".join(FUSED)].dropout.p = fusion_dropout
        model.set_active_adapters(Fuse(*FUSED))
    else:
        model.add_adapter("a", config=AdapterConfig.load(LIBRARY_PRESET[group], dropout=adapter_dropout))
        model.train_adapter("a")
        model.set_active_adapters("a")
    model.classifier.requires_grad_(True)  # the head trains, as in pypeft's run (modules_to_save)
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", required=True, choices=["houlsby", "pfeiffer", "fusion"])
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--adapter-dropout", type=float, default=0.1)
    p.add_argument("--fusion-dropout", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=7)
    add_device_options(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    base = minilm_shaped(args.dropout, dtype=DTYPES[args.dtype])
    batch = classification_batch(args.batch, args.seq, device=device)
    models = {"library": library_model(base, args.group, args.adapter_dropout, args.fusion_dropout),
              "frozen_floor": reference_models(base)["frozen_floor"]}
    for m in models.values():
        m.train().to(device)
    saved = {n: saved_activation_bytes(lambda m=m: m(**batch).loss, [*m.parameters(), *m.buffers()])
             for n, m in models.items()}
    samples = alternate_samples({n: train_step(m, batch) for n, m in models.items()}, device, args.rounds, warmup=1)
    print(json.dumps({
        "versions": {"adapters": adapters.__version__, "transformers": __import__("transformers").__version__,
                     "torch": torch.__version__},
        "trainable_parameters": sum(q.numel() for q in models["library"].parameters() if q.requires_grad),
        "median_ms_train_step": {n: round(statistics.median(s) * 1e3, 1) for n, s in samples.items()},
        "saved_mib": {n: round(v / 2**20, 2) for n, v in saved.items()},
        "step_library_vs_floor": round(paired_ratio(samples, "library", "frozen_floor"), 3),
    }))


if __name__ == "__main__":
    main()
