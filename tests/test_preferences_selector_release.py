import json
import pytest

from vital import release, selector
from vital.preferences import (SPLITS, answers_hash, check_ratings, check_votes, clinician_pairs,
                               model_pairs, rater_agreement, split_figures, unit_scores)
from vital.schema import IMAGE_TOKEN, Conversation, PoolItem, Rating, Vote


def _pool(n, per_figure=1):
    return {f"q{i}": PoolItem(question_id=f"q{i}", figure_id=f"f{i // per_figure}", image="f.png", domain="mri", caption="c",
                              inline_mentions=[], cluster=0, question="q?", answer_a="a", answer_b="b",
                              backend="offline", request_hash="h") for i in range(n)}


def test_clinician_pairs_acceptable_over_unacceptable_split_by_figure():
    votes = [Vote(f"q{i}", "dr", a_acceptable=i % 2 == 0, b_acceptable=i % 2 == 1) for i in range(10)]
    votes += [Vote("q0", "dr2", True, True), Vote("q1", "dr2", False, False), Vote("gone", "dr", True, False)]
    pairs, counts, splits = clinician_pairs(votes, _pool(10), weight=100, validation=0.2, test=0.3, seed=0)
    assert len(pairs) == 10
    assert counts == {"votes": 13, "not_in_pool": 1, "stale": 0, "unverified": 12, "no_preference": 2,
                      "annotators_disagree": 0}
    assert all(p.weight == 100 and p.source == "clinician" for p in pairs)
    by_q = {p.a_id: p for p in pairs}
    assert by_q["q0:A"].label == 1 and by_q["q1:A"].label == 0  # q0: A acceptable, q1: B acceptable
    assert [sum(p.split == k for p in pairs) for k in ("train", "validation", "test")] == [6, 2, 2]  # this seed
    assert all(p.split == splits[f"f{p.a_id[1:].split(':')[0]}"] for p in pairs)


def test_a_figures_split_never_depends_on_the_other_figures():
    figures = [f"fig{i}" for i in range(2000)]
    splits = split_figures(figures, 0.2, 0.3, seed=0)
    assert split_figures(figures[:1000] + ["new"], 0.2, 0.3, seed=0).items() >= {f: splits[f] for f in figures[:1000]}.items()
    shares = {k: sum(v == k for v in splits.values()) / 2000 for k in SPLITS}
    assert abs(shares["test"] - 0.3) < 0.04 and abs(shares["validation"] - 0.2) < 0.04  # on average, not exactly
    assert split_figures(figures, 0.2, 0.3, seed=1) != splits  # the seed draws another split


def test_a_figures_questions_stay_in_one_split_and_its_generated_rounds_follow():
    pool = _pool(40, per_figure=4)  # ten figures, four questions each
    votes = [Vote(q, "dr", True, False) for q in pool]
    pairs, _, splits = clinician_pairs(votes, pool, weight=1, validation=0.2, test=0.3, seed=1)
    by_figure = {}
    for p in pairs:
        by_figure.setdefault(pool[p.a_id[:-2]].figure_id, set()).add(p.split)
    assert all(len(s) == 1 for s in by_figure.values())  # split by question, a figure's questions would spread
    assert set(splits.values()) == set(SPLITS)
    ratings = [Rating(f"f{f}#{k}", f"f{f}", k, (f * 3 + k) % 11, "j", "offline", "", "h")
               for f in range(30) for k in range(4)]  # f0..f9 judged by clinicians, f10..f29 not
    mpairs, counts = model_pairs(unit_scores(ratings, [], "round", "mean"), 200, 0, 0.1, 0.1, fixed=splits)
    seen = {}
    for p in mpairs:
        for f in (p.a_id.split("#")[0], p.b_id.split("#")[0]):
            assert splits.get(f, p.split) == p.split  # a clinician figure keeps its split
            seen.setdefault(f, set()).add(p.split)
    assert all(len(s) == 1 for s in seen.values())  # and every other figure is in one split too
    assert sum(counts["figures"].values()) == 30


