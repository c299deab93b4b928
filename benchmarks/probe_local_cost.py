"""Could the local temperature map cost less? Three ways probed (issue 19's 1.10x).

On the worst zoo member (``member_00_dice``) and the ensemble, the local calibrator fitted on
val as a user would (``TemperatureCalibrator(seg, mode="local")``), 32 test slices (16 for the
ensemble), each call timed in blocks of 3 after one of its own kind (``time_round_robin``):

1. ``threads``: the map and the scaled softmax of each batch split over two threads (numpy
   releases the GIL) instead of one.
2. ``coarse``: the whole map computed on a 2x coarser grid (logits and image block-averaged,
   scales halved) and upsampled; refitted that way; its ECE / NLL on the test split.
3. ``ort_head``: the same arithmetic as an ONNX graph run by ONNX Runtime (margin by TopK,
   argmax, 2x average pooling, softmax entropy, two separable smoothings, nearest upsampling,
   class look-up, intensity term, scaled softmax); random weights, its time only, and ONNX
   Runtime's own per-operator profile. The distance feature is left out (no ONNX operator).

Writes ``benchmarks/results/local_calibration_cost.json``; the docs quote it in
``docs/calibration.md`` (local temperature scaling, "Cost").

    python benchmarks/probe_local_cost.py        # about 4 minutes
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from common import RESULTS, machine_record, time_round_robin, write_json

from uqseg import EnsembleSegmenter, OnnxSegmenter, TemperatureCalibrator, _local, datasets, metrics

X_val, y_val = datasets.load_brain_tissue("val")
X_te, y_te = datasets.load_brain_tissue("test")


def _post(cal, z, img):
    a = np.exp(-cal._log_temperature(z, img))
    return _local.scaled_softmax(z, a)


def threaded(cal, X, pool):
    """The calibrator's prediction with each batch's map split over the pool's threads."""
    outs = []
    for z, img in cal._batches(X):
        h = (len(z) + 1) // 2
        outs += list(pool.map(_post, [cal, cal], [z[:h], z[h:]], [img[:h], img[h:]]))
    return np.concatenate(outs)


def _down(a):
    n, k = a.shape[:2]
    c = _local._coarse(a.reshape(n * k, *a.shape[2:]).astype(np.float32), "mean", 2)
    return c.reshape(n, k, *c.shape[1:])


class _Coarse:
    """Patches ``uqseg._local`` so the map is computed on a 2x coarser grid."""

    def __enter__(self):
        self.lf, self.lt = _local.local_features, _local.log_temperature
        lf, lt = self.lf, self.lt

        def features(z, scales, image=None):
            f = lf(_down(z), [s / 2 for s in scales], None if image is None else _down(image))
            return _local._upsample(f, z.shape[2:], 2)

        def log_t(z, scales, image, coef, intercept):
            t = lt(_down(z), [s / 2 for s in scales], None if image is None else _down(image),
                   coef, intercept)
            return _local._upsample(t, z.shape[2:], 2)

        _local.local_features, _local.log_temperature = features, log_t
        return self

    def __exit__(self, *exc):
        _local.local_features, _local.log_temperature = self.lf, self.lt


