"""The DoRA layer against a float64 reference formula and against upstream PEFT's DoRA."""

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import peft_dora
from dora_testing import randomise
from peft_dora import DoraConfig, dora_weight_norm
from peft_dora.kernels import cpu as cpu_kernels
from peft_dora.kernels import backend, onednn
from peft_dora.layer import DoraLinear


class TwoLayers(nn.Module):
    def __init__(self, d_in=12, d_hidden=20, d_out=7):
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden, bias=True)
        self.down = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


class FixedMask(nn.Module):
    """A deterministic stand-in for dropout: multiplies by a fixed 0/2 mask (p = 0.5)."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x):
        return x * self.mask


def reference_linear(x, layer: DoraLinear, adapter="default", mask=None):
    """The paper's forward in float64, written out term by term (norm as a constant)."""
    base = layer.get_base_layer()
    w0 = base.weight.detach().double()
    b = base.bias.detach().double() if base.bias is not None else torch.zeros(w0.shape[0], dtype=torch.float64)
    a = layer.lora_A[adapter].weight.detach().double()
    bb = layer.lora_B[adapter].weight.detach().double()
    m = layer.lora_magnitude_vector[adapter].weight.detach().double()
    s = layer.scaling[adapter]
    n = torch.linalg.norm(w0 + s * bb @ a, dim=1)
    x = x.double()
    x_d = x if mask is None else x * mask.double()
    return x @ w0.T + b + (m / n - 1) * (x_d @ w0.T) + (m / n) * s * (x_d @ a.T @ bb.T)


def dora_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    base = TwoLayers()
    cfg = dict(r=4, lora_alpha=8, target_modules=["up", "down"])
    cfg.update(kwargs)
    return base, get_peft_model(copy.deepcopy(base), DoraConfig(**cfg))


def test_layers_are_this_projects():
    _, model = dora_model()
    layers = [m for m in model.modules() if isinstance(m, DoraLinear)]
    assert len(layers) == 2


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_equals_float64_reference(use_rslora):
    _, model = dora_model(use_rslora=use_rslora)
    randomise(model)
    layer = model.base_model.model.up
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4) if use_rslora else 8 / 4)
    x = torch.randn(3, 5, 12)
    model.eval()
    torch.testing.assert_close(layer(x).double(), reference_linear(x, layer), rtol=1e-5, atol=1e-5)


def test_forward_with_dropout_equals_reference():
    _, model = dora_model(lora_dropout=0.5)
    randomise(model)
    layer = model.base_model.model.up
    mask = (torch.rand(3, 5, 12) > 0.5).float() * 2
    layer.lora_dropout["default"] = FixedMask(mask)
    model.train()
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(layer(x).double(), reference_linear(x, layer, mask=mask), rtol=1e-5, atol=1e-5)
    # In eval mode dropout is off, and so is the extra W0 x_d term.
    model.eval()
    torch.testing.assert_close(layer(x).double(), reference_linear(x, layer), rtol=1e-5, atol=1e-5)


def test_init_equals_base_model():
    base, model = dora_model()
    x = torch.randn(4, 12)
    torch.testing.assert_close(model(x), base(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("small_products_on_onednn", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_outputs_and_gradients_match_upstream_peft(monkeypatch, dropout, small_products_on_onednn):
    """Also with the CPU's oneDNN products forced on for these small shapes (where the build has them),
    so the down projection's own backward (A's and the input's gradients) is checked too."""
    if small_products_on_onednn:
        if not onednn.works():
            pytest.skip("this torch build has no working oneDNN linear")
        monkeypatch.setattr(onednn, "_ONEDNN_MIN_MACS", 0)
    base, ours = dora_model(lora_dropout=dropout)
    upstream = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], use_dora=True, lora_dropout=dropout)
    )
    randomise(ours)
    upstream.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 12)
    if dropout:
        for name in ("up", "down"):
            d_in = 12 if name == "up" else 20
            mask = (torch.rand(3, 5, d_in) > 0.5).float() * 2
            for m in (ours, upstream):
                getattr(m.base_model.model, name).lora_dropout["default"] = FixedMask(mask)
    ours.train()
    upstream.train()
    g = torch.randn(3, 5, 7)
    x_ours, x_up = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_up = ours(x_ours), upstream(x_up)
    torch.testing.assert_close(y_ours, y_up, rtol=1e-5, atol=1e-5)
    (y_ours * g).sum().backward()
    (y_up * g).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_up.grad, rtol=1e-4, atol=1e-5)
    grads_up = dict(upstream.named_parameters())
    n_checked = 0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, grads_up[name].grad, rtol=1e-4, atol=1e-5, msg=name)
            n_checked += 1
    assert n_checked == 6  # A, B and m of two layers


