"""QDoRA: this project's DoRA layer over bitsandbytes 4-bit and 8-bit base layers, on the CPU.

The expectation for every quantized layer is float64 DoRA on W0 as that layer itself multiplies by it:
read through the quantized layer's own forward (its output for the identity matrix, minus the bias),
never through the code under test. bitsandbytes is installed by scripts/setup.sh, so it is imported
unconditionally: without it these tests fail, they do not skip.
"""

from __future__ import annotations

import copy
import warnings

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from dora_testing import randomise as shared_randomise
from peft_dora import DoraConfig, DoraLinear, invalidate_norm_caches, load_dora_adapter
from peft_dora.layer import weight_norm

KINDS = ["nf4", "fp4", "int8"]
R, ALPHA = 4, 8
SCALING = ALPHA / R


def quantized(linear: nn.Linear, kind: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A bitsandbytes copy of ``linear`` as transformers' loader builds it (4-bit: double-quantized)."""
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=dtype, compress_statistics=True, quant_type=kind)
    layer.load_state_dict({k: v.to(dtype) for k, v in linear.state_dict().items()})
    return layer.to("cpu")  # quantizes


class TwoLayers(nn.Module):
    def __init__(self, up: nn.Module, down: nn.Module) -> None:
        super().__init__()
        self.up, self.down = up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def float_layers(seed: int = 0) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(seed)
    return nn.Linear(128, 64), nn.Linear(64, 32, bias=False)


