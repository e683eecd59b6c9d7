import os

# hermetic: no hub, no analytics, before anything imports transformers or dvc
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402

from vital.corpus import build_sample  # noqa: E402


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    """The bundled sample corpus, built once: (records, image_dir)."""
    image_dir = tmp_path_factory.mktemp("sample") / "images"
    return build_sample(image_dir, 256).records, image_dir
