"""backend: vllm without a GPU: a stand-in `vllm` module (LLM, SamplingParams, StructuredOutputsParams) that answers
like the offline backend checks what this project hands vLLM (engine arguments, the very messages every other
backend gets, sampling) and that its replies go through the same cache, parsers and re-asks."""
import sys
import types
from types import SimpleNamespace

import pytest

from vital.generate import GenerateConfig, generate
from vital.llm.backends import Fatal, Reply, vllm_sampling
from vital.llm.client import Client, ClientConfig
from vital.llm.offline import OfflineBackend
from vital.llm.ray_engine import Engine, EngineError
from vital.schema import AppendLog, read_jsonl

MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"


@pytest.fixture
def fake_vllm(monkeypatch):
    """A `vllm` package that records what it is given and answers each conversation as the offline backend would."""
    seen = SimpleNamespace(engine_args=[], batches=[], sampling=[])

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class StructuredOutputsParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, **kwargs):
            if kwargs["model"] == "missing/model":
                raise OSError("missing/model is not a local folder and not on the hub")
            seen.engine_args.append(kwargs)

        def chat(self, conversations, sampling_params, use_tqdm=True):
            seen.batches.append(conversations)
            seen.sampling.append(sampling_params)
            outputs = []
            for messages in conversations:
                text = OfflineBackend().complete(messages, "generate")
                outputs.append(SimpleNamespace(prompt_token_ids=list(range(50)), outputs=[SimpleNamespace(
                    text=text, token_ids=list(range(len(text.split()))), finish_reason="stop")]))
            return outputs

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    sampling_params = types.ModuleType("vllm.sampling_params")
    sampling_params.StructuredOutputsParams = StructuredOutputsParams
    vllm.sampling_params = sampling_params
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling_params)
    return seen


class Recorder(OfflineBackend):
    """The offline backend, keeping the messages it was sent."""

    def __init__(self):
        self.messages = []

    async def acomplete(self, messages, task, sampling):
        self.messages.append(messages)
        return Reply(self.complete(messages, task))


def test_vllm_gets_the_messages_every_backend_gets_and_its_replies_are_cached_and_parsed(fake_vllm, sample, tmp_path):
    records, image_dir = sample
    records = records[:5]
    cfg = GenerateConfig(json_mode=True, temperature=0.2, max_tokens=300)
    recorder = Recorder()
    offline_rows, *_ = generate(records, image_dir, [], Client(ClientConfig(), backend=recorder),
                                AppendLog(tmp_path / "offline.jsonl"), cfg)

    client = Client(ClientConfig(backend="vllm", model=MODEL, batch_size=3, concurrency=1,
                                 vllm={"max_model_len": 4096, "gpu_memory_utilization": 0.8}))
    convs, rejected, failures, stats = generate(records, image_dir, [], client, AppendLog(tmp_path / "vllm.jsonl"), cfg)

    assert fake_vllm.engine_args == [{"model": MODEL, "limit_mm_per_prompt": {"image": 1}, "max_model_len": 4096,
                                      "gpu_memory_utilization": 0.8}]
    assert [len(b) for b in fake_vllm.batches] == [3, 2]  # batch_size requests handed to vLLM at once
    sent = sorted((m for b in fake_vllm.batches for m in b), key=str)
    assert sent == sorted(recorder.messages, key=str)  # the same messages, images as data URLs, nothing rebuilt
    assert any(p.get("type") == "image_url" and p["image_url"]["url"].startswith("data:image/")
               for m in sent[0] for p in (m["content"] if isinstance(m["content"], list) else []))
    params = fake_vllm.sampling[0]
    assert params.kwargs["temperature"] == 0.2 and params.kwargs["max_tokens"] == 300
    assert params.kwargs["structured_outputs"].kwargs == {"json_object": True}  # json_mode: JSON structured output

    # the same parser made the same conversations; the cache says which engine answered and what it counted
    assert [(c.id, c.conversations) for c in convs] == [(c.id, c.conversations) for c in offline_rows]
    assert not rejected and not failures and stats["requests"] == 5 and stats["cost_usd"] == 0.0
    rows = read_jsonl(tmp_path / "vllm.jsonl")
    assert {r["backend"] for r in rows} == {"vllm"} and all(r["usage"]["prompt_tokens"] == 50 for r in rows)

    # a rerun is answered from the cache: vLLM is loaded (the client is made) but asked nothing
    again = Client(ClientConfig(backend="vllm", model=MODEL, batch_size=3, concurrency=1))
    _, _, _, stats = generate(records, image_dir, [], again, AppendLog(tmp_path / "vllm.jsonl"), cfg)
    assert stats["cached"] == 5 and stats["requests"] == 0 and len(fake_vllm.batches) == 2


def test_vllm_sampling_maps_what_it_can_and_refuses_the_rest():
    assert vllm_sampling({"temperature": 0, "max_tokens": 64}) == {"temperature": 0.0, "max_tokens": 64}
    assert vllm_sampling({"max_tokens": 8, "response_format": {"type": "json_object"}, "seed": 3}) == {
        "temperature": 0.0, "max_tokens": 8, "seed": 3, "json_object": True}
    with pytest.raises(Fatal, match="logprobs"):
        vllm_sampling({"logprobs": True})
    with pytest.raises(Fatal, match="json_schema"):
        vllm_sampling({"response_format": {"type": "json_schema"}})


def test_vllm_missing_or_a_model_it_cannot_load_is_one_line(fake_vllm, monkeypatch):
    with pytest.raises(Fatal, match=r"cannot load 'missing/model': OSError: missing/model is not a local folder"):
        Client(ClientConfig(backend="vllm", model="missing/model"))
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed: import fails
    with pytest.raises(Fatal) as e:
        Client(ClientConfig(backend="vllm", model=MODEL))
    assert str(e.value) == ("backend vllm: vLLM is not installed; on a GPU machine run pip install -e '.[vllm]' "
                            "(README: Past one machine)")


def test_vllm_on_ray_has_its_own_cache_keys_and_refuses_a_model_split_over_gpus():
    engine = Engine(kind="ray", workers=2, gpus_per_worker=1)
    on_ray = Client(ClientConfig(backend="vllm", model=MODEL), engine=engine).backend
    transformers = Client(ClientConfig(backend="transformers", model=MODEL), engine=engine).backend
    assert on_ray.name == "vllm" and on_ray.identity == f"vllm:{MODEL}@hub" != transformers.identity
    with pytest.raises(EngineError, match="tensor_parallel_size > 1"):
        Client(ClientConfig(backend="vllm", model=MODEL, vllm={"tensor_parallel_size": 2}), engine=engine)
