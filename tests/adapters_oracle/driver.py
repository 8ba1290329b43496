"""Runs the `adapters` library (AdapterHub) on a list of cases. Run by the oracle
venv's python (transformers 4.57), never imported by the tests (transformers 5):

    python driver.py JOB.json RESULTS.json

JOB.json is {"cases": [CASE, ...]}; every case runs in this one process, so a
test module pays the interpreter and import start-up once. A case:

    id             str, required
    model_dir      a transformers save_pretrained directory (made by the main venv)
    model_class    "AutoModel" (default), "AutoModelForSequenceClassification",
                   "AutoModelForCausalLM", or any transformers class name
    attn_implementation   optional, passed to from_pretrained
    init           bool, default true: adapters.init(model)
    add_adapters   [{name, config: preset name or dict, overrides: {...},
                     random: {std, seed}}]   random: every parameter of that
                   adapter drawn from N(0, std) with a seeded generator
    add_fusions    [{adapters: [a, b], config: "dynamic"|"static"|dict,
                     overrides: {...}, random: {std, seed}}]
    load_adapters  [{dir, load_as?, use_safetensors?: true, leave_out?, with_head?}]
    load_fusions   [{dir, load_as?, use_safetensors?: true}]
    active         null, "name", {"fuse": [...]}, {"stack": [...]} (nestable)
    inputs         a safetensors file: input_ids, attention_mask (token_type_ids,
                   position_ids, decoder_input_ids if present; other tensors ignored)
    output         a safetensors file: {"output": last_hidden_state or logits}
    save_adapters  [{name, dir, use_safetensors?: false, with_head?}]   with_head
                   (library default true) only for a model with a head
    save_fusions   [{adapters: [a, b], dir, use_safetensors?: false}]
    save_state     a safetensors file: the whole model state_dict (base + adapters)

RESULTS.json is {"versions": {...}, "cases": {id: RESULT}}; one case failing does
not stop the others, its RESULT is {"error": traceback}. Otherwise:

    model_class        the class loaded (before adapters.init)
    base_loading_info  from_pretrained's missing / unexpected / mismatched keys
    active             the active setup as the library prints it ("a", "Fuse[a, b]")
    added_state        {key: shape} of the state_dict keys that init / adapters added
    adapter_configs    {name: the full config dict the library holds}
    output_key, output_shape   "last_hidden_state" or "logits", when inputs ran
    loaded   [{dir, name, loading_info (adapters only),
               check: {weights_file, missing, unexpected, values_differ},
               head: null or {weights_file, equal, values_differ, unexpected}}]
    saved    [{dir, files, configs: {file: parsed json}, weights: {file: {key: shape}}}]

The library loads weights non-strictly (missing keys are only logged), so
`check` compares the file with the model after the load: all three lists empty
means every tensor of the file landed, and every tensor of that adapter came
from the file.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import sys
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import adapters  # noqa: E402
from adapters import AdapterConfig  # noqa: E402
from adapters.composition import Fuse, Stack  # noqa: E402
from adapters.configuration import AdapterFusionConfig  # noqa: E402

WEIGHT_FILES = ("adapter.safetensors", "pytorch_adapter.bin",
                "model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin",
                "model_head.safetensors", "pytorch_model_head.bin")
# The tensors of an inputs file that go to the model (others, e.g. expected outputs, stay).
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "decoder_input_ids")


def shapes(state: dict) -> dict:
    return {k: list(v.shape) for k, v in sorted(state.items())}


def read_weights(path: str) -> dict:
    if path.endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model(case: dict):
    name = case.get("model_class", "AutoModel")
    cls = getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"model_class: expected a transformers model class name, got {name!r}")
    kwargs = {}
    if case.get("attn_implementation"):
        kwargs["attn_implementation"] = case["attn_implementation"]
    model, info = cls.from_pretrained(case["model_dir"], output_loading_info=True, **kwargs)
    return model.eval(), {k: list(v) for k, v in info.items()}


def composition(spec):
    if spec is None or isinstance(spec, str):
        return spec
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, children), = spec.items()
        blocks = {"fuse": Fuse, "stack": Stack}
        if kind in blocks:
            return blocks[kind](*[composition(c) for c in children])
    raise ValueError(f"active: expected null, a name, or {{'fuse'|'stack': [...]}}, got {spec!r}")


@torch.no_grad()
def randomize(model, marker: str, random: dict) -> list:
    """Overwrite every parameter whose name contains `marker` with N(0, std) draws,
    in name order, from a generator seeded per entry (so that the up projections
    are not ~0 and the adapters' math shows in the output)."""
    gen = torch.Generator().manual_seed(int(random.get("seed", 0)))
    std = float(random["std"])
    names = []
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if marker in name:
            param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * std)
            names.append(name)
    if not names:
        raise ValueError(f"random: no parameter of the model contains {marker!r}")
    return names


