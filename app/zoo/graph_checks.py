"""What a TorchScript or ONNX expert may compute, checked before it ever runs.

TorchScript's interpreter runs no Python, but it is no sandbox: ``torch.from_file`` opens (and
with ``shared=True`` creates) any path the module names, and a module's ``__setstate__`` runs
while ``torch.jit.load`` reads the archive. So a TorchScript expert is accepted only when

- its archive defines no ``__setstate__`` (checked on the zip, before anything loads), and
- every node of every method of every submodule, with calls inlined and nested blocks walked,
  is one of the known pure operators of ``app.zoo.pure_operators`` (an allow-list: an operator
  not on it is refused by name, however harmless it may be).

An ONNX expert is accepted only when every node (in the main graph, in branches and loop
bodies, and in the model's own functions) is of the standard domains ``ai.onnx`` and
``ai.onnx.ml`` or calls one of the model's own functions, and no tensor is kept as external
data: a stored model is one file, and a path it names would reach some other file.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from app.task2vec.errors import ProbeWeightsError
from app.zoo.pure_operators import PURE_OPERATORS

#: The bytes of a TorchScript archive's code that could run at load time.
_ON_LOAD = b"__setstate__"
#: Tensor storages of an archive (``<root>/data/<n>``): numbers, never code.
_STORAGE = re.compile(r"^[^/]+/data/\d+$")
#: The most code an archive may hold (its tensors are not counted).
_MAX_CODE_BYTES = 64 * 2**20
#: The ONNX operator domains whose operators read and write only tensors.
ONNX_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


def _refuse(name: str, why: str) -> ProbeWeightsError:
    return ProbeWeightsError(f"expert {name!r}: {why}")


# --------------------------------------------------------------------------------------------
# TorchScript


def check_torchscript_archive(name: str, path: Path) -> None:
    """Refuse an archive that would run its own code while ``torch.jit.load`` reads it, before
    it is loaded. A file that is no zip is left to the loader, which refuses it."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return
    with archive:
        names = archive.namelist()
        if len(names) != len(set(names)):
            raise _refuse(name, "a TorchScript archive names one member twice")
        left = _MAX_CODE_BYTES
        for info in archive.infolist():
            if _STORAGE.match(info.filename) or info.is_dir():
                continue
            with archive.open(info) as member:
                text = member.read(left + 1)
            left -= len(text)
            if left < 0:
                raise _refuse(name, "a TorchScript archive with more code than the limit")
            if _ON_LOAD in text:
                raise _refuse(
                    name,
                    "a TorchScript module that runs its own code while it loads (__setstate__) "
                    "is not accepted",
                )


def _kinds(block: Any) -> Iterator[str]:
    for node in block.nodes():
        yield node.kind()
        for inner in node.blocks():
            yield from _kinds(inner)


def operators(module: torch.jit.ScriptModule) -> set[str]:
    """Every operator that any method or forward hook of ``module`` or of its submodules can
    run, calls inlined, nested blocks included."""
    found: set[str] = set()
    for _, sub in module.named_modules():
        own = sub._c  # a loaded module: every submodule is a script module
        graphs = [own._get_method(method).graph for method in own._method_names()]
        hooks = [*own._get_forward_pre_hooks(), *own._get_forward_hooks()]  # run around forward
        for graph in [*graphs, *(hook.graph for hook in hooks)]:
            inlined = graph.copy()
            torch._C._jit_pass_inline(inlined)
            found.update(_kinds(inlined))
    return found


def check_torchscript(name: str, module: torch.nn.Module) -> None:
    """Refuse a module that uses any operator but the known pure ones, naming them."""
    if not isinstance(module, torch.jit.ScriptModule):
        raise _refuse(name, "not a TorchScript module")
    others = sorted(operators(module) - PURE_OPERATORS)
    if others:
        shown = ", ".join(others[:8]) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
        raise _refuse(
            name,
            f"the TorchScript module uses operator{'s' if len(others) > 1 else ''} {shown}, "
            "not on the list of pure tensor operators an expert may use (files, I/O and other "
            "side effects are refused)",
        )


# --------------------------------------------------------------------------------------------
# ONNX


def _nested(nodes: Iterable[Any]) -> Iterator[Any]:
    """Every graph nested in the nodes' attributes (branches, loop bodies), at any depth."""
    for node in nodes:
        for attribute in node.attribute:
            for inner in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                yield inner
                yield from _nested(inner.node)


def _attribute_tensors(nodes: Iterable[Any]) -> Iterator[Any]:
    for node in nodes:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            sparse = [*attribute.sparse_tensors]
            if attribute.HasField("sparse_tensor"):
                sparse.append(attribute.sparse_tensor)
            for tensor in sparse:
                yield from (tensor.values, tensor.indices)


def _initializers(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)


def check_onnx(name: str, path: Path) -> None:
    """Refuse a model with an operator outside the standard domains or with external data,
    before onnxruntime reads it. A file that is no ONNX model is left to onnxruntime."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not a protobuf of a model: onnxruntime says why
        return
    own = [n for f in model.functions for n in f.node]
    graphs = [model.graph, *_nested(model.graph.node), *_nested(own)]
    nodes = [*(n for g in graphs for n in g.node), *own]
    functions = {(f.domain, f.name) for f in model.functions}
    for node in nodes:
        if node.domain not in ONNX_DOMAINS and (node.domain, node.op_type) not in functions:
            raise _refuse(
                name,
                f"the ONNX model uses operator {node.op_type!r} of domain {node.domain!r}; only "
                "the standard domains (ai.onnx, ai.onnx.ml) are accepted",
            )
    tensors = [*(t for g in graphs for t in _initializers(g)), *_attribute_tensors(nodes)]
    if any(t.data_location == onnx.TensorProto.EXTERNAL or t.external_data for t in tensors):
        raise _refuse(
            name,
            "the ONNX model keeps tensors as external data (in files it names); save it as one "
            "file with its tensors inside",
        )
