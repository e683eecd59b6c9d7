"""Write the illustrative votes of the embedded default (clinician.jsonl) from a pool, by a rule, not a clinician.

    python examples/annotation/illustrative_votes.py data/annotation/pool.jsonl examples/annotation/clinician.jsonl

The rule reads what an annotator sees (caption, mentions, question, the two answers) and marks an answer
acceptable unless it is overconfident or generic ("definitely", "no abnormality"), contradicts the figure on the
side or the modality (a left/right/CT/MRI/... word that the caption and mentions do not use), or is under six words.
Each vote carries the hash of the answers it judged, as the annotation app's do, so if the pool changes the old
votes are counted stale and never merged: rerun this script then.
"""
import json
import re
import sys

from vital.preferences import answers_hash
from vital.schema import PoolItem

CHECKED = ("left", "right", "ct", "mri", "mr", "radiograph", "ultrasound", "axial", "sagittal", "coronal")
OVERCONFIDENT = ("definitely", "certainly", "no abnormality", "undoubtedly")
NOTE = "ILLUSTRATIVE: written by a rule for the embedded offline default, not by a clinician"


def acceptable(answer: str, context: str) -> bool:
    words, seen = re.findall(r"[a-z]+", answer.lower()), set(re.findall(r"[a-z]+", context.lower()))
    return (len(words) >= 6 and not any(o in answer.lower() for o in OVERCONFIDENT)
            and all(w in seen for w in words if w in CHECKED))


def main(pool_path: str, out_path: str) -> None:
    with open(pool_path, encoding="utf-8") as f, open(out_path, "w", encoding="utf-8") as out:
        for item in map(json.loads, f):
            context = item["caption"] + " " + " ".join(item["inline_mentions"])
            vote = {"question_id": item["question_id"], "annotator": "sample-rule (not a clinician)",
                    "a_acceptable": acceptable(item["answer_a"], context),
                    "b_acceptable": acceptable(item["answer_b"], context), "note": NOTE,
                    "answers_hash": answers_hash(PoolItem(**item))}
            out.write(json.dumps(vote) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
