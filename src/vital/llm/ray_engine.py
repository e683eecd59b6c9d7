"""Ray: local-model work as a Ray Data `map_batches`, one model per actor (`engine.kind: ray`).

    engine = Engine(kind="ray", workers=2, gpus_per_worker=1)
    client = Client(ClientConfig(backend="transformers", model="path/to/llava"), engine=engine)

With `kind: ray` the transformers (or vllm) backend does not load its model in the stage's process. The client
works out, as always, which requests its cache lacks; `run_requests` streams those to `workers` actors, each
holding one model (`num_gpus = gpus_per_worker`, `cpus_per_worker` threads), `batch_size` requests generated
together: one Dataset, so one model load per actor, for all of a stage's requests (an actor asks a reply the
stage rejects again at once, not in a second pass). Each reply is appended to the request cache as it comes
back, under the key the local path uses, so the two paths share one cache, a killed job resumes where it
stopped, and nothing is computed twice. The OpenAI-compatible path stays the async client: it is bound by the
provider, not by this machine. `encode` does the same for the selector's text and image features.

`address` empty (and no `RAY_ADDRESS` in the environment): a local Ray is started for the stage, with this
machine's CPUs. Otherwise the address of a running cluster (`host:6379`, `ray://host:10001`) whose nodes have
this project installed (`pip install -e .`).
"""
from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from itertools import chain, islice
from typing import Callable, Iterable


from .backends import Fatal, Reply

class EngineError(Fatal, ValueError):
    """The engine cannot run (bad address or kind): stops a model stage (Fatal) and a feature stage (ValueError)."""


@dataclass
class Engine:
    kind: str = "local"  # local: this process | ray
    address: str = ""  # empty: RAY_ADDRESS, else a local Ray started for the stage
    workers: int = 1  # actors, one model each
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    batch_size: int = 4  # requests (or texts, images) a worker takes at once

    def __post_init__(self):
        if self.kind not in ("local", "ray"):
            raise EngineError(f"engine.kind {self.kind!r}: choose local or ray")

    @property
    def ray(self) -> bool:
        return self.kind == "ray"


