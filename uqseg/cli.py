"""Command-line entry point: ``uqseg demo | predict | bench | train | export | inspect``.

Exit codes (every subcommand): 0 success; 2 usage error (bad or missing arguments, input
files that do not exist); 1 runtime failure (unreadable model or image, a failed
computation, a missing optional extra). Errors are printed to stderr as
``uqseg <command>: error: <message>``.

Nothing here imports torch: ``train`` and ``export`` import :mod:`uqseg.training` only when
they run and say ``pip install 'uqseg[train]'`` when torch is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from uqseg import __version__
from uqseg._predict import UsageError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
BACKENDS = ("auto", "onnxruntime", "tensorrt")


def _fail(command: str, message: str, code: int) -> int:
    message = " ".join(str(message).split())  # one line, whatever the library said
    print(f"uqseg {command}: error: {message}", file=sys.stderr)
    return code


# libraries whose exceptions mean "this file/model is bad", not "uqseg has a bug"
_EXPECTED_MODULES = ("onnxruntime", "onnx", "google", "nibabel", "pydicom", "zlib", "gzip",
                     "zipfile")


def _expected(exc: BaseException) -> bool:
    if isinstance(exc, (ValueError, TypeError, OSError, EOFError, RuntimeError, ImportError,
                        KeyError, MemoryError)):
        return True
    return type(exc).__module__.split(".")[0] in _EXPECTED_MODULES


def _checked(convert, ok, expected: str):
    """An argparse ``type``: ``convert(text)`` that must satisfy ``ok``, else a message."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")


def _batch_size(text: str):
    """``"auto"`` or a positive integer."""
    return "auto" if text == "auto" else _positive_int(text)