def quantized_model(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> TwoLayers:
    up, down = float_layers(seed)
    return TwoLayers(quantized(up, kind, dtype), quantized(down, kind, dtype))


@torch.no_grad()
def forward_weight(layer: nn.Module) -> torch.Tensor:
    """W0 (float64) as the layer's own forward multiplies by it: its output for the identity with the bias
    zeroed (adding it would round in a bfloat16 layer). In training mode (8-bit eval forwards also quantize
    their input)."""
    mode, bias = layer.training, layer.bias
    kept = bias.clone() if bias is not None else None
    if bias is not None:
        bias.zero_()
    layer.train()
    dtype = layer.compute_dtype if isinstance(layer, bnb.nn.Linear4bit) else torch.float32
    out = layer(torch.eye(layer.in_features, dtype=dtype)).double()
    layer.train(mode)
    if bias is not None:
        bias.copy_(kept)
    return out.t()


def dora(x: torch.Tensor, w0: torch.Tensor, bias, a, b, m, mask=None) -> torch.Tensor:
    """DoRA's output in float64 with the norm a constant (the paper's section 4.3)."""
    x = x.double()
    x_d = x if mask is None else x * mask
    n = torch.linalg.norm(w0 + SCALING * b.detach() @ a.detach(), dim=1)
    y = x @ w0.T + (m / n - 1) * (x_d @ w0.T) + (m / n) * SCALING * (x_d @ a.T @ b.T)
    return y if bias is None else y + bias.double()


class Reference:
    """The float64 leaves A, B, m of one wrapped layer, and its W0 and bias, read independently."""

    def __init__(self, layer: DoraLinear, w0: torch.Tensor) -> None:
        base = layer.get_base_layer()
        self.w0, self.bias = w0, (base.bias.detach() if base.bias is not None else None)
        self.a = layer.lora_A["default"].weight.detach().double().requires_grad_()
        self.b = layer.lora_B["default"].weight.detach().double().requires_grad_()
        self.m = layer.lora_magnitude_vector["default"].weight.detach().double().requires_grad_()

    def __call__(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        return dora(x, self.w0, self.bias, self.a, self.b, self.m, mask)

    def merged_weight(self) -> torch.Tensor:
        v = self.w0 + SCALING * self.b.detach() @ self.a.detach()
        return (self.m.detach() / torch.linalg.norm(v, dim=1))[:, None] * v


class FixedMask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


def randomise(model: nn.Module, seed: int = 1) -> None:
    shared_randomise(model, scale=0.1, seed=seed)


def qdora(kind: str, dtype: torch.dtype = torch.float32, **config) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A wrapped quantized model and each layer's W0 read from the quantized layers before wrapping."""
    base = quantized_model(kind, dtype)
    weights = {name: forward_weight(getattr(base, name)) for name in ("up", "down")}
    config = {"r": R, "lora_alpha": ALPHA, "target_modules": ["up", "down"], **config}
    return get_peft_model(base, DoraConfig(**config)), weights


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("kind", KINDS)
def test_init_sets_m_to_the_dequantized_row_norms_so_the_model_starts_as_the_quantized_base(kind):
    """m = ||W0|| of the dequantized W0 (not of the codes, ~400x larger for int8): the wrapped model's
    output equals the quantized base's."""
    base = quantized_model(kind)
    x = torch.randn(5, 128)
    expected = base(x).detach()
    weights = {name: forward_weight(getattr(base, name)) for name in ("up", "down")}
    model = get_peft_model(base, DoraConfig(r=R, lora_alpha=ALPHA, target_modules=["up", "down"]))
    for name, w0 in weights.items():
        layer = model.base_model.model.get_submodule(name)
        assert isinstance(layer, DoraLinear)
        m = layer.lora_magnitude_vector["default"].weight
        assert m.dtype == torch.float32
        torch.testing.assert_close(m.double(), torch.linalg.norm(w0, dim=1), rtol=1e-6, atol=0)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("kind", KINDS)
def test_output_and_gradients_equal_float_dora_on_the_dequantized_weight(kind, dropout):
    model, weights = qdora(kind, lora_dropout=dropout)
    randomise(model)
    layer = model.base_model.model.up
    mask = (torch.rand(6, 128) > 0.5).double() * 2 if dropout else None
    if dropout:
        layer.lora_dropout["default"] = FixedMask(mask.float())
    model.train()
    ref = Reference(layer, weights["up"])
    x, g = torch.randn(6, 128), torch.randn(6, 64)

    y = layer(x)
    expected = ref(x, mask)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    (y * g).sum().backward()
    (expected * g.double()).sum().backward()
    grads = {"A": (layer.lora_A["default"].weight.grad, ref.a.grad),
             "B": (layer.lora_B["default"].weight.grad, ref.b.grad),
             "m": (layer.lora_magnitude_vector["default"].weight.grad, ref.m.grad)}  # fmt: skip
    for name, (got, want) in grads.items():
        assert relative(got, want) < 1e-5, name
    # The int8 bug this guards against gave m gradients ~400x too small.
    got, want = grads["m"]
    assert 0.999 < (got.norm() / want.norm()).item() < 1.001


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_training_step_then_the_recomputed_norm(kind):
    """After an optimizer step the norm is recomputed from the dequantized W0 and the new A and B."""
    model, weights = qdora(kind)
    randomise(model)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(6, 128)
    model(x).square().sum().backward()
    opt.step()
    for name in ("up", "down"):
        layer = model.base_model.model.get_submodule(name)
        x_in = torch.randn(6, layer.in_features)
        torch.testing.assert_close(layer(x_in).double(), Reference(layer, weights[name])(x_in), rtol=1e-5, atol=1e-5)


def test_bf16_4bit_base_with_float32_adapters():
    """QLoRA's usual mix: 4-bit from bf16 weights, bf16 compute; A, B, m stay float32."""
    model, weights = qdora("nf4", dtype=torch.bfloat16)
    randomise(model)
    model.train()
    layer = model.base_model.model.up
    assert layer.lora_magnitude_vector["default"].weight.dtype == torch.float32
    x = torch.randn(6, 128).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert relative(y, Reference(layer, weights["up"])(x)) < 1e-2
    y.float().sum().backward()
    assert torch.isfinite(layer.lora_magnitude_vector["default"].weight.grad).all()


def test_4bit_norm_before_and_after_the_cpu_repack():
    """On AVX512-BF16 CPUs the first no-grad eval forward repacks the 4-bit codes in place, with bfloat16
    block scales. Forced here (this CPU may lack the instructions, so that forward's output is not checked):
    the norm must follow the weight into its new layout."""
    model, weights = qdora("nf4")
    randomise(model)
    layer = model.base_model.model.up
    base = layer.get_base_layer()
    ref = Reference(layer, weights["up"])
    delta = SCALING * ref.b.detach() @ ref.a.detach()
    before = torch.linalg.norm(ref.w0 + delta, dim=1)
    torch.testing.assert_close(weight_norm(layer, "default").double(), before, rtol=1e-6, atol=0)
    state = base.weight.quant_state
    codes, block_scales = base.weight.data.clone(), (F.dequantize_blockwise(state.absmax, state.state2) + state.offset)

    base.support_avx512bf16_for_cpu = True
    model.eval()
    with torch.no_grad():
        layer(torch.randn(2, 128))
    assert base.weight.quant_state.packing_format_for_cpu
    # W0 as the repacked forward multiplies by it: the same codes with bfloat16-rounded block scales.
    rounded = F.QuantState(absmax=block_scales.bfloat16().float(), shape=state.shape, blocksize=state.blocksize,
                           quant_type="nf4", dtype=torch.float32)
    w0 = F.dequantize_4bit(codes, rounded).double()
    after = torch.linalg.norm(w0 + delta, dim=1)
    torch.testing.assert_close(weight_norm(layer, "default").double(), after, rtol=1e-6, atol=0)
    naive = torch.linalg.norm(F.dequantize_4bit(base.weight.data, base.weight.quant_state).double(), dim=1)
    assert (naive - torch.linalg.norm(w0, dim=1)).abs().max() > 1e-2  # the packed bytes read as the plain layout


def test_8bit_scales_are_read_wherever_they_are():
    """The first forward moves the int8 row scales (SCB) from the weight to the layer's state; a weight
    re-assigned without them is refused with a clear error rather than read as unscaled codes."""
    expected = torch.linalg.norm(forward_weight(quantized_model("int8").up), dim=1)  # the same codes
    model = get_peft_model(quantized_model("int8"), DoraConfig(r=R, lora_alpha=ALPHA, target_modules=["up"]))
    layer = model.base_model.model.up
    base = layer.get_base_layer()
    assert base.weight.SCB is not None
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight.double(), expected, rtol=1e-6, atol=0)
    model(torch.randn(2, 128))
    assert base.weight.SCB is None and base.state.SCB is not None
    invalidate_norm_caches()
    torch.testing.assert_close(weight_norm(layer, "default").double(), expected, rtol=1e-6, atol=0)

    base.weight = bnb.nn.Int8Params(base.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    base.state.reset_grads()
    with pytest.raises(RuntimeError, match="no row scales"):
        weight_norm(layer, "default")


def assert_requantized(got: torch.Tensor, target: torch.Tensor, kind: str, name: str) -> None:
    """``got`` (a merged layer's forward weight) is what bitsandbytes makes of the float64 ``target``."""
    if kind == "int8":
        codes, scales, _ = F.int8_vectorwise_quant(target.float().half())
        requantized = F.int8_vectorwise_dequant(codes, scales).double()
    else:
        requantized = F.dequantize_4bit(*F.quantize_4bit(target.float(), compress_statistics=True, quant_type=kind)).double()
    mismatched = ((got - requantized).abs() > 1e-6 * requantized.abs().max()).double().mean().item()
    assert mismatched < 0.01, (name, mismatched)  # float32 vs float64 rounding may flip a rare code
    assert relative(got, target) < 0.1


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_requantizes_and_unmerge_restores_the_quantized_weight(kind):
    """merge: dequantize, merge in float32, requantize in the layer's format; the merged weight is what
    bitsandbytes makes of the float64 DoRA weight. unmerge restores the original codes bit for bit."""
    model, weights = qdora(kind, wdecompose_target_modules=["down"], target_modules=["up"])
    randomise(model)
    model.train()
    x = torch.randn(5, 128)
    before = model(x).detach()
    # "down" is magnitude-only: its A and B are zero buffers, so its reference is m / ||W0|| * W0.
    refs = {name: Reference(model.base_model.model.get_submodule(name), weights[name]) for name in ("up", "down")}
    originals = {name: model.base_model.model.get_submodule(name).get_base_layer().weight.data.clone()
                 for name in ("up", "down")}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.merge_adapter()
    for name, ref in refs.items():
        got = forward_weight(model.base_model.model.get_submodule(name).get_base_layer())
        assert_requantized(got, ref.merged_weight(), kind, name)
    assert relative(model(x), before) < 0.2  # 4-bit rounds weights by ~10%, as in the base's own quantization

    model.unmerge_adapter()
    for name, codes in originals.items():
        assert torch.equal(model.base_model.model.get_submodule(name).get_base_layer().weight.data, codes), name
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)

    merged = model.merge_and_unload()
    assert type(merged.up) is (bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit)
    with torch.no_grad():
        expected = dora(x, weights["up"], merged.up.bias, refs["up"].a, refs["up"].b, refs["up"].m)
        assert relative(merged.up(x), expected) < 0.2
        assert relative(forward_weight(merged.up), forward_weight(quantized_model(kind).up)) > 0.01  # changed


def test_magnitude_only_modules_over_a_quantized_base():
    """The seed's wdecompose_target_modules: y = (m / ||W0||) * W0 x + b with W0 the dequantized weight."""
    model, weights = qdora("nf4", target_modules=["up"], wdecompose_target_modules=["down"])
    randomise(model)
    model.train()
    down = model.base_model.model.down
    m = down.lora_magnitude_vector["default"].weight
    x = torch.randn(5, 64)
    y = down(x)
    w0 = weights["down"]
    m64 = m.detach().double().requires_grad_()
    expected = (m64 / torch.linalg.norm(w0, dim=1)) * (x.double() @ w0.T)
    torch.testing.assert_close(y.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    g = torch.randn(5, 32)
    (y * g).sum().backward()
    (expected * g.double()).sum().backward()
    assert relative(m.grad, m64.grad) < 1e-5


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_adapter_save_load_round_trip(tmp_path, kind):
    """Saved from a quantized model, loaded onto a fresh quantized base (upstream's loader and ours)."""
    model, _ = qdora(kind, target_modules=["up"], wdecompose_target_modules=["down"])
    randomise(model)
    model.train()
    model(torch.randn(3, 128)).sum().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.eval()
    x = torch.randn(5, 128)
    expected = model(x).detach()
    model.save_pretrained(tmp_path)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unexpected keyword arguments")
        loaded = PeftModel.from_pretrained(quantized_model(kind), tmp_path, config=copy.deepcopy(model.peft_config["default"]))
    assert isinstance(loaded.base_model.model.up, DoraLinear)
    torch.testing.assert_close(loaded(x), expected, rtol=1e-6, atol=1e-6)
    ours, report = load_dora_adapter(quantized_model(kind), tmp_path)
    assert report.dora_layers == 2 and report.magnitude_only_layers == 1
    torch.testing.assert_close(ours(x), expected, rtol=1e-6, atol=1e-6)
    # The seed loader's mode (m = ||W0||) reads W0 dequantized too.
    seed_like, _ = load_dora_adapter(quantized_model(kind), tmp_path, magnitudes="weight_norm")
    w0 = forward_weight(quantized_model(kind).up)
    m = seed_like.base_model.model.up.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(m.double(), torch.linalg.norm(w0, dim=1), rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("bits", [4, 8])
def test_train_py_path_transformers_quantized_load_then_kbit_preparation(tiny_llama_dir, bits):
    """As llava/train/train.py does it for --bits 4/8: BitsAndBytesConfig load, prepare_model_for_kbit_training,
    then get_peft_model(DoraConfig). The layers are this project's, m = ||W0|| of the quantized weights in
    float32, the model starts equal to the quantized base, and a step gives every magnitude a gradient."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    quantization = BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=quantization, device_map="cpu",
                                             dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 33, 2, 60, 7]])
    model.train()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    q_proj = model.model.layers[0].self_attn.q_proj
    w0 = forward_weight(q_proj)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = DoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj", "down_proj"],
                        wdecompose_target_modules=["o_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, DoraLinear) and layer.get_base_layer() is q_proj
    m = layer.lora_magnitude_vector["default"].weight
    assert m.dtype == torch.float32
    torch.testing.assert_close(m.double(), torch.linalg.norm(w0, dim=1), rtol=1e-6, atol=0)
    model.train()
    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    magnitudes = [p for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert len(magnitudes) == 4 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in magnitudes)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_second_adapter_merges_with_the_norm_of_the_quantized_w0(kind):
    """A second DoRA adapter merged over a quantized weight that holds the first: its factor is
    m / ||W0 + sBA|| with W0 the original dequantized weight (the norm its forward uses), applied to the
    weight that holds the first adapter. Unmerging both restores the original codes."""
    model, weights = qdora(kind, target_modules=["up"])
    model.add_adapter("second", DoraConfig(r=R, lora_alpha=ALPHA, target_modules=["up"]))
    randomise(model)
    up = model.base_model.model.up
    codes = up.get_base_layer().weight.data.clone()
    model.base_model.merge_adapter(["default"])
    holding_first = forward_weight(up.get_base_layer())
    model.base_model.merge_adapter(["second"])
    delta = SCALING * up.lora_B["second"].weight.double() @ up.lora_A["second"].weight.double()
    m = up.lora_magnitude_vector["second"].weight.double()
    target = (m / torch.linalg.norm(weights["up"] + delta, dim=1))[:, None] * (holding_first + delta)
    assert_requantized(forward_weight(up.get_base_layer()), target.detach(), kind, "up")
    model.base_model.unmerge_adapter()
    assert torch.equal(up.get_base_layer().weight.data, codes)
