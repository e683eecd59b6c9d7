import copy
import json

from vital.llm.backends import Fatal, image_part
from vital.llm.client import Client, ClientConfig
from vital.generate import (LEAK_PHRASES, REFUSAL_PHRASES, SYSTEM_PROMPT, GenerateConfig, build_messages, clean_rounds,
                            generate, parse_reply, pick_demos)
from vital.llm.offline import OfflineBackend
from vital.schema import AppendLog, Demo

import pytest

CFG = GenerateConfig(temperature=0)


def _demos():
    conv = [{"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": "A chest radiograph."}]
    return [Demo(id="d1", domain="chest_xray", caption="c", inline_mentions=["m"], conversations=conv)]


def offline(backend=None):
    return Client(ClientConfig(), backend)


class CountingBackend(OfflineBackend):
    def __init__(self):
        self.calls = 0

    def complete(self, messages, task):
        self.calls += 1
        return super().complete(messages, task)


def test_offline_generation_is_grounded_cached_and_labelled(sample, tmp_path):
    records, image_dir = sample
    records = copy.deepcopy(records)  # edited below; the fixture is shared
    backend = CountingBackend()
    log = AppendLog(tmp_path / "cache.jsonl")
    convs, rejected, failures, stats = generate(records, image_dir, _demos(), offline(backend), log, CFG)
    assert not failures and backend.calls == len(records) and not rejected
    for c in convs:
        n = len(c.conversations) // 2
        assert 3 <= n <= 5 and c.backend == "offline" and len(c.request_hash) == 32
        assert [t["from"] for t in c.conversations] == ["human", "gpt"] * n
    cxr = next(c for c in convs if c.id == "sample-cxr-rg1")
    assert "opacities" in " ".join(t["value"] for t in cxr.conversations)  # grounded in the caption
    # a rerun pays for nothing; changing one figure re-requests only that one
    again, _, _, stats2 = generate(records, image_dir, _demos(), offline(backend), log, CFG)
    assert backend.calls == len(records) and stats2["cached"] == len(records)
    assert [c.conversations for c in again] == [c.conversations for c in convs]
    records[0].caption += " Extra sentence about the image."
    generate(records, image_dir, _demos(), offline(backend), log, CFG)
    assert backend.calls == len(records) + 1
    records[0].caption = records[0].caption.replace(" Extra sentence about the image.", "")


def test_parse_reply_variants():
    text = ("1. **User:** What modality?\n**Assistant:** MRI.\n\n2) Q: Where is the lesion?\nA: In the liver,\n"
            "near the dome.\nUser: dangling question")
    turns = parse_reply(text)
    assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
    assert turns[1]["value"] == "MRI." and turns[3]["value"] == "In the liver,\nnear the dome."


def test_leaks_and_refusals_are_dropped_and_short_conversations_rejected(sample, tmp_path):
    turns, dropped, _ = clean_rounds(parse_reply(
        "User: What is seen?\nAssistant: The caption says a nodule.\nUser: Size?\nAssistant: I'm sorry, I cannot tell."
        "\nUser: Modality?\nAssistant: CT."))
    assert dropped == {"leak": 1, "refusal": 1, "image_token": 0} and len(turns) == 2

    class Leaky(OfflineBackend):
        def complete(self, messages, task):
            return "User: What is this?\nAssistant: According to the text, a CT.\nUser: Fine?\nAssistant: Yes."

    records, image_dir = sample
    convs, rejected, _, stats = generate(records[:2], image_dir, [], offline(Leaky()), AppendLog(tmp_path / "c.jsonl"),
                                         GenerateConfig())
    assert not convs and len(rejected) == 2 and "min_rounds=3" in rejected[0]["reason"]
    assert stats["rounds_dropped"]["leak"] == 2
    assert stats["rounds_dropped_by_phrase"] == {"leak: according to the text": 2}


