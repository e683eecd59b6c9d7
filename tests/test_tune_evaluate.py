import json
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from vital import evalsets, evaluate, tune
from vital.llm.client import Client, ClientConfig
from vital.images import ImageStore
from vital.llm.offline import OfflineBackend
from vital.schema import IMAGE_TOKEN, AppendLog


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
    # longer than the tokenizer's own max_length (128 for MiniLM): only tune.max_length cuts, never the processor
    long = _release(records)[0]["conversations"] + [{"from": "human", "value": "Describe it at length."},
                                                   {"from": "gpt", "value": "Lesion margin. " * 60 + "The end."}]
    ex = tune.encode_example(processor, ImageStore(image_dir).open(records[0].image).convert("RGB"), long, 1024)
    assert len(ex["input_ids"]) > 200 and processor.tokenizer.decode(ex["labels"][-6:]).endswith("the end. [SEP]")


INST_TEMPLATE = (  # a Mistral-style template: [INST] question [/INST] answer, the end of a turn marked
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
    "{% for p in m['content'] %}{{ '<image>\\n' if p['type'] == 'image' else p['text'] }}{% endfor %} [/INST]"
    "{% else %}{% for p in m['content'] %} {{ p['text'] }}{% endfor %} [SEP]{% endif %}{% endfor %}")


def test_the_models_own_chat_template_decides_what_is_an_answer(sample):
    records, image_dir = sample
    model, processor = tune.build_tiny_llava(seed=0)  # its own: the template is changed below
    processor.chat_template = INST_TEMPLATE
    conv = _release(records)[0]["conversations"]
    segments = tune.chat_segments(processor, conv)
    assert [answer for _, answer in segments] == [False, True, False, True]
    assert segments[0][0] == "[INST] <image>\nWhat kind of image is this? [/INST]"
    assert segments[3][0] == " Clinical correlation is advised. [SEP]"  # its own end marker, no second one
    ex = tune.encode_example(processor, ImageStore(image_dir).open(records[0].image).convert("RGB"), conv, 512)
    trained = processor.tokenizer.decode([i for i, lab in zip(ex["input_ids"].tolist(), ex["labels"].tolist())
                                          if lab != -100])
    assert "clinical correlation is advised" in trained.lower() and "inst" not in trained.lower()
    assert tune.prompt(processor, "Modality?") == "[INST] <image>\nModality? [/INST]"
    processor.chat_template = "{{ messages | length }} turns: " + INST_TEMPLATE  # not renderable turn by turn
    with pytest.raises(ValueError, match="renders an earlier turn differently"):
        tune.chat_segments(processor, conv)
    with pytest.raises(tune.TemplateError):  # stops the run: never counted as an unreadable image
        tune.train(model, processor, _release(records), image_dir, tune.TuneConfig(max_steps=1))


def test_lora_tuning_saves_an_adapter_that_loads_and_generates(sample, tmp_path):
    records, image_dir = sample
    cfg = tune.TuneConfig(epochs=3, max_steps=4, batch_size=2, lr=1e-3)  # 2 steps an epoch, capped at 4
    model, processor = tune.load_base(cfg.base_model, cfg.seed)
    tune.save_base(model, processor, tmp_path)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model, history, stats = tune.train(model, processor, _release(records), image_dir, cfg)
    assert stats["steps"] == 4 and len(history) == 4 and stats["train_examples"] == 4
    # LoRA only in the language model; the vision tower untouched
    lora = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert lora and all("language_model" in n and "lora_" in n for n in lora)
    tune.save_adapter(peft_model, processor, tmp_path)
    loaded, proc = tune.load_tuned(tmp_path, "auto")
    for k, v in loaded.get_base_model().state_dict().items():
        if k in base_weights:
            assert torch.equal(v, base_weights[k]), k  # base saved before LoRA wrapped it
    items = [{"question_id": "x", "dataset": "d", "image": records[0].image, "text": "What is shown?"},
             {"question_id": "gone", "dataset": "d", "image": "no-such.png", "text": "What is shown?"}]
    answers, skipped = evaluate.answer_questions(loaded, proc, items, image_dir, 5)
    assert isinstance(answers["d/x"], str) and "d/gone" not in answers
    assert skipped == [{"id": "d/gone", "image": "no-such.png", "reason": f"image 'no-such.png' is not in {image_dir}"}]
    assert loaded.device.type == "cpu" and loaded.dtype == torch.float32  # auto on a machine without a GPU
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda"):
        tune.load_tuned(tmp_path, "gpu")
    if not torch.cuda.is_available():  # evaluate.device: cuda where there is none is named before loading
        with pytest.raises(ValueError, match="'cuda:1': no GPU is visible here"):
            tune.resolve_device("cuda:1")
    # a bfloat16 model answers too (load_tuned gives a bfloat16 base on a GPU; inputs follow the model's dtype)
    answers = evaluate.answer_questions(loaded.to(torch.bfloat16), proc, items[:1], image_dir, 3)[0]
    assert isinstance(answers["d/x"], str)