PROGRESS_CHUNK = 16  # images per progress-bar step when the batch size is "auto"
_non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_probability = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
_open_unit = _checked(float, lambda v: 0 < v < 1, "a number in (0, 1)")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a positive number (mm)")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="inference backend (default: auto = fastest present)")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:N or tensorrt (default: auto)")
    p.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="images per inference call, or 'auto' (default: as many as keep a "
                        "call within 2**17 voxels on a CPU, 16 on a GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The ``uqseg`` argument parser (one sub-parser per command)."""
    parser = argparse.ArgumentParser(
        prog="uqseg",
        description="Calibration, ensembles, OOD detection and quality prediction for "
                    "segmentation networks exported to ONNX.",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 usage error. "
               "Run `uqseg COMMAND --help` for each command.",
    )
    parser.add_argument("--version", action="version", version=f"uqseg {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full Python traceback of a failure (before COMMAND)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser(
        "demo", help="run every estimator on the embedded data and write a report",
        description="Fit a temperature calibrator, an ensemble, OOD detectors and a quality "
                    "regressor on the embedded brain-tissue data with the shipped reference "
                    "models; print a table and write report.html and summary.json.")
    d.add_argument("--out", type=Path, default=Path("uqseg-demo"),
                   help="output folder (default ./uqseg-demo)")
    d.add_argument("--models", nargs="+", metavar="MODEL.onnx",
                   help="ONNX models to use instead of the shipped reference zoo: softmax "
                        "with 3 classes, or sigmoid with 1 (foreground), 2 (grey, white "
                        "matter) or 3 (foreground, grey, white matter) channels")
    d.add_argument("--quick", action="store_true",
                   help="small subsets everywhere (a smoke run in seconds; numbers are rough)")
    d.add_argument("--no-report", action="store_true",
                   help="skip report.html (print the table and write summary.json only)")
    d.add_argument("--activation", choices=("auto", "softmax", "sigmoid", "none"),
                   default="auto",
                   help="how --models' outputs are read (default auto: a trailing Softmax/"
                        "Sigmoid node or uqseg.activation metadata, else one channel = "
                        "sigmoid, several = softmax)")
    _add_runtime_args(d)

    p = sub.add_parser(
        "predict", help="segment NIfTI / NumPy / DICOM images with uncertainty maps",
        usage="uqseg predict MODEL.onnx [MODEL.onnx ...] INPUT [INPUT ...] --out DIR [options]"
              "\n       uqseg predict --models {zoo,3d} INPUT [INPUT ...] --out DIR [options]",
        description="Segment images with one or more ONNX models (an ensemble). Writes, per "
                    "input, <name>_seg.nii.gz (uint8 labels), <name>_proba.nii.gz (float32, "
                    "classes on the 4th axis), <name>_entropy.nii.gz and, with several samples, "
                    "<name>_mi.nii.gz (mutual information), all with the input's affine, "
                    "plus <name>_scores.json (with OOD and quality scores when --estimators "
                    "are given). Everything is checked before anything is written; existing "
                    "outputs are kept unless --overwrite; a failure leaves --out unchanged.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="one or more ONNX models (*.onnx), then one or more inputs: "
                        ".nii/.nii.gz, .npy/.npz (key 'image', optional 'affine') or a folder "
                        "with one DICOM series")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--models", metavar="NAME",
                   help="use shipped models instead of MODEL.onnx paths: 'zoo' (the 2-D "
                        "ensemble) or '3d' (the 3-D U-Net member, whole volumes); every PATH "
                        "is then an input")
    p.add_argument("--estimators", nargs="+", type=Path, default=[], metavar="SAVED_DIR",
                   help="folders written by uqseg.save: OOD detectors and quality regressors "
                        "scored on the same (normalised) images")
    p.add_argument("--risk", choices=("fnr", "fdr", "dice", "volume"),
                   help="with a saved ConformalRiskController in --estimators: the risk to "
                        "control (default: as saved); its thresholds are chosen again from "
                        "the stored calibration statistics and its masks written to "
                        "<name>_<folder>_mask.nii.gz")
    p.add_argument("--alpha", type=_open_unit, metavar="A",
                   help="risk level in (0, 1) for --risk (default: as saved)")
    p.add_argument("--delta", type=_open_unit, metavar="D",
                   help="Learn-then-Test: the risk is <= alpha with probability >= 1 - D "
                        "(needed for --risk dice/volume; default: as saved)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (default: refuse and write nothing)")
    p.add_argument("--tta", action="store_true", help="test-time flips (every spatial axis)")
    p.add_argument("--activation", choices=("auto", "softmax", "sigmoid", "none"),
                   default="auto",
                   help="how the models' outputs are read (default auto: a trailing Softmax/"
                        "Sigmoid node or uqseg.activation metadata, else one channel = "
                        "sigmoid, several = softmax)")
    p.add_argument("--mc-samples", type=_non_negative_int, default=0, metavar="N",
                   help="MC-dropout passes for members exported with an mc_mask input")
    p.add_argument("--axis", type=int, default=None, choices=(0, 1, 2),
                   help="slice axis when a 3-D volume goes through a 2-D model without a "
                        "preprocessing description (default 2)")
    p.add_argument("--no-normalize", action="store_true",
                   help="skip uqseg.datasets.normalize_intensity (1st-99th percentile to [0, 1] "
                        "per model input image; models without a preprocessing description)")
    p.add_argument("--no-preprocess", action="store_true",
                   help="ignore the models' preprocessing description (uqseg.preprocessing "
                        "metadata) and feed the voxels as stored, slice by slice along --axis")
    p.add_argument("--spacing", type=_positive_float, nargs=3, metavar=("SX", "SY", "SZ"),
                   help="voxel size in mm of NumPy inputs stored without an affine (needed "
                        "by a preprocessing description; axes taken as R, A, S)")
    _add_runtime_args(p)

    b = sub.add_parser(
        "bench", help="run the benchmark suite (benchmarks/run_all.py of a source checkout)",
        description="Run benchmarks/run_all.py from the uqseg source tree; every argument "
                    "after `bench` is passed on to it (try `uqseg bench -- --help`).",
        add_help=True)
    b.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="arguments for benchmarks/run_all.py")

    t = sub.add_parser(
        "train", help="train a U-Net and export it to ONNX (needs uqseg[train])",
        description="Train a U-Net (uqseg.training.UNet + fit_segmenter) on the embedded "
                    "brain-tissue data or on your own images, then export it with "
                    "uqseg.training.export_onnx. Needs torch: pip install 'uqseg[train]'.")
    t.add_argument("--images", nargs="+", type=Path, metavar="FILE",
                   help="training images (.nii/.nii.gz/.npy/.npz; 2-D, or 3-D volumes cut "
                        "into slices along --axis for --dims 2). Default: the embedded data")
    t.add_argument("--labels", nargs="+", type=Path, metavar="FILE",
                   help="label files matching --images, in the same order")
    t.add_argument("--axis", type=int, default=2, choices=(0, 1, 2),
                   help="slice axis of 3-D files for a 2-D network (default 2)")
    t.add_argument("--dims", type=int, choices=(2, 3), default=2, help="2-D or 3-D U-Net")
    t.add_argument("--loss", choices=("dice", "ce", "dice_ce"), default="dice_ce",
                   help="training loss (default dice_ce)")
    t.add_argument("--epochs", type=_positive_int, default=10)
    t.add_argument("--width", type=_positive_int, default=8, help="first-level channels")
    t.add_argument("--depth", type=_positive_int, default=4, help="resolution levels (>= 2)")
    t.add_argument("--dropout", type=_probability, default=0.0,
                   help="channel dropout; > 0 exports an mc_mask input for MC dropout")
    t.add_argument("--batch-size", type=_positive_int, default=8)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda")
    t.add_argument("--out", type=Path, default=Path("model.onnx"), help="output ONNX file")
    t.add_argument("--save-checkpoint", type=Path, metavar="FILE.pt",
                   help="also save the torch state_dict (+ FILE.json with the config) for "
                        "`uqseg export`")
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser(
        "export", help="export a checkpoint of `uqseg train` to ONNX (needs uqseg[train])",
        description="Rebuild the U-Net from CHECKPOINT.json (written next to the checkpoint "
                    "by `uqseg train --save-checkpoint`), load the state_dict and export it "
                    "with uqseg.training.export_onnx.")
    e.add_argument("checkpoint", type=Path, help="the .pt state_dict")
    e.add_argument("--config", type=Path,
                   help="config JSON (default: the checkpoint path with .json)")
    e.add_argument("--out", type=Path, default=Path("model.onnx"), help="output ONNX file")
    e.add_argument("--opset", type=_positive_int, default=18)
    e.add_argument("--fixed-size", action="store_true",
                   help="export fixed spatial axes instead of dynamic ones")

    i = sub.add_parser(
        "inspect", help="what uqseg sees in an ONNX model; write its uqseg.* metadata",
        description="Print the inputs, outputs, activation, class count, spatial divisor, "
                    "feature layers (named, and found by structure, with shapes) and what each "
                    "estimator uses by default. With --set KEY=VALUE (repeatable) write a copy "
                    "(--out) whose uqseg.* metadata says so; graph and weights are untouched "
                    "and the copy is written only when the metadata validates.")
    i.add_argument("model", type=Path, help="the ONNX file")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="activation=softmax|sigmoid|none, n_classes=K, spatial_divisor=D, "
                        "feature_layers='[\"a\", \"b\"]', preprocessing='{...}' (JSON), "
                        "mc_dropout='{\"input\": \"mc_mask\", \"p\": 0.1, \"size\": 64}'")
    i.add_argument("--out", type=Path, help="where --set writes the copy")
    i.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


