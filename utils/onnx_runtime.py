"""ONNX files at run time: the one place that opens an ONNX Runtime session, and the metadata helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from utils.device import onnx_providers
from utils.errors import UserError


def create_session(path: str | Path | bytes, device: str = "cpu", threads: int = 0, *, inter_op_threads: int = 0,
                   what: str = "ONNX model", missing_hint: str = "export it with quantize_onnx_models.py",
                   warn_no_cuda: bool = True, profile_prefix: str = "", optimize: bool = True) -> Any:
    """An ``onnxruntime.InferenceSession`` on ``device`` ("cpu" or "cuda", which falls back to the CPU with one
    warning when this onnxruntime has no CUDA provider); ``threads`` 0 = ONNX Runtime's default (all cores).

    ``optimize=False`` runs the graph node by node as written: a QDQ file's QuantizeLinear, DequantizeLinear and
    float operators instead of the fused INT8 kernels, i.e. what the file means on any CPU, bar float rounding.

    ``path`` may also be a serialized model (bytes). A missing or unloadable file is a one-line error naming ``what``,
    the file and ``missing_hint``."""
    import onnxruntime as ort

    source = path if isinstance(path, bytes) else str(path)
    if not isinstance(path, bytes) and not Path(path).is_file():
        raise UserError(f"{what} {path} not found; {missing_hint}")
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if inter_op_threads:
        options.inter_op_num_threads = inter_op_threads
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    try:
        return ort.InferenceSession(source, options, providers=onnx_providers(device, warn=warn_no_cuda))
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
        name = "(in-memory model)" if isinstance(path, bytes) else path
        raise UserError(f"cannot load {what} {name}: {str(err).splitlines()[0]}") from err


def session_with_outputs(model: Any, names: Iterable[str]) -> Any:
    """A CPU session of a loaded ONNX model that also returns the named intermediate tensors (each made a graph
    output of a copy: the caller's graph keeps its outputs). The graph input is not an output; feed it back
    yourself where a name refers to it."""
    import copy

    import onnx

    model = copy.deepcopy(model)
    inputs = {i.name for i in model.graph.input}
    present = {o.name for o in model.graph.output}
    for name in dict.fromkeys(names):
        if name not in present and name not in inputs:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return create_session(model.SerializeToString(), "cpu")


def node_attribute(node: Any, name: str, default: Any) -> Any:
    """The value of an ONNX node's attribute ``name``, or ``default`` where the node does not set it."""
    import onnx

    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an ONNX file, or of an ORT-format file (quantize_onnx_models.py --targets ort), which
    only ONNX Runtime reads."""
    import onnx

    if Path(path).suffix.lower() == ".ort":
        return dict(create_session(path, what="ORT-format model").get_modelmeta().custom_metadata_map)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # DecodeError for a truncated or corrupt file, OSError for an unreadable one
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load ONNX model {path} ({first_line}); export it again with "
                        f"quantize_onnx_models.py") from err
    return {p.key: p.value for p in model.metadata_props}


def write_onnx_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    """Replace the file's metadata_props with ``metadata``."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def check_onnx_model(path: str | Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:  # onnx raises ValidationError and others
        raise UserError(f"exported ONNX model failed onnx.checker: {str(err).splitlines()[0]}") from err