def test_an_interrupted_tuning_run_resumes_from_its_checkpoint_to_the_same_adapter(sample, tmp_path, monkeypatch):
    records, image_dir = sample
    cfg = tune.TuneConfig(max_steps=6, checkpoint_every=2, lora_dropout=0.1, epochs=3)

    def run(ckpt):
        model, processor = tune.build_tiny_llava(seed=0)
        return tune.train(model, processor, _release(records), image_dir, cfg, ckpt)

    def lora(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    straight, history, stats = run(None)
    assert stats["resumed_from_step"] == 0 and stats["steps"] == 6
    real, calls = tune.collate, []

    def killed_at_step_5(batch, pad):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("the machine went away")
        return real(batch, pad)

    monkeypatch.setattr(tune, "collate", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "state.pt").exists() and not list((tmp_path / "ckpt").glob("*.tmp"))
    monkeypatch.setattr(tune, "collate", real)
    resumed, history2, stats2 = run(tmp_path / "ckpt")
    assert stats2["resumed_from_step"] == 4 and stats2["steps"] == 6
    assert [h["loss"] for h in history2] == pytest.approx([h["loss"] for h in history], rel=1e-5)
    a, b = lora(straight), lora(resumed)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not (tmp_path / "ckpt" / "state.pt").exists()  # finished: the next run starts afresh
    ex = [{"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([-100, 6]), "pixel_values": torch.ones(1, 3)}]
    other = tune.TuneConfig(max_steps=6, checkpoint_every=2, lora_dropout=0.1, epochs=3, lr=0.5)
    assert other.resume_key(ex) != cfg.resume_key(ex)  # other settings: another run, no resume
    changed = [{**ex[0], "pixel_values": torch.full((1, 3), 2.0)}]
    assert cfg.resume_key(changed) != cfg.resume_key(ex)  # another image: no resume either
    longer = tune.TuneConfig(max_steps=60, checkpoint_every=5, lora_dropout=0.1, epochs=3, gradient_checkpointing=True)
    assert longer.resume_key(ex) == cfg.resume_key(ex)  # more steps, or less memory: the same run goes on


def test_projector_training_bf16_and_gradient_checkpointing_options(sample):
    records, image_dir = sample
    cfg = tune.TuneConfig(max_steps=2, train_projector=True, bf16=True, gradient_checkpointing=True)
    model, processor = tune.build_tiny_llava(seed=0)
    peft_model, history, stats = tune.train(model, processor, _release(records), image_dir, cfg)
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("multi_modal_projector" in n for n in trained) and any("lora_" in n for n in trained)
    assert stats["bf16"] and all(h["loss"] == h["loss"] for h in history)  # finite, not NaN
    broken = _release(records) + [{**_release(records)[0], "id": "lost", "image": "lost.png"}]
    model, processor = tune.build_tiny_llava(seed=0)
    _, _, stats = tune.train(model, processor, broken, image_dir, tune.TuneConfig(max_steps=1))
    assert stats["skipped_unreadable_image"] == 1 and stats["skipped_examples"][0]["id"] == "lost"


def _sentencepiece_style_processor(texts):
    """A LLaVA processor whose tokenizer marks word starts with "▁" the way Llama's and Mistral's do (BPE over
    Metaspace, trained here on `texts`), with a BOS the chat template does not write."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    bpe.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=[
        "<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # adds BOS
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", additional_special_tokens=[IMAGE_TOKEN])
    image_proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=8, num_additional_image_tokens=1,
                          vision_feature_select_strategy="default", chat_template=INST_TEMPLATE.replace(
                              "[SEP]", "</s>"))


def test_training_tokens_are_the_tokens_the_model_reads_at_inference(sample):
    """A SentencePiece-style tokenizer: the conversation is tokenized as one text, so no "▁" appears where a
    turn was cut, the BOS is there, the answers' tokens are exactly the answers, and the first question's
    tokens are the inference prompt's."""
    records, image_dir = sample
    conv = _release(records)[0]["conversations"]
    processor = _sentencepiece_style_processor([t["value"] for r in _release(records, 14) for t in r["conversations"]]
                                               + ["[INST] [/INST] </s>"] * 20)
    image = ImageStore(image_dir).open(records[0].image).convert("RGB")
    ex = tune.encode_example(processor, image, conv, max_length=512)
    ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
    whole = "".join(text for text, _ in tune.chat_segments(processor, conv))
    assert whole.startswith("<s>[INST] <image>\n") and tune.prompt(processor, "Modality?").startswith("<s>[INST]")
    assert ids == processor(images=[image], text=[whole], add_special_tokens=False)["input_ids"][0]
    asked = processor(images=[image], text=[tune.prompt(processor, conv[0]["value"])],
                      add_special_tokens=False)["input_ids"][0]
    assert ids[:len(asked)] == asked and all(lab == -100 for lab in labels[:len(asked)])
    tok = processor.tokenizer
    answers = [tok.decode([i for i, lab in zip(ids[a:b], labels[a:b]) if lab != -100])
               for a, b in [(0, ids.index(tok.convert_tokens_to_ids("</s>")) + 1), (None, None)]]
    assert answers[0].strip() == conv[1]["value"] + " </s>"  # the first answer, the template's end marker included
    assert answers[1].strip().endswith(conv[3]["value"] + " </s>") and "[INST]" not in answers[1]
    # a processor that writes break and end tokens around the image features (Pixtral, Gemma 3...): masked
    image_id, unk = tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.unk_token_id
    at = ids.index(image_id)
    assert tune._answer_labels(processor, whole, spans := [(whole.index(conv[1]["value"]), len(whole))],
                               ids[:at] + [image_id, unk, image_id, unk] + ids[at + 1:])[at:at + 5] == [-100] * 5
    with pytest.raises(tune.TemplateError, match="inside an answer"):  # a processor that rewrites an answer
        tune._answer_labels(processor, whole, spans, ids[:-3] + [unk] + ids[-2:])
    # "</s>[INST]" in one text; tokenized on its own, the second question would start with a word marker
    assert "\u2581[INST]" not in tok.convert_ids_to_tokens(ids)
    assert "\u2581[INST]" in tok.convert_ids_to_tokens(tok(tune.chat_segments(processor, conv)[2][0])["input_ids"])


DRIVER = """
import json, os, sys
from pathlib import Path
from vital import tune
sys.path.insert(0, sys.argv[3])
from test_tune_evaluate import _release
from vital.corpus import build_sample
images = Path(sys.argv[1]) / f"images-{os.environ['RANK']}"
records = build_sample(images, 256).records
import torch  # DeepSpeed asks torch.is_autocast_enabled(), which means the GPU's: on a CPU, make it mean the CPU's,
is_on = torch.is_autocast_enabled  # so that it meets our autocast here as it does on a GPU
torch.is_autocast_enabled = lambda device_type=None: is_on(device_type or "cpu")
model, processor = tune.build_tiny_llava(seed=0)
dtypes = set()  # what the language model head computes in
model.get_output_embeddings().register_forward_hook(lambda m, i, out: dtypes.add(str(out.dtype)))
cfg = tune.TuneConfig(max_steps=2, batch_size=1, grad_accum=2, lora_dropout=0.0, checkpoint_every=0,
                      bf16=sys.argv[4] == "bf16")
_, history, stats = tune.train(model, processor, _release(records, 6), images, cfg, out_dir=Path(sys.argv[2]))
if os.environ["RANK"] == "0":
    (Path(sys.argv[2]) / "run.json").write_text(json.dumps({"history": history, "stats": stats,
                                                            "dtypes": sorted(dtypes)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("launcher,precision", [("ddp", "fp32"), ("zero3", "fp32"), ("zero3", "bf16")])
def test_two_processes_train_the_same_adapter_as_one_with_gradient_accumulation(sample, tmp_path, launcher,
                                                                                precision):
    """Two CPU processes, as `accelerate launch --num_processes 2` starts them on GPUs: DDP (torchrun, gloo)
    or DeepSpeed ZeRO-3 (configs/accelerate/zero3.yaml, parameters and optimizer state partitioned). Each
    process takes its share of every step's micro-batches (grad_accum 2 each; 6 examples: the second step
    has 2 micro-batches, not 4), and the adapter the main process saves (gathered from the partitions under
    ZeRO-3) equals one process's with grad_accum 4. tune.bf16 computes in bfloat16 under ZeRO-3 too."""
    import os
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    records, image_dir = sample
    (tmp_path / "driver.py").write_text(DRIVER)
    repo = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port for the rendezvous (torchrun's port 0 hangs)
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", port] if launcher == "ddp" else
              [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(repo / "configs/accelerate/zero3.yaml"), "--num_processes", "2", "--main_process_ip",
               "127.0.0.1", "--main_process_port", port])
    p = subprocess.run([*launch, str(tmp_path / "driver.py"), str(tmp_path), str(tmp_path / "two"),
                        str(Path(__file__).parent), precision], env=env, capture_output=True, text=True, timeout=600)
    # Under load a worker can abort at interpreter exit, after its work is written and the processes have left
    # the process group ("terminate called without an active exception": a C++ thread not joined at teardown,
    # seen once with ZeRO-3 on a loaded 2-core machine). That exit is tolerated; a crash before run.json is not.
    torn_down = p.returncode in (-6, 134) and "terminate called without an active exception" in p.stderr
    assert p.returncode == 0 or (torn_down and (tmp_path / "two" / "run.json").exists()), p.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "run.json").read_text())
    assert two["stats"]["processes"] == 2 and two["stats"]["steps"] == 2
    assert two["stats"]["parallelism"] == {"ddp": "MULTI_CPU", "zero3": "DEEPSPEED"}[launcher]
    assert two["dtypes"] == [{"fp32": "torch.float32", "bf16": "torch.bfloat16"}[precision]]
    model, processor = tune.build_tiny_llava(seed=0)
    cfg = tune.TuneConfig(max_steps=2, batch_size=1, grad_accum=4, lora_dropout=0.0, checkpoint_every=0,
                          bf16=precision == "bf16")
    _, history, stats = tune.train(model, processor, _release(records, 6), image_dir, cfg, out_dir=tmp_path / "one")
    assert stats["processes"] == 1 and stats["train_tokens"] == two["stats"]["train_tokens"]
    assert stats["trainable_params"] == two["stats"]["trainable_params"]
    tol = {"fp32": 1e-4, "bf16": 1e-2}[precision]  # bf16: ZeRO-3 also reduces gradients in bf16
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in two["history"]], rel=tol)
    mine, theirs = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("one", "two"))
    assert mine.keys() == theirs.keys() and len(mine) == 28
    assert all(torch.allclose(mine[k], theirs[k], atol=tol / 10) for k in mine), max(
        (mine[k] - theirs[k]).abs().max().item() for k in mine)
    assert any(theirs[k].abs().max() > 0 for k in theirs if "lora_B" in k)  # trained, not the zero init