def test_two_active_adapters_match_upstream_peft():
    """Two DoRA adapters active at once, as upstream combines them (without dropout the second one
    rescales the first one's output). The first may write over the base output; the second must not
    write over the first one's output, which the first keeps for its backward."""
    cfgs = [dict(r=4, lora_alpha=8, target_modules=["up", "down"]), dict(r=2, lora_alpha=2, target_modules=["up", "down"])]
    torch.manual_seed(0)
    base = TwoLayers()
    ours = get_peft_model(copy.deepcopy(base), DoraConfig(**cfgs[0]))
    ours.add_adapter("other", DoraConfig(**cfgs[1]))
    upstream = get_peft_model(copy.deepcopy(base), LoraConfig(use_dora=True, **cfgs[0]))
    upstream.add_adapter("other", LoraConfig(use_dora=True, **cfgs[1]))
    for m in (ours, upstream):
        m.base_model.set_adapter(["default", "other"])
        m.train()
    randomise(ours)
    upstream.load_state_dict(ours.state_dict())
    x, g = torch.randn(3, 5, 12), torch.randn(3, 5, 7)
    y_ours, y_up = ours(x), upstream(x)
    torch.testing.assert_close(y_ours, y_up, rtol=1e-5, atol=1e-5)
    (y_ours * g).sum().backward()
    (y_up * g).sum().backward()
    grads_up = dict(upstream.named_parameters())
    checked = [(name, p) for name, p in ours.named_parameters() if p.requires_grad]
    assert len(checked) == 12  # A, B and m of two adapters in two layers
    for name, p in checked:
        torch.testing.assert_close(p.grad, grads_up[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_gradients_equal_float64_reference_with_detached_norm():
    _, model = dora_model()
    randomise(model)
    layer = model.base_model.model.up
    x = torch.randn(6, 12)
    g = torch.randn(6, 20)
    (layer(x) * g).sum().backward()

    a = layer.lora_A["default"].weight.detach().double().requires_grad_()
    b = layer.lora_B["default"].weight.detach().double().requires_grad_()
    m = layer.lora_magnitude_vector["default"].weight.detach().double().requires_grad_()
    w0 = layer.get_base_layer().weight.detach().double()
    bias = layer.get_base_layer().bias.detach().double()
    s = layer.scaling["default"]
    v = w0 + s * b @ a
    n = torch.linalg.norm(v, dim=1).detach()  # the paper: no gradient through the norm
    y = (m / n) * (x.double() @ v.T) + bias
    (y * g.double()).sum().backward()
    torch.testing.assert_close(layer.lora_A["default"].weight.grad.double(), a.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad.double(), b.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight.grad.double(), m.grad, rtol=1e-4, atol=1e-6)


def test_zero_magnitude_entry_gets_zero_gradient_and_the_rest_exact():
    """Without dropout the magnitude's gradient is read back from the output, which a zero entry of m
    erases: that entry gets 0 (documented), every other entry its exact gradient."""
    _, model = dora_model()
    randomise(model)
    layer = model.base_model.model.up
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight[3] = 0.0
    x, g = torch.randn(6, 12), torch.randn(6, 20)
    (layer(x) * g).sum().backward()
    got = layer.lora_magnitude_vector["default"].weight.grad.double()
    w0 = layer.get_base_layer().weight.detach().double()
    a, b = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
    v = w0 + layer.scaling["default"] * b @ a
    exact = ((x.double() @ v.T) * g.double()).sum(0) / torch.linalg.norm(v, dim=1)
    assert got[3] == 0
    keep = torch.arange(20) != 3
    torch.testing.assert_close(got[keep], exact[keep], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunking", [(1 << 18, True), (1 << 25, False), (7 * 20, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magnitude_gradient_reduction_in_every_chunking_mode(monkeypatch, chunking, dtype):
    """The per-feature token dot behind m's gradient, as CPUs (small upcast chunks) and GPUs (large
    chunks, product in the operands' dtype, float32 sums) run it, and with ragged chunks."""
    from peft_dora.kernels import combine as function

    monkeypatch.setitem(function._DOT_CHUNKING, "cpu", chunking)
    torch.manual_seed(3)
    a, b = torch.randn(3, 97, 20).to(dtype), torch.randn(3, 97, 20).to(dtype)
    exact = (a.double() * b.double()).sum(dim=(0, 1))
    got = function._token_dot(a, b)
    assert got.dtype == torch.float32
    # bf16 products rounded once each (2**-9), summed in float32.
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((got.double() - exact).abs().max() / exact.abs().max()) < tolerance


@pytest.mark.parametrize("use_onednn", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
def test_closed_form_norm_equals_direct_norm_float64(monkeypatch, use_onednn, transposed):
    """Through oneDNN's product (where the build has it) and through torch.mm, for W0 stored row-major
    and as a transposed view (fan_in_fan_out layers)."""
    if use_onednn and not onednn.works():
        pytest.skip("this torch build has no working oneDNN linear")
    monkeypatch.setattr(onednn, "_ONEDNN", use_onednn)
    monkeypatch.setattr(onednn, "_ONEDNN_MIN_MACS", 0)  # the test's product is small
    torch.manual_seed(1)
    w0, a, b = torch.randn(50, 40, dtype=torch.float64), torch.randn(6, 40, dtype=torch.float64), torch.randn(50, 6, dtype=torch.float64)
    direct = torch.linalg.norm(w0 + 0.7 * b @ a, dim=1)
    w0_32 = w0.float().t().contiguous().t() if transposed else w0.float()
    closed, inverse = backend("cpu").weight_norm(w0_32, a.float(), b.float(), 0.7)
    assert closed.dtype == torch.float32
    torch.testing.assert_close(closed.double(), direct, rtol=2e-6, atol=0)
    torch.testing.assert_close(inverse.double(), 1 / direct, rtol=2e-6, atol=0)
    torch.testing.assert_close(dora_weight_norm(w0_32, a.float(), b.float(), 0.7).double(), direct, rtol=2e-6, atol=0)


def test_onednn_probe_leaves_the_random_stream_alone(monkeypatch):
    """The first norm probes oneDNN; seeded runs must draw the same numbers with or without it."""
    monkeypatch.setattr(onednn, "_ONEDNN", None)
    state = torch.get_rng_state()
    assert onednn.works() in (True, False)
    assert torch.equal(torch.get_rng_state(), state)


def test_down_projection_equals_float64_linear_and_accumulates(monkeypatch):
    """The CPU kernels' down projection: oneDNN's forward and A's reordered gradient give nn.Linear's
    values (float64 reference), also when a second backward adds to the stored gradients; under
    autocast, for a strided input and for a lora_A with hooks it is nn.Linear itself. lora_A stays a
    plain nn.Linear."""
    if not onednn.works():
        pytest.skip("this torch build has no working oneDNN linear")
    _, model = dora_model()
    randomise(model)
    lora_A = model.base_model.model.up.lora_A["default"]
    assert type(lora_A) is nn.Linear

    def down(x):
        return cpu_kernels.KERNELS.down(lora_A, x)

    monkeypatch.setattr(onednn, "_ONEDNN_MIN_MACS", 0)
    calls = []
    packed_product = onednn.times_packed
    monkeypatch.setattr(onednn, "times_packed", lambda *args: calls.append(1) or packed_product(*args))
    a64 = lora_A.weight.detach().double().requires_grad_()
    for _ in range(2):
        x = torch.randn(3, 5, 12, requires_grad=True)
        g = torch.randn(3, 5, 4)
        x64 = x.detach().double().requires_grad_()
        h, ref = down(x), x64 @ a64.T
        torch.testing.assert_close(h.double(), ref, rtol=1e-6, atol=1e-6)
        (h * g).sum().backward()
        (ref * g.double()).sum().backward()
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lora_A.weight.grad.double(), a64.grad, rtol=1e-6, atol=1e-6)
    assert len(calls) == 2
    assert lora_A.weight.grad.is_contiguous()
    x = torch.randn(12, 5).t()
    torch.testing.assert_close(down(x).double(), x.double() @ a64.detach().T, rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert down(torch.randn(5, 12)).dtype == torch.bfloat16
    assert len(calls) == 2
    seen = []
    handle = lora_A.register_forward_hook(lambda *args: seen.append(1))
    assert down(torch.randn(5, 12)).shape == (5, 4)
    handle.remove()
    assert seen == [1] and len(calls) == 2


def test_closed_form_norm_is_accurate_for_bf16_weights():
    torch.manual_seed(2)
    w0 = (torch.randn(64, 256) * 0.02).bfloat16()
    a = (torch.randn(16, 256) * 0.05).bfloat16()
    b = (torch.randn(64, 16) * 0.01).bfloat16()
    s = 2.0
    exact = torch.linalg.norm(w0.double() + s * b.double() @ a.double(), dim=1)
    closed = dora_weight_norm(w0, a, b, s)
    assert closed.dtype == torch.float32
    # float32 accumulation: far below bf16's own resolution (2**-8).
    assert ((closed.double() - exact).abs() / exact).max() < 1e-5
    naive_bf16 = torch.linalg.norm(w0 + s * b @ a, dim=1)  # upstream-style, in the compute dtype
    assert ((naive_bf16.double() - exact).abs() / exact).max() > ((closed.double() - exact).abs() / exact).max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward_and_backward(dtype):
    _, model = dora_model()
    randomise(model)
    model.to(dtype)
    layer = model.base_model.model.up
    x = torch.randn(4, 12)
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    ref = reference_linear(x.to(dtype), layer)
    torch.testing.assert_close(y.double(), ref, rtol=3e-2, atol=3e-2)
    y.float().sum().backward()
    grads = [p.grad for p in layer.parameters() if p.requires_grad]
    assert len(grads) == 3 and all(g is not None and g.dtype == dtype and torch.isfinite(g).all() for g in grads)


def test_bf16_base_with_float32_adapters():
    """train.py's mix: the model is cast to bf16 before get_peft_model, whose adapter autocast keeps
    A, B and m in float32. Output in the base's dtype, gradients in each adapter weight's dtype."""
    torch.manual_seed(0)
    base = TwoLayers().to(torch.bfloat16)
    model = get_peft_model(copy.deepcopy(base), DoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]))
    randomise(model)
    layer = model.base_model.model.up
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    x = torch.randn(4, 12).bfloat16()
    g = torch.randn(4, 20)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), reference_linear(x, layer), rtol=3e-2, atol=3e-2)
    (y.float() * g).sum().backward()

    a = layer.lora_A["default"].weight.detach().double().requires_grad_()
    b = layer.lora_B["default"].weight.detach().double().requires_grad_()
    m = layer.lora_magnitude_vector["default"].weight.detach().double().requires_grad_()
    w0, bias = layer.get_base_layer().weight.detach().double(), layer.get_base_layer().bias.detach().double()
    v = w0 + layer.scaling["default"] * b @ a
    ((m / torch.linalg.norm(v, dim=1).detach()) * (x.double() @ v.T) + bias).mul(g.double()).sum().backward()
    for got, want in ((layer.lora_A["default"].weight.grad, a.grad), (layer.lora_B["default"].weight.grad, b.grad),
                      (layer.lora_magnitude_vector["default"].weight.grad, m.grad)):  # fmt: skip
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max() <= 3e-2 * want.abs().max()


