"""Networks uqseg did not write: MONAI / plain torch U-Nets exported by plain torch.onnx.export,
without uqseg metadata. Layers and the spatial divisor are found from the graph's structure;
the references are the torch modules' own block outputs (forward hooks)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest

from uqseg import (
    EnsembleSegmenter,
    KNNOODDetector,
    MahalanobisOODDetector,
    OnnxSegmenter,
    QualityRegressor,
    SpectralOODDetector,
    TemperatureCalibrator,
    datasets,
)
from uqseg.cli import main

torch = pytest.importorskip("torch")
nn = torch.nn
pytestmark = pytest.mark.torch


# ---------------------------------------------------------------------- the registry
class DeepSupervisionUNet(nn.Module):
    """Two poolings; heads at 1/2 and full resolution, the low-resolution one returned first
    (as nnU-Net-style deep supervision lists them). ``heads=False``: the full-resolution
    output alone, through ``final`` (e.g. ``nn.Sigmoid()``) when given."""

    def __init__(self, k=3, heads=True, final=None):
        super().__init__()
        self.heads, self.final = heads, final
        c = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU())  # noqa: E731
        self.enc1, self.enc2, self.bott = c(1, 8), c(8, 16), c(16, 32)
        self.pool = nn.MaxPool2d(2)
        self.up2, self.dec2 = nn.ConvTranspose2d(32, 16, 2, stride=2), c(32, 16)
        self.up1, self.dec1 = nn.ConvTranspose2d(16, 8, 2, stride=2), c(16, 8)
        self.head_half, self.head = nn.Conv2d(16, k, 1), nn.Conv2d(8, k, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bott(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        if not self.heads:
            out = self.head(d1)
            return out if self.final is None else self.final(out)
        return self.head_half(d2), self.head(d1)


class PlainConvUNetLike(nn.Module):
    """The layout of nnU-Net v2's ``PlainConvUNet`` (dynamic_network_architectures): stages of
    two conv-InstanceNorm-LeakyReLU blocks, the first conv of a stage strided (no pooling),
    transposed-conv upsampling, a 1x1 segmentation layer per decoder stage. With
    ``deep_supervision`` the outputs are listed full resolution first, as nnU-Net does."""

    def __init__(self, k=3, features=(8, 16, 32, 64), strides=(1, 2, 2, 2),
                 deep_supervision=True):
        super().__init__()

        def stage(i, o, stride):
            return nn.Sequential(*(nn.Sequential(
                nn.Conv2d(i if j == 0 else o, o, 3, stride if j == 0 else 1, 1),
                nn.InstanceNorm2d(o, eps=1e-5, affine=True), nn.LeakyReLU(0.01, inplace=True))
                for j in range(2)))

        self.encoder = nn.Module()
        self.encoder.stages = nn.ModuleList(
            stage(features[s - 1] if s else 1, f, st)
            for s, (f, st) in enumerate(zip(features, strides, strict=True)))
        self.decoder = nn.Module()
        self.decoder.deep_supervision = deep_supervision  # nnU-Net's switch lives there
        up = list(range(len(features) - 1, 0, -1))  # from the bottom up
        self.decoder.transpconvs = nn.ModuleList(
            nn.ConvTranspose2d(features[s], features[s - 1], strides[s], strides[s]) for s in up)
        self.decoder.stages = nn.ModuleList(
            stage(2 * features[s - 1], features[s - 1], 1) for s in up)
        self.decoder.seg_layers = nn.ModuleList(nn.Conv2d(features[s - 1], k, 1) for s in up)

    def forward(self, x):
        skips = []
        for st in self.encoder.stages:
            x = st(x)
            skips.append(x)
        lres, seg = skips[-1], []
        dec = self.decoder
        for s in range(len(dec.stages)):
            x = dec.stages[s](torch.cat((dec.transpconvs[s](lres), skips[-(s + 2)]), 1))
            if dec.deep_supervision or s == len(dec.stages) - 1:
                seg.append(dec.seg_layers[s](x))
            lres = x
        seg = seg[::-1]
        return tuple(seg) if dec.deep_supervision else seg[0]


class _BasicBlock(nn.Module):
    """torchvision's ResNet ``BasicBlock``."""

    def __init__(self, i, o, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o)
        self.conv2, self.bn2 = nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None if stride == 1 and i == o else nn.Sequential(
            nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + idt)