def test_base_model_by_path(sample, tmp_path, tiny):
    model, processor = tiny
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    m2, p2 = tune.load_base(str(tmp_path / "m"))
    assert type(m2).__name__ == "LlavaForConditionalGeneration"
    assert p2.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == m2.config.image_token_index


def test_vqa_scores_per_dataset_with_n_and_intervals_and_unknown_answer_types_are_skipped_by_id():
    items = [{"question_id": "1", "answer_type": "CLOSED", "answer": "Yes.", "dataset": "vqa_rad"},
             {"question_id": "2", "answer_type": "CLOSED", "answer": "no", "dataset": "vqa_rad"},
             {"question_id": "9", "answer_type": "CLOSED", "answer": "CT", "dataset": "vqa_rad"},  # "CT or MRI?"
             {"question_id": "1", "answer_type": "OPEN", "answer": "left lower lobe", "dataset": "slake",
              "domain": "ct_scan"},  # the same id in another dataset
             {"question_id": "4", "answer_type": "open", "answer": "Axial", "dataset": "slake", "domain": "ct_scan"},
             {"question_id": "5", "answer_type": "MAYBE", "answer": "x", "dataset": "slake"}]
    preds = {"vqa_rad/1": "Yes, it is.", "vqa_rad/2": "It is not clear", "vqa_rad/9": "This is a CT scan.",
             "slake/1": "a lesion in the lower lobe", "slake/4": "axial", "slake/5": "x"}
    rows, skipped = evaluate.vqa_scores(items, preds)
    assert skipped == [{"id": "slake/5", "reason": "unknown answer_type 'MAYBE'; use CLOSED or OPEN"}]
    t = evaluate.vqa_tables(rows, judged={"slake/1": False, "slake/4": True})
    assert list(t) == ["all", "slake", "slake/ct_scan", "vqa_rad", "vqa_rad/other"]
    closed = t["vqa_rad"]["closed_accuracy"]
    assert (closed["n"], closed["k"], closed["rate"]) == (3, 2, pytest.approx(0.6667, abs=1e-4))
    assert closed["low"] == pytest.approx(0.2077, abs=1e-3) and closed["high"] == pytest.approx(0.9385, abs=1e-3)
    recall = t["slake"]["open_recall"]  # "left lower lobe": 2 of 3 words; "axial": 1 of 1
    assert (recall["n"], recall["mean"]) == (2, pytest.approx(0.8333, abs=1e-4))
    assert recall["low"] == pytest.approx(2 / 3, abs=1e-4) and recall["high"] == 1.0  # the bootstrap's two values
    f1 = 2 * (2 / 6) * (2 / 3) / (2 / 6 + 2 / 3)  # "lower lobe" shared: precision 2/6, recall 2/3
    assert t["slake"]["open_token_f1"]["mean"] == pytest.approx((f1 + 1) / 2, abs=1e-4)
    assert (t["slake"]["open_exact_match"]["k"], t["slake"]["open_judged_accuracy"]["k"]) == (1, 1)
    assert t["vqa_rad"]["open_recall"] == {"n": 0, "mean": None, "low": None, "high": None}
    assert t["all"]["closed_accuracy"]["n"] == 3 and t["all"]["open_recall"]["n"] == 2

    base = {**preds, "vqa_rad/1": "No.", "slake/4": "coronal"}  # the base model gets two more wrong
    diff = evaluate.differences(rows, evaluate.vqa_scores(items, base)[0], {}, {})
    assert diff["vqa_rad"]["closed_accuracy"]["diff"] == pytest.approx(1 / 3, abs=1e-4)
    assert diff["slake"]["open_recall"]["diff"] == pytest.approx(0.5, abs=1e-4)
    assert diff["slake"]["open_recall"]["low"] == 0.0 and diff["slake"]["open_recall"]["high"] == 1.0
    assert diff["all"]["open_judged_accuracy"]["n"] == 0  # no verdicts given


