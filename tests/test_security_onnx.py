"""Hostile ONNX files: external data can name no file outside the model's folder, wherever in
the model it sits, whatever the working directory; engines receive self-contained bytes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from _hostile_onnx import PLACEMENTS, carrier, embedded, ext_tensor
from onnx import helper
from onnx_models import make_unet_like

import uqseg
from uqseg import EnsembleSegmenter, OnnxSegmenter, backends, cli
from uqseg.backends._model import external_locations, is_external, iter_tensors, read_model
from uqseg.backends.fuse import fuse_members

REFUSED = (ValueError, FileNotFoundError)
X = np.random.default_rng(0).random((2, 1, 8, 8)).astype(np.float32)


@pytest.fixture
def secret(tmp_path) -> tuple[Path, bytes]:
    """Three random float32 (12 bytes) in tmp/secret/secret.bin, beside the model folder."""
    folder = tmp_path / "secret"
    folder.mkdir()
    data = np.random.default_rng(7).standard_normal(3).astype(np.float32).tobytes()
    (folder / "secret.bin").write_bytes(data)
    return folder / "secret.bin", data


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "m").mkdir()
    return tmp_path / "m"


def _locations(secret_path: Path, folder: Path) -> dict[str, str]:
    os.symlink(secret_path, folder / "link.bin")
    os.symlink(secret_path.parent, folder / "d")
    return {
        "cwd": "secret.bin",  # not in the model's folder: an engine would take the cwd's
        "absolute": str(secret_path),
        "dotdot": "../secret/secret.bin",
        "nested_dotdot": "sub/../../secret/secret.bin",
        "backslash": "..\\secret\\secret.bin",
        "url": secret_path.as_uri(),
        "nul": "secret.bin\0.txt",
        "symlink_file": "link.bin",
        "symlink_dir": "d/secret.bin",
        "ort_address": "*/_ORT_MEM_ADDR_/*",
    }


LOCATION_KINDS = ["cwd", "absolute", "dotdot", "nested_dotdot", "backslash", "url", "nul",
                  "symlink_file", "symlink_dir", "ort_address"]


def _write(folder: Path, model: onnx.ModelProto, name: str = "evil.onnx") -> str:
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return str(path)


def _no_secret_in(root: Path, data: bytes) -> None:
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink():
            assert data not in f.read_bytes(), f"secret bytes leaked into {f}"


def _where(request, secret_path: Path):
    return secret_path.parent if request.param == "secret" else Path("/")


@pytest.fixture(params=["secret", "root"])
def cwd(request, secret, monkeypatch):
    """The working directory: the secret's folder (where a cwd-relative read would find it)
    or ``/``."""
    path = _where(request, secret[0])
    monkeypatch.chdir(path)
    return path


def test_every_carrier_leaks_through_a_bare_engine(secret, monkeypatch):
    """Control: each hostile model is live, i.e. ONNX Runtime handed its bytes reads the
    secret from the working directory. uqseg must never get there."""
    import onnxruntime as ort

    monkeypatch.chdir(secret[0].parent)
    want = np.frombuffer(secret[1], np.float32)
    for placement in PLACEMENTS:
        def logits(model):
            sess = ort.InferenceSession(model.SerializeToString(),
                                        providers=["CPUExecutionProvider"])
            return sess.run(None, {"image": X})[0]

        leaked = logits(carrier(placement)) - logits(embedded(placement, np.zeros(3)))
        np.testing.assert_allclose(leaked[0, :, 0, 0], want, atol=1e-6, err_msg=placement)


def test_walk_finds_every_placement():
    for placement in PLACEMENTS:
        found = [here for here, t in iter_tensors(carrier(placement)) if is_external(t)]
        assert len(found) == 1, placement
        assert external_locations(carrier(placement)) == ["secret.bin"]


# ---------------------------------------------------------------- refusals, every entry point
@pytest.mark.parametrize("kind", LOCATION_KINDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_segmenter_and_load_refuse(placement, kind, secret, folder, cwd):
    location = _locations(secret[0], folder)[kind]
    path = _write(folder, carrier(placement, ext_tensor("cst", location)))
    for build in (lambda: OnnxSegmenter(path).fit(), lambda: backends.load(path, device="cpu"),
                  lambda: fuse_members([path]), lambda: read_model(path)):
        with pytest.raises(REFUSED, match="outside the model's folder|is missing") as exc:
            build()
        assert "evil.onnx" in str(exc.value)  # the model is named


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_model_without_folder_is_refused(placement, secret, monkeypatch):
    monkeypatch.chdir(secret[0].parent)
    model = carrier(placement)
    for given in (model, model.SerializeToString()):
        with pytest.raises(ValueError, match="uses external data.*load the model from its file"):
            backends.load(given, device="cpu")
        with pytest.raises(ValueError, match=r"member 0\b.*uses external data"):
            fuse_members([given])


@pytest.mark.parametrize(("entries", "match"), [
    ({"offset": 8}, "reads bytes 8..20 .* has only 12 bytes"),
    ({"offset": 100}, "has only 12 bytes"),
    ({"length": 4}, "declares 4 bytes .* need 12"),
    ({"length": 400}, "declares 400 bytes"),
    ({"offset": -4}, "offset '-4'; expected a non-negative integer"),
    ({"offset": "1e3"}, "offset '1e3'"),
])
@pytest.mark.parametrize("placement", ["constant", "loop", "function", "sparse"])
def test_ranges_outside_the_file_are_refused(placement, entries, match, folder, tmp_path,
                                             monkeypatch):
    (folder / "w.bin").write_bytes(np.ones(3, np.float32).tobytes())
    big = tmp_path / "w.bin"  # a larger file of that name in the cwd is never consulted
    big.write_bytes(b"\x7f" * 4096)
    monkeypatch.chdir(tmp_path)
    tensor = ext_tensor("cst", "w.bin", **entries)
    path = _write(folder, carrier(placement, tensor))
    with pytest.raises(ValueError, match=match):
        OnnxSegmenter(path).fit()


def test_non_regular_external_file_is_refused(folder):
    os.mkfifo(folder / "fifo.bin")
    (folder / "dir.bin").mkdir()
    for location in ("fifo.bin", "dir.bin"):
        path = _write(folder, carrier("constant", ext_tensor("cst", location)))
        with pytest.raises(ValueError, match="not a regular file"):
            read_model(path)


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_ensemble_refuses_a_hostile_member(placement, fuse, secret, folder, tiny_2d, cwd):
    path = _write(folder, carrier(placement))
    with pytest.raises(REFUSED, match=r"member 1 .*evil\.onnx.*secret\.bin"):
        EnsembleSegmenter([tiny_2d, path], fuse=fuse).fit()


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("placement", ["constant", "if", "function", "sparse_constant"])
def test_model_swapped_after_fit_is_refused(placement, fuse, secret, folder, cwd, tmp_path):
    """The file is read again when the engine is built: a swap after fit is caught there,
    and by uqseg.save, which writes nothing of the secret."""
    good = _write(folder, make_unet_like(dims=2, seed=5), "model.onnx")
    other = _write(folder, make_unet_like(dims=2, seed=6), "other.onnx")
    seg = OnnxSegmenter(good, device="cpu").fit()
    ens = EnsembleSegmenter([good, other], fuse=fuse, device="cpu").fit()
    _write(folder, carrier(placement), "model.onnx")
    with pytest.raises(REFUSED, match=r"model\.onnx.*secret\.bin"):
        seg.transform(X)
    with pytest.raises(REFUSED, match=r"model\.onnx.*secret\.bin"):
        ens.predict_proba(X)
    for est in (seg, ens):
        with pytest.raises(REFUSED, match=r"secret\.bin"):
            uqseg.save(est, tmp_path / "saved")
        assert not (tmp_path / "saved").exists()
    _no_secret_in(folder, secret[1])  # nothing of it was written beside the model either


@pytest.mark.parametrize("kind", ["cwd", "dotdot", "symlink_file", "absolute"])
def test_save_refuses_escaping_external_data(kind, secret, folder, tmp_path, monkeypatch):
    monkeypatch.chdir(secret[0].parent)
    good = _write(folder, make_unet_like(dims=2, seed=5), "model.onnx")
    seg = OnnxSegmenter(good, device="cpu").fit()
    location = _locations(secret[0], folder)[kind]
    _write(folder, carrier("if", ext_tensor("cst", location)), "model.onnx")
    with pytest.raises(REFUSED, match="outside the model's folder|is missing"):
        uqseg.save(seg, tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_cli_predict_refuses(placement, secret, folder, tiny_2d, tmp_path, cwd, capsys):
    scan = tmp_path / "scan.npy"
    np.save(scan, np.random.default_rng(1).random((10, 12)).astype(np.float32))
    path = _write(folder, carrier(placement))
    out = tmp_path / "out"
    for models in ([path], [tiny_2d, path]):
        code = cli.main(["predict", *models, str(scan), "--out", str(out), "--no-progress",
                         "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 1 and "secret.bin" in err and "evil.onnx" in err
        assert not out.exists() or not any(out.rglob("*_proba*"))
        if out.exists():
            _no_secret_in(out, secret[1])


def test_engines_refuse_external_references_as_a_backstop():
    from uqseg.backends.onnxruntime import OnnxRuntimeRunner

    with pytest.raises(ValueError, match="still refers to external data .*secret.bin"):
        OnnxRuntimeRunner(carrier("scan"), "cpu")


def test_ep_context_nodes_are_refused(folder):
    model = make_unet_like(dims=2)
    model.graph.node.append(helper.make_node("EPContext", ["logits"], ["ctx"],
                                             domain="com.microsoft", embed_mode=0,
                                             ep_cache_context="../../engine.bin"))
    with pytest.raises(ValueError, match="'EPContext' node .*precompiled files"):
        read_model(_write(folder, model))


# ---------------------------------------------------------------- legitimate external data
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_external_data_inside_the_folder_loads(placement, folder, secret, cwd):
    """Data below the model's folder (in a subfolder, via a symlink that stays inside) gives
    the embedded model's logits, whatever the working directory."""
    values = np.frombuffer(secret[1], np.float32)
    (folder / "w").mkdir()
    (folder / "w" / "data.bin").write_bytes(b"\0" * 4 + secret[1])
    os.symlink(folder / "w" / "data.bin", folder / "alias.bin")
    ref = OnnxSegmenter(_write(folder, embedded(placement, values), "ref.onnx")).fit()
    want = ref.transform(X)
    for location in ("w/data.bin", "alias.bin"):
        path = _write(folder, carrier(placement, ext_tensor("cst", location, offset=4,
                                                           length=12)), "ext.onnx")
        np.testing.assert_array_equal(OnnxSegmenter(path).fit().transform(X), want)
        # fuse_members renames no subgraph and takes no sparse initializer
        fusable = placement in ("initializer", "constant", "function", "sparse_constant")
        for fuse in (True, False) if fusable else (False,):
            ens = EnsembleSegmenter([path, str(folder / "ref.onnx")], fuse=fuse).fit()
            np.testing.assert_allclose(ens.predict_proba(X), ref.predict_proba(X), atol=1e-6)


