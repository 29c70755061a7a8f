"""
The shapes world: a CPU-sized, offline stand-in for COCO.

Jin, "Semi-Supervised Image Captioning with CLIP" (arXiv 2306.15111), trains a
CLIP-prefix captioner on a few labelled images and then on many unlabelled ones,
using CLIP's image-text similarity as the reward. Nothing can be downloaded here,
so this file builds a tiny world where the same experiment fits on two CPU cores:

1. scenes of 1-3 coloured shapes and a renderer that draws them (64x64 RGB),
2. a caption grammar whose reference captions vary in informativeness like COCO's
   (full 45%, partial 40%, generic 15%), so that a CLIP reward has details to add,
3. a parser that reads any caption back into the claims it makes, so a caption can
   be scored against the scene's ground truth: precision of its claims measures
   hallucination, recall of the scene's facts measures informativeness.

Everything is deterministic given an explicit random.Random; no global RNG state.
"""

import itertools
import math
import random
import re

from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------
# the world's vocabulary

SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
           "yellow": (235, 200, 20), "purple": (140, 60, 180), "orange": (245, 130, 20)}
SIZES = {"small": 0.09, "large": 0.15}  # radius, as a fraction of the image side
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
ATTRS = ("size", "colour", "shape")  # the three facts every object carries
KIND_PROBS = {"full": 0.45, "partial": 0.40, "generic": 0.15}
BACKGROUND = (255, 255, 255)
EXTENT = 1.25  # every outline below fits in a box of half-side EXTENT * radius

# -----------------------------------------------------------------------------
# scenes

def _pick(rng, options):
    # like rng.choice, but always exactly one draw whatever len(options): a caption and
    # its corrupted twin then consume the rng identically and are worded alike (corrupt)
    return options[int(rng.random() * len(options))]

def _separated(a, b):
    # no overlap, and one clear relation: the centres are further apart than both
    # extents along one axis, and the other offset is at most half of that (< 27 deg)
    dx, dy = abs(a["x"] - b["x"]), abs(a["y"] - b["y"])
    major, minor = max(dx, dy), min(dx, dy)
    return major >= EXTENT * (SIZES[a["size"]] + SIZES[b["size"]]) + 0.02 and minor <= 0.5 * major

def _place(rng, objects, tries=20):
    # place the objects one by one, each clear of those before it; False if one finds no room
    for k, o in enumerate(objects):
        lo = EXTENT * SIZES[o["size"]] + 0.01
        for _ in range(tries):
            o["x"], o["y"] = round(rng.uniform(lo, 1 - lo), 3), round(rng.uniform(lo, 1 - lo), 3)
            if all(_separated(o, b) for b in objects[:k]):
                break
        else:
            return False
    return True

def sample_scene(rng):
    """Given a random.Random, a JSON-serializable scene {"objects": [{shape, colour, size, x, y}, ...]} with 1-3
    objects, x, y their centres in [0, 1] (y grows downwards). No two objects share both
    colour and shape, so "the red circle" always names one object."""
    n = rng.randint(1, 3)
    while True:
        objects = [{"shape": _pick(rng, SHAPES), "colour": _pick(rng, list(COLOURS)),
                    "size": _pick(rng, list(SIZES))} for _ in range(n)]
        if len({(o["shape"], o["colour"]) for o in objects}) == n:
            break
    while not _place(rng, objects):  # three large objects take a few attempts
        pass
    return {"objects": objects}

def make_split(n, seed):
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]

def relations(scene):
    """[(i, rel, j)] for every pair i < j: i is `rel` j, along the dominant axis.
    (j, INVERSE[rel], i) states the same fact and is not listed again."""
    objs, out = scene["objects"], []
    for i, j in itertools.combinations(range(len(objs)), 2):
        dx, dy = objs[j]["x"] - objs[i]["x"], objs[j]["y"] - objs[i]["y"]
        if abs(dx) >= abs(dy):
            out.append((i, "left of" if dx > 0 else "right of", j))
        else:
            out.append((i, "above" if dy > 0 else "below", j))
    return out