def test_the_judge_grades_open_answers_and_sees_the_image_in_the_win_rate(tmp_path):
    """The paper's win rate: open questions only, the image as an image part, both orders; the judged open
    accuracy: question, ground truth and answer, [[correct]] / [[incorrect]] parsed exactly."""
    image = (Path(__file__).parents[1] / "examples/eval/images/eval_ct.jpg").read_bytes()
    items = [{"question_id": "1", "dataset": "slake", "answer_type": "OPEN", "image": "ct.jpg",
              "text": "Which window is used?", "answer": "bone window"},
             {"question_id": "2", "dataset": "slake", "answer_type": "CLOSED", "image": "ct.jpg",
              "text": "Is this a CT?", "answer": "yes"}]
    tuned, base = {"slake/1": "A bone window.", "slake/2": "yes"}, {"slake/1": "Soft tissue.", "slake/2": "no"}
    seen = []

    class Judge(OfflineBackend):
        model = identity = "scripted-judge"

        def complete(self, messages, task):
            seen.append((task, messages))
            text = messages[-1]["content"] if isinstance(messages[-1]["content"], str) else \
                messages[-1]["content"][-1]["text"]
            if task == "grade":
                return "Same finding. [[correct]]" if "bone" in text.split("Answer:")[-1] else "[[incorrect]]"
            a = text.split("Answer A:")[1].split("Answer B:")[0]
            return "[[A]]" if "bone" in a else "[[B]]"

    client = Client(ClientConfig(), Judge())
    verdicts, unparsed, stats = evaluate.judge_open(items, tuned, client, AppendLog(tmp_path / "c.jsonl"), "tuned")
    assert verdicts == {"slake/1": True} and unparsed == [] and stats["requests"] == 1
    assert evaluate.parse_grade("[[correct]] ... or [[incorrect]]") is None and evaluate.parse_grade("") is None
    m, stats = evaluate.vqa_win_rate(items, tuned, base, {"ct.jpg": image}.__getitem__, client,
                                     AppendLog(tmp_path / "c.jsonl"))
    assert (m["wins"], m["ties"], m["losses"], m["pairs"], m["win_rate"]) == (1, 0, 0, 1, 100.0)
    pairwise = [msgs for task, msgs in seen if task == "pairwise"]
    assert len(pairwise) == 2  # the closed question is not compared; the open one in both orders
    for msgs in pairwise:
        parts = msgs[-1]["content"]
        assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
        assert "Ground truth: bone window" in parts[1]["text"]