class SmpLayoutUnet(nn.Module):
    """The layout of ``segmentation_models_pytorch.Unet(encoder_name="resnet18")`` at an
    eighth of its width (smp itself needs a torchvision build matching torch): a ResNet-18
    encoder (7x7 stride-2 stem, max pooling, four stages of two basic blocks), decoder blocks
    that upsample (nearest) to the skip's size, concatenate it and apply two conv-BN-ReLU, the
    last block with no skip, and a 3x3 segmentation head. Divisor 32."""

    def __init__(self, k=3, widths=(8, 8, 16, 32, 64), decoder=(32, 16, 8, 4, 2)):
        super().__init__()
        cbr = lambda i, o: nn.Sequential(  # noqa: E731
            nn.Conv2d(i, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))
        self.encoder = nn.Module()
        e = self.encoder
        e.conv1, e.bn1 = nn.Conv2d(1, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0])
        e.relu, e.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        for n in range(1, 5):
            i, o, st = widths[max(n - 1, 1)], widths[n], 1 if n == 1 else 2
            setattr(e, f"layer{n}", nn.Sequential(_BasicBlock(i, o, st), _BasicBlock(o, o, 1)))
        skips = (widths[3], widths[2], widths[1], widths[0], 0)
        ins = (widths[4], *decoder[:-1])
        self.decoder = nn.Module()
        self.decoder.blocks = nn.ModuleList(
            nn.Sequential(cbr(i + s, o), cbr(o, o)) for i, s, o in zip(ins, skips, decoder,
                                                                      strict=True))
        self.segmentation_head = nn.Conv2d(decoder[-1], k, 3, padding=1)

    def forward(self, x):
        e = self.encoder
        f0 = e.relu(e.bn1(e.conv1(x)))
        f1 = e.layer1(e.maxpool(f0))
        f2 = e.layer2(f1)
        f3 = e.layer3(f2)
        x = e.layer4(f3)
        for blk, skip in zip(self.decoder.blocks, (f3, f2, f1, f0, None), strict=True):
            if skip is None:
                x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
            else:
                x = torch.cat([nn.functional.interpolate(x, size=skip.shape[2:],
                                                         mode="nearest"), skip], 1)
            x = blk(x)
        return self.segmentation_head(x)


def _smp_unet():
    smp = pytest.importorskip(
        "segmentation_models_pytorch",
        reason="segmentation_models_pytorch is not installed (it needs timm and a torchvision "
               "build matching the installed torch)")
    return smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=1, classes=3)


def _monai_unet():
    monai = pytest.importorskip("monai")
    return monai.networks.nets.UNet(spatial_dims=2, in_channels=1, out_channels=3,
                                    channels=(8, 16, 32, 64), strides=(2, 2, 2),
                                    num_res_units=1)


def _monai_basic_unet():
    monai = pytest.importorskip("monai")
    return monai.networks.nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=3,
                                         features=(8, 8, 16, 16, 32, 8))


def _monai_segresnet():
    """GroupNorm throughout: torch exports it as a reshaped InstanceNormalization."""
    monai = pytest.importorskip("monai")
    return monai.networks.nets.SegResNet(spatial_dims=2, in_channels=1, out_channels=3,
                                         init_filters=8)


_PLAIN = {"bottleneck": "bott", "decoder_1/2": "dec2", "decoder_last": "dec1"}
_NNUNET = {"bottleneck": "encoder.stages.3", "decoder_1/4": "decoder.stages.0",
           "decoder_1/2": "decoder.stages.1", "decoder_last": "decoder.stages.2",
           "stem": "encoder.stages.0.0.0"}  # instance-normalised: the first conv found too
_SMP = {"bottleneck": "encoder.layer4", "decoder_1/4": "decoder.blocks.2",
        "decoder_1/2": "decoder.blocks.3", "decoder_last": "decoder.blocks.4"}
