"""Smoke tests of the benchmark scripts: they run with tiny settings and write valid JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _conv_model() -> onnx.ModelProto:
    """Conv 1->2 (3x3, pad 1) then ConvTranspose 2->4 (2x2, stride 2) then MatMul by (16, 5)."""
    w1 = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w1")
    w2 = numpy_helper.from_array(np.ones((2, 4, 2, 2), np.float32), "w2")
    w3 = numpy_helper.from_array(np.ones((16, 5), np.float32), "w3")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("ConvTranspose", ["h", "w2"], ["u"], strides=[2, 2],
                         kernel_shape=[2, 2]),
        helper.make_node("MatMul", ["u", "w3"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], [w1, w2, w3])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_count_flops_by_hand():
    flops = _load("bench_inference").count_flops(_conv_model(), (3, 1, 8, 8))
    conv = 3 * 2 * 8 * 8 * (1 * 3 * 3)  # every output: C_in x k x k MACs
    convt = 3 * 2 * 8 * 8 * (4 * 2 * 2)  # every input scatters into C_out x k x k outputs
    matmul = 3 * 4 * 16 * 5 * 16  # (3, 4, 16, 16) @ (16, 5)
    assert flops["macs_by_op"] == {"Conv": conv, "ConvTranspose": convt, "MatMul": matmul,
                                   "Gemm": 0}
    assert flops["flops"] == 2 * (conv + convt + matmul)
    assert flops["nodes_without_shapes"] == 0


def test_peak_formula_and_timer():
    common = _load("common")
    cpu = common.cpu_info()
    assert cpu["usable_cpus"] >= 1
    if cpu["ghz"]:
        assert cpu["peak_gflops_fp32"] == pytest.approx(
            cpu["usable_cpus"] * cpu["ghz"] * cpu["fp32_flops_per_cycle_per_core"])
    calls = []
    t = common.time_round_robin({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                repeats=3, warmup=1)
    # warm-up round, then rounds whose order rotates: each variant follows the other equally
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert set(t) == {"a", "b"} and len(t["a"]["times_s"]) == 3
    mem = common.measure_peak(lambda: np.ones(2**22))  # 32 MB
    assert mem["tracemalloc_peak_mb"] >= 30


def test_render_and_only(tmp_path):
    run_all = _load("run_all")
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "other.json").write_text(json.dumps(
        {"date": "2026-01-01", "cpu": {"model": "x"}, "speed": {"a_per_s": 2.5}}))
    docs = tmp_path / "b.md"
    docs.write_text("# Benchmarks\n\nintro kept\n\n<!-- results:start -->\nold\n"
                    "<!-- results:end -->\n\ntail kept\n")
    assert run_all.main(["--render-only", "--out", str(tmp_path / "res"),
                         "--docs", str(docs)]) == 0
    text = docs.read_text()
    assert "intro kept" in text and "tail kept" in text and "old" not in text
    assert "| speed.a_per_s | 2.5 |" in text
    assert run_all.main(["--only", "nope", "--out", str(tmp_path)]) == 2
    # without --render a run leaves the docs page as it was
    before = docs.read_text()
    (tmp_path / "res" / "other.json").write_text(json.dumps({"speed": {"a_per_s": 9.5}}))
    fake = tmp_path / "bench_fake.py"
    fake.write_text("print('ran')\n")
    run_all.available = lambda: {"fake": fake}  # a module loaded for this test only
    assert run_all.main(["--out", str(tmp_path / "res"), "--docs", str(docs)]) == 0
    assert docs.read_text() == before
    assert run_all.main(["--render-only", "--out", str(tmp_path / "res"), "--docs",
                         str(docs)]) == 0
    assert "| speed.a_per_s | 9.5 |" in docs.read_text()


@pytest.mark.slow
def test_metrics_quick(tmp_path):
    pytest.importorskip("netcal")
    out = tmp_path / "metrics.json"
    _load("bench_metrics").main(["--quick", "--no-memory", "--out", str(out)])
    r = json.loads(out.read_text())
    ece = r["compare"]["ece"]["methods"]
    # uqseg and netcal bin the same way (Guo et al.): same ECE on the same data
    assert ece["uqseg"]["value"] == pytest.approx(ece["netcal"]["value"], rel=1e-6)
    assert r["large"]["methods"]["uqseg"]["median_s"] > 0
    bw = r["large"]["bandwidth"]  # one pass over the same bytes, and the ECE as a multiple of it
    assert set(bw) == {"read_copy", "read_max"}
    for b in bw.values():
        assert b["uqseg_time_ratio"] == pytest.approx(
            r["large"]["methods"]["uqseg"]["median_s"] / b["median_s"])
    assert r["versions"]["numpy"] and r["loadavg_end"] is not None


@pytest.mark.slow
@pytest.mark.torch
def test_inference_quick(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    out = tmp_path / "inference.json"
    _load("bench_inference").main(["--quick", "--no-memory", "--configs", "2d32",
                                   "--variants", "torch_eager,ort_default,uqseg,ort_cuda",
                                   "--out", str(out)])
    r = json.loads(out.read_text())
    v = r["configs"]["2d32"]["variants"]
    for name in ("torch_eager", "ort_default", "uqseg"):
        assert v[name]["images_per_s"] > 0
        assert v[name]["max_abs_diff_vs_first"] < 1e-3  # same network everywhere
    assert "skipped" in v["ort_cuda"] or v["ort_cuda"]["images_per_s"] > 0
    assert r["configs"]["2d32"]["flops_per_image"] > 0


def test_ood_overhead_times_both_blas_settings_and_restores_the_limit():
    from uqseg import OnnxSegmenter, datasets
    from uqseg.ood import _base

    bench = _load("bench_ood")
    limit = _base.one_blas_thread
    seg = OnnxSegmenter(datasets.reference_models()[0]).fit()
    X, _ = datasets.load_brain_tissue("val")
    res = bench.overhead(seg, X[:12], X[:4], repeats=1)
    assert _base.one_blas_thread is limit  # the free-BLAS variant put it back
    for key in ("transform_s", "score_samples_s", "score_samples_blas_threads_s"):
        assert res[key] > 0
    assert res["overhead"] == pytest.approx(res["score_samples_s"] / res["transform_s"] - 1)
    assert len(res["score_samples_all_s"]) == bench.BLOCK
    table = bench.tables({"evaluation": {"spectral": {
        "kinds": {k: {"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0, "flagged": 1.0}
                  for k in datasets.OOD_KINDS},
        "test_flagged": 0.05, "karimi": {"test_flagged": 0.0,
                                         **{k: 1.0 for k in datasets.OOD_KINDS}}}},
        "ablation": [], "overhead": res})["overhead"]
    assert f"{100 * res['overhead']:+.1f}%" in table