# -----------------------------------------------------------------------------
# rendering: draw at scale x the size, then box-downsample, which antialiases

def _outline(shape, x, y, r):
    def ring(radii, start):  # polygon with vertices at the given radii, evenly spaced
        n = len(radii)
        return [(x + q * math.cos(start + 2 * math.pi * k / n), y + q * math.sin(start + 2 * math.pi * k / n))
                for k, q in enumerate(radii)]
    if shape == "square":
        return ring([1.2 * r] * 4, math.pi / 4)
    if shape == "triangle":
        return ring([1.25 * r] * 3, -math.pi / 2)
    if shape == "star":
        return ring([1.25 * r, 0.5 * r] * 5, -math.pi / 2)
    if shape == "diamond":
        return [(x, y - 1.2 * r), (x + 0.8 * r, y), (x, y + 1.2 * r), (x - 0.8 * r, y)]
    if shape == "cross":
        a, w = 1.1 * r, 0.38 * r
        return [(x - w, y - a), (x + w, y - a), (x + w, y - w), (x + a, y - w), (x + a, y + w), (x + w, y + w),
                (x + w, y + a), (x - w, y + a), (x - w, y + w), (x - a, y + w), (x - a, y - w), (x - w, y - w)]
    raise ValueError(f"unknown shape {shape!r}")

