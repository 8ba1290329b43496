"""The modules that make the virtual tokens' embeddings, peft's math:

    PromptEmbedding   prompt tuning (peft's PromptEmbedding), and every
                      adapter loaded from disk (peft's inference mode):
                      the rows of one torch.nn.Embedding, used as they are
    PromptEncoder     P-tuning (peft's PromptEncoder): trainable input
                      embeddings through an MLP, or a bidirectional LSTM and
                      an MLP head; the LSTM runs on pypeft::recurrent_scan
    ScanLSTM          that LSTM: torch.nn.LSTM's parameters (same names,
                      layout and initialisation, so weights copy both ways),
                      each direction of each layer one recurrent_scan call

Each forward() returns [total_virtual_tokens, token_dim], computed once per
model call and shared by every row of the batch (peft expands one sample too).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pypeft.ops.recurrent_scan import recurrent_scan


class PromptEmbedding(nn.Module):
    def __init__(self, total: int, token_dim: int, dtype, device):
        super().__init__()
        self.embedding = nn.Embedding(total, token_dim, dtype=dtype, device=device)  # N(0, 1): peft's RANDOM

    def init_from_vocabulary(self, word_embeddings: nn.Module, ids: torch.Tensor) -> None:
        """Rows = the model's embeddings of `ids` (cut or repeated to length by the caller)."""
        with torch.no_grad():
            rows = word_embeddings(ids.to(self.embedding.weight.device))
            self.embedding.weight.copy_(rows.to(self.embedding.weight.dtype))

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class ScanLSTM(nn.Module):
    """A bidirectional multi-layer LSTM over one sequence (batch_first, as peft
    builds torch.nn.LSTM), on pypeft.ops.recurrent_scan: the reverse direction
    runs the flipped sequence and its states are flipped back."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, dropout: float, dtype, device):
        super().__init__()
        self.hidden_size, self.num_layers, self.dropout = hidden_size, num_layers, dropout
        kw = {"dtype": dtype, "device": device}
        bound = 1.0 / math.sqrt(hidden_size)
        for layer in range(num_layers):
            width = input_size if layer == 0 else 2 * hidden_size
            for suffix in ("", "_reverse"):
                for name, shape in ((f"weight_ih_l{layer}", (4 * hidden_size, width)),
                                    (f"weight_hh_l{layer}", (4 * hidden_size, hidden_size)),
                                    (f"bias_ih_l{layer}", (4 * hidden_size,)),
                                    (f"bias_hh_l{layer}", (4 * hidden_size,))):
                    p = nn.Parameter(torch.empty(shape, **kw))
                    nn.init.uniform_(p, -bound, bound)  # torch.nn.LSTM's initialisation
                    self.register_parameter(name + suffix, p)

    def _direction(self, xs: torch.Tensor, layer: int, suffix: str) -> torch.Tensor:
        g = lambda n: getattr(self, f"{n}_l{layer}{suffix}")  # noqa: E731
        h0 = xs.new_zeros(xs.shape[1], self.hidden_size)
        return recurrent_scan(xs, h0, g("weight_ih"), g("weight_hh"), g("bias_ih"), g("bias_hh"), cell="lstm", c0=h0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [batch, steps, input] -> [batch, steps, 2 * hidden] (torch.nn.LSTM(...)(x)[0])."""
        xs = x.transpose(0, 1)  # recurrent_scan walks dim 0
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0:
                xs = F.dropout(xs, self.dropout, self.training)  # between layers, as torch.nn.LSTM
            forward = self._direction(xs, layer, "")
            backward = self._direction(xs.flip(0), layer, "_reverse").flip(0)
            xs = torch.cat((forward, backward), dim=-1)
        return xs.transpose(0, 1)


class PromptEncoder(nn.Module):
    """peft's PromptEncoder: embedding -> mlp_head (encoder="mlp"), or
    embedding -> lstm_head -> mlp_head (encoder="lstm"). Parameter names are
    peft's, so a peft encoder's state_dict loads into it."""

    def __init__(self, total: int, token_dim: int, encoder: str, hidden: int, num_layers: int, dropout: float,
                 dtype, device):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.encoder = encoder
        self.embedding = nn.Embedding(total, token_dim, **kw)
        if encoder == "lstm":
            self.lstm_head = ScanLSTM(token_dim, hidden, num_layers, dropout, **kw)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **kw), nn.ReLU(),
                                          nn.Linear(2 * hidden, token_dim, **kw))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden, **kw), nn.ReLU(),
                                          nn.Linear(hidden, hidden, **kw), nn.ReLU(),
                                          nn.Linear(hidden, token_dim, **kw))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.encoder == "lstm":
            x = self.lstm_head(x.unsqueeze(0)).squeeze(0)
        return self.mlp_head(x)