def test_over_the_openai_api_the_win_rate_judge_is_sent_the_image_and_grading_is_text_only(tmp_path, monkeypatch):
    from vital.llm.fakeapi import FakeOpenAI

    monkeypatch.setenv("OPENAI_API_KEY", key := f"sk-test-{uuid.uuid4().hex}")
    image = (Path(__file__).parents[1] / "examples/eval/images/eval_ct.jpg").read_bytes()
    items = [{"question_id": str(k), "dataset": "slake", "answer_type": t, "image": "ct.jpg", "text": q, "answer": a}
             for k, (t, q, a) in enumerate([("OPEN", "Which window is used?", "bone window"),
                                            ("OPEN", "Which organ is shown?", "the brain"),
                                            ("CLOSED", "Is this a CT?", "yes")])]
    tuned = {"slake/0": "A bone window.", "slake/1": "The brain.", "slake/2": "yes"}
    base = {"slake/0": "Soft tissue.", "slake/1": "Liver.", "slake/2": "no"}
    with FakeOpenAI(api_key=key) as fake:
        client = Client(ClientConfig(backend="openai", model="gpt-4o", base_url=fake.base_url, backoff_s=0.01))
        m, stats = evaluate.vqa_win_rate(items, tuned, base, {"ct.jpg": image}.__getitem__, client,
                                         AppendLog(tmp_path / "cache.jsonl"))
        verdicts, unparsed, _ = evaluate.judge_open(items, tuned, client, AppendLog(tmp_path / "cache.jsonl"), "t")
    assert stats["requests"] == 4 and m["pairs"] == 2 and m["pairs_unparsed"] == 0  # 2 open questions x 2 orders
    assert (m["wins"], m["losses"]) == (2, 0)  # the offline rubric behind the fake: the answers the truth supports
    assert verdicts == {"slake/0": True, "slake/1": True} and unparsed == []
    sent = [(r["task"], r["image_parts"]) for r in fake.log]
    assert sorted(sent) == [("grade", 0)] * 2 + [("pairwise", 1)] * 4  # the image goes with every comparison


