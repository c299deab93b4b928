"""Export trained torch segmentation networks to ONNX following uqseg's conventions.

The file written carries what :class:`uqseg.OnnxSegmenter` reads (see ``docs/internals.md``):
an image input with a dynamic batch axis, an output named ``logits``, optional ``mc_mask``
input for MC dropout, named intermediate feature tensors and ``uqseg.*`` metadata.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

MAX_ABS_DIFF = 1e-3


class _ExportWrapper(nn.Module):
    """Flat signature for the exporter: ``(image[, mc_mask]) -> (logits, *features)``."""

    def __init__(self, model: nn.Module, feature_layers: Sequence[str], use_mask: bool) -> None:
        super().__init__()
        self.model = model
        self.feature_layers = list(feature_layers)
        self.use_mask = use_mask

    def forward(self, image: torch.Tensor, mc_mask: torch.Tensor | None = None):
        if self.feature_layers:
            logits, feats = self.model.forward_features(image, mc_mask)
            return (logits, *[feats[name] for name in self.feature_layers])
        return self.model(image, mc_mask) if self.use_mask else self.model(image)


def _dynamic_shapes(dims: int, divisor: int, use_mask: bool, dynamic_spatial: bool):
    from torch.export import Dim

    batch = Dim("batch", min=1, max=4096)
    image = {0: batch}
    if dynamic_spatial:
        # sizes are multiples of the divisor: stating so lets torch.export prove that the
        # pooled/upsampled skip connections line up for every size
        names = ("depth", "height", "width")[3 - dims :]
        for axis, name in enumerate(names, start=2):
            base = Dim(f"{name}_blocks", min=1, max=4096)
            image[axis] = base * divisor if divisor > 1 else base
    shapes: dict = {"image": image}
    if use_mask:
        shapes["mc_mask"] = {0: batch}
    return shapes


def _run_dynamo(wrapper, args, input_names, output_names, opset, dynamic_shapes):
    with warnings.catch_warnings():
        # exporter-internal chatter (pytree deprecations, axis renaming notes)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*axis name.*", category=UserWarning)
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            verbose=False,
        )
    return program.model_proto


def _ort_outputs(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _node_outputs(proto: onnx.ModelProto) -> set[str]:
    # top-level graph only: tensors inside local functions cannot be exposed as outputs
    return {o for node in proto.graph.node for o in node.output}


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example: torch.Tensor | np.ndarray,
    feature_layers: Sequence[str] | None = None,
    mc_dropout: bool = False,
    opset: int = 18,
    dynamic_spatial: bool = True,
    info: dict | None = None,
    preprocessing=None,
) -> dict:
    """Export a segmentation network to a single ONNX file with uqseg metadata.

    Parameters
    ----------
    model : torch.nn.Module
        Network ``forward(x, mc_mask=None) -> logits``; feature export needs
        ``forward_features(x, mc_mask=None) -> (logits, dict)`` (as :class:`UNet` has).
        It is put in eval mode (and moved to CPU) for the export.
    path : str or path-like
        Output ``.onnx`` file (written only when the round-trip check passes).
    example : tensor or array ``(N, C, *spatial)``
        Example input; used to trace and to compare onnxruntime against torch.
    feature_layers : sequence of str, optional
        Names of intermediate tensors to keep under exactly these names (preferred first),
        e.g. ``["decoder_last", "bottleneck"]``. Stored in ``uqseg.feature_layers``.
    mc_dropout : bool
        Add an ``mc_mask`` input ``(N, D)`` of channel-dropout multipliers (ones = eval).
    opset : int
        ONNX opset.
    dynamic_spatial : bool
        Make spatial axes dynamic (multiples of ``model.spatial_divisor``). If the exporter
        fails with dynamic spatial axes, the spatial size of ``example`` is fixed instead and
        the report says so (``"dynamic_spatial": False``).
    info : dict, optional
        JSON-serialisable free information stored in ``uqseg.info``.
    preprocessing : uqseg.preprocessing.Preprocessing, dict or JSON str, optional
        How scans become this network's inputs; stored (validated) in
        ``uqseg.preprocessing`` so ``uqseg predict`` applies and inverts it.

    Returns
    -------
    dict
        Report: ``path``, ``max_abs_diff`` (onnxruntime vs torch, over all checks),
        ``dynamic_spatial``, ``exporter``, ``inputs``, ``outputs``, ``feature_layers``,
        ``mc_size``, ``size_bytes``, ``opset``.

    Raises
    ------
    ValueError
        On bad arguments, or when onnxruntime's output differs from torch's by more than
        1e-3 (nothing is written then).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    example_t = (
        torch.as_tensor(np.asarray(example, dtype=np.float32))
        if isinstance(example, np.ndarray)
        else example
    )
    if not isinstance(example_t, torch.Tensor) or example_t.dim() not in (4, 5):
        raise ValueError(
            "example must be a float tensor/array of shape (N, C, *spatial) with 2 or 3 "
            f"spatial axes, got {getattr(example, 'shape', type(example).__name__)}"
        )
    example_t = example_t.detach().float().cpu()
    dims = example_t.dim() - 2
    feature_layers = list(feature_layers or [])
    if feature_layers:
        if not hasattr(model, "forward_features"):
            raise ValueError("feature_layers needs a model with forward_features()")
        if len(set(feature_layers)) != len(feature_layers) or any(
            n in ("logits", "image", "mc_mask") for n in feature_layers
        ):
            raise ValueError(f"feature_layers must be unique new names, got {feature_layers}")
    divisor = int(getattr(model, "spatial_divisor", 1))
    if any(s % divisor for s in example_t.shape[2:]):
        raise ValueError(
            f"example spatial shape {tuple(example_t.shape[2:])} must be a multiple of "
            f"spatial_divisor={divisor}"
        )
    mc_size = int(getattr(model, "mc_size", 0))
    if mc_dropout and mc_size == 0:
        raise ValueError("mc_dropout=True needs a model with dropout > 0 (mc_size > 0)")
    info_json = json.dumps(info if info is not None else {})
    prep_json = None
    if preprocessing is not None:
        from uqseg.preprocessing import _as_preprocessing

        prep = _as_preprocessing(preprocessing)
        if (prep.plane is not None) != (dims == 2):
            raise ValueError(f"preprocessing plane={prep.plane!r} does not fit a {dims}-D "
                             "network (2-D networks need a plane, 3-D ones none)")
        prep_json = prep.to_json()

    was_training = model.training
    was_mc = getattr(model, "mc_dropout", None)
    device = next(model.parameters()).device
    model.cpu().eval()
    if was_mc is not None:
        model.mc_dropout = False  # sampling inside the graph would not survive export
    try:
        with torch.no_grad():
            names = getattr(model, "feature_names", None)
            if feature_layers:
                _, feats = model.forward_features(example_t)
                missing = [n for n in feature_layers if n not in feats]
                if missing:
                    raise ValueError(
                        f"feature_layers {missing} not produced by the model; "
                        f"available: {sorted(feats) if names is None else names}"
                    )
            wrapper = _ExportWrapper(model, feature_layers, mc_dropout).eval()
            n = example_t.shape[0]
            gen = torch.Generator().manual_seed(0)
            mask = model.sample_mc_mask(n, generator=gen) if mc_dropout else None
            args = (example_t, mask) if mc_dropout else (example_t,)
            input_names = ["image", "mc_mask"] if mc_dropout else ["image"]
            output_names = ["logits", *feature_layers]
            exporter = "dynamo"
            dyn = dynamic_spatial
            try:
                proto = _run_dynamo(
                    wrapper,
                    args,
                    input_names,
                    output_names,
                    opset,
                    _dynamic_shapes(dims, divisor, mc_dropout, dyn),
                )
            except Exception as exc:  # noqa: BLE001 - any exporter failure: retry fixed
                if not dyn:
                    raise
                warnings.warn(
                    f"dynamic spatial export failed ({type(exc).__name__}: {exc}); "
                    "exporting with the example's fixed spatial size",
                    RuntimeWarning,
                    stacklevel=2,
                )
                dyn = False
                proto = _run_dynamo(
                    wrapper,
                    args,
                    input_names,
                    output_names,
                    opset,
                    _dynamic_shapes(dims, divisor, mc_dropout, False),
                )

            # features stay intermediate tensors, keeping the names the export gave them
            kept = [o for o in proto.graph.output if o.name == "logits"]
            del proto.graph.output[:]
            proto.graph.output.extend(kept)
            produced = _node_outputs(proto)
            lost = [n for n in feature_layers if n not in produced]
            if lost:
                raise RuntimeError(f"feature tensors {lost} are not node outputs after export")

            meta = {
                "uqseg.n_classes": str(int(model(example_t).shape[1])),
                "uqseg.feature_layers": json.dumps(feature_layers),
                "uqseg.spatial_divisor": str(divisor),
                "uqseg.info": info_json,
            }
            if prep_json is not None:
                meta["uqseg.preprocessing"] = prep_json
            if mc_dropout:
                meta["uqseg.mc_dropout"] = json.dumps(
                    {"input": "mc_mask", "p": float(model.dropout), "size": mc_size}
                )
            del proto.metadata_props[:]
            for key, value in meta.items():
                proto.metadata_props.add(key=key, value=value)
            onnx.checker.check_model(proto, full_check=True)

            # round trip: the example (ones mask = eval) and, with MC dropout, a random mask
            checks = [(example_t, None)]
            if mc_dropout:
                checks = [(example_t, torch.ones(n, mc_size)), (example_t, mask)]
            max_diff = 0.0
            for x, m in checks:
                ref = model(x, m) if m is not None else model(x)
                feeds = {"image": x.numpy()}
                if m is not None:
                    feeds["mc_mask"] = m.numpy().astype(np.float32)
                out = _ort_outputs(proto, feeds)[0]
                if out.shape != tuple(ref.shape):
                    raise ValueError(
                        f"onnxruntime output shape {out.shape} != torch {tuple(ref.shape)}"
                    )
                max_diff = max(max_diff, float(np.max(np.abs(out - ref.numpy()))))
            if not max_diff <= MAX_ABS_DIFF:
                raise ValueError(
                    f"exported model disagrees with torch: max abs diff {max_diff:.3g} > "
                    f"{MAX_ABS_DIFF:g}; nothing written to {os.fspath(path)!r}"
                )
    finally:
        model.to(device).train(was_training)
        if was_mc is not None:
            model.mc_dropout = was_mc

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, os.fspath(path), save_as_external_data=False)
    return {
        "path": os.fspath(path),
        "max_abs_diff": max_diff,
        "dynamic_spatial": dyn,
        "exporter": exporter,
        "opset": opset,
        "inputs": [i.name for i in proto.graph.input],
        "outputs": [o.name for o in proto.graph.output],
        "feature_layers": feature_layers,
        "mc_size": mc_size if mc_dropout else 0,
        "size_bytes": path.stat().st_size,
    }


__all__ = ["export_onnx"]
