"""Concept vocabulary for salient-concept detection (METHODS.md section 3).

    words = frequent_nouns(captions, k=400)       the K most frequent nouns of a caption corpus
    C     = embed_concepts(words, backbone)        prompt ensemble through the backbone's text side
    save_concepts(out_dir, words, C, concept_meta(backbone, templates))
    words, C, meta = load_concepts(out_dir, expect_backbone=backbone)

Nouns come from a real part-of-speech tagger that needs no downloads: the Brill-style tagger of
pattern.en that TextBlob ships inside its wheel (`pip install textblob`: a Penn Treebank lexicon
plus contextual and morphological rules, pure Python, no pickle), with one correction rule (see
`_tagged_noun_counts`). Without TextBlob a documented heuristic is used (`heuristic_nouns`);
docs/pcm.md measures how close it gets. Plural nouns count as their singular
when the singular also occurs in the corpus ("dogs" -> "dog", "people" -> "person", "buses"
-> "bus"; "clothes" and "glasses" stay). A user-supplied word list skips all of this.

Files (no pickle): `concepts.safetensors` ("embeddings" [K,D] float32) and `concepts.json`
(words, backbone spec + fingerprint, templates, how the words were chosen).
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..data.records import DataError
from ..errors import CheckpointError, PcmnetError

log = logging.getLogger(__name__)

JSON_NAME, TENSOR_NAME, FORMAT = "concepts.json", "concepts.safetensors", "pcmnet-concepts"

# A few of CLIP's ImageNet prompt templates (Radford et al. 2021, "prompt ensembling"), keeping
# the ones that describe an ordinary photo (no "origami", "video game", "tattoo", ...).
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a cropped photo of a {}.",
    "itap of a {}.",
)

# Nouns that are frequent in captions but name no object to find in an image ("in front of",
# "on top of", "a group of", "a picture of"). Pass exclude=() to keep them.
NON_CONCEPT_NOUNS = frozenset("""
    front top side middle back bottom couple group lot bunch pair view picture image photo
    photograph shot close background foreground area edge end way kind type sort variety number
    piece part something someone thing
