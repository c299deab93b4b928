"""Self-contained HTML report of a run (figures embedded as base64 PNG).

Needs matplotlib (``pip install 'uqseg[plot]'``); it is imported only when a figure is
drawn, with the non-interactive ``Agg`` backend. Every figure function takes plain arrays
and returns a matplotlib ``Figure``, so they are usable outside the demo too.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from uqseg._optional import import_optional

__all__ = [
    "examples_figure",
    "figure_to_png",
    "ood_histograms_figure",
    "quality_scatter_figure",
    "reliability_figure",
    "temperature_figure",
    "write_report",
]


def _plt():
    mpl = import_optional("matplotlib", extra="plot", purpose="the HTML report")
    mpl.use("Agg", force=False)
    return import_optional("matplotlib.pyplot", extra="plot", purpose="the HTML report")


def figure_to_png(fig) -> bytes:
    """PNG bytes of a matplotlib figure (the figure is closed)."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def reliability_figure(curves: dict):
    """Reliability diagrams side by side.

    Parameters
    ----------
    curves : dict
        ``label -> {"confidence", "accuracy", "count", "ece"}`` (as
        :func:`uqseg.metrics.reliability_curve` returns, plus the ECE). Consecutive pairs
        share one panel (e.g. before / after calibration).
    """
    plt = _plt()
    items = list(curves.items())
    pairs = [items[i:i + 2] for i in range(0, len(items), 2)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 4.2), squeeze=False)
    for ax, pair in zip(axes[0], pairs, strict=True):
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
        for label, c in pair:
            conf, acc = np.asarray(c["confidence"]), np.asarray(c["accuracy"])
            ok = np.asarray(c["count"]) > 0
            ax.plot(conf[ok], acc[ok], marker="o", ms=3, label=f"{label} (ECE {c['ece']:.4f})")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Reliability diagrams (test, foreground region)")
    fig.tight_layout()
    return fig


