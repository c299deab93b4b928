"""uqseg.preprocessing: the description, apply/invert against independent references."""

import json
import shutil

import nibabel as nib
import numpy as np
import onnx
import pytest
from scipy import ndimage as ndi

from uqseg import EnsembleSegmenter, OnnxSegmenter
from uqseg.datasets import normalize_intensity, reference_models
from uqseg.datasets._brain import _axis_coords, load_template
from uqseg.datasets._zoo import ZOO_PREPROCESSING
from uqseg.preprocessing import (
    Preprocessing,
    otsu_threshold,
    preprocess,
    read_preprocessing,
    set_preprocessing,
)

# voxel axis 0 -> +A (1.5 mm), 1 -> +S (1.2 mm), 2 -> -R (2 mm): a permuted, flipped scan
PERMUTED = np.array([[0, 0, -2.0, 10], [1.5, 0, 0, -3], [0, 1.2, 0, 5], [0, 0, 0, 1]])


def _blob(shape=(20, 24, 18), seed=0):
    """A bright ellipsoid on a dark, noisy background."""
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = (g[0] / 0.6) ** 2 + (g[1] / 0.5) ** 2 + (g[2] / 0.7) ** 2 < 1
    return (inside * 100.0 + rng.normal(0, 3, shape)).astype(np.float32)


# ---------------------------------------------------------------------- description
def test_json_round_trip_and_metadata_form():
    p = Preprocessing.from_dict(ZOO_PREPROCESSING)
    assert Preprocessing.from_json(p.to_json()) == p
    assert json.loads(p.to_json())["size"] == [128, 128]
    q = Preprocessing(orientation="ras", spacing=(1, None, 2.5), intensity="zscore",
                      crop={"method": "threshold", "threshold": 0})
    assert q.orientation == "RAS" and q.spacing == (1.0, None, 2.5)
    assert q.intensity == {"method": "zscore", "scope": "image", "foreground": False}
    assert Preprocessing.from_json(q.to_json()) == q


@pytest.mark.parametrize("bad, match", [
    ({"orientaton": "RAS"}, "unknown preprocessing key"),
    ({"orientation": "RAX"}, "one code of each pair"),
    ({"orientation": "RRS"}, "one code of each pair"),
    ({"spacing": [1, 0, 1]}, "must be > 0"),
    ({"spacing": [1, 1]}, "3 values"),
    ({"plane": "oblique"}, "plane"),
    ({"plane": "axial", "orientation": "RAS", "size": [128, 128, 3]}, "2 integers"),
    ({"size": [64, 64, 0]}, "3 integers"),
    ({"size": [64, 64, 10**6]}, "3 integers in 1..8192"),
    ({"plane": "axial"}, "needs an 'orientation'"),
    ({"intensity": {"method": "percentile", "low": 99, "high": 1}}, "low < high"),
    ({"intensity": {"method": "window", "low": -1000}}, "needs 'low' and 'high'"),
    ({"intensity": {"method": "percentile", "window": 3}}, "unknown key"),
    ({"intensity": {"method": "minmax"}}, "method must be one of"),
    ({"intensity": {"method": "zscore", "scope": "slab"}}, "scope"),
    ({"crop": {"method": "threshold"}}, "needs a 'threshold'"),
    ({"crop": {"method": "otsu", "margin": -1}}, "margin"),
    ({"crop": {"method": "otsu", "min_area": 2}}, "min_area"),
    ({"spacing": [1, 1, 1], "size": [8, 8, 8]}, "both 'spacing' and 'size'"),
])
def test_bad_descriptions_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        Preprocessing.from_dict(bad)


def test_bad_json():
    with pytest.raises(ValueError, match="not valid JSON"):
        Preprocessing.from_json("{orientation: RAS")
    with pytest.raises(TypeError, match="JSON object"):
        Preprocessing.from_json("[1, 2]")


# ---------------------------------------------------------------------- apply / invert
def test_identity_round_trips_exactly():
    data = _blob()
    X, inv = preprocess(data, PERMUTED, Preprocessing())
    assert X.shape == (1, 1, *data.shape)
    np.testing.assert_array_equal(X[0, 0], data)
    np.testing.assert_array_equal(inv.invert(X[:, 0], "map"), data)
    labels = (data > 50).astype(np.uint8)
    np.testing.assert_array_equal(inv.invert(labels[None], "labels"), labels)
    np.testing.assert_array_equal(inv.model_affine, PERMUTED)


