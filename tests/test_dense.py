"""The CPU fast path (oneDNN dense layers and the compiled MLP backward) computes what F.linear and
torch.tanh compute, values and gradients, and the policy's fast path equals its plain torch path."""

from __future__ import annotations

import os
import platform
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ml.fastpath as fastpath
import ml.fastpath.dense as dense_module
from ml.agent.policy import ActorCritic
from ml.env.action_space import ContinuousExposure, DiscreteExposure, PortfolioWeights
from ml.fastpath import keep_freed_memory, kernel_built
from ml.fastpath.dense import batch_sum_product, dense, tanh_mlp, uses_kernel, uses_onednn
from ml.market.features import NORM_CLIP


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


def test_compiled_backward_is_built_where_a_compiler_is_and_taken_for_data_inputs():
    # `make venv` builds ml.fastpath._tanh_mlp wherever a C++ compiler is; training on CPU must then
    # take it, not fall back unnoticed. Without a compiler the plain backward runs (tested below).
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    assert kernel_built() == bool(compiler), f"C++ compiler: {compiler}; kernel built: {kernel_built()}"
    if not kernel_built():
        assert not uses_kernel(torch.zeros(2, 3))
        return
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
    from ml.fastpath import _tanh_mlp

    x, weight, grad = torch.zeros(4, 3), torch.zeros(2, 3), torch.zeros(4, 2)
    with pytest.raises(RuntimeError, match="x must be a contiguous 2-D float32"):
        _tanh_mlp.tanh_mlp_backward(x.double(), [], [weight], grad, 2)
    with pytest.raises(RuntimeError, match="does not match the head's weight"):
        _tanh_mlp.tanh_mlp_backward(x, [], [weight], torch.zeros(4, 5), 2)
    with pytest.raises(RuntimeError, match="one activation per hidden layer"):
        _tanh_mlp.tanh_mlp_backward(x, [x], [weight], grad, 2)


# The policy: ActorCritic.forward takes the fast path for float32 CPU inputs and the plain torch
# layers otherwise; both must give the same outputs and the same gradients for every action space.

FEATURES_PER_ASSET = 14
BATCH = 2500  # not a multiple of the kernel's BLOCK_ROWS: the last block is partial

SPACES = {
    "discrete_long_only": lambda: DiscreteExposure((-1.0, -0.5, 0.0, 0.5, 1.0), min_exposure=0.0),  # masked bias
    "continuous": lambda: ContinuousExposure((-1.0, 0.0, 1.0), -0.5, 1.0),
    "portfolio": lambda: PortfolioWeights(3),
}


def _agent_and_batch(space_name: str, seed: int = 0):
    torch.manual_seed(seed)
    space = SPACES[space_name]()
    n_features = FEATURES_PER_ASSET * space.n_assets
    agent = ActorCritic(n_features, space, (64, 64))
    agent.set_normalization(torch.randn(n_features) * 0.1, torch.rand(n_features) + 0.5)
    features = torch.randn(BATCH, n_features) * 3  # some beyond NORM_CLIP after normalization
    rng = np.random.default_rng(seed)
    position = torch.from_numpy(space.example_positions(rng, BATCH)).float()
    advantage, returns = torch.randn(BATCH), torch.randn(BATCH)
    return agent, features, position, advantage, returns


def _plain_reference(agent: ActorCritic, features: torch.Tensor, position: torch.Tensor):
    """What the policy computes, written out with torch ops alone."""
    normalized = torch.clamp((features - agent.feature_mean) / agent.feature_std, -NORM_CLIP, NORM_CLIP)
    x = torch.cat([normalized, position], dim=-1)
    for linear in agent.backbone[::2]:
        x = torch.tanh(F.linear(x, linear.weight, linear.bias))
    actor = F.linear(x, agent.actor.weight, agent.action_space.mask_actor_bias(agent.actor.bias))
    return actor, F.linear(x, agent.critic.weight, agent.critic.bias).squeeze(-1)


def _spy(monkeypatch, module, name):
    """Count the calls of ``module.name`` while still running it."""
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _outputs_and_grads(agent: ActorCritic, features, position, advantage, returns, action):
    """Actor outputs, values and the gradient of a PPO-shaped loss for every parameter."""
    agent.zero_grad(set_to_none=True)
    actor, value = agent(features, position)
    log_prob, entropy = agent.log_prob_entropy(actor, action)
    loss = -(log_prob * advantage).mean() - 0.01 * entropy.mean() + ((value - returns) ** 2).mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in agent.named_parameters()}
    return actor.detach(), value.detach(), grads