def render(scene, size=64, scale=4):
    """The scene as a size x size RGB PIL image: coloured shapes on white."""
    S = size * scale
    img = Image.new("RGB", (S, S), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        x, y, r, fill = o["x"] * S, o["y"] * S, SIZES[o["size"]] * S, COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        else:
            draw.polygon(_outline(o["shape"], x, y, r), fill=fill)
    return img.reduce(scale)

# -----------------------------------------------------------------------------
# the caption grammar

SIZE_WORDS = {"small": ["small", "little"], "large": ["large", "big"]}
REL_WORDS = {"left of": ["left of", "to the left of", "on the left of"],
             "right of": ["right of", "to the right of", "on the right of"],
             "above": ["above", "over"], "below": ["below", "under", "beneath"]}
COUNT_WORDS = {1: ["a single", "one", "only one"], 2: ["two"], 3: ["three"]}
GENERIC = {1: ["a single shape", "one object on a white background", "a simple shape",
               "a shape on a plain background", "a picture of a single object"],
           2: ["two shapes", "two objects on a white background", "a couple of shapes",
               "some simple shapes", "a picture of two shapes"],
           3: ["three shapes", "three objects on a white background", "a few shapes",
               "some simple shapes", "a picture of several objects"]}

def _opener(rng, plural):
    return _pick(rng, ["", "there are " if plural else "there is ", "an image of ", "a picture showing ", "a drawing of "])

def _phrase(obj, rng, attrs=ATTRS, article=True):
    # "a small red circle"; without "shape" in attrs the noun is generic: "a red shape"
    words = [_pick(rng, SIZE_WORDS[obj["size"]])] if "size" in attrs else []
    words += [obj["colour"]] if "colour" in attrs else []
    words += [obj["shape"] if "shape" in attrs else _pick(rng, ["shape", "object"])]
    if article:
        words.insert(0, "an" if words[0][0] in "aeiou" else "a")
    return " ".join(words)

def _the(objs, i):
    # a reference back to an object already named: "the circle", or "the red circle" when
    # the shape alone is ambiguous (colour + shape is unique by construction)
    o = objs[i]
    return f"the {o['colour']} {o['shape']}" if [p["shape"] for p in objs].count(o["shape"]) > 1 else f"the {o['shape']}"

def _rel(rels, i, j):
    # the relation of object i to object j, given {(i, j): rel} for i < j
    return rels[(i, j)] if (i, j) in rels else INVERSE[rels[(j, i)]]

def _full(scene, rng, rels):
    """Every object with size, colour and shape, every relation in rels ({(i, j): rel}),
    and the count. Three objects take three clauses chained through "which is" or "the X"."""
    objs, k = scene["objects"], len(scene["objects"])
    def say(i, j, a, b):  # "a rel b" or "b inverse-rel a"; returns (text, the object named last)
        if rng.random() < 0.5:
            return f"{a} {_pick(rng, REL_WORDS[_rel(rels, i, j)])} {b}", j
        return f"{b} {_pick(rng, REL_WORDS[_rel(rels, j, i)])} {a}", i
    order = list(range(k))
    rng.shuffle(order)
    p = {i: _phrase(objs[i], rng, article=k > 1) for i in order}
    count, noun = _pick(rng, COUNT_WORDS[k]), _pick(rng, ["shapes", "objects"])
    if k == 1:
        suffix = _pick(rng, ["", " on a white background", " and nothing else"])
        return f"{_opener(rng, False)}{count} {p[0]}{suffix}"
    a, b = order[0], order[1]
    body, last = say(a, b, p[a], p[b])
    if k == 3:
        c, first = order[2], a if last == b else b
        if rng.random() < 0.5:
            second = f"which is {_pick(rng, REL_WORDS[_rel(rels, last, c)])} {p[c]}"
        else:
            second = f"{p[c]} {_pick(rng, REL_WORDS[_rel(rels, c, last)])} {_the(objs, last)}"
        third, _ = say(first, c, _the(objs, first), _the(objs, c))
        body = f"{body}, {second}, and {third}"
    if rng.random() < 0.5:
        return f"{_opener(rng, True)}{count} {noun}{_pick(rng, [': ', ', '])}{body}"
    return f"{body}, {count} {noun} in total"

def _partial(scene, rng):
    """Some of the objects, each with some of its attributes, maybe one relation, maybe
    the count; never everything, so a partial caption always leaves a fact out."""
    objs, k = scene["objects"], len(scene["objects"])
    order = list(range(k))
    rng.shuffle(order)
    chosen = order[:rng.randint(1, k)]
    attrs = [[a for a, p in zip(ATTRS, (0.4, 0.6, 0.6)) if rng.random() < p] or [_pick(rng, ATTRS)]
             for _ in chosen]
    if len(chosen) == k and all(len(a) == 3 for a in attrs):
        attrs[0].remove(_pick(rng, ATTRS))
    items = [_phrase(objs[i], rng, a) for i, a in zip(chosen, attrs)]
    if len(chosen) >= 2 and rng.random() < 0.5:
        r = _rel({(i, j): r for i, r, j in relations(scene)}, chosen[0], chosen[1])
        items = [f"{items[0]} {_pick(rng, REL_WORDS[r])} {items[1]}"] + items[2:]
    text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    if k > 1 and rng.random() < 0.2:
        count, noun = _pick(rng, COUNT_WORDS[k]), _pick(rng, ["shapes", "objects"])
        return f"{_opener(rng, True)}{count} {noun}{_pick(rng, [': ', ', '])}{text}"
    return f"{_opener(rng, False)}{text}"

def caption(scene, rng, kind):
    """One reference caption of the given kind: "full", "partial" or "generic"."""
    if kind == "full":
        return _full(scene, rng, {(i, j): r for i, r, j in relations(scene)})
    if kind == "partial":
        return _partial(scene, rng)
    if kind == "generic":
        return _pick(rng, GENERIC[len(scene["objects"])])
    raise ValueError(f"unknown caption kind {kind!r}")

def sample_kind(rng):
    u = rng.random()
    return "full" if u < KIND_PROBS["full"] else "partial" if u < 1 - KIND_PROBS["generic"] else "generic"

def captions(scene, rng, n=5):
    """n reference captions (like COCO's five), each of a kind drawn with KIND_PROBS."""
    return [caption(scene, rng, sample_kind(rng)) for _ in range(n)]

# -----------------------------------------------------------------------------
# reading captions back: claims, facts, precision and recall

SHAPE_WORDS = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}, "crosses": "cross"}
GENERIC_NOUNS = {"shape", "shapes", "object", "objects", "thing", "things", "figure", "figures"}
SIZE_SYNONYMS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large", "huge": "large"}
REL_SYNONYMS = {"left": "left of", "right": "right of", "above": "above", "over": "above",
                "below": "below", "under": "below", "beneath": "below", "underneath": "below"}
