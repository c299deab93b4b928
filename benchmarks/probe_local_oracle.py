"""How low can the local temperature map go on the MONAI UNets? Fitted on the test split itself.

For each network: the test ECE of the local map (and of the global temperature) fitted on val
as usual, and fitted on the test split it is scored on (an in-sample "oracle": the best this
family of maps can do there), with the bootstrap standard deviation of the val-fitted map's
test ECE over test images (30 resamples). With no paths, trains the MONAI ``UNet``s of
``bench_local_calibration.py`` (``--loss``, 3 seeds, 20 epochs; needs the ``train`` extra).

Writes ``benchmarks/results/local_calibration_oracle.json``.

    python benchmarks/probe_local_oracle.py --loss dicece      # about 5 minutes
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
from common import RESULTS, machine_record, write_json

from uqseg import OnnxSegmenter, TemperatureCalibrator, datasets, metrics

X_val, y_val = datasets.load_brain_tissue("val")
X_te, y_te = datasets.load_brain_tissue("test")


def probe(name, path):
    seg = OnnxSegmenter(path).fit()

    def ece(p):
        return metrics.expected_calibration_error(p, y_te)

    rec = {"network": name, "raw": ece(seg.predict_proba(X_te))}
    for split, (Xf, yf) in {"val": (X_val, y_val), "test": (X_te, y_te)}.items():
        local = TemperatureCalibrator(seg, mode="local").fit(Xf, yf)
        p = local.predict_proba(X_te)
        rec[f"local_fit_on_{split}"] = ece(p)
        rec[f"global_fit_on_{split}"] = ece(TemperatureCalibrator(seg).fit(Xf, yf)
                                            .predict_proba(X_te))
        if split == "val":
            rng = np.random.default_rng(0)
            boots = [metrics.expected_calibration_error(p[i], y_te[i])
                     for i in (rng.integers(0, len(p), len(p)) for _ in range(30))]
            rec["local_val_fit_bootstrap_sd"] = float(np.std(boots))
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}, flush=True)
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="ONNX files (default: train MONAI UNets)")
    ap.add_argument("--loss", default="dicece", choices=["ce", "dicece"])
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.models:
            nets = [(p, p) for p in args.models]
        else:
            from bench_local_calibration import monai_networks

            nets = monai_networks(args.seeds, 20, tmp, args.loss) or []
        rows = [probe(name, path) for name, path in nets]
    write_json(RESULTS / "local_calibration_oracle.json",
               {"name": "local_calibration_oracle", "loss": args.loss,
                "machine": machine_record(["numpy", "scipy", "onnxruntime"]), "rows": rows})


if __name__ == "__main__":
    main()
