"""flagworld: a small offline world of national flags and facts (design §9).

The world is known completely, so the whole pipeline runs offline and an editor can be
checked against a model that really knows its facts.

- `COUNTRIES`: 46 national flags drawn with Pillow from a declarative spec (stripes,
  rectangles, discs, stars, Nordic crosses) with real aspect ratios, and a knowledge table
  of public facts (capital, continent, currency, language), written as names are
  ("Mexico City", "CFA franc"). `answer()` gives them as VQA answers are written: lower
  case, words separated by spaces ("mexico city", "us dollar"), so an answer can take
  several tokens of the tiny VLM's word-level tokenizer.
- `LOOKALIKE_GROUPS` partitions the flags into groups of near-misses (Italy/Ireland/Mexico/
  Côte d'Ivoire/Nigeria, the Nordic crosses, Japan/Bangladesh/Palau, ...). Look-alikes keep
  their real, slightly different colours and aspect ratios so that a tiny model can still
  separate them.
- `render_flag` draws a clean, centred flag (4x supersampled, cached); `render_variant`
  re-renders it with augmentation (scale, position, rotation, margin, brightness, noise).

Questions and paraphrases
-------------------------
A flag question is "<opener> <object>?" over a 5 x 4 grid of openers ("what is the capital
of", "name the capital of", ...) and objects ("the country with this flag", "the nation with
this flag", ...). `TRAIN_TEMPLATES` are the 4 diagonal cells (opener i with object i);
`HELDOUT_TEMPLATES` the 5th opener (made of training words) with objects 0 and 1: the
accuracy bar of the tiny VLM.

Image-free questions name their country ("what is the capital of peru?",
`TEXT_TRAIN_TEMPLATES`: the 4 training openers and 5 sentence frames of another shape,
"{x} has which capital?", "in {x}, which city is the capital?", ...). They are facts of the
world too: the tiny VLM is trained on them, and the annotator draws an item's image-free
locality question (EasyEdit's `loc`) from them (`TEXT_LOCALITY_TEMPLATES`).

`PARAPHRASE_TEMPLATES` (the evaluated rephrases) are the held-out cells and those sentence
frames about the flag ("the country with this flag has which capital?"): wordings never
asked about a flag in training, whose frame the model only saw about named countries. So
text generality measures whether an edit reaches a new wording, not a recombination of
training phrases (the relation "country", which has no named form, keeps the off-diagonal
grid cells). The annotator takes an item's question from the training templates, the
editor's `rephrases_train` from the other training templates, and the 10 eval `rephrases`
from the paraphrase templates (held-out ones first), which keeps them disjoint by
construction.

Questions are lower-case words separated by single spaces, with "?" attached to the last
word as in OK-VQA; `words()` splits "?" and "," off as words of their own, and
`vocabulary()` is the sorted word list of every question, every answer and
`COUNTERFACTUAL_CITIES` (edit targets).
"""

from __future__ import annotations

import functools
import io
import math
import random
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from schemas.record import Rejection, SourceItem

RGB = tuple[int, int, int]
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of width/height

# ---------------------------------------------------------------------------------------
# Flag drawing spec
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stripes:
    """Equal (or weighted) stripes filling `box`; horizontal unless `vertical`."""

    colors: tuple[RGB, ...]
    weights: tuple[float, ...] = ()
    vertical: bool = False
    box: Box = (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class Rect:
    color: RGB
    box: Box


@dataclass(frozen=True)
class Disc:
    """A disc centred at (cx, cy) (fractions of width/height), radius `r` x flag height."""

    color: RGB
    cx: float
    cy: float
    r: float


@dataclass(frozen=True)
class Star:
    """A five-pointed star, outer radius `r` x flag height, one point up."""

    color: RGB
    cx: float
    cy: float
    r: float


@dataclass(frozen=True)
class Cross:
    """A full-length cross through (cx, cy) within `box`; bar thickness `t` x flag height."""

    color: RGB
    cx: float
    cy: float
    t: float
    box: Box = (0.0, 0.0, 1.0, 1.0)


Part = Stripes | Rect | Disc | Star | Cross


@dataclass(frozen=True)
class Flag:
    aspect: float  # width / height, as the real flag
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class Country:
    code: str
    name: str
    capital: str
    continent: str
    currency: str
    language: str
    flag: Flag = field(repr=False)

    @property
    def display_name(self) -> str:
        """The name as words ("Ivory Coast"), for image prompts like "the flag of ..."."""
        return self.name.replace("_", " ")


def _hex(value: str) -> RGB:
    value = value.lstrip("#")
    return (int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16))


