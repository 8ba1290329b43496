"""bitsandbytes' on-disk layout of a 4-bit linear layer (Linear4bit's
state_dict, as transformers saves and loads it), written and read without
importing bitsandbytes.

Under a layer's prefix, in bnb's order (QuantState.as_dict(packed=True)):

    weight                                  uint8 [out*in/2, 1]  the NF4 codes, two per byte, first in the high nibble
    bias                                    (if any)
    weight.absmax                           float32 [blocks]; with double quantisation the uint8 8-bit codes of
                                            (absmax - nested_offset), bnb's "qabsmax"
    weight.quant_map                        float32 [16]         the NF4 table
    weight.nested_absmax                    float32 [ceil(blocks/256)]   (double quantisation only)
    weight.nested_quant_map                 float32 [256]        bnb's signed dynamic map (double only)
    weight.quant_state.bitsandbytes__nf4    uint8: JSON of the non-tensor fields, in this order:
                                            quant_type, blocksize, dtype, shape
                                            [, nested_blocksize, nested_dtype, nested_offset]

Every tensor is a fresh one: safetensors refuses tensors that share memory,
and transformers drops shared ones as tied weights (bnb clones its maps for
the same reason).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch

QUANT_STATE_KEY = "quant_state.bitsandbytes__"
# What bnb may write after "weight." (QuantState.valid_qs_keys, as files name them).
TENSOR_FIELDS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@lru_cache(maxsize=None)
def _nf4_table() -> torch.Tensor:
    # The table is what the dequantiser decodes codes 0..15 to at absmax 1:
    # bit-exact with bnb's get_4bit_type("nf4") by the op contract, and one
    # source of truth with the kernels.
    from pypeft import ops
    codes = torch.tensor([0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF], dtype=torch.uint8)
    return ops.nf4_dequantize(codes, torch.ones(1), 64, (16,), torch.float32)


@lru_cache(maxsize=None)
def _dynamic_map() -> torch.Tensor:
    from pypeft import ops
    return ops.dynamic_code_map().float()


def nf4_table(device=None) -> torch.Tensor:
    """bnb's NF4 quant_map, a fresh float32 [16] tensor."""
    return _nf4_table().to(device, copy=True)


def dynamic_map(device=None) -> torch.Tensor:
    """bnb's nested_quant_map (create_dynamic_map(signed=True)), a fresh float32 [256] tensor."""
    return _dynamic_map().to(device, copy=True)


def dtype_name(dtype: torch.dtype) -> str:
    # bnb writes str(dtype).strip("torch."), which is this for every float dtype.
    return str(dtype).removeprefix("torch.")


def pack_json(fields: dict) -> torch.Tensor:
    """bnb's pack_dict_to_tensor: the JSON's UTF-8 bytes as a uint8 tensor."""
    return torch.tensor(list(json.dumps(fields).encode("utf-8")), dtype=torch.uint8)


def unpack_json(tensor: torch.Tensor) -> dict:
    return json.loads(bytes(tensor.detach().cpu().to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))


@dataclass
class Stored:
    """A 4-bit layer as bnb stores it (what NF4Linear saves and loads)."""

    codes: torch.Tensor                      # uint8, flat
    shape: tuple[int, int]                   # (out, in)
    blocksize: int
    dtype: torch.dtype                       # the dtype that was quantised (bnb's QuantState.dtype)
    absmax: torch.Tensor | None = None       # float32 [blocks] (single quantisation)
    nested_codes: torch.Tensor | None = None     # uint8 [blocks] (double quantisation)
    nested_absmax: torch.Tensor | None = None    # float32 [ceil(blocks/nested_blocksize)]
    nested_offset: float | None = None
    nested_blocksize: int = 256


def entries(stored: Stored, device) -> dict[str, torch.Tensor]:
    """The state_dict entries after `weight` (and `bias`), keyed relative to
    'weight.', in bnb's order."""
    out = {"absmax": stored.absmax if stored.nested_codes is None else stored.nested_codes,
           "quant_map": nf4_table(device)}
    fields = {"quant_type": "nf4", "blocksize": stored.blocksize, "dtype": dtype_name(stored.dtype),
              "shape": list(stored.shape)}
    if stored.nested_codes is not None:
        out["nested_absmax"] = stored.nested_absmax
        out["nested_quant_map"] = dynamic_map(device)
        fields.update(nested_blocksize=stored.nested_blocksize, nested_dtype="float32",
                      nested_offset=float(stored.nested_offset))
    out[QUANT_STATE_KEY + "nf4"] = pack_json(fields).to(device)
    return out


class FormatError(ValueError):
    """A checkpoint's 4-bit layer that pypeft cannot read (fp4, a custom map, a wrong shape)."""


def _expect(cond: bool, where: str, what: str, expected, got) -> None:
    if not cond:
        raise FormatError(f"{where}: {what}: expected {expected}, got {got}")


