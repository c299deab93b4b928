"""How an :class:`uqseg.EnsembleSegmenter` runs: the ensemble's samples chunk by chunk, member
by member or as one fused ONNX graph, streamed into float32 running sums.

Every *sample* is one probability map of one member: deep-ensemble members, MC-dropout passes
of a member that takes an ``mc_mask`` and test-time flips all add samples. Memory does not grow
with the number of samples. The estimator (``uqseg/ensemble.py``) validates, caches results and
presents them; this engine executes (it is the only part of the ensemble that talks to
``uqseg.backends``).
"""

from __future__ import annotations

import threading

import numpy as np

from uqseg import backends
from uqseg._inference import by_shape, resolve_batch_size
from uqseg._numeric import categorical_entropy, probabilities
from uqseg._validation import n_images
from uqseg.backends._checks import MAX_SPATIAL_DIVISOR, ModelOutputError, check_logits
from uqseg.metrics.uncertainty import binary_entropy

__all__ = ["EnsembleEngine", "FEATURE", "MAX_SPATIAL_DIVISOR", "fuse_problem"]

FEATURE = "feature:"  # result keys of the feature member's maps (``run(layers=...)``)
# fuse="auto" runs a chunk member by member when all members' logits of it would exceed this
_FUSED_BUDGET = 256 * 2**20


def _prefix(member: int) -> str:
    """fuse_members' prefix of a member's tensors in the fused graph."""
    return f"m{int(member)}__"


def _feature_outputs(flip, layers, member: int) -> list[str]:
    """The feature member's exposed tensors to fetch: on the unflipped pass only (features of
    a flipped image do not align with the image)."""
    return [] if flip else [_prefix(member) + name for name in layers]


def _take_features(res: dict, acc: dict, member: int) -> None:
    """Move the feature member's tensors out of a fused run's results into ``acc``."""
    pre = _prefix(member)
    for name in [n for n in res if n.startswith(pre)]:
        acc[FEATURE + name[len(pre):]] = res.pop(name)


# Not the public uqseg.uncertainty.MemberAccumulator (float64 Welford, validating each add):
# measured for issue 22 on 5 samples of (8, 3, 128, 128), every map, it took 122 ms and 21 MiB
# against 30 ms and 10 MiB here (+13% on the 704 ms ensemble call of those 8 images, 2 CPU
# cores), and it cannot take the entropies the kernel computes from the logits (per channel
# for sigmoid members). The maps agree to 2e-7.
class _Sums:
    """Weighted float32 running sums of samples (one chunk of images)."""

    def __init__(self, need_h: bool, need_sq: bool):
        self.need_h, self.need_sq = need_h, need_sq
        self.p = self.h = self.sq = None

    def add(self, p: np.ndarray, h: np.ndarray | None, w: float, sq: np.ndarray | None = None):
        w = np.float32(w)
        if self.need_sq:
            if sq is None:
                sq = p * p
            sq *= w
            self.sq = sq if self.sq is None else np.add(self.sq, sq, out=self.sq)
        p *= w
        self.p = p if self.p is None else np.add(self.p, p, out=self.p)
        if self.need_h:
            h *= w
            self.h = h if self.h is None else np.add(self.h, h, out=self.h)


def fuse_problem(ens) -> str | None:
    """Why the fitted members of ``ens`` cannot run as one fused graph (None when they can)."""
    if ens.mc_samples > 0:
        return "MC dropout (mc_samples > 0) needs a mask per member"
    for i, seg in enumerate(ens.members_):
        if seg.tta is not None:
            return f"member {i} has its own tta={seg.tta!r}"
        if getattr(seg, "_hidden_output", False) or seg.activation_ == "none":
            return (f"member {i}'s logits are not its graph output (its graph ends in "
                    "its own activation)")
        if any(s is not None for s in seg.input_shape_[1:]):
            return f"member {i} takes a fixed spatial size {seg.input_shape_[1:]}"
    if any(s.precision == "int8" for s in ens.members_):
        return "int8 members run their own quantised graphs"
    spec = {(s.backend, s.device, s.precision) for s in ens.members_}
    if len(spec) > 1:
        return f"members use different backend/device/precision: {sorted(spec)}"
    from uqseg.backends.fuse import fuse_problem as graph_problem

    for i, seg in enumerate(ens.members_):
        problem = graph_problem(seg.model, getattr(seg, "output_name_", None))
        if problem is not None:
            return f"member {i} {problem}"
    return None