def connect(engine: Engine) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), or start a local Ray; an address nobody answers on is one
    line, at once (Ray itself would retry for a minute)."""
    import ray
    import ray.data

    if ray.is_initialized():
        return
    address = engine.address or os.environ.get("RAY_ADDRESS", "")
    if address and address != "auto":
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except (OSError, ValueError) as e:
            raise EngineError(f"engine.address {address!r}: no Ray cluster answers there ({e}); give host:port of a "
                              "running cluster (ray start --head prints it), or '' for a local Ray") from None
    try:
        local = {} if address else {"num_cpus": max(os.cpu_count() or 1, int(engine.workers * engine.cpus_per_worker))}
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False, logging_level="ERROR", **local)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise EngineError(f"engine.address {address!r}: {str(e).splitlines()[0]}") from None
    context = ray.data.DataContext.get_current()  # the stage prints its own summary line
    context.enable_progress_bars = context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _blocks(rows: Iterable, most: int, engine: Engine):
    """`rows` in lists of at most `most`, whole batches of `engine.batch_size`, and small enough that each worker
    gets about four (so no worker's share waits behind another's); only the first `workers * 4` blocks' rows are
    held to size them."""
    rows, step = iter(rows), engine.batch_size
    head = list(islice(rows, most * engine.workers * 4))
    size = max(step, min(most, -(-len(head) // (engine.workers * 4 * step)) * step))
    rows = chain(head, rows)
    while block := list(islice(rows, size)):
        yield block


def map_rows(engine: Engine, rows: Iterable[dict], actor: type, block_rows: int, **kwargs):
    """`rows` through `engine.workers` instances of the Ray actor class `actor` (built with `kwargs` and
    `threads`), `engine.batch_size` rows a call; yields the output batches (numpy) as they come back, in any order.

    One Dataset, so one pool of actors (one model load each) for all the rows. The rows are put into Ray's object
    store in blocks of at most `block_rows` as they are made (Ray spills the store to disk when it fills), so this
    process never holds more than a few blocks of them, however many there are."""
    import pyarrow as pa
    import ray

    connect(engine)
    refs = [ray.put(pa.Table.from_pylist(block)) for block in _blocks(rows, block_rows, engine)]
    if not refs:
        return
    ds = ray.data.from_arrow_refs(refs)
    out = ds.map_batches(actor, fn_constructor_kwargs={**kwargs, "threads": max(1, int(engine.cpus_per_worker))},
                         batch_size=engine.batch_size, compute=ray.data.ActorPoolStrategy(size=engine.workers),
                         num_cpus=engine.cpus_per_worker, num_gpus=engine.gpus_per_worker or None, batch_format="numpy")
    yield from out.iter_batches(batch_size=None, batch_format="numpy")


# ---------------------------------------------------------------- requests

# batches of requests in a Ray Data block, at most: Ray's cost per block (~25 ms here) is spread over them; a
# killed job loses the replies of the blocks in flight (about two per worker)
BLOCK_BATCHES = 16


class RayModel:
    """What the client knows of a local model (transformers or vllm) that runs on Ray: its name and identity (so
    the cache keys are the local path's), not its weights."""

    def __init__(self, name: str, model: str, device: str, vllm_args: dict, engine: Engine):
        from .backends import local_identity

        if name == "vllm" and int(vllm_args.get("tensor_parallel_size", 1)) > 1:
            raise EngineError("backend vllm on engine.kind ray: one engine per worker on gpus_per_worker GPUs; a "
                              "model split over GPUs (llm.vllm.tensor_parallel_size > 1) runs with engine.kind local")
        self.name, self.model, self.device, self.vllm_args, self.engine = name, model, device, vllm_args, engine
        self.identity = local_identity(name, model)
        self.batch_size = engine.batch_size

    async def acomplete(self, messages, task, sampling):
        raise Fatal("engine.kind ray runs whole request lists (Client.run); set engine.kind: local for single calls")

    async def aclose(self):
        pass


class _Generator:
    """A Ray actor: one local backend (transformers or vllm); a batch it cannot generate fails those requests,
    not the run. `rejected` (the client's rule, with the stage's `task`): a reply it rejects is generated again
    at once, for the row's `reask` key, so the client needs no second pass (and no second model load) for it."""

    def __init__(self, name: str, model: str, device: str, vllm_args: dict, batch_size: int, sampling: dict,
                 task: str, rejected: Callable[[dict], str | None] | None, threads: int):
        import torch

        from .backends import TransformersBackend, VLLMBackend

        torch.set_num_threads(threads)
        self.backend = (VLLMBackend(model, batch_size, vllm_args) if name == "vllm"
                        else TransformersBackend(model, batch_size, device))
        self.sampling, self.task, self.rejected = sampling, task, rejected

    def _answer(self, hashes: list, requests: list, first: list) -> dict:
        n = len(requests)
        try:
            replies, errors = self.backend._generate(requests, self.sampling), [""] * n
        except Exception as e:  # noqa: BLE001 - the processor or model refused these inputs
            replies, errors = [Reply("", 0, 0, "error")] * n, [f"{type(e).__name__}: {e}"] * n
        return {"h": hashes, "text": [r.text for r in replies], "finish_reason": [r.finish_reason for r in replies],
                "prompt_tokens": [r.prompt_tokens for r in replies],
                "completion_tokens": [r.completion_tokens for r in replies], "error": errors, "first": first}

    def __call__(self, batch: dict) -> dict:
        hashes, requests = [str(h) for h in batch["h"]], [json.loads(m) for m in batch["messages"]]
        out = self._answer(hashes, requests, [""] * len(hashes))
        again = [i for i, key in enumerate(batch["reask"]) if key and not out["error"][i] and self.rejected
                 and self.rejected({"task": self.task, "reply": out["text"][i]})]
        if again:
            more = self._answer([str(batch["reask"][i]) for i in again], [requests[i] for i in again],
                                [hashes[i] for i in again])
            out = {k: v + more[k] for k, v in out.items()}
        return out


def run_requests(backend: RayModel, pending: Iterable[tuple[str, list[dict]]], sampling: dict,
                 on_reply: Callable, on_failure: Callable, sync: Callable[[], None],
                 reask: tuple[str, Callable, Callable] | None = None) -> None:
    """Send the pending (hash, messages) to the actors, BLOCK_BATCHES batches a block; each reply goes to
    `on_reply` (the cache) as soon as its block is back, and is fsynced with its block (a killed job loses at
    most the blocks in flight). `reask`: (task, rejected, reask_key): a reply that `rejected` rejects is asked
    again by the worker at once, under `reask_key(messages)`, and goes to `on_reply` with `first` = its hash."""
    task, rejected, reask_key = reask or ("", None, None)
    rows = ({"h": h, "messages": json.dumps(m), "reask": reask_key(m) if reask_key else ""} for h, m in pending)
    for out in map_rows(backend.engine, rows, _Generator, backend.batch_size * BLOCK_BATCHES, name=backend.name,
                        model=backend.model, device=backend.device, vllm_args=backend.vllm_args,
                        batch_size=backend.batch_size, sampling=sampling, task=task, rejected=rejected):
        for i, h in enumerate(out["h"]):
            if out["error"][i]:
                on_failure(str(h), str(out["error"][i]), 1)
            else:
                on_reply(str(h), Reply(str(out["text"][i]), int(out["prompt_tokens"][i]),
                                       int(out["completion_tokens"][i]), str(out["finish_reason"][i])),
                         "online", sync=False, first=str(out["first"][i]))
        sync()
