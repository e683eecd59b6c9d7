import os

# hermetic: no hub, no analytics, before anything imports transformers or dvc
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

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