def test_merge_unmerge_and_unload():
    base, model = dora_model()
    randomise(model)
    model.eval()
    x = torch.randn(5, 12)
    unmerged = model(x)
    w0 = model.base_model.model.up.get_base_layer().weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model.up.get_base_layer().weight, w0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    merged = model.merge_and_unload()
    assert isinstance(merged.up, nn.Linear) and not isinstance(merged.up, DoraLinear)
    torch.testing.assert_close(merged(x), unmerged, rtol=1e-5, atol=1e-5)
    # The merged weight is (m / ||W0 + sBA||) * (W0 + sBA), row by row.
    layer = dora_model()[1]
    randomise(layer)
    up = layer.base_model.model.up
    a, b = up.lora_A["default"].weight.double(), up.lora_B["default"].weight.double()
    m = up.lora_magnitude_vector["default"].weight.double()
    v = up.get_base_layer().weight.double() + up.scaling["default"] * b @ a
    expected = (m / torch.linalg.norm(v, dim=1))[:, None] * v
    torch.testing.assert_close(layer.merge_and_unload().up.weight.double(), expected.detach(), rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("safe_merge", [False, True])
def test_adapters_merged_in_turn_each_take_the_norm_of_the_unmerged_weight(safe_merge):
    """Merging DoRA adapters one after another: each factor is m / ||W0 + sBA||, the norm its forward uses,
    not the norm of a weight that already holds the adapters merged before it (upstream PEFT does the
    same). Three adapters, so that the third sees two merged ones. Unmerging restores W0."""
    torch.manual_seed(0)
    base = TwoLayers()
    specs = {"default": (4, 8), "second": (2, 4), "third": (3, 3)}
    ours = get_peft_model(copy.deepcopy(base), DoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], use_dora=True))
    for name, (r, alpha) in list(specs.items())[1:]:
        ours.add_adapter(name, DoraConfig(r=r, lora_alpha=alpha, target_modules=["up", "down"]))
        theirs.add_adapter(name, LoraConfig(r=r, lora_alpha=alpha, target_modules=["up", "down"], use_dora=True))
    randomise(ours, seed=1)
    theirs.load_state_dict(ours.state_dict())

    up = ours.base_model.model.up
    w0 = base.up.weight.detach().double()
    expected = w0
    for name, (r, alpha) in specs.items():
        delta = alpha / r * up.lora_B[name].weight.double() @ up.lora_A[name].weight.double()
        m = up.lora_magnitude_vector[name].weight.double()
        expected = (m / torch.linalg.norm(w0 + delta, dim=1))[:, None] * (expected + delta)

    for model in (ours, theirs):
        model.base_model.merge_adapter(list(specs), safe_merge=safe_merge)
    merged = up.get_base_layer().weight.detach()
    torch.testing.assert_close(merged.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged, theirs.base_model.model.up.get_base_layer().weight, rtol=1e-5, atol=1e-6)
    ours.base_model.unmerge_adapter()
    torch.testing.assert_close(up.get_base_layer().weight, base.up.weight, rtol=1e-5, atol=1e-6)