W = _hex("ffffff")
K = _hex("000000")


def _h(*colors: str, weights: tuple[float, ...] = ()) -> Stripes:
    return Stripes(tuple(_hex(c) for c in colors), weights)


def _v(*colors: str, weights: tuple[float, ...] = ()) -> Stripes:
    return Stripes(tuple(_hex(c) for c in colors), weights, vertical=True)


def _alternating(n: int, first: str, second: str) -> Stripes:
    return Stripes(tuple(_hex(first if i % 2 == 0 else second) for i in range(n)))


def _nordic(
    aspect: float, field_: str, cross: str, cx: float, t: float, inner: str = "", ti: float = 0
) -> Flag:
    """A Nordic cross; `inner` draws a second, narrower cross inside (Norway, Iceland)."""
    parts: list[Part] = [Rect(_hex(field_), (0, 0, 1, 1)), Cross(_hex(cross), cx, 0.5, t)]
    if inner:
        parts.append(Cross(_hex(inner), cx, 0.5, ti))
    return Flag(aspect, tuple(parts))


def _dots(color: RGB, box: Box, rows: int, cols: int, r: float) -> tuple[Disc, ...]:
    """A grid of small discs (the US stars are dots at 64 px anyway)."""
    x0, y0, x1, y1 = box
    return tuple(
        Disc(color, x0 + (x1 - x0) * (c + 0.5) / cols, y0 + (y1 - y0) * (k + 0.5) / rows, r)
        for k in range(rows)
        for c in range(cols)
    )


def _star_arc(color: RGB, aspect: float, n: int, radius: float, cy: float) -> tuple[Star, ...]:
    """Venezuela's arc of `n` stars, bowing up around (0.5, cy); `radius` in flag heights."""
    stars = []
    for i in range(n):
        angle = math.radians(160 - 140 * i / (n - 1))
        cx = 0.5 + radius * math.cos(angle) / aspect
        stars.append(Star(color, cx, cy - radius * math.sin(angle), 0.035))
    return tuple(stars)


def _flag(aspect: float, *parts: Part | tuple[Part, ...]) -> Flag:
    flat: list[Part] = []
    for part in parts:
        flat.extend(part if isinstance(part, tuple) else (part,))
    return Flag(aspect, tuple(flat))