def test_app_votes_picks_and_stale_votes():
    pool = _pool(3)
    pool["q2"].answer_b = "a regenerated answer"  # the pool changed after q2 was judged
    old = answers_hash(_pool(3)["q2"])
    votes = [Vote("q0", "dr", None, None, preference="B", answers_hash=answers_hash(pool["q0"])),
             Vote("q1", "dr", None, None, preference="tie", answers_hash=answers_hash(pool["q1"])),
             Vote("q2", "dr", True, False, answers_hash=old)]
    pairs, counts, _ = clinician_pairs(votes, pool, weight=5, validation=0, test=0, seed=0)
    assert [(p.a_id, p.label) for p in pairs] == [("q0:A", 0)]  # B preferred
    assert (counts["stale"], counts["no_preference"], counts["unverified"]) == (1, 1, 0)


def test_bad_votes_name_the_line():
    with pytest.raises(ValueError, match=r"votes.jsonl:2: annotator 'dr' voted on 'q0' already at line 1"):
        check_votes([Vote("q0", "dr", True, False), Vote("q0", "dr", False, True)], "votes.jsonl")
    with pytest.raises(ValueError, match=r"votes.jsonl:1: a vote marks both answers .* not neither and not both"):
        check_votes([Vote("q0", "dr", True, None)], "votes.jsonl")
    with pytest.raises(ValueError, match=r"votes.jsonl:1: a vote marks both"):
        check_votes([Vote("q0", "dr", True, False, preference="B")], "votes.jsonl")
    with pytest.raises(ValueError, match=r"votes.jsonl:1: a_acceptable is 'no'"):
        check_votes([Vote("q0", "dr", "no", True)], "votes.jsonl")
    with pytest.raises(ValueError, match=r"votes.jsonl:1: preference 'C'"):
        check_votes([Vote("q0", "dr", None, None, preference="C")], "votes.jsonl")


def test_rater_agreement_with_clinicians_counts_ties_and_unscored_apart():
    votes = [Vote(f"q{i}", "dr", i % 2 == 0, i % 2 == 1) for i in range(4)]  # q0, q2: A; q1, q3: B
    pairs, _, _ = clinician_pairs(votes, _pool(4), weight=1, validation=0.25, test=0.5, seed=0)
    scores = {"q0": (8, 3), "q1": (9, 2), "q2": (5, 5), "q3": (None, 4)}  # agree, disagree, tie, unscored
    ratings = [Rating(f"{q}:{side}", q, 0, s, "j", "offline", "", "h")
               for q, (a, b) in scores.items() for side, s in (("A", a), ("B", b))]
    m = rater_agreement(pairs, ratings)
    assert m["all"] == {"pairs": 4, "ties": 1, "unscored": 1, "n": 2, "k": 1, "rate": 0.5, "low": 0.0945,
                        "high": 0.9055, "ties_half": 0.5}
    assert m["test"]["pairs"] + m["validation"]["pairs"] <= 4 and m["all"]["pairs"] == 4


def test_overlapping_annotators_majority_and_cancelling_votes_are_no_pair():
    votes = [Vote("q0", "dr1", True, False), Vote("q0", "dr2", False, True),  # cancel: a tie
             Vote("q1", "dr1", True, False), Vote("q1", "dr2", True, False), Vote("q1", "dr3", False, True)]
    pairs, counts, _ = clinician_pairs(votes, _pool(2), weight=1, validation=0, test=0, seed=0)
    assert [(p.a_id, p.label) for p in pairs] == [("q1:A", 1)] and counts["annotators_disagree"] == 1


def test_model_pairs_never_from_ties_or_nulls():
    ratings = [Rating(f"c#{i}", "c", i, s, "j", "offline", str(s), "h") for i, s in enumerate([3, 3, 7, None, 9, 9])]
    score = unit_scores(ratings, [], "round", "mean")
    pairs, counts = model_pairs(score, 50, seed=0)
    assert pairs and counts["null_units"] == 1
    for p in pairs:
        assert score[p.a_id] is not None and score[p.b_id] is not None and score[p.a_id] != score[p.b_id]
        assert p.label == int(score[p.a_id] > score[p.b_id]) and p.weight == 1.0
    assert len({tuple(sorted((p.a_id, p.b_id))) for p in pairs}) == len(pairs) == 8  # all distinct non-tie pairs