# ---------------------------------------------------------------------- commands
def _cmd_demo(args) -> int:
    from uqseg import demo

    for m in args.models or []:
        if not Path(m).is_file():
            raise UsageError(f"model {m!r} does not exist")
    demo.run_demo(out=args.out, models=args.models, quick=args.quick, backend=args.backend,
                  device=args.device, batch_size=args.batch_size,
                  progress=not args.no_progress, report=not args.no_report,
                  activation=args.activation)
    return EXIT_OK


def _cmd_predict(args) -> int:
    from uqseg._predict import plan_predict, run_predict

    n_models = next((i for i, p in enumerate(args.paths) if not p.lower().endswith(".onnx")),
                    len(args.paths))
    models, inputs = args.paths[:n_models], args.paths[n_models:]
    if args.models is not None:
        if models:
            raise UsageError(f"--models {args.models} and MODEL.onnx paths ({models[0]!r}) "
                             "both name the models: give one of them")
        models = _shipped_models(args.models)
        if not inputs:
            raise UsageError("give at least one INPUT after --models NAME")
    if not models or not inputs:
        raise UsageError("give at least one MODEL.onnx and one INPUT (models first)")
    late = [p for p in inputs if p.lower().endswith(".onnx")]
    if late:
        raise UsageError(f"models must come before the inputs, got {late} after "
                         f"{inputs[0]!r}")
    plan = plan_predict(models, inputs, args.out, estimators=args.estimators,
                        overwrite=args.overwrite, risk=args.risk, alpha=args.alpha,
                        delta=args.delta)
    written = run_predict(
        plan, tta=args.tta, mc_samples=args.mc_samples, axis=args.axis,
        normalize=not args.no_normalize, backend=args.backend, device=args.device,
        batch_size=args.batch_size, progress=not args.no_progress,
        preprocess=not args.no_preprocess, spacing=args.spacing, activation=args.activation)
    for path in written:
        print(path)
    return EXIT_OK


