"""The `offline` backend: deterministic, no model, the embedded default that lets `dvc repro` run anywhere.

It reads the figure text out of the prompt and writes a caption-grounded reply (generate), a heuristic
rubric score (rate), the two scores of the open-chat judge, a pairwise verdict (the win rates), a
correct/incorrect grade (judged open VQA accuracy: a word-overlap heuristic, a pipeline check only) or a
conversation with two candidate answers per question (annotation_pool). Every artifact it touches says
`backend: offline`, and its "model" name carries a hash of this file, so editing the offline logic never
reuses a cached reply.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .backends import Reply, parts

STOPWORDS = set("""a an the and or of in on at to for with without from by is are was were be been this that these
those it its as there their which who what where when how why can could may might does do did has have had into
onto than then both also such any each other image shows showing shown seen visible""".split())
OVERCONFIDENT = ("definitely", "certainly", "without a doubt", "100%", "always", "never", "undoubtedly")
HEDGES = ("may", "might", "suggest", "consistent with", "likely", "would be needed", "appears", "could")


def stable_int(*parts: str) -> int:
    return int(hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:8], 16)


def content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z][a-z\-]+", text.lower()) if len(w) > 3 and w not in STOPWORDS]


def split_sentences(text: str) -> list[str]:
    text = re.sub(r"\s*\((?:Fig\.?|Figure)\s*[\w\.]+\)", "", text)  # "(Figure 3)" adds nothing to an answer
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 3]


def section(text: str, name: str) -> str:
    """The value of a `Name: value` block of a prompt (see generate.figure_text, rate.rating_messages)."""
    m = re.search(rf"^{name}:\s*(.*?)(?=^\w[\w \-]*:|\Z)", text, flags=re.M | re.S)
    return m.group(1).strip() if m else ""


class OfflineBackend:
    name = "offline"
    # the offline "model" is this file: editing it changes the name, so cached replies are not reused
    model = "offline-" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:8]
    identity = model

    async def acomplete(self, messages: list[dict], task: str, sampling: dict):
        return Reply(self.complete(messages, task))

    async def aclose(self):
        pass

    def complete(self, messages: list[dict], task: str) -> str:
        prompt = _last_user_text(messages)
        return {"generate": self._generate, "rate": self._rate, "judge": self._judge, "pairwise": self._pairwise,
                "grade": self._grade, "pool": self._pool}[task](prompt)

    # -- generate: a caption-grounded multi-turn conversation in the `User:`/`Assistant:` format
    def _generate(self, prompt: str) -> str:
        caption, mentions = section(prompt, "Caption"), section(prompt, "In-text mentions")
        rounds = qa_from_text(caption, mentions)
        n = 3 + stable_int(caption) % 3  # 3-5 rounds
        return "\n".join(f"User: {q}\nAssistant: {a}" for q, a in rounds[:n])

    # -- rate / judge: a documented heuristic rubric (see `heuristic_score`), score on the first line
    def _rate(self, prompt: str) -> str:
        context = section(prompt, "Caption") + " " + section(prompt, "In-text mentions")
        question, answer = section(prompt, "Question"), section(prompt, "Answer")
        score, why = heuristic_score(context, question, answer)
        return f"{score}\n{why}"

    # -- judge (open chat, LLaVA-Med's form): the rubric on the reference and the model's answer, "s1 s2" first
    def _judge(self, prompt: str) -> str:
        head = prompt.split("\n[Assistant 1]\n")[0]
        context = section(head, "Caption") + " " + section(head, "In-text mentions")
        answers = dict(re.findall(r"^\[Assistant (\d)\]\n(.*?)\n\[End of Assistant \1\]$", prompt, re.M | re.S))
        s1, s2 = (max(1, heuristic_score(context, section(head, "Question"), answers.get(k, ""))[0]) for k in "12")
        return f"{s1} {s2}\nThe rubric gives Assistant 1 {s1} and Assistant 2 {s2}."

    # -- pairwise (win rate): the rubric on both answers, the verdict in the [[A]] / [[B]] / [[C]] form
    #    (with a ground truth, the VQA win rate: the share of the ground truth's words each answer holds)
    def _pairwise(self, prompt: str) -> str:
        truth, question = section(prompt, "Ground truth"), section(prompt, "Question")
        context = section(prompt, "Caption") + " " + section(prompt, "In-text mentions")
        a, b = (_truth_share(truth, section(prompt, f"Answer {x}")) if truth else
                heuristic_score(context, question, section(prompt, f"Answer {x}"))[0] for x in "AB")
        return f"Answer A scores {a:g}, answer B scores {b:g}.\n[[{'A' if a > b else 'B' if b > a else 'C'}]]"

    # -- grade (judged open VQA accuracy): correct when the answer holds half the ground truth's words or more
    def _grade(self, prompt: str) -> str:
        share = _truth_share(section(prompt, "Ground truth"), section(prompt, "Answer"))
        return f"The answer holds {share:.0%} of the ground truth's words.\n[[{'correct' if share >= 0.5 else 'incorrect'}]]"

    # -- annotation_pool: a conversation with two candidate answers per question (`User:`, `Answer 1:`, `Answer 2:`)
    def _pool(self, prompt: str) -> str:
        caption, mentions = section(prompt, "Caption"), section(prompt, "In-text mentions")
        lines = []
        for question, grounded in qa_from_text(caption, mentions):
            other = _weaker_answer(caption, question, grounded)
            a, b = (other, grounded) if stable_int(question, caption, "swap") % 2 else (grounded, other)
            lines += [f"User: {question}", f"Answer 1: {a}", f"Answer 2: {b}"]
        return "\n".join(lines)


FLIPS = {"left": "right", "right": "left", "CT": "MRI", "MRI": "CT", "MR": "CT", "radiograph": "ultrasound image",
         "ultrasound": "radiograph", "axial": "sagittal", "coronal": "axial"}


def _truth_share(truth: str, answer: str) -> float:
    """The share of the ground truth's words found in the answer (0 without a ground truth)."""
    words, found = (set(re.findall(r"[a-z0-9]+", t.lower())) for t in (truth, answer))
    return len(words & found) / len(words) if words else 0.0