def _conv(cid, n=2):
    turns = []
    for i in range(n):
        turns += [{"from": "human", "value": f"q{i}?"}, {"from": "gpt", "value": f"a{i}"}]
    return Conversation(cid, f"{cid}.png", "mri", turns, "offline", "m", "h")


def test_model_pairs_per_conversation_aggregate_rounds_and_never_a_partial_rating():
    scores = {"c1": [8, 2], "c2": [5, 5], "c3": [9, None], "c4": [4, 4], "c5": [6]}  # c5's 2nd round: no rating
    ratings = [Rating(f"{c}#{k}", c, k, s, "j", "offline", "", "h") for c, ss in scores.items() for k, s in enumerate(ss)]
    convs = [_conv(c) for c in scores]  # two rounds each
    mean = unit_scores(ratings, convs, "conversation", "mean")
    assert mean == {"c1": 5, "c2": 5, "c3": None, "c4": 4, "c5": None}
    pairs, counts = model_pairs(mean, 50, seed=0)
    assert sorted(tuple(sorted((p.a_id, p.b_id))) for p in pairs) == [("c1", "c4"), ("c2", "c4")]  # c1 = c2: a tie
    assert (counts["units"], counts["null_units"]) == (5, 2)
    low = unit_scores(ratings, convs, "conversation", "min")
    assert low == {"c1": 2, "c2": 5, "c3": None, "c4": 4, "c5": None}
    with pytest.raises(ValueError, match="aggregate 'max'"):
        unit_scores(ratings, convs, "conversation", "max")
    with pytest.raises(ValueError, match="unit 'turn'"):
        unit_scores(ratings, convs, "turn", "mean")


def test_validation_and_test_model_pairs_use_figures_never_trained_on():
    ratings = [Rating(f"f{f}#{k}", f"f{f}", k, (f * 3 + k) % 11, "j", "offline", "", "h")
               for f in range(20) for k in range(4)]
    pairs, counts = model_pairs(unit_scores(ratings, [], "round", "mean"), 100, seed=0, validation=0.2, test=0.1)
    assert counts["figures"] == {"train": 17, "validation": 2, "test": 1}  # this seed
    figure = lambda u: u.split("#")[0]  # noqa: E731
    figures = {k: {figure(u) for p in pairs if p.split == k for u in (p.a_id, p.b_id)} for k in SPLITS}
    n = [sum(p.split == k for p in pairs) for k in SPLITS]
    assert n[:2] == [70, 20] and 0 < n[2] <= 6  # one test figure: its four rounds make at most six pairs
    assert not figures["train"] & figures["validation"] and not figures["train"] & figures["test"]
    assert not figures["validation"] & figures["test"]


def test_a_rating_that_is_not_a_score_or_null_names_the_record():
    ok = [Rating("c#0", "c", 0, 7, "j", "offline", "", "h"), Rating("c#1", "c", 1, None, "j", "offline", "", "h")]
    check_ratings(ok, "ratings.jsonl")
    for bad in (float("nan"), 7.5, 11, "7", True):
        with pytest.raises(ValueError, match=r"ratings.jsonl: record 3 \(c#2\): score .* is not an integer 0..10"):
            check_ratings(ok + [Rating("c#2", "c", 2, bad, "j", "offline", "", "h")], "ratings.jsonl")