def test_unknown_backend_and_mode_are_clear_errors(monkeypatch):
    with pytest.raises(Fatal, match="unknown backend 'gpt5'"):
        Client(ClientConfig(backend="gpt5"))
    with pytest.raises(Fatal, match="mode: batch needs backend: openai"):
        Client(ClientConfig(mode="batch"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(Fatal, match="Set OPENAI_API_KEY in the environment"):
        Client(ClientConfig(backend="openai"))


def test_identical_requests_share_a_reply_but_keep_their_own_ids(sample, tmp_path):
    records, image_dir = sample
    twin = copy.deepcopy(records[0])
    twin.id = "twin-of-" + records[0].id
    log = AppendLog(tmp_path / "cache.jsonl")
    for _ in range(2):  # first run fills the cache, second run reads it
        convs, _, _, stats = generate([records[0], twin], image_dir, [], offline(), log, GenerateConfig())
        assert [c.id for c in convs] == [records[0].id, twin.id]
    assert stats["cached"] == 2


def test_rounds_containing_the_image_token_are_dropped():
    turns, dropped, _ = clean_rounds(parse_reply("User: <image> What is it?\nAssistant: A CT.\nUser: Where?\nAssistant: Chest."))
    assert dropped["image_token"] == 1 and [t["value"] for t in turns] == ["Where?", "Chest."]


def test_json_replies_fenced_or_bare_parse_like_text_ones():
    body = '{"conversations": [{"question": "Modality?", "answer": "MRI."}, {"question": "Where?", "answer": "Liver."}]}'
    expected = [{"from": "human", "value": "Modality?"}, {"from": "gpt", "value": "MRI."},
                {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "Liver."}]
    assert parse_reply(body) == expected
    assert parse_reply("```json\n" + body + "\n```") == expected
    assert parse_reply('[{"from": "human", "value": "Modality?"}, {"from": "gpt", "value": "MRI."}]') == expected[:2]
    assert parse_reply('{"conversations": [{"question": "Modality?"') == []  # truncated JSON: nothing usable


def test_phrase_lists_and_prompt_come_from_params(tmp_path):
    turns = parse_reply("User: What is seen?\nAssistant: Per the legend, a nodule.\nUser: Size?\nAssistant: 4 mm.")
    kept, dropped, _ = clean_rounds(turns, GenerateConfig(leak_phrases=("per the legend",)))
    assert dropped["leak"] == 1 and kept == turns[2:]
    rec = Demo(id="x", domain="mri", caption="c", inline_mentions=[], conversations=[])
    cfg = GenerateConfig(system_prompt="At least {min_rounds} rounds.", min_rounds=4, json_mode=True)
    msgs = build_messages(rec, _png(tmp_path, 256), [], cfg)
    assert msgs[0]["content"].startswith("At least 4 rounds.") and "JSON" in msgs[0]["content"]
    assert cfg.sampling["response_format"] == {"type": "json_object"}


def _png(tmp_path, side):
    from PIL import Image
    Image.new("L", (side, side // 2), 128).save(tmp_path / "im.png")
    return (tmp_path / "im.png").read_bytes()


def test_images_are_shrunk_to_max_image_side(tmp_path):
    import base64
    import io

    from PIL import Image
    data = _png(tmp_path, 1200)
    url = image_part(data, 512)["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        assert im.size == (512, 256)
    assert image_part(data, 0) == image_part(data, 2000)  # already small enough: sent as it is


@pytest.mark.parametrize("tail", ["\nUser: Q4?\nAssistant: It is",  # cut inside an answer: that round goes
                                  "\nUser: Q4 is"])  # cut inside a question: every complete round stays
def test_a_reply_cut_at_max_tokens_loses_only_its_unfinished_round(sample, tmp_path, tail):
    from vital.llm.backends import Reply

    class Cut(OfflineBackend):
        async def acomplete(self, messages, task, sampling):
            return Reply("\n".join(f"User: Q{i}?\nAssistant: A{i}." for i in range(4)) + tail, 10, 10, "length")

    records, image_dir = sample
    convs, *_ = generate(records[:1], image_dir, [], offline(Cut()), AppendLog(tmp_path / "c.jsonl"), GenerateConfig())
    values = [t["value"] for t in convs[0].conversations]
    assert len(values) == 8 and values[-1] == "A3."


def _modality_demos(per_modality):
    from vital.generate import MODALITIES
    conv = [{"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": "An image."}]
    return [Demo(id=f"{d}-{k}", domain=d, caption=f"demo {d}-{k}", inline_mentions=[], conversations=conv)
            for d in MODALITIES for k in range(per_modality)]


class Recording(OfflineBackend):
    """Keeps the demonstrations (by caption) of each request, keyed by the figure's caption."""
    def __init__(self):
        self.seen, self.calls = {}, 0

    def complete(self, messages, task):
        self.calls += 1
        demo_users = [m["content"] for m in messages[1:-1] if m["role"] == "user"]
        assert all(isinstance(c, str) for c in demo_users)  # demonstrations are text-only
        self.seen[messages[-1]["content"][0]["text"]] = [c.split("\n")[0].removeprefix("Caption: demo ")
                                                         for c in demo_users]
        return super().complete(messages, task)


def test_every_request_carries_one_demo_of_each_modality_drawn_per_figure(sample, tmp_path):
    from vital.generate import figure_text
    records, image_dir = sample
    log, backend = AppendLog(tmp_path / "cache.jsonl"), Recording()
    convs, _, _, stats = generate(records, image_dir, _modality_demos(2), offline(backend), log, CFG)
    assert backend.calls == len(records) and len(convs) == len(records)
    draws = {}
    for r, c in zip(records, convs):
        used = backend.seen[figure_text(r.caption, r.inline_mentions)]
        # one of each of the five modalities, in DOMAINS order, `other` figures included
        assert [u.rsplit("-", 1)[0] for u in used] == ["chest_xray", "mri", "ct_scan", "histology", "gross"]
        assert c.demo_ids == used  # recorded in prompt order
        draws[r.id] = tuple(used)
    assert "other" in {r.domain for r in records}
    assert len(set(draws.values())) > 1  # a fresh draw per figure
    # the same figure gets the same demonstrations: a rerun (a new process would do the same) is all cache
    again, _, _, stats2 = generate(records, image_dir, _modality_demos(2), offline(backend), log, CFG)
    assert backend.calls == len(records) and stats2["cached"] == len(records)
    assert [c.demo_ids for c in again] == [c.demo_ids for c in convs]
    # a modality missing from the demonstrations file is skipped
    backend = Recording()
    convs, *_ = generate(records[:2], image_dir, _demos(), offline(backend), AppendLog(tmp_path / "c2.jsonl"), CFG)
    assert [c.demo_ids for c in convs] == [["d1"], ["d1"]] and records[1].domain == "other"


def test_own_domain_scheme_draws_once_per_run_from_the_figures_modality(sample, tmp_path):
    records, image_dir = sample
    demos, cfg = _modality_demos(2), GenerateConfig(temperature=0, demo_scheme="own_domain", seed=3)
    convs, *_ = generate(records, image_dir, demos, offline(), AppendLog(tmp_path / "c.jsonl"), cfg)
    chosen = pick_demos(demos, 1, 3)
    for r, c in zip(records, convs):
        assert c.demo_ids == [d.id for d in chosen.get(r.domain, [])]
    assert {tuple(c.demo_ids) for c in convs if c.domain == "other"} == {()}


def test_unknown_demo_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="generate.demo_scheme is 'all'; use one of every_modality, own_domain"):
        GenerateConfig.from_params({"demo_scheme": "all"})


def _round(answer):
    return [{"from": "human", "value": "Is this malignant?"}, {"from": "gpt", "value": answer}]


def test_calibrated_hedges_are_kept_and_leaks_and_refusals_dropped():
    hedges = ["I cannot be certain from the image alone.", "This cannot be determined from the image alone.",
              "It is common in the context of chronic disease.", "I can't say for sure without clinical correlation.",
              "I cannot provide a definitive diagnosis; please consult a clinician.",
              "Useful as an aid to diagnosis."]
    for h in hedges:
        kept, dropped, by_phrase = clean_rounds(_round(h))
        assert kept == _round(h) and not by_phrase, h
    drops = {"As mentioned in the caption, a nodule.": "leak: mentioned in the caption",  # the longest
             "The caption says a nodule.": "leak: the caption",
             "I'm sorry, but I can't view images.": "refusal: i can't view",
             "I\u2019m sorry, but I can\u2019t view images.": "refusal: i can't view",
             "I'm sorry, that is all.": "refusal: i'm sorry",
             "As an AI, I cannot see the image.": "refusal: i cannot see the image",
             "According to the text, a nodule.": "leak: according to the text"}
    for text, phrase in drops.items():
        kept, dropped, by_phrase = clean_rounds(_round(text))
        assert kept == [] and by_phrase == {phrase: 1}, text
        assert dropped[phrase.split(":")[0]] == 1


def test_default_prompt_and_phrases_are_params_yaml():
    import yaml
    from pathlib import Path
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())["generate"]
    cfg = GenerateConfig.from_params(params)
    assert (cfg.system_prompt, cfg.leak_phrases, cfg.refusal_phrases) == (SYSTEM_PROMPT, LEAK_PHRASES,
                                                                          REFUSAL_PHRASES)
    assert cfg.demo_scheme == GenerateConfig().demo_scheme


class Flaky(OfflineBackend):
    """The offline model, but the first `times` asks about a prompt holding `marker` get `text` instead."""

    def __init__(self, marker, times=1, text="I'm sorry, I can't help with that."):
        self.marker, self.times, self.text, self.asked = marker, times, text, 0

    def complete(self, messages, task):
        if self.marker in str(messages[-1]["content"]):
            self.asked += 1
            if self.asked <= self.times:
                return self.text
        return super().complete(messages, task)


def test_rejected_reply_is_one_rule_for_every_stage():
    from vital.replies import rejected_reply

    good = "User: What modality?\nAssistant: A chest radiograph.\nUser: Which side?\nAssistant: The left."
    assert rejected_reply("generate", good) is None
    assert rejected_reply("generate", "Lorem ipsum dolor sit amet.") == "unparseable"
    assert rejected_reply("generate", "I'm sorry, I can't help with that.") == "refused"
    assert rejected_reply("generate", "User: What is it?\nAssistant: As an AI, I cannot view images.") == "refused"
    assert rejected_reply("generate", "User: What is it?\nAssistant: I am sorry, but...", ["as an ai"]) is None
    assert rejected_reply("rate", "7\nclear") is None and rejected_reply("rate", "quite good") == "unparseable"
    assert rejected_reply("rate", "I cannot assist with rating this.") == "refused"
    assert rejected_reply("pool", "User: Where?\nAnswer 1: Left.\nAnswer 2: Right.") is None
    assert rejected_reply("pool", "User: Where?\nAnswer 1: Left.") == "unparseable"
    assert rejected_reply("judge", "anything") is None  # not judged by this rule


def test_a_refusal_is_asked_again_once_then_rejected_with_its_reason(sample, tmp_path):
    records, image_dir = sample
    records = records[:3]
    clean, *_ = generate(records, image_dir, [], offline(), AppendLog(tmp_path / "clean.jsonl"), CFG)
    once = Flaky(records[2].caption)
    convs, rejected, _, stats = generate(records, image_dir, [], offline(once), AppendLog(tmp_path / "a.jsonl"), CFG)
    assert [c.conversations for c in convs] == [c.conversations for c in clean] and not rejected
    assert stats["reasked"] == 1 and once.asked == 2 and stats["requests"] == 4

    twice = Flaky(records[2].caption, times=2)
    convs, rejected, _, stats = generate(records, image_dir, [], offline(twice), AppendLog(tmp_path / "b.jsonl"), CFG)
    assert [c.id for c in convs] == [r.id for r in records[:2]] and stats["reasked"] == 1 and twice.asked == 2
    assert rejected == [{"id": records[2].id, "reason": "refused (a refusal and no usable round), also when asked again",
                         "request_hash": rejected[0]["request_hash"]}]
    assert stats["rejected_by_reason"] == {"refused": 1} and stats["rejected"] == 1


def test_evict_removes_what_stayed_rejected_and_keeps_what_a_re_ask_answered(sample, tmp_path):
    from vital.replies import evict_rejected

    records, image_dir = sample
    records = records[:3]
    cache = tmp_path / "generate.jsonl"

    class TwoFlaky(OfflineBackend):  # figure 0: garbage once (the re-ask answers); figure 1: garbage twice
        asked = {0: 0, 1: 0}

        def complete(self, messages, task):
            for k, times in ((0, 1), (1, 2)):
                if records[k].caption in str(messages[-1]["content"]):
                    self.asked[k] += 1
                    if self.asked[k] <= times:
                        return "Lorem ipsum dolor sit amet."
            return super().complete(messages, task)

    convs, rejected, _, stats = generate(records, image_dir, [], offline(TwoFlaky()), AppendLog(cache), CFG)
    assert stats["reasked"] == 2 and [r["id"] for r in rejected] == [records[1].id] and len(convs) == 2
    assert cache.read_text().count("\n") == 5
    with open(cache, "a") as f:
        f.write('{"request_hash": "torn')  # a killed run's half line: dropped too
    assert evict_rejected(cache) == {"path": str(cache), "entries": 5, "removed": 2,
                                     "by_reason": {"unparseable": 2, "refused": 0}}
    left = [json.loads(x) for x in cache.read_text().splitlines()]
    assert len(left) == 3 and sum(e["reply"].startswith("Lorem") for e in left) == 1  # figure 0's first reply leads on
    counting = CountingBackend()
    convs, rejected, _, stats = generate(records, image_dir, [], offline(counting), AppendLog(cache), CFG)
    assert counting.calls == 1 and len(convs) == 3 and not rejected  # figure 1 only, asked anew
    assert evict_rejected(cache)["removed"] == 0 and evict_rejected(tmp_path / "none.jsonl")["entries"] == 0