#: ``predict --models NAME``: the shipped model sets (``datasets.reference_models(dims)``)
SHIPPED_MODELS = {"zoo": 2, "3d": 3}


def _shipped_models(name: str) -> list[str]:
    from uqseg.datasets import reference_models

    if name not in SHIPPED_MODELS:
        raise UsageError(f"--models must name a shipped model set: 'zoo' (the 2-D ensemble) or "
                         f"'3d' (the 3-D U-Net member), got {name!r}; for your own models give "
                         "their .onnx paths before the inputs")
    return reference_models(dims=SHIPPED_MODELS[name])


BENCH_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "run_all.py"


def _repo_benchmarks() -> Path | None:
    return BENCH_SCRIPT if BENCH_SCRIPT.is_file() else None


def _cmd_bench(args) -> int:
    script = _repo_benchmarks()
    if script is None:
        print(f"uqseg bench: error: {BENCH_SCRIPT} not found. The benchmark suite lives in the "
              "uqseg source repository, not in the installed package: clone the repository, "
              "run `pip install -e .` there, then `uqseg bench`.", file=sys.stderr)
        return EXIT_FAILURE
    bench_args = list(args.bench_args)
    if bench_args[:1] == ["--"]:
        bench_args = bench_args[1:]
    sys.path.insert(0, str(script.parent))  # the scripts import their shared helpers
    try:
        spec = importlib.util.spec_from_file_location("uqseg_benchmarks_run_all", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "main"):
            raise RuntimeError(f"{script} defines no main(argv)")
        result = module.main(bench_args)
    finally:
        sys.path.remove(str(script.parent))
    return result if isinstance(result, int) else EXIT_OK


def _training():
    try:
        import uqseg.training  # noqa: F401 - raises without torch, first
        from uqseg.training import commands
    except ImportError as exc:
        raise RuntimeError(
            f"this command needs torch: pip install 'uqseg[train]' ({exc})") from exc
    return commands


def _load_training_files(images, labels, dims, axis):
    import numpy as np

    from uqseg.io import read_image

    if labels is None or len(labels) != len(images):
        raise UsageError("--labels must list one label file per --images file")
    xs, ys = [], []
    for fi, fl in zip(images, labels, strict=True):
        for f in (fi, fl):
            if not f.exists():
                raise UsageError(f"{str(f)!r} does not exist")
        x = read_image(fi).data.astype(np.float32)
        y = read_image(fl).data
        if x.shape != y.shape:
            raise ValueError(f"{fi} has shape {x.shape} but {fl} has {y.shape}")
        if dims == 2 and x.ndim == 3:
            xs += list(np.moveaxis(x, axis, 0))
            ys += list(np.moveaxis(y, axis, 0))
        elif x.ndim == dims:
            xs.append(x)
            ys.append(y)
        else:
            raise ValueError(f"{fi}: a {x.ndim}-D image cannot train a {dims}-D network")
    if len({x.shape for x in xs}) > 1:
        raise ValueError("training images must all have the same size")
    from uqseg.datasets import normalize_intensity

    X = normalize_intensity(np.stack(xs)[:, None])
    return X, np.stack(ys).astype(np.int64)


