from vital.llm.client import Client, ClientConfig
from vital.generate import GenerateConfig, generate
from vital.llm.offline import OfflineBackend
from vital.pool import build_pool, select_diverse
from vital.rate import parse_score, rate
from vital.schema import AppendLog

import numpy as np

OFFLINE = Client(ClientConfig())


def test_parse_score_is_strict():
    assert parse_score("7\nclear and grounded") == 7
    assert parse_score("Score: 9/10\n...") == 9
    assert parse_score("**10**") == 10
    assert parse_score("0") == 0
    for bad in ["seven", "11", "", "The answer is good. 8", "-1", "7.5"]:
        assert parse_score(bad) is None, bad


def test_unparseable_rating_is_null_never_a_default(sample, tmp_path):
    records, image_dir = sample
    convs, *_ = generate(records[:2], image_dir, [], OFFLINE, AppendLog(tmp_path / "g.jsonl"), GenerateConfig())

    class Chatty(OfflineBackend):
        def complete(self, messages, task):
            return "I would rate this quite highly overall."

    ratings, _, _, stats = rate(convs, {r.id: r for r in records}, image_dir, Client(ClientConfig(), Chatty()),
                             AppendLog(tmp_path / "r.jsonl"), {})
    assert ratings and all(r.score is None for r in ratings)
    assert ratings[0].raw == "I would rate this quite highly overall."
    assert stats["unparsed"] == len(ratings) and stats["mean_score"] is None


def test_offline_rates_grounded_rounds_in_range(sample, tmp_path):
    records, image_dir = sample
    convs, *_ = generate(records, image_dir, [], OFFLINE, AppendLog(tmp_path / "g.jsonl"), GenerateConfig())
    ratings, _, failures, stats = rate(convs, {r.id: r for r in records}, image_dir, OFFLINE,
                                    AppendLog(tmp_path / "r.jsonl"), {})
    assert not failures and stats["rated"] == stats["rounds"]
    assert len(ratings) == sum(len(c.conversations) // 2 for c in convs)
    assert all(0 <= r.score <= 10 for r in ratings) and len({r.score for r in ratings}) > 1


def test_rate_reads_its_conversations_once_so_the_stage_can_stream_them(sample, tmp_path):
    # stages/rate.py hands rate() a one-pass stream of the file (not a list): the same ratings, every round
    records, image_dir = sample
    convs, *_ = generate(records, image_dir, [], OFFLINE, AppendLog(tmp_path / "g.jsonl"), GenerateConfig())
    by_id = {r.id: r for r in records}
    listed, *_ = rate(convs, by_id, image_dir, OFFLINE, AppendLog(tmp_path / "a.jsonl"), {})
    streamed, _, _, stats = rate((c for c in convs), by_id, image_dir, OFFLINE, AppendLog(tmp_path / "b.jsonl"), {})
    assert streamed == listed and stats["rounds"] == len(listed) > len(convs)


def test_select_diverse_takes_nearest_per_cluster():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 10], [0, 10]])
    emb = np.vstack([c + rng.normal(0, 0.1, (5, 2)) for c in centres])
    picked = select_diverse(emb, clusters=3, per_cluster=2, seed=0)
    assert len(picked) == 6 and len({c for _, c in picked}) == 3
    assert sorted(i // 5 for i, _ in picked) == [0, 0, 1, 1, 2, 2]  # two from each true group


def test_the_pools_float32_features_pick_the_figures_float64_would():
    # figure_embeddings keeps float32 (half the memory a figure); k-means on them picks what it did on float64
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(6, 497))
    emb = (centres[rng.integers(0, 6, 3000)] + rng.normal(scale=2.0, size=(3000, 497))).astype(np.float32)
    assert select_diverse(emb.copy(), 6, 2, 0) == select_diverse(emb.astype(np.float64), 6, 2, 0)


def test_pool_is_diverse_and_has_two_answers_per_question(sample, tmp_path):
    records, image_dir = sample
    items, _, stats = build_pool(records, image_dir, OFFLINE, AppendLog(tmp_path / "p.jsonl"),
                              clusters=4, per_cluster=2, questions_per_figure=2, image_weight=1.0, seed=0)
    assert 4 <= stats["figures"] <= 8 and len(items) == 2 * stats["figures"]  # a cluster may hold one figure
    assert len({i.domain for i in items}) >= 3  # not all of one kind
    assert all(i.answer_a and i.answer_b and i.answer_a != i.answer_b for i in items)
    assert len({i.question_id for i in items}) == len(items)


