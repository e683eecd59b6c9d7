"""Check that LLaVA 1.2.2 (llava-torch) loads every record of a release with its own dataset class.

    python interop/llava_check.py RELEASE_DIR

Runs in the LLaVA venv (make interop). Sets things up as llava/train/train.py does for LLaVA-1.5
(--version v1, --mm_use_im_start_end False, a CLIP ViT-L/14-336 image processor): the slow
LlamaTokenizer (use_fast=False, pad = unk) on a SentencePiece BPE model trained here on the
release's own text (byte fallback, so no <unk>), conversation_lib.default_conversation =
conv_templates["v1"], then llava.train.train.LazySupervisedDataset(RELEASE_DIR/instructions.json,
tokenizer, data_args) with image_folder=RELEASE_DIR/images and is_multimodal=True, once with
image_aspect_ratio "pad" and once with the default ("square").

__getitem__ is called for every index. Fails (exit 1) on any exception, on an image tensor that is
not 3x336x336, on input_ids without exactly one image token, and on a record LLaVA could not line
up with its tokens ("WARNING: tokenization mismatch": it masks all its labels, so the record would
train nothing). This tokenizer is built so that well-formed records line up (legacy=True: LLaVA's
`- 1` per later round for legacy=False tokenizers fits vicuna's vocabulary, not this one's), so a
mismatch here points at the record: odd turns, a stray "</s>" or "<image>" in a turn.
"""
import contextlib
import io
import json
import sys
import tempfile
import traceback
from importlib.metadata import version
from pathlib import Path

import sentencepiece as spm
import transformers
from transformers import AutoTokenizer, CLIPImageProcessor, LlamaTokenizer

from llava import conversation as conversation_lib
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.train.train import DataArguments, LazySupervisedDataset

SIZE = 336
TOOL = f"llava {version('llava-torch')} (transformers {transformers.__version__})"


def build_tokenizer(records, out):
    """A Llama-style SentencePiece tokenizer, saved and loaded back as train.py loads one."""
    texts = [conversation_lib.conv_templates["v1"].system, "USER: ASSISTANT:"]
    texts += [turn["value"] for r in records for turn in r["conversations"]]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(out / "sp"), model_type="bpe", vocab_size=1000,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    LlamaTokenizer(vocab_file=str(out / "sp.model"), legacy=True).save_pretrained(out / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer", model_max_length=2048, padding_side="right",
                                              use_fast=False)
    tokenizer.pad_token = tokenizer.unk_token  # train.py, for any version but v0/v0.5
    return tokenizer


def load_all(dataset, records, aspect, problems):
    """__getitem__ for every index; returns how many loaded, and prints what it saw."""
    loaded, shapes, mismatched = 0, set(), 0
    for i in range(len(dataset)):
        where = f"{aspect}: record {i} ({records[i].get('id')})"
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):  # preprocess_v1 print()s its mismatch warning
                item = dataset[i]
        except Exception as e:
            problems.append(f"{where}: {type(e).__name__}: {e}")
            continue
        loaded += 1
        shapes.add(tuple(item["image"].shape))
        if tuple(item["image"].shape) != (3, SIZE, SIZE):
            problems.append(f"{where}: image tensor {tuple(item['image'].shape)}")
        if int((item["input_ids"] == IMAGE_TOKEN_INDEX).sum()) != 1:
            problems.append(f"{where}: {int((item['input_ids'] == IMAGE_TOKEN_INDEX).sum())} image tokens")
        if "tokenization mismatch" in printed.getvalue() or bool((item["labels"] == IGNORE_INDEX).all()):
            mismatched += 1
            problems.append(f"{where}: {printed.getvalue().strip() or 'all labels masked'}")
    print(f"image_aspect_ratio={aspect}: {loaded}/{len(dataset)} records loaded, image tensors {sorted(shapes)}, "
          f"{mismatched} with a tokenization mismatch")
    return loaded


def check(release, work):
    data_path, image_folder = release / "instructions.json", release / "images"
    records = json.loads(data_path.read_text())
    tokenizer = build_tokenizer(records, work)
    conversation_lib.default_conversation = conversation_lib.conv_templates["v1"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})

    problems, loaded = [], []
    for aspect in ("pad", None):
        data_args = DataArguments(data_path=str(data_path), lazy_preprocess=True, is_multimodal=True,
                                  image_folder=str(image_folder))
        if aspect:
            data_args.image_aspect_ratio = aspect
        data_args.image_processor = image_processor  # train.py: vision_tower.image_processor
        data_args.mm_use_im_start_end = False
        dataset = LazySupervisedDataset(data_path=str(data_path), tokenizer=tokenizer, data_args=data_args)
        loaded.append(load_all(dataset, records, data_args.image_aspect_ratio, problems))
    for p in problems:
        print("PROBLEM:", p[:300])
    print(f"{TOOL}: {min(loaded)}/{len(records)} records loaded with image_folder={image_folder}"
          + (f" FAILED ({len(problems)} problems)" if problems else ""))
    return 1 if problems else 0


def main(release):
    try:
        with tempfile.TemporaryDirectory(prefix="interop-llava-") as work:
            return check(Path(release), Path(work))
    except Exception as e:
        traceback.print_exc()
        print(f"{TOOL}: FAILED on {release}: {type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
