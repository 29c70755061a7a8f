"""
Caption metrics: how good are the generated captions, by the numbers papers report.

Jin, "Semi-Supervised Image Captioning with CLIP" (arXiv 2306.15111), reports the COCO
n-gram metrics and CLIP-based ones side by side: a CLIP reward raises CLIP-S and makes
captions more distinctive while the n-gram overlap with human references may drop.
This file computes both families, plus two the shapes world allows:

  reference overlap (pycocoevalcap, after its PTB tokenizer, each scorer called directly)
    BLEU-1..4  Papineni et al. 2002, "BLEU: a Method for Automatic Evaluation of MT"
    METEOR     Banerjee & Lavie 2005, "METEOR: An Automatic Metric for MT Evaluation ..."
    ROUGE-L    Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries"
    CIDEr      Vedantam et al. 2015, "CIDEr: Consensus-based Image Description Evaluation"
    SPICE      Anderson et al. 2016, "SPICE: Semantic Propositional Image Caption Evaluation"
  CLIP (Hessel et al. 2021, "CLIPScore", arXiv 2104.08718)
    CLIP-S, RefCLIP-S, and text-to-image retrieval R@k (is the caption distinctive?)
  shapes world only: attribute and relation precision (pooled over claims) and recall against
    the scene's ground truth, and fluency (could the world's grammar have written the caption?)
  diversity: share of distinct captions, mean length

Every score is reported x100, as papers do. COCOEvalCap.evaluate() is not used: it always
runs SPICE, which downloads Stanford CoreNLP and so fails offline. METEOR, SPICE and the
PTB tokenizer are Java programs; without `java` on PATH they are skipped (the tokenizer is
replaced by simple_tokenize) with one line on stderr, and the rest is still computed.
"""

import contextlib
import os
import re
import shutil
import sys
import tempfile

import pycocoevalcap.spice
import torch
import torch.nn.functional as F
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from nanocap.losses import CLIP_PROMPT, clip_s, embed_captions

# SPICE's parser needs Stanford CoreNLP 3.6.0; pycocoevalcap downloads it into spice/lib
SPICE_LIB = os.path.join(os.path.dirname(pycocoevalcap.spice.__file__), "lib")
CORENLP_JARS = ["stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"]
BATCH = 256  # texts per encode_text call, so 5,000 captions x 5 references fit in memory


def java_available() -> bool:
    """Is `java` on PATH? (A function, so tests can pretend it is not.)"""
    return shutil.which("java") is not None


def _skip(message):
    print(f"nanocap.metrics: {message}", file=sys.stderr)

# -----------------------------------------------------------------------------
# reference overlap: BLEU, METEOR, ROUGE-L, CIDEr (, SPICE)


