"""Check that LLaMA-Factory 0.9.5 tokenizes every row of a release with its own loader.

    python interop/llamafactory_check.py RELEASE_DIR

Runs in the LLaMA-Factory venv (make interop). The arguments are those of a training config
(`llamafactory-cli train` parses the same dict): stage sft, template `llava`,
dataset_dir=RELEASE_DIR, dataset=biomed_vital (its entry in RELEASE_DIR/dataset_info.json), and no
media_dir, so the images must come from the parquet rows themselves. The model folder is a tiny LLaVA
tokenizer + processor made here: a BPE tokenizer trained on the release's own text with `<image>`
added, and a LlavaProcessor around the slow (PIL) CLIPImageProcessor at 336 px, so no download and no
torchvision. Then `llamafactory.data.get_dataset` loads, converts and tokenizes the rows.

Fails (exit 1) if any row is dropped, if LLaMA-Factory logs a missing media file or a skipped or
invalid example, or if a decoded example does not hold the image placeholder expanded to the
processor's image-token count.
"""
import contextlib
import io
import json
import logging
import os
import re
import string
import sys
import tempfile
import traceback
import types
from pathlib import Path

os.environ.setdefault("LLAMAFACTORY_VERBOSITY", "WARNING")  # its warnings still reach Remember below

# datasets and transformers are imported before the torchaudio stand-in below, so they see no torchaudio
import datasets  # noqa: F401
import pyarrow.compute as pc
import pyarrow.parquet as pq
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlavaProcessor, PreTrainedTokenizerFast

try:  # transformers 5: the PIL image processor has its own name; CLIPImageProcessor wants torchvision
    from transformers import CLIPImageProcessorPil as SlowCLIPImageProcessor
except ImportError:
    from transformers import CLIPImageProcessor as SlowCLIPImageProcessor

# llamafactory/data/mm_plugin.py imports torchaudio at the top but calls it for audio data only. PyPI's
# torchaudio (2.11.x) is a CUDA build that cannot load beside the CPU torch 2.13, so it is not installed
# and an empty module stands in for it; touching it would raise AttributeError.
sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))

import llamafactory
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer

PATCH, SIZE = 14, 336  # CLIP ViT-L/14-336, as LLaVA-1.5: (336 / 14) ** 2 = 576 image tokens


class Remember(logging.Handler):
    """Keeps LLaMA-Factory's warnings, to fail on the ones that mean a row or an image was lost."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def release_texts(release):
    for row in pq.read_table(release / "data", columns=["conversations"]).column("conversations").to_pylist():
        for turn in row:
            yield turn["value"]


def build_model_dir(release, out):
    """A LLaVA-shaped model folder (tokenizer + processor files only) saved to `out`; the tokenizer knows
    every character of the release and of printable ASCII, so nothing decodes to <unk>."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    bpe.train_from_iterator(release_texts(release), trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=list(string.printable),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<unk>")
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_processor = SlowCLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    processor.save_pretrained(out)


def check(release, work):
    rows_in = sum(pq.ParquetFile(p).metadata.num_rows for p in (release / "data").glob("*.parquet"))
    info = json.loads((release / "dataset_info.json").read_text())["biomed_vital"]
    build_model_dir(release, work / "model")

    remember = Remember()
    logging.getLogger("llamafactory").addHandler(remember)
    model_args, data_args, training_args, _, _ = get_train_args({
        "model_name_or_path": str(work / "model"), "stage": "sft", "do_train": True,
        "finetuning_type": "lora", "template": "llava", "dataset": "biomed_vital",
        "dataset_dir": str(release), "cutoff_len": 4096, "overwrite_cache": True,
        "cache_dir": str(work / "cache"), "output_dir": str(work / "out"), "report_to": "none"})
    transformers.logging.set_verbosity_warning()  # get_train_args turned it to info
    tokenizer_module = load_tokenizer(model_args)
    tokenizer, processor = tokenizer_module["tokenizer"], tokenizer_module["processor"]
    assert processor is not None and isinstance(processor.image_processor, SlowCLIPImageProcessor), processor
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a whole example's ids and labels
        train = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    train = train["train_dataset"]

    rows_out = len(train)
    problems = [m for m in remember.messages if any(s in m for s in (
        "does not exist", "Dropped", "Skipping", "Invalid", "abnormal"))]
    expected = (SIZE // PATCH) ** 2  # + 1 CLS token - 1 for the "default" feature strategy
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    counts = [ids.count(image_id) for ids in train["input_ids"]]
    if any(c != expected for c in counts):
        problems.append(f"image tokens per row {counts}, expected {expected} each")
    images_per_row = pc.list_value_length(train.data.column("images")).to_pylist()  # None: no list
    if any(n != 1 for n in images_per_row):
        problems.append(f"images per row {images_per_row}, expected 1 each")
    text = re.sub(r"(<image>)+", lambda m: f"<image>x{len(m.group(0)) // 7}", tokenizer.decode(train[0]["input_ids"]))
    if f"USER: <image>x{expected}" not in text or "ASSISTANT:" not in text:
        problems.append(f"decoded example 0 lacks the llava template around the image: {text[:300]!r}")
    for p in problems:
        print("PROBLEM:", p[:300])
    start = text.find("USER:")
    print(f"rows in: {rows_in}, rows out: {rows_out}, rows skipped: {rows_in - rows_out}; dataset_info "
          f"file_name={info['file_name']!r}, images column {info['columns']['images']!r}; media_dir not set "
          f"(so it defaults to dataset_dir); example 0 decodes to ...{text[start:start + 90]!r}...")
    ok = rows_out == rows_in and not problems
    print(f"llamafactory {llamafactory.__version__}: {rows_out}/{rows_in} rows tokenized from {release} "
          f"(no media_dir){'' if ok else ' FAILED'}")
    return 0 if ok else 1


def main(release):
    try:
        with tempfile.TemporaryDirectory(prefix="interop-llamafactory-") as work:
            return check(Path(release), Path(work))
    except Exception as e:
        traceback.print_exc()
        print(f"llamafactory {llamafactory.__version__}: FAILED on {release}: {type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
