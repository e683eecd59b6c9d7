"""Model backends: chat messages (OpenAI format) in, one reply out. Shared by every model-facing step
(annotation_pool, generate, rate, evaluate's judge), which build the same messages for every backend.

- `offline` (offline.py): deterministic, no model; the embedded default.
- `openai`: the official SDK's async client against any OpenAI-compatible endpoint: OpenAI, Azure OpenAI
  (`api_version` set), vLLM, Ollama, LM Studio (`base_url`). The key comes from the environment only
  (`OPENAI_API_KEY`, or `AZURE_OPENAI_API_KEY` for Azure) and is never written anywhere.
- `transformers`: a local image-text-to-text model (AutoProcessor + AutoModelForImageTextToText) by path
  or hub name, batched, on the GPU when there is one.
- `vllm`: an open-weight VLM in vLLM's offline engine (`vllm.LLM.chat`) on this machine's GPUs, `batch_size`
  requests handed to it at once (`pip install -e '.[vllm]'`; README: Past one machine).

A backend raises one of three errors, which tell the client (client.py) what to do: `Retryable` (429,
5xx, timeout, malformed response: back off and try again), `RequestFailed` (this request can never
succeed: record it and go on) and `Fatal` (no request can succeed, e.g. a refused key: stop and say why).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import random
import re
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

from PIL import Image


@dataclass
class Reply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # "length": the reply was cut at max_tokens


class BackendError(Exception):
    pass


class Retryable(BackendError):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RequestFailed(BackendError):
    pass


class Fatal(BackendError):
    pass


def backoff(cfg, attempt: int, retry_after: float | None) -> float:
    """Seconds before retry `attempt + 1`: exponential with jitter (half fixed, half random), capped at
    `max_backoff_s`, and never sooner than the server's Retry-After."""
    cap = min(cfg.max_backoff_s, cfg.backoff_s * 2 ** (attempt - 1))
    return max(retry_after or 0.0, cap / 2 + random.uniform(0, cap / 2))


# ---------------------------------------------------------------- images in requests

def image_part(data: bytes, max_side: int = 0) -> dict:
    """An OpenAI `image_url` content part: the image file's bytes as a base64 data URL, shrunk to fit
    `max_side` (0: as is)."""
    png = data[:4] == b"\x89PNG"
    if max_side:
        with Image.open(io.BytesIO(data)) as im:
            if max(im.size) > max_side:
                im.thumbnail((max_side, max_side))
                buf = io.BytesIO()
                if png:
                    im.save(buf, "PNG")
                else:
                    im.convert("RGB").save(buf, "JPEG", quality=90)
                data = buf.getvalue()
    mime = "image/png" if png else "image/jpeg"
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def parts(content) -> list[dict]:
    """A message's content as a list of parts (a plain string is one text part)."""
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def decode_image(url: str) -> Image.Image:
    if not url.startswith("data:"):
        raise RequestFailed(f"local models take images as data URLs, got {url[:40]!r}")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


# ---------------------------------------------------------------- openai

def redact(text: str) -> str:
    """Text with anything that looks like a credential removed (servers echo part of a refused key; URLs
    can carry user:password)."""
    for var, value in os.environ.items():
        if len(value) >= 8 and re.search(r"KEY|TOKEN|SECRET", var):
            text = text.replace(value, "***")
    text = re.sub(r"://[^/@\s]+@", "://***@", text)
    return re.sub(r"(sk-|key[=: ]+)[\w\-*.]{4,}", r"\1***", text)


