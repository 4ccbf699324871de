"""The model zoo: every arch runs at small and large inputs, grey and colour, traces and exports
to ONNX (dynamic batch, static int8 as the exporter does) with eager's logits, learns a trivial
task, and swaps its head; the records written before there was a choice still load."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from workloads.training.checkpoint import load_checkpoint
from workloads.training.models import (
    ARCHS,
    DEFAULT_WIDTH,
    MobileNetV3Small,
    ResNet18,
    SmallCNN,
    build_model,
    head_of,
    replace_head,
)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy two-core machine, two OpenMP threads spin against the other
    processes and each test runs ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def arch(name: str, in_channels: int = 3, num_classes: int = 5, input_size: int = 32, **kw):
    return {
        "name": name,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "input_size": input_size,
        **kw,
    }


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def seeded(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return build_model(arch(name, **kw)).eval()


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("size", [32, 96])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_forward_shape(name, size, in_channels):
    model = seeded(name, in_channels=in_channels, num_classes=7, input_size=size)
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_the_classes_and_default_widths():
    assert isinstance(build_model(arch("small_cnn")), SmallCNN)
    assert isinstance(build_model(arch("resnet18")), ResNet18)
    assert isinstance(build_model(arch("mobilenet_v3_small")), MobileNetV3Small)
    assert set(DEFAULT_WIDTH) == set(ARCHS)
    # no width: the arch's default (small_cnn's first conv has 16 channels)
    assert build_model(arch("small_cnn")).features[0].out_channels == 16
    assert build_model(arch("resnet18")).stem[0].out_channels == 32
    assert build_model(arch("resnet18", width=8)).stem[0].out_channels == 8


def test_parameter_counts_match_the_reference_networks():
    # torchvision's resnet18 and mobilenet_v3_small (1000 classes) have exactly these counts
    assert n_params(build_model(arch("resnet18", num_classes=1000, input_size=224, width=64))) == (
        11_689_512
    )
    mobilenet = build_model(arch("mobilenet_v3_small", num_classes=1000, input_size=224, width=100))
    assert n_params(mobilenet) == 2_542_856
    # the multiplier shrinks it
    half = build_model(arch("mobilenet_v3_small", num_classes=1000, input_size=224, width=50))
    assert 0.5e6 < n_params(half) < 0.5 * n_params(mobilenet)


def test_small_inputs_keep_spatial_cells_before_the_pool():
    for name in ("resnet18", "mobilenet_v3_small"):
        model = seeded(name, input_size=32)
        body = model.layer4 if name == "resnet18" else model.features
        seen = {}

        def hook(module, inputs, output) -> None:
            seen["shape"] = output.shape

        body.register_forward_hook(hook)
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
        assert seen["shape"][-2:] == (4, 4), name


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("size", [32, 96])
def test_trace_and_onnx_match_eager(name, size, tmp_path):
    import onnx
    import onnxruntime as ort

    model = seeded(name, in_channels=3, num_classes=4, input_size=size)
    torch.manual_seed(1)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        eager = model(x)
        traced = torch.jit.trace(model, x[:1])
        assert torch.allclose(traced(x), eager, atol=1e-6)

    # as workloads/training/export.py does it (traced at batch 1, the batch axis dynamic, the exporter's
    # default opset), and at opset 17 too
    for opset in (None, 17):
        path = tmp_path / f"model-{opset}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (x[:1],),
                str(path),
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                dynamo=False,
                **({} if opset is None else {"opset_version": opset}),
            )
        if opset is not None:
            assert onnx.load(str(path)).opset_import[0].version == opset
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits = sess.run(None, {"image": x.numpy()})[0]
        assert logits.shape == (3, 4)
        np.testing.assert_allclose(logits, eager.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ARCHS)
def test_static_int8_quantization_runs(name, tmp_path):
    """The exporter's int8 step (pre-process, QDQ static int8 calibrated on samples) goes through."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = seeded(name, in_channels=1, num_classes=3, input_size=32)
    samples = np.random.default_rng(0).normal(size=(8, 1, 32, 32)).astype(np.float32)
    path, prepared, int8 = tmp_path / "m.onnx", tmp_path / "p.onnx", tmp_path / "q.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(samples[:1]),),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": samples}])

        def get_next(self):
            return next(self.batches, None)

    quant_pre_process(str(path), str(prepared))
    quantize_static(
        str(prepared),
        str(int8),
        Calibration(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
    )
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    sess = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"image": samples})[0]
    assert out.shape == (8, 3) and np.isfinite(out).all()