def _cmd_train(args) -> int:
    if args.depth < 2:
        raise UsageError("--depth must be at least 2")
    if args.images is None and args.labels is not None:
        raise UsageError("--labels needs --images")
    commands = _training()
    if args.images is None:
        from uqseg.datasets import load_brain_tissue

        if args.dims != 2:
            raise UsageError("the embedded data are 2-D slices: use --dims 2 or give --images")
        X, y = load_brain_tissue("train")
        X_val, y_val = load_brain_tissue("val")
        source = "embedded brain_tissue"
    else:
        X, y = _load_training_files(args.images, args.labels, args.dims, args.axis)
        n_val = len(X) // 5  # the first fifth validates (early stopping); none when < 5
        X_val, y_val = (X[:n_val], y[:n_val]) if n_val else (None, None)
        X, y = X[n_val:], y[n_val:]
        source = f"{len(args.images)} file(s)"
    n_classes = int(max(y.max(), 1 if y_val is None else y_val.max())) + 1
    config = {"in_channels": int(X.shape[1]), "n_classes": n_classes, "dims": args.dims,
              "width": args.width, "depth": args.depth, "dropout": args.dropout,
              "example_shape": [1, *map(int, X.shape[1:])]}
    print(f"training on {source}: {X.shape[0]} images of {X.shape[2:]}, {n_classes} classes",
          file=sys.stderr)
    model, hist = commands.train_unet(
        config, X, y, X_val, y_val, loss=args.loss, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
        progress=not args.no_progress, checkpoint=args.save_checkpoint)
    if args.save_checkpoint:
        print(args.save_checkpoint)
    best = hist.get("best_val_dice") if isinstance(hist, dict) else None
    report = commands.export_unet(model, config, args.out, opset=18, dynamic=True,
                                  info={"loss": args.loss, "epochs": args.epochs,
                                        "seed": args.seed, "source": source,
                                        "best_val_dice": best})
    print(report["path"])
    return EXIT_OK


def _cmd_export(args) -> int:
    if not args.checkpoint.is_file():
        raise UsageError(f"checkpoint {str(args.checkpoint)!r} does not exist")
    cfg_path = args.config or args.checkpoint.with_suffix(".json")
    if not cfg_path.is_file():
        raise UsageError(f"config {str(cfg_path)!r} does not exist (written by "
                         "`uqseg train --save-checkpoint`; pass --config)")
    config = json.loads(cfg_path.read_text())
    commands = _training()
    missing = [k for k in commands.CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"{cfg_path}: config lacks {missing}")
    model = commands.load_unet(args.checkpoint, config)
    report = commands.export_unet(model, config, args.out, opset=args.opset,
                                  dynamic=not args.fixed_size,
                                  info={"checkpoint": str(args.checkpoint)})
    print(report["path"])
    return EXIT_OK


def _cmd_inspect(args) -> int:
    from uqseg import _inspect

    if not args.model.is_file():
        raise UsageError(f"model {str(args.model)!r} does not exist")
    path = args.model
    if args.set:
        if args.out is None:
            raise UsageError("--set writes a copy: pass --out NEW.onnx")
        try:
            settings = _inspect.parse_settings(args.set)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        path = _inspect.write_metadata(args.model, settings, args.out,
                                       overwrite=args.overwrite)
    elif args.out is not None:
        raise UsageError("--out is for --set")
    info = _inspect.inspect_model(path)
    print(json.dumps(info, indent=2) if args.json else _inspect.format_report(info))
    if args.set:
        print(f"wrote {path}", file=sys.stderr)
    return EXIT_OK


COMMANDS = {"demo": _cmd_demo, "predict": _cmd_predict, "bench": _cmd_bench,
            "train": _cmd_train, "export": _cmd_export, "inspect": _cmd_inspect}


def main(argv: list[str] | None = None) -> int:
    """Run ``uqseg`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    # exits 2 on a usage error, 0 for --help / --version; `bench` passes unknown options on
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = [*extra, *args.bench_args]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        if args.debug:
            raise
        return _fail(args.command, str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted", EXIT_FAILURE)
    except Exception as exc:
        if args.debug or not _expected(exc):
            raise
        return _fail(args.command, str(exc) or type(exc).__name__, EXIT_FAILURE)

if __name__ == "__main__":
    raise SystemExit(main())
