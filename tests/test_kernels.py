"""The kernel seam (``peft_dora.kernels``) and the fused Triton kernels, on the CPU under Triton's interpreter.

Expectations are float64 formulas written out here and upstream PEFT's DoRA; shapes are small and odd
(the interpreter runs every program in numpy), with more than one block of tokens and of features so
that every mask and the per-block partial sums of m's gradient are exercised. The interpreter's
bfloat16 ``tl.dot`` is wrong, so float32 and float16 are tested; bfloat16 is refused there.
"""

from __future__ import annotations

import copy
import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first defined

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from dora_testing import randomise as shared_randomise
from peft_dora import DoraConfig
from peft_dora.kernels import ENV, KernelsUnavailable, backend, default_name, select
from peft_dora.kernels import fused

D_IN, D_HIDDEN, D_OUT, R, ALPHA = 29, 133, 17, 5, 7  # 133 features: two blocks of the combination
SCALING = ALPHA / R


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D_IN, D_HIDDEN)
        self.down = nn.Linear(D_HIDDEN, D_OUT, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


class FixedMask(nn.Module):
    """Dropout with a fixed 0/2 mask, the same for every implementation."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask  # not a buffer: the state dicts compared stay the adapters' own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


def randomise(model: nn.Module, seed: int = 1) -> None:
    shared_randomise(model, scale=0.3, seed=seed)


def dora64(x, w0, bias, a, b, m, mask=None):
    """The paper's DoRA forward in float64 with the norm a constant; a and b None for magnitude-only."""
    x = x.double()
    x_d = x if mask is None else x * mask.double()
    v = w0 if a is None else w0 + SCALING * b.detach() @ a.detach()
    n = torch.linalg.norm(v, dim=1)
    lora = 0 if a is None else SCALING * (x_d @ a.T @ b.T)
    y = x @ w0.T + (m / n - 1) * (x_d @ w0.T) + (m / n) * lora
    return y if bias is None else y + bias


class Leaves:
    """A layer's W0, bias, A, B, m as float64 leaves, read before the layer runs."""

    def __init__(self, layer) -> None:
        base = layer.get_base_layer()
        self.w0 = base.weight.detach().double()
        self.bias = None if base.bias is None else base.bias.detach().double()
        weight_a = layer.lora_A["default"].weight
        trained = isinstance(weight_a, nn.Parameter)
        self.a = weight_a.detach().double().requires_grad_() if trained else None
        self.b = layer.lora_B["default"].weight.detach().double().requires_grad_() if trained else None
        self.m = layer.lora_magnitude_vector["default"].weight.detach().double().requires_grad_()

    def __call__(self, x, mask=None):
        return dora64(x, self.w0, self.bias, self.a, self.b, self.m, mask)


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.fixture
def force(monkeypatch):
    def set_backend(name: str | None) -> None:
        if name is None:
            monkeypatch.delenv(ENV, raising=False)
        else:
            monkeypatch.setenv(ENV, name)

    return set_backend


def build(dtype=torch.float32, bias=True, **config) -> nn.Module:
    torch.manual_seed(0)
    base = TwoLayers()
    if not bias:
        base.up.bias = None
    config = {"r": R, "lora_alpha": ALPHA, "target_modules": ["up", "down"], **config}
    model = get_peft_model(base, DoraConfig(**config))
    randomise(model)
    return model.to(dtype)


# ---------------------------------------------------------------- selection


def test_defaults_forcing_and_refusals(force):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    force(None)
    assert default_name(cpu, torch.float32) == default_name(cpu, torch.bfloat16) == "cpu"
    assert default_name(cuda, torch.bfloat16) == "torch"  # triton stays opt-in until measured on a GPU
    assert select(cpu, torch.float32).name == "cpu"
    force("torch")
    assert select(cpu, torch.float32).name == "torch"
    force("auto")
    assert select(cpu, torch.float32).name == "cpu"
    force("triton")
    assert select(cpu, torch.float16).name == "triton"
    for device, dtype, reason in ((cpu, torch.bfloat16, "bfloat16"), (cpu, torch.float64, "take")):
        with pytest.raises(KernelsUnavailable, match=reason):
            select(device, dtype)
    force("cpu")
    with pytest.raises(KernelsUnavailable, match="CPU tensors"):
        select(cuda, torch.float32)
    force("cuda-graphs")
    with pytest.raises(ValueError, match="unknown DoRA kernels 'cuda-graphs'"):
        select(cpu, torch.float32)


def test_a_forced_backend_that_cannot_run_fails_the_forward(force):
    """No silent fallback: a bfloat16 layer under the interpreter with triton forced raises."""
    model = build(torch.bfloat16)
    force("triton")
    with pytest.raises(KernelsUnavailable, match="PEFT_DORA_KERNELS=triton"):
        model(torch.randn(2, D_IN, dtype=torch.bfloat16))


def test_lora_A_stays_a_plain_linear_and_the_state_dict_keys_are_upstreams():
    model = build()
    upstream = get_peft_model(TwoLayers(), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["up", "down"], use_dora=True))
    assert {type(m) for n, m in model.named_modules() if n.endswith("lora_A.default")} == {nn.Linear}
    assert model.state_dict().keys() == upstream.state_dict().keys()