def simple_tokenize(text: str) -> str:
    """The fallback for the PTB tokenizer when Java is missing: lower-case, every
    punctuation character becomes a space, split on whitespace. It differs from PTB on
    clitics ("man's": PTB "man 's", here "man s") and hyphens (PTB keeps "black-and-white"),
    so scores can differ slightly from published ones."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _tokenize(captions: dict) -> dict:
    # {id: [str]} -> {id: [tokenized str]}. Whitespace is collapsed first: PTBTokenizer
    # writes one caption per line and zips the output lines back, so a stray "\r" or
    # line separator inside a caption would silently shift every later caption.
    captions = {k: [" ".join(c.split()) for c in v] for k, v in captions.items()}
    if not java_available():
        return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}
    with _java_stderr_held():
        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


@contextlib.contextmanager
def _java_stderr_held():
    # PTBTokenizer's Java child writes "PTBTokenizer tokenized N tokens at ..." to the process's
    # stderr (file descriptor 2, which a notebook shows on its page). Hold it in a temporary file;
    # pass it on only if the tokenizer fails, so that its error is still read.
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def coco_scores(candidates: dict, references: dict, spice: bool = False) -> dict:
    """The COCO caption metrics, x100, for {id: caption} against {id: [reference, ...]}.

    BLEU-n:  corpus-level geometric mean of clipped 1..n-gram precisions times a brevity
             penalty (pycocoevalcap uses the closest reference length).
    METEOR:  harmonic mean of unigram precision and recall (recall-weighted) over an
             alignment with exact, stem, synonym and paraphrase matches, times a
             fragmentation penalty; the best reference counts.
    ROUGE-L: F-measure (beta=1.2) of the longest common subsequence with each reference,
             best precision and recall over references; mean over images.
    CIDEr:   pycocoevalcap's CIDEr-D: mean over n=1..4 of the tf-idf n-gram cosine with
             each reference (candidate counts clipped, Gaussian length penalty sigma=6),
             averaged over references, x10. The idf comes from the references of this
             very set, so it depends on the whole corpus (one image alone scores 0).
    SPICE:   F-score of scene-graph tuples (objects, attributes, relations) parsed from
             candidate and references; only with spice=True, and skipped with a message
             when it cannot run (no Java, or CoreNLP not downloaded; never downloads).
    Keys: "BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr" (, "SPICE")."""
    if not isinstance(candidates, dict) or not isinstance(references, dict):
        raise TypeError("coco_scores expects dicts: candidates {id: str}, references {id: [str, ...]}")
    if set(candidates) != set(references):
        raise ValueError(f"candidates and references must have the same ids "
                         f"({len(set(candidates) ^ set(references))} ids are in only one of them)")
    for k, refs in references.items():
        if not isinstance(candidates[k], str):
            raise TypeError(f"the candidate for id {k!r} must be a string, got {type(candidates[k]).__name__}")
        if isinstance(refs, str) or len(refs) == 0 or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"the references for id {k!r} must be a non-empty list of strings")

    java = java_available()
    if not java:
        _skip("java not found on PATH: METEOR and SPICE skipped, PTB tokenizer replaced by a simple "
              "lower-case / strip-punctuation / whitespace split (BLEU, ROUGE-L, CIDEr still computed)")
    gts = _tokenize({k: list(v) for k, v in references.items()})  # {id: [tokenized refs]}
    res = _tokenize({k: [c] for k, c in candidates.items()})       # {id: [tokenized candidate]}

    scores = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=0: no printed ratios
    for n, b in enumerate(bleu, start=1):
        scores[f"BLEU-{n}"] = 100 * float(b)
    if java:
        try:
            scores["METEOR"] = 100 * _meteor(gts, res)
        except Exception as e:
            _skip(f"METEOR skipped: the Java scorer failed ({type(e).__name__}: {e})")
    scores["ROUGE-L"] = 100 * float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = 100 * float(Cider().compute_score(gts, res)[0])
    if spice:
        reason = _spice_unavailable(java)
        if reason:
            _skip(f"SPICE skipped: {reason}")
        else:
            try:
                from pycocoevalcap.spice.spice import Spice
                scores["SPICE"] = 100 * float(Spice().compute_score(gts, res)[0])
            except Exception as e:
                _skip(f"SPICE skipped: the Java scorer failed ({type(e).__name__}: {e})")
    return scores


def _meteor(gts, res) -> float:
    meteor = Meteor()  # starts a JVM that loads the paraphrase table (~5 s)
    try:
        return float(meteor.compute_score(gts, res)[0])
    finally:
        # when the JVM fails, compute_score raises with its lock still held, and
        # Meteor.__del__ (which stops the JVM) would then wait on that lock forever
        if meteor.lock.locked():
            meteor.lock.release()


def _spice_unavailable(java: bool) -> str | None:
    # why SPICE cannot run, or None. Checked before Spice() is built: its constructor would
    # download CoreNLP (~400 MB) with no timeout, which offline fails or hangs. Online (no
    # HF_HUB_OFFLINE=1) we download it here, with a timeout.
    if not java:
        return "java not found on PATH"
    missing = lambda: [j for j in CORENLP_JARS if not os.path.isfile(os.path.join(SPICE_LIB, j))]
    if not missing():
        return None
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return (f"Stanford CoreNLP is not in {SPICE_LIB} (missing {', '.join(missing())}) and HF_HUB_OFFLINE=1 "
                f"forbids the download; run pycocoevalcap.spice.get_stanford_models once online")
    import socket
    import pycocoevalcap.spice.spice as spice_module
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # no network must not mean a hang
    try:
        print("SPICE: downloading Stanford CoreNLP once (~400 MB) into pycocoevalcap ...", file=sys.stderr)
        spice_module.get_stanford_models()  # SPICE runs when its models can be downloaded
    except Exception as e:
        return f"could not download Stanford CoreNLP ({type(e).__name__}: {e})"
    finally:
        socket.setdefaulttimeout(old_timeout)
    if missing():
        return (f"the Stanford CoreNLP download is incomplete (missing {', '.join(missing())} in {SPICE_LIB}); "
                f"delete the stanford-corenlp files there and retry")
    return None

# -----------------------------------------------------------------------------
# CLIP: CLIP-S, RefCLIP-S, retrieval


def _embed(clip, captions: list[str], prompt: str) -> torch.Tensor:
    """(len(captions), D) float32 on the CPU, unit norm: the prompted captions, BATCH at a time."""
    return F.normalize(embed_captions(clip, captions, prompt, BATCH).float().cpu(), dim=-1)


def _check_images(image_features, n: int) -> torch.Tensor:
    if not isinstance(image_features, torch.Tensor) or image_features.ndim != 2 or image_features.shape[0] != n:
        got = tuple(image_features.shape) if isinstance(image_features, torch.Tensor) else type(image_features).__name__
        raise ValueError(f"image_features must be a tensor (N, D) with one row per caption (N={n}), got {got}")
    return F.normalize(image_features.float().cpu(), dim=-1)  # (N, D)


def clip_scores(clip, image_features, candidates: list[str], references: list[list[str]],
                prompt: str = CLIP_PROMPT) -> dict:
    """CLIP-S and RefCLIP-S (Hessel et al. 2021), x100, mean over images.

    CLIP-S_i    = 2.5 * max(cos(E_img_i, E_txt(prompt + " " + candidate_i)), 0)
    refsim_i    = max over references r of max(cos(E_txt(cand_i), E_txt(r)), 0)
    RefCLIP-S_i = harmonic mean H(CLIP-S_i, refsim_i) = 2ab / (a + b), 0 when both are 0
    As in Hessel's code (clipscore.py), the reference side is not multiplied by 2.5, and
    the references are embedded with the same prompt as the candidates.
    clip: anything with encode_text(list[str]) -> (B, D), e.g. a CLIPEncoder; image_features:
    (N, D) from the same CLIP; candidates: N strings; references: N lists of strings."""
    if len(references) != len(candidates) or any(isinstance(r, str) or len(r) == 0 for r in references):
        raise ValueError(f"references must be {len(candidates)} non-empty lists of strings, one per candidate")
    images = _check_images(image_features, len(candidates))       # (N, D)
    cand = _embed(clip, candidates, prompt)                       # (N, D)
    flat = [r for refs in references for r in refs]               # M references in all
    owner = torch.tensor([i for i, refs in enumerate(references) for _ in refs])  # (M,) image of each
    refs = _embed(clip, flat, prompt)                             # (M, D)

    a = clip_s(images, cand)                                      # (N,) CLIP-S, 2.5 * max(cos, 0)
    sims = (cand[owner] * refs).sum(dim=-1)                       # (M,) cos(candidate, its reference)
    best = torch.full((len(candidates),), -1.0).scatter_reduce(0, owner, sims, "amax")  # (N,)
    b = best.clamp(min=0)                                         # (N,) refsim
    ref_clip_s = 2 * a * b / (a + b).clamp(min=1e-12)             # (N,) 0 when a = b = 0
    return {"CLIP-S": 100 * a.mean().item(), "RefCLIP-S": 100 * ref_clip_s.mean().item()}


def retrieval(clip, image_features, candidates: list[str], prompt: str = CLIP_PROMPT, ks=(1, 5, 10)) -> dict:
    """Text-to-image retrieval recall (distinctiveness), x100.

    Caption i (prompted as for CLIP-S) is a query over all N images of the split, ranked
    by cosine similarity; R@k = share of captions whose own image i is among the top k.
    Ties count against the caption: rank = number of other images scoring >= image i,
    so a caption that cannot tell two identical images apart does not get the credit."""
    images = _check_images(image_features, len(candidates))       # (N, D)
    texts = _embed(clip, candidates, prompt)                      # (N, D)
    sims = texts @ images.T                                       # (N captions, N images)
    own = sims.diagonal()                                         # (N,)
    rank = (sims >= own[:, None]).sum(dim=1) - 1                  # (N,) 0 = own image first
    return {f"R@{k}": 100 * (rank < k).float().mean().item() for k in ks}

# -----------------------------------------------------------------------------
# shapes world and diversity


def attribute_scores(candidates: list[str], scenes: list, scorer, fluent=None) -> dict:
    """How true and how complete the captions are against a known ground truth, x100.

    scorer(caption, scene) parses one caption's claims and matches them to its scene (in the
    shapes world data.shapes.attribute_scores: each stated size, colour and shape, each
    relation, the count) and returns counts: claims, true, rel_claims, rel_true, and recall.
    attr_precision  true claims / claims, pooled over all captions: a caption that claims
                    nothing adds nothing (per image it would count as 1.0, a free 100%)
    no_claim        the share of captions that make no claim at all, shown beside it
    rel_precision   the same for relation claims alone ("left of", "above", ...)
    attr_recall     the share of the scene's facts a caption states truly, mean over images
    fluency         with fluent(caption) -> bool (shapes: data.grammar.fluent), the share of
                    captions the grammar could have written, true or not
    A precision without a single claim to judge is left out, not invented."""
    if len(candidates) != len(scenes):
        raise ValueError(f"got {len(candidates)} captions but {len(scenes)} scenes; need one scene per caption")
    per_image = [scorer(c, s) for c, s in zip(candidates, scenes)]
    total = lambda key: sum(p[key] for p in per_image)
    scores = {}
    if total("claims"):
        scores["attr_precision"] = 100 * total("true") / total("claims")
    scores["no_claim"] = 100 * sum(p["claims"] == 0 for p in per_image) / len(per_image)
    if total("rel_claims"):
        scores["rel_precision"] = 100 * total("rel_true") / total("rel_claims")
    scores["attr_recall"] = 100 * total("recall") / len(per_image)
    if fluent is not None:
        scores["fluency"] = 100 * sum(map(fluent, candidates)) / len(candidates)
    return scores


def diversity(candidates: list[str]) -> dict:
    """distinct: share of distinct captions (exact string match) among all, x100.
    mean_length: mean number of whitespace-separated words per caption."""
    if len(candidates) == 0:
        raise ValueError("diversity needs at least one caption")
    return {"distinct": 100 * len(set(candidates)) / len(candidates),
            "mean_length": sum(len(c.split()) for c in candidates) / len(candidates)}

# -----------------------------------------------------------------------------
# everything at once


def evaluate_captions(candidates: list[str], references: list[list[str]], clip=None, image_features=None,
                      scenes=None, attribute_scorer=None, fluent=None, spice: bool = False,
                      prompt: str = CLIP_PROMPT) -> dict:
    """All the metrics that apply, in one dict. Caption i belongs to image i: references[i],
    image_features[i] (N, D) and scenes[i] describe the same image. CLIP-S, RefCLIP-S and
    R@k need clip and image_features; attribute precision/recall needs scenes and their
    attribute_scorer, and fluency a fluent(caption) test (see attribute_scores)."""
    if not isinstance(candidates, list) or not isinstance(references, list) or len(candidates) != len(references):
        raise ValueError("candidates and references must be lists of the same length "
                         "(one caption and one list of references per image)")
    if (clip is None) != (image_features is None):
        raise ValueError("CLIP metrics need both clip and image_features (from that same CLIP), or neither")
    scores = coco_scores(dict(enumerate(candidates)), dict(enumerate(references)), spice=spice)
    if clip is not None:
        scores.update(clip_scores(clip, image_features, candidates, references, prompt=prompt))
        scores.update(retrieval(clip, image_features, candidates, prompt=prompt))
    if (scenes is None) != (attribute_scorer is None):
        raise ValueError("attribute scores need both scenes and an attribute_scorer, or neither")
    if scenes is not None:
        scores.update(attribute_scores(candidates, scenes, attribute_scorer, fluent))
    scores.update(diversity(candidates))
    return scores


def format_table(scores: dict) -> str:
    """A two-column text table: one metric a line, names left-aligned, values to 2 decimals."""
    width = max([len(k) for k in scores] + [len("metric")])
    lines = [f"{'metric':<{width}}  {'value':>7}", "-" * (width + 9)]
    lines += [f"{k:<{width}}  {v:7.2f}" for k, v in scores.items()]
    return "\n".join(lines)