def examples_figure(image, truth, prediction, uncertainty, uncertainty_kind="uncertainty",
                    class_names=None):
    """Image / truth / prediction / error / uncertainty panels, one row per image.

    Parameters
    ----------
    image : array (n, H, W)
    truth, prediction : int arrays (n, H, W), or boolean masks (n, C, H, W)
        Label maps (softmax networks), or one mask per channel (sigmoid networks: binary or
        overlapping multi-label), drawn as one coloured contour per channel on the image.
    uncertainty : array (n, H, W)
    uncertainty_kind : str
        Title of the last column.
    class_names : sequence of str, optional
        Names of the labels ``0 .. K-1`` (masks: of the channels) for the colour legend
        (default "class k" / "channel c").
    """
    plt = _plt()
    from matplotlib.patches import Patch

    if np.ndim(truth) == np.ndim(image) + 1 or np.ndim(prediction) == np.ndim(image) + 1:
        return _examples_masks(plt, image, truth, prediction, uncertainty, uncertainty_kind,
                               class_names)
    n = len(image)
    n_classes = int(max(np.max(truth), np.max(prediction))) + 1
    fig, axes = plt.subplots(n, 5, figsize=(11, 2.3 * n), squeeze=False)
    titles = ["image", "truth", "prediction", "error", uncertainty_kind.replace("_", " ")]
    for r in range(n):
        error = prediction[r] != truth[r]
        panels = [(image[r], "gray", None), (truth[r], "viridis", (0, n_classes - 1)),
                  (prediction[r], "viridis", (0, n_classes - 1)), (error, "Reds", (0, 1)),
                  (uncertainty[r], "magma", None)]
        for c, (arr, cmap, lim) in enumerate(panels):
            ax = axes[r, c]
            vmin, vmax = lim if lim else (None, None)
            im = ax.imshow(arr, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
            if c == 3:
                ax.set_xlabel(f"{error.mean():.1%} wrong", fontsize=8)
            if c == 4:
                bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
                bar.set_label("nats", fontsize=7)
    cmap = plt.get_cmap("viridis")
    names = list(class_names or [])
    names += [f"class {k}" for k in range(len(names), n_classes)]
    handles = [Patch(color=cmap(k / max(n_classes - 1, 1)), label=names[k])
               for k in range(n_classes)]
    fig.legend(handles=handles, loc="lower center", ncol=n_classes, fontsize=8,
               frameon=False, title="labels (truth, prediction)", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def _examples_masks(plt, image, truth, prediction, uncertainty, uncertainty_kind,
                    class_names):
    """:func:`examples_figure` for per-channel masks: contours on the image, errors of any
    channel."""
    from matplotlib.lines import Line2D

    image, truth, prediction = (np.asarray(a) for a in (image, truth, prediction))
    if truth.shape != prediction.shape or truth.ndim != image.ndim + 1 \
            or truth.shape[:1] + truth.shape[2:] != image.shape:
        raise ValueError(f"per-channel masks must both be (n, C, H, W) for images {image.shape}"
                         f", got truth {truth.shape} and prediction {prediction.shape}")
    n, c = truth.shape[:2]
    names = list(class_names or [])
    if len(names) > c:
        raise ValueError(f"{len(names)} class_names for {c} channels")
    names += [f"channel {k}" for k in range(len(names), c)]
    colours = [plt.get_cmap("tab10")(k % 10) for k in range(c)]
    # overlapping channels share boundaries (foreground and grey matter): later channels
    # dashed and narrower, so the line below shows through their gaps
    widths = [1.0 + (c - 1 - k) / max(c - 1, 1) for k in range(c)]
    styles = ["solid" if k == 0 else (k % 3, (3, 2)) for k in range(c)]
    fig, axes = plt.subplots(n, 5, figsize=(11, 2.3 * n), squeeze=False)
    titles = ["image", "truth", "prediction", "error (any channel)",
              uncertainty_kind.replace("_", " ")]
    for r in range(n):
        error = (prediction[r].astype(bool) != truth[r].astype(bool)).any(axis=0)
        for col in range(5):
            ax = axes[r, col]
            if col < 3:
                ax.imshow(image[r], cmap="gray", interpolation="nearest")
            if col in (1, 2):
                masks = (truth if col == 1 else prediction)[r].astype(bool)
                for k in range(c):
                    if masks[k].any() and not masks[k].all():  # a contour needs both sides
                        ax.contour(masks[k].astype(np.float32), levels=[0.5],
                                   colors=[colours[k]], linewidths=widths[k],
                                   linestyles=[styles[k]])
            if col == 3:
                ax.imshow(error, cmap="Reds", vmin=0, vmax=1, interpolation="nearest")
                ax.set_xlabel(f"{error.mean():.1%} wrong", fontsize=8)
            if col == 4:
                im = ax.imshow(uncertainty[r], cmap="magma", interpolation="nearest")
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).set_label("nats", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[col], fontsize=9)
    handles = [Line2D([], [], color=colours[k], lw=widths[k], ls=styles[k],
                      label=names[k]) for k in range(c)]
    fig.legend(handles=handles, loc="lower center", ncol=c, fontsize=8, frameon=False,
               title="channels (contours of truth, prediction)", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def temperature_figure(image, temperature):
    """Image / local temperature panels (``TemperatureCalibrator(mode="local")``'s
    ``temperature_map``), one row per image; the colour scale is shared, 1 marks no change.

    Parameters
    ----------
    image, temperature : arrays (n, H, W)
    """
    plt = _plt()
    n = len(image)
    t = np.asarray(temperature)
    vmax = max(float(np.quantile(t, 0.99)), 1.0)
    fig, axes = plt.subplots(n, 2, figsize=(6, 2.6 * n), squeeze=False)
    for r in range(n):
        axes[r, 0].imshow(image[r], cmap="gray", interpolation="nearest")
        im = axes[r, 1].imshow(t[r], cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        fig.colorbar(im, ax=axes[r, 1], fraction=0.046, pad=0.02)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("image", fontsize=9)
    axes[0, 1].set_title("local temperature T(x)", fontsize=9)
    fig.tight_layout()
    return fig


def ood_histograms_figure(scores: dict, auroc: dict | None = None):
    """Histograms of OOD scores, one panel per detector.

    Parameters
    ----------
    scores : dict
        ``detector -> {"in-distribution": array, kind: array, ...}`` (higher = more
        in-distribution).
    auroc : dict, optional
        ``detector -> {kind: AUROC}``, shown in the legend.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, len(scores), figsize=(5.5 * len(scores), 3.8), squeeze=False)
    for ax, (det, by_kind) in zip(axes[0], scores.items(), strict=True):
        allv = np.concatenate([np.asarray(v, dtype=float) for v in by_kind.values()])
        ref = np.asarray(by_kind.get("in-distribution", allv), dtype=float)
        # kinds far below the in-distribution scores would squeeze it into one bin: the axis
        # is clipped at 3 in-distribution ranges below its minimum, lower scores gathered
        # in the leftmost bin (said on the axis)
        span = max(float(np.nanmax(ref) - np.nanmin(ref)), 1e-12)
        lo = max(float(np.nanmin(allv)), float(np.nanmin(ref)) - 3 * span)
        hi = float(np.nanmax(allv)) + 1e-12
        clipped = float(np.nanmin(allv)) < lo
        bins = np.linspace(lo, hi, 40)
        for kind, v in by_kind.items():
            v = np.clip(np.asarray(v, dtype=float), lo, hi)
            label = kind
            if auroc and kind in auroc.get(det, {}):
                label = f"{kind} (AUROC {auroc[det][kind]:.2f})"
            style = {"histtype": "stepfilled", "alpha": 0.35, "color": "k"} \
                if kind == "in-distribution" else {"histtype": "step", "lw": 1.2}
            ax.hist(v, bins=bins, density=True, label=label, **style)
        xlabel = "score (higher = more in-distribution)"
        if clipped:
            xlabel += f"; scores below {lo:.3g} in the leftmost bin"
        ax.set(title=f"{det} detector", xlabel=xlabel, ylabel="density")
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def quality_scatter_figure(true, predicted, classes=None, groups=None):
    """Predicted against true Dice, one panel per foreground class (or sigmoid channel).

    Parameters
    ----------
    true, predicted : arrays (N, K - 1), or (N, C) for a sigmoid network's channels
    classes : list of str, optional
        One name per column (default "class k").
    groups : array of str (N,), optional
        Colour points by group (e.g. the corruption kind).
    """
    plt = _plt()
    true, predicted = np.atleast_2d(np.asarray(true)), np.atleast_2d(np.asarray(predicted))
    if true.shape != predicted.shape:
        raise ValueError(f"true {true.shape} and predicted {predicted.shape} Dice differ in "
                         "shape")
    k = true.shape[1]
    classes = list(classes) if classes else [f"class {i + 1}" for i in range(k)]
    if len(classes) != k:
        raise ValueError(f"{len(classes)} classes for {k} columns of Dice")
    fig, axes = plt.subplots(1, k, figsize=(4.2 * k, 4.2), squeeze=False)
    for j, ax in enumerate(axes[0]):
        if groups is None:
            ax.scatter(true[:, j], predicted[:, j], s=10, alpha=0.7)
        else:
            for g in np.unique(groups):
                m = np.asarray(groups) == g
                ax.scatter(true[m, j], predicted[m, j], s=10, alpha=0.7, label=str(g))
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        ok = ~(np.isnan(true[:, j]) | np.isnan(predicted[:, j]))
        t, p = true[ok, j], predicted[ok, j]
        r = float("nan")
        if ok.sum() > 2 and t.std() > 0 and p.std() > 0:
            r = float(np.corrcoef(t, p)[0, 1])
        mae = float(np.mean(np.abs(t - p))) if ok.any() else float("nan")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="true Dice", ylabel="predicted Dice",
               title=f"{classes[j]}: r = {r:.2f}, MAE = {mae:.3f}")
        if groups is not None and j == 0:
            ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    return fig


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee}pre{background:#f7f7f7;padding:1em;overflow-x:auto}
figure{margin:1.5em 0}figcaption{color:#555;font-size:90%}"""


def _table(rows, header) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _f(x, d=3):
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{d}f}"


def write_report(out, summary: dict, figure_data: dict, filename: str = "report.html") -> Path:
    """Write a self-contained HTML report of a demo run.

    Parameters
    ----------
    out : str or path-like
        Folder (created).
    summary : dict
        As :func:`uqseg.demo.run_demo` returns (numbers for the tables); a non-empty
        ``sigmoid_channels`` (names, convention) marks a sigmoid network's run, said in the
        text and the captions.
    figure_data : dict
        ``reliability`` (see :func:`reliability_figure`), ``examples`` (keys of
        :func:`examples_figure`), ``ood_scores`` (see :func:`ood_histograms_figure`),
        ``quality`` (``true``, ``predicted``, ``classes``, optional ``corruption``),
        ``temperature`` (``image``, ``temperature``: see :func:`temperature_figure`). Missing
        keys skip their figure.
    filename : str
        Name of the HTML file.

    Returns
    -------
    pathlib.Path
        The HTML file; its figures are ``<img src="data:image/png;base64,...">``.
    """
    _plt()  # fail early with the install hint when matplotlib is missing
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sig = bool(summary.get("sigmoid_channels"))  # a sigmoid network: per-channel masks
    figures = []
    if "reliability" in figure_data:
        figures.append(("Reliability diagrams", reliability_figure(figure_data["reliability"]),
                        "Top-label accuracy against confidence on the test images, inside "
                        "the foreground region, before and after temperature scaling"
                        + (", the sigmoid channels pooled (each channel's voxels a binary "
                           "problem)." if sig else ".")))
    if "examples" in figure_data:
        ex = figure_data["examples"]
        figures.append(("Predictions and uncertainty",
                        examples_figure(ex["image"], ex["truth"], ex["prediction"],
                                        ex["uncertainty"], ex.get("uncertainty_kind",
                                                                  "uncertainty"),
                                        ex.get("class_names")),
                        "Test slices: image, ground truth, ensemble prediction, its errors and "
                        "the ensemble's voxel-wise uncertainty"
                        + (" (one contour per sigmoid channel, p >= 0.5; the channels' "
                           "uncertainty maps summed)." if sig else ".")))
    if "temperature" in figure_data:
        t = figure_data["temperature"]
        figures.append(("Local temperature", temperature_figure(t["image"], t["temperature"]),
                        "Test slices and the temperature that divides their logits at each "
                        "voxel (local temperature scaling; > 1 softens, < 1 sharpens)."))
    if "ood_scores" in figure_data:
        figures.append(("OOD scores", ood_histograms_figure(figure_data["ood_scores"],
                                                            summary.get("ood_auroc")),
                        "Scores of in-distribution test images (grey) and of each OOD kind."))
    if "quality" in figure_data:
        q = figure_data["quality"]
        figures.append(("Predicted against true Dice",
                        quality_scatter_figure(q["true"], q["predicted"], q.get("classes"),
                                               q.get("corruption")),
                        "QualityRegressor on corrupted test images (held-out severities)"
                        + (", one panel per sigmoid channel." if sig else ".")))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>uqseg report</title>"
             f"<style>{_CSS}</style></head><body><h1>uqseg report</h1>"]
    parts.append(_summary_html(summary))
    for title, fig, caption in figures:
        b64 = base64.b64encode(figure_to_png(fig)).decode("ascii")
        parts.append(f"<figure><h2>{html.escape(title)}</h2>"
                     f"<img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("<h2>summary.json</h2><pre>"
                 + html.escape(json.dumps(summary, indent=1, default=_plain)) + "</pre>")
    parts.append("</body></html>")
    path = out / filename
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _plain(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _summary_html(s: dict) -> str:
    parts = []
    if s.get("sigmoid_channels"):
        sc = s["sigmoid_channels"]
        parts.append("<p>Sigmoid network: channels " + html.escape(", ".join(sc["names"]))
                     + " (" + html.escape(sc["convention"]) + "); calibration metrics pool "
                     "the channels' binary problems.</p>")
    if "members" in s:
        rows = [[m["name"], " / ".join(_f(v) for v in m["test_dice"]), _f(m["val_ece"], 4),
                 _f(m["ece"], 4), _f(m["nll"], 4)] for m in s["members"]]
        if "ensemble" in s and "test_dice" in s:
            e = s["ensemble"]["ensemble"]
            rows.append(["ensemble", " / ".join(_f(v) for v in s["test_dice"]["ensemble"]), "",
                         _f(e["ece"], 4), _f(e["nll"], 4)])
        parts.append("<h2>Members and ensemble (test)</h2>" + _table(
            rows, ["model", "Dice (" + " / ".join(s["test_dice"]["classes"]) + ")",
                   "val ECE", "test ECE", "test NLL"]))
    if "temperature_scaling" in s:
        ts = s["temperature_scaling"]
        parts.append("<h2>Temperature scaling</h2>" + _table(
            [[ts["member"], ", ".join(_f(t, 2) for t in ts["temperature"]),
              f"{_f(ts['before']['ece'], 4)} → {_f(ts['after']['ece'], 4)}",
              f"{_f(ts['before']['nll'], 4)} → {_f(ts['after']['nll'], 4)}"]]
            + ([["ensemble", ", ".join(_f(t, 2) for t in s["ensemble"]["ensemble_temperature"]),
                 f"{_f(s['ensemble']['ensemble']['ece'], 4)} → "
                 f"{_f(s['ensemble']['ensemble_calibrated']['ece'], 4)}",
                 f"{_f(s['ensemble']['ensemble']['nll'], 4)} → "
                 f"{_f(s['ensemble']['ensemble_calibrated']['nll'], 4)}"]]
               if "ensemble_temperature" in s.get("ensemble", {}) else []),
            ["model", "T", "ECE", "NLL"]))
    if "conformal" in s and "error" in s["conformal"]:
        parts.append("<h2>Conformal risk control</h2><p>Not calibrated: "
                     + html.escape(s["conformal"]["error"]) + "</p>")
    elif "conformal" in s:
        c = s["conformal"]
        names = s.get("test_dice", {}).get("classes") or [str(k) for k in c["classes"]]
        base = c.get("baseline", "argmax")
        rows = [[name, _f(lam), _f(fnr), _f(arg), _f(vol, 2), n] for name, lam, fnr, arg, vol, n
                in zip(names, c["lambda"], c["test_fnr"],
                       c.get("baseline_fnr", c.get("argmax_fnr")),
                       c["mask_to_truth_volume"], c["test_images"], strict=False)]
        parts.append(f"<h2>Conformal risk control (false-negative rate ≤ {_f(c['alpha'], 2)})"
                     "</h2>" + _table(rows, ["class", "threshold λ", "test FNR",
                                             f"{base} FNR", "mask / truth volume",
                                             "test images"]))
    if "ood_auroc" in s:
        dets = list(s["ood_auroc"])
        kinds = list(s["ood_auroc"][dets[0]])
        rows = [[k] + [_f(s["ood_auroc"][d][k]) for d in dets] for k in kinds]
        parts.append("<h2>OOD detection (AUROC)</h2>" + _table(rows, ["kind", *dets]))
    if "quality" in s:
        q = s["quality"]
        parts.append("<h2>Quality prediction</h2>" + _table(
            [[_f(q["pearson_r"]), _f(q["spearman_rho"]), _f(q["mae"]), q["n"]]],
            ["Pearson r", "Spearman ρ", "MAE", "pairs"]))
    return "\n".join(parts)