# ---------------------------------------------------------------- the fused norm


@pytest.mark.parametrize("layout", ["rows", "transposed", "magnitude-only", "column-slices"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_norm_equals_float64(monkeypatch, dtype, layout):
    """||W0 + sBA||_row and its inverse; W0 stored row-major or as a transposed view (fan_in_fan_out);
    zero A and B as magnitude-only modules hold them; W0's 200 columns in four slices (64, 64, 64, 8),
    as on a GPU with more multiprocessors than blocks of rows."""
    torch.manual_seed(2)
    w0 = (torch.randn(D_HIDDEN, 200) * 0.1).to(dtype)
    a, b = torch.randn(R, 200) * 0.2, torch.randn(D_HIDDEN, R) * 0.2
    if layout == "transposed":
        w0 = w0.t().contiguous().t()
    if layout == "magnitude-only":
        a, b = torch.zeros(1, 200), torch.zeros(D_HIDDEN, 1)
    monkeypatch.setattr(fused, "_norm_splits", lambda *args: 4 if layout == "column-slices" else 1)
    exact = torch.linalg.norm(w0.double() + SCALING * b.double() @ a.double(), dim=1)
    norm, inv = backend("triton").weight_norm(w0, a, b, SCALING)
    assert norm.dtype == inv.dtype == torch.float32
    # float32: rounding only; float16: A rounded to W0's dtype for the tensor-core product (2**-11).
    tolerance = 1e-6 if dtype == torch.float32 or layout == "magnitude-only" else 2e-4
    assert ((norm.double() - exact).abs() / exact).max() < tolerance
    assert ((inv.double() * exact - 1).abs()).max() < tolerance


# ---------------------------------------------------------------- the layer with the fused kernels


def upstream_twin(model: nn.Module, bias: bool = True, **config) -> nn.Module:
    """Upstream PEFT's DoRA over the same base, holding ``model``'s weights."""
    torch.manual_seed(0)
    base = TwoLayers()
    if not bias:
        base.up.bias = None
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["up", "down"], use_dora=True, **config)
    upstream = get_peft_model(base, config).to(next(model.parameters()).dtype)
    upstream.load_state_dict(model.state_dict())
    return upstream


def run_layer(layer, x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None = None):
    """Output, input gradient and the gradients of A, B and m of one forward and backward in training mode."""
    if mask is not None:
        layer.lora_dropout["default"] = FixedMask(mask.to(x.dtype))
    layer.train()
    x = x.clone().requires_grad_()
    y = layer(x)
    (y.double() * g.double()).sum().backward()
    grads = {"m": layer.lora_magnitude_vector["default"].weight.grad}
    if isinstance(layer.lora_A["default"].weight, nn.Parameter):
        grads.update(A=layer.lora_A["default"].weight.grad, B=layer.lora_B["default"].weight.grad)
    return y.detach(), x.grad, grads


def float64_run(leaves: Leaves, x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None = None):
    x64 = x.double().requires_grad_()
    y = leaves(x64, mask)
    (y * g.double()).sum().backward()
    grads = {"m": leaves.m.grad}
    if leaves.a is not None:
        grads.update(A=leaves.a.grad, B=leaves.b.grad)
    return y.detach(), x64.grad, grads


def inputs(dtype: torch.dtype, dropout: float, d_in: int = D_IN, d_out: int = D_HIDDEN):
    """141 tokens (three blocks of the combination) in a [3, 47, d_in] batch, g and a fixed dropout mask."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 47, d_in, generator=gen).to(dtype)
    g = torch.randn(3, 47, d_out, generator=gen).to(dtype)
    mask = (torch.rand(3, 47, d_in, generator=gen) > 0.5).to(dtype) * 2 if dropout else None
    return x, g, mask


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_fused_layer_float32_equals_float64_and_upstream_peft(force, dropout, bias):
    """Output and the gradients of the input, A, B and m: 29 -> 133 features (two blocks), 141 tokens."""
    force("triton")
    model = build(bias=bias, lora_dropout=dropout)
    layer = model.base_model.model.up
    x, g, mask = inputs(torch.float32, dropout)
    leaves = Leaves(layer)
    y, gx, grads = run_layer(layer, x, g, mask)
    y64, gx64, grads64 = float64_run(leaves, x, g, mask)
    assert relative(y, y64) < 1e-6 and relative(gx, gx64) < 1e-6
    for key, want in grads64.items():
        assert relative(grads[key], want) < 1e-5, key

    force(None)
    y_up, gx_up, grads_up = run_layer(upstream_twin(model, bias, lora_dropout=dropout).base_model.model.up, x, g, mask)
    torch.testing.assert_close(y, y_up, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_up, rtol=1e-4, atol=1e-5)
    for key, want in grads_up.items():
        assert relative(grads[key], want) < 1e-5, key


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_fused_layer_float16_is_as_close_to_float64_as_upstream(force, dropout):
    """float16 weights and activations, float32 sums: within float16's resolution of the float64 formula,
    and no further from it than upstream PEFT's float16 DoRA."""
    force("triton")
    model = build(torch.float16, lora_dropout=dropout)
    layer = model.base_model.model.up
    x, g, mask = inputs(torch.float16, dropout)
    leaves = Leaves(layer)
    y, gx, grads = run_layer(layer, x, g, mask)
    assert y.dtype == torch.float16
    want = float64_run(leaves, x, g, mask)
    force(None)
    upstream = run_layer(upstream_twin(model, lora_dropout=dropout).base_model.model.up, x, g, mask)
    for name, got, up, exact in zip(("y", "x grad"), (y, gx), upstream[:2], want[:2]):
        assert relative(got, exact) < 2e-3 and relative(got, exact) <= 1.1 * relative(up, exact), name
    for key, exact in want[2].items():
        got, up = relative(grads[key], exact), relative(upstream[2][key], exact)
        assert got < 5e-3 and got <= 1.1 * up + 1e-4, key


def test_fused_magnitude_only_module_equals_float64(force):
    """The seed's wdecompose_target_modules: y = (m / ||W0||) W0 x, m's and the input's gradients."""
    force("triton")
    model = build(target_modules=["up"], wdecompose_target_modules=["down"])
    layer = model.base_model.model.down
    x, g, _ = inputs(torch.float32, 0.0, D_HIDDEN, D_OUT)
    leaves = Leaves(layer)
    assert leaves.a is None
    y, gx, grads = run_layer(layer, x, g)
    y64, gx64, grads64 = float64_run(leaves, x, g)
    assert relative(y, y64) < 1e-6 and relative(gx, gx64) < 1e-6
    assert relative(grads["m"], grads64["m"]) < 1e-5


def test_fused_scale_is_applied_in_float32(force):
    """m / n within 1e-4 of 1 is exactly 1 in float16 (resolution 2**-10 at 1): the torch kernels, like
    upstream, lose it; the fused combination keeps it. Measured as the mean signed error against float64."""
    x, g, _ = inputs(torch.float16, 0.0)
    bias = {}
    for backend in ("torch", "triton"):
        force(backend)
        model = build(torch.float16)
        layer = model.base_model.model.up
        with torch.no_grad():
            layer.lora_B["default"].weight.zero_()  # n = ||W0||
            norm = torch.linalg.norm(layer.get_base_layer().weight.double(), dim=1)
            layer.lora_magnitude_vector["default"].weight.copy_(norm * (1 + 1e-4))
        leaves = Leaves(layer)
        y = layer(x).double()
        exact = leaves(x).detach()
        keep = exact.abs() > 0.1
        bias[backend] = ((y - exact)[keep] / exact[keep]).mean().item()
    assert bias["torch"] < -7e-5  # the factor 1 + 1e-4 dropped
    assert abs(bias["triton"]) < 2e-5


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_model_equals_eager(force, compiler):
    """torch.compile(fullgraph=True) traces the whole PEFT model through the custom ops, dropout included:
    the graph holds them, and outputs and gradients equal eager's (inductor fuses the float32 elementwise
    work around them differently, hence its looser bound; it compiles in 15-30 s on a 2-core CPU)."""
    force("triton")
    x, _, mask = inputs(torch.float32, 0.5)
    mask_down = (torch.rand(3, 47, D_HIDDEN, generator=torch.Generator().manual_seed(6)) > 0.5).float() * 2
    traced = []

    def backend(graph, example_inputs):
        traced.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return torch._dynamo.lookup_backend(compiler)(graph, example_inputs)

    results = []
    for compiled in (False, True):
        model = build(lora_dropout=0.5)
        model.base_model.model.up.lora_dropout["default"] = FixedMask(mask)
        model.base_model.model.down.lora_dropout["default"] = FixedMask(mask_down)
        model.train()
        run_model = torch.compile(model, fullgraph=True, backend=backend) if compiled else model
        xx = x.clone().requires_grad_()
        y = run_model(xx)
        y.square().sum().backward()
        results.append((y.detach(), xx.grad, [p.grad for p in model.parameters() if p.requires_grad]))
    assert traced.count("peft_dora.weight_norm.default") == traced.count("peft_dora.combine.default") == 2
    (y, gx, grads), (y_c, gx_c, grads_c) = results
    bound = 1e-6 if compiler == "aot_eager" else 1e-5
    assert relative(y_c, y) < bound and relative(gx_c, gx) < bound
    assert len(grads) == 6
    for got, want in zip(grads_c, grads):
        assert relative(got, want) < bound


def test_custom_ops_pass_torch_library_opcheck():
    """Schema, fake (meta) implementations and the autograd registration, as torch.library checks them."""
    gen = torch.Generator().manual_seed(3)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=gen).requires_grad_(grad)

    w0, a, b = rand(20, 11), rand(3, 11), rand(20, 3)
    torch.library.opcheck(fused.weight_norm_op, (w0, a, b, 1.5))
    _, inv = fused.weight_norm_op(w0, a, b, 1.5)
    m = rand(20, grad=True)
    for base_d in (None, rand(2, 5, 20)):
        args = (rand(2, 5, 20), rand(2, 5, 3, grad=True), rand(20, 3, grad=True), base_d, m, inv, rand(20), 1.5)
        torch.library.opcheck(fused.combine_op, args)
