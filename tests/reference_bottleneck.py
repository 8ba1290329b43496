"""Plain-PyTorch references for bottleneck adapters and AdapterFusion, written from
the `adapters` library's math (methods/modeling.py: Adapter / ParallelAdapter
pre_forward, forward, post_forward and BertFusion; methods/bottleneck.py:
bottleneck_layer_forward and compose_fuse), in eval mode (no dropout).

The pieces take plain tensors and the library's own config dicts (the "config"
of adapter_config.json / adapter_fusion_config.json), so tests can feed them the
tensors a save wrote. `bert_forward` runs a whole BERT encoder from its state
dict with adapters at both of BERT's places; tests/adapters_oracle/FORMAT.md
says where the other families put them.
"""

from __future__ import annotations

import contextlib
import math
import re

import torch
import torch.nn.functional as F

# The library resolves non_linearity through transformers' ACT2FN (lower-cased);
# these are the plain-torch equivalents of the names its presets use.
ACTIVATIONS = {
    "relu": F.relu,
    "swish": F.silu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leakyrelu": F.leaky_relu,
}

MH, OUT = "mh_adapter", "output_adapter"


def activation(name: str):
    try:
        return ACTIVATIONS[name.lower()]
    except KeyError:
        raise ValueError(f"non_linearity: expected one of {sorted(ACTIVATIONS)}, got {name!r}") from None


def _by_place(state: dict, marker: str) -> dict:
    layers = {}
    for key, value in state.items():
        if marker not in key:
            continue
        where, param = key.split(marker)
        index = int(re.findall(r"\.(\d+)\.", where + ".")[-1])
        # BERT-likes: layer.N.attention.output / layer.N.output; the others:
        # N.attention_adapters / N.output_adapters (FORMAT.md).
        place = MH if (".attention." in where + "." or where.endswith("attention_adapters")) else OUT
        layers.setdefault((index, place), {})[param] = value
    return layers


def adapter_layers(state: dict, name: str) -> dict:
    """Splits a saved adapter's tensors by place: {(layer index, MH or OUT):
    {"adapter_down.0.weight": ..., ...}} (the keys after "adapters.NAME.")."""
    return _by_place(state, f".adapters.{name}.")


def fusion_layers(state: dict, fusion_name: str) -> dict:
    """Splits a saved fusion's tensors by place, as adapter_layers does
    ({"query.weight": ..., "key.weight": ..., "value.weight": ...})."""
    return _by_place(state, f".adapter_fusion_layer.{fusion_name}.")


def _ln(x, w, prefix, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], w[prefix + ".weight"], w[prefix + ".bias"], eps)


def _scaling(config, w):
    return w["scaling"] if config["scaling"] in ("learned", "channel") else float(config["scaling"])


def adapter_block(x, residual, config: dict, w: dict):
    """Adapter.forward / ParallelAdapter.forward: returns (output, up), up being
    the scaled up-projection that AdapterFusion attends over."""
    if config.get("phm_layer"):
        raise NotImplementedError("phm_layer adapters (Compacter) have no reference here")
    down_index = 1 if config["ln_before"] else 0  # the LayerNorm is adapter_down.0 then
    h = _ln(x, w, "adapter_norm_before") if config["ln_before"] else x
    down = activation(config["non_linearity"])(F.linear(h, w[f"adapter_down.{down_index}.weight"],
                                                        w[f"adapter_down.{down_index}.bias"]))
    up = F.linear(down, w["adapter_up.weight"], w["adapter_up.bias"]) * _scaling(config, w)
    out = up
    if config["use_gating"]:
        # One gate per sequence and adapter: the token-mean of a sigmoid.
        out = out * torch.sigmoid(F.linear(x, w["gate.weight"], w["gate.bias"])).mean(dim=1).unsqueeze(-1)
    if config["is_parallel"]:
        return (_ln(out, w, "adapter_norm_after") if config["ln_after"] else out), up
    if config["adapter_residual_before_ln"]:
        out = out + residual
    if config["ln_after"]:
        out = _ln(out, w, "adapter_norm_after")
    if not config["adapter_residual_before_ln"]:
        out = out + residual
    return out, up


def pre_forward(h, x, layer_norm, config: dict, query_before_ln: bool | None = None):
    """Adapter.pre_forward / ParallelAdapter.pre_forward: (hidden, query, residual).
    h is the sublayer's output (after its dropout), x its residual input,
    layer_norm the model's norm after the sublayer (None where the family has
    none there); query only matters under fusion."""
    if config["is_parallel"]:
        return x, x, x
    rbl = config["residual_before_ln"]
    residual = h if rbl is True else None
    query = h if query_before_ln else None
    hidden = h
    if config["original_ln_before"]:
        if layer_norm is not None:
            hidden = hidden + x
            if rbl == "post_add":
                residual = hidden
            hidden = layer_norm(hidden)
        elif x is not None:
            hidden = hidden + x
    if not rbl:
        residual = hidden
    if query_before_ln is False:
        query = hidden
    return hidden, query, residual


