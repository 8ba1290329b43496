"""NF4Linear: a frozen linear layer stored in NF4 (QLoRA's 4-bit NormalFloat),
bit-exact with bitsandbytes' Linear4bit(quant_type="nf4") and saved in its
state_dict layout (pypeft/quant/bnb_format.py), so that transformers +
bitsandbytes load what pypeft saves and the other way round.

Storage (the op contract, docs in pypeft/ops/nf4.py):
- `weight`: nn.Parameter(uint8 [out, in // 2], requires_grad=False), two
  codes per byte along in_features, the first in the high nibble.
- single quantisation: `absmax` float32 [ceil(out * in / blocksize)];
  double quantisation (QLoRA's, bnb's compress_statistics): `nested_codes`
  uint8 [blocks], `nested_absmax` float32 [ceil(blocks / 256)] and
  `nested_offset` float32 0-dim; absmax is decoded from them per forward.
- `bias`: a float Parameter, frozen by default (BitFit may train it).

dtypes, as bitsandbytes' Linear4bit: forward casts x to `compute_dtype`,
runs pypeft.ops.nf4_linear there, and returns the result in x's dtype.
`.to(dtype)` casts the bias only: the codes and the float32 absmax
statistics keep their bits (casting them would change the quantised
weights), and compute_dtype stays what it was (bnb's Linear4bit keeps its
compute_dtype too; transformers refuses to cast a bnb model's dtype at all).
`.to(device)` moves everything.
"""

from __future__ import annotations

import torch
from torch import nn

from pypeft.quant import bnb_format
from pypeft.quant.bnb_format import BNB_BLOCKSIZES, Stored

NESTED_BLOCKSIZE = 256  # bnb's quantize_4bit(compress_statistics=True) always uses 256
_STATS = ("absmax", "nested_codes", "nested_absmax", "nested_offset")  # the weight's statistics buffers
_FLOAT_STATS = ("absmax", "nested_absmax", "nested_offset")  # float32 buffers no dtype cast may touch
COMPUTE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _ops():
    # Looked up per call: pypeft.ops loads the native library once.
    from pypeft import ops
    return ops


def check_blocksize(blocksize, owner: str) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BNB_BLOCKSIZES:
        raise ValueError(f"{owner}: argument 'blocksize': expected one of {BNB_BLOCKSIZES} (bitsandbytes' "
                         f"blocksizes), got {blocksize!r}")
    return blocksize


def check_compute_dtype(dtype, owner: str, allow_none: bool = False):
    if dtype is None and allow_none:
        return None
    if dtype not in COMPUTE_DTYPES:
        raise TypeError(f"{owner}: argument 'compute_dtype': expected one of "
                        f"{[str(d) for d in COMPUTE_DTYPES]}{' or None' if allow_none else ''}, got {dtype!r}")
    return dtype