def test_the_example_eval_folder_loads_one_dataset_per_file(tmp_path):
    vqa, chat = evalsets.load_eval_sets(Path(__file__).parents[1] / "examples/eval")
    assert {v["dataset"] for v in vqa} == {"vqa_rad", "slake", "pathvqa"} and len(chat) == 3
    with pytest.raises(FileNotFoundError, match="no vqa.jsonl"):
        evalsets.load_eval_sets(Path(__file__).parent)
    qa50 = {"question_id": 0, "image": "x.jpg", "type": "conversation", "text": "What is seen?", "fig_label": "Fig 2",
            "gpt4_answer": "Nodules.", "fig_caption": "A chest CT.", "in_text_mention": [{"tokens": "Figure 2 shows"},
                                                                                       {"tokens": "nodules."}],
            "domain": {"chest_xray": False, "mri": False, "ct_scan": True, "histology": False, "gross": False}}
    (tmp_path / "chat.jsonl").write_text(json.dumps(qa50) + "\n")  # LLaVA-Med's own llava_med_eval_qa50 form
    _, chat = evalsets.load_eval_sets(tmp_path)
    assert chat[0]["domain"] == "ct_scan" and chat[0]["category"] == "conversation"
    assert chat[0]["fig_inline_mention"] == "Figure 2 shows nodules." and evaluate.uid(chat[0]) == "chat/0"
    (tmp_path / "chat.jsonl").write_text(json.dumps(qa50) + "\n" + json.dumps({**qa50, "text": ""}) + "\n")
    with pytest.raises(ValueError, match=r"chat.jsonl:2: no 'text'"):
        evalsets.load_eval_sets(tmp_path)
    (tmp_path / "chat.jsonl").write_text(json.dumps(qa50) + "\n" + json.dumps(qa50) + "\n")
    with pytest.raises(ValueError, match=r"chat.jsonl:2: question_id 0 repeats in dataset 'chat'"):
        evalsets.load_eval_sets(tmp_path)


