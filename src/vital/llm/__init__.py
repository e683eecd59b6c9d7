"""How a request to a model is made, cached, retried and batched, in one place.

- `client`: the Client every model-facing stage uses (request cache, retries, rate limits, cost ledger);
- `backends`: the OpenAI-compatible API and a local transformers model behind one interface, and the
  retry policy;
- `batch`: the OpenAI Batch API (submit, poll, resume);
- `offline`: the deterministic no-model backend of the embedded default;
- `fakeapi`: a local OpenAI-compatible server (offline replies, injected faults) for tests and trials.

Import order is one way: fakeapi -> client -> batch, offline -> backends; nothing here imports a stage module
at import time (fakeapi reads the stages' prompts when it answers).
"""
