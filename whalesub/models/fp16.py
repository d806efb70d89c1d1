"""Mixed-precision ONNX: the backbone in FP16, GeM + neck + L2 normalisation in FP32.

Why not an all-FP16 graph: GeM cubes the activations (``x.clamp(eps) ** p``) and the cube of
anything above ~40 overflows FP16 (max 65504); the L2 normalisation's sum of squares has the
same problem. Why not ``onnxconverter_common.float16`` with a block list: its casts around
blocked nodes round the FP32 tail through FP16 anyway and, with ``keep_io_types``, still emit
an FP16 output (onnxconverter-common 1.16), so this module converts the graph itself:

- the backbone, found by data flow (every node upstream of the ``/pool/...`` nodes that the
  TorchScript exporter names after EmbeddingNet's ``pool`` module), computes in FP16: its FLOAT
  initializers, ``Constant`` values and ``Cast(to=FLOAT)`` targets become FLOAT16 (an
  initializer shared with the FP32 tail is duplicated);
- every FLOAT tensor entering the backbone from outside gets one ``Cast`` to FP16, every FP16
  tensor leaving it one ``Cast`` back to FP32, so graph inputs and outputs stay FP32.

ONNX Runtime's CPU provider lacks FP16 kernels for most ops and silently inserts casts to FP32,
so on CPU only :func:`check_fp16_structure` is meaningful; FP16 numerics need the CUDA provider.
"""

from __future__ import annotations

import numpy as np

# (op_type, input index) pairs that must stay FLOAT even inside the FP16 part (sizes/scales).
_KEEP_FLOAT_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


def pool_prefix(name: str = "pool") -> str:
    """Node-name prefix the TorchScript exporter gives the submodule ``name`` (``/pool/``)."""
    return "/" + name.strip("/").replace(".", "/") + "/"


def backbone_nodes(model, tail_prefix: str = "/pool/") -> set[int]:
    """Indices of the nodes that feed the pooling: every ancestor of a node named ``tail_prefix...``.

    The backbone is found by data flow, not by name: timm's ``forward_features`` is not a module
    call, so its nodes carry no ``/backbone/`` scope, but the pooling module's nodes do.
    Raises ValueError when no node is named with ``tail_prefix``.
    """
    import re

    g = model.graph
    producer = {out: i for i, n in enumerate(g.node) for out in n.output}
    # a module called twice (GeM over the last two stages) gets scopes /pool/ and /pool_1/
    scope = re.compile(re.escape(tail_prefix.rstrip("/")) + r"(_\d+)?/")
    tail = [i for i, n in enumerate(g.node) if scope.match(n.name)]
    if not tail:
        raise ValueError(f"no ONNX node is named {tail_prefix}...: cannot find where the pooling starts")
    tail_set, seen = set(tail), set()
    stack = [producer[x] for i in tail for x in g.node[i].input if x in producer]
    while stack:
        i = stack.pop()
        if i in seen or i in tail_set:
            continue
        seen.add(i)
        stack.extend(producer[x] for x in g.node[i].input if x in producer)
    return seen


def _float_types(model) -> dict[str, int]:
    """Element type of every named tensor in ``model`` (inputs, initializers, node outputs)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    return types


def convert_backbone_to_fp16(model, tail_prefix: str = "/pool/"):
    """Return a copy of ``model`` (onnx.ModelProto, FP32) whose backbone (see :func:`backbone_nodes`)
    runs in FP16 while the pooling, neck and normalisation stay FP32. Inputs and outputs stay FP32.
    """
    return convert_to_fp16(model, backbone_nodes(model, tail_prefix), "the backbone")


def convert_to_fp16(model, fp16_nodes: set[int], label: str = "the FP16 part"):
    """Like :func:`convert_backbone_to_fp16` for the nodes of the given indices into ``graph.node``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    src = model
    types = _float_types(src)
    g = src.graph
    fp16 = [i in fp16_nodes for i in range(len(g.node))]
    if not any(fp16):
        raise ValueError(f"no ONNX node belongs to {label!r}: cannot find the backbone to convert")
    for i in float_parameter_nodes(g):  # Resize scales and the Constants computing them stay FP32
        fp16[i] = False
    consumers: dict[str, set[bool]] = {}  # tensor -> {does an FP16 slot read it?}
    for node, half in zip(g.node, fp16, strict=True):
        for i, name in enumerate(node.input):
            consumers.setdefault(name, set()).add(half and (node.op_type, i) not in _KEEP_FLOAT_INPUTS)
    produced_half = {out for node, half in zip(g.node, fp16, strict=True) if half for out in node.output}

    new_inits, new_nodes = [], []
    init_fp16: dict[str, str] = {}  # FLOAT initializer name -> its FP16 copy
    to_half: dict[str, str] = {}  # FP32 tensor name -> FP16 cast of it
    to_float: dict[str, str] = {}  # FP16 tensor name -> FP32 cast of it

    for init in g.initializer:
        shared = consumers.get(init.name, set())
        if init.data_type == TensorProto.FLOAT and True in shared:
            arr = numpy_helper.to_array(init).astype(np.float16)
            name = init.name if shared == {True} else init.name + "__fp16"
            new_inits.append(numpy_helper.from_array(arr, name))
            init_fp16[init.name] = name
            if False in shared:
                new_inits.append(init)
        else:
            new_inits.append(init)

    def half_input(name: str) -> str:
        if name in init_fp16:
            return init_fp16[name]
        if name in produced_half or types.get(name) != TensorProto.FLOAT:
            return name
        if name not in to_half:
            to_half[name] = name + "__to_fp16"
            new_nodes.append(helper.make_node("Cast", [name], [to_half[name]], to=TensorProto.FLOAT16,
                                              name=f"__fp16_cast/{len(to_half)}"))
        return to_half[name]

    def float_input(name: str) -> str:
        if name not in produced_half or types.get(name) != TensorProto.FLOAT:
            return name
        if name not in to_float:
            to_float[name] = name + "__to_fp32"
            cast_name = f"__fp32_cast/{len(to_float)}"
            new_nodes.append(helper.make_node("Cast", [name], [to_float[name]], to=TensorProto.FLOAT,
                                              name=cast_name))
        return to_float[name]

    for node, half in zip(g.node, fp16, strict=True):
        node = _copy(node)
        for i, name in enumerate(node.input):
            if not name:
                continue
            if half and (node.op_type, i) in _KEEP_FLOAT_INPUTS:
                node.input[i] = float_input(name)
            else:
                node.input[i] = half_input(name) if half else float_input(name)
        if half:
            _retype_attributes(node)
        new_nodes.append(node)

    outputs = []
    for out in g.output:
        if out.name in produced_half and types.get(out.name) == TensorProto.FLOAT:
            raise ValueError(f"graph output {out.name!r} is produced inside {label!r}; keep the tail FP32")
        outputs.append(out)
    graph = helper.make_graph(new_nodes, g.name, list(g.input), outputs, new_inits)
    converted = helper.make_model(graph, opset_imports=list(src.opset_import), producer_name="whalesub")
    converted.ir_version = src.ir_version
    onnx.checker.check_model(converted)
    return onnx.shape_inference.infer_shapes(converted, strict_mode=True)


