"""
Fluency in the shapes world: could the caption grammar have written this caption?

Jin, "Semi-Supervised Image Captioning with CLIP" (arXiv 2306.15111), trains stage 2 on a
CLIP reward alone (plus a KL to the stage-1 policy), and a reward that reads captions as bags
of words pays for words, not for grammar: stage 2 can drift to "a one little orange star".
On COCO only human raters notice. In the shapes world the references come from a known
grammar (nanocap/data/shapes.py), so fluency can be counted: a caption is fluent when its
word sequence is one the grammar produces for *some* scene, whether or not it is true of
this one (truth is attribute and relation precision's job).

The grammar's templates are written out below as one regular expression, built from the
same word lists the grammar draws from (a new shape or relation word changes both at once):

  generic   "a single shape", "two objects on a white background", ...
  full      one object:  [opener] a single|one|only one SIZE COLOUR SHAPE [on a white background|and nothing else]
            two, three:  [opener] two|three shapes|objects (: |, ) BODY   or   BODY, two|three shapes|objects in total
                         BODY = NP REL NP  (two)   |   NP REL NP, (which is REL NP | NP REL THE), and THE REL THE  (three)
  partial   [opener] ITEMS   or   [opener] two|three shapes|objects (: |, ) ITEMS, at most that many items
            ITEMS = P | P and P | P, P and P | P REL P | P REL P and P, each P some of an object's words

NP is "a|an SIZE COLOUR SHAPE", THE is "the [COLOUR] SHAPE", and "a" or "an" must fit the word
after it. One simplification: a partial caption that names every object with every attribute
is accepted, although the grammar always leaves one fact out of a partial caption.
"""

import re

from nanocap.data.shapes import COLOURS, COUNT_WORDS, GENERIC, REL_WORDS, SHAPES, SIZE_WORDS


def _any(words):
    """A non-capturing alternation of the words, longest first ("to the left of" before "left of")."""
    return "(?:" + "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True)) + ")"


SIZE = _any(w for ws in SIZE_WORDS.values() for w in ws)
COLOUR = _any(COLOURS)
SHAPE = _any(SHAPES)
REL = _any(w for ws in REL_WORDS.values() for w in ws)
ART = "(?:a (?=[^aeiou])|an (?=[aeiou]))"  # "a small", "an orange", never "a orange" or "an small"
NP = f"{ART}{SIZE} {COLOUR} {SHAPE}"  # a full phrase: "a small red circle"
THE = f"the (?:{COLOUR} )?{SHAPE}"  # a reference back: "the circle", "the red circle"
# a partial phrase: some of size, colour and shape, with "shape" or "object" when the shape is left out
P = f"{ART}(?:(?:{SIZE} )?(?:{COLOUR} )?{SHAPE}|{SIZE} (?:{COLOUR} )?(?:shape|object)|{COLOUR} (?:shape|object))"
OPEN_ONE = "(?:there is |an image of |a picture showing |a drawing of )?"
OPEN_MANY = "(?:there are |an image of |a picture showing |a drawing of )?"
TOTAL = "(?:shapes|objects)"
SEP = "(?:: |, )"


def _counted(count, body):
    """The two ways a caption of several objects gives their count."""
    return f"(?:{OPEN_MANY}{count} {TOTAL}{SEP}{body}|{body}, {count} {TOTAL} in total)"


BODY2 = f"{NP} {REL} {NP}"
BODY3 = f"{NP} {REL} {NP}, (?:which is {REL} {NP}|{NP} {REL} {THE}), and {THE} {REL} {THE}"
FULL = [f"{OPEN_ONE}{_any(COUNT_WORDS[1])} {SIZE} {COLOUR} {SHAPE}(?: on a white background| and nothing else)?",
        _counted(_any(COUNT_WORDS[2]), BODY2), _counted(_any(COUNT_WORDS[3]), BODY3)]
ITEMS2 = f"{P}(?: {REL} {P}| and {P})?"  # at most two of the objects
ITEMS3 = f"{P}(?: {REL} {P}(?: and {P})?| and {P}|, {P} and {P})?"  # at most three
PARTIAL = [f"{OPEN_ONE}{ITEMS3}", f"{OPEN_MANY}{_any(COUNT_WORDS[2])} {TOTAL}{SEP}{ITEMS2}",
           f"{OPEN_MANY}{_any(COUNT_WORDS[3])} {TOTAL}{SEP}{ITEMS3}"]
GENERIC_ALL = [_any(g for gs in GENERIC.values() for g in gs)]
GRAMMAR = re.compile("|".join(f"(?:{t})" for t in GENERIC_ALL + FULL + PARTIAL))


def fluent(text: str) -> bool:
    """Is the caption one the shapes grammar can produce (for some scene)? Whitespace at the
    ends is ignored, nothing else: "a red red circle", "a one little orange star" and
    "an small circle" are not fluent."""
    return GRAMMAR.fullmatch(text.strip()) is not None