@pytest.mark.parametrize("codes", ["RAS", "LPS", "SPR", "AIL"])
def test_reorientation_matches_nibabel(codes):
    data = _blob()
    X, inv = preprocess(data, PERMUTED, Preprocessing(orientation=codes))
    img = nib.Nifti1Image(data, PERMUTED)
    ref = nib.orientations.apply_orientation(
        data, nib.orientations.ornt_transform(nib.orientations.io_orientation(PERMUTED),
                                              nib.orientations.axcodes2ornt(tuple(codes))))
    np.testing.assert_array_equal(X[0, 0], ref)
    assert "".join(nib.aff2axcodes(inv.model_affine)) == codes == inv.orientation
    if codes == "RAS":
        can = nib.as_closest_canonical(img)
        np.testing.assert_array_equal(X[0, 0], can.get_fdata(dtype=np.float32))
        np.testing.assert_allclose(inv.model_affine, can.affine)
    # every model voxel sits where the scan's voxel with the same value sits in the world
    np.testing.assert_array_equal(inv.invert(X[:, 0], "map"), data)


def test_plane_slices_rows_and_columns():
    data = _blob()
    X, inv = preprocess(data, PERMUTED, Preprocessing(orientation="PRS", plane="axial"))
    # PRS: P <- flipped axis 0, R <- flipped axis 2, S <- axis 1; slices across S
    ref = np.transpose(data[::-1, :, ::-1], (1, 0, 2))
    np.testing.assert_array_equal(X[:, 0], ref)
    np.testing.assert_array_equal(inv.invert(X[:, 0], "map"), data)


def test_resampling_is_linear_and_inverts_linear_fields():
    # a linear function of the voxel position is reproduced exactly by linear interpolation
    shape = (21, 17, 13)
    g = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    data = (2 * g[0] - g[1] + 0.5 * g[2]).astype(np.float32)
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    X, inv = preprocess(data, aff, Preprocessing(orientation="RAS", spacing=(2.0, 0.5, 1.0)))
    m = np.meshgrid(*[np.arange(n) for n in X.shape[2:]], indexing="ij")
    pos = inv.matrix[:3, :3] @ np.stack([a.ravel() for a in m]) + inv.matrix[:3, 3:4]
    want = (2 * pos[0] - pos[1] + 0.5 * pos[2]).reshape(X.shape[2:])
    np.testing.assert_allclose(X[0, 0], want, atol=1e-4)
    assert inv.matrix[0, 0] == 2.0 and inv.matrix[1, 1] == 0.5 and inv.matrix[2, 2] == 0.5
    # back in the scan grid the linear field is exact wherever two samples bracket it
    back = inv.invert(X[:, 0], "map")
    np.testing.assert_allclose(back[:19, :, :12], data[:19, :, :12], atol=1e-3)


def test_otsu_matches_skimage():
    from skimage.filters import threshold_otsu

    data = _blob()
    width = float(np.ptp(data)) / 256
    assert abs(otsu_threshold(data) - threshold_otsu(data)) <= width