def ort_head(shape):
    """The map's arithmetic as one ONNX graph (random weights): median time and op profile."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    n, k, h, w = shape
    inits = []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    mk = helper.make_node
    nodes = [
        mk("ArgMax", ["z"], ["lab"], axis=1, keepdims=1),
        mk("TopK", ["z", const("k2", np.array([2], np.int64))], ["tv", "ti"], axis=1),
        mk("Split", ["tv"], ["t1", "t2"], axis=1, num_outputs=2),
        mk("Sub", ["t1", "t2"], ["mg"]),
        mk("Add", ["mg", const("eps", np.float32(1e-3))], ["mg2"]),
        mk("Log", ["mg2"], ["lmg"]),
        mk("AveragePool", ["z"], ["zc"], kernel_shape=[2, 2], strides=[2, 2]),
        mk("Softmax", ["zc"], ["pc"], axis=1),
        mk("LogSoftmax", ["zc"], ["lpc"], axis=1),
        mk("Mul", ["pc", "lpc"], ["plp"]),
        mk("ReduceSum", ["plp", const("ax1", np.array([1], np.int64))], ["nent"], keepdims=1),
        mk("Neg", ["nent"], ["ent"]),
        mk("Add", ["ent", const("eps2", np.float32(1e-6))], ["ent2"]),
        mk("Log", ["ent2"], ["lent"]),
        mk("AveragePool", ["lmg"], ["lm2"], kernel_shape=[2, 2], strides=[2, 2]),
        mk("Concat", ["lm2", "lent"], ["mix0"], axis=1),
        mk("Conv", ["mix0", const("wmix", np.ones((1, 2, 1, 1), np.float32))], ["mix"]),
        mk("Conv", ["mix", const("g1", np.ones((1, 1, 7, 1), np.float32) / 7)], ["s1a"],
           pads=[3, 0, 3, 0]),
        mk("Conv", ["s1a", const("g2", np.ones((1, 1, 1, 7), np.float32) / 7)], ["s1"],
           pads=[0, 3, 0, 3]),
        mk("AveragePool", ["mix"], ["mix4"], kernel_shape=[2, 2], strides=[2, 2]),
        mk("Conv", ["mix4", const("g3", np.ones((1, 1, 11, 1), np.float32) / 11)], ["s2a"],
           pads=[5, 0, 5, 0]),
        mk("Conv", ["s2a", const("g4", np.ones((1, 1, 1, 11), np.float32) / 11)], ["s2"],
           pads=[0, 5, 0, 5]),
        mk("Resize", ["s2", "", const("sc2", np.array([1, 1, 2, 2], np.float32))], ["s2u"],
           mode="nearest"),
        mk("Add", ["s1", "s2u"], ["acc2"]),
        mk("Resize", ["acc2", "", const("sc1", np.array([1, 1, 2, 2], np.float32))], ["accf"],
           mode="nearest"),
        mk("Gather", [const("tab", np.array([0.1, 0.2, 0.3], np.float32)), "lab"], ["ct"]),
        mk("Add", ["accf", "ct"], ["a1"]),
        mk("Mul", ["lmg", const("cm", np.float32(0.3))], ["lmgw"]),
        mk("Add", ["a1", "lmgw"], ["a2"]),
        mk("Mul", ["x", const("ci", np.float32(0.1))], ["xi"]),
        mk("Add", ["a2", "xi"], ["lt"]),
        mk("Neg", ["lt"], ["nlt"]),
        mk("Exp", ["nlt"], ["a"]),
        mk("Mul", ["z", "a"], ["zs"]),
        mk("Softmax", ["zs"], ["p"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "local_head",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [n, k, h, w]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, 1, h, w])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [n, k, h, w])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"z": rng.normal(size=shape).astype(np.float32),
             "x": rng.normal(size=(n, 1, h, w)).astype(np.float32)}
    t = time_round_robin({"head": lambda: sess.run(None, feeds)}, repeats=5, warmup=2,
                         block=3)["head"]
    ops: dict[str, float] = {}
    events = json.loads(open(sess.end_profiling()).read())
    runs = sum(1 for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            ops[op] = ops.get(op, 0.0) + e["dur"] / 1e6
    return {"median_s": t["median_s"],
            "ops_s_per_run": {k: v / max(runs, 1) for k, v in sorted(
                ops.items(), key=lambda kv: -kv[1])}}


def main():
    paths = datasets.reference_models()
    out = {"name": "local_calibration_cost", "machine": machine_record(["numpy", "scipy",
                                                                        "onnxruntime"])}
    pool = ThreadPoolExecutor(2)
    for name, seg, n in [("member_00_dice", OnnxSegmenter(paths[0]).fit(), 32),
                         ("ensemble", EnsembleSegmenter(paths, cache_size=0).fit(), 16)]:
        X = X_te[:n]
        cal = TemperatureCalibrator(seg, mode="local").fit(X_val, y_val)
        assert np.allclose(threaded(cal, X, pool), cal.predict_proba(X), atol=1e-6)
        with _Coarse():
            coarse = TemperatureCalibrator(seg, mode="local").fit(X_val, y_val)
            p_coarse = coarse.predict_proba(X_te)

            def coarse_predict(coarse=coarse, X=X):
                with _Coarse():
                    return coarse.predict_proba(X)
        p_local = cal.predict_proba(X_te)
        raw = seg.predict_proba(X_te)
        t = time_round_robin({"plain": lambda seg=seg, X=X: seg.predict_proba(X),
                              "local": lambda cal=cal, X=X: cal.predict_proba(X),
                              "threads": lambda cal=cal, X=X: threaded(cal, X, pool),
                              "coarse": coarse_predict}, repeats=5, warmup=1, block=3)
        z = seg.transform(X)
        img = cal._image(z, X)
        tm = time_round_robin({"map": lambda cal=cal, z=z, img=img: _post(cal, z, img)},
                              repeats=5, warmup=1, block=3)["map"]
        rec = {"images": n, "map_and_softmax_s": tm["median_s"],
               "cost": {k: v["median_s"] / t["plain"]["median_s"] for k, v in t.items()},
               "seconds": {k: v["median_s"] for k, v in t.items()}}
        for key, p in (("raw", raw), ("local", p_local), ("coarse", p_coarse)):
            rec[key] = {"ece": metrics.expected_calibration_error(p, y_te),
                        "nll": metrics.negative_log_likelihood(p, y_te)}
        rec["coarse_labels_changed"] = int((p_coarse.argmax(1) != raw.argmax(1)).sum())
        out[name] = rec
        print(name, json.dumps(rec, indent=1), flush=True)
    out["ort_head"] = ort_head((32, 3, 128, 128))
    print("ort_head", json.dumps(out["ort_head"], indent=1))
    write_json(RESULTS / "local_calibration_cost.json", out)


if __name__ == "__main__":
    main()