class EnsembleEngine:
    """Executes a fitted ensemble's inference; reads the estimator's fitted state on each call
    and owns the fused graphs' runtime sessions."""

    def __init__(self, ens):
        self.ens = ens
        self._fused_runners: dict = {}
        self._lock = threading.Lock()

    def compute(self, X, kinds: frozenset) -> dict:
        """Probabilities, the maps in ``kinds`` and ``FEATURE + layer`` entries for ``X``."""
        return self._compute(X, kinds)

    def member_probabilities(self, X: np.ndarray, per_sample: bool) -> np.ndarray:
        """Every member's (or every sample's) probabilities, stacked (memory-heavy)."""
        ens = self.ens
        n = X.shape[0]
        lead = ens.n_samples_ if per_sample else ens.n_members_
        out = np.zeros((lead, n, ens.n_classes_, *X.shape[2:]), dtype=np.float32)
        masks = self._masks(n)
        idx = np.arange(n)
        bs = self._batch(X)
        for start in range(0, n, bs):
            counter = 0
            chunk = X[start : start + bs]
            for m, _w, z in self._member_samples(chunk, idx[start : start + bs], masks):
                p, _ = self._p_h(z, False)
                if per_sample:
                    out[counter, start : start + bs] = p
                else:
                    out[m, start : start + bs] += p * np.float32(1 / ens.member_samples_[m])
                counter += 1
        return out

    def _fused_runner(self, outputs: tuple[str, ...], layers: tuple[str, ...] = ()):
        def build():
            from uqseg.backends.fuse import fuse_members

            proto = fuse_members([s.model for s in self.ens.members_], self.ens.weights_,
                                 outputs=outputs)
            s0 = self.ens.members_[0]
            return backends.load(
                proto,
                s0.backend,
                s0.device,
                s0.precision,
                outputs=[_prefix(self.ens._feature_member) + name for name in layers] or None,
                threads=s0.threads,
                max_batch=resolve_batch_size(self.ens.batch_size, (), "gpu"),
            )

        return backends.cached_runner(self._fused_runners, (outputs, layers), self._lock, build)

    def _batch(self, X: np.ndarray) -> int:
        """Images per chunk for ``X`` (``batch_size`` resolved on the members' device)."""
        return resolve_batch_size(self.ens.batch_size, X.shape[2:], self.ens.members_[0]._device())

    def _masks(self, n: int) -> list[list[np.ndarray | None]]:
        """MC-dropout masks ``[member][pass] -> (n, D)``; None for deterministic passes."""
        out = []
        for m, (seg, s) in enumerate(zip(self.ens.members_, self.ens.member_samples_, strict=True)):
            passes = s // len(self.ens._flip_list(self.ens.spatial_dims_))
            if self.ens.mc_samples == 0 or seg.mc_dropout_ is None:
                out.append([None] * passes)
                continue
            rng = np.random.default_rng(None if self.ens.seed is None else [int(self.ens.seed), m])
            p, d = float(seg.mc_dropout_["p"]), int(seg.mc_dropout_["size"])
            keep = rng.random((passes, n, d)) >= p
            out.append(list((keep / np.float32(1 - p)).astype(np.float32)))
        return out

    def _member_samples(self, chunk: np.ndarray, idx: np.ndarray, masks):
        """Yield ``(member, sample weight, logits)`` for every sample of one chunk."""
        flips = self.ens._flip_list(self.ens.spatial_dims_)
        for m, seg in enumerate(self.ens.members_):
            w = self.ens.weights_[m] / self.ens.member_samples_[m]
            for mask in masks[m]:
                bmask = None if mask is None else mask[idx]
                for flip in flips:
                    inp = np.ascontiguousarray(np.flip(chunk, flip)) if flip else chunk
                    try:
                        z = seg.run(inp, proba=False, mc_mask=bmask)["logits"]
                    except ModelOutputError as exc:
                        raise ModelOutputError(f"member {m}: {exc}") from exc
                    yield m, w, (np.flip(z, flip) if flip else z)

    def _p_h(self, z: np.ndarray, need_h: bool):
        """Probabilities of one sample's logits (overwritten) and their entropy: ``(N, K, ...)``
        and ``(N, ...)`` for softmax, per channel ``(N, C, ...)`` for binary outputs."""
        return probabilities(z, getattr(self.ens, "activation_", "softmax"), need_h)

    def _chunk_members(self, chunk, idx, masks, need_h, need_sq) -> dict:
        sums = _Sums(need_h, need_sq)
        for _, w, z in self._member_samples(chunk, idx, masks):
            p, h = self._p_h(z, need_h)
            sums.add(p, h, w)
        out = {"proba": sums.p}
        if need_h:
            out["expected_entropy"] = sums.h
        if need_sq:
            out["mean_sq"] = sums.sq
        return out

    def _fused_graph_stats(self, chunk, flips, need_h, need_sq, layers=()) -> dict:
        """Statistics computed inside the fused graph; flips averaged here."""
        names = (
            ["proba"] + (["expected_entropy"] if need_h else []) + (["mean_sq"] if need_sq else [])
        )
        if need_h and len(flips) == 1:
            names += ["entropy", "mutual_information"]  # in-graph: no numpy pass afterwards
        runner = self._checked_fused_runner(tuple(names), layers, chunk)
        acc: dict[str, np.ndarray] = {}
        for flip in flips:
            inp = np.ascontiguousarray(np.flip(chunk, flip)) if flip else chunk
            res = self._run_fused(
                runner, inp, names + _feature_outputs(flip, layers, self.ens._feature_member))
            try:
                for name in names:
                    k = self.ens.n_classes_ if name in ("proba", "mean_sq") else None
                    val = res[name] if k else res[name][:, None]
                    check_logits(val, n=inp.shape[0], n_classes=k or 1, spatial=inp.shape[2:],
                                 where="the fused ensemble graph", name=name)
            except ModelOutputError:
                self._blame(inp)  # the member at fault, when one fails on its own
                raise
            _take_features(res, acc, self.ens._feature_member)
            for name, val in res.items():
                if flip:
                    val = np.flip(val, tuple(a - (name not in ("proba", "mean_sq")) for a in flip))
                if name in acc:
                    acc[name] += val
                else:
                    acc[name] = val if not flip else val.copy()
        if len(flips) > 1:
            for val in acc.values():
                val /= np.float32(len(flips))
        return acc

    def _fused_logits_stats(self, chunk, flips, need_h, need_sq, layers=()) -> dict:
        """Members' logits from the fused graph; statistics in numpy as in the unfused path."""
        runner = self._checked_fused_runner(("logits",), layers, chunk)
        names = [f"logits_{i}" for i in range(self.ens.n_members_)]
        sums = _Sums(need_h, need_sq)
        feats: dict[str, np.ndarray] = {}
        for flip in flips:
            inp = np.ascontiguousarray(np.flip(chunk, flip)) if flip else chunk
            res = self._run_fused(
                runner, inp, names + _feature_outputs(flip, layers, self.ens._feature_member))
            _take_features(res, feats, self.ens._feature_member)
            for i, name in enumerate(names):
                check_logits(res[name], n=inp.shape[0], n_classes=self.ens.n_classes_,
                             spatial=inp.shape[2:], name="logits",
                             where=f"member {i}: model {str(self.ens.members_[i].model)!r} (fused)")
                z = np.flip(res[name], flip) if flip else res[name]
                p, h = self._p_h(z, need_h)
                sums.add(p, h, self.ens.weights_[i] / len(flips))
        acc = {"proba": sums.p, **feats}
        if need_h:
            acc["expected_entropy"] = sums.h
        if need_sq:
            acc["mean_sq"] = sums.sq
        return acc

    def _checked_fused_runner(self, outputs, layers, chunk: np.ndarray):
        try:
            return self._fused_runner(outputs, layers)
        except ValueError:  # e.g. members whose class counts differ: name the culprit
            self._blame(chunk)
            raise

    def _run_fused(self, runner, inp: np.ndarray, names: list[str]) -> dict:
        try:
            return runner.run({runner.input_names[0]: inp}, names)
        except (MemoryError, ModelOutputError):
            raise
        except Exception:  # e.g. members whose outputs cannot be summed: name the culprit
            self._blame(inp)
            raise

    def _blame(self, inp: np.ndarray) -> None:
        """Run the members one by one on a chunk the fused graph failed on; raise the first
        member's output error (naming it), return when each member alone is fine."""
        for m, seg in enumerate(self.ens.members_):
            try:
                seg.run(inp, proba=False)
            except ValueError as exc:  # ModelOutputError or an engine failure
                raise type(exc)(f"member {m}: {exc}") from exc

    def _chunk_fused(self, chunk, need_h, need_sq, layers=()) -> dict:
        flips = self.ens._flip_list(self.ens.spatial_dims_)
        spatial = chunk.shape[2:]
        d = self.ens.spatial_divisor_
        target = tuple(int(np.ceil(s / d) * d) for s in spatial)
        if target != spatial:
            pad = [(0, 0), (0, 0)] + [(0, t - s) for s, t in zip(spatial, target, strict=True)]
            chunk = np.pad(chunk, pad, mode="reflect" if min(spatial) > 1 else "edge")
        mode = getattr(self.ens, "fused_stats", "auto")  # ensembles saved before the parameter
        if self.ens.activation_ != "softmax":  # the in-graph statistics are softmax's
            mode = "numpy"
        elif mode == "auto":
            mode = "numpy" if self.ens.members_[0]._device() == "cpu" else "graph"
        if mode == "numpy":
            acc = self._fused_logits_stats(chunk, flips, need_h, need_sq, layers)
        else:
            acc = self._fused_graph_stats(chunk, flips, need_h, need_sq, layers)
        if target != spatial:
            crop = tuple(slice(0, s) for s in spatial)
            acc = {
                k: v if k.startswith(FEATURE) else v[  # features stay as the member gives them
                    (slice(None), slice(None), *crop)
                    if v.ndim == chunk.ndim
                    else (slice(None), *crop)
                ]
                for k, v in acc.items()
            }
        return acc

    def _fused_fits(self, chunk) -> bool:
        """Whether every member's logits of ``chunk`` fit the fused path's memory budget."""
        size = self.ens.n_members_ * self.ens.n_classes_ * chunk[:, :1].size * 4
        return size <= _FUSED_BUDGET

    def _compute_array(self, X: np.ndarray, idx: np.ndarray, masks, kinds: frozenset) -> dict:
        need_h = bool(kinds & {"expected_entropy", "mutual_information"})
        need_sq = "variance" in kinds
        layers = tuple(sorted(k[len(FEATURE):] for k in kinds if k.startswith(FEATURE)))
        feat = self.ens.members_[int(self.ens._feature_member)]
        # the fused pass pads to the ensemble's divisor: only where that is the feature
        # member's own do its features equal its own run's
        piggyback = self.ens.spatial_divisor_ == feat.spatial_divisor_
        n, bs = X.shape[0], self._batch(X)
        result: dict[str, np.ndarray] = {}
        for start in range(0, n, bs):
            chunk = X[start : start + bs]
            if self.ens.fused_ and (self.ens.fuse is True or self._fused_fits(chunk)):
                res = self._chunk_fused(chunk, need_h, need_sq, layers if piggyback else ())
            else:
                res = self._chunk_members(chunk, idx[start : start + bs], masks, need_h, need_sq)
            missing = [ly for ly in layers if FEATURE + ly not in res]
            if missing:  # the feature member once more, deterministic, for its features
                out = feat.run(chunk, layers=missing, proba=False)
                res.update({FEATURE + ly: out[ly] for ly in missing})
            maps = self._finish(res, kinds, self.ens._binary)
            for name, val in maps.items():
                if name not in result:
                    result[name] = np.empty((n, *val.shape[1:]), dtype=np.float32)
                result[name][start : start + bs] = val
        return result

    @staticmethod
    def _finish(res: dict, kinds: frozenset, binary: bool = False) -> dict:
        """Uncertainty maps of one chunk from its running sums (per channel when binary)."""
        proba = res["proba"]
        out = {"proba": proba}
        if "entropy" in kinds or "mutual_information" in kinds:
            h = res.get("entropy")
            if h is None:
                h = binary_entropy(proba) if binary else categorical_entropy(proba)
            out["entropy"] = h
        if "expected_entropy" in kinds:
            out["expected_entropy"] = res["expected_entropy"]
        if "mutual_information" in kinds:
            mi = res.get("mutual_information")
            if mi is None:
                mi = out["entropy"] - res["expected_entropy"]
                np.maximum(mi, 0, out=mi)
            out["mutual_information"] = mi
        if "variance" in kinds:
            v = proba * proba
            np.subtract(res["mean_sq"], v, out=v)
            np.maximum(v, 0, out=v)
            out["variance"] = v if binary else v.mean(axis=1)
        out.update({k: v for k, v in res.items() if k.startswith(FEATURE)})
        return out

    def _compute(self, X, kinds: frozenset) -> dict:
        masks = self._masks(n_images(X))
        if not isinstance(X, list):
            return self._compute_array(X, np.arange(X.shape[0]), masks, kinds)
        # images of one size share chunks
        return by_shape(X, lambda sub, ids: self._compute_array(sub, ids, masks, kinds))