def post_forward(out, h, x, layer_norm, config: dict):
    """Adapter.post_forward / ParallelAdapter.post_forward."""
    if config["is_parallel"]:
        out = out + h
    if config["original_ln_after"]:
        out = layer_norm(out + x) if layer_norm is not None else out + x
    return out


def bottleneck_sublayer(h, x, layer_norm, config: dict, w: dict):
    """One adapted sublayer with a single active adapter (what replaces
    `layer_norm(h + x)` or `h + x` in the model)."""
    hidden, _, residual = pre_forward(h, x, layer_norm, config)
    out, _ = adapter_block(hidden, residual, config, w)
    return post_forward(out, h, x, layer_norm, config)


def fusion_attention(query, ups, residual, fusion_config: dict, w: dict, temperature: float = 1.0):
    """BertFusion.forward: ups is [batch, tokens, adapters, hidden]. temperature
    is the library's T: 1.0 unless the config's "temperature" is set (then it
    starts at 50 and drops by 0.05 on every forward call, a state the caller keeps)."""
    value = ups
    if fusion_config["residual_before"]:
        value = value + residual[:, :, None, :]
    q = F.linear(query, w["query.weight"], w["query.bias"]) if fusion_config["query"] else query
    k = F.linear(ups, w["key.weight"], w["key.bias"]) if fusion_config["key"] else ups
    if fusion_config["value"] and fusion_config["value_before_softmax"]:
        value = F.linear(value, w["value.weight"])
    if not (fusion_config["query"] or fusion_config["key"] or fusion_config["value"]):
        raise NotImplementedError("a fusion without query, key and value (its `dense` layer) has no reference here")
    scores = torch.matmul(q.unsqueeze(2), k.transpose(-2, -1)).squeeze(2)
    probs = torch.softmax(scores / temperature, dim=-1)
    context = torch.matmul(probs.unsqueeze(2), value).squeeze(2)
    if fusion_config["value"] and not fusion_config["value_before_softmax"]:
        context = F.linear(context, w["value.weight"])
    if not fusion_config["residual_before"]:
        context = context + residual
    return context


def fused_sublayer(h, x, layer_norm, configs: list, weights: list, fusion_config: dict, fusion_w: dict):
    """compose_fuse + post_forward: the LAST adapter's config decides the
    pre/post steps (residual, norms, query), every adapter contributes its
    scaled up-projection."""
    last = configs[-1]
    hidden, query, residual = pre_forward(h, x, layer_norm, last, fusion_config["query_before_ln"])
    ups = torch.stack([adapter_block(hidden, residual, c, w)[1] for c, w in zip(configs, weights)], dim=2)
    out = fusion_attention(query, ups, residual, fusion_config, fusion_w)
    return post_forward(out, h, x, layer_norm, last)


def adapted(h, x, layer_norm, place, index, adapters, active=None, fusion=None):
    """What the active adapter (or fusion) makes of one sublayer at (index,
    place), or None where none of them sits there (the model's own sum stays).
    adapters: {name: (config dict, adapter_layers(...))}; fusion: (names, fusion
    config dict, fusion_layers(...))."""
    if fusion is not None:
        names, fusion_config, flayers = fusion
        if (index, place) in flayers and all((index, place) in adapters[n][1] for n in names):
            return fused_sublayer(h, x, layer_norm, [adapters[n][0] for n in names],
                                  [adapters[n][1][(index, place)] for n in names], fusion_config,
                                  flayers[(index, place)])
    elif active is not None and (index, place) in adapters[active][1]:
        return bottleneck_sublayer(h, x, layer_norm, adapters[active][0], adapters[active][1][(index, place)])
    return None


def bert_forward(state: dict, config, input_ids, attention_mask, adapters: dict | None = None,
                 active: str | None = None, fusion: tuple | None = None) -> torch.Tensor:
    """last_hidden_state of a BERT encoder (eval mode) from its state dict
    (keys with or without the "bert." prefix) and its BertConfig.

    adapters: {name: (adapter config dict, adapter_layers(...))}; active: the one
    adapter to run; or fusion: (names, fusion config dict, fusion_layers(...)) to
    run AdapterFusion over those adapters instead."""
    adapters = adapters or {}
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in state else ""

    def p(key):
        return state[prefix + key]

    def norm(key):
        return lambda t: F.layer_norm(t, t.shape[-1:], p(key + ".weight"), p(key + ".bias"), config.layer_norm_eps)

    def linear(t, key):
        return F.linear(t, p(key + ".weight"), p(key + ".bias"))

    batch, tokens = input_ids.shape
    pos = torch.arange(tokens)
    h = p("embeddings.word_embeddings.weight")[input_ids] + p("embeddings.position_embeddings.weight")[pos] \
        + p("embeddings.token_type_embeddings.weight")[torch.zeros_like(input_ids)]
    h = norm("embeddings.LayerNorm")(h)
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    bias = torch.zeros(batch, 1, 1, tokens).masked_fill(attention_mask[:, None, None, :] == 0, float("-inf"))
    act = activation(config.hidden_act)
    for i in range(config.num_hidden_layers):
        layer = f"encoder.layer.{i}."

        def split(t):
            return t.view(batch, tokens, heads, head_dim).transpose(1, 2)

        q, k, v = (split(linear(h, layer + f"attention.self.{n}")) for n in ("query", "key", "value"))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim) + bias, dim=-1)
        ctx = (probs @ v).transpose(1, 2).reshape(batch, tokens, config.hidden_size)
        attn = linear(ctx, layer + "attention.output.dense")
        ln = norm(layer + "attention.output.LayerNorm")
        out = adapted(attn, h, ln, MH, i, adapters, active, fusion)
        h = ln(attn + h) if out is None else out
        ffn = linear(act(linear(h, layer + "intermediate.dense")), layer + "output.dense")
        ln = norm(layer + "output.LayerNorm")
        out = adapted(ffn, h, ln, OUT, i, adapters, active, fusion)
        h = ln(ffn + h) if out is None else out
    return h