# name -> (builder, output names, divisor, {role: module path whose output it is})
REGISTRY = {
    "monai_unet": (_monai_unet, ["out"], 8, {"stem": "model.0.residual"}),
    "monai_basicunet": (_monai_basic_unet, ["out"], 16,
                        {"bottleneck": "down_4", "decoder_1/4": "upcat_3",
                         "decoder_1/2": "upcat_2", "decoder_last": "upcat_1",
                         "stem": "conv_0.conv_0.conv"}),
    "monai_segresnet": (_monai_segresnet, ["out"], 8,
                        {"bottleneck": "down_layers.3", "decoder_1/4": "up_layers.0",
                         "decoder_1/2": "up_layers.1", "decoder_last": "conv_final.1",
                         "stem": "convInit.conv"}),
    "deep_supervision": (DeepSupervisionUNet, ["aux_half", "seg"], 4, _PLAIN),
    "sigmoid_binary": (lambda: DeepSupervisionUNet(1, heads=False), ["prob"], 4, _PLAIN),
    "sigmoid_multilabel": (lambda: DeepSupervisionUNet(3, heads=False, final=nn.Sigmoid()),
                           ["prob"], 4, _PLAIN),
    "softmax_end": (lambda: DeepSupervisionUNet(3, heads=False, final=nn.Softmax(dim=1)),
                    ["prob"], 4, _PLAIN),
    "nnunet_style": (PlainConvUNetLike, ["seg", "seg_1_2", "seg_1_4"], 8, _NNUNET),
    "nnunet_style_no_ds": (lambda: PlainConvUNetLike(deep_supervision=False), ["seg"], 8,
                           _NNUNET),
    "smp_layout": (SmpLayoutUnet, ["mask"], 32, _SMP),
    "smp_unet": (_smp_unet, ["mask"], 32, _SMP),
}
# the segmentation output when it is not the last output listed
SEG_OUTPUT = {"sigmoid_multilabel": "/head/Conv_output_0", "softmax_end": "/head/Conv_output_0",
              "nnunet_style": "seg"}
ACTIVATION = {"sigmoid_binary": "sigmoid", "sigmoid_multilabel": "sigmoid"}


def export(model, path, outputs, size=64):
    """Plain ``torch.onnx.export`` with dynamic batch and spatial axes, no uqseg metadata."""
    model.eval()
    x = torch.randn(1, 1, size, size)
    axes = {"image": {0: "N", 2: "H", 3: "W"}, **{o: {0: "N", 2: "h", 3: "w"} for o in outputs}}
    with warnings.catch_warnings():  # tracer and deprecation chatter of the exporter
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["image"], output_names=outputs,
                          dynamic_axes=axes, dynamo=False)
    return str(path)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """name -> (torch module, ONNX path), built and exported once per module."""
    folder = tmp_path_factory.mktemp("foreign")
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            build, outputs, _, _ = REGISTRY[name]
            model = build()
            cache[name] = (model, export(model, folder / f"{name}.onnx", outputs))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def brain():
    X, y = datasets.load_brain_tissue("train")
    return X[:16, :, ::2, ::2].copy(), y[:16, ::2, ::2].copy()  # 64 x 64: seconds on a CPU


def _hooked(model, paths, x):
    """Outputs of the torch sub-modules ``paths`` for input ``x``."""
    got, handles = {}, []
    for p in paths:
        mod = model.get_submodule(p)
        handles.append(mod.register_forward_hook(
            lambda m, i, o, p=p: got.__setitem__(p, o.detach().numpy())))
    with torch.no_grad():
        model(torch.from_numpy(x))
    for h in handles:
        h.remove()
    return got


# ---------------------------------------------------------------------- structure
@pytest.mark.parametrize("name", list(REGISTRY))
def test_divisor_and_roles_found_by_structure(foreign, name):
    model, path = foreign(name)
    _, outputs, divisor, modules = REGISTRY[name]
    seg = OnnxSegmenter(path).fit()
    assert seg.spatial_divisor_ == divisor  # product of the strides to the bottleneck
    # the full-resolution output, or the logits before the graph's own Softmax/Sigmoid
    assert seg.output_name_ == SEG_OUTPUT.get(name, outputs[-1])
    roles = seg.layer_roles_
    assert {"bottleneck", "decoder_1/2", "decoder_last"} <= set(roles)
    x = np.random.default_rng(0).standard_normal((2, 1, 64, 64)).astype(np.float32)
    feats = seg.run(x, layers=list(roles.values()))
    want = {"bottleneck": 64 // divisor, "decoder_1/4": 16, "decoder_1/2": 32,
            "decoder_last": 64, "stem": 32 if name == "monai_unet" else 64}
    # the stem only where the maps are normalised per image (instance norm)
    assert ("stem" in roles) == ("stem" in modules)
    for role, tensor in roles.items():
        assert feats[tensor].shape[2:] == (want[role],) * 2, role
    # the tensors are the torch blocks' outputs, value for value
    ref = _hooked(model, list(modules.values()), x)
    for role, mod in modules.items():
        np.testing.assert_allclose(feats[roles[role]], ref[mod], rtol=1e-4, atol=1e-4)