def test_pool_questions_come_from_the_models_conversation_not_a_template(sample, tmp_path):
    from vital.llm.backends import Reply
    from vital.pool import POOL_PROMPT

    seen = []

    class Scripted(OfflineBackend):
        async def acomplete(self, messages, task, sampling):
            seen.append((task, messages[0]["content"]))
            return Reply("User: Where is the lesion?\nAnswer 1: In the right lobe.\nAnswer 2: In the left lobe.\n"
                         "User: Same twice?\nAnswer 1: Yes.\nAnswer 2: Yes.\n"  # no choice to judge: left out
                         "**Question:** Is it calcified?\n**Answer A:** No calcification is seen.\n"
                         "continued on a second line.\n**Answer B:** It may be calcified.\n"
                         "User: A third question?\nAnswer 1: One.\nAnswer 2: Two.", 10, 10, "stop")

    records, image_dir = sample
    items, _, stats = build_pool(records[:4], image_dir, Client(ClientConfig(), Scripted()),
                                 AppendLog(tmp_path / "p.jsonl"), clusters=2, per_cluster=1, questions_per_figure=2,
                                 image_weight=1.0, seed=0)
    assert len(seen) == 2 and all(t == "pool" and s == POOL_PROMPT.format(rounds=2) for t, s in seen)  # one a figure
    assert [(i.question, i.answer_a, i.answer_b) for i in items[:2]] == [
        ("Where is the lesion?", "In the right lobe.", "In the left lobe."),
        ("Is it calcified?", "No calcification is seen. continued on a second line.", "It may be calcified.")]
    assert [i.question_id.split(":")[1] for i in items[:2]] == ["q0", "q1"]


def test_a_pool_reply_cut_inside_an_answer_loses_that_round_and_a_repeated_question_keeps_its_place(sample, tmp_path):
    from vital.llm.backends import Reply

    class Cut(OfflineBackend):
        async def acomplete(self, messages, task, sampling):
            return Reply("User: Q0?\nAnswer 1: a.\nAnswer 2: b.\nUser: Q1?\nAnswer 1: c.\nAnswer 2: d.\n"
                         "User: Q0?\nAnswer 1: e.\nAnswer 2: f.\nUser: Q2?\nAnswer 1: g.\nAnswer 2: It is", 10, 10, "length")

    records, image_dir = sample
    items, _, stats = build_pool(records[:1], image_dir, Client(ClientConfig(), Cut()), AppendLog(tmp_path / "p.jsonl"),
                                 clusters=1, per_cluster=1, questions_per_figure=5, image_weight=1.0, seed=0)
    assert [(i.question, i.answer_a) for i in items] == [("Q0?", "a."), ("Q1?", "c.")]  # Q2's answer was cut
    assert stats["figures_with_fewer_questions"] == 1 and stats["fewer_questions_figures"] == [records[0].id]


def test_the_offline_pool_asks_different_questions_of_different_figures(sample, tmp_path):
    records, image_dir = sample
    items, _, stats = build_pool(records, image_dir, OFFLINE, AppendLog(tmp_path / "p.jsonl"),
                                 clusters=6, per_cluster=2, questions_per_figure=2, image_weight=1.0, seed=0)
    firsts = {i.question for i in items if i.question_id.endswith(":q0")}
    assert stats["distinct_questions"] >= 8 and len(firsts) >= 4  # a template would ask two questions of all
    assert any(w in " ".join(i.question.lower() for i in items) for w in ("side", "plane", "size", "anatomy"))


class Flaky(OfflineBackend):
    """The offline model, but the first `times` asks about a prompt holding `marker` get `text` instead."""

    def __init__(self, marker, times=1, text="I would rate this quite highly overall."):
        self.marker, self.times, self.text, self.asked = marker, times, text, 0

    def complete(self, messages, task):
        content = messages[-1]["content"]
        if self.marker in (content if isinstance(content, str) else content[0]["text"]):
            self.asked += 1
            if self.asked <= self.times:
                return self.text
        return super().complete(messages, task)