""".split())

_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")
_NOUN_TAGS = ("NN", "NNS")
_NOUN_CONTEXT = ("DT", "JJ", "PRP$", "POS", "NN")  # tags after which a "VB" is really a noun


# ------------------------------------------------------------------------------------------------
# choosing the words


def tokenize(caption: str) -> list[str]:
    """Lowercase words (letters and inner hyphens); digits and punctuation are dropped."""
    return _WORD.findall(caption.lower())


def has_tagger() -> bool:
    try:
        import textblob.en  # noqa: F401
    except ImportError:
        return False
    return True


def frequent_nouns(captions: list[str], k: int = 400, tagger: str = "auto",
                   exclude=NON_CONCEPT_NOUNS, min_len: int = 2) -> list[str]:
    """The k most frequent nouns of `captions` (most frequent first; ties alphabetical).

    tagger: "textblob" (pattern.en tagger shipped with TextBlob), "heuristic" (no dependency,
            see `heuristic_nouns`) or "auto" (textblob when installed, else the heuristic).
    """
    if tagger == "auto":
        tagger = "textblob" if has_tagger() else "heuristic"
        if tagger == "heuristic":
            log.warning("TextBlob is not installed: choosing nouns with a heuristic "
                        "(pip install textblob for a real part-of-speech tagger)")
    if tagger == "textblob":
        if not has_tagger():
            raise PcmnetError("the textblob tagger needs TextBlob: pip install textblob")
        counts = _tagged_noun_counts(captions)
    elif tagger == "heuristic":
        counts = heuristic_nouns(captions)
    else:
        raise PcmnetError(f"unknown tagger '{tagger}' (auto, textblob or heuristic)")
    counts = _merge_plurals(counts, _vocabulary(captions))
    keep = [(w, c) for w, c in counts.items() if len(w) >= min_len and w not in exclude]
    keep.sort(key=lambda wc: (-wc[1], wc[0]))
    return [w for w, _ in keep[:k]]


def _tagged_noun_counts(captions: list[str]) -> Counter:
    """Occurrences tagged NN/NNS by the pattern.en tagger (lowercased text, no tokenizer data).

    One correction rule on top, in the tagger's own (Brill) style: a base-form verb right after a
    determiner, adjective, possessive or singular noun is a noun. The lexicon's verb reading
    otherwise wins for "a sink", "a brown bear", "a teddy bear", "a computer monitor", which are
    among the most frequent objects of image captions.
    """
    from textblob.en import tag

    counts: Counter = Counter()
    for cap in captions:
        prev = ""
        for word, pos in tag(" ".join(tokenize(cap))):
            if pos == "VB" and prev in _NOUN_CONTEXT:
                pos = "NN"
            if pos in _NOUN_TAGS:
                counts[word] += 1
            prev = pos
    return counts


def _vocabulary(captions: list[str]) -> Counter:
    return Counter(w for cap in captions for w in tokenize(cap))


def _merge_plurals(counts: Counter, vocabulary: Counter) -> Counter:
    """Count a plural as its singular when the singular occurs in the corpus (of several
    candidates, the most frequent one: "horses" -> "horse", not "hors")."""
    out: Counter = Counter()
    for word, n in counts.items():
        found = [s for s in singular_candidates(word) if vocabulary[s] > 0]
        out[max(found, key=lambda s: vocabulary[s]) if found else word] += n
    return out


_IRREGULAR = {"people": "person", "men": "man", "women": "woman", "children": "child",
              "feet": "foot", "teeth": "tooth", "mice": "mouse", "geese": "goose", "knives": "knife",
              "leaves": "leaf", "shelves": "shelf", "wolves": "wolf", "loaves": "loaf",
              "halves": "half", "calves": "calf", "scarves": "scarf", "wives": "wife",
              "clothes": "clothes", "glasses": "glasses", "jeans": "jeans", "pants": "pants",
              "news": "news"}


def singular_candidates(word: str) -> list[str]:
    """Possible singulars of `word` (irregular list, else the -ies/-es/-s rules). Callers keep
    the most frequent candidate that the corpus contains, which weeds out "bus" -> "bu"."""
    if word in _IRREGULAR:
        return [_IRREGULAR[word]]
    out = []
    if len(word) > 4 and word.endswith("ies"):
        out.append(word[:-3] + "y")
    if len(word) > 3 and word.endswith("es"):
        out.append(word[:-2])
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        out.append(word[:-1])
    return out


# -- the heuristic (no tagger installed) ---------------------------------------------------------

# Function words and adverbs: never nouns, and they end a noun phrase.
_FUNCTION = frozenset("""
    a an the this that these those some any each every all both no another other such what which who
    whom whose there here it its itself he she they them their his her him himself herself
    themselves we us our you your i me my one someone something is are was were be been being am
    has have had do does did will would can could may might should must shall not and or but nor so
    yet if then than as while when where because though although of in on at to for from by with
    without into onto upon over under above below across along around through between behind beside
    besides near nearby next toward towards up down out off about against among beneath underneath
    inside outside past via during before after until like within atop alongside aboard away
    together alone apart upside overhead outdoors indoors very too also just only either neither
    two three four five six seven eight nine ten eleven twelve several many few much more most
""".split())

# Verbs of everyday captions, base forms; every inflection of these is a verb.
_VERBS = """
    sit stand lay lie eat wear carry hold fly pose run wait hang cover fill throw catch hit skate
    talk use read prepare graze smile pull push sleep serve decorate perch open try take get make go
    come travel float move load feed kick help follow cook bake fry chop see appear seem contain
    feature include surround attach mount arrange gather huddle tie wrap fold glaze enjoy perform
    attempt approach reflect pass bite observe stare sniff lick chase climb cuddle grab lean reach
    turn tilt stick sell leave
""".split()
# Words that are frequent caption nouns as well as verbs: only their -ing/-ed forms count as verbs.
_NOUN_VERBS = """
    sign board park light top picture photograph view face drink dress seat set rest work surf ski
    play show paint frost build dock fence race trick snack shop kite sail hand head line display
    stop ride walk watch swing jump point pile brush cross place slice