def test_release_keeps_top_ratio_in_llava_format():
    convs = [_conv(f"c{i}") for i in range(10)]
    unit = {f"c{i}#{k}": float(i + k) for i in range(10) for k in range(2)}
    scores = {c.id: selector.conversation_score(c, unit, "round", "mean") for c in convs}
    assert scores["c3"] == 3.5 and selector.conversation_score(convs[3], unit, "round", "min") == 3.0
    keep = release.select_top(scores, 0.5)
    assert keep == ["c9", "c8", "c7", "c6", "c5"]
    rec = release.to_llava(convs[9], scores["c9"])
    assert rec["conversations"][0]["value"] == f"{IMAGE_TOKEN}\nq0?"
    assert sum(t["value"].count(IMAGE_TOKEN) for t in rec["conversations"]) == 1
    assert release.select_top(scores, 0.01) == ["c9"]
    with pytest.raises(ValueError, match="filter.ratio must be in"):
        release.select_top(scores, 0)
    with pytest.raises(ValueError, match="filter.top_k"):
        release.select_top(scores, 0.5, -1)


def test_top_k_and_domain_balance():
    scores = {f"ct{i}": 10.0 + i for i in range(6)} | {f"mr{i}": float(i) for i in range(3)} | {"xr0": 0.5}
    domains = {i: i[:2] for i in scores}
    assert release.select_top(scores, 0.5, top_k=4) == ["ct5", "ct4", "ct3", "ct2"]  # the selector's favourite
    # 6:3:1 of 4 -> 2.4, 1.2, 0.4: floors 2, 1, 0; the last place goes to a .4 remainder, the smaller domain
    assert release.select_top(scores, 0.5, top_k=4, domains=domains) == ["ct5", "ct4", "mr2", "xr0"]
    assert len(release.select_top(scores, 0.5, domains=domains)) == 5 and release.select_top(scores, 1, 99) == \
        sorted(scores, key=lambda i: -scores[i])


def test_candidates_that_cannot_make_a_record_are_skipped_with_why(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"x")
    good, no_image, empty, flipped, stray = _conv("ok"), _conv("gone"), _conv("empty"), _conv("flipped"), _conv("s")
    for c in (good, empty, flipped, stray):
        c.image = "ok.png"
    empty.conversations = []
    flipped.conversations = flipped.conversations[1:]
    stray.conversations[3]["value"] += " <image>"
    ok, skipped = release.screen([good, no_image, empty, flipped, stray], tmp_path)
    assert ok == [good]
    assert skipped == [
        {"id": "gone", "problems": [f"image 'gone.png' not found in {tmp_path}"]},
        {"id": "empty", "problems": ["no conversation (needs at least one human/gpt round)"]},
        {"id": "flipped", "problems": ["turns do not alternate human/gpt starting with human"]},
        {"id": "s", "problems": ["<image> appears 2 times; it belongs once, in the first human turn"]}]


def _official(n=3):
    """Records in the shape of the published BioMed-VITAL JSON: `<image>` at the end of the first turn."""
    return [{"id": f"PMC{i}_fig1", "image": f"PMC{i}_fig1.jpg", "conversations": [
        {"from": "human", "value": "What does the figure show?\n<image>"}, {"from": "gpt", "value": "A CT scan."},
        {"from": "human", "value": "Any lesion?"}, {"from": "gpt", "value": "A small hypodense lesion."}]}
        for i in range(n)]


