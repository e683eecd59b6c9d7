"""DVC stage `generate`: demonstration-prompted multi-turn Q&A for every figure.

    dvc repro generate
    OPENAI_API_KEY=... dvc exp run -S generate.backend=openai -S generate.model=gpt-4o
    dvc exp run -S generate.backend=openai -S generate.base_url=http://localhost:8000/v1 -S generate.model=<served>
    dvc exp run -S generate.backend=openai -S generate.mode=batch     # Batch API; rerun to resume polling
    dvc exp run -S generate.backend=transformers -S generate.model=/path/to/llava
"""
import time

from common import image_store, load, model_client, params, write_metrics

from vital.generate import MODALITIES, GenerateConfig, check_demos, generate
from vital.schema import AppendLog, CorpusRecord, Demo, write_jsonl
from vital.replies import rejected_note


def main():
    t0, p = time.time(), params("generate")
    records = load("data/corpus/records.jsonl", CorpusRecord)
    demos = load(p["demos"], Demo)
    try:
        check_demos(demos, p["demos"])
        cfg = GenerateConfig.from_params(p)
    except ValueError as e:
        raise SystemExit(f"generate: {e}") from None
    with model_client("generate", p) as (client, batch_state):
        conversations, rejected, failures, stats = generate(
            records, image_store(), demos, client, AppendLog("data/cache/generate.jsonl"), cfg, batch_state)
    write_jsonl("data/candidates/generate_rejected.jsonl", rejected)
    write_jsonl("data/candidates/generate_failures.jsonl", failures)
    if not conversations:
        raise SystemExit(f"generate: no usable conversation ({stats['rejected']} rejected, {stats['failed']} failed); "
                         "see data/candidates/generate_rejected.jsonl, generate_failures.jsonl and the generate.* params")
    write_jsonl("data/candidates/generated.jsonl", conversations)  # `decontaminate_qa` reads it
    write_metrics("generate", {"backend": client.name, "model": client.model, "demo_scheme": cfg.demo_scheme,
                               "demos_by_modality": {d: sum(x.domain == d for x in demos) for d in MODALITIES},
                               **stats}, t0)
    if note := rejected_note("generate", stats["rejected_by_reason"], "data/candidates/generate_rejected.jsonl"):
        print(note)


if __name__ == "__main__":
    main()