def saved_dir(path: str) -> dict:
    files = sorted(os.listdir(path))
    out = {"dir": path, "files": files, "configs": {}, "weights": {}}
    for f in files:
        if f.endswith(".json"):
            with open(os.path.join(path, f)) as fh:
                out["configs"][f] = json.load(fh)
        if f in WEIGHT_FILES:
            out["weights"][f] = shapes(read_weights(os.path.join(path, f)))
    return out


def load_check(model, path: str, marker: str) -> dict:
    """The library loads adapter weights non-strictly (missing keys are only
    logged), so compare the file with the model ourselves: which file keys found
    no model tensor, which model tensors of this adapter the file lacks, and
    whether the loaded values equal the file's."""
    files = [f for f in WEIGHT_FILES if os.path.exists(os.path.join(path, f)) and "head" not in f]
    file_state = read_weights(os.path.join(path, files[0]))
    model_state = {k: v for k, v in model.state_dict().items() if marker in k}
    prefix = model.base_model_prefix + "."
    matched, unexpected, differ = set(), [], []
    for key, value in file_state.items():
        hit = next((k for k in (key, prefix + key, key.removeprefix(prefix)) if k in model_state), None)
        if hit is None:
            unexpected.append(key)
            continue
        matched.add(hit)
        if not torch.equal(model_state[hit], value.to(model_state[hit].dtype)):
            differ.append(key)
    return {"weights_file": files[0], "unexpected": sorted(unexpected),
            "missing": sorted(set(model_state) - matched), "values_differ": sorted(differ)}


def head_check(model, path: str):
    """With a head file beside the adapter, load_adapter (with_head) copies it
    into the model's head when head_config.json names this model class: which of
    its tensors the model now holds exactly, and which differ or are not there."""
    files = [f for f in ("model_head.safetensors", "pytorch_model_head.bin") if os.path.exists(os.path.join(path, f))]
    if not files:
        return None
    state = model.state_dict()
    equal, differ, unexpected = [], [], []
    for key, value in read_weights(os.path.join(path, files[0])).items():
        if key not in state:
            unexpected.append(key)
        else:
            (equal if torch.equal(state[key], value.to(state[key].dtype)) else differ).append(key)
    return {"weights_file": files[0], "equal": sorted(equal), "values_differ": sorted(differ),
            "unexpected": sorted(unexpected)}


def _with_head(entry: dict) -> dict:
    # Only models with a head (adapters.init on a *For... class) take with_head.
    return {"with_head": entry["with_head"]} if "with_head" in entry else {}