def _weaker_answer(caption: str, question: str, grounded: str) -> str:
    """The second candidate answer of the offline pool: overconfident and generic, terse, hedged, or contradicting
    the figure (the side or the modality swapped), the kinds of answer clinicians tell apart."""
    style = stable_int(caption, question) % 4
    flip = re.compile(r"\b(" + "|".join(FLIPS) + r")\b")
    if style == 3 and flip.search(grounded):
        return flip.sub(lambda m: FLIPS[m.group(1)], grounded)
    if style == 1:
        return " ".join(grounded.split()[:10]).rstrip(",;.") + "."
    if style == 2:
        return f"It is hard to be sure from a single image, but it may show the following: {grounded[0].lower()}{grounded[1:]}"
    return "This is a normal study and there is definitely no abnormality to report."


def _last_user_text(messages: list[dict]) -> str:
    content = [m for m in messages if m["role"] == "user"][-1]["content"]
    return "\n".join(p["text"] for p in parts(content) if p["type"] == "text")


# What a figure's questions can be about, the paper's list (modality, organ, location and side, possible disease,
# size, number): (what, the words that show the caption speaks of it, two phrasings of the question).
ASPECTS = [
    ("plane", r"\b(axial|coronal|sagittal|frontal|lateral|transverse|planar|oblique|dual-panel|split-screen)\b",
     ("In which plane or projection was this image acquired?", "What view does this image show?")),
    ("side", r"\b(left|right|bilateral|both)\b",
     ("Which side of the body does this involve?", "Is the finding on the left, the right or both sides?")),
    ("anatomy", r"\b(lungs?|liver|kidneys?|heart|brain|skull|calvarium|tibia|ankle|shoulder|humeral|glenoid|spine|"
                r"vertebra\w*|aorta|bladder|pelvi\w*|retina\w*|optic disc|macula|colon\w*|gland\w*|lymph node|"
                r"skeleton|spleen|bowel|abdomen|thora\w+|chest)\b",
     ("Which organ or anatomical structures are shown?", "What anatomy can be identified in this image?")),
    ("size", r"\b(\d+(?:\.\d+)? ?(?:mm|cm)|large|small|varying size|enlarged|distended|normal size|heart size)\b",
     ("What can be said about the size of what is seen?", "How big are the structures or findings shown?")),
    ("count", r"\b(multiple|numerous|several|single|solitary|many|scattered)\b",
     ("How many lesions or structures of interest are seen?", "Is the finding single or multiple?")),
    ("abnormal", r"\b(lesion|opacit\w+|nodules?|mass|consolidation|fracture|effusion|tumou?r|metasta\w+|fibroma)\b",
     ("Is there an abnormality in this image?", "Does this image show anything abnormal?")),
    ("stain", r"\b(stain\w*|immuno\w+|hematoxylin|eosin|dab|counterstain)\b",
     ("What does the staining show?", "What do the colours of the stain indicate?")),
    ("flow", r"\b(doppler|flow|vascularity|tracer|uptake)\b",
     ("What does the signal or uptake pattern show?", "What does the colour or tracer signal indicate?")),
]


