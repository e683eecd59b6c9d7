import json
from pathlib import Path

import pytest
import torch
import yaml

from vital import evaluate, tune
from vital.client import Client, ClientConfig
from vital.images import ImageStore
from vital.offline import OfflineBackend
from vital.schema import IMAGE_TOKEN


@pytest.fixture(scope="module")
def tiny():
    return tune.build_tiny_llava(seed=0)


def _release(records, n=4):
    out = []
    for r in records[:n]:
        out.append({"id": r.id, "image": r.image, "domain": r.domain, "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\nWhat kind of image is this?"},
            {"from": "gpt", "value": r.caption.split(".")[0] + "."},
            {"from": "human", "value": "Anything else?"},
            {"from": "gpt", "value": "Clinical correlation is advised."}]})
    return out


def test_loss_is_on_assistant_tokens_only(sample, tiny):
    records, image_dir = sample
    model, processor = tiny
    from PIL import Image

    ex = tune.encode_example(processor, ImageStore(image_dir).open(records[0].image).convert("RGB"),
                             _release(records)[0]["conversations"], max_length=512)
    ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids.count(image_id) == 16  # (32/8)^2 patches, CLS dropped by the "default" strategy
    assert all(lab == -100 for i, lab in zip(ids, labels) if i == image_id)
    trained = processor.tokenizer.decode([i for i, lab in zip(ids, labels) if lab != -100])
    assert "clinical correlation is advised" in trained.lower()
    assert "anything else" not in trained.lower() and "user" not in trained.lower()
    assert tune.encode_example(processor, ImageStore(image_dir).open(records[0].image), _release(records)[0]["conversations"],
                               max_length=10) is None  # image + first question alone do not fit


def test_lora_tuning_saves_an_adapter_that_loads_and_generates(sample, tmp_path):
    records, image_dir = sample
    cfg = tune.TuneConfig(epochs=3, max_steps=4, batch_size=2, lr=1e-3)  # 2 steps an epoch, capped at 4
    model, processor = tune.load_base(cfg.base_model, cfg.seed)
    tune.save_base(model, processor, tmp_path)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model, history, stats = tune.train(model, processor, _release(records), image_dir, cfg)
    assert stats["steps"] == 4 and len(history) == 4 and stats["examples"] == 4
    # LoRA only in the language model; the vision tower untouched
    lora = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert lora and all("language_model" in n and "lora_" in n for n in lora)
    tune.save_adapter(peft_model, processor, tmp_path)
    loaded, proc = tune.load_tuned(tmp_path)
    for k, v in loaded.get_base_model().state_dict().items():
        if k in base_weights:
            assert torch.equal(v, base_weights[k]), k  # base saved before LoRA wrapped it
    answers = evaluate.answer_questions(loaded, proc, [{"question_id": "x", "image": records[0].image,
                                                        "text": "What is shown?"}], image_dir, 5)
    assert isinstance(answers["x"], str)


def test_base_model_by_path(sample, tmp_path, tiny):
    model, processor = tiny
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    m2, p2 = tune.load_base(str(tmp_path / "m"))
    assert type(m2).__name__ == "LlavaForConditionalGeneration"
    assert p2.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == m2.config.image_token_index


def test_vqa_metrics():
    items = [{"question_id": "1", "answer_type": "CLOSED", "answer": "yes"},
             {"question_id": "2", "answer_type": "CLOSED", "answer": "no"},
             {"question_id": "3", "answer_type": "OPEN", "answer": "left lower lobe"}]
    preds = {"1": "Yes, it is.", "2": "It is not clear", "3": "a lesion in the lower lobe"}
    m = evaluate.vqa_metrics(items, preds)
    assert m["closed_accuracy"] == 50.0 and m["open_recall"] == pytest.approx(66.67, abs=0.01)
    with pytest.raises(ValueError, match="unknown answer_type 'MAYBE'"):
        evaluate.vqa_metrics([{"question_id": "1", "answer_type": "MAYBE", "answer": "x"}], preds)


def test_judge_relative_score_and_unparsed_replies(sample):
    records, image_dir = sample
    vqa, chat = evaluate.sample_eval_sets(records)
    assert {v["answer_type"] for v in vqa} == {"CLOSED", "OPEN"} and len(chat) == len(records)
    perfect = {c["question_id"]: c["gpt4_answer"] for c in chat}
    m = evaluate.judge_chat(chat, perfect, Client(ClientConfig()), image_dir)
    assert m["relative_score"] == 100.0 and m["judged"] == len(chat)
    poor = {c["question_id"]: "no idea" for c in chat}
    assert evaluate.judge_chat(chat, poor, Client(ClientConfig()), image_dir)["relative_score"] < 50

    class Rambling(OfflineBackend):
        def complete(self, messages, task):
            return "Both answers are fine."

    m = evaluate.judge_chat(chat, perfect, Client(ClientConfig(), Rambling()), image_dir)
    assert m["judge_unparsed"] == len(chat) and m["relative_score"] is None


def test_the_model_card_says_what_the_adapter_was_tuned_from_and_on(tmp_path):
    cfg = tune.TuneConfig(base_model="/models/llava-med-v1.5-mistral-7b-hf", lora_r=16)
    stats = {"examples": 60000, "steps": 1875, "final_loss": 0.812345}
    card = tune.model_card(cfg, stats, Path("data/release/instructions.json"), 60000, "ab" * 32, cfg.base_model)
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == cfg.base_model and meta["library_name"] == "peft" and "biomedical" in meta["tags"]
    assert "Pipeline check only" not in card and f"60000 conversations (LLaVA format), sha256 `{'ab' * 32}`" in card
    assert "| lora_r | 16 |" in card and "| final_loss | 0.8123 |" in card and "| target_modules | q_proj, k_proj" in card
    tiny = tune.model_card(tune.TuneConfig(), stats, Path("x.json"), 3, "0" * 64, "tiny random LLaVA")
    assert "Pipeline check only" in tiny and "base_model" not in yaml.safe_load(tiny.split("---")[1])
