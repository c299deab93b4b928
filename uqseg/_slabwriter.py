"""Write a NIfTI volume slab by slab without holding it in memory.

NIfTI stores voxels in Fortran order (``i`` fastest, classes of a 4-D map slowest), so slabs
cut along any axis but the last spatial one are not contiguous in the file, and a 4-D map's
classes never are. :class:`SlabWriter` appends each slab (Fortran order) to a raw scratch file,
then :meth:`SlabWriter.finish` gathers the file-order chunks (``chunk_bytes`` at a time, one
contiguous read per slab and chunk) and streams them through gzip after the header. Memory: one
slab while writing, one chunk while finishing; disk: the raw map once.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

CHUNK_BYTES = 32 << 20


class SlabWriter:
    """Collect slabs ``[s0:s1]`` along ``axis`` of a ``shape`` (+ ``n_classes`` last) map.

    Parameters
    ----------
    path : path
        Final ``.nii.gz`` file written by :meth:`finish`.
    shape : tuple of 3 ints
        Spatial shape of the volume.
    dtype : numpy dtype
    affine : (4, 4) array
        Written as sform and qform (code 1, scanner), as :func:`uqseg.io.write_nifti` does.
    axis : int
        The axis the slabs are cut along.
    n_classes : int, optional
        A 4-D map with classes on the last axis.
    scratch : path
        The raw scratch file (removed by :meth:`finish` or :meth:`close`).
    """

    def __init__(self, path, shape, dtype, affine, *, axis, n_classes=None, scratch,
                 chunk_bytes=None):
        if len(shape) != 3 or axis not in (0, 1, 2):
            raise ValueError(f"SlabWriter needs a 3-D shape and an axis in 0..2, got {shape}, "
                             f"{axis}")
        self.path, self.shape, self.axis = Path(path), tuple(int(s) for s in shape), axis
        self.dtype, self.affine = np.dtype(dtype), np.asarray(affine, dtype=np.float64)
        self.n_classes = n_classes
        self.chunk_bytes = CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
        self.scratch = Path(scratch)
        self._file = open(self.scratch, "wb")  # noqa: SIM115 - closed in finish/close
        self._slabs: list[tuple[int, int, int]] = []  # (s0, s1, byte offset)
        self._next = 0

    def write(self, s0: int, s1: int, block: np.ndarray) -> None:
        """Append the slab ``[s0:s1]`` (in order): ``shape`` with ``s1 - s0`` on ``axis``."""
        want = list(self.shape)
        want[self.axis] = s1 - s0
        if self.n_classes is not None:
            want.append(self.n_classes)
        if s0 != self._next or block.shape != tuple(want):
            raise ValueError(f"slab [{s0}:{s1}] of shape {block.shape} does not continue the "
                             f"volume at {self._next} with shape {tuple(want)}")
        self._slabs.append((s0, s1, self._file.tell()))
        self._file.write(np.asarray(block, dtype=self.dtype).tobytes(order="F"))
        self._next = s1

    def finish(self) -> Path:
        """Write the header and the gathered data through gzip; returns ``path``."""
        import nibabel as nib

        if self._next != self.shape[self.axis]:
            raise ValueError(f"{self.path.name}: only {self._next} of "
                             f"{self.shape[self.axis]} slices were written")
        self._file.close()
        shape = (*self.shape, self.n_classes) if self.n_classes else self.shape
        header = nib.Nifti1Header()
        header.set_data_shape(shape)
        header.set_data_dtype(self.dtype)
        header.set_sform(self.affine, code=1)
        header.set_qform(self.affine, code=1)
        header.set_xyzt_units("mm")
        with open(self.path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb",
                                                         compresslevel=1, mtime=0) as gz:
            header.write_to(gz)
            with open(self.scratch, "rb") as src:
                for chunk in self._chunks(src):
                    gz.write(chunk)
        self.close()
        return self.path

    def close(self) -> None:
        """Close and remove the scratch file (also after a failure)."""
        self._file.close()
        self.scratch.unlink(missing_ok=True)

    def _chunks(self, src):
        """File-order byte chunks: class by class, then ranges of the last spatial axis."""
        s0_, s1_, s2_ = self.shape
        plane = s0_ * s1_ * self.dtype.itemsize
        step = max(1, self.chunk_bytes // plane)
        for c in range(self.n_classes or 1):
            for k0 in range(0, s2_, step):
                k1 = min(s2_, k0 + step)
                out = np.empty((s0_, s1_, k1 - k0), dtype=self.dtype, order="F")
                for s0, s1, offset in self._slabs:
                    b = [s0_, s1_, s2_]
                    b[self.axis] = s1 - s0
                    if self.axis == 2:  # slabs are ranges of k: take their overlap
                        lo, hi = max(k0, s0), min(k1, s1)
                        if lo >= hi:
                            continue
                        local, dest = (lo - s0, hi - s0), (lo - k0, hi - k0)
                    else:
                        local, dest = (k0, k1), (0, k1 - k0)
                    # within a Fortran slab, class c and k in [a, b) are one contiguous run
                    start = ((c * b[2] + local[0]) * b[0] * b[1]) * self.dtype.itemsize
                    count = b[0] * b[1] * (local[1] - local[0])
                    src.seek(offset + start, os.SEEK_SET)
                    part = np.frombuffer(src.read(count * self.dtype.itemsize),
                                         dtype=self.dtype)
                    if part.size != count:
                        raise OSError(f"scratch file {self.scratch} is shorter than written")
                    part = part.reshape((b[0], b[1], local[1] - local[0]), order="F")
                    idx = [slice(None)] * 3
                    idx[2] = slice(*dest)
                    if self.axis != 2:
                        idx[self.axis] = slice(s0, s1)
                    out[tuple(idx)] = part
                yield out.tobytes(order="F")