# Colours are the real ones (slightly separated where the real flags are near-identical).
COUNTRIES: tuple[Country, ...] = (
    # Vertical green/white/red-ish tricolours.
    Country("IT", "Italy", "Rome", "Europe", "euro", "Italian",
        _flag(3 / 2, _v("009246", "ffffff", "ce2b37"))),
    Country("IE", "Ireland", "Dublin", "Europe", "euro", "Irish",
        _flag(2, _v("169b62", "ffffff", "ff883e"))),
    Country("MX", "Mexico", "Mexico City", "North America", "Mexican peso", "Spanish",
        _flag(7 / 4, _v("006847", "ffffff", "ce1126"), Disc(_hex("8c5a2b"), 0.5, 0.5, 0.16),
              Disc(_hex("3f7a3a"), 0.5, 0.6, 0.07))),
    Country("CI", "Ivory Coast", "Yamoussoukro", "Africa", "CFA franc", "French",
        _flag(3 / 2, _v("f77f00", "ffffff", "009e60"))),
    Country("NG", "Nigeria", "Abuja", "Africa", "naira", "English",
        _flag(2, _v("008751", "ffffff", "008751"))),
    # Blue/white/red tricolours.
    Country("FR", "France", "Paris", "Europe", "euro", "French",
        _flag(3 / 2, _v("002395", "ffffff", "ed2939"))),
    Country("RU", "Russia", "Moscow", "Europe", "ruble", "Russian",
        _flag(3 / 2, _h("ffffff", "0039a6", "d52b1e"))),
    Country("NL", "Netherlands", "Amsterdam", "Europe", "euro", "Dutch",
        _flag(3 / 2, _h("ae1c28", "ffffff", "21468b"))),
    Country("LU", "Luxembourg", "Luxembourg", "Europe", "euro", "Luxembourgish",
        _flag(5 / 3, _h("ea141d", "ffffff", "51adda"))),
    # Blue/yellow/red (the real flags are almost identical; Chad's blue is darker).
    Country("TD", "Chad", "Ndjamena", "Africa", "CFA franc", "French",
        _flag(3 / 2, _v("002060", "fec400", "c60c30"))),
    Country("RO", "Romania", "Bucharest", "Europe", "Romanian leu", "Romanian",
        _flag(3 / 2, _v("003c9f", "fcd816", "ce1126"))),
    # Horizontal bicolours.
    Country("ID", "Indonesia", "Jakarta", "Asia", "rupiah", "Indonesian",
        _flag(3 / 2, _h("ce1126", "ffffff"))),
    Country("MC", "Monaco", "Monaco", "Europe", "euro", "French",
        _flag(5 / 4, _h("e8112d", "ffffff"))),
    Country("PL", "Poland", "Warsaw", "Europe", "zloty", "Polish",
        _flag(8 / 5, _h("ffffff", "dc143c"))),
    Country("UA", "Ukraine", "Kyiv", "Europe", "hryvnia", "Ukrainian",
        _flag(3 / 2, _h("0057b7", "ffd700"))),
    # Black/yellow-gold/red.
    Country("BE", "Belgium", "Brussels", "Europe", "euro", "Dutch",
        _flag(15 / 13, _v("000000", "fdda24", "ef3340"))),
    Country("DE", "Germany", "Berlin", "Europe", "euro", "German",
        _flag(5 / 3, _h("000000", "dd0000", "ffce00"))),
    # Crosses: Nordic (offset towards the hoist) and the Swiss Greek cross.
    Country("DK", "Denmark", "Copenhagen", "Europe", "Danish krone", "Danish",
        _nordic(37 / 28, "c8102e", "ffffff", 14 / 37, 4 / 28)),
    Country("SE", "Sweden", "Stockholm", "Europe", "Swedish krona", "Swedish",
        _nordic(16 / 10, "006aa7", "fecc00", 6 / 16, 2 / 10)),
    Country("NO", "Norway", "Oslo", "Europe", "Norwegian krone", "Norwegian",
        _nordic(22 / 16, "ba0c2f", "ffffff", 8 / 22, 4 / 16, "00205b", 2 / 16)),
    Country("FI", "Finland", "Helsinki", "Europe", "euro", "Finnish",
        _nordic(18 / 11, "ffffff", "002f6c", 6.5 / 18, 3 / 11)),
    Country("IS", "Iceland", "Reykjavik", "Europe", "Icelandic krona", "Icelandic",
        _nordic(25 / 18, "02529c", "ffffff", 9 / 25, 4 / 18, "dc1e35", 2 / 18)),
    Country("CH", "Switzerland", "Bern", "Europe", "Swiss franc", "German",
        _flag(1, Rect(_hex("da291c"), (0, 0, 1, 1)), Rect(W, (6 / 32, 13 / 32, 26 / 32, 19 / 32)),
              Rect(W, (13 / 32, 6 / 32, 19 / 32, 26 / 32)))),
    # A disc on a field.
    Country("JP", "Japan", "Tokyo", "Asia", "yen", "Japanese",
        _flag(3 / 2, Rect(W, (0, 0, 1, 1)), Disc(_hex("bc002d"), 0.5, 0.5, 0.3))),
    Country("BD", "Bangladesh", "Dhaka", "Asia", "taka", "Bengali",
        _flag(5 / 3, Rect(_hex("006a4e"), (0, 0, 1, 1)), Disc(_hex("f42a41"), 0.45, 0.5, 1 / 3))),
    Country("PW", "Palau", "Ngerulmud", "Oceania", "US dollar", "Palauan",
        _flag(8 / 5, Rect(_hex("4aadd6"), (0, 0, 1, 1)), Disc(_hex("ffde00"), 0.44, 0.5, 0.3))),
    # Red/white/red.
    Country("AT", "Austria", "Vienna", "Europe", "euro", "German",
        _flag(3 / 2, _h("c8102e", "ffffff", "c8102e"))),
    Country("LV", "Latvia", "Riga", "Europe", "euro", "Latvian",
        _flag(2, _h("9e3039", "ffffff", "9e3039", weights=(2, 1, 2)))),
    Country("PE", "Peru", "Lima", "South America", "sol", "Spanish",
        _flag(3 / 2, _v("d91023", "ffffff", "d91023"))),
    # Pan-African colours, horizontal.
    Country("LT", "Lithuania", "Vilnius", "Europe", "euro", "Lithuanian",
        _flag(5 / 3, _h("fdb913", "006a44", "c1272d"))),
    Country("BO", "Bolivia", "Sucre", "South America", "boliviano", "Spanish",
        _flag(22 / 15, _h("d52b1e", "f9e300", "007934"))),
    Country("GH", "Ghana", "Accra", "Africa", "cedi", "English",
        _flag(3 / 2, _h("ce1126", "fcd116", "006b3f"), Star(K, 0.5, 0.5, 1 / 6))),
    # White/green/red, horizontal.
    Country("HU", "Hungary", "Budapest", "Europe", "forint", "Hungarian",
        _flag(2, _h("ce2939", "ffffff", "477050"))),
    Country("BG", "Bulgaria", "Sofia", "Europe", "euro", "Bulgarian",
        _flag(5 / 3, _h("ffffff", "00966e", "d62612"))),
    # Pan-African colours, vertical.
    Country("GN", "Guinea", "Conakry", "Africa", "Guinean franc", "French",
        _flag(3 / 2, _v("ce1126", "fcd116", "009460"))),
    Country("ML", "Mali", "Bamako", "Africa", "CFA franc", "Bambara",
        _flag(3 / 2, _v("14b53a", "fcd116", "ce1126"))),
    Country("SN", "Senegal", "Dakar", "Africa", "CFA franc", "French",
        _flag(3 / 2, _v("00853f", "fdef42", "e31b23"), Star(_hex("00853f"), 0.5, 0.5, 1 / 6))),
    # Yellow/blue/red, horizontal.
    Country("CO", "Colombia", "Bogota", "South America", "Colombian peso", "Spanish",
        _flag(3 / 2, _h("fcd116", "003893", "ce1126", weights=(2, 1, 1)))),
    Country("EC", "Ecuador", "Quito", "South America", "US dollar", "Spanish",
        _flag(2, _h("ffdd00", "034ea2", "ed1c24", weights=(2, 1, 1)),
              Disc(_hex("8a6d3b"), 0.5, 0.5, 0.17), Disc(_hex("5ba3dc"), 0.5, 0.46, 0.07))),
    Country("VE", "Venezuela", "Caracas", "South America", "bolivar", "Spanish",
        _flag(3 / 2, _h("ffcc00", "00247d", "cf142b"), _star_arc(W, 3 / 2, 8, 0.2, 0.62))),
    # Red/white/black, horizontal.
    Country("YE", "Yemen", "Sanaa", "Asia", "Yemeni rial", "Arabic",
        _flag(3 / 2, _h("ce1126", "ffffff", "000000"))),
    Country("EG", "Egypt", "Cairo", "Africa", "Egyptian pound", "Arabic",
        _flag(3 / 2, _h("ce1126", "ffffff", "000000"),
              Rect(_hex("c09300"), (0.45, 0.34, 0.55, 0.66)),
              Disc(_hex("c09300"), 0.5, 0.42, 0.11))),
    Country("IQ", "Iraq", "Baghdad", "Asia", "Iraqi dinar", "Arabic",
        _flag(3 / 2, _h("ce1126", "ffffff", "000000"),
              Rect(_hex("007a3d"), (0.28, 0.44, 0.72, 0.54)),
              Rect(_hex("007a3d"), (0.35, 0.37, 0.4, 0.54)),
              Rect(_hex("007a3d"), (0.6, 0.37, 0.65, 0.54)))),
    # Stripes with a canton.
    Country("GR", "Greece", "Athens", "Europe", "euro", "Greek",
        _flag(3 / 2, _alternating(9, "0d5eaf", "ffffff"),
              Rect(_hex("0d5eaf"), (0, 0, (5 / 9) / 1.5, 5 / 9)),
              Cross(W, (5 / 18) / 1.5, 5 / 18, 1 / 9, (0, 0, (5 / 9) / 1.5, 5 / 9)))),
    Country("US", "United States", "Washington", "North America", "US dollar", "English",
        _flag(1.9, _alternating(13, "b22234", "ffffff"), Rect(_hex("3c3b6e"), (0, 0, 0.4, 7 / 13)),
              _dots(W, (0.01, 0.01, 0.39, 7 / 13 - 0.01), 5, 6, 0.022))),
    Country("LR", "Liberia", "Monrovia", "Africa", "Liberian dollar", "English",
        _flag(1.9, _alternating(11, "bf0a30", "ffffff"),
              Rect(_hex("002868"), (0, 0, (5 / 11) / 1.9, 5 / 11)),
              Star(W, (5 / 22) / 1.9, 5 / 22, 0.15))),
)  # fmt: skip

