"""Caption sources for deprojector training: a caption file, or a built-in synthetic corpus.

The built-in corpus exists because no dataset can be downloaded here: tests and the `tiny`
demo need captions that are varied (lengths from one word to long tag lists, commas, shared
vocabulary), yet cheap and identical on every machine. It is generated from templates and
word lists with a seeded RNG, so the same (count, seed) always gives the same list.
"""

from __future__ import annotations

import random
from pathlib import Path

BUILTIN = "builtin"
DEFAULT_BUILTIN_COUNT = 1000


def _words(joined: str) -> tuple[str, ...]:
    return tuple(joined.split("|"))


# Word lists as "|"-separated strings: compact, and ruff format keeps them that way.
_SUBJECTS = _words(
    "cat|dog|girl|boy|woman|man|robot|dragon|castle|house|car|ship|tree|flower|bird|horse|knight|"
    "wizard|city|mountain|forest|river|maid|astronaut|fox|owl|lighthouse|train|teapot|violin"
)
_ADJECTIVES = _words(
    "red|blue|green|golden|tiny|giant|old|young|happy|sad|ancient|futuristic|cute|dark|bright|"
    "misty|snowy|wooden|glass|shiny"
)
_ACTIONS = _words(
    "sitting|running|sleeping|flying|reading a book|drinking tea|dancing|standing|"
    "looking at the sky|playing music|walking|smiling"
)
_PLACES = _words(
    "in a garden|on the beach|in the rain|at night|in a library|on a hill|under the stars|"
    "in the snow|by the sea|in a cafe|in space|on a bridge"
)
_STYLES = _words(
    "watercolor|oil painting|photo|digital art|pencil sketch|anime style|concept art|3d render|"
    "pixel art|studio lighting|highly detailed|4k|trending on artstation|bokeh|cinematic|soft focus"
)
_PRODUCTS = _words("mug|t-shirt|poster|phone case|tote bag|sticker|pillow")


def _a(rng: random.Random, words: tuple[str, ...]) -> str:
    return rng.choice(words)


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _caption(rng: random.Random) -> str:
    """One caption from a randomly chosen template (LAION-like: prose, tags, product titles)."""
    kind = rng.randrange(6)
    if kind == 0:
        return _with_article(f"{_a(rng, _ADJECTIVES)} {_a(rng, _SUBJECTS)}")
    if kind == 1:
        return _with_article(
            f"{_a(rng, _ADJECTIVES)} {_a(rng, _SUBJECTS)} {_a(rng, _ACTIONS)} {_a(rng, _PLACES)}"
        )
    if kind == 2:
        return f"{_a(rng, _STYLES)} of {_with_article(_a(rng, _SUBJECTS))} {_a(rng, _PLACES)}"
    if kind == 3:  # comma-separated tags, the form prompt composition splits
        tags = [_a(rng, _SUBJECTS), _a(rng, _ADJECTIVES)] + rng.sample(_STYLES, rng.randint(1, 4))
        return ", ".join(tags)
    if kind == 4:
        subject = f"{_a(rng, _ADJECTIVES)} {_a(rng, _SUBJECTS)}"
        return f"{subject} {_a(rng, _PRODUCTS)}".title()
    # long descriptions; a few run past CLIP's 77 tokens, as real captions do
    clauses = [
        _with_article(f"{_a(rng, _ADJECTIVES)} {_a(rng, _SUBJECTS)} {_a(rng, _ACTIONS)} {_a(rng, _PLACES)}")
        for _ in range(rng.randint(2, 8))
    ]
    return " and ".join(clauses) + ", " + ", ".join(rng.sample(_STYLES, 3))


def builtin_captions(count: int = DEFAULT_BUILTIN_COUNT, seed: int = 0) -> list[str]:
    """`count` synthetic captions, deterministic in (count, seed)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    rng = random.Random(seed)
    return [_caption(rng) for _ in range(count)]


def read_captions(path: Path) -> list[str]:
    """One caption per line (UTF-8); surrounding whitespace stripped, blank lines dropped."""
    with Path(path).open(encoding="utf-8") as f:
        captions = [line.strip() for line in f]
    captions = [c for c in captions if c]
    if not captions:
        raise ValueError(f"{path}: no captions (expected one caption per line)")
    return captions


def load_captions(source: str, builtin_count: int = DEFAULT_BUILTIN_COUNT) -> list[str]:
    """`builtin` (the synthetic corpus) or the path of a caption file."""
    if source == BUILTIN:
        return builtin_captions(builtin_count)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"captions must be {BUILTIN!r} or a text file; {source!r} is neither")
    return read_captions(path)
