"""Second-order gradients are not supported by pypeft's ops: registering an
autograd formula for each backward op that raises makes create_graph=True
build a graph whose use fails loudly, instead of the backward op running with
autograd silently switched off."""

import torch


def forbid_double_backward(backward_op: str, label: str) -> None:
    def raise_(ctx, *grads):
        raise RuntimeError(f"{label}: second-order gradients (backward of the backward) are not supported")

    torch.library.register_autograd(backward_op, raise_, setup_context=lambda ctx, inputs, output: None)
