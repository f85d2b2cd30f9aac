"""Class names that look alike but are different text: ``cat`` and ``сat`` (a Cyrillic ``с``)
are two classes to the service and one to whoever reads the folder names, so a dataset that
holds both most likely split one class in two. Names are compared by a skeleton: their NFKC
form with letters of Cyrillic and Greek that are drawn like Latin ones (a small subset of
Unicode's confusables) replaced by those."""

from __future__ import annotations

import unicodedata

#: Cyrillic and Greek letters drawn like a Latin letter, and that letter.
_LOOKALIKES = str.maketrans(
    {
        # Cyrillic
        "А": "A", "В": "B", "Е": "E", "Ѕ": "S", "І": "I", "Ј": "J", "К": "K", "М": "M",
        "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T", "У": "Y", "Х": "X", "Ү": "Y",
        "Ԛ": "Q", "Ԝ": "W", "Һ": "H", "Ӏ": "I",
        "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "ѕ": "s",
        "і": "i", "ј": "j", "һ": "h", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ӏ": "l", "ү": "y",
        # Greek
        "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M",
        "Ν": "N", "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
        "ο": "o", "ν": "v", "ρ": "p", "α": "a", "ι": "i", "υ": "u",
        # Latin without its dot
        "ı": "i",
    }
)  # fmt: skip


def skeleton(name: str) -> str:
    """What ``name`` looks like: equal skeletons are read as the same name."""
    return unicodedata.normalize("NFKC", name).translate(_LOOKALIKES)


def _described(name: str) -> str:
    odd = sorted({c for c in name if c.translate(_LOOKALIKES) != c or not c.isascii()})
    letters = ", ".join(f"U+{ord(c):04X} {unicodedata.name(c, '?')}" for c in odd[:4])
    return f"{name!r} ({letters})" if letters else repr(name)


def lookalike_warnings(classes: tuple[str, ...]) -> tuple[str, ...]:
    """A warning for each group of class names that look alike, naming their odd letters."""
    groups: dict[str, list[str]] = {}
    for name in classes:
        groups.setdefault(skeleton(name), []).append(name)
    return tuple(
        "class names "
        + " and ".join(_described(name) for name in names)
        + " look alike but are different classes; rename them to one if they are one"
        for names in groups.values()
        if len(names) > 1
    )