class NF4Linear(nn.Module):
    """y = x @ W^T + b with W stored in NF4. Build one with
    NF4Linear.from_linear(linear); the constructor makes an empty shell (zero
    codes) that load_state_dict fills (a bnb 4-bit checkpoint, or full
    precision weights, which it quantises)."""

    # pypeft/models/linear.py's protocol for quantised frozen linear layers:
    # LoRA, VeRA, TokenTune, BitFit run over this layer through op_operands().
    quantized_linear = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                 weight_dtype: torch.dtype | None = None, from_conv1d: bool = False, device=None):
        super().__init__()
        for arg, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"NF4Linear: argument '{arg}': expected a positive int, got {value!r}")
        if in_features % 2:
            raise ValueError(f"NF4Linear: argument 'in_features': expected an even number (NF4 packs two weights "
                             f"per byte along in_features), got {in_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.blocksize = check_blocksize(blocksize, "NF4Linear")
        self.compute_dtype = check_compute_dtype(compute_dtype, "NF4Linear")
        # The dtype the weights had when quantised: what bnb's checkpoint calls
        # QuantState.dtype, and what dequantized_weight() returns by default.
        self.weight_dtype = weight_dtype or compute_dtype
        # transformers' Conv1D stores W as [in, out]; the layer holds W as
        # [out, in] (as bnb does for GPT-2), and transposes full-precision
        # weights of such a layer when it loads them.
        self.from_conv1d = from_conv1d
        self.weight = nn.Parameter(torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=self.weight_dtype, device=device),
                                  requires_grad=False) if bias else None)
        blocks = self.num_blocks
        self.nested_blocksize = NESTED_BLOCKSIZE
        if double_quant:
            self._set_stats(nested_codes=torch.zeros(blocks, dtype=torch.uint8, device=device),
                            nested_absmax=torch.zeros(-(-blocks // NESTED_BLOCKSIZE), device=device),
                            nested_offset=torch.zeros((), device=device))
        else:
            self._set_stats(absmax=torch.zeros(blocks, device=device))

    # --- building --------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Module, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        """The NF4 layer of an nn.Linear, or of transformers' Conv1D (whose
        [in, out] weight is quantised as W^T, i.e. stored [out, in] as bnb
        does). `linear` is left unchanged (its bias is copied);
        compute_dtype defaults to the weight's dtype."""
        transposed = _is_conv1d(linear)
        if not (isinstance(linear, nn.Linear) or transposed):
            raise TypeError(f"NF4Linear.from_linear: argument 'linear': expected torch.nn.Linear or transformers "
                            f"Conv1D, got {type(linear).__name__}")
        w = linear.weight.detach()
        if w.is_meta:
            raise ValueError("NF4Linear.from_linear: argument 'linear': its weight is on the meta device (no values "
                             "to quantise); build NF4Linear(...) on meta and load_state_dict instead")
        if not w.is_floating_point():
            raise TypeError(f"NF4Linear.from_linear: argument 'linear': expected a floating-point weight, "
                            f"got {w.dtype}")
        w = w.t() if transposed else w
        out_features, in_features = w.shape
        if in_features % 2:
            raise ValueError(f"NF4Linear.from_linear: argument 'linear': expected an even in_features (NF4 packs two "
                             f"weights per byte along in_features), got {in_features}")
        check_compute_dtype(compute_dtype, "NF4Linear.from_linear", allow_none=True)
        with torch.device("meta"):
            layer = cls(in_features, out_features, linear.bias is not None, blocksize=blocksize,
                        double_quant=double_quant, compute_dtype=compute_dtype or w.dtype, weight_dtype=w.dtype,
                        from_conv1d=transposed)
        layer.quantize_(w)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        layer.train(linear.training)
        return layer

    @torch.no_grad()
    def quantize_(self, w: torch.Tensor) -> "NF4Linear":
        """Replace the stored weights by NF4 of `w` ([out, in], any float
        dtype), keeping blocksize and double_quant, on w's device."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"NF4Linear.quantize_: argument 'w': expected shape "
                             f"[{self.out_features}, {self.in_features}], got {list(w.shape)}")
        ops = _ops()
        codes, absmax = ops.nf4_quantize(w.contiguous(), self.blocksize)
        self.weight = nn.Parameter(codes.view(self.out_features, self.in_features // 2), requires_grad=False)
        self.weight_dtype = w.dtype
        if self.double_quant:
            nested_codes, nested_absmax, offset = ops.nf4_double_quantize(absmax, NESTED_BLOCKSIZE)
            self.nested_blocksize = NESTED_BLOCKSIZE
            self._set_stats(nested_codes=nested_codes, nested_absmax=nested_absmax, nested_offset=offset)
        else:
            self._set_stats(absmax=absmax)
        if self.bias is not None and self.bias.is_meta:
            self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=w.dtype, device=w.device),
                                     requires_grad=False)
        return self

    def storage_snapshot(self) -> dict:
        """A copy of everything the layer stores for its weight (codes,
        statistics, blocksize, dtype): restore_storage() puts it back exactly
        (unmerge after a merge requantised the layer)."""
        stats = {n: b.detach().clone() for n, b in self._buffers.items() if n in _STATS}
        return {"weight": self.weight.detach().clone(), "weight_dtype": self.weight_dtype,
                "blocksize": self.blocksize, "nested_blocksize": self.nested_blocksize, "stats": stats}

    @torch.no_grad()
    def restore_storage(self, snapshot: dict) -> None:
        self.weight = nn.Parameter(snapshot["weight"], requires_grad=False)
        self.weight_dtype = snapshot["weight_dtype"]
        self.blocksize = snapshot["blocksize"]
        self.nested_blocksize = snapshot["nested_blocksize"]
        self._set_stats(**snapshot["stats"])

    def _set_stats(self, **buffers: torch.Tensor) -> None:
        for name in _STATS:
            self._buffers.pop(name, None)
            self._non_persistent_buffers_set.discard(name)
        for name, tensor in buffers.items():
            # Not persistent: _save_to_state_dict writes bnb's layout instead.
            self.register_buffer(name, tensor, persistent=False)

    # --- reading -----------------------------------------------------------------------

    @property
    def double_quant(self) -> bool:
        return "nested_codes" in self._buffers

    @property
    def num_blocks(self) -> int:
        return -(-self.out_features * self.in_features // self.blocksize)

    def dequantized_absmax(self) -> torch.Tensor:
        """The per-block absmax, float32 [blocks] (decoded from the nested
        statistics when double-quantised), as nf4_linear and the adapter ops
        over an NF4 base take it."""
        if not self.double_quant:
            return self.absmax
        return _ops().nf4_double_dequantize(self.nested_codes, self.nested_absmax, self.nested_offset,
                                            self.nested_blocksize)

    def op_operands(self) -> tuple[torch.Tensor, dict]:
        """What pypeft's linear ops take for this weight: the codes, and
        keyword arguments saying they are NF4 (pypeft/models/linear.py)."""
        return self.weight, {"weight_absmax": self.dequantized_absmax(), "weight_blocksize": self.blocksize}

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W as [out, in] (for a Conv1D source: its weight transposed), in
        `dtype` (default: the dtype it was quantised from, as bnb's
        dequantize_4bit)."""
        return _ops().nf4_dequantize(self.weight.reshape(-1), self.dequantized_absmax(), self.blocksize,
                                     (self.out_features, self.in_features), dtype or self.weight_dtype)

    def stored(self) -> Stored:
        s = Stored(codes=self.weight.detach().reshape(-1), shape=(self.out_features, self.in_features),
                   blocksize=self.blocksize, dtype=self.weight_dtype)
        if self.double_quant:
            s.nested_codes, s.nested_absmax = self.nested_codes, self.nested_absmax
            # a shell on the meta device has no offset to write (its state_dict only names things)
            offset = self.nested_offset
            s.nested_offset = 0.0 if offset.is_meta else float(offset)
            s.nested_blocksize = self.nested_blocksize
        else:
            s.absmax = self.absmax
        return s

    # --- running -----------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x if x.dtype == self.compute_dtype else x.to(self.compute_dtype)
        bias = self.bias
        if bias is not None and bias.dtype != xc.dtype:
            bias = bias.to(xc.dtype)  # differentiable: a trained bias (BitFit) gets its gradient
        y = _ops().nf4_linear(xc, self.weight, self.dequantized_absmax(), self.blocksize, bias)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")

    # --- moving --------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) casts every floating-point buffer; the float32
        # statistics must keep their bits. fn sees them as bytes, so a device
        # move applies and a dtype cast does not (it skips non-float tensors).
        shapes = {}
        for name in _FLOAT_STATS:
            buf = self._buffers.get(name)
            if buf is not None:
                shapes[name] = buf.shape
                self._buffers[name] = buf.reshape(-1).view(torch.uint8)
        try:
            return super()._apply(fn, recurse)
        finally:
            for name, shape in shapes.items():
                self._buffers[name] = self._buffers[name].view(torch.float32).reshape(shape)

    # --- state_dict: bitsandbytes' layout ------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight.detach().reshape(-1, 1)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for key, value in bnb_format.entries(self.stored(), self.weight.device).items():
            destination[prefix + "weight." + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        known = {prefix + "weight", prefix + "bias"} | bnb_format.known_keys(prefix)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known)
        try:
            self._load_weight(state_dict, prefix, missing_keys)
            self._load_bias(state_dict, prefix, missing_keys, unexpected_keys)
        except (ValueError, TypeError) as e:
            error_msgs.append(str(e))

    def _load_weight(self, state_dict, prefix, missing_keys) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        w = state_dict[key]
        device = w.device if self.weight.is_meta else self.weight.device
        if bnb_format.is_quantized_entry(state_dict, prefix):
            stored = bnb_format.read(state_dict, prefix, (self.out_features, self.in_features))
            self._assign(stored, device)
            return
        # Full-precision weights (a plain checkpoint): quantise them here, so a
        # model of NF4 shells loads an ordinary checkpoint layer by layer.
        if not w.is_floating_point():
            raise bnb_format.FormatError(
                f"NF4Linear.load_state_dict: '{key}': expected NF4 codes with their quant state ('{key}.absmax', "
                f"'{key}.quant_state.bitsandbytes__nf4', ...) or a floating-point weight, got {w.dtype} without them")
        full = (self.in_features, self.out_features) if self.from_conv1d else (self.out_features, self.in_features)
        if tuple(w.shape) != full:
            raise bnb_format.FormatError(f"NF4Linear.load_state_dict: '{key}': expected a weight of shape {list(full)}"
                                         f"{' (Conv1D: [in, out])' if self.from_conv1d else ''}, got {list(w.shape)}")
        self.quantize_((w.t() if self.from_conv1d else w).to(device))

    def _assign(self, s: Stored, device) -> None:
        self.blocksize = s.blocksize
        self.weight_dtype = s.dtype
        self.weight = nn.Parameter(s.codes.to(device, torch.uint8, copy=True).view(self.out_features,
                                                                                    self.in_features // 2),
                                   requires_grad=False)
        if s.nested_codes is not None:
            self.nested_blocksize = s.nested_blocksize
            self._set_stats(nested_codes=s.nested_codes.to(device, torch.uint8, copy=True),
                            nested_absmax=s.nested_absmax.to(device, torch.float32, copy=True),
                            nested_offset=torch.tensor(s.nested_offset, dtype=torch.float32, device=device))
        else:
            self._set_stats(absmax=s.absmax.to(device, torch.float32, copy=True))

    @torch.no_grad()
    def _load_bias(self, state_dict, prefix, missing_keys, unexpected_keys) -> None:
        key = prefix + "bias"
        if self.bias is None:
            if key in state_dict:
                unexpected_keys.append(key)
            return
        if key not in state_dict:
            missing_keys.append(key)
            return
        b = state_dict[key]
        if tuple(b.shape) != (self.out_features,):
            raise bnb_format.FormatError(f"NF4Linear.load_state_dict: '{key}': expected shape [{self.out_features}], "
                                         f"got {list(b.shape)}")
        if self.bias.is_meta:
            self.bias = nn.Parameter(b.detach().to(self.weight.device, copy=True), requires_grad=False)
        else:
            self.bias.copy_(b)


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)