def is_quantized_entry(state_dict, prefix: str) -> bool:
    """Whether the state_dict holds a 4-bit layer at `prefix` (its quant state, in any form)."""
    head = prefix + "weight."
    return any(k.startswith(head) for k in state_dict)


def read(state_dict, prefix: str, shape: tuple[int, int]) -> Stored:
    """The 4-bit layer stored under `prefix`, checked against bnb's layout and
    the layer's (out, in) `shape`; FormatError says what is wrong, where."""
    head = prefix + "weight."
    where = f"NF4Linear.load_state_dict ({prefix or 'top level'})"
    qs_keys = [k for k in state_dict if k.startswith(head + QUANT_STATE_KEY)]
    _expect(len(qs_keys) == 1, where, f"'{head}{QUANT_STATE_KEY}<type>'", "exactly one quant_state entry",
            sorted(qs_keys) or "none")
    quant_type = qs_keys[0].rsplit("__", 1)[-1]
    fields = unpack_json(state_dict[qs_keys[0]])
    _expect(quant_type == "nf4" and fields.get("quant_type") == "nf4", where, "quant_type",
            "'nf4' (pypeft reads bitsandbytes NF4 checkpoints; FP4 is not supported)",
            repr(fields.get("quant_type", quant_type)))
    _expect(fields.get("blocksize") in BNB_BLOCKSIZES, where, "blocksize", f"one of {BNB_BLOCKSIZES}",
            fields.get("blocksize"))
    _expect(tuple(fields.get("shape") or ()) == tuple(shape), where, "shape [out, in]", list(shape),
            fields.get("shape"))
    dtype = getattr(torch, str(fields.get("dtype")), None)
    _expect(isinstance(dtype, torch.dtype) and dtype.is_floating_point, where, "dtype",
            "a floating-point dtype name", fields.get("dtype"))
    blocksize = fields["blocksize"]
    numel = shape[0] * shape[1]
    blocks = -(-numel // blocksize)

    codes = state_dict[prefix + "weight"]
    _expect(codes.dtype == torch.uint8, where, "weight dtype", "torch.uint8 (bnb_4bit_quant_storage='uint8')",
            codes.dtype)
    _expect(codes.numel() == -(-numel // 2), where, "weight size", f"{-(-numel // 2)} bytes ([out*in/2, 1])",
            f"{codes.numel()} ({list(codes.shape)})")
    table = state_dict.get(head + "quant_map")
    _expect(table is not None and torch.equal(table.detach().cpu().float(), nf4_table()), where, "quant_map",
            "bitsandbytes' NF4 table", "another table" if table is not None else "none")
    stored = Stored(codes=codes.reshape(-1), shape=tuple(shape), blocksize=blocksize, dtype=dtype)
    absmax = state_dict.get(head + "absmax")
    _expect(absmax is not None and absmax.numel() == blocks, where, "absmax size", blocks,
            None if absmax is None else absmax.numel())
    if "nested_absmax" in fields or head + "nested_absmax" in state_dict:
        nested_blocksize = fields.get("nested_blocksize")
        _expect(isinstance(nested_blocksize, int) and nested_blocksize > 0, where, "nested_blocksize",
                "a positive int", nested_blocksize)
        _expect(absmax.dtype == torch.uint8, where, "absmax dtype (double quantisation: 8-bit codes)",
                torch.uint8, absmax.dtype)
        nested = state_dict.get(head + "nested_absmax")
        n_nested = -(-blocks // nested_blocksize)
        _expect(nested is not None and nested.numel() == n_nested, where, "nested_absmax size", n_nested,
                None if nested is None else nested.numel())
        nmap = state_dict.get(head + "nested_quant_map")
        _expect(nmap is not None and torch.equal(nmap.detach().cpu().float(), _dynamic_map()), where,
                "nested_quant_map", "bitsandbytes' signed dynamic map", "another map" if nmap is not None else "none")
        _expect(fields.get("nested_dtype") == "float32", where, "nested_dtype", "'float32'", fields.get("nested_dtype"))
        _expect(isinstance(fields.get("nested_offset"), (int, float)), where, "nested_offset", "a number",
                fields.get("nested_offset"))
        stored.nested_codes = absmax.reshape(-1)
        stored.nested_absmax = nested.reshape(-1).float()
        stored.nested_offset = float(fields["nested_offset"])
        stored.nested_blocksize = nested_blocksize
    else:
        _expect(absmax.is_floating_point(), where, "absmax dtype", torch.float32, absmax.dtype)
        stored.absmax = absmax.reshape(-1).float()
    return stored


def known_keys(prefix: str) -> set[str]:
    head = prefix + "weight."
    return {head + f for f in TENSOR_FIELDS} | {head + QUANT_STATE_KEY + t for t in ("nf4", "fp4")}