def test_an_unparseable_rating_is_asked_again_once_then_kept_null_with_its_reason(sample, tmp_path):
    records, image_dir = sample
    convs, *_ = generate(records[:2], image_dir, [], OFFLINE, AppendLog(tmp_path / "g.jsonl"), GenerateConfig())
    by_id = {r.id: r for r in records}
    clean, *_ = rate(convs, by_id, image_dir, OFFLINE, AppendLog(tmp_path / "clean.jsonl"), {})
    marker = f"Question: {convs[0].conversations[0]['value']}\nAnswer: {convs[0].conversations[1]['value']}"
    once = Flaky(marker)
    ratings, _, _, stats = rate(convs, by_id, image_dir, Client(ClientConfig(), once), AppendLog(tmp_path / "a.jsonl"), {})
    assert [(r.candidate_id, r.score) for r in ratings] == [(r.candidate_id, r.score) for r in clean]
    assert stats["reasked"] == 1 and once.asked == 2 and stats["unparsed"] == 0

    twice = Flaky(marker, times=2, text="I cannot assist with that.")
    ratings, _, _, stats = rate(convs, by_id, image_dir, Client(ClientConfig(), twice), AppendLog(tmp_path / "b.jsonl"), {})
    assert [r.raw for r in ratings if r.score is None] == ["I cannot assist with that."]
    assert stats["reasked"] == 1 and stats["unparsed"] == 1
    assert stats["unparsed_by_reason"] == {"unparseable": 0, "refused": 1}


def test_an_unparseable_pool_reply_is_asked_again_once(sample, tmp_path):
    records, image_dir = sample
    kw = dict(clusters=2, per_cluster=1, questions_per_figure=2, image_weight=1.0, seed=0)
    clean, _, _ = build_pool(records[:4], image_dir, OFFLINE, AppendLog(tmp_path / "clean.jsonl"), **kw)
    once = Flaky(clean[0].caption, text="Lorem ipsum.")
    items, _, stats = build_pool(records[:4], image_dir, Client(ClientConfig(), once), AppendLog(tmp_path / "a.jsonl"), **kw)
    assert [(i.question_id, i.answer_a) for i in items] == [(i.question_id, i.answer_a) for i in clean]
    assert stats["reasked"] == 1 and stats["unparsed_replies"] == 0

    twice = Flaky(clean[0].caption, times=2, text="Lorem ipsum.")
    items, _, stats = build_pool(records[:4], image_dir, Client(ClientConfig(), twice), AppendLog(tmp_path / "b.jsonl"),
                                 **kw)
    assert clean[0].figure_id not in {i.figure_id for i in items} and stats["reasked"] == 1
    assert stats["unparsed_figures"] == [clean[0].figure_id]
    assert stats["unparsed_by_reason"] == {"unparseable": 1, "refused": 0}


def test_a_grown_corpus_embeds_only_its_new_figures(sample, tmp_path):
    """The pool's figure embeddings and decontaminate_qa's round embeddings go through the embedding cache."""
    from vital.decontaminate import text_matches
    from vital.evalsets import EvalSet
    from vital.encoders import EmbeddingCache, cached_text_encoder
    from vital.pool import figure_embeddings

    records, image_dir = sample

    def counted(fn):
        before = dict(EmbeddingCache.counts)
        out = fn()
        return out, {k: EmbeddingCache.counts[k] - before[k] for k in before}

    plain = figure_embeddings(records, image_dir, 1.0)
    assert plain.dtype == np.float32
    cached, counts = counted(lambda: figure_embeddings(records[:10], image_dir, 1.0, tmp_path))
    assert counts == {"computed": 20, "from_cache": 0}  # 10 texts, 10 images
    grown, counts = counted(lambda: figure_embeddings(records, image_dir, 1.0, tmp_path))
    assert counts == {"computed": 2 * (len(records) - 10), "from_cache": 20}
    np.testing.assert_allclose(grown, plain, atol=1e-5)

    item = {"id": "q1", "question": "Is there a pneumothorax on the left side of this chest film?", "answer": "no"}
    rounds = [("r1", "Is there a pneumothorax on the left side of this chest film? no"), ("r2", "Which organ is it?")]
    sets = [EvalSet(name="vqa", layout="vital", items=[item], images={})]
    rows, counts = counted(lambda: text_matches(rounds, sets, 3, 0.8, 0.9, cached_text_encoder(tmp_path))[0])
    again, counts2 = counted(lambda: text_matches(rounds, sets, 3, 0.8, 0.9, cached_text_encoder(tmp_path))[0])
    assert {r["kind"] for r in rows} == {"text_bigrams", "text_embedding"} and again == rows
    # the item's text is round r1's: embedded once, then found
    assert counts == {"computed": 2, "from_cache": 1} and counts2 == {"computed": 0, "from_cache": 3}