NUMBERS = {"one": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
MAX_MATCHED = 12  # only the first 12 mentions can be matched to objects (bounds the search)

def parse(text):
    """The claims a caption makes, read left to right, forgivingly:
    {"mentions": [{"size", "colour", "shape"} (None where unstated)],
     "relations": [(a, rel, b)] between mention indices, a < b,
     "count": the first number word's value, or None}.
    A mention ends at a noun (a shape word or shape/object/thing) and takes the size and
    colour words since the previous mention (the last one wins). A relation word links the
    mention before it to the next one, so "A left of B, which is above C" chains. "the"
    + noun refers back to the latest mention that states the same attributes. Repeated
    words are collapsed ("red red circle circle" = "red circle"); unknown words are ignored."""
    words = re.findall(r"[a-z]+", text.lower())
    words = [w for k, w in enumerate(words) if k == 0 or w != words[k - 1]]
    mentions, rels, count = [], [], None
    adj, definite, pending, last = {}, False, None, None
    for w in words:
        if w == "the":
            definite = True
        elif w in ("a", "an"):
            definite = False
        elif w in NUMBERS:
            count = NUMBERS[w] if count is None else count
        elif w in SIZE_SYNONYMS:
            adj["size"] = SIZE_SYNONYMS[w]
        elif w in COLOURS:
            adj["colour"] = w
        elif w in REL_SYNONYMS:
            pending, adj, definite = REL_SYNONYMS[w], {}, False
        elif w in SHAPE_WORDS or w in GENERIC_NOUNS:
            m = {"size": adj.get("size"), "colour": adj.get("colour"), "shape": SHAPE_WORDS.get(w)}
            said = [a for a in ATTRS if m[a] is not None]
            earlier = [i for i, e in enumerate(mentions) if definite and all(e[a] == m[a] for a in said)]
            idx = earlier[-1] if earlier else len(mentions)
            if not earlier:
                mentions.append(m)
            if pending and last is not None and last != idx:
                a, b, r = (last, idx, pending) if last < idx else (idx, last, INVERSE[pending])
                if (a, r, b) not in rels:
                    rels.append((a, r, b))
            adj, definite, pending, last = {}, False, None, idx
    return {"mentions": mentions, "relations": rels, "count": count}

def attribute_scores(text, scene):
    """Score a caption's claims against a scene's facts.
    Facts: each object's size, colour and shape (3 per object), one per pair of objects
    (its relation; "A left of B" and "B right of A" are the same fact), and the count.
    Claims: each stated attribute of each mention, each relation, the count if stated.
    Mentions are matched one-to-one to objects by the assignment (brute force, <= 3
    objects) that makes the most claims true; unmatched mentions' claims are false.
    precision = true claims / claims, defined as 1.0 for a caption that claims nothing (it
    hallucinates nothing; its recall is what suffers). recall = facts covered by true
    claims / facts. The counts are returned too, so a corpus can be pooled (sum true / sum
    claims, as metrics.attribute_scores does), which sidesteps the 1.0 for empty captions;
    rel_claims and rel_true count the relation claims alone; "checked" lists each claim with
    its verdict, e.g. [("large", True), ("circle left of square", False)]."""
    p, objs = parse(text), scene["objects"]
    truth = {(i, j): r for i, r, j in relations(scene)}
    holds = lambda i, r, j: truth.get((i, j)) == r or truth.get((j, i)) == INVERSE[r]
    ms, rels = p["mentions"], p["relations"]
    best, best_score = {}, -1
    for choice in itertools.product([None, *range(min(len(ms), MAX_MATCHED))], repeat=len(objs)):
        match = {m: o for o, m in enumerate(choice) if m is not None}  # mention -> object
        if len(match) < sum(m is not None for m in choice):
            continue  # two objects took the same mention
        score = sum(ms[m][a] == objs[o][a] for m, o in match.items() for a in ATTRS)
        score += sum(a in match and b in match and holds(match[a], r, match[b]) for a, r, b in rels)
        if score > best_score:
            best, best_score = match, score
    checked, covered = [], set()  # checked: (claim, true?) in the caption's order
    for m, mention in enumerate(ms):
        for a in ATTRS:
            if mention[a] is not None:
                ok = m in best and objs[best[m]][a] == mention[a]
                checked.append((mention[a], ok))
                if ok:
                    covered.add((best[m], a))
    rel_true = 0
    for a, r, b in rels:
        ok = a in best and b in best and holds(best[a], r, best[b])
        checked.append((f"{ms[a]['shape'] or 'shape'} {r} {ms[b]['shape'] or 'shape'}", ok))
        rel_true += ok
        if ok:
            covered.add(frozenset((best[a], best[b])))
    if p["count"] is not None:
        ok = p["count"] == len(objs)
        checked.append((f"{p['count']} in all", ok))
        if ok:
            covered.add("count")
    claims, true, facts = len(checked), sum(ok for _, ok in checked), 3 * len(objs) + len(truth) + 1
    return {"precision": true / claims if claims else 1.0, "recall": len(covered) / facts,
            "claims": claims, "true": true, "facts": facts, "covered": len(covered), "checked": checked,
            "rel_claims": len(rels), "rel_true": rel_true}

def corrupt(scene, rng, what):
    """A minimal pair for probing a CLIP: (a full caption, the same caption with one thing
    wrong). Both come from _full with the same seed, one for the scene and one for a
    corrupted copy, so they are worded alike except for the corruption:
    "colour"/"shape": one object gets a colour/shape that is not in the scene;
    "size": one object's size flips; "relation": one relation reverses (left <-> right,
    above <-> below); "binding": two objects of different colours and shapes exchange
    colours (every colour and shape word still names something in the image, only which
    goes with which is wrong; it still lowers precision, as no object has the new pairs).
    Returns None when impossible: relation or binding with fewer than two objects."""
    objs = scene["objects"]
    bad = [dict(o) for o in objs]
    rels = {(i, j): r for i, r, j in relations(scene)}
    bad_rels = dict(rels)
    i = rng.randrange(len(objs))
    if what == "colour":
        bad[i]["colour"] = _pick(rng, [c for c in COLOURS if c not in {o["colour"] for o in objs}])
    elif what == "shape":
        bad[i]["shape"] = _pick(rng, [s for s in SHAPES if s not in {o["shape"] for o in objs}])
    elif what == "size":
        bad[i]["size"] = "small" if objs[i]["size"] == "large" else "large"
    elif what == "relation":
        if not rels:
            return None
        pair = _pick(rng, sorted(rels))
        bad_rels[pair] = INVERSE[rels[pair]]
    elif what == "binding":
        pairs = [(i, j) for i, j in itertools.combinations(range(len(objs)), 2)
                 if objs[i]["colour"] != objs[j]["colour"] and objs[i]["shape"] != objs[j]["shape"]]
        if not pairs:
            return None
        i, j = _pick(rng, pairs)
        bad[i]["colour"], bad[j]["colour"] = objs[j]["colour"], objs[i]["colour"]
    else:
        raise ValueError(f"unknown corruption {what!r}")
    seed = rng.getrandbits(32)
    return _full(scene, random.Random(seed), rels), _full({"objects": bad}, random.Random(seed), bad_rels)

if __name__ == "__main__":
    rng = random.Random(0)
    for scene in make_split(4, seed=0):
        print(scene)
        for kind in KIND_PROBS:
            print(f"  {kind:8s}", caption(scene, rng, kind))