COUNTRY_BY_CODE: dict[str, Country] = {c.code: c for c in COUNTRIES}

LOOKALIKE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("IT", "IE", "MX", "CI", "NG"),
    ("FR", "RU", "NL", "LU"),
    ("TD", "RO"),
    ("ID", "MC", "PL", "UA"),
    ("BE", "DE"),
    ("DK", "SE", "NO", "FI", "IS", "CH"),
    ("JP", "BD", "PW"),
    ("AT", "LV", "PE"),
    ("LT", "BO", "GH"),
    ("HU", "BG"),
    ("GN", "ML", "SN"),
    ("CO", "EC", "VE"),
    ("YE", "EG", "IQ"),
    ("GR", "US", "LR"),
)

_GROUP_OF: dict[str, tuple[str, ...]] = {code: g for g in LOOKALIKE_GROUPS for code in g}


def lookalikes(code: str) -> list[str]:
    """The other members of `code`'s look-alike group, in group order."""
    return [c for c in _GROUP_OF[_country(code).code] if c != code]


# Real cities that are nobody's capital in this world: counterfactual capitals for edits.
CITY_CONTINENTS: dict[str, str] = {
    "Lyon": "Europe", "Milan": "Europe", "Munich": "Europe", "Barcelona": "Europe",
    "Krakow": "Europe", "Porto": "Europe", "Geneva": "Europe", "Hamburg": "Europe",
    "Osaka": "Asia", "Kyoto": "Asia", "Mumbai": "Asia", "Shanghai": "Asia",
    "Surabaya": "Asia", "Lagos": "Africa", "Casablanca": "Africa", "Abidjan": "Africa",
    "Kumasi": "Africa", "Alexandria": "Africa", "Toronto": "North America",
    "Chicago": "North America", "Guadalajara": "North America", "Sao Paulo": "South America",
    "Cordoba": "South America", "Medellin": "South America", "Guayaquil": "South America",
    "Sydney": "Oceania", "Auckland": "Oceania", "Melbourne": "Oceania",
}  # fmt: skip
# Edit targets are answers, so they are written as answers are (lower case, see `answer`).
COUNTERFACTUAL_CITIES: tuple[str, ...] = tuple(city.lower() for city in CITY_CONTINENTS)

