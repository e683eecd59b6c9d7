from vital.client import Client, ClientConfig
from vital.generate import GenerateConfig, generate
from vital.offline import OfflineBackend
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


def test_select_diverse_takes_nearest_per_cluster():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 10], [0, 10]])
    emb = np.vstack([c + rng.normal(0, 0.1, (5, 2)) for c in centres])
    picked = select_diverse(emb, clusters=3, per_cluster=2, seed=0)
    assert len(picked) == 6 and len({c for _, c in picked}) == 3
    assert sorted(i // 5 for i, _ in picked) == [0, 0, 1, 1, 2, 2]  # two from each true group


def test_pool_is_diverse_and_has_two_answers_per_question(sample, tmp_path):
    records, image_dir = sample
    items, _, stats = build_pool(records, image_dir, OFFLINE, AppendLog(tmp_path / "p.jsonl"),
                              clusters=4, per_cluster=2, questions_per_figure=2, image_weight=1.0, seed=0)
    assert 4 <= stats["figures"] <= 8 and len(items) == 2 * stats["figures"]  # a cluster may hold one figure
    assert len({i.domain for i in items}) >= 3  # not all of one kind
    assert all(i.answer_a and i.answer_b and i.answer_a != i.answer_b for i in items)
    assert len({i.question_id for i in items}) == len(items)
