"""READ written the plain way in eager PyTorch, as a user would without
pypeft: the BERT backbone under no_grad with output_hidden_states, each
layer's output normalised (layer norm without parameters), torch.nn.GRU over
the layer index (every token its own sequence), the mean of its states
through a linear joiner, added to the final hidden state before the frozen
pooler and the trained classifier. The baseline bench_read.py measures pypeft
against; the same computation as pypeft.patch(method="read", rnn="gru").
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class PlainRead(nn.Module):
    def __init__(self, classifier_model, hidden: int):
        super().__init__()
        self.backbone = classifier_model
        self.backbone.requires_grad_(False)
        width = classifier_model.config.hidden_size
        self.rnn = nn.GRU(width, hidden)
        self.joiner = nn.Linear(hidden, width)
        nn.init.zeros_(self.joiner.weight)
        nn.init.zeros_(self.joiner.bias)
        self.classifier = copy.deepcopy(classifier_model.classifier).requires_grad_(True)

    def load_from_pypeft(self, network) -> None:
        """Take the weights of a pypeft READ network (same layout as nn.GRU's)."""
        with torch.no_grad():
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(self.rnn, f"{n}_l0").copy_(getattr(network, n))
            self.joiner.load_state_dict(network.joiner.state_dict())

    def forward(self, input_ids, labels, attention_mask=None):
        bert = self.backbone.bert
        with torch.no_grad():
            out = bert(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            layers = out.hidden_states[1:]  # each layer's output (index 0 is the embeddings)
            states = torch.stack([F.layer_norm(h, (h.shape[-1],)) for h in layers])
        steps, batch, tokens, width = states.shape
        # The RNN runs in its own dtype (float32 beside a bfloat16 backbone, as pypeft's READ does).
        hs, _ = self.rnn(states.view(steps, batch * tokens, width).to(self.joiner.weight.dtype))
        correction = self.joiner(hs.mean(0)).view(batch, tokens, width)
        corrected = out.last_hidden_state + correction.to(out.last_hidden_state.dtype)
        pooled = self.backbone.dropout(bert.pooler(corrected))
        return F.cross_entropy(self.classifier(pooled), labels)