# ---------------------------------------------------------------------------------------
# Relations and question templates
# ---------------------------------------------------------------------------------------

RELATIONS: tuple[str, ...] = ("country", "capital", "continent", "currency", "language")
ITEM_RELATIONS: tuple[str, ...] = ("capital", "continent", "currency", "language")

_COUNTRY_OBJECTS = (
    "the country with this flag",
    "the country of this flag",
    "the nation with this flag",
    "the country that uses this flag",
)
_OPENERS: dict[str, tuple[str, ...]] = {
    "country": ("which country uses", "what country has", "which nation uses",
                "name the country that has", "what nation uses"),
    "capital": ("what is the capital of", "which city is the capital of", "name the capital of",
                "tell me the capital of", "what city is the capital of"),
    "continent": ("on which continent is", "which continent is home to", "name the continent of",
                  "tell me the continent of", "what is the continent of"),
    "currency": ("what is the currency of", "which currency is used in", "name the currency of",
                 "tell me the currency of", "what currency is used in"),
    "language": ("what is the language of", "which language is spoken in",
                 "name the language of", "tell me the language of", "what language is spoken in"),
}  # fmt: skip
_OBJECTS: dict[str, tuple[str, ...]] = {
    "country": ("this flag", "the flag in this image", "this national flag", "the flag shown here"),
    **{r: _COUNTRY_OBJECTS for r in ITEM_RELATIONS},
}
_HELDOUT_CELLS = ((4, 0), (4, 1))  # (opener, object): the 5th opener, never seen in training
# Sentence frames of another shape ("{x}" = the country: a named one or "the country with
# this flag"). Training asks them about named countries only, so a flag question in one of
# these frames is a wording the model has never seen about a flag.
_FRAMES: dict[str, tuple[str, ...]] = {
    "capital": ("{x} has which capital?", "which capital does {x} have?",
                "do you know the capital of {x}?", "in {x}, which city is the capital?",
                "the capital of {x} is which city?"),
    "continent": ("{x} is on which continent?", "which continent is {x} on?",
                  "do you know the continent of {x}?", "in which part of the world is {x}?",
                  "the continent of {x} is which one?"),
    "currency": ("{x} uses which currency?", "which currency does {x} use?",
                 "do you know the currency of {x}?", "in {x}, which currency is used?",
                 "the currency of {x} is which one?"),
    "language": ("{x} speaks which language?", "which language does {x} speak?",
                 "do you know the language of {x}?", "in {x}, which language is spoken?",
                 "the language of {x} is which one?"),
}  # fmt: skip


