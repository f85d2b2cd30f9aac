"""The zoo management forms, each taken by its route as one value (``form: ExpertForm``):
the fields, their limits and descriptions (the OpenAPI's) are declared here once, and the
route gets them checked.

A form's cheap checks (the name; an expert's architecture; without an ``Idempotency-Key``, a
name in use) refuse the request before its upload is stored: a route lists its form before
its upload, and dependencies are solved in that order. A retry with a key may be a replay,
so its name is checked once the key is claimed.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Form, Request
from fastapi.concurrency import run_in_threadpool

from app.api.deps import SettingsDep
from app.api.idempotency import key_of
from app.db.models import Expert, ZooTask
from app.services import experts, zoo_admin, zoo_items
from app.services.experts import NewExpert
from app.services.zoo_admin import NewZooTask
from app.services.zoo_items import ItemModel
from app.settings import Settings


async def _name_free_unless_keyed(
    request: Request, settings: Settings, model: ItemModel, name: str
) -> None:
    if key_of(request) is None:
        await run_in_threadpool(zoo_admin.check_name_free, settings, model=model, name=name)


async def expert_form(
    request: Request,
    settings: SettingsDep,
    name: Annotated[str, Form(description="unique name: letters, digits, '.', '_', '-'")],
    architecture: Annotated[
        str,
        Form(
            max_length=64,
            description="torchvision/<builder>, timm/<name>, torchscript, onnx, "
            "cnn-<width>x<depth>, mlp-<width>x<depth>, or a probe network",
        ),
    ],
    input_size: Annotated[int, Form(ge=8, le=1024, description="input resolution")],
    weights_uri: Annotated[
        str | None,
        Form(
            max_length=1000,
            description="http(s) URL, a path under the weights import folder, or "
            "'imagenet' / 'random:N' for the probe networks",
        ),
    ] = None,
    mean: Annotated[str | None, Form(description="normalisation mean, 'r,g,b'")] = None,
    std: Annotated[str | None, Form(description="normalisation std, 'r,g,b'")] = None,
    normalisation: Annotated[
        str | None,
        Form(
            description="'imagenet' or 'preset' (the model's own, e.g. timm's) instead of mean/std"
        ),
    ] = None,
    source_task: Annotated[str | None, Form(description="the zoo task it was trained on")] = None,
    tags: Annotated[str | None, Form(description="comma-separated tags")] = None,
) -> NewExpert:
    """An expert's registration form (its weights are the upload ``weights``, or
    ``weights_uri``)."""
    expert = NewExpert(
        name=name,
        architecture=architecture,
        input_size=input_size,
        weights_uri=weights_uri,
        mean=mean,
        std=std,
        normalisation=normalisation,
        source_task=source_task,
        tags=tags,
    )
    experts.check_new(expert)
    await _name_free_unless_keyed(request, settings, Expert, name)
    return expert


async def zoo_task_form(
    request: Request,
    settings: SettingsDep,
    name: Annotated[str, Form(description="unique zoo task name")],
    domain: Annotated[str | None, Form(description="what the images show")] = None,
) -> NewZooTask:
    """A zoo task's form (its dataset is the upload ``file``)."""
    zoo_items.check_name("zoo task", name)
    await _name_free_unless_keyed(request, settings, ZooTask, name)
    return NewZooTask(name=name, domain=domain)


ExpertForm = Annotated[NewExpert, Depends(expert_form)]
ZooTaskForm = Annotated[NewZooTask, Depends(zoo_task_form)]