def test_judge_relative_score_per_domain_and_type_cached_and_unparsed_listed(sample, tmp_path):
    records, image_dir = sample
    vqa, chat = evaluate.sample_eval_sets(records)
    assert {v["answer_type"] for v in vqa} == {"CLOSED", "OPEN"} and len(chat) == len(records)
    perfect = {evaluate.uid(c): c["gpt4_answer"] for c in chat}
    log = tmp_path / "judge.jsonl"
    m, stats = evaluate.judge_chat(chat, perfect, Client(ClientConfig()), AppendLog(log))  # the offline judge
    assert m["relative_score"] == 100.0 and m["judged"] == len(chat) and stats["requests"] == len(chat)
    assert m["reference_score"] == m["model_score"] >= 1
    assert m["relative_score_by_category"] == {"detailed_description": 100.0}
    assert set(m["relative_score_by_domain"]) == {r.domain for r in records}
    again = evaluate.judge_chat(chat, perfect, Client(ClientConfig()), AppendLog(log))[1]
    assert again["requests"] == 0 and again["cached"] == len(chat)  # a rerun pays for nothing
    poor = {evaluate.uid(c): "no idea" for c in chat}
    assert evaluate.judge_chat(chat, poor, Client(ClientConfig()), AppendLog(log))[0]["relative_score"] < 50

    class Scripted(OfflineBackend):  # reads the prompt as LLaVA-Med's judge does: reference first, no image
        model = identity = "scripted"

        def complete(self, messages, task):
            text = messages[-1]["content"]
            assert isinstance(text, str) and task == "judge" and "Caption:" in text
            reference = text.split("[Assistant 1]\n")[1].split("\n[End of Assistant 1]")[0]
            answer = text.split("[Assistant 2]\n")[1].split("\n[End of Assistant 2]")[0]
            assert reference.startswith("ref") and answer == "model answer\nAssistant 1: on two lines"
            return {"ref-a": "10 5\nA is fuller.", "ref-b": "2, 2\nBoth poor.", "ref-c": "9.5"}[reference]

    two = [dict(chat[0], question_id="a", gpt4_answer="ref-a", domain="ct_scan", category="conversation"),
           dict(chat[1], question_id="b", gpt4_answer="ref-b", domain="mri", category="conversation"),
           dict(chat[2], question_id="c", gpt4_answer="ref-c", domain="mri", category="conversation")]
    m, _ = evaluate.judge_chat(two, {evaluate.uid(c): "model answer\nAssistant 1: on two lines" for c in two},
                               Client(ClientConfig(), Scripted()), AppendLog(tmp_path / "scripted.jsonl"))
    # the mean of per-question ratios (0.5 and 1.0), as LLaVA-Med reports it; not the ratio of sums (7/12)
    assert (m["relative_score"], m["reference_score"], m["model_score"]) == (75.0, 6.0, 3.5)
    assert (m["relative_score_low"], m["relative_score_high"]) == (50.0, 100.0)  # a bootstrap over the 2 questions
    assert m["relative_score_by_domain"] == {"ct_scan": 50.0, "mri": 100.0}
    assert m["judged"] == 2 and m["judge_unparsed_ids"] == ["chat/c"]  # "9.5": one score, not two

    class Rambling(OfflineBackend):
        model = identity = "rambling"

        def complete(self, messages, task):
            return "Both answers are fine."

    m, _ = evaluate.judge_chat(chat, perfect, Client(ClientConfig(), Rambling()), AppendLog(log))
    assert m["judge_unparsed"] == len(chat) and m["relative_score"] is None
    assert m["judge_unparsed_ids"] == [evaluate.uid(c) for c in chat] and m["judge_failed_ids"] == []


