"""A small hand-written lexicon that turns a synthetic scene's short-caption plan into English, German,
French and Spanish.

Only what the synthetic world needs: indefinite noun phrases "(size) colour shape" with the right gender,
case and agreement, four spatial relations, lists and numbers 4-6. Every language realises the same plan,
so the four captions of an image are translations of each other.

Grammar notes (why the tables look the way they do):
- German: adjectives after the indefinite article take mixed declension, nominative ``ein roter Kreis`` /
  ``eine rote Raute`` / ``ein rotes Dreieck``, dative (after ``von``, ``über``, ``unter``) ``einem roten Kreis`` /
  ``einer roten Raute``. Colours that do not decline (lila, orange, rosa) are replaced by declinable forms
  (violett, orangefarben, rosafarben).
- French: the size comes before the noun (``un grand cercle``), the colour after it, agreeing in gender
  (``une étoile verte``); "medium" is ``de taille moyenne`` after the colour; ``de`` + ``un`` elides to ``d'un``.
- Spanish: colour then size after the noun (``un círculo rojo grande``), both agreeing in gender.
"""

from __future__ import annotations

LANGUAGES = ("en", "de", "fr", "es")

# colour -> per-language forms. de: adjective stem; fr/es: (masculine, feminine).
COLOURS: dict[str, dict] = {
    "red": {"de": "rot", "fr": ("rouge", "rouge"), "es": ("rojo", "roja")},
    "green": {"de": "grün", "fr": ("vert", "verte"), "es": ("verde", "verde")},
    "blue": {"de": "blau", "fr": ("bleu", "bleue"), "es": ("azul", "azul")},
    "yellow": {"de": "gelb", "fr": ("jaune", "jaune"), "es": ("amarillo", "amarilla")},
    "purple": {"de": "violett", "fr": ("violet", "violette"), "es": ("morado", "morada")},
    "orange": {"de": "orangefarben", "fr": ("orange", "orange"), "es": ("naranja", "naranja")},
    "pink": {"de": "rosafarben", "fr": ("rose", "rose"), "es": ("rosa", "rosa")},
    "brown": {"de": "braun", "fr": ("marron", "marron"), "es": ("marrón", "marrón")},
    "white": {"de": "weiß", "fr": ("blanc", "blanche"), "es": ("blanco", "blanca")},
    "black": {"de": "schwarz", "fr": ("noir", "noire"), "es": ("negro", "negra")},
    "cyan": {"de": "türkis", "fr": ("turquoise", "turquoise"), "es": ("turquesa", "turquesa")},
}

# shape -> per-language (noun, gender); gender m / f / n.
SHAPES: dict[str, dict] = {
    "circle": {"de": ("Kreis", "m"), "fr": ("cercle", "m"), "es": ("círculo", "m")},
    "square": {"de": ("Quadrat", "n"), "fr": ("carré", "m"), "es": ("cuadrado", "m")},
    "triangle": {"de": ("Dreieck", "n"), "fr": ("triangle", "m"), "es": ("triángulo", "m")},
    "star": {"de": ("Stern", "m"), "fr": ("étoile", "f"), "es": ("estrella", "f")},
    "diamond": {"de": ("Raute", "f"), "fr": ("losange", "m"), "es": ("rombo", "m")},
    "hexagon": {"de": ("Sechseck", "n"), "fr": ("hexagone", "m"), "es": ("hexágono", "m")},
    "cross": {"de": ("Kreuz", "n"), "fr": ("croix", "f"), "es": ("cruz", "f")},
    "ring": {"de": ("Ring", "m"), "fr": ("anneau", "m"), "es": ("anillo", "m")},
}

# size -> per-language forms. de: adjective stem; fr: (m, f, position "pre"|"post"); es: (m, f).
SIZES: dict[str, dict] = {
    "small": {"de": "klein", "fr": ("petit", "petite", "pre"), "es": ("pequeño", "pequeña")},
    "medium": {"de": "mittelgroß", "fr": ("de taille moyenne", "de taille moyenne", "post"),
               "es": ("mediano", "mediana")},
    "large": {"de": "groß", "fr": ("grand", "grande", "pre"), "es": ("grande", "grande")},
}