def _question(relation: str, opener: int, obj: int) -> str:
    return f"{_OPENERS[relation][opener]} {_OBJECTS[relation][obj]}?"


def _grid_paraphrase_cells() -> list[tuple[int, int]]:
    rest = [(o, b) for o in range(5) for b in range(4) if o != b and (o, b) not in _HELDOUT_CELLS]
    return [*_HELDOUT_CELLS, *rest]


def _paraphrases(relation: str) -> tuple[str, ...]:
    heldout = tuple(_question(relation, o, b) for o, b in _HELDOUT_CELLS)
    if relation not in _FRAMES:  # "country" has no named form: the opener/object grid
        return tuple(_question(relation, o, b) for o, b in _grid_paraphrase_cells())
    framed = (f.format(x=obj) for f in _FRAMES[relation] for obj in _OBJECTS[relation])
    return (*heldout, *framed)


TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    r: tuple(_question(r, i, i) for i in range(4)) for r in RELATIONS
}
HELDOUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    r: tuple(_question(r, o, b) for o, b in _HELDOUT_CELLS) for r in RELATIONS
}
PARAPHRASE_TEMPLATES: dict[str, tuple[str, ...]] = {r: _paraphrases(r) for r in RELATIONS}
# Image-free questions about a named country: "{x}" is `country_phrase(code)`. Training asks
# the 4 training openers and every frame; the held-out opener is kept for evaluation.
TEXT_TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    r: (*(f"{_OPENERS[r][i]} {{x}}?" for i in range(4)), *_FRAMES[r]) for r in ITEM_RELATIONS
}
TEXT_HELDOUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    r: (f"{_OPENERS[r][4]} {{x}}?",) for r in ITEM_RELATIONS
}
# The image-free locality questions of the annotator: the plainest wordings.
TEXT_LOCALITY_TEMPLATES: dict[str, tuple[str, ...]] = {
    r: TEXT_TRAIN_TEMPLATES[r][:4] for r in ITEM_RELATIONS
}
TEMPLATES_VERSION = "2"


def _country(code: str) -> Country:
    try:
        return COUNTRY_BY_CODE[code]
    except KeyError:
        raise KeyError(f"unknown flagworld country code {code!r}") from None


def answer(code: str, relation: str) -> str:
    """The true answer of `relation` ("capital", ...) for the country `code`, written as
    VQA answers are: lower case, words separated by spaces ("mexico city", "us dollar")."""
    if relation not in RELATIONS:
        raise KeyError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
    country = _country(code)
    value = country.name if relation == "country" else getattr(country, relation)
    return value.lower()


_WITH_ARTICLE = frozenset({"NL", "US"})  # "the flag of the Netherlands"


def country_phrase(code: str) -> str:
    """How a question names the country: "peru", "ivory coast", "the netherlands"."""
    article = "the " if code in _WITH_ARTICLE else ""
    return f"{article}{_country(code).display_name}".lower()


def text_question(template: str, code: str) -> str:
    """An image-free question: a `TEXT_*_TEMPLATES` entry about the country `code`."""
    return template.format(x=country_phrase(code))


def text_questions(
    relation: str, templates: dict[str, tuple[str, ...]] | None = None
) -> list[tuple[str, str, str]]:
    """(code, question, answer) of every country asked in every template of `relation`
    (default: the training templates)."""
    table = TEXT_TRAIN_TEMPLATES if templates is None else templates
    return [
        (c.code, text_question(t, c.code), answer(c.code, relation))
        for t in table[relation]
        for c in COUNTRIES
    ]


_WORD = re.compile(r"[^\s?,]+|[?,]")


def words(text: str) -> list[str]:
    """Split text into vocabulary words: on spaces, with "?" and "," as words of their own
    (as the tiny VLM's tokenizer splits them)."""
    return _WORD.findall(text)


@functools.cache
def _vocabulary() -> tuple[str, ...]:
    texts: list[str] = list(COUNTERFACTUAL_CITIES)
    for table in (TRAIN_TEMPLATES, HELDOUT_TEMPLATES, PARAPHRASE_TEMPLATES):
        texts += [t for templates in table.values() for t in templates]
    for table in (TEXT_TRAIN_TEMPLATES, TEXT_HELDOUT_TEMPLATES):
        texts += [text_question(t, c.code) for ts in table.values() for t in ts for c in COUNTRIES]
    texts += [answer(c.code, r) for c in COUNTRIES for r in RELATIONS]
    return tuple(sorted({w for text in texts for w in words(text)}))