def test_zoo_structure_matches_its_names():
    seg = OnnxSegmenter(datasets.reference_models()[0]).fit()
    assert seg.layer_roles_ == {"bottleneck": "bottleneck", "decoder_1/4": "dec1",
                                "decoder_1/2": "dec2", "decoder_last": "decoder_last"}


def test_odd_size_padded_and_cropped(foreign):
    """The dynamic-size BasicUNet on 130 x 130: raw onnxruntime fails in a Concat (130 is no
    multiple of 16); the segmenter pads to 144 and crops back."""
    model, path = foreign("monai_basicunet")
    x = np.random.default_rng(1).standard_normal((2, 1, 130, 130)).astype(np.float32)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="Concat|dimension|shape"):
        sess.run(None, {"image": x})
    padded = np.pad(x, [(0, 0), (0, 0), (0, 14), (0, 14)], mode="reflect")
    with torch.no_grad():
        ref = model(torch.from_numpy(padded)).numpy()[:, :, :130, :130]
    got = OnnxSegmenter(path).fit().transform(x)
    assert got.shape == (2, 3, 130, 130)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_output_picks_a_head(foreign):
    model, path = foreign("deep_supervision")
    x = np.random.default_rng(2).standard_normal((1, 1, 32, 32)).astype(np.float32)
    with torch.no_grad():
        half, full = (t.numpy() for t in model(torch.from_numpy(x)))
    np.testing.assert_allclose(OnnxSegmenter(path).fit().transform(x), full, atol=1e-4)
    with pytest.raises(ValueError, match="is not an output of the model"):
        OnnxSegmenter(path, output="nope").fit()
    # the half-resolution head is no segmentation of the input's size: a clear error
    with pytest.raises(ValueError, match="spatial size|shape"):
        OnnxSegmenter(path, output="aux_half").fit().transform(x)
    assert half.shape[2:] == (16, 16)


# ---------------------------------------------------------------------- estimators
@pytest.mark.parametrize("name", list(REGISTRY))
def test_estimators_with_default_settings(foreign, brain, name):
    _, path = foreign(name)
    X, y = brain
    seg = OnnxSegmenter(path).fit()
    roles = seg.layer_roles_
    ood = SpectralOODDetector(seg).fit(X)
    expected = [roles[r] for r in ("decoder_1/4", "decoder_1/2", "bottleneck", "stem")
                if r in roles]
    assert ood.layers_ == expected and len(ood.layers_) > 1
    # the layout's: the last decoder block in a per-image normalised network (with a stem)
    layout = "decoder_last" if "stem" in roles and "decoder_last" in roles else "decoder_1/2"
    assert ood.descriptors_[1].layers_ == [roles[layout]]
    s = ood.score_samples(datasets.load_ood("ct")[:4, :, ::2, ::2])
    assert s.shape == (4,) and np.isfinite(s).all()
    assert MahalanobisOODDetector(seg).fit(X).layers_ == [roles["bottleneck"]]
    assert KNNOODDetector(seg).fit(X).layers_ == [roles["bottleneck"]]
    assert seg.activation_ == ACTIVATION.get(name, "softmax")
    ens = EnsembleSegmenter([seg, OnnxSegmenter(path, tta="flips")]).fit()
    k = seg.n_classes_
    mi = ens.uncertainty(X[:2], kind="mutual_information")
    assert mi.shape == ((2, k, 64, 64) if seg.activation_ == "sigmoid" else (2, 64, 64))
    assert np.isfinite(mi).all() and mi.min() >= 0
    if seg.activation_ == "softmax":
        t, n_q = y, k - 1
        cal = TemperatureCalibrator(seg).fit(X, y)
    else:  # indicator targets, one mask per channel: brain, white matter, grey matter
        t, n_q = np.stack([y >= 1, y == 2, y == 1], axis=1)[:, :k], k
        cal = TemperatureCalibrator(seg, mode="classwise").fit(X, t)
        assert (cal.predict(X) == seg.predict(X)).all()
    assert np.isfinite(cal.temperature_).all()
    q = QualityRegressor(seg).fit(X, t).predict(X[:3])
    assert q.shape == (3, n_q) and ((q >= 0) & (q <= 1)).all()
    with pytest.raises(ValueError, match="bottleneck = "):  # the error lists the structure
        SpectralOODDetector(seg, layer="add_169").fit(X[:4])
    # a role is accepted as a layer name
    assert SpectralOODDetector(seg, layer="bottleneck").fit(X).layers_ == [roles["bottleneck"]]


