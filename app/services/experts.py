"""Registering an expert from what a client sends: the fields of its form, still as text, and
its weights, uploaded or named by ``weights_uri``.

Every check that can refuse it answers a problem with the reason (422, or 409 for a name in
use) before its row and job commit. The cheap ones (``check_new``) run before anything is
stored; loading the expert and running a forward pass (``register``) runs last, on the
weights where they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from sqlalchemy.orm import Session

from app.db.models import Expert, Job
from app.services import objects, weights, zoo_admin, zoo_items
from app.services.problems import ProblemError
from app.services.serving import ZooState
from app.services.storage import StoredFile
from app.settings import Settings
from app.task2vec.errors import Task2VecError
from app.zoo import architectures
from app.zoo.experts import ExpertSpec, default_normalisation, known
from app.zoo.features import load_checked

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class NewExpert:
    """An expert as a client describes it, its fields as sent (``None``: not given)."""

    name: str
    architecture: str
    input_size: int
    weights_uri: str | None = None
    mean: str | None = None
    std: str | None = None
    normalisation: str | None = None
    source_task: str | None = None
    tags: str | None = None


def _invalid(detail: str) -> ProblemError:
    return ProblemError(422, "invalid-expert", "Invalid expert", detail)


def check_new(expert: NewExpert) -> None:
    """422 for a name or an architecture no expert can have: refused before its weights
    are stored or placed."""
    zoo_items.check_name("expert", expert.name)
    if not known(expert.architecture):
        raise _invalid(
            f"unknown expert architecture {expert.architecture!r}; use torchvision/<builder>, "
            "timm/<name>, torchscript, onnx, cnn-<width>x<depth>, mlp-<width>x<depth>, "
            "efficientnet_lite0, resnet18 or resnet34"
        )


def weights_at(settings: Settings, expert: NewExpert, upload: StoredFile | None) -> str:
    """Where the expert's weights will be: an upload's content-addressed name, or what
    ``weights_uri`` names (``weights.place``: a URL checked, a file copied in). Exactly one
    of the two is given."""
    if (expert.weights_uri is None) == (upload is None):
        raise _invalid("give the weights either as an uploaded file (weights) or as weights_uri")
    if upload is not None:
        return str(upload.final)
    assert expert.weights_uri is not None
    return weights.place(settings, expert.architecture, expert.weights_uri)


def _floats(field: str, raw: str | None, default: Triple) -> Triple:
    if raw is None or not raw.strip():
        return default
    try:
        values = [float(v) for v in raw.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise _invalid(f"{field}: three comma-separated numbers")
    if field == "std" and min(values) <= 0:
        raise _invalid("std: positive numbers only")
    return values[0], values[1], values[2]


def _normalisation(expert: NewExpert) -> tuple[Triple, Triple]:
    """The expert's mean and std: as given, the model's own preset, or the default of its
    architecture (ImageNet's; 0.5 for the small networks the service trains)."""
    architecture, normalisation = expert.architecture, expert.normalisation
    if normalisation not in (None, "", "imagenet", "preset"):
        raise _invalid(f"normalisation {normalisation!r}: 'imagenet' or 'preset'")
    if normalisation and (expert.mean or expert.std):
        raise _invalid("give either mean and std, or normalisation, not both")
    try:
        default = (
            architectures.preset_normalisation(architecture)
            if normalisation == "preset"
            else architectures.IMAGENET_NORMALISATION
            if normalisation == "imagenet"
            else default_normalisation(architecture)
        )
    except Task2VecError as exc:
        raise _invalid(str(exc)) from None
    return _floats("mean", expert.mean, default[0]), _floats("std", expert.std, default[1])


def spec_of(expert: NewExpert, where: str, zoo: ZooState) -> ExpertSpec:
    """The expert's spec, its weights at ``where``; a ``source_task`` must be a task of the
    zoo served."""
    source_task = expert.source_task
    if source_task and source_task not in {t.name for t in zoo.zoo.tasks}:
        raise _invalid(f"source_task {source_task!r} is not a zoo task")
    mean, std = _normalisation(expert)
    return ExpertSpec(
        name=expert.name,
        architecture=expert.architecture,
        weights=where,
        input_size=expert.input_size,
        mean=mean,
        std=std,
        source_task=source_task or None,
        tags=tuple(t.strip() for t in (expert.tags or "").split(",") if t.strip()),
    )


def _check_loads(spec: ExpertSpec, upload: StoredFile | None) -> None:
    """The expert loads and passes a forward pass on a few images, or 422 with the reason.
    An upload is loaded from its request's own file: the reason calls it the uploaded
    weights, never by that name (the client has no use for the service's paths)."""
    try:
        load_checked(spec if upload is None else replace(spec, weights=str(upload.path)))
    except Task2VecError as exc:
        reason = str(exc)
        if upload is not None:
            for name in (str(upload.path), upload.path.name):
                reason = reason.replace(name, "the uploaded weights")
        raise ProblemError(422, "invalid-expert", "The expert does not load", reason) from None


def register(
    session: Session,
    *,
    settings: Settings,
    expert: NewExpert,
    where: str,
    upload: StoredFile | None,
    zoo: ZooState,
    tenant: str,
    callback_url: str | None = None,
) -> Job:
    """Check the expert in full, then commit it pending with the job that evaluates it
    (``zoo_admin.register``). Remote weights are checked by that job, once downloaded; an
    upload is checked under its request's own name and kept only once it passed."""
    zoo_admin.check_name_free(settings, model=Expert, name=expert.name)
    spec = spec_of(expert, where, zoo)
    if not weights.remote(where):
        _check_loads(spec, upload)
    if upload is not None:
        # in place (and shared) before the row naming it commits
        objects.share(settings, upload.keep().path)
    return zoo_admin.register(
        session,
        settings=settings,
        item=zoo_items.expert_row(spec),
        tenant=tenant,
        callback_url=callback_url,
    )