def vocabulary() -> list[str]:
    """Every word of every question (flag and named-country), every answer and every
    counterfactual city; sorted."""
    return list(_vocabulary())


def flag_object(code: str) -> str:
    """The image object text of a country's flag: "the flag of Ivory Coast"."""
    article = "the " if code in _WITH_ARTICLE else ""
    return f"the flag of {article}{_country(code).display_name}"


def country_for_object(text: str) -> str:
    """Map an object text such as "the flag of France" (or a bare name/code) to its code."""
    key = text.strip().rstrip(".").lower()
    for prefix in ("the flag of ", "a flag of ", "flag of "):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    key = key.replace("_", " ").strip()
    key = key.removeprefix("the ")
    for country in COUNTRIES:
        if key in (country.display_name.lower(), country.code.lower()):
            return country.code
    raise KeyError(f"no flagworld country matches {text!r}")


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------

SUPERSAMPLE = 4
FILL = 0.9  # the clean flag fills 90 % of the canvas along its longer side
CLEAN_BACKGROUND: RGB = (128, 128, 128)


def _fitted_size(aspect: float, size: int) -> tuple[int, int]:
    """Width and height of a flag fitted into a FILL*size square."""
    box = FILL * size
    w, h = (box, box / aspect) if aspect >= 1 else (box * aspect, box)
    return max(1, round(w)), max(1, round(h))


def _draw_part(draw: ImageDraw.ImageDraw, part: Part, w: int, h: int) -> None:
    if isinstance(part, Stripes):
        x0, y0, x1, y1 = part.box[0] * w, part.box[1] * h, part.box[2] * w, part.box[3] * h
        weights = part.weights or (1.0,) * len(part.colors)
        total, acc = sum(weights), 0.0
        for color, weight in zip(part.colors, weights, strict=True):
            a, acc = acc / total, acc + weight
            b = acc / total
            if part.vertical:
                draw.rectangle((x0 + a * (x1 - x0), y0, x0 + b * (x1 - x0), y1), fill=color)
            else:
                draw.rectangle((x0, y0 + a * (y1 - y0), x1, y0 + b * (y1 - y0)), fill=color)
    elif isinstance(part, Rect):
        x0, y0, x1, y1 = part.box
        draw.rectangle((x0 * w, y0 * h, x1 * w, y1 * h), fill=part.color)
    elif isinstance(part, Disc):
        cx, cy, r = part.cx * w, part.cy * h, part.r * h
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=part.color)
    elif isinstance(part, Star):
        cx, cy, r = part.cx * w, part.cy * h, part.r * h
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.382
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=part.color)
    elif isinstance(part, Cross):
        x0, y0, x1, y1 = part.box[0] * w, part.box[1] * h, part.box[2] * w, part.box[3] * h
        half = part.t * h / 2
        cx, cy = part.cx * w, part.cy * h
        draw.rectangle((x0, cy - half, x1, cy + half), fill=part.color)
        draw.rectangle((cx - half, y0, cx + half, y1), fill=part.color)


@functools.cache
def _hires_flag(code: str, size: int) -> Image.Image:
    """The flag alone, drawn at SUPERSAMPLE x its size on a `size` canvas (cached)."""
    w, h = _fitted_size(_country(code).flag.aspect, size)
    w, h = w * SUPERSAMPLE, h * SUPERSAMPLE
    img = Image.new("RGB", (w, h), W)
    draw = ImageDraw.Draw(img)
    for part in _country(code).flag.parts:
        _draw_part(draw, part, w, h)
    return img