def test_validate_release_accepts_the_official_shape_and_names_each_problem(tmp_path):
    from typer.testing import CliRunner

    from vital.cli import app

    ok = release.validate(_official())
    assert ok["problems"] == [] and ok["image_token_placement"] == {"end": 3} and ok["rounds"] == 6
    bad = _official(7)
    bad[1]["id"] = bad[0]["id"]
    bad[2]["conversations"] = bad[2]["conversations"][::-1]
    bad[3]["conversations"] = []
    bad[4]["image"] = "../../etc/passwd"
    bad[5]["conversations"][2]["value"] += " <image>"
    bad[6]["conversations"][1]["value"] = "  "
    assert release.validate(bad)["problems"] == [
        ("PMC0_fig1", "duplicate id"),
        ("PMC2_fig1", "turns do not alternate human/gpt starting with human"),
        ("PMC2_fig1", "<image> appears 1 times; it belongs once, in the first human turn"),
        ("PMC3_fig1", "no conversation (needs at least one human/gpt round)"),
        ("PMC4_fig1", "image path '../../etc/passwd' must be relative, inside the image folder"),
        ("PMC5_fig1", "<image> appears 2 times; it belongs once, in the first human turn"),
        ("PMC6_fig1", "an empty turn")]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    result = CliRunner().invoke(app, ["validate", "release", str(tmp_path / "bad.json")])
    assert result.exit_code == 1 and "7 records" in result.output and "PMC4_fig1: image path" in result.output
    (tmp_path / "ok.json").write_text(json.dumps(_official()))
    (tmp_path / "images").mkdir()
    result = CliRunner().invoke(app, ["validate", "release", str(tmp_path / "ok.json"), "--image-dir",
                                      str(tmp_path / "images")])
    assert result.exit_code == 1 and "PMC0_fig1: image 'PMC0_fig1.jpg' not found" in result.output
    (tmp_path / "trunc.json").write_text(json.dumps(_official())[:-20])
    assert CliRunner().invoke(app, ["validate", "release", str(tmp_path / "trunc.json")]).exit_code == 2


def test_release_messages_keep_every_turn_without_the_placeholder_and_the_card_says_what_made_it():
    r = release.to_llava(Conversation("c1", "c1.png", "mri", [
        {"from": "human", "value": "Modality?"}, {"from": "gpt", "value": "MRI."},
        {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "Liver."}], "offline", "m", "h"), 0.5)
    assert r["conversations"][0]["value"] == "<image>\nModality?"
    assert release.to_messages(r) == [{"role": "user", "content": "Modality?"}, {"role": "assistant", "content": "MRI."},
                                      {"role": "user", "content": "Where?"}, {"role": "assistant", "content": "Liver."}]
    card = release.data_card([r], "1 kept of 2.", {"backbone": "b"}, "words", [5])
    assert "1 kept of 2." in card and "| mri | 1 |" in card and "## Selector scores" in card
    assert "offline:m" in card and '"backbone": "b"' in card and "## Load it" not in card  # no folder, no lines
    assert 'load_dataset("data/release"' in release.data_card([r], "o", None, "w", [5], root="data/release")


def test_baselines_at_the_release_size_agreement_overlap_and_ties_cut_at_random():
    from vital import baselines
    from vital.schema import PreferencePair

    test = [PreferencePair("q0:A", "q0:B", 1, 1.0, "clinician", "test"),
            PreferencePair("q1:A", "q1:B", 0, 1.0, "clinician", "test")]
    conversations = {f"c{i}": float(i) for i in range(10)}  # c9 best
    rater = {f"c{i}": (5.0 if i < 8 else None) for i in range(10)}  # all tied, two unrated
    methods = {"selector": (conversations, {"q0:A": 2.0, "q0:B": 1.0, "q1:A": 0.0, "q1:B": 3.0}),
               "rater_threshold": (rater, {"q0:A": 7, "q0:B": 7, "q1:A": None, "q1:B": 4})}
    kept = release.select_top(conversations, 0.5)
    out = baselines.compare(kept, methods, test, dict(ratio=0.5, top_k=0, domains=None), seeds=10)
    assert out["selector"]["overlap"] == 1.0 and out["selector"]["clinician_test"]["rate"] == 1.0
    r = out["rater_threshold"]
    assert r["unscored_conversations"] == 2 and r["kept"] == 5
    assert r["clinician_test"] | {} == {"pairs": 2, "ties": 1, "unscored": 1, "n": 0, "k": 0, "rate": None,
                                         "low": None, "high": None, "ties_half": 0.5}
    assert r["overlap"] > 0  # the tie is cut at random (seeded): by id it would keep c0..c4, none of the release
    assert out["random"]["seeds"] == 10 and 0 <= out["random"]["overlap"]["low"] <= out["random"]["overlap"]["high"]
    rows = baselines.csv_rows(out)
    assert [r["method"] for r in rows] == ["selector", "rater_threshold", "random"]