def colour_blobs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Red-ish (class 0) and blue-ish (class 1) 32x32 images under heavy pixel noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    base = torch.zeros(n, 3, 1, 1)
    base[y == 0, 0] = 0.6
    base[y == 1, 2] = 0.6
    x = base + 0.5 * torch.randn(n, 3, 32, 32, generator=g)
    return x, y


def precise_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Re-estimate every BatchNorm's running statistics on ``x`` (an exact average, no grads).

    40 steps are too few for MobileNetV3's running statistics: its depthwise layers' batch
    variance keeps shrinking while the loss is already ~0, the exponential averages lag behind
    by up to ~10x, and a stack of eleven such blocks turns eval-mode logits into near-constants
    (chance accuracy) until ~60-80 steps, though train-mode accuracy is 1.0 from step ~10.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum


# narrow nets, to keep 40 steps quick on two cores
LEARN_WIDTH = {"small_cnn": 8, "resnet18": 8, "mobilenet_v3_small": 25}


@pytest.mark.parametrize("name", ARCHS)
def test_learns_a_trivial_task(name):
    torch.manual_seed(0)
    model = build_model(arch(name, num_classes=2, width=LEARN_WIDTH[name]))
    x, y = colour_blobs(128)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        idx = torch.randperm(len(x), generator=g)[:16]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    precise_bn(model, x)
    model.eval()  # judged as a deployed model runs: dropout off, running BN statistics
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy >= 0.9


@pytest.mark.parametrize("name", ARCHS)
def test_replace_head_changes_the_classes_and_keeps_the_rest(name):
    model = seeded(name, num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    old_head = head_of(model)
    assert isinstance(old_head, nn.Linear) and old_head.out_features == 5

    assert replace_head(model, 11) is model
    head = head_of(model)
    assert head is not old_head and head.out_features == 11
    assert head.in_features == old_head.in_features
    assert [m for m in model.modules() if isinstance(m, nn.Linear)][-1] is head
    after = model.state_dict()
    head_keys = {k for k in before if before[k].shape != after[k].shape}
    assert len(head_keys) == 2  # weight and bias
    for k, v in before.items():
        if k not in head_keys:
            assert torch.equal(after[k], v), k
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 11)


def test_small_cnn_head_is_the_classifiers_last_linear():
    model = build_model(arch("small_cnn"))
    assert head_of(model) is model.classifier[-1]
    replace_head(model, 2)
    assert model.classifier[-1].out_features == 2


# The state_dict of the one CNN there was before the arch choice: records saved then hold it.
OLD_KEYS = [
    *(
        f"features.{i}.{p}"
        for conv, bn in ((0, 1), (4, 5), (8, 9))
        for i, params in (
            (conv, ("weight", "bias")),
            (bn, ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")),
        )
        for p in params
    ),
    "classifier.2.weight",
    "classifier.2.bias",
]


def test_the_small_cnn_keeps_the_state_dict_of_records_saved_before_the_arch_choice():
    new = build_model({"in_channels": 1, "num_classes": 3, "input_size": 32, "width": 4})
    assert isinstance(new, SmallCNN) and list(new.state_dict()) == OLD_KEYS
    assert new.state_dict()["features.0.weight"].shape == (4, 1, 3, 3)


def test_an_old_record_loads_as_a_small_cnn_and_a_new_one_as_its_arch(tmp_path):
    torch.manual_seed(0)
    old_arch = {"in_channels": 1, "num_classes": 3, "input_size": 32, "width": 4}
    old = SmallCNN(1, 3, 32, 4)
    torch.save({"state_dict": old.state_dict(), "arch": old_arch}, tmp_path / "old.pt")
    loaded, record = load_checkpoint(tmp_path / "old.pt")
    assert isinstance(loaded, SmallCNN) and not loaded.training
    assert record["arch"] == old_arch

    new_arch = arch("mobilenet_v3_small", in_channels=1, num_classes=3, width=25)
    model = build_model(new_arch)
    torch.save({"state_dict": model.state_dict(), "arch": new_arch}, tmp_path / "new.pt")
    loaded, _ = load_checkpoint(tmp_path / "new.pt")
    assert isinstance(loaded, MobileNetV3Small)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_an_unknown_arch_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="small_cnn, resnet18, mobilenet_v3_small") as e:
        build_model(arch("vgg16"))
    assert "'vgg16'" in str(e.value)
    with pytest.raises(ValueError, match="width"):
        build_model(arch("resnet18", width=0))