def run_case(case: dict) -> dict:
    model, loading_info = load_model(case)
    res = {"model_class": type(model).__name__, "base_loading_info": loading_info}
    base_keys = set(model.state_dict())
    if case.get("init", True):
        adapters.init(model)

    for entry in case.get("add_adapters", []):
        config = AdapterConfig.load(entry["config"], **entry.get("overrides", {}))
        model.add_adapter(entry["name"], config=config)
        if entry.get("random"):
            randomize(model, f"adapters.{entry['name']}.", entry["random"])
    if case.get("random_head"):  # a trained head, as a task adapter's would be
        randomize(model, "classifier", case["random_head"])
    for entry in case.get("add_fusions", []):
        config = AdapterFusionConfig.load(entry.get("config", "dynamic"), **entry.get("overrides", {}))
        model.add_adapter_fusion(Fuse(*entry["adapters"]), config=config)
        if entry.get("random"):
            randomize(model, f"adapter_fusion_layer.{','.join(entry['adapters'])}.", entry["random"])

    res["loaded"] = []
    for entry in case.get("load_adapters", []):
        info = {}
        name = model.load_adapter(entry["dir"], load_as=entry.get("load_as"), leave_out=entry.get("leave_out"),
                                  use_safetensors=entry.get("use_safetensors", True), loading_info=info,
                                  **_with_head(entry))
        res["loaded"].append({"dir": entry["dir"], "name": name, "loading_info": info,
                              "check": load_check(model, entry["dir"], f"adapters.{name}."),
                              "head": head_check(model, entry["dir"])})
    for entry in case.get("load_fusions", []):
        name = model.load_adapter_fusion(entry["dir"], load_as=entry.get("load_as"),
                                         use_safetensors=entry.get("use_safetensors", True))
        if name is None:  # the library's models with heads return nothing here: the name is the saved one
            with open(os.path.join(entry["dir"], "adapter_fusion_config.json")) as fh:
                name = entry.get("load_as") or json.load(fh)["name"]
        res["loaded"].append({"dir": entry["dir"], "name": name,
                              "check": load_check(model, entry["dir"], f"adapter_fusion_layer.{name}.")})

    if case.get("active") is not None:
        model.set_active_adapters(composition(case["active"]))
    res["active"] = str(model.adapters_config.active_setup) if hasattr(model, "adapters_config") else None
    model.eval()

    state = model.state_dict()
    res["added_state"] = shapes({k: v for k, v in state.items() if k not in base_keys})
    if hasattr(model, "adapters_config"):
        res["adapter_configs"] = {n: model.adapters_config.get(n).to_dict() for n in model.adapters_config.adapters}

    if case.get("inputs"):
        batch = {k: v for k, v in load_file(case["inputs"]).items() if k in MODEL_INPUTS}
        with torch.no_grad():
            out = model(**batch)
        key = "logits" if "logits" in out else "last_hidden_state"
        res["output_key"] = key
        res["output_shape"] = list(out[key].shape)
        if case.get("output"):
            save_file({"output": out[key].contiguous()}, case["output"])

    res["saved"] = []
    for entry in case.get("save_adapters", []):
        model.save_adapter(entry["dir"], entry["name"], use_safetensors=entry.get("use_safetensors", False),
                           **_with_head(entry))
        res["saved"].append(saved_dir(entry["dir"]))
    for entry in case.get("save_fusions", []):
        model.save_adapter_fusion(entry["dir"], ",".join(entry["adapters"]),
                                  use_safetensors=entry.get("use_safetensors", False))
        res["saved"].append(saved_dir(entry["dir"]))
    if case.get("save_state"):
        # Cloned: tied weights (and init's reference to the embeddings) share storage,
        # which safetensors refuses.
        save_file({k: v.clone().contiguous() for k, v in state.items()}, case["save_state"])
    return res


def main(job_path: str, results_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    torch.manual_seed(0)  # adapter initialisation draws from the global generator
    results = {"versions": {n: md.version(n) for n in ("adapters", "transformers", "torch", "safetensors")},
               "cases": {}}
    for case in job["cases"]:
        try:
            results["cases"][case["id"]] = run_case(case)
        except Exception:
            results["cases"][case["id"]] = {"error": traceback.format_exc()}
    with open(results_path + ".tmp", "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    os.replace(results_path + ".tmp", results_path)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python driver.py JOB.json RESULTS.json")
    sys.exit(main(sys.argv[1], sys.argv[2]))