def float_parameter_nodes(graph) -> set[int]:
    """Indices of the nodes that only compute FLOAT parameters (Resize/Upsample scales and roi).

    A node belongs here when every consumer of each of its outputs is a keep-FLOAT input slot
    (:data:`_KEEP_FLOAT_INPUTS`) or another node of the set: the ``Constant`` holding a scale of
    1.1, or a small ``Mul``/``Div`` chain computing it. Rounding such a value to FP16 (1.1 ->
    1.0996) changes the output size, and an FP16 scales tensor is invalid ONNX.
    """
    consumers: dict[str, list[tuple[int, int]]] = {}
    for j, node in enumerate(graph.node):
        for k, name in enumerate(node.input):
            consumers.setdefault(name, []).append((j, k))
    graph_outputs = {o.name for o in graph.output}
    keep: set[int] = set()
    changed = True
    while changed:  # grows upwards from the keep-FLOAT slots until nothing changes
        changed = False
        for i, node in enumerate(graph.node):
            if i in keep or not node.output or any(o in graph_outputs for o in node.output):
                continue
            uses = [c for o in node.output for c in consumers.get(o, [])]
            if uses and all((graph.node[j].op_type, k) in _KEEP_FLOAT_INPUTS or j in keep for j, k in uses):
                keep.add(i)
                changed = True
    return keep


def _copy(node):
    from onnx import NodeProto

    out = NodeProto()
    out.CopyFrom(node)
    return out


def _retype_attributes(node) -> None:
    """FLOAT Constant values and Cast(to=FLOAT) targets of an FP16 node become FLOAT16."""
    from onnx import TensorProto, numpy_helper

    for attr in node.attribute:
        if attr.name == "to" and node.op_type == "Cast" and attr.i == TensorProto.FLOAT:
            attr.i = TensorProto.FLOAT16
        elif attr.type == attr.TENSOR and attr.t.data_type == TensorProto.FLOAT:
            arr = numpy_helper.to_array(attr.t).astype(np.float16)
            attr.t.CopyFrom(numpy_helper.from_array(arr, attr.t.name))


def check_fp16_structure(model, tail_prefix: str = "/pool/") -> dict:
    """Inspect a converted graph; return counts and raise ValueError listing every violation.

    Checks: graph inputs and outputs are FLOAT; every FLOAT/FLOAT16 initializer consumed only
    by backbone nodes is FLOAT16 and at least one exists; every node outside the backbone
    (GeM, neck, normalisation) reads and writes no FLOAT16 tensor except the boundary Casts.
    """
    from onnx import TensorProto

    g = model.graph
    types = _float_types(model)
    problems = []
    for vi in list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type != TensorProto.FLOAT:
            problems.append(f"graph input/output {vi.name!r} is not FLOAT")
    half_inits = sum(1 for i in g.initializer if i.data_type == TensorProto.FLOAT16)
    if half_inits == 0:
        problems.append("no FLOAT16 initializer: the backbone weights were not converted")
    backbone_float_weights, tail_nodes = [], 0
    init_names = {i.name: i.data_type for i in g.initializer}
    inside_set = backbone_nodes(model, tail_prefix)
    for i, node in enumerate(g.node):
        inside = i in inside_set
        if inside:
            backbone_float_weights += [n for n in node.input if init_names.get(n) == TensorProto.FLOAT
                                       and node.op_type not in {"Resize", "Upsample"}]
            continue
        if node.op_type == "Cast":
            continue
        tail_nodes += 1
        halves = [n for n in list(node.input) + list(node.output) if types.get(n) == TensorProto.FLOAT16]
        if halves:
            problems.append(f"tail node {node.name!r} ({node.op_type}) touches FLOAT16 tensors {halves[:3]}")
    if backbone_float_weights:
        problems.append(f"backbone weights left FLOAT: {backbone_float_weights[:3]}")
    if problems:
        raise ValueError("FP16 graph breaks the mixed-precision layout:\n  - " + "\n  - ".join(problems))
    return {"fp16_initializers": half_inits, "fp32_tail_nodes": tail_nodes}
