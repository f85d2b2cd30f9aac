"""TorchScript and ONNX experts are checked before they run: a TorchScript module may use only
operators known to be pure (no files, no I/O) and may run no code while it loads; an ONNX model
only the standard operator domains and no tensor data kept outside its own file. The zoo's own
kinds of models and those a team exports from torchvision still pass."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from app.task2vec.errors import ProbeWeightsError
from app.zoo import graph_checks
from app.zoo.experts import ExpertSpec, SmallCNN, SmallMLP, load_expert
from app.zoo.features import load_checked
from app.zoo.zoo import Zoo
from tests.hostile_models import (
    Creates,
    OnLoad,
    Reads,
    Wraps,
    custom_domain_onnx,
    hooked,
    scripted_bytes,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning"
)


def _scripted(module: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def _spec(architecture: str, path: Path, size: int = 8) -> ExpertSpec:
    return ExpertSpec(name="probed", architecture=architecture, weights=str(path), input_size=size)


def test_a_module_that_maps_a_file_is_refused_before_it_runs(tmp_path: Path) -> None:
    target = tmp_path / "created.bin"
    path = _scripted(Wraps(Creates(str(target))), tmp_path / "creates.pt")
    with pytest.raises(ProbeWeightsError, match=r"aten::from_file") as refused:
        load_checked(_spec("torchscript", path))
    assert "operator" in str(refused.value)
    assert not target.exists()


def test_a_forward_hook_that_maps_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "hooked.bin"
    path = tmp_path / "hooked.pt"
    path.write_bytes(scripted_bytes(hooked(str(target))))
    with pytest.raises(ProbeWeightsError, match=r"aten::from_file"):
        load_checked(_spec("torchscript", path))
    assert not target.exists()


def test_a_module_that_reads_a_file_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"root:x:0:0")
    path = _scripted(Reads(str(secret), 10), tmp_path / "reads.pt")
    with pytest.raises(ProbeWeightsError, match=r"aten::from_file"):
        load_expert(_spec("torchscript", path))


def test_a_module_that_runs_code_while_it_loads_is_refused_unloaded(tmp_path: Path) -> None:
    target = tmp_path / "on-load.bin"
    path = _scripted(Wraps(OnLoad(str(target))), tmp_path / "on-load.pt")
    with pytest.raises(ProbeWeightsError, match=r"__setstate__"):
        load_expert(_spec("torchscript", path))
    assert not target.exists()


def test_the_worker_side_zoo_refuses_the_module_too(tmp_path: Path, tiny_built: Zoo) -> None:
    """A zoo that names such an expert (one stored before the check) never runs it."""
    target = tmp_path / "from-zoo.bin"
    path = _scripted(Creates(str(target)), tmp_path / "zoo-expert.pt")
    zoo = replace(
        tiny_built,
        experts=[_spec("torchscript", path, 28)],
        errors=tiny_built.errors[:, :1],
        folder=None,
        _models={},
    )
    with pytest.raises(ProbeWeightsError, match=r"aten::from_file"):
        zoo.expert_model(0)
    assert not target.exists()


def _torchvision(builder: str) -> nn.Module:
    from torchvision import models

    torch.manual_seed(0)
    return models.get_model(builder, weights=None).eval()


@pytest.mark.parametrize(
    "builder",
    ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "squeezenet1_1", "regnet_y_400mf"],
)
def test_scripted_and_traced_torchvision_classifiers_pass(builder: str) -> None:
    model = _torchvision(builder)
    size = 64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
        traced = torch.jit.trace(model, torch.rand(1, 3, size, size), check_trace=False)
    for module in (scripted, traced):
        graph_checks.check_torchscript("legit", module)


@pytest.mark.parametrize("name", ["levit_128s", "mobilevit_xxs"])
def test_scripted_timm_models_pass(name: str) -> None:
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph_checks.check_torchscript("legit", torch.jit.script(model))


@pytest.mark.parametrize("module", [SmallCNN(4, 2), SmallMLP(8, 2, 8), Wraps(SmallCNN(2, 1))])
def test_the_services_own_networks_pass_as_torchscript(module: nn.Module, tmp_path: Path) -> None:
    path = _scripted(module.eval(), tmp_path / "own.pt")
    load_checked(_spec("torchscript", path))
    traced = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(module.eval(), torch.rand(2, 3, 8, 8)), str(traced))
    load_checked(_spec("torchscript", traced))


# --------------------------------------------------------------------------------------------
# ONNX


def _onnx_graph(
    nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto]
) -> onnx.GraphProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 192])
    return helper.make_graph(nodes, "g", [x], [y], initializer=initializers)


def _flatten_plus(weight_name: str = "w") -> list[onnx.NodeProto]:
    return [
        helper.make_node("Flatten", ["x"], ["f"], axis=1),
        helper.make_node("Add", ["f", weight_name], ["y"]),
    ]


def test_an_onnx_model_of_the_standard_domain_passes(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones(192, np.float32), "w")
    model = helper.make_model(
        _onnx_graph(_flatten_plus(), [w]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    path = tmp_path / "plain.onnx"
    onnx.save(model, str(path))
    load_checked(_spec("onnx", path))


def test_an_onnx_model_with_a_custom_domain_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "custom.onnx"
    path.write_bytes(custom_domain_onnx())
    with pytest.raises(ProbeWeightsError, match=r"com\.microsoft") as refused:
        load_expert(_spec("onnx", path))
    assert "Gelu" in str(refused.value)


def test_an_onnx_custom_domain_inside_a_subgraph_is_refused(tmp_path: Path) -> None:
    inner_out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    branch = helper.make_graph(
        [helper.make_node("Gelu", ["f"], ["y"], domain="com.microsoft")], "b", [], [inner_out]
    )
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], axis=1),
        helper.make_node(
            "Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])
        ),
        helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch),
    ]
    model = helper.make_model(
        _onnx_graph(nodes, []),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    path = tmp_path / "nested.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ProbeWeightsError, match=r"com\.microsoft"):
        load_expert(_spec("onnx", path))


@pytest.mark.parametrize("location", ["secret.bin", "../secret.bin", "ABSOLUTE"])
def test_an_onnx_model_with_external_data_is_refused(tmp_path: Path, location: str) -> None:
    folder = tmp_path / "store"
    folder.mkdir()
    secret = (folder if location == "secret.bin" else tmp_path) / "secret.bin"
    secret.write_bytes(np.full(192, 7, np.float32).tobytes())
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[192])
    w.data_location = TensorProto.EXTERNAL
    where = str(secret) if location == "ABSOLUTE" else location
    w.external_data.add(key="location", value=where)
    model = helper.make_model(
        _onnx_graph(_flatten_plus(), [w]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    path = folder / "external.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ProbeWeightsError, match=r"external data"):
        load_checked(_spec("onnx", path))