@functools.cache
def _clean(code: str, size: int) -> Image.Image:
    flag = _hires_flag(code, size).reduce(SUPERSAMPLE)  # box filter = exact supersampling
    canvas = Image.new("RGB", (size, size), CLEAN_BACKGROUND)
    canvas.paste(flag, ((size - flag.width) // 2, (size - flag.height) // 2))
    return canvas


def render_flag(code: str, size: int = 64) -> Image.Image:
    """The clean flag of `code`, centred on a grey `size` x `size` RGB canvas."""
    return _clean(code, size).copy()


def _margin_color(rng: random.Random) -> RGB:
    if rng.random() < 0.5:
        g = rng.randint(40, 215)
        return (g, g, g)
    return (rng.randint(20, 235), rng.randint(20, 235), rng.randint(20, 235))


def render_variant(code: str, rng: random.Random, size: int = 64) -> Image.Image:
    """The flag re-rendered with augmentation: scale 0.6-1.0, a position that may run a
    little off the canvas, +-10 degree rotation, grey or coloured margin, brightness
    x0.85-1.15 and Gaussian noise sigma 2-8. Deterministic given the state of `rng`."""
    scale = rng.uniform(0.6, 1.0)
    angle = rng.uniform(-10.0, 10.0)
    margin = _margin_color(rng)
    brightness = rng.uniform(0.85, 1.15)
    sigma = rng.uniform(2.0, 8.0)
    hires = _hires_flag(code, size)
    # Resize and rotate at 2x, then box-downscale: cheap antialiased edges.
    w2 = max(2, round(hires.width * scale / SUPERSAMPLE * 2))
    h2 = max(2, round(hires.height * scale / SUPERSAMPLE * 2))
    flag = hires.resize((w2, h2), Image.Resampling.BOX).convert("RGBA")
    flag = flag.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    flag = flag.resize((max(1, flag.width // 2), max(1, flag.height // 2)), Image.Resampling.BOX)
    # Up to 10 % of the flag may leave the canvas on either side.
    slack_x = (size - flag.width) / 2 + 0.1 * flag.width
    slack_y = (size - flag.height) / 2 + 0.1 * flag.height
    x = round((size - flag.width) / 2 + rng.uniform(-slack_x, slack_x))
    y = round((size - flag.height) / 2 + rng.uniform(-slack_y, slack_y))
    canvas = Image.new("RGB", (size, size), margin)
    canvas.paste(flag, (x, y), flag)
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    pixels = np.asarray(canvas, dtype=np.float32) * brightness
    pixels += noise_rng.normal(0.0, sigma, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def to_png(img: Image.Image) -> bytes:
    """Encode an image as PNG bytes (how images travel through the pipeline)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# The source
# ---------------------------------------------------------------------------------------


def item_id(code: str, relation: str) -> str:
    return f"flagworld-{code}-{relation}"


def parse_item_id(value: str) -> tuple[str, str]:
    """`flagworld-FR-capital` -> ("FR", "capital"); KeyError with a reason otherwise."""
    parts = value.split("-")
    if len(parts) != 3 or parts[0] != "flagworld":
        raise KeyError(f"not a flagworld item id (expected flagworld-<CODE>-<relation>): {value!r}")
    _, code, relation = parts
    if code not in COUNTRY_BY_CODE:
        raise KeyError(f"unknown flagworld country code {code!r} in {value!r}")
    if relation not in ITEM_RELATIONS:
        raise KeyError(f"unknown relation {relation!r} in {value!r}; expected {ITEM_RELATIONS}")
    return code, relation


class FlagworldSource:
    """The flagworld as a pipeline source: one item per (country, relation).

    `question_seed=None` asks every item with its relation's first training template;
    an int picks one of the training templates per item, deterministically.
    """

    name = "flagworld"

    def __init__(
        self,
        size: int = 64,
        question_seed: int | None = None,
        relations: tuple[str, ...] = ITEM_RELATIONS,
    ) -> None:
        unknown = set(relations) - set(ITEM_RELATIONS)
        if unknown:
            raise ValueError(f"unknown flagworld relations {sorted(unknown)}; use {ITEM_RELATIONS}")
        self.size = size
        self.question_seed = question_seed
        self.relations = tuple(relations)

    def list_ids(self, limit: int | None = None, seed: int = 0) -> list[str]:
        ids = [item_id(c.code, r) for c in COUNTRIES for r in self.relations]
        random.Random(f"flagworld-ids:{seed}").shuffle(ids)
        return ids if limit is None else ids[:limit]

    def question_for(self, code: str, relation: str) -> str:
        templates = TRAIN_TEMPLATES[relation]
        if self.question_seed is None:
            return templates[0]
        rng = random.Random(f"flagworld-question:{self.question_seed}:{code}:{relation}")
        return templates[rng.randrange(len(templates))]

    def load_items(self, ids: list[str]) -> list[SourceItem | Rejection]:
        out: list[SourceItem | Rejection] = []
        for value in ids:
            try:
                code, relation = parse_item_id(value)
            except KeyError as exc:
                out.append(Rejection(item_id=value, stage="gather", reason=str(exc.args[0])))
                continue
            out.append(
                SourceItem(
                    item_id=value,
                    source=self.name,
                    question_id=value,
                    image_id=code,
                    question_type=relation,
                    question=self.question_for(code, relation),
                    answers=[answer(code, relation)] * 10,  # OK-VQA has 10 answers per item
                    image=to_png(render_flag(code, self.size)),
                )
            )
        return out