def qa_from_text(caption: str, mentions: str) -> list[tuple[str, str]]:
    """Deterministic Q&A rounds grounded in a caption and its in-text mentions (the offline generator).

    Questions differ by figure: one per aspect the caption speaks of (modality, plane, side, anatomy, size,
    number, abnormality, stain, signal), each answered by the sentence that speaks of it, in an order and a
    phrasing drawn from the caption; then the main findings, what else is seen, the clinical significance
    (from the mentions) and whether the image alone settles a diagnosis."""
    sents = split_sentences(caption)
    mention_sents = split_sentences(mentions)
    first = sents[0].rstrip(".") if sents else caption
    kind = re.split(r"\s(?:showing|displayed|with|from|of a|in which)\s|,", first, maxsplit=1)[0]
    rest = first[len(kind):].strip(" ,")
    if rest.startswith("showing ") and len(rest) > 20:  # "X showing <findings>"
        findings = rest[8].upper() + rest[9:] + "."
    else:
        findings = sents[1] if len(sents) > 1 else first + "."
    pick = stable_int(caption, "phrasing") % 2
    modality = (("What kind of image is this?", "Which imaging modality or technique was used?")[pick],
                f"This image is {_article(kind)} {kind[0].lower() + kind[1:]}.")
    aspects, used = [modality, ("What are the main findings in this image?", findings)], {findings}
    for name, pattern, questions in ASPECTS:
        hit = next((s for s in sents + mention_sents if re.search(pattern, s, re.I)), None)
        if hit:
            aspects.append((questions[stable_int(caption, name) % 2], hit))
            used.add(hit)
    aspects.sort(key=lambda qa: stable_int(caption, qa[0]))  # the order differs by figure too
    qa = aspects + [("What else can be seen in the image?", s) for s in sents[1:] if s not in used]
    for s in mention_sents:
        qa.append(("What is the clinical significance of this appearance?",
                   f"The appearance may be explained as follows: {s[0].lower() + s[1:]} "
                   "Confirmation would rely on the full clinical picture."))
    qa.append(("Can a diagnosis be made from this image alone?",
               "Not with certainty: the image supports the description above, but a diagnosis would need "
               "clinical correlation and, where appropriate, further imaging or tissue sampling."))
    return qa


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def heuristic_score(context: str, question: str, answer: str) -> tuple[int, str]:
    """Offline stand-in for the paper's rubric (relevance, grounding, precision, clarity, calibration).

    +4 x share of the answer's content words found in the caption/mentions (grounding)
    +2 if the answer has 8-60 words, -2 if fewer than 4 (depth, clarity)
    +1 if the question is a question; +1 if the answer hedges where appropriate
    -2 for overconfident wording; -3 for leaking the source ("the caption says") or refusing to look
    base 2; clamped to 0..10.
    """
    words = content_words(answer)
    ctx = set(content_words(context))
    grounding = sum(w in ctx for w in words) / len(words) if words else 0.0
    n = len(answer.split())
    low = answer.lower()
    score = 2 + 4 * grounding
    score += 2 if 8 <= n <= 60 else (-2 if n < 4 else 0)
    score += 1 if question.strip().endswith("?") else 0
    score += 1 if any(h in low for h in HEDGES) else 0
    score -= 2 if any(o in low for o in OVERCONFIDENT) else 0
    score -= 3 if re.search(r"\b(the )?(caption|context|text) (says|states|mentions)|\bi (cannot|can't) (view|see|analy[sz]e)"
                            r"|i'm sorry", low) else 0  # a refusal; "I cannot be certain from the image" is a hedge
    final = int(round(min(10, max(0, score))))
    return final, f"grounding={grounding:.2f} words={n}"