def test_magnitude_only_modules():
    torch.manual_seed(3)
    base = TwoLayers()
    model = get_peft_model(copy.deepcopy(base), DoraConfig(r=4, lora_alpha=8, target_modules=["up"], wdecompose_target_modules=["down"]))
    down = model.base_model.model.down
    assert isinstance(down, DoraLinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("down.lora_magnitude_vector" in n for n in trainable)
    assert not any("down.lora_A" in n or "down.lora_B" in n for n in trainable)
    x = torch.randn(4, 20)
    torch.testing.assert_close(down(x), base.down(x), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        down.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.5, 2.0, 7))
    w0 = base.down.weight.double()
    m = down.lora_magnitude_vector["default"].weight.double()
    expected = (m / torch.linalg.norm(w0, dim=1)) * (x.double() @ w0.T)
    torch.testing.assert_close(down(x).double(), expected.detach(), rtol=1e-5, atol=1e-6)
    assert model.peft_config["default"].is_magnitude_only("down")
    assert not model.peft_config["default"].is_magnitude_only("up")


class CountingNorm:
    """Counts the norms the CPU's default kernels compute."""

    def __init__(self, monkeypatch):
        self.calls = 0
        kernels = backend("cpu")
        real = kernels.weight_norm

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(kernels, "weight_norm", counted)


