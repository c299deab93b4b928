"""The MNI template as a whole scan in any orientation and voxel size (tests, benchmarks).

:func:`load_mni_scan` resamples the T1 template and its grey/white matter maps onto a new voxel
grid (axes in the order and directions of ``codes``, voxel size ``spacing``) covering the
template's field of view, so a scan "stored another way" comes with its reference labels
transformed the same way.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ._brain import _TEMPLATE, labels_from_probabilities, load_template, template_dir

_AXIS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0),
         "I": (2, -1.0)}


def template_affine() -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(template_dir() / _TEMPLATE.format("t1")).affine, dtype=float)


def load_mni_scan(codes: str = "RAS", spacing=(1.0, 1.0, 1.0)):
    """The MNI template as a whole scan stored with axis ``codes`` and voxel ``spacing``.

    A scan "stored another way" with its reference labels transformed the same way (for
    whole-scan checks of ``uqseg predict`` and a model's preprocessing). ``codes="RAS"`` with
    1 mm spacing returns the template's own voxels (no interpolation). Otherwise T1, grey and
    white matter are sampled linearly and the labels are taken from the sampled tissue maps,
    as :func:`load_brain_tissue` does.

    Parameters
    ----------
    codes : str, default="RAS"
        Direction of each voxel axis, one of R/L, A/P, S/I per axis (nibabel's axis codes).
    spacing : sequence of 3 floats, default=(1.0, 1.0, 1.0)
        Voxel size in mm along each voxel axis.

    Returns
    -------
    t1 : ndarray (X, Y, Z)
        uint8 for the template's own grid, float32 when resampled.
    labels : ndarray of uint8 (X, Y, Z)
        0 background, 1 grey matter, 2 white matter.
    affine : ndarray (4, 4)
        Voxel index -> world mm (RAS+), covering the template's field of view.

    Examples
    --------
    >>> from uqseg import datasets
    >>> t1, labels, affine = datasets.load_mni_scan()
    >>> t1.shape, sorted(set(labels.ravel().tolist()))
    ((197, 233, 189), [0, 1, 2])
    """
    tpl = load_template()
    t_aff = template_affine()
    shape0 = tpl["t1"].shape
    lo = t_aff[:3, 3]
    hi = lo + t_aff[:3, :3] @ (np.array(shape0) - 1)
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    shape = []
    for v, c in enumerate(codes.upper()):
        world, sign = _AXIS[c]
        step = float(spacing[v])
        n = int(np.floor((hi[world] - lo[world]) / step + 1e-9)) + 1
        affine[world, v] = sign * step
        affine[world, 3] = lo[world] if sign > 0 else lo[world] + (n - 1) * step
        shape.append(n)
    m = np.linalg.inv(t_aff) @ affine  # new voxel -> template voxel
    if np.allclose(m, np.eye(4)):  # the template itself, uint8 as nilearn ships it
        t1 = tpl["t1"]
        vals = {k: tpl[k].astype(np.float64) / 255.0 for k in ("gm", "wm")}
    else:
        vals = {k: ndi.affine_transform(tpl[k].astype(np.float32), m[:3, :3], offset=m[:3, 3],
                                        output_shape=tuple(shape), order=1, mode="constant",
                                        cval=0.0) for k in ("t1", "gm", "wm")}
        t1 = vals.pop("t1")  # float32, as a resampled scan is stored
        vals = {k: v / 255.0 for k, v in vals.items()}
    return t1, labels_from_probabilities(vals["gm"], vals["wm"]).astype(np.uint8), affine


mni_scan = load_mni_scan  # the name tests used before it was public