def test_judge_scores_parse_only_as_two_scores_on_the_first_line():
    assert evaluate.parse_scores("8 7\nAssistant 1 is more detailed.") == (8.0, 7.0)
    assert evaluate.parse_scores("8, 7") == (8.0, 7.0) and evaluate.parse_scores(" 7.5 10 ") == (7.5, 10.0)
    assert evaluate.parse_scores("8\t7") == (8.0, 7.0) and evaluate.parse_scores("**8 7**") == (8.0, 7.0)
    for bad in ("8", "8 7 6", "11 3", "0 5", "Scores: 8 7", "Assistant 1 is better.\n8 7", "", None):
        assert evaluate.parse_scores(bad) is None, bad


def test_verdicts_parse_exactly():
    assert evaluate.parse_verdict("A is more precise.\n[[A]]") == "A"
    assert evaluate.parse_verdict("[[C]]") == "C" and evaluate.parse_verdict("[[B]] ... I repeat: [[B]]") == "B"
    for bad in ("[A]", "A", "[[A]] or maybe [[B]]", "Verdict: A", "[[D]]", "", None):
        assert evaluate.parse_verdict(bad) is None, bad


def _judge(verdict):
    """A judge that answers `verdict(answer A, answer B)` in the [[X]] form."""
    class Judge(OfflineBackend):
        model = identity = f"judge-{id(verdict)}"

        def complete(self, messages, task):
            text = messages[-1]["content"]
            a = text.split("Answer A: ")[1].split("\nAnswer B: ")[0]
            b = text.split("Answer B: ")[1]
            return verdict(a, b)
    return Client(ClientConfig(), Judge())


def test_win_rate_judges_both_orders_so_position_bias_cancels(tmp_path):
    chat = [{"question_id": f"q{i}", "dataset": "chat", "text": "What is shown?", "fig_caption": "A chest radiograph.",
             "fig_inline_mention": "Figure 1.", "gpt4_answer": "ref"} for i in range(4)]
    mine = {evaluate.uid(c): f"good answer {i}" for i, c in enumerate(chat)}
    theirs = {c["question_id"]: "bad" for c in chat}
    log = lambda: AppendLog(tmp_path / f"{uuid.uuid4().hex}.jsonl")  # noqa: E731
    better = _judge(lambda a, b: "[[A]]" if a.startswith("good") else "[[B]]")
    m, stats = evaluate.win_rate(chat, mine, theirs, better, log())
    assert (m["wins"], m["losses"], m["ties"], m["win_rate"]) == (4, 0, 0, 100.0) and stats["requests"] == 8
    first = _judge(lambda a, b: "[[A]]")  # always picks the first answer: every pair is a tie
    m, _ = evaluate.win_rate(chat, mine, theirs, first, log())
    assert (m["ties"], m["win_rate"], m["judge_picked_first"]) == (4, 50.0, 8)
    worse = _judge(lambda a, b: "[[B]]" if a.startswith("good") else "[[A]]")
    assert evaluate.win_rate(chat, mine, theirs, worse, log())[0]["win_rate"] == 0.0
    vague = _judge(lambda a, b: "[[A]] or [[B]]" if a.endswith("0") or b.endswith("0") else "[[C]]")
    m, _ = evaluate.win_rate(chat, mine, theirs, vague, log())
    assert m["pairs_unparsed_ids"] == ["chat/q0"] and m["pairs"] == 3 and m["ties"] == 3
    m, _ = evaluate.win_rate(chat, mine, theirs, Client(ClientConfig()), log())  # the offline judge
    assert m["pairs"] == 4 and m["pairs_unparsed"] == 0


def test_the_model_card_says_what_the_adapter_was_tuned_from_and_on(tmp_path):
    cfg = tune.TuneConfig(base_model="/models/llava-med-v1.5-mistral-7b-hf", lora_r=16)
    stats = {"train_examples": 60000, "steps": 1875, "final_loss": 0.812345}
    card = tune.model_card(cfg, stats, Path("data/release/instructions.json"), 60000, "ab" * 32, cfg.base_model)
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == cfg.base_model and meta["library_name"] == "peft" and "biomedical" in meta["tags"]
    assert "Pipeline check only" not in card and f"60000 conversations (LLaVA format), sha256 `{'ab' * 32}`" in card
    assert "| lora_r | 16 |" in card and "| final_loss | 0.8123 |" in card and "| target_modules | q_proj, k_proj" in card
    tiny = tune.model_card(tune.TuneConfig(), stats, Path("x.json"), 3, "0" * 64, "tiny random LLaVA")
    assert "Pipeline check only" in tiny and "base_model" not in yaml.safe_load(tiny.split("---")[1])