def test_norm_is_reused_across_accumulation_and_recomputed_after_a_step(monkeypatch):
    _, model = dora_model()
    randomise(model)
    counter = CountingNorm(monkeypatch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(4):  # gradient accumulation micro-steps: A and B unchanged
        model(torch.randn(3, 12)).square().sum().backward()
    assert counter.calls == 2  # once per layer
    opt.step()
    x = torch.randn(3, 12)
    layer = model.base_model.model.up
    torch.testing.assert_close(layer(x).double(), reference_linear(x, layer), rtol=1e-5, atol=1e-5)
    assert counter.calls == 3


def test_norm_never_stale_after_load_merge_unmerge_or_data_swap():
    _, model = dora_model()
    randomise(model)
    layer = model.base_model.model.up
    model.eval()
    x = torch.randn(3, 12)
    layer(x)  # fills the cache
    # A load of new adapter weights.
    other = dora_model(seed=5)[1]
    randomise(other, scale=0.5)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(layer(x).double(), reference_linear(x, layer), rtol=1e-5, atol=1e-5)
    # A merge, then an unmerge.
    model.merge_adapter()
    model.unmerge_adapter()
    torch.testing.assert_close(layer(x).double(), reference_linear(x, layer), rtol=1e-5, atol=1e-5)
    # A parameter whose data is replaced (not written in place).
    layer.lora_B["default"].weight.data = torch.randn_like(layer.lora_B["default"].weight)
    torch.testing.assert_close(layer(x).double(), reference_linear(x, layer), rtol=1e-5, atol=1e-5)


def test_gradient_checkpoint_recomputation_reuses_the_norm(monkeypatch):
    from torch.utils.checkpoint import checkpoint

    _, model = dora_model()
    randomise(model)
    counter = CountingNorm(monkeypatch)
    model.train()
    x = torch.randn(3, 12, requires_grad=True)
    out = checkpoint(model, x, use_reentrant=False)
    out.square().sum().backward()
    assert counter.calls == 2


def test_bad_configurations_get_clear_errors():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        DoraConfig(r=0, target_modules=["up"])
    with pytest.raises(ValueError, match="nonexistent"):
        get_peft_model(TwoLayers(), DoraConfig(r=2, target_modules=["nonexistent"]))


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_float64_model_has_float64_accuracy(dropout):
    """A float64 model gets its norm, output, gradients and merge in float64 (float32 would be ~1e-7 off)."""
    torch.manual_seed(0)
    model = get_peft_model(TwoLayers().double(), DoraConfig(r=4, lora_alpha=8, target_modules=["up"], lora_dropout=dropout))
    randomise(model)
    layer = model.base_model.model.up
    mask = (torch.rand(6, 12) > 0.5).double() * 2 if dropout else None
    if dropout:
        layer.lora_dropout["default"] = FixedMask(mask)
    model.train()
    w0, bias = layer.get_base_layer().weight.detach(), layer.get_base_layer().bias.detach()
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    m = layer.lora_magnitude_vector["default"].weight.detach().clone().requires_grad_()
    assert a.dtype == m.dtype == torch.float64
    s = layer.scaling["default"]
    n = torch.linalg.norm(w0 + s * b.detach() @ a.detach(), dim=1)
    torch.testing.assert_close(peft_dora.layer.weight_norm(layer, "default"), n, rtol=1e-14, atol=0)

    x, g = torch.randn(6, 12, dtype=torch.float64), torch.randn(6, 20, dtype=torch.float64)
    y = layer(x)
    x_d = x if mask is None else x * mask
    expected = x @ w0.T + bias + (m / n - 1) * (x_d @ w0.T) + (m / n) * s * (x_d @ a.T @ b.T)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    (y * g).sum().backward()
    (expected * g).sum().backward()
    for got, want in ((layer.lora_A["default"].weight.grad, a.grad), (layer.lora_B["default"].weight.grad, b.grad),
                      (layer.lora_magnitude_vector["default"].weight.grad, m.grad)):  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    merged = model.merge_and_unload().up.weight
    torch.testing.assert_close(merged, ((m / n)[:, None] * (w0 + s * b @ a)).detach(), rtol=1e-12, atol=1e-13)


def test_branch_dropout_equals_its_float64_formula_without_a_second_base_product(tmp_path):
    """dora_dropout="branch" (opt-in, a deviation from the seed's formula): y = (m/n) (W0 x + s B A x_d) + b,
    gradients of A, B and m as that formula's; the base layer runs once per forward (the seed's formula runs
    it twice while training with dropout). The mode is saved with the adapter and read back."""
    _, model = dora_model(lora_dropout=0.5, dora_dropout="branch")
    randomise(model)
    layer = model.base_model.model.up
    mask = (torch.rand(6, 12) > 0.5).float() * 2
    layer.lora_dropout["default"] = FixedMask(mask)
    calls = []
    layer.get_base_layer().register_forward_hook(lambda *args: calls.append(1))
    model.train()
    x, g = torch.randn(6, 12), torch.randn(6, 20)
    y = layer(x)
    assert len(calls) == 1
    (y * g).sum().backward()

    base = layer.get_base_layer()
    w0, bias = base.weight.detach().double(), base.bias.detach().double()
    a = layer.lora_A["default"].weight.detach().double().requires_grad_()
    b = layer.lora_B["default"].weight.detach().double().requires_grad_()
    m = layer.lora_magnitude_vector["default"].weight.detach().double().requires_grad_()
    s = layer.scaling["default"]
    n = torch.linalg.norm(w0 + s * b.detach() @ a.detach(), dim=1)
    x64 = x.double()
    expected = (m / n) * (x64 @ w0.T + s * (x64 * mask.double()) @ a.T @ b.T) + bias
    torch.testing.assert_close(y.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    (expected * g.double()).sum().backward()
    for got, want in ((layer.lora_A["default"].weight.grad, a.grad), (layer.lora_B["default"].weight.grad, b.grad),
                      (layer.lora_magnitude_vector["default"].weight.grad, m.grad)):  # fmt: skip
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)

    seed_model = dora_model(lora_dropout=0.5)[1]
    seed_layer = seed_model.base_model.model.up
    seed_layer.get_base_layer().register_forward_hook(lambda *args: calls.append(1))
    seed_model.train()
    seed_layer(x)
    assert len(calls) == 3

    model.save_pretrained(tmp_path)
    loaded, _ = peft_dora.load_dora_adapter(TwoLayers(), tmp_path)
    assert loaded.peft_config["default"].dora_dropout == "branch"
    with pytest.raises(ValueError, match="dora_dropout must be one of seed, branch"):
        DoraConfig(r=2, target_modules=["up"], dora_dropout="input")
