import copy

from vital.backends import OfflineBackend, make_backend, BackendUnavailable
from vital.generate import clean_rounds, generate, parse_reply
from vital.schema import AppendLog, Demo

import pytest


def _demos():
    conv = [{"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": "A chest radiograph."}]
    return [Demo(id="d1", domain="chest_xray", caption="c", inline_mentions=["m"], conversations=conv)]


class CountingBackend(OfflineBackend):
    def __init__(self):
        self.calls = 0

    def complete(self, messages, task):
        self.calls += 1
        return super().complete(messages, task)


def test_offline_generation_is_grounded_cached_and_labelled(sample, tmp_path):
    records, image_dir = sample
    backend = CountingBackend()
    log = AppendLog(tmp_path / "cache.jsonl")
    convs, rejected, stats = generate(records, image_dir, _demos(), backend, log, 3, 1, 0, {"temperature": 0})
    assert backend.calls == len(records) and not rejected
    for c in convs:
        n = len(c.conversations) // 2
        assert 3 <= n <= 5 and c.backend == "offline" and len(c.request_hash) == 32
        assert [t["from"] for t in c.conversations] == ["human", "gpt"] * n
    cxr = next(c for c in convs if c.id == "sample-cxr-rg1")
    assert "opacities" in " ".join(t["value"] for t in cxr.conversations)  # grounded in the caption
    # a rerun pays for nothing; changing one figure re-requests only that one
    again, _, stats2 = generate(records, image_dir, _demos(), backend, log, 3, 1, 0, {"temperature": 0})
    assert backend.calls == len(records) and stats2["cached"] == len(records)
    assert [c.conversations for c in again] == [c.conversations for c in convs]
    records[0].caption += " Extra sentence about the image."
    generate(records, image_dir, _demos(), backend, log, 3, 1, 0, {"temperature": 0})
    assert backend.calls == len(records) + 1
    records[0].caption = records[0].caption.replace(" Extra sentence about the image.", "")


def test_parse_reply_variants():
    text = ("1. **User:** What modality?\n**Assistant:** MRI.\n\n2) Q: Where is the lesion?\nA: In the liver,\n"
            "near the dome.\nUser: dangling question")
    turns = parse_reply(text)
    assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
    assert turns[1]["value"] == "MRI." and turns[3]["value"] == "In the liver,\nnear the dome."


def test_leaks_and_refusals_are_dropped_and_short_conversations_rejected(sample, tmp_path):
    turns, dropped = clean_rounds(parse_reply(
        "User: What is seen?\nAssistant: The caption says a nodule.\nUser: Size?\nAssistant: I'm sorry, I cannot tell."
        "\nUser: Modality?\nAssistant: CT."))
    assert dropped == {"leak": 1, "refusal": 1, "image_token": 0} and len(turns) == 2

    class Leaky(OfflineBackend):
        def complete(self, messages, task):
            return "User: What is this?\nAssistant: According to the text, a CT.\nUser: Fine?\nAssistant: Yes."

    records, image_dir = sample
    convs, rejected, stats = generate(records[:2], image_dir, [], Leaky(), AppendLog(tmp_path / "c.jsonl"), 3, 1, 0, {})
    assert not convs and len(rejected) == 2 and "min_rounds=3" in rejected[0]["reason"]
    assert stats["rounds_dropped"]["leak"] == 2


def test_real_backends_say_when_they_arrive():
    with pytest.raises(BackendUnavailable, match="issue #3"):
        make_backend("openai")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        make_backend("gpt5")


def test_identical_requests_share_a_reply_but_keep_their_own_ids(sample, tmp_path):
    records, image_dir = sample
    twin = copy.deepcopy(records[0])
    twin.id = "twin-of-" + records[0].id
    log = AppendLog(tmp_path / "cache.jsonl")
    for _ in range(2):  # first run fills the cache, second run reads it
        convs, _, stats = generate([records[0], twin], image_dir, [], OfflineBackend(), log, 3, 1, 0, {})
        assert [c.id for c in convs] == [records[0].id, twin.id]
    assert stats["cached"] == 2


def test_rounds_containing_the_image_token_are_dropped():
    turns, dropped = clean_rounds(parse_reply("User: <image> What is it?\nAssistant: A CT.\nUser: Where?\nAssistant: Chest."))
    assert dropped["image_token"] == 1 and [t["value"] for t in turns] == ["Where?", "Chest."]