""".split()
_IRREGULAR_VERBS = frozenset("""
    sat stood rode held laid lying lies ate eaten flew flown worn drove driven ran hung thrown caught
    taken made gone went came built seen shown put sitting getting cutting swimming shopping doing
    having left
""".split())
# Frequent caption nouns that end in -ing / -ed (which otherwise mark verbs).
_ING_ED_NOUNS = frozenset("""
    building ceiling clothing painting drawing meeting wedding evening morning icing frosting topping
    railing awning sibling pudding dumpling stuffing filling dressing parking crossing bedding
    seed speed shed sled bed
""".split())

# Adjectives of everyday captions (colors, size, age, shape, state, material).
_ADJECTIVES = frozenset("""
    white black red blue green yellow brown orange pink purple gray grey silver golden gold dark light
    bright colorful large small big little tall short long young old new huge tiny giant wide narrow
    high low full empty open closed clean dirty wet dry hot cold fresh busy different various same
    single double round square flat wooden metal plastic grassy sandy snowy rocky paved cloudy sunny
    clear close far nice good great beautiful pretty cute lovely happy sad adult male female wild
    ready concrete outdoor indoor rear left right upper lower several other multiple
    electric antique vintage stainless traditional professional commercial residential urban rural
    modern older younger
""".split())


def _verb_forms(base: str, with_base: bool = True) -> set[str]:
    stem = base[:-1] if base.endswith("e") and not base.endswith("ee") else base
    double = base + base[-1] if re.fullmatch(r"[^aeiou]*[aeiou][bdgmnprt]", base) else base
    forms = {stem + "ing", double + "ing", stem + "ed", base + "d", double + "ed"}
    if with_base:
        forms |= {base, base + "s", base + "es"}
    if base.endswith("y") and base[-2] not in "aeiou":
        forms |= {base[:-1] + "ied"} | ({base[:-1] + "ies"} if with_base else set())
    return forms


_VERB_FORMS = frozenset(
    {f for v in _VERBS for f in _verb_forms(v)} | {f for v in _NOUN_VERBS for f in _verb_forms(v, False)}
    | _IRREGULAR_VERBS) - _ING_ED_NOUNS


def _not_a_noun(word: str) -> bool:
    """Known function word, verb form or adjective, or a suffix that marks a verb or adverb."""
    return (word in _FUNCTION or word in _VERB_FORMS or word in _ADJECTIVES
            or (len(word) > 5 and word.endswith(("ing", "ed")) and word not in _ING_ED_NOUNS)
            or (len(word) > 4 and word.endswith("ly")))


def heuristic_nouns(captions: list[str], min_head_ratio: float = 0.35) -> Counter:
    """Noun counts without a tagger: a word is a noun if it usually *ends a noun phrase*.

    Each caption is cut at function words (determiners, pronouns, prepositions, conjunctions,
    auxiliaries, number words, some adverbs) and at verb forms (listed verbs, words in -ing/-ed);
    the last word of every piece is its head ("a [large brown dog] sitting on a [couch]" -> dog,
    couch). A word that is a head in at least `min_head_ratio` of its occurrences, and is no listed
    adjective, verb form or -ly adverb, counts as a noun with all its occurrences. Good on the
    frequent words of image captions (see docs/pcm.md), not a general tagger; noun modifiers that
    rarely head a phrase ("teddy" bear, "cell" phone) are missed.
    """
    total: Counter = Counter()
    heads: Counter = Counter()
    for cap in captions:
        piece: list[str] = []
        for word in tokenize(cap) + [""]:  # "" closes the last piece
            if not word or word in _FUNCTION or (_not_a_noun(word) and word not in _ADJECTIVES):
                if piece:
                    heads[piece[-1]] += 1
                piece = []
            else:
                piece.append(word)
            if word:
                total[word] += 1
    return Counter({w: n for w, n in total.items()
                    if heads[w] >= min_head_ratio * n and not _not_a_noun(w)})


def read_word_list(path: str | Path) -> list[str]:
    """A user word list: one concept per line (blank lines and '#' comments skipped, duplicates
    dropped, order kept)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    words = list(dict.fromkeys(w for w in (ln.split("#", 1)[0].strip() for ln in lines) if w))
    if not words:
        raise DataError(f"{path}: no words (one concept per line)")
    return words