def _plain_run(agent, *batch):
    with torch.backends.mkldnn.flags(enabled=False):
        assert not fastpath.applies(torch.zeros(2, 3))
        return _outputs_and_grads(agent, *batch)


def _sampled_actions(agent, features, position):
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        torch.manual_seed(1)
        return agent.sample(agent(features, position)[0])[0]


def _assert_same(fast, plain, masked_logits: bool):
    (actor, value, grads), (plain_actor, plain_value, plain_grads) = fast, plain
    # Masked levels carry -1e9 on both paths; everything else agrees to float32 rounding.
    torch.testing.assert_close(actor, plain_actor, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(value, plain_value, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys() and len(grads) >= 7
    for name in grads:
        # Sums over the batch in another order: float32 rounding, far below the gradients (1e-3..1e-1).
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    if masked_logits:
        assert (actor[:, :2] < -1e8).all()


@pytest.mark.parametrize("space_name", list(SPACES))
def test_policy_plain_path_is_the_torch_layers(space_name, monkeypatch):
    """With oneDNN off (or in float64) the policy runs plain torch layers and never enters the fast path."""
    agent, features, position, _, _ = _agent_and_batch(space_name)
    calls = _spy(monkeypatch, fastpath, "tanh_mlp")
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        actor, value = agent(features, position)
        want_actor, want_value = _plain_reference(agent, features, position)
    assert calls == []
    torch.testing.assert_close(actor, want_actor, rtol=0, atol=0)
    torch.testing.assert_close(value, want_value, rtol=0, atol=0)

    wide = agent.double()
    with torch.no_grad():
        assert not fastpath.applies(torch.zeros(2, 3, dtype=torch.float64))
        actor64, value64 = wide(features.double(), position.double())
        want_actor64, want_value64 = _plain_reference(wide, features.double(), position.double())
    assert calls == []
    torch.testing.assert_close(actor64, want_actor64, rtol=0, atol=0)
    torch.testing.assert_close(value64, want_value64, rtol=0, atol=0)
    # float32 plain torch against the float64 truth: only rounding apart.
    torch.testing.assert_close(actor.double(), actor64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(value.double(), value64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("space_name", list(SPACES))
def test_policy_fast_path_equals_plain_path_values_and_gradients(space_name, monkeypatch):
    """The oneDNN path with its layer-by-layer backward (no compiled kernel) against plain torch."""
    agent, features, position, advantage, returns = _agent_and_batch(space_name)
    action = _sampled_actions(agent, features, position)
    batch = (features, position, advantage, returns, action)
    plain = _plain_run(agent, *batch)

    monkeypatch.setattr(dense_module, "_KERNEL", None)
    calls = _spy(monkeypatch, fastpath, "tanh_mlp")
    inputs = torch.cat([features, position], dim=-1)
    assert fastpath.applies(inputs) and not uses_kernel(inputs)
    fast = _outputs_and_grads(agent, *batch)
    assert calls == [1]
    _assert_same(fast, plain, space_name == "discrete_long_only")


@pytest.mark.parametrize("space_name", list(SPACES))
@pytest.mark.parametrize("threads", [1, 2])
def test_policy_kernel_gradients_equal_plain_path_gradients(space_name, threads, monkeypatch):
    """The compiled backward, as training takes it (features are data), against plain torch."""
    if not kernel_built():  # nothing to compare: the first test checks this machine has no compiler
        assert not uses_kernel(torch.zeros(2, 3))
        return
    agent, features, position, advantage, returns = _agent_and_batch(space_name, seed=threads)
    action = _sampled_actions(agent, features, position)
    batch = (features, position, advantage, returns, action)
    plain = _plain_run(agent, *batch)

    kernel, kernel_calls = dense_module._KERNEL, []

    def counted_backward(*args):
        kernel_calls.append(1)
        return kernel.tanh_mlp_backward(*args)

    monkeypatch.setattr(dense_module, "_KERNEL", SimpleNamespace(tanh_mlp_backward=counted_backward))
    monkeypatch.setattr(dense_module, "BLOCK_ROWS", 512)  # several blocks per thread, the last one partial
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert uses_kernel(torch.cat([features, position], dim=-1))
        fast = _outputs_and_grads(agent, *batch)
    finally:
        torch.set_num_threads(previous)
    assert kernel_calls == [1]
    _assert_same(fast, plain, space_name == "discrete_long_only")
