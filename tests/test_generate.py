import copy

from vital.backends import Fatal, image_part
from vital.client import Client, ClientConfig
from vital.generate import GenerateConfig, build_messages, clean_rounds, generate, parse_reply
from vital.offline import OfflineBackend
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
    turns, dropped = clean_rounds(parse_reply(
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
    turns, dropped = clean_rounds(parse_reply("User: <image> What is it?\nAssistant: A CT.\nUser: Where?\nAssistant: Chest."))
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
    kept, dropped = clean_rounds(turns, GenerateConfig(leak_phrases=("per the legend",)))
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


def test_a_reply_cut_at_max_tokens_loses_its_unfinished_last_round(sample, tmp_path):
    from vital.backends import Reply

    class Cut(OfflineBackend):
        async def acomplete(self, messages, task, sampling):
            text = "\n".join(f"User: Q{i}?\nAssistant: A{i}." for i in range(4)) + "\nUser: Q4?\nAssistant: It is"
            return Reply(text, 10, 10, "length")

    records, image_dir = sample
    convs, *_ = generate(records[:1], image_dir, [], offline(Cut()), AppendLog(tmp_path / "c.jsonl"), GenerateConfig())
    assert [t["value"] for t in convs[0].conversations][-1] == "A3."
