"""The oneDNN dense layers and the compiled MLP backward compute what F.linear and torch.tanh
compute, values and gradients."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from ml.allocator import keep_freed_memory
import ml.dense as dense_module
from ml.dense import batch_sum_product, dense, tanh_mlp, uses_kernel, uses_onednn


def _reference(x, weight, bias, activation):
    y = F.linear(x, weight, bias)
    return torch.tanh(y) if activation == "tanh" else y


@pytest.mark.parametrize("activation", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(4096, 17, 64), (3, 64, 6)])
def test_dense_equals_linear_and_tanh_with_gradients(activation, shape):
    batch, width, out = shape
    torch.manual_seed(0)
    x = torch.randn(batch, width, dtype=torch.float64)
    weight = torch.randn(out, width, dtype=torch.float64) / width ** 0.5
    bias = torch.randn(out, dtype=torch.float64)
    upstream = torch.randn(batch, out, dtype=torch.float64)

    def values_and_grads(dtype, layer):
        leaves = [t.to(dtype).requires_grad_() for t in (x, weight, bias)]
        y = layer(*leaves, activation)
        (y * upstream.to(dtype)).sum().backward()
        return [y.double()] + [leaf.grad.double() for leaf in leaves]

    fast = values_and_grads(torch.float32, dense)
    exact = values_and_grads(torch.float64, _reference)  # float64 reference: the truth, not another float32 path
    for got, want in zip(fast, exact):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * batch ** 0.5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_weight_gradient_split_across_threads_is_the_whole_batch_product(threads):
    # 1001 rows do not split evenly: the leftover rows must be counted once, not dropped or doubled.
    torch.manual_seed(0)
    grad, x = torch.randn(1001, 6, dtype=torch.float64), torch.randn(1001, 13, dtype=torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = batch_sum_product(grad.float(), x.float(), min_rows_per_thread=100)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(got.double(), grad.t() @ x, rtol=1e-5, atol=1e-4)


def test_onednn_path_runs_on_this_cpu_and_plain_torch_elsewhere():
    # The fast path must be the one under test on CPU float32; other inputs take plain torch.
    assert uses_onednn(torch.zeros(2, 3))
    assert not uses_onednn(torch.zeros(2, 3, dtype=torch.float64))
    assert not uses_onednn(torch.zeros(2, 3, 4))
    x = torch.randn(2, 5, 3)
    weight, bias = torch.randn(4, 3), torch.randn(4)
    torch.testing.assert_close(dense(x, weight, bias, "tanh"), torch.tanh(F.linear(x, weight, bias)))
    with pytest.raises(ValueError, match="activation"):
        dense(x, weight, bias, "relu")


def test_dense_gradients_only_where_asked_and_no_silent_second_order():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(64, 8), torch.randn(4, 8), torch.randn(4)
    with torch.no_grad():
        y = dense(x, weight, bias, "tanh")
        assert y.grad_fn is None
        torch.testing.assert_close(y, torch.tanh(F.linear(x, weight, bias)), rtol=1e-5, atol=1e-6)
    # Features as input need no gradient; the weights get theirs.
    weight.requires_grad_()
    dense(x, weight, bias, "tanh").sum().backward()
    assert x.grad is None and bias.grad is None
    torch.testing.assert_close(weight.grad, torch.func.grad(lambda w: torch.tanh(F.linear(x, w, bias)).sum())(
        weight.detach()), rtol=1e-4, atol=1e-5)
    # oneDNN's op has no derivative of its own: a second-order gradient must fail loudly.
    weight.grad = None
    (grad,) = torch.autograd.grad(dense(x, weight, bias, "tanh").sum(), weight, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_allocator_thresholds_are_set_on_glibc():
    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is on_glibc
    assert keep_freed_memory() is on_glibc  # idempotent


def _mlp_reference(x, layers, head):
    for weight, bias in layers:
        x = torch.tanh(F.linear(x, weight, bias))
    return F.linear(x, *head)


def test_compiled_backward_is_built_and_taken_for_data_inputs():
    # `make venv` builds ml._tanh_mlp; training on CPU must take it, not fall back unnoticed.
    assert uses_kernel(torch.zeros(2, 3))
    assert not uses_kernel(torch.zeros(2, 3, requires_grad=True))  # its input gradient is not computed
    assert not uses_kernel(torch.zeros(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("hidden", [(64, 64), (32,), (16, 8, 4)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_tanh_mlp_gradients_equal_float64_autograd(hidden, threads, monkeypatch):
    # 2500 rows in blocks of 256: the last block is partial and the threads get unequal shares.
    monkeypatch.setattr(dense_module, "BLOCK_ROWS", 256)
    torch.manual_seed(0)
    widths = (14, *hidden)
    x = torch.randn(2500, widths[0], dtype=torch.float64)
    params = []
    for width_in, width_out in zip(widths, (*widths[1:], 6)):
        params += [torch.randn(width_out, width_in, dtype=torch.float64) / width_in ** 0.5,
                   torch.randn(width_out, dtype=torch.float64) * 0.1]
    upstream = torch.randn(2500, 6, dtype=torch.float64)

    def values_and_grads(dtype, mlp):
        leaves = [p.to(dtype).requires_grad_() for p in params]
        pairs = list(zip(leaves[0::2], leaves[1::2]))
        out = mlp(x.to(dtype), pairs[:-1], pairs[-1])
        (out * upstream.to(dtype)).sum().backward()
        return [out.double()] + [leaf.grad.double() for leaf in leaves]

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = values_and_grads(torch.float32, tanh_mlp)
    finally:
        torch.set_num_threads(previous)
    exact = values_and_grads(torch.float64, _mlp_reference)
    for got, want in zip(fast, exact):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * 2500 ** 0.5)


def test_tanh_mlp_takes_the_layer_path_when_its_input_needs_a_gradient():
    torch.manual_seed(0)
    x = torch.randn(300, 5, requires_grad=True)
    layers = [(torch.randn(8, 5), torch.randn(8))]
    head = (torch.randn(3, 8, requires_grad=True), torch.randn(3))
    tanh_mlp(x, layers, head).sum().backward()
    want_x, want_w = torch.autograd.grad(_mlp_reference(x, layers, head).sum(), [x, head[0]])
    torch.testing.assert_close(x.grad, want_x, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head[0].grad, want_w, rtol=1e-4, atol=1e-4)


def test_kernel_names_the_input_it_refuses():
    from ml import _tanh_mlp

    x, weight, grad = torch.zeros(4, 3), torch.zeros(2, 3), torch.zeros(4, 2)
    with pytest.raises(RuntimeError, match="x must be a contiguous 2-D float32"):
        _tanh_mlp.tanh_mlp_backward(x.double(), [], [weight], grad, 2)
    with pytest.raises(RuntimeError, match="does not match the head's weight"):
        _tanh_mlp.tanh_mlp_backward(x, [], [weight], torch.zeros(4, 5), 2)
    with pytest.raises(RuntimeError, match="one activation per hidden layer"):
        _tanh_mlp.tanh_mlp_backward(x, [x], [weight], grad, 2)
