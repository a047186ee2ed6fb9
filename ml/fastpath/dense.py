"""The policy's dense layers, on CPU through oneDNN.

On CPU torch sends a float32 ``F.linear`` to MKL, which on the thin products of
a 64x64 MLP ([batch, 64] x [64, 64]) reaches half or less of what oneDNN's inner
product does on the same machine, and ``torch.tanh`` as its own pass costs about
as much as the product. oneDNN computes product, bias and tanh in one pass. The
values equal ``F.linear`` (+ ``torch.tanh``) to float rounding; the backward is
the usual one, with the input gradient through oneDNN as well (the weight
gradient, a reduction over the batch, stays with MKL, which is faster there,
with the batch split across torch's threads: MKL runs a product whose long
dimension is the inner one on one thread, half the speed on two cores).

``tanh_mlp`` runs a whole MLP (tanh layers, then a linear head) that way, and
takes its backward from the compiled kernel ``ml.fastpath._tanh_mlp`` when it is built
(``ml/fastpath/csrc/tanh_mlp.cpp``): one pass over the batch in cache-sized blocks
instead of layer-by-layer passes over memory.

On CUDA, in other dtypes, while exporting or tracing, or in a torch build
without oneDNN (or with it switched off), the plain torch ops run.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F


def _onednn_linear():
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def _compiled_kernel():
    try:  # optional: absent where no C++ compiler built it, and then the layer-by-layer backward runs
        return importlib.import_module("ml.fastpath._tanh_mlp")
    except ImportError:
        return None


_LINEAR = _onednn_linear()
_KERNEL = _compiled_kernel()
# Rows a thread carries through all the layers at once: [1024, 64] float32 is 256 KB, so a
# block's activations and gradients stay in a core's L2.
BLOCK_ROWS = 1024


def batch_sum_product(grad: torch.Tensor, x: torch.Tensor, min_rows_per_thread: int = 4096) -> torch.Tensor:
    """``grad.T @ x`` for [batch, out] and [batch, in]: one product per thread over its share of
    the batch, then the sum of those."""
    threads = torch.get_num_threads()
    rows = grad.shape[0] // threads
    if threads == 1 or rows < min_rows_per_thread:
        return grad.t() @ x
    split = rows * threads
    total = torch.bmm(grad[:split].view(threads, rows, -1).transpose(1, 2),
                      x[:split].view(threads, rows, -1)).sum(dim=0)
    if split < grad.shape[0]:
        total += grad[split:].t() @ x[split:]
    return total


class _OneDnnDense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str) -> torch.Tensor:
        y = _LINEAR(x, weight, bias, activation, [], "")
        ctx.activation = activation
        ctx.save_for_backward(x, weight, y if activation == "tanh" else None)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # oneDNN's op has no derivative of its own
    def backward(ctx, grad: torch.Tensor):
        x, weight, y = ctx.saved_tensors
        if ctx.activation == "tanh":
            grad = torch.ops.aten.tanh_backward(grad, y)
        grad_x = _LINEAR(grad, weight.t(), None, "none", [], "") if ctx.needs_input_grad[0] else None
        grad_weight = batch_sum_product(grad, x) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(dim=0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None


def uses_onednn(x: torch.Tensor) -> bool:
    """oneDNN for 2-D float32 CPU inputs, unless mkldnn is switched off or the graph is being
    exported or traced (the exported model is plain Gemm + Tanh)."""
    return (_LINEAR is not None and torch.backends.mkldnn.enabled and x.device.type == "cpu"
            and x.dtype == torch.float32 and x.dim() == 2
            and not torch.compiler.is_exporting() and not torch.jit.is_tracing())


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str = "none") -> torch.Tensor:
    """``x @ weight.T + bias``, through tanh when ``activation`` is "tanh"; x is [batch, in]."""
    if activation not in ("none", "tanh"):
        raise ValueError(f"activation must be 'none' or 'tanh', got '{activation}'")
    if uses_onednn(x):
        return _OneDnnDense.apply(x.contiguous(), weight, bias, activation)
    y = F.linear(x, weight, bias)
    return torch.tanh(y) if activation == "tanh" else y


def _layers_forward(x: torch.Tensor, layers, head) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The head's output and the tanh outputs of the hidden layers."""
    activations = []
    for weight, bias in layers:
        x = dense(x, weight, bias, "tanh")
        activations.append(x)
    return dense(x, *head), activations


class _TanhMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        pairs = list(zip(params[0::2], params[1::2]))
        out, activations = _layers_forward(x, pairs[:-1], pairs[-1])  # grad mode is off in here
        ctx.save_for_backward(x, *activations, *params[0::2])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, *rest = ctx.saved_tensors
        hidden_layers = len(rest) // 2  # one activation per hidden layer, one weight per layer
        activations, weights = rest[:hidden_layers], rest[hidden_layers:]
        grads = _KERNEL.tanh_mlp_backward(x, activations, weights, grad.contiguous(), BLOCK_ROWS)
        return (None, *grads)


def kernel_built() -> bool:
    """Whether the compiled backward is importable (built by ``make venv``)."""
    return _KERNEL is not None


def uses_kernel(x: torch.Tensor) -> bool:
    """The compiled backward for inputs that are data (no gradient of their own) on oneDNN's path."""
    return _KERNEL is not None and uses_onednn(x) and not x.requires_grad


def tanh_mlp(x: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]],
             head: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``layers`` as (weight, bias) pairs, each through tanh, then the linear ``head``; x is [batch, in]."""
    if uses_kernel(x):
        return _TanhMlp.apply(x.contiguous(), *(t.contiguous() for pair in (*layers, head) for t in pair))
    return _layers_forward(x, layers, head)[0]