def test_crop_outside_gets_background_and_slabs_agree():
    data = _blob()
    p = Preprocessing(orientation="RAS", plane="axial", size=(16, 16),
                      crop={"method": "otsu", "margin": 2.0})
    X, inv = preprocess(data, PERMUTED, p)
    assert X.shape[1:] == (1, 16, 16)
    n, k = X.shape[0], 3
    rng = np.random.default_rng(1)
    proba = rng.dirichlet(np.ones(k), size=(n, 16, 16)).transpose(0, 3, 1, 2).astype(np.float32)
    full = inv.invert(proba, "proba")
    assert full.shape == (*data.shape, k)
    np.testing.assert_allclose(full.sum(-1), 1.0, atol=1e-5)
    unc = inv.invert(np.ones((n, 16, 16), np.float32), "map")
    lab = inv.invert(np.full((n, 16, 16), 2, np.uint8), "labels")
    inside = unc > 0
    # outside = beyond the foreground bounding box + 2 mm on some axis
    fg = data > inv.threshold
    idx = [np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    spacing = np.sqrt((PERMUTED[:3, :3] ** 2).sum(0))
    for ax in range(3):
        lo = idx[ax][0] - 2.0 / spacing[ax]
        hi = idx[ax][-1] + 2.0 / spacing[ax]
        pos = np.arange(data.shape[ax])
        sl = [slice(None)] * 3
        sl[ax] = (pos < lo - 0.5) | (pos > hi + 0.5)
        assert not inside[tuple(sl)].any()
    assert inside.mean() > 0.2
    np.testing.assert_array_equal(full[~inside], np.tile([1.0, 0, 0], ((~inside).sum(), 1)))
    assert (lab[~inside] == 0).all() and (lab[inside] == 2).all()
    for axis in range(3):
        part = inv.invert(proba, "proba", start=3, stop=9, axis=axis)
        np.testing.assert_allclose(part, np.take(full, range(3, 9), axis=axis), atol=1e-6)


def test_intensity_methods():
    data = _blob()
    aff = np.eye(4)
    X, _ = preprocess(data, aff, Preprocessing(orientation="RAS", plane="axial",
                                               intensity={"method": "percentile"}))
    ref = normalize_intensity(np.moveaxis(data, 2, 0)[:, None])
    np.testing.assert_array_equal(X, ref)
    X, _ = preprocess(data, aff, Preprocessing(intensity={"method": "zscore",
                                                          "scope": "volume"}))
    assert abs(X.mean()) < 1e-4 and abs(X.std() - 1) < 1e-4
    X, _ = preprocess(data, aff, Preprocessing(intensity={"method": "window", "low": 0,
                                                          "high": 50}))
    np.testing.assert_allclose(X[0, 0], np.clip(data / 50, 0, 1), atol=1e-6)


def test_bad_scans_are_one_line_errors():
    data = _blob()
    cases = [
        ((data, np.eye(4), Preprocessing(spacing=(0.01, 0.01, 0.01))), "over 27 times"),
        ((np.stack([data, data], -1), np.eye(4), Preprocessing()), "4-D series"),
        ((data, np.diag([1.0, 0.0, 1.0, 1.0]), Preprocessing()),
         "spacing is zero along voxel axis 1"),
        ((np.zeros((8, 8, 8), np.float32), np.eye(4),
          Preprocessing(crop={"method": "threshold", "threshold": 0.5})), "crop is empty"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            preprocess(*args)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------------- the zoo's description
def test_zoo_description_reproduces_the_training_geometry():
    """The template through ZOO_PREPROCESSING == the training sampler (no augmentation) on
    the box it finds, and that box is the training box within a voxel."""
    from uqseg.datasets._brain import _TEMPLATE, template_dir

    img = nib.load(template_dir() / _TEMPLATE.format("t1"))
    data = np.asarray(img.dataobj)
    X, inv = preprocess(data, img.affine, ZOO_PREPROCESSING)
    tpl = load_template()
    # reoriented PRS box -> template (x, y, z) box; P = (ny - 1) - y
    ny = data.shape[1]
    box = np.array([[inv.box[0, 1], ny - 1 - inv.box[1, 0], inv.box[0, 2]],
                    [inv.box[1, 1], ny - 1 - inv.box[0, 0], inv.box[1, 2]]])
    assert np.abs(box - tpl["bbox"]).max() <= 1.5
    # the sampler of uqseg.datasets._brain: rows y flipped, columns x, pixel edges = box
    zs = np.arange(np.ceil(box[0, 2]), np.floor(box[1, 2]) + 1)
    rows = _axis_coords(box[0, 1], box[1, 1], 128, True)
    cols = _axis_coords(box[0, 0], box[1, 0], 128, False)
    g = np.meshgrid(zs, rows, cols, indexing="ij")
    ref = ndi.map_coordinates(tpl["t1"], np.stack([g[2], g[1], g[0]]).reshape(3, -1), order=1,
                              output=np.float32).reshape(len(zs), 128, 128)
    np.testing.assert_array_equal(X, normalize_intensity(ref[:, None].astype(np.float64) / 255))
    # scored = slices with >= 30 % of the largest slice's foreground, as training kept
    assert inv.scored.sum() < len(inv.scored) and inv.scored[len(zs) // 2]


def test_zoo_members_carry_the_description():
    want = Preprocessing.from_dict(ZOO_PREPROCESSING)
    for path in reference_models():
        assert read_preprocessing(path) == want
    ens = EnsembleSegmenter(reference_models()[:2]).fit()
    assert ens.preprocessing_ == want


# ---------------------------------------------------------------------- ONNX metadata
def test_set_preprocessing_on_a_foreign_model(tiny_2d, tmp_path):
    src = tmp_path / "m.onnx"
    shutil.copyfile(tiny_2d, src)
    before = onnx.load(src)
    p = Preprocessing(orientation="RAS", plane="axial", size=(32, 32))
    set_preprocessing(src, p)
    after = onnx.load(src)
    assert after.graph.SerializeToString() == before.graph.SerializeToString()
    assert read_preprocessing(src) == p
    assert OnnxSegmenter(str(src)).fit().preprocessing_ == p
    assert OnnxSegmenter(tiny_2d).fit().preprocessing_ is None
    other = tmp_path / "n.onnx"
    set_preprocessing(src, {"orientation": "LPS", "plane": "axial"}, out=other)
    with pytest.raises(ValueError, match="different preprocessing"):
        _ = EnsembleSegmenter([str(src), str(other)]).fit().preprocessing_
    set_preprocessing(src, None)
    assert read_preprocessing(src) is None


def test_malformed_metadata_is_refused_at_fit(tiny_2d, tmp_path):
    proto = onnx.load(tiny_2d)
    proto.metadata_props.add(key="uqseg.preprocessing", value='{"orientation": "XYZ"}')
    path = tmp_path / "bad.onnx"
    onnx.save(proto, path)
    with pytest.raises(ValueError, match="uqseg.preprocessing"):
        OnnxSegmenter(str(path)).fit()