def _norm(module):
    # The module's own norm as a function: calling the module inside its own
    # hook would run the hook again.
    return lambda t: F.layer_norm(t, module.normalized_shape, module.weight, module.bias, module.eps)


@contextlib.contextmanager
def eager_hooks(model, adapters: dict, active: str | None = None, fusion: tuple | None = None):
    """Runs a transformers-5 model (eval mode) with the library's adapters
    computed by `adapted` at the library's places, through forward hooks: the
    model's own modules and weights do the rest. BERT-likes and DistilBERT
    (post-norm) are exact; GPT-2 and Llama-likes add the residual in the block's
    own code, so their hooks return `adapted - x` (a rounding error's difference)."""
    kind = model.config.model_type
    base = model.base_model
    handles, seen = [], {}

    def run(h, x, ln, place, i):
        return adapted(h, x, ln, place, i, adapters, active, fusion)

    def post_norm(module, place, i):  # BertSelfOutput / BertOutput: (hidden_states, input_tensor)
        def hook(mod, args, out):
            h = mod.dropout(mod.dense(args[0]))
            res = run(h, args[1], _norm(mod.LayerNorm), place, i)
            return out if res is None else res
        handles.append(module.register_forward_hook(hook))

    def remember(module, key, what="input"):
        def pre(mod, args, kwargs):
            seen[key] = args[0] if args else next(iter(kwargs.values()))
        def post(mod, args, out):
            seen[key] = out[0] if isinstance(out, tuple) else out
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True) if what == "input"
                       else module.register_forward_hook(post))

    def pre_norm(module, place, i, key):  # returns adapted - x, the block adds x back
        def hook(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            res = run(h, seen[key], None, place, i)
            if res is None:
                return out
            res = res - seen[key]
            return (res,) + tuple(out[1:]) if isinstance(out, tuple) else res
        handles.append(module.register_forward_hook(hook))

    def distil_norm(module, place, i, h_key, x_key):  # sa_layer_norm(sa + x), output_layer_norm(ffn + sa)
        def hook(mod, args, out):
            res = run(seen[h_key], seen[x_key], _norm(mod), place, i)
            return out if res is None else res
        handles.append(module.register_forward_hook(hook))

    try:
        if kind in ("bert", "roberta"):
            for i, layer in enumerate(base.encoder.layer):
                post_norm(layer.attention.output, MH, i)
                post_norm(layer.output, OUT, i)
        elif kind == "distilbert":
            for i, block in enumerate(base.transformer.layer):
                remember(block, f"x{i}")
                remember(block.attention, f"sa{i}", "output")
                distil_norm(block.sa_layer_norm, MH, i, f"sa{i}", f"x{i}")
                remember(block.ffn, f"ffn_in{i}")
                remember(block.ffn, f"ffn{i}", "output")
                distil_norm(block.output_layer_norm, OUT, i, f"ffn{i}", f"ffn_in{i}")
        elif kind == "gpt2":
            for i, block in enumerate(base.h):
                remember(block.ln_1, f"x{i}")
                pre_norm(block.attn, MH, i, f"x{i}")
                remember(block.ln_2, f"x1{i}")
                pre_norm(block.mlp, OUT, i, f"x1{i}")
        elif kind in ("llama", "mistral", "qwen2"):
            for i, layer in enumerate(base.layers):
                remember(layer.input_layernorm, f"x{i}")
                pre_norm(layer.self_attn, MH, i, f"x{i}")
                remember(layer.post_attention_layernorm, f"x1{i}")
                pre_norm(layer.mlp, OUT, i, f"x1{i}")
        else:
            raise ValueError(f"model: expected a bert, roberta, distilbert, gpt2 or llama-like model, got {kind!r}")
        yield model
    finally:
        for handle in handles:
            handle.remove()