# ------------------------------------------------------------------------------------------------
# embedding, saving, loading


def check_templates(templates) -> tuple[str, ...]:
    templates = tuple(templates)
    if not templates:
        raise PcmnetError("at least one prompt template is needed")
    for t in templates:
        if t.count("{}") != 1:
            raise PcmnetError(f"prompt template {t!r} must contain '{{}}' exactly once")
    return templates


@torch.no_grad()
def embed_concepts(words: list[str], backbone, templates=DEFAULT_TEMPLATES,
                   batch_size: int = 256) -> torch.Tensor:
    """C [K,D]: for each word, the mean of its normalized template embeddings, normalized again
    (CLIP's prompt ensembling)."""
    templates = check_templates(templates)
    total = torch.zeros(len(words), backbone.embed_dim)
    for template in templates:
        total += backbone.embed_texts([template.format(w) for w in words], batch_size=batch_size)
    return F.normalize(total / len(templates), dim=-1)


def concept_meta(backbone, templates=DEFAULT_TEMPLATES, **source) -> dict:
    """What a concept file records: the backbone that embedded it, the templates, and `source`
    (how the words were chosen: corpus, k, tagger, or a word-list file)."""
    return {"backbone": {"spec": backbone.spec(), "fingerprint": backbone.fingerprint(),
                         "embed_dim": backbone.embed_dim},
            "templates": list(check_templates(templates)), "source": source}


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_concepts(out_dir: str | Path, words: list[str], embeddings: torch.Tensor, meta: dict) -> Path:
    """Write concepts.safetensors + concepts.json into `out_dir` (each file atomically)."""
    if embeddings.ndim != 2 or embeddings.shape[0] != len(words):
        raise ValueError(f"{len(words)} words but embeddings of shape {tuple(embeddings.shape)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    emb = embeddings.detach().float().cpu().contiguous()
    _atomic_write(out / TENSOR_NAME, lambda p: save_file({"embeddings": emb}, str(p)))
    doc = {"format": FORMAT, "version": 1, "num_concepts": len(words), "embed_dim": emb.shape[1],
           "words": list(words), "meta": meta}
    _atomic_write(out / JSON_NAME, lambda p: p.write_text(json.dumps(doc, indent=1) + "\n"))
    return out


def load_concepts(path: str | Path, expect_backbone=None) -> tuple[list[str], torch.Tensor, dict]:
    """(words, C [K,D], meta) from a concept directory (or its concepts.json).

    expect_backbone: a Backbone or a fingerprint string; a concept file embedded by another
    backbone raises CheckpointError (its vectors live in another space).
    """
    path = Path(path)
    folder = path.parent if path.name == JSON_NAME else path
    jpath, tpath = folder / JSON_NAME, folder / TENSOR_NAME
    for p in (jpath, tpath):
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (build a concept vocabulary with `pcmnet concepts`)")
    try:
        doc = json.loads(jpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{jpath}: not a pcmnet concept file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{jpath}: not a pcmnet concept file (format is not '{FORMAT}')")
    try:
        emb = load_file(str(tpath))["embeddings"]
    except Exception as e:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{tpath}: unreadable concept embeddings ({type(e).__name__}: {e})") from None
    words, meta = doc["words"], doc.get("meta", {})
    if emb.ndim != 2 or emb.shape[0] != len(words):
        raise CheckpointError(f"{tpath}: {tuple(emb.shape)} embeddings for {len(words)} words in "
                              f"{jpath.name} (files from different runs?)")
    if expect_backbone is not None:
        want = expect_backbone if isinstance(expect_backbone, str) else expect_backbone.fingerprint()
        have = meta.get("backbone", {}).get("fingerprint")
        if have != want:
            spec = meta.get("backbone", {}).get("spec", {})
            raise CheckpointError(f"{jpath}: concepts were embedded with backbone {spec or '?'} "
                                  f"(fingerprint {have}), not {want}; rebuild them with `pcmnet concepts`")
    return words, emb, meta