def test_save_load_with_output(foreign, tmp_path):
    import uqseg

    _, path = foreign("deep_supervision")
    seg = OnnxSegmenter(path, output="seg").fit()
    uqseg.save(seg, tmp_path / "s")
    back = uqseg.load(tmp_path / "s")
    assert back.output == "seg" and back.layer_roles_ == seg.layer_roles_


# ---------------------------------------------------------------------- inspect
def test_inspect_reports_structure(foreign, capsys):
    _, path = foreign("monai_basicunet")
    assert main(["inspect", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["spatial_divisor"] == {"value": 16, "source": "graph"}
    assert info["activation"] == "softmax" and info["n_classes"] == 3
    roles = info["feature_layers"]["roles"]
    assert roles["bottleneck"]["resolution"] == "1/16"
    assert roles["bottleneck"]["shape_at_probe"] == [1, 32, 48, 48]
    assert roles["decoder_1/4"]["resolution"] == "1/4"
    assert info["defaults"]["SpectralOODDetector"]["layers"] == [
        roles[r]["name"] for r in ("decoder_1/4", "decoder_1/2", "bottleneck", "stem")]
    assert roles["stem"]["name"] == "/conv_0/conv_0/conv/Conv_output_0"  # before InstanceNorm
    assert main(["inspect", path]) == 0
    assert "spatial divisor: 16 (from graph)" in capsys.readouterr().out


def test_inspect_set_writes_validated_copy(foreign, tmp_path, capsys):
    import onnx

    _, path = foreign("monai_basicunet")
    roles = OnnxSegmenter(path).fit().layer_roles_
    out = tmp_path / "named.onnx"
    layers = json.dumps([roles["bottleneck"], roles["decoder_last"]])
    assert main(["inspect", path, "--set", f"feature_layers={layers}", "--set",
                 "spatial_divisor=32", "--set", "activation=softmax", "--out", str(out)]) == 0
    capsys.readouterr()
    a, b = onnx.load(path), onnx.load(out)
    assert [t.raw_data for t in a.graph.initializer] == [t.raw_data for t in b.graph.initializer]
    assert a.graph.node == b.graph.node  # weights and graph untouched
    meta = {p.key: p.value for p in b.metadata_props}
    assert meta["uqseg.spatial_divisor"] == "32" and json.loads(
        meta["uqseg.feature_layers"]) == json.loads(layers)
    seg = OnnxSegmenter(out).fit()
    assert seg.spatial_divisor_ == 32 and seg.feature_layers_[:2] == json.loads(layers)
    # invalid values are refused and nothing is written
    bad = tmp_path / "bad.onnx"
    assert main(["inspect", path, "--set", "n_classes=5", "--out", str(bad)]) == 1
    assert "says 5 classes" in capsys.readouterr().err and not bad.exists()
    assert main(["inspect", path, "--set", 'feature_layers=["nope"]', "--out", str(bad)]) == 1
    assert not bad.exists()
    assert main(["inspect", path, "--set", "colour=red", "--out", str(bad)]) == 2
    assert main(["inspect", path, "--set", "activation=softmax"]) == 2  # no --out
    assert main(["inspect", path, "--set", "activation=softmax", "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err


# ---------------------------------------------------------------------- the guide runs
def test_byo_doc_runs(tmp_path, monkeypatch, capsys):
    """docs/byo_network.md: every python block, in order, in one namespace."""
    import re
    from pathlib import Path

    pytest.importorskip("monai")
    text = (Path(__file__).parents[1] / "docs" / "byo_network.md").read_text()
    import textwrap

    blocks = [textwrap.dedent(b) for _, b in re.findall(
        r"^( *)```python\n(.*?)^\1```", text, flags=re.S | re.M)]
    assert len(blocks) == 5
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for block in blocks:
        exec(compile(block, "byo_network.md", "exec"), ns)  # noqa: S102
    out = capsys.readouterr().out
    assert "spatial divisor: 16 (from graph)" in out
    assert len(ns["ood"].layers_) == 4 and ns["proba"].shape == (1, 3, 130, 130)
    assert ns["seg"].layer_roles_["bottleneck"] == "/down_4/convs/conv_1/adn/A/LeakyRelu_output_0"
    seg = OnnxSegmenter(str(tmp_path / "renamed.onnx")).fit()  # the Identity block's name
    assert "bottleneck" in seg.feature_layers_
    assert ns["qr"].predict(ns["X"][:2]).shape == (2, 2)
    # the nnU-Net-style section: what it says it prints, and the four estimators fitted
    assert out.count("seg 8 ['bottleneck', 'decoder_1/2', 'decoder_1/4', 'decoder_last', "
                     "'stem']") == 2
    assert ns["nn_ood"].layers_ == [ns["nn_seg"].layer_roles_[r]
                                    for r in ("decoder_1/4", "decoder_1/2", "bottleneck", "stem")]
    assert np.isfinite(ns["nn_cal"].temperature_).all() and ns["nn_mi"].shape == (2, 64, 64)
    assert ns["nn_qr"].predict(ns["Xn"][:2]).shape == (2, 2)
    ds = OnnxSegmenter(str(tmp_path / "nnunet_ds.onnx")).fit()  # the heads: full res first
    x = ns["Xn"][:2]
    with torch.no_grad():
        ns["net"].deep_supervision = True
        heads = [t.numpy() for t in ns["net"](torch.from_numpy(x))]
    assert [h.shape[2] for h in heads] == [64, 32, 16]
    np.testing.assert_allclose(ds.transform(x), heads[0], rtol=1e-4, atol=1e-4)


def test_ensemble_of_deep_supervision_members(foreign):
    """Members whose segmentation is not the first output: the ensemble runs them unfused,
    on the full-resolution head (reference: the mean of the torch heads' softmax)."""
    from scipy.special import softmax

    model, path = foreign("deep_supervision")
    ens = EnsembleSegmenter([path, path]).fit()
    assert not ens.fused_
    x = np.random.default_rng(3).standard_normal((2, 1, 32, 32)).astype(np.float32)
    with torch.no_grad():
        full = model(torch.from_numpy(x))[1].numpy()
    np.testing.assert_allclose(ens.predict_proba(x), softmax(full, axis=1), atol=1e-5)
    # output= passes on to members given as paths; the half-resolution head is refused
    assert EnsembleSegmenter([path], output="seg").fit().members_[0].output == "seg"
    with pytest.raises(ValueError, match="is not an output of the model"):
        EnsembleSegmenter([path], output="nope").fit()
    with pytest.raises(TypeError, match="output must be None"):
        EnsembleSegmenter([path], output=3).fit()


# ---------------------------------------------------------------------- the results benchmark
def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "bench_byo_estimators.py"
    spec = importlib.util.spec_from_file_location("_bench_byo_estimators", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_targets_dice_and_doc_table(tmp_path):
    b = _bench()
    y = np.array([[[0, 1, 2, 2], [1, 0, 2, 0]]])
    np.testing.assert_array_equal(b.targets(y, "binary"), y == 2)
    ml = b.targets(y, "multilabel")  # tissue overlaps GM and WM
    assert ml.shape == (1, 3, 2, 4) and (ml[:, 0] == (ml[:, 1] | ml[:, 2])).all()

    class Masks:  # a segmenter stand-in: fixed masks
        def predict(self, X):
            return np.array([[[[1, 1, 1, 0], [0, 0, 1, 0]], [[0] * 4, [0] * 4],
                              [[1, 0, 0, 0], [0, 0, 0, 0]]]], bool)

    d = b.dice_per_image(Masks(), None, ml, "multilabel")
    # tissue: |P|=4, |T|=5, |P & T|=3; GM: P empty, T 2 voxels; WM: P {0}, T 3 voxels, no overlap
    np.testing.assert_allclose(d, [[6 / 9, 0.0, 0.0]])
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{b.BEGIN}\nold\n{b.END}\nend\n")
    res = {"networks": {"x": {"description": "net", "training": "1 epoch", "activation":
                              "sigmoid", "dice": [0.5], "ece_before": 0.1, "ece_after": b.NA,
                              "ood": {"mean_auroc": 0.9}, "quality": b.NA}}}
    assert b.write_doc_table(b.table(res), doc)
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("end\n") and "old" not in text
    row = text.splitlines()[4]
    assert row == (f"| net | 1 epoch | sigmoid | 0.500 | 0.1000 | {b.NA} | 0.900 | {b.NA} | "
                   f"{b.NA} |")
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert not b.write_doc_table("t", plain) and plain.read_text() == "no markers\n"
