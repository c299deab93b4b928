"""Could uqseg beat ONNX Runtime's 3-D convolutions? Depth-decomposed 2-D convolutions, probed.

ONNX Runtime's CPU provider has blocked-layout (NCHWc) kernels for 2-D convolutions only. A
3x3x3 convolution (stride 1, padding 1) equals one 2-D convolution over the depth slices with
three times the output channels (one block per depth tap), followed by a shifted sum of the
three blocks along depth. This probe rewrites every such ``Conv`` of a graph that way (ReLU
moved before the closing transpose, so ONNX Runtime can cancel the transposes between layers)
and compares, in process CPU time (robust to other jobs on the machine), interleaved:

- single layers in isolation (8 channels at 96³ ... 64 at 12³);
- the whole 3-D U-Net of ``bench_inference.py``'s ``3d96`` configuration (width 8, depth 4,
  batch 2, random weights), with 1 and 2 ONNX Runtime threads, and its wall time with ONNX
  Runtime's default session options.

Writes ``benchmarks/results/conv3d_decomposition.json``. uqseg does not ship the rewrite:
see ``docs/benchmarks.md`` ("Why 3-D 96³ stays at parity").

    python benchmarks/probe_conv3d.py          # about 5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import onnx
from common import RESULTS, machine_record, write_json
from onnx import helper as h
from onnx import numpy_helper as nh
from onnx import shape_inference

PERM = [0, 2, 1, 3, 4]


def _const(inits, name, values):
    inits.append(nh.from_array(np.asarray(values, np.int64), name))
    return name


def decompose(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Every 3x3x3 stride-1 pad-1 ungrouped ``Conv`` with constant weights, rewritten."""
    m = shape_inference.infer_shapes(model)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    outputs = {o.name for o in g.output}
    nodes, new_inits, skip, n_done = [], [], set(), 0
    for node in g.node:
        if id(node) in skip:
            continue
        a = {x.name: h.get_attribute_value(x) for x in node.attribute}
        w = inits.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if (w is None or len(w.dims) != 5 or list(w.dims[2:]) != [3, 3, 3]
                or list(a.get("strides", [1] * 3)) != [1] * 3 or a.get("group", 1) != 1
                or list(a.get("dilations", [1] * 3)) != [1] * 3
                or list(a.get("pads", [0] * 6)) != [1] * 6
                or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
            nodes.append(node)
            continue
        n_done += 1
        p = f"_dc{n_done}_"
        W = nh.to_array(w)
        O, C = W.shape[:2]
        new_inits.append(nh.from_array(np.concatenate([W[:, :, k] for k in range(3)]), p + "W"))
        c = lambda name, v, p=p: _const(new_inits, p + name, v)  # noqa: E731
        nodes += [
            h.make_node("Transpose", [node.input[0]], [p + "xt"], perm=PERM),  # N, D, C, H, W
            h.make_node("Shape", [p + "xt"], [p + "shp"]),
            h.make_node("Gather", [p + "shp", c("i34", [3, 4])], [p + "hw"], axis=0),
            h.make_node("Concat", [c("mc", [-1, C]), p + "hw"], [p + "s4"], axis=0),
            h.make_node("Reshape", [p + "xt", p + "s4"], [p + "x2"]),  # N*D, C, H, W
            h.make_node("Conv", [p + "x2", p + "W"], [p + "y2"], pads=[1] * 4),
            h.make_node("Gather", [p + "shp", c("i01", [0, 1])], [p + "nd"], axis=0),
            h.make_node("Concat", [p + "nd", c("c3", [3 * O]), p + "hw"], [p + "s5"], axis=0),
            h.make_node("Reshape", [p + "y2", p + "s5"], [p + "y5"]),  # N, D, 3 O, H, W
        ]
        for j in range(3):
            nodes.append(h.make_node("Slice", [p + "y5", c(f"b{j}", [j * O]),
                                               c(f"e{j}", [(j + 1) * O]), c(f"a{j}", [2])],
                                     [p + f"Y{j}"]))
        # out[d] = Y0[d - 1] + Y1[d] + Y2[d + 1], zero outside
        nodes += [
            h.make_node("Slice", [p + "Y0", c("z", [0]), c("m1", [-1]), c("ax1", [1])],
                        [p + "lo"]),
            h.make_node("Slice", [p + "Y2", c("one", [1]), c("big", [2**62]), c("ax1b", [1])],
                        [p + "hi"]),
            h.make_node("Pad", [p + "lo", c("plo", [0, 1, 0, 0, 0, 0, 0, 0, 0, 0])], [p + "lp"]),
            h.make_node("Pad", [p + "hi", c("phi", [0, 0, 0, 0, 0, 0, 1, 0, 0, 0])], [p + "hp"]),
            h.make_node("Add", [p + "lp", p + "Y1"], [p + "s"]),
            h.make_node("Add", [p + "s", p + "hp"], [p + "t"]),
        ]
        last = p + "t"
        if len(node.input) > 2 and node.input[2]:
            b = nh.to_array(inits[node.input[2]]).reshape(1, 1, O, 1, 1)
            new_inits.append(nh.from_array(b, p + "bias"))
            nodes.append(h.make_node("Add", [last, p + "bias"], [p + "tb"]))
            last = p + "tb"
        out = node.output[0]
        cons = consumers.get(out, [])
        if len(cons) == 1 and cons[0].op_type == "Relu" and out not in outputs:
            nodes.append(h.make_node("Relu", [last], [p + "r"]))
            last, out = p + "r", cons[0].output[0]
            skip.add(id(cons[0]))
        nodes.append(h.make_node("Transpose", [last], [out], perm=PERM))
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    return m, n_done


def _session(model, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # CPU time = work
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def compare(model, x, threads, repeats):
    rw, n = decompose(model)
    a, b = _session(model, threads), _session(rw, threads)
    name = a.get_inputs()[0].name
    ya, yb = a.run(None, {name: x})[0], b.run(None, {name: x})[0]
    ta, tb = [], []
    for _ in range(repeats):
        for sess, ts in ((a, ta), (b, tb)):
            t = time.process_time()
            sess.run(None, {name: x})
            ts.append(time.process_time() - t)
    return {"rewritten_convs": n, "threads": threads, "max_abs_diff": float(np.abs(ya - yb).max()),
            "cpu_s_original": ta, "cpu_s_decomposed": tb,
            "speedup_median": float(np.median(ta) / np.median(tb)),
            "speedup_min": float(min(ta) / min(tb))}


def compare_wall(model, x, repeats):
    """Wall time with ONNX Runtime's default session options (its thread pool, spinning)."""
    import onnxruntime as ort

    rw, _ = decompose(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    a, b = (ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            for m in (model, rw))
    name = a.get_inputs()[0].name
    ta, tb = [], []
    for _ in range(repeats):
        for sess, ts in ((a, ta), (b, tb)):
            time.sleep(0.05)
            sess.run(None, {name: x})  # the first call after the other session: untimed
            t = time.perf_counter()
            sess.run(None, {name: x})
            ts.append(time.perf_counter() - t)
    return {"wall_s_original": ta, "wall_s_decomposed": tb,
            "speedup_median": float(np.median(ta) / np.median(tb))}


def layer_model(C, O, S, rng):
    W = (rng.standard_normal((O, C, 3, 3, 3)) * 0.1).astype(np.float32)
    g = h.make_graph(
        [h.make_node("Conv", ["x", "W", "b"], ["c"], pads=[1] * 6),
         h.make_node("Relu", ["c"], ["y"])], "layer",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, C, S, S, S])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [nh.from_array(W, "W"), nh.from_array(np.zeros(O, np.float32), "b")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    layers = []
    for C, S in ((8, 96), (16, 48), (32, 24), (64, 12)):
        x = rng.standard_normal((1, C, S, S, S)).astype(np.float32)
        r = compare(layer_model(C, C, S, rng), x, 1, args.repeats)
        layers.append({"channels": C, "size": S, **r})
        print(f"layer {C} ch at {S}^3: {r['speedup_median']:.2f}x", flush=True)
    import torch

    from uqseg.training import UNet, export_onnx

    torch.manual_seed(0)
    x = rng.standard_normal((2, 1, 96, 96, 96)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(UNet(1, 3, dims=3, width=8, depth=4).eval(), f"{tmp}/u.onnx", x[:1])
        model = onnx.load(f"{tmp}/u.onnx")
    network = []
    for threads in (1, 2):
        r = compare(model, x, threads, args.repeats)
        network.append(r)
        print(f"3-D U-Net 96^3 b=2, {threads} thread(s): {r['speedup_median']:.2f}x "
              f"({r['rewritten_convs']} convolutions)", flush=True)
    wall = compare_wall(model, x, args.repeats + 1)
    print(f"3-D U-Net 96^3 b=2, default session, wall time: {wall['speedup_median']:.2f}x",
          flush=True)
    write_json(RESULTS / "conv3d_decomposition.json",
               {"layers": layers, "network_3d96": network, "network_3d96_wall_default": wall,
                "machine": machine_record(["numpy", "onnxruntime", "onnx"])})


if __name__ == "__main__":
    main()