@pytest.mark.parametrize("placement", ["if", "loop", "scan", "sparse"])
def test_auto_fuse_falls_back_for_unfusable_members(placement, folder, secret, cwd):
    """fuse="auto" runs members with control flow or sparse initializers separately (same
    probabilities); fuse=True names the member that cannot be fused."""
    values = np.frombuffer(secret[1], np.float32)
    path = _write(folder, embedded(placement, values), "cf.onnx")
    ref = OnnxSegmenter(path).fit()
    ens = EnsembleSegmenter([path, path], fuse="auto").fit()
    assert ens.fused_ is False
    np.testing.assert_allclose(ens.predict_proba(X), ref.predict_proba(X), atol=1e-6)
    with pytest.raises(ValueError, match="cannot be fused: member 0 has"):
        EnsembleSegmenter([path, path], fuse=True).fit()


@pytest.fixture
def onnx_external(folder, secret) -> tuple[str, np.ndarray]:
    """onnx's own writer: every initializer and the Constant attribute in weights.bin."""
    values = np.frombuffer(secret[1], np.float32)
    model = embedded("constant", values)
    want = OnnxSegmenter(_write(folder, model, "ref.onnx")).fit().transform(X)
    onnx.save(model, str(folder / "ext.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=0,
              convert_attribute=True)
    stored = onnx.load(str(folder / "ext.onnx"), load_external_data=False)
    where = [h for h, t in iter_tensors(stored) if is_external(t)]
    assert any("initializer" in h for h in where) and any("Constant" in h for h in where)
    return str(folder / "ext.onnx"), want


def test_onnx_written_external_data_matches_embedded(onnx_external, cwd):
    path, want = onnx_external
    np.testing.assert_array_equal(OnnxSegmenter(path).fit().transform(X), want)


def test_save_copies_external_data_of_attributes(onnx_external, tmp_path, monkeypatch):
    path, want = onnx_external
    monkeypatch.chdir("/")
    seg = OnnxSegmenter(path, device="cpu").fit()
    saved = uqseg.save(seg, tmp_path / "saved")
    for f in Path(path).parent.iterdir():
        f.unlink()
    loaded = uqseg.load(saved)
    np.testing.assert_array_equal(loaded.transform(X), want)
