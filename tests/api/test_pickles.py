"""User files are never unpickled: expert weights load with ``weights_only`` and .npz uploads
without ``allow_pickle``. Each upload here holds a pickle that would create a file when
unpickled; the file never appears."""

from __future__ import annotations

import ast
import io
import pickle
from pathlib import Path

import numpy as np
import torch
from fastapi.testclient import TestClient

from app.settings import Settings
from tests.helpers import cnn_weights


class _Touch:
    """Unpickling this creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.path,))


def test_a_malicious_pickle_is_never_run(
    client: TestClient, settings: Settings, sent: list[str], tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    weights = torch.load(io.BytesIO(cnn_weights()), weights_only=True)
    weights["trap"] = _Touch(marker)  # a state dict with one object that is no tensor
    booby_trapped = io.BytesIO()
    torch.save(weights, booby_trapped)
    plain = io.BytesIO()
    pickle.dump(_Touch(marker), plain)
    form = {"architecture": "cnn-4x1", "input_size": "28"}
    for i, body in enumerate((booby_trapped.getvalue(), plain.getvalue())):
        response = client.post(
            "/v1/experts", data={**form, "name": f"trap-{i}"}, files={"weights": ("w.pt", body)}
        )
        assert response.status_code == 422, response.text
        assert not marker.exists()
    # An .npz whose labels are an object array (a pickle inside the .npy).
    labels = np.empty(4, dtype=object)
    labels[:] = [_Touch(marker)] * 4
    archive = io.BytesIO()
    np.savez(archive, x=np.zeros((4, 8, 8), np.uint8), y=labels)
    response = client.post("/v1/tasks", files={"file": ("trap.npz", archive.getvalue())})
    assert response.status_code == 422, response.text
    assert not marker.exists()
    assert sent == []


def _calls(name: str) -> list[tuple[Path, ast.Call]]:
    root = Path(__file__).resolve().parents[2]
    found = []
    for path in [*root.joinpath("app").rglob("*.py"), *root.joinpath("workers").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == name
            ):
                found.append((path, node))
    return found


def _keyword(call: ast.Call, name: str) -> object:
    for keyword in call.keywords:
        if keyword.arg == name and isinstance(keyword.value, ast.Constant):
            return keyword.value.value
    return None


def test_every_load_in_the_code_refuses_pickles() -> None:
    """Every ``torch.load`` passes ``weights_only=True`` and every ``np.load`` passes
    ``allow_pickle=False``, spelt out (the defaults have changed between releases)."""
    torch_loads = [(p, c) for p, c in _calls("load") if ast.unparse(c.func) == "torch.load"]
    numpy_loads = [(p, c) for p, c in _calls("load") if ast.unparse(c.func) == "np.load"]
    assert torch_loads
    assert numpy_loads
    for path, call in torch_loads:
        assert _keyword(call, "weights_only") is True, f"{path}:{call.lineno}"
    for path, call in numpy_loads:
        assert _keyword(call, "allow_pickle") is False, f"{path}:{call.lineno}"


def test_expert_weights_may_be_safetensors(
    client: TestClient, settings: Settings, sent: list[str], tmp_path: Path
) -> None:
    from safetensors.torch import save

    state = torch.load(io.BytesIO(cnn_weights()), weights_only=True)
    form = {"architecture": "cnn-4x1", "input_size": "28"}
    good = client.post(
        "/v1/experts",
        data={**form, "name": "safe"},
        files={"weights": ("w.safetensors", save(state))},
    )
    assert good.status_code == 202, good.text
    wrong = dict(state)
    wrong["body.0.weight"] = torch.zeros(3, 3, 3, 3)
    refused = client.post(
        "/v1/experts",
        data={**form, "name": "unsafe"},
        files={"weights": ("w.safetensors", save(wrong))},
    )
    assert refused.status_code == 422
    assert "body.0.weight: (3, 3, 3, 3)" in refused.json()["detail"]
    truncated = save(state)[:-10]
    broken = client.post(
        "/v1/experts",
        data={**form, "name": "broken"},
        files={"weights": ("w.safetensors", truncated)},
    )
    assert broken.status_code == 422