def retry_after(headers) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms`, or `retry-after` in seconds or as an HTTP date."""
    if headers is None:
        return None
    if headers.get("retry-after-ms"):
        try:
            return float(headers["retry-after-ms"]) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def reply_from_body(body) -> Reply:
    """A Reply from a chat.completion body (online, or a line of a batch output file)."""
    try:
        choice, usage = body["choices"][0], body.get("usage") or {}
        return Reply(choice["message"].get("content") or "", usage.get("prompt_tokens") or 0,
                     usage.get("completion_tokens") or 0, choice.get("finish_reason") or "stop")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise Retryable(f"malformed response: {redact(str(body)[:120])!r}") from None


class OpenAIBackend:
    """The key is read from `api_key_env` (OPENAI_API_KEY by default; AZURE_OPENAI_API_KEY for Azure) and
    sent only to `base_url`: give a server you do not trust a variable of its own."""
    name = "openai"

    def __init__(self, model: str, base_url: str | None, api_version: str | None, timeout_s: float,
                 api_key_env: str = "OPENAI_API_KEY"):
        self.model, self.base_url, self.api_version, self.timeout_s = model, base_url, api_version, timeout_s
        self.api_key_env = "AZURE_OPENAI_API_KEY" if api_version and api_key_env == "OPENAI_API_KEY" else api_key_env
        self.where = redact(base_url or "api.openai.com")
        self.identity = f"openai:{model}"  # the same model name on another server is another model
        self._key()  # fail before any work when there is no key
        self._client = None

    def _key(self) -> str:
        key = os.environ.get(self.api_key_env)
        if not key:
            if not self.base_url:
                raise Fatal(f"backend openai: no API key. Set {self.api_key_env} in the environment (never in "
                            "params or a tracked file), or set base_url to a local server that needs none")
            key = "unused"  # vLLM, Ollama and LM Studio accept any key
        return key

    @property
    def client(self):
        """The SDK's async client, made inside the running event loop (each `Client.run` has its own loop)."""
        import openai

        if self._client is None:
            # aiohttp as the transport: the SDK's advice for high concurrency (httpx's pool costs ~1 ms a request)
            common = dict(api_key=self._key(), max_retries=0, timeout=self.timeout_s,
                          http_client=openai.DefaultAioHttpClient(timeout=self.timeout_s))
            if self.api_version:  # Azure OpenAI: base_url is the resource endpoint
                self._client = openai.AsyncAzureOpenAI(azure_endpoint=self.base_url, api_version=self.api_version,
                                                       **common)
            else:
                self._client = openai.AsyncOpenAI(base_url=self.base_url, **common)
        return self._client

    async def acomplete(self, messages: list[dict], task: str, sampling: dict) -> Reply:
        import httpx2

        # The SDK's low-level post: same auth, base_url, Azure routing, timeouts and errors as
        # `chat.completions.create`, without its typed-params transform (~2 ms of CPU a request).
        response = await self.call(self.client.post, "/chat/completions", cast_to=httpx2.Response,
                                   body={"model": self.model, "messages": messages, **sampling})
        try:
            body = response.json()
        except ValueError:  # a body that is not JSON (a proxy's error page, a cut connection)
            raise Retryable(f"malformed response: {redact(response.text[:120])!r}") from None
        return reply_from_body(body)

    async def call(self, method, *args, **kwargs):
        """An SDK call with its errors mapped to Retryable / RequestFailed / Fatal, credentials redacted."""
        import openai

        try:
            return await method(*args, **kwargs)
        except openai.APITimeoutError as e:  # the aiohttp transport reports a refused connection as one too
            cause = str(e.__cause__ or "")
            raise Retryable(f"cannot reach {self.where}: {redact(cause)}" if "connect" in cause.lower()
                            else "timeout") from None
        except openai.APIConnectionError as e:
            raise Retryable(f"cannot reach {self.where}: {redact(str(e.__cause__ or e))}") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise Fatal(f"{self.where} refused the API key (HTTP {e.status_code}): check {self.api_key_env} in the "
                        f"environment. Server said: {redact(e.message)}") from None
        except openai.NotFoundError as e:
            raise Fatal(f"{self.where}: model {self.model!r} or the endpoint was not found (HTTP 404); check the "
                        f"model and base_url params. Server said: {redact(e.message)}") from None
        except openai.APIStatusError as e:
            if e.status_code == 429 and getattr(e, "code", None) == "insufficient_quota":
                raise Fatal(f"{self.where}: quota exhausted (429 insufficient_quota); add credit and rerun") from None
            if e.status_code in (408, 409, 429) or e.status_code >= 500:
                raise Retryable(f"HTTP {e.status_code}: {redact(e.message)}", retry_after(e.response.headers)) from None
            raise RequestFailed(f"HTTP {e.status_code}: {redact(e.message)}") from None
        except openai.APIResponseValidationError as e:
            raise Retryable(f"malformed response: {redact(str(e))[:120]}") from None
        except ValueError as e:  # the request could not even be made (a bad base_url): no request can
            raise Fatal(f"{self.where}: {redact(str(e))}; check base_url") from None

    async def aclose(self):
        if self._client is not None:
            await self._client.close()
            self._client = None


# ---------------------------------------------------------------- transformers

def _fingerprint(model: str) -> str:
    """Names, sizes and times of a local model's files (a hub name is its own fingerprint)."""
    path = Path(model)
    if not path.is_dir():
        return "hub"
    stats = sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in path.iterdir() if f.is_file())
    return hashlib.sha256(repr(stats).encode()).hexdigest()[:12]


def local_identity(backend: str, model: str) -> str:
    """What a local model's cache keys name: the engine, its path and a fingerprint of its files (retrained:
    new replies). vLLM and transformers replies to one request differ, so each engine has its own keys."""
    return f"{backend}:{model}@{_fingerprint(model)}"


class BatchedBackend:
    """A model on this machine: requests that arrive together (up to `batch_size`, within 20 ms) go to
    `_generate` as one list, in a thread, so the event loop keeps the cache writes going."""
    batch_size = 1

    async def acomplete(self, messages: list[dict], task: str, sampling: dict) -> Reply:
        if getattr(self, "_queue", None) is None:
            self._queue = asyncio.Queue()
            self._server = asyncio.create_task(self._serve())
        done = asyncio.get_running_loop().create_future()
        await self._queue.put((messages, sampling, done))
        return await done

    async def _serve(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + 0.02  # wait briefly for the batch to fill
            while len(batch) < self.batch_size:
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            try:
                replies = await asyncio.to_thread(self._generate, [b[0] for b in batch], batch[0][1])
            except Exception as e:  # a processor or model error fails these requests, not the run
                for *_, done in batch:
                    done.set_exception(RequestFailed(f"{type(e).__name__}: {e}"))
                continue
            for (*_, done), reply in zip(batch, replies):
                done.set_result(reply)

    def _generate(self, requests: list[list[dict]], sampling: dict) -> list[Reply]:
        raise NotImplementedError

    async def aclose(self):
        if getattr(self, "_server", None):
            self._server.cancel()
            self._queue = self._server = None


class TransformersBackend(BatchedBackend):
    """A local vision-language model. Requests that arrive together are generated as one padded batch."""
    name = "transformers"

    def __init__(self, model: str, batch_size: int, device: str = "auto"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model = model
        self.identity = local_identity("transformers", model)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.net = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model)
        tok = self.processor.tokenizer
        tok.padding_side = "left"  # generation continues from the right edge
        if tok.pad_token is None:  # many causal LMs have none; padding with EOS is the usual choice
            tok.pad_token = tok.eos_token
        self.batch_size = batch_size
        self.batch_sizes: list[int] = []  # what was generated together, for metrics and tests

    def _generate(self, requests: list[list[dict]], sampling: dict) -> list[Reply]:
        import torch

        prompts, images = [], []
        for messages in requests:
            chat = []
            for m in messages:
                content = []
                for p in parts(m["content"]):
                    if p["type"] == "image_url":
                        images.append(decode_image(p["image_url"]["url"]))
                        content.append({"type": "image"})
                    else:
                        content.append({"type": "text", "text": p["text"]})
                content.sort(key=lambda p: p["type"] != "image")  # LLaVA puts the image first
                chat.append({"role": m["role"], "content": content})
            prompts.append(self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
        enc = self.processor(text=prompts, images=images or None, padding=True, return_tensors="pt")
        enc.pop("token_type_ids", None)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(self.net.dtype)
        tok = self.processor.tokenizer
        max_new = int(sampling.get("max_tokens", 512))
        temperature = float(sampling.get("temperature", 0) or 0)
        with torch.no_grad():
            out = self.net.generate(**enc, max_new_tokens=max_new, do_sample=temperature > 0,
                                    temperature=temperature if temperature > 0 else None,
                                    pad_token_id=tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        self.batch_sizes.append(len(requests))
        replies = []
        for row, prompt_len in zip(new, enc["attention_mask"].sum(1).tolist()):
            n = int((row != tok.pad_token_id).sum())
            replies.append(Reply(tok.decode(row, skip_special_tokens=True).strip(), int(prompt_len), n,
                                 "length" if n >= max_new else "stop"))
        return replies


# ---------------------------------------------------------------- vllm

def vllm_engine_args(model: str, args: dict) -> dict:
    """`vllm.LLM` keyword arguments: the model, one image per prompt, and the `llm.vllm` params on top (any vLLM
    engine argument: max_model_len, gpu_memory_utilization, tensor_parallel_size, dtype, ...)."""
    return {"model": model, "limit_mm_per_prompt": {"image": 1}, **args}


def vllm_sampling(sampling: dict) -> dict:
    """`vllm.SamplingParams` keyword arguments for the OpenAI-style sampling a stage sends; `response_format`
    json_object becomes vLLM's JSON structured output. A key vLLM has no meaning for stops the run."""
    known = {"temperature", "max_tokens", "top_p", "seed", "stop", "response_format"}
    if set(sampling) - known:
        raise Fatal(f"backend vllm: sampling keys {sorted(set(sampling) - known)} have no vLLM meaning here")
    out = {"temperature": float(sampling.get("temperature", 0) or 0),
           "max_tokens": int(sampling.get("max_tokens", 512))}
    out.update({k: sampling[k] for k in ("top_p", "seed", "stop") if k in sampling})
    fmt = (sampling.get("response_format") or {}).get("type")
    if fmt not in (None, "text", "json_object"):
        raise Fatal(f"backend vllm: response_format {fmt!r}: only json_object is mapped")
    if fmt == "json_object":
        out["json_object"] = True
    return out


class VLLMBackend(BatchedBackend):
    """An open-weight VLM in vLLM's offline engine: the OpenAI-format messages every backend gets go to
    `LLM.chat` as they are (images as data URLs; the model's own chat template places them), `batch_size` at a
    time (vLLM schedules them on the GPU together: give it 64 or more)."""
    name = "vllm"

    def __init__(self, model: str, batch_size: int, args: dict | None = None):
        try:
            import vllm
        except ImportError:
            raise Fatal("backend vllm: vLLM is not installed; on a GPU machine run pip install -e '.[vllm]' "
                        "(README: Past one machine)") from None
        self.model, self.batch_size = model, batch_size
        self.identity = local_identity("vllm", model)
        try:
            self.llm = vllm.LLM(**vllm_engine_args(model, args or {}))
        except Exception as e:  # noqa: BLE001 - no GPU, not enough memory, a model vLLM does not know
            first = (str(e).splitlines() or [""])[0]
            raise Fatal(f"backend vllm: cannot load {model!r}: {type(e).__name__}: {first}") from None

    def _generate(self, requests: list[list[dict]], sampling: dict) -> list[Reply]:
        import vllm

        kwargs = vllm_sampling(sampling)
        if kwargs.pop("json_object", False):
            from vllm.sampling_params import StructuredOutputsParams
            kwargs["structured_outputs"] = StructuredOutputsParams(json_object=True)
        outputs = self.llm.chat(requests, vllm.SamplingParams(**kwargs), use_tqdm=False)
        replies = []
        for out in outputs:
            best = out.outputs[0]
            replies.append(Reply(best.text.strip(), len(out.prompt_token_ids or []), len(best.token_ids or []),
                                 "length" if best.finish_reason == "length" else "stop"))
        return replies
