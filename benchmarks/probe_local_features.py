"""Would a richer local temperature map calibrate nearly calibrated networks better? Probed.

For each ONNX model given (e.g. the MONAI UNets of ``bench_local_calibration.py``, exported
by its ``monai_networks``): fitted on val, scored on test, ECE / NLL of the raw network, the
global temperature, the library's local map (``TemperatureCalibrator(mode="local")``) and a
plain NLL fit (L-BFGS on 4e5 val voxels, no top-label term) of the same log-linear map with
extra terms: ``int`` a log-margin slope per predicted class, ``sq`` the squared log-margin,
``int6`` class slopes of the margin smoothed at scale 6, ``ent`` class slopes of the
log-entropy. Prints one line per variant and writes
``benchmarks/results/local_calibration_features.json``. The result (docs/calibration.md):
none lowers test ECE; the library's map stays as it is.

    python benchmarks/probe_local_features.py MONAI_s0.onnx MONAI_s1.onnx
"""

import sys

import numpy as np
from common import RESULTS, write_json
from scipy.optimize import minimize

from uqseg import OnnxSegmenter, TemperatureCalibrator, datasets, metrics
from uqseg._local import feature_names, local_features
from uqseg.uncertainty import softmax

X_val, y_val = datasets.load_brain_tissue("val")
X_te, y_te = datasets.load_brain_tissue("test")
SC = (2.0, 6.0)


def feats(z, X, variant):
    f = local_features(z, SC, X)  # (F, n, *sp)
    names = feature_names(z.shape[1], SC, X.shape[1])
    extra = []
    lab = z.argmax(1)
    lm = f[names.index("log_margin")]
    if "int" in variant:
        for k in range(1, z.shape[1]):
            extra.append((lab == k) * lm)
    if "int6" in variant:
        for k in range(1, z.shape[1]):
            extra.append((lab == k) * f[names.index("log_margin@6")])
    if "sq" in variant:
        extra.append(lm**2)
    if "ent" in variant:
        le = f[names.index("log_entropy")]
        for k in range(1, z.shape[1]):
            extra.append((lab == k) * le)
    if extra:
        f = np.concatenate([f, np.stack(extra).astype(np.float32)])
    return f


def fit(z, f, y, t0, alpha=1e-4, n=400000, seed=0):
    k = z.shape[1]
    F = f.shape[0]
    zz = np.moveaxis(z, 1, 0).reshape(k, -1)
    ff = f.reshape(F, -1)
    yy = y.reshape(-1)
    idx = np.random.default_rng(seed).choice(yy.size, min(n, yy.size), replace=False)
    zz, ff, yy = zz[:, idx], ff[:, idx], yy[idx]
    mu, sd = ff.mean(1), ff.std(1)
    sd[sd < 1e-6] = 1
    fs = ((ff - mu[:, None]) / sd[:, None]).astype(np.float64)
    zz = zz.astype(np.float64)
    hot = np.zeros_like(zz)
    hot[yy, np.arange(yy.size)] = 1
    c = np.log(t0)

    def fun(th):
        b, v = th[0], th[1:]
        lt = np.clip(b + v @ fs, -4, 4)
        a = np.exp(-lt)
        u = zz * a
        u = u - u.max(0)
        e = np.exp(u)
        tot = e.sum(0)
        nll = np.log(tot) - (u * hot).sum(0)
        # d nll / d lt = sum_k (p_k - hot_k) * (-u_k)... u = z a, du/dlt = -u
        p = e / tot
        dl = ((p - hot) * (-(zz * a))).sum(0) * ((lt > -4) & (lt < 4))
        obj = nll.mean() + alpha * (v @ v + (b - c) ** 2)
        g = np.concatenate([[dl.mean() + 2 * alpha * (b - c)], fs @ dl / yy.size + 2 * alpha * v])
        return obj, g

    r = minimize(fun, np.concatenate([[c], np.zeros(F)]), jac=True, method="L-BFGS-B")
    v = r.x[1:] / sd
    b = r.x[0] - v @ mu
    return b, v


def apply(z, f, b, v):
    lt = np.clip(b + np.tensordot(v, f, 1), -4, 4)
    return softmax(z * np.exp(-lt)[:, None].astype(np.float32))


def sc(p, y):
    return metrics.expected_calibration_error(p, y), metrics.negative_log_likelihood(p, y)


results = {}
for path in sys.argv[1:]:
    seg = OnnxSegmenter(path).fit()
    zv, zt = seg.transform(X_val), seg.transform(X_te)
    raw = sc(softmax(zt), y_te)
    g = TemperatureCalibrator().fit(zv, y_val)
    glob = sc(g.predict_proba(zt), y_te)
    loc = TemperatureCalibrator(seg, mode="local").fit(X_val, y_val)
    lib = sc(loc.predict_proba(X_te), y_te)
    rec = results[path.split("/")[-1]] = {"raw": raw, "global": glob, "library_local": lib}
    print(f"{path.split('/')[-1]} raw {raw[0]:.4f}/{raw[1]:.4f} glob {glob[0]:.4f}/{glob[1]:.4f} "
          f"lib-local {lib[0]:.4f}/{lib[1]:.4f} ({lib[0] / raw[0]:.2f}x raw, "
          f"{lib[0] / glob[0]:.2f}x glob)", flush=True)
    for variant in ["base", "int", "int+sq", "int+int6", "int+ent", "int+int6+ent+sq"]:
        fv, ft = feats(zv, X_val, variant), feats(zt, X_te, variant)
        b, v = fit(zv, fv, y_val, g.temperature_)
        r = sc(apply(zt, ft, b, v), y_te)
        rec[variant] = r
        print(f"   {variant:18s} ece {r[0]:.4f} nll {r[1]:.4f}  ({r[0] / raw[0]:.2f}x raw, "
              f"{r[0] / glob[0]:.2f}x glob)", flush=True)
write_json(
    RESULTS / "local_calibration_features.json",
    {k: {a: [float(x) for x in v] for a, v in r.items()} for k, r in results.items()},
)
