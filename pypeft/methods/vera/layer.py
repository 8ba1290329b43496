"""VeRA (Kopiczko et al., ICLR 2024): vector-based random matrix adaptation.

Every adapted layer shares two frozen random matrices, A ([r, max_in]) and B
([max_out, r]), sliced per layer (A_s = A[:, :in], B_s = B[:out, :]), and
trains only two vectors: h = W₀x + λ_b ⊙ B_s (λ_d ⊙ A_s drop(x)).

Conventions are PEFT's, so adapters move between pypeft and `peft` both ways:
A and B are Kaiming-uniform draws from a CPU torch.Generator seeded with the
projection seed (PEFT's projection_prng_key), A first, sized by the largest
targeted layer; λ_d starts at d_initial and λ_b at zero (the patched model
starts equal to the base). The matrices live once per model, in one
VeraProjections module that every VeRA layer holds (so .to() moves them once
and every layer's view shares one storage); every VeRA adapter on a model
shares them, so all must agree on the seed and on r.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pypeft.methods.adapted_linear import AdaptedLinear, default_adapter_dtype
from pypeft.methods.config_checks import check_dropout, check_finite
from pypeft.methods.vera.config import VeraConfig
from pypeft.models.linear import compute_dtype, frozen_operands
from pypeft.ops.vera_linear import vera_linear
from pypeft.ops.mixed_linear import vera_linear_mixed
from pypeft.ops.token_subset_linear import token_subset_vera_linear


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    # PEFT's draw, operation for operation (fan_in = size(1), gain √2), so
    # that the same seed gives bitwise the same matrices.
    fan_in = shape[1]
    std = math.sqrt(2) / math.sqrt(fan_in)
    bound = math.sqrt(3.0) * std
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def generate_projections(r: int, max_in: int, max_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, max_in], B [max_out, r]) in float32, exactly as PEFT draws them."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    a = _kaiming_uniform((r, max_in), generator)
    b = _kaiming_uniform((max_out, r), generator)
    return a, b


class VeraProjections(nn.Module):
    """The frozen matrices shared by a model's VeRA layers. Buffers are not
    persistent: a model's state_dict does not repeat them per layer; pypeft's
    save_adapter writes them once (or the seed regenerates them)."""

    def __init__(self, vera_a: torch.Tensor, vera_b: torch.Tensor, seed: int):
        super().__init__()
        self.register_buffer("vera_A", vera_a, persistent=False)
        self.register_buffer("vera_B", vera_b, persistent=False)
        self.seed = seed

    @property
    def r(self) -> int:
        return self.vera_A.shape[0]

    @property
    def max_in(self) -> int:
        return self.vera_A.shape[1]

    @property
    def max_out(self) -> int:
        return self.vera_B.shape[0]

    @classmethod
    def for_layers(cls, config: VeraConfig, dims: list[tuple[int, int]], like: nn.Module) -> "VeraProjections":
        """dims: (in, out) of every targeted layer; like: a base layer (its device and compute dtype)."""
        max_in, max_out = max(d[0] for d in dims), max(d[1] for d in dims)
        a, b = generate_projections(config.r, max_in, max_out, config.projection_seed)
        factory = {"device": like.weight.device, "dtype": default_adapter_dtype(compute_dtype(like))}
        return cls(a.to(**factory), b.to(**factory), config.projection_seed)

    def check_compatible(self, config: VeraConfig, layers: dict[str, tuple[int, int]], owner: str) -> None:
        """A new VeRA adapter must fit the matrices the model already has."""
        if config.projection_seed != self.seed:
            raise ValueError(f"{owner}: argument 'projection_seed': every VeRA adapter on a model shares its "
                             f"random matrices; expected {self.seed} (the existing adapters'), got "
                             f"{config.projection_seed}")
        if config.r != self.r:
            raise ValueError(f"{owner}: argument 'r': every VeRA adapter on a model shares its random matrices; "
                             f"expected {self.r} (the existing adapters'), got {config.r}")
        for name, (n_in, n_out) in layers.items():
            if n_in > self.max_in or n_out > self.max_out:
                raise ValueError(
                    f"{owner}: layer {name!r} is [out={n_out}, in={n_in}] but the shared VeRA matrices cover "
                    f"[out<={self.max_out}, in<={self.max_in}] (sized by the first VeRA adapter's layers); "
                    "patch the largest layers with the first adapter")

    def extra_repr(self) -> str:
        return f"r={self.r}, max_in={self.max_in}, max_out={self.max_out}, seed={self.seed}"


class VeraLinear(AdaptedLinear):
    """A frozen linear layer plus named VeRA adapters (λ_d, λ_b each) over
    the model's shared VeraProjections; the active one runs in one native op."""

    adapter_dicts = ("vera_lambda_d", "vera_lambda_b")
    method = "vera"

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_lambda_b = nn.ParameterDict()
        self.dropout: dict[str, float] = {}
        self.projections: VeraProjections | None = None

    def add_adapter(self, name: str, projections: VeraProjections, d_initial: float = 0.1,
                    dropout: float = 0.0) -> None:
        check_finite("VeraLinear", "d_initial", d_initial)
        check_dropout("VeraLinear", dropout)
        self._check_new_name(name)
        if self.projections is not None and projections is not self.projections:
            raise ValueError("VeraLinear: argument 'projections': this layer's adapters use other shared matrices")
        n_in, n_out = self.in_features, self.out_features
        if n_in > projections.max_in or n_out > projections.max_out:
            raise ValueError(f"VeraLinear: argument 'projections': the layer is [out={n_out}, in={n_in}] but the "
                             f"shared matrices cover [out<={projections.max_out}, in<={projections.max_in}]")
        self.projections = projections
        projections.train(self.training)  # holds no parameters: only so no module of a model in eval() trains
        factory = {"device": projections.vera_A.device, "dtype": projections.vera_A.dtype}
        self.vera_lambda_d[name] = nn.Parameter(torch.full((projections.r,), float(d_initial), **factory))
        self.vera_lambda_b[name] = nn.Parameter(torch.zeros(n_out, **factory))
        self.dropout[name] = float(dropout)

    def _forget(self, name: str) -> None:
        del self.dropout[name]
        if not self.dropout:
            self.projections = None  # the next VeRA adapter may bring new shared matrices

    def delta_weight(self, name: str) -> torch.Tensor:
        """(λ_b ⊙ B_s)(λ_d ⊙ A_s) as [out, in], in float32 (or float64)."""
        ld, lb = self.vera_lambda_d[name], self.vera_lambda_b[name]
        dtype = torch.float64 if ld.dtype == torch.float64 else torch.float32
        a_s = self.projections.vera_A[:, :self.in_features].to(dtype)
        b_s = self.projections.vera_B[:self.out_features].to(dtype)
        return (lb.to(dtype)[:, None] * b_s) @ (ld.to(dtype)[:, None] * a_s)

    def _adapter_forward(self, x: torch.Tensor, name: str, positions: torch.Tensor | None) -> torch.Tensor:
        p = self.dropout[name] if self.training else 0.0
        weight, bias, base = frozen_operands(self.base_layer, x)
        args = (x, weight, bias, self.projections.vera_A, self.projections.vera_B, self.vera_lambda_d[name],
                self.vera_lambda_b[name], p, self.dropout_seed(p, x))
        return vera_linear(*args, **base) if positions is None else token_subset_vera_linear(*args, positions, **base)

    def _mixed_forward(self, x: torch.Tensor, names: list[str], rows: list[int]) -> torch.Tensor:
        lambda_d = torch.stack([self.vera_lambda_d[n] for n in names])
        lambda_b = torch.stack([self.vera_lambda_b[n] for n in names])
        weight, bias, base = frozen_operands(self.base_layer, x)
        return vera_linear_mixed(x, weight, bias, self.projections.vera_A, self.projections.vera_B, lambda_d, lambda_b,
                                 rows, **base)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(dropout={self.dropout[n]})" for n in self.vera_lambda_d)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters=[{adapters}], active={self.active_adapter!r}")