NUMBERS = {
    "en": {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"},
    "de": {1: "eins", 2: "zwei", 3: "drei", 4: "vier", 5: "fünf", 6: "sechs", 7: "sieben", 8: "acht"},
    "fr": {1: "un", 2: "deux", 3: "trois", 4: "quatre", 5: "cinq", 6: "six", 7: "sept", 8: "huit"},
    "es": {1: "uno", 2: "dos", 3: "tres", 4: "cuatro", 5: "cinco", 6: "seis", 7: "siete", 8: "ocho"},
}

RELATIONS = {  # relation -> phrase that precedes the second noun phrase
    "en": {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"},
    "de": {"left": "links von", "right": "rechts von", "above": "über", "below": "unter"},
    "fr": {"left": "à gauche de", "right": "à droite de", "above": "au-dessus de", "below": "en dessous de"},
    "es": {"left": "a la izquierda de", "right": "a la derecha de", "above": "encima de", "below": "debajo de"},
}

# "a photo of ...": the frames a single-object caption may have, each with its article.
FRAMES = {
    "en": {"photo": "a photo", "picture": "a picture", "image": "an image", "drawing": "a drawing"},
    "de": {"photo": "ein Foto", "picture": "ein Bild", "image": "eine Abbildung", "drawing": "eine Zeichnung"},
    "fr": {"photo": "une photo", "picture": "une illustration", "image": "une image", "drawing": "un dessin"},
    "es": {"photo": "una foto", "picture": "una ilustración", "image": "una imagen", "drawing": "un dibujo"},
}

# The zero-shot prompt templates of both demo worlds; ``{}`` receives the class name with its article ("a red circle",
# "an ankle boot").
ZERO_SHOT_TEMPLATES = (
    "a photo of {}.",
    "a picture of {}.",
    "an image of {}.",
    "a drawing of {}.",
    "{}.",
)
# The frame of each template as ``FRAMES`` names it (None: the bare noun phrase), so that the templates can be realised
# in every language of the lexicon (the worlds' ``translated_prompts``).
ZERO_SHOT_TEMPLATE_FRAMES = ("photo", "picture", "image", "drawing", None)

_DE_ARTICLE = {("nom", "m"): "ein", ("nom", "f"): "eine", ("nom", "n"): "ein",
               ("dat", "m"): "einem", ("dat", "f"): "einer", ("dat", "n"): "einem"}
_DE_ENDING = {("nom", "m"): "er", ("nom", "f"): "e", ("nom", "n"): "es",
              ("dat", "m"): "en", ("dat", "f"): "en", ("dat", "n"): "en"}


def check_vocabulary(colours, shapes, sizes) -> None:
    """Raise ``ValueError`` naming every colour, shape or size that the lexicon cannot translate."""
    missing = [f"colour {c!r}" for c in colours if c not in COLOURS]
    missing += [f"shape {s!r}" for s in shapes if s not in SHAPES]
    missing += [f"size {s!r}" for s in sizes if s not in SIZES]
    if missing:
        raise ValueError(
            f"the lexicon in languages.py has no entry for {', '.join(missing)}; known colours "
            f"{sorted(COLOURS)}, shapes {sorted(SHAPES)}, sizes {sorted(SIZES)}"
        )


def english_article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def class_prompt(class_name: str) -> str:
    """A synthetic-world class name with its article, for ``ZERO_SHOT_TEMPLATES``: "red circle" -> "a red circle"."""
    return f"{english_article(class_name)} {class_name}"


def noun_phrase(lang: str, colour: str, shape: str, size: str | None = None, case: str = "nom") -> str:
    """Indefinite noun phrase, e.g. ``a large red circle`` / ``einem großen roten Kreis`` (``case="dat"``)."""
    if lang == "en":
        words = " ".join(w for w in (size, colour, shape) if w)
        return f"{english_article(words)} {words}"
    if lang == "de":
        noun, gender = SHAPES[shape]["de"]
        ending = _DE_ENDING[case, gender]
        adjectives = [SIZES[size]["de"] + ending] if size else []
        adjectives.append(COLOURS[colour]["de"] + ending)
        return " ".join([_DE_ARTICLE[case, gender], *adjectives, noun])
    if lang == "fr":
        noun, gender = SHAPES[shape]["fr"]
        g = 0 if gender == "m" else 1
        article = "un" if gender == "m" else "une"
        colour_word = COLOURS[colour]["fr"][g]
        if size is None:
            return f"{article} {noun} {colour_word}"
        size_forms = SIZES[size]["fr"]
        if size_forms[2] == "pre":
            return f"{article} {size_forms[g]} {noun} {colour_word}"
        return f"{article} {noun} {colour_word} {size_forms[g]}"
    if lang == "es":
        noun, gender = SHAPES[shape]["es"]
        g = 0 if gender == "m" else 1
        words = ["un" if gender == "m" else "una", noun, COLOURS[colour]["es"][g]]
        if size is not None:
            words.append(SIZES[size]["es"][g])
        return " ".join(words)
    raise ValueError(f"unknown language {lang!r}; known: {LANGUAGES}")


def _after_de(lang: str, phrase: str) -> str:
    """``de`` + an indefinite noun phrase: French elides (``d'un``), the others just join."""
    if lang == "fr":
        return "d'" + phrase
    return "de " + phrase


def indefinite_noun(lang: str, noun: str, gender: str, case: str = "nom") -> str:
    """A bare noun with its indefinite article in ``de`` / ``fr`` / ``es`` (gender m / f / n): ``einem Pullover``
    (``case="dat"``), ``une robe``, ``una camiseta``."""
    if lang == "de":
        return f"{_DE_ARTICLE[case, gender]} {noun}"
    if lang == "fr":
        return f"{'un' if gender == 'm' else 'une'} {noun}"
    if lang == "es":
        return f"{'un' if gender == 'm' else 'una'} {noun}"
    raise ValueError(f"indefinite_noun takes de, fr or es, not {lang!r}")


def framed(lang: str, frame: str | None, phrase: str, dative: str | None = None) -> str:
    """``phrase`` in a frame of ``FRAMES`` ("a photo of" + phrase; ``None``: the phrase alone). German's frame
    takes the dative (``dative``: the phrase in the dative case)."""
    if frame is None:
        return phrase
    if lang == "de":
        return f"{FRAMES['de'][frame]} von {dative}"
    if lang == "en":
        return f"{FRAMES['en'][frame]} of {phrase}"
    return f"{FRAMES[lang][frame]} {_after_de(lang, phrase)}"


def _relation_phrase(lang: str, relation: str, second: tuple) -> str:
    rel = RELATIONS[lang][relation]
    if lang == "de":
        return f"{rel} {noun_phrase('de', *second, case='dat')}"
    if lang in ("fr", "es"):
        assert rel.endswith(" de") or rel == "de"
        return f"{rel[:-3]} {_after_de(lang, noun_phrase(lang, *second))}"
    return f"{rel} {noun_phrase(lang, *second)}"


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def realise_short_caption(plan: dict, lang: str) -> str:
    """Realise a short-caption plan (built by the synthetic world) in ``lang``.

    Plans (objects are ``(colour, shape, size_or_None)`` tuples):
      ``{"kind": "single", "object": o, "frame": f}``      -> "A photo of a large red circle." (f: a key of
                                                              ``FRAMES`` or None for "A large red circle.")
      ``{"kind": "pair", "objects": [a, b], "relation": r}`` -> "A red circle to the left of a small blue square."
      ``{"kind": "list", "objects": [a, b, c]}``             -> "A red circle, a blue square and a green star."
      ``{"kind": "many", "count": n, "objects": [a, b]}``    -> "Five shapes, among them a red circle and a blue star."
    """
    kind = plan["kind"]
    if kind == "single":
        dative = noun_phrase(lang, *plan["object"], case="dat") if lang == "de" else None
        text = framed(lang, plan.get("frame"), noun_phrase(lang, *plan["object"]), dative)
    elif kind == "pair":
        first, second = plan["objects"]
        text = f"{noun_phrase(lang, *first)} {_relation_phrase(lang, plan['relation'], second)}"
    elif kind == "list":
        phrases = [noun_phrase(lang, *o) for o in plan["objects"]]
        conj = {"en": "and", "de": "und", "fr": "et", "es": "y"}[lang]
        text = f"{', '.join(phrases[:-1])} {conj} {phrases[-1]}"
    elif kind == "many":
        a, b = (noun_phrase(lang, *o) for o in plan["objects"])
        n = NUMBERS[lang][plan["count"]]
        text = {"en": f"{n} shapes, among them {a} and {b}", "de": f"{n} Formen, darunter {a} und {b}",
                "fr": f"{n} formes, dont {a} et {b}", "es": f"{n} figuras, entre ellas {a} y {b}"}[lang]
    else:
        raise ValueError(f"unknown caption plan kind {kind!r}")
    return _capitalise(text) + "."
