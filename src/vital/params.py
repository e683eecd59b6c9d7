"""One schema for all of params.yaml: the type and range of every key, checked before a stage does any work.

Every stage imports `stages/common.py` first, which runs `check()`; `vital validate params` runs it too. A wrong
type, a value out of range (also one that would silently empty a stage, as `annotation_pool.per_cluster: 0`), an
unknown or a missing key is one line per problem, `params.yaml:LINE: section.key is VALUE; allowed: ...`. This
module imports only yaml and pydantic, so the check takes well under a second. params.yaml holds the defaults;
the schema holds none (no value is written in two places), except for the few keys a section may leave out.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PARAMS = Path("params.yaml")

Count = Annotated[int, Field(ge=1)]  # at least one
Natural = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Share = Annotated[float, Field(ge=0, lt=1)]  # a share of figures in [0, 1)
Text = Annotated[str, Field(min_length=1)]
Fraction = Annotated[float, Field(gt=0, le=1)]  # in (0, 1]
Bits = Annotated[int, Field(ge=0, le=32)]  # a Hamming distance between 64-bit image hashes
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N")]
Backend = Literal["offline", "openai", "transformers", "vllm"]
Mode = Literal["online", "batch"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Corpus(Section):
    source: Literal["sample", "path"]
    path: Text
    image_dir: Text
    strict: bool
    max_image_side: Count
    shard_mb: Positive
    max_pixels: Count
    licenses: Optional[Text]  # a side file of licences by pmcid (PMC OA file list CSV, or pmcid,license); null: none


class Dedup(Section):
    phash_distance: Bits
    caption_jaccard: Fraction


class Decontaminate(Section):
    eval_root: Text  # the folder holding the eval sets: a DVC dependency of both decontaminate stages
    eval_sets: list[Annotated[str, Field(pattern=r"^[^/\\]+$", description="a folder name inside eval_root (no /: "
                                         "set eval_root to the folder above)")]]  # []: none checked
    phash_distance: Bits
    caption_jaccard: Fraction
    min_words: Count
    text_containment: Fraction
    text_cosine: Fraction | None


class Llm(Section):
    max_attempts: Count
    timeout_s: Positive
    backoff_s: NonNegative
    max_backoff_s: NonNegative
    batch_size: Count
    device: Device
    prices: dict[str, Annotated[list[NonNegative], Field(min_length=2, max_length=2, description=
                                                         "[input, output]: two numbers >= 0 (USD per million tokens)")]]
    batch_discount: Annotated[float, Field(gt=0, le=1)]
    batch_max_requests: Annotated[int, Field(ge=1, le=50_000)]
    batch_max_mb: Annotated[float, Field(gt=0, le=200)]
    batch_poll_s: Positive
    batch_wait_s: Positive
    vllm: dict[str, Any]  # backend vllm: vllm.LLM engine arguments, passed as they are


class Engine(Section):
    """Where local-model work runs (src/vital/llm/ray_engine.py)."""
    kind: Literal["local", "ray"]
    address: str
    workers: Count
    cpus_per_worker: Positive
    gpus_per_worker: NonNegative
    batch_size: Count


class Endpoint(Section):
    """The model a stage calls (src/vital/llm/client.py); the keys after `concurrency` may be left out."""
    backend: Backend
    model: Text
    base_url: Optional[Text]
    api_version: Optional[Text]
    concurrency: Count
    api_key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="the name of an "
                                      "environment variable")] = "OPENAI_API_KEY"
    requests_per_minute: NonNegative = 0
    tokens_per_minute: NonNegative = 0


class AnnotationPool(Endpoint):
    max_image_side: Count
    clusters: Count
    per_cluster: Count
    questions_per_figure: Count
    image_weight: NonNegative
    seed: int


class Generate(Endpoint):
    mode: Mode
    demos: Text
    demo_scheme: Literal["every_modality", "own_domain"]
    demos_per_modality: Natural
    min_rounds: Count
    max_image_side: Count
    json_mode: bool
    temperature: Annotated[float, Field(ge=0, le=2)]
    max_tokens: Count
    seed: int
    leak_phrases: list[Text]
    refusal_phrases: list[Text]
    system_prompt: Text


class Rate(Endpoint):
    mode: Mode
    max_image_side: Count
    temperature: Annotated[float, Field(ge=0, le=2)]
    max_tokens: Count


class MergePreferences(Section):
    clinician: Text
    clinician_weight: NonNegative
    clinician_validation: Share
    clinician_test: Share
    model_pairs: Natural
    model_validation: Share
    model_test: Share
    seed: int

    @model_validator(mode="after")
    def _some_left_to_train(self):
        for who in ("clinician", "model"):
            v, t = getattr(self, f"{who}_validation"), getattr(self, f"{who}_test")
            if v + t >= 1:
                raise ValueError(f"{who}_validation + {who}_test is {v + t:g}; allowed: less than 1 (leave some "
                                 "figures to train on)")
        return self


class TrainSelector(Section):
    backbone: Literal["minilm", "biomedclip"]
    backbone_model: Optional[Text]
    finetune_backbone: bool
    backbone_lr: Positive
    unit: Literal["round", "conversation"]
    aggregate: Literal["first", "mean", "min"]
    loss: Literal["hinge", "logistic"]
    margin: NonNegative
    epochs: Count
    lr: Positive
    batch_size: Count
    hidden: Count
    dropout: Share
    seed: int
    baseline_model_only: bool
    lexical_grounding: bool

    @model_validator(mode="after")
    def _biomedclip_needs_a_model(self):
        if self.backbone == "biomedclip" and not self.backbone_model:
            raise ValueError("backbone_model is null; allowed with backbone biomedclip: the folder or hub name of "
                             "the dual encoder")
        return self


class Filter(Section):
    ratio: Annotated[float, Field(gt=0, le=1)]
    top_k: Natural
    balance_domains: bool
    shard_mb: Positive
    licenses: Optional[Annotated[list[Text], Field(min_length=1, description="a list of licences, e.g. [CC BY, "
                                                   "CC0] (not empty: null keeps every licence)")]]


class Tune(Section):
    base_model: Text
    data: Text
    images: Text
    epochs: Count
    max_steps: Natural
    lr: Positive
    batch_size: Count
    grad_accum: Count
    max_length: Annotated[int, Field(ge=16)]
    lora_r: Count
    lora_alpha: Positive
    lora_dropout: Share
    target_modules: Annotated[list[Text], Field(min_length=1)]
    train_projector: bool
    bf16: bool
    gradient_checkpointing: bool
    device: Literal["auto", "cpu"]
    checkpoint_every: Natural
    merge: bool
    accelerate_config: Text
    num_processes: Count
    seed: int


class EvalSpec(Section):
    name: Annotated[str, Field(pattern=r"^[\w.-]+$", description="a name of letters, digits, _ . -")]
    format: Literal["sample", "huggingface", "slake", "llava_med", "vital"]
    path: Optional[Text] = None  # inside eval_root; sample: none
    domain: Optional[Text] = None  # the domain of items whose files do not say (PathVQA: histology)


class Evaluate(Endpoint):
    eval_root: Text  # the folder holding the eval sets: the stage's DVC dependency
    eval_sets: Annotated[list[EvalSpec], Field(min_length=1)]
    languages: Optional[list[Text]]  # SLAKE q_lang kept; null: all
    base_model: bool  # also answer with the untuned base (the adapter off)
    baseline_answers: Optional[Text]  # {question_id, answer} jsonl: the chat win rate's other side; null: the references
    max_new_tokens: Count
    chat_max_new_tokens: Count
    device: Device
    temperature: Annotated[float, Field(ge=0, le=2)]
    max_tokens: Count

    @field_validator("eval_sets")
    @classmethod
    def _sets_inside_the_root(cls, sets, info):
        root, names = Path(info.data.get("eval_root") or "."), [s.name for s in sets]
        for s in sets:
            if names.count(s.name) > 1:
                raise ValueError(f"eval set name {s.name!r} is used twice; allowed: one name per set")
            if s.format == "sample" and s.path:
                raise ValueError(f"eval set {s.name!r} (format sample) is built from the corpus: leave out its path")
            if s.format != "sample" and not s.path:
                raise ValueError(f"eval set {s.name!r} (format {s.format}) has no path; allowed: a path inside "
                                 f"eval_root ({root})")
            if s.path and not _inside(s.path, root):
                raise ValueError(f"eval set {s.name!r}: path {s.path} is outside eval_root ({root}), so DVC would "
                                 "not rerun evaluate when it changes; allowed: set eval_root to a folder holding it")
        return sets

    @field_validator("baseline_answers")
    @classmethod
    def _baseline_inside_the_root(cls, path, info):
        root = Path(info.data.get("eval_root") or ".")
        if path and not _inside(path, root):
            raise ValueError(f"{path} is outside eval_root ({root}); allowed: a file inside it (DVC tracks eval_root)")
        return path


def _inside(path: str, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


SECTIONS: dict[str, type[Section]] = {
    "corpus": Corpus, "dedup": Dedup, "decontaminate": Decontaminate, "llm": Llm, "engine": Engine, "annotation_pool": AnnotationPool,
    "generate": Generate, "rate": Rate, "merge_preferences": MergePreferences, "train_selector": TrainSelector, "filter": Filter, "tune": Tune,
    "evaluate": Evaluate}

# keys of earlier versions, and what replaced them
RETIRED = {"merge_preferences.clinician_holdout": "splits are by figure now: set clinician_validation and "
                                                  "clinician_test",
           "merge_preferences.model_holdout": "splits are by figure now: set model_validation and model_test"}
CREDENTIAL = re.compile(r"(^|_)(api_key|key|secret|password|token)$")


class ParamsError(ValueError):
    """One or more problems in params.yaml, one line each (str(e))."""


def check(path: Path | str = PARAMS) -> dict:
    """params.yaml as a dict of sections, after checking every key; ParamsError lists every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ParamsError(f"{path}: cannot read it ({e.strerror}); run from the repository root") from None
    try:
        data, lines = yaml.safe_load(text), _key_lines(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ParamsError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected sections ({', '.join(SECTIONS)}), found {type(data).__name__}")
    problems = []

    def say(keys: tuple, what: str) -> None:
        line = lines.get(keys) or lines.get(keys[:1])
        problems.append(f"{path}:{line}: {what}" if line else f"{path}: {what}")

    for name in data.keys() - SECTIONS.keys():
        say((name,), f"unknown section {name!r}; allowed: {', '.join(SECTIONS)}")
    for name, model in SECTIONS.items():
        section = data.get(name)
        if section is None:
            say((name,), f"no section {name!r}: copy it from the repository's params.yaml")
            continue
        if not isinstance(section, dict):
            say((name,), f"{name} is {section!r}; allowed: a mapping of keys")
            continue
        secrets = [k for k in section if CREDENTIAL.search(str(k))]
        for key in secrets:
            say((name, key), f"{name}.{key} looks like a credential; keys live in the environment only "
                             "(api_key_env names the variable): remove it from params.yaml")
        try:
            model.model_validate(section)
        except ValidationError as e:
            for err in e.errors():
                if not (err["type"] == "extra_forbidden" and err["loc"][0] in secrets):
                    say((name, *err["loc"][:1]), _problem(name, model, section, err))
    if problems:
        raise ParamsError("\n".join(problems))
    return data


def _problem(name: str, model: type[Section], section: dict, err: dict) -> str:
    if not err["loc"]:  # a check across keys
        return f"{name}: {err['msg'].removeprefix('Value error, ')}"
    key = err["loc"][0]
    where = f"{name}.{'.'.join(str(x) for x in err['loc'])}"
    if err["type"] == "extra_forbidden":
        hint = RETIRED.get(f"{name}.{key}")
        return (f"{where} is gone: {hint}" if hint else
                f"{where}: unknown key; allowed: {', '.join(model.model_fields)}")
    if err["type"] == "missing":
        return f"{where} is missing: copy it from the repository's params.yaml (README: params)"
    if err["type"] == "value_error":  # a field's own check: its message says what is allowed
        return f"{where}: {err['msg'].removeprefix('Value error, ')}"
    value = section[key] if len(err["loc"]) == 1 else err["input"]
    loc = list(err["loc"])
    while len(loc) > 2 and isinstance(loc[1], int):  # into a list of mappings (evaluate.eval_sets.0.format)
        inner = get_args(model.model_fields[loc[0]].annotation)
        if not (inner and isinstance(inner[0], type) and issubclass(inner[0], BaseModel)):
            break
        model, loc = inner[0], loc[2:]
    return f"{where} is {_show(value)}; allowed: {allowed(model, loc[0], len(loc) - 1)}"


def _show(value) -> str:
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000).strip().removesuffix("...").strip()
    return text if len(text) <= 60 else text[:57] + "..."


def allowed(model: type[Section], key: str, depth: int = 0) -> str:
    """What a key takes, in words: 'a number > 0 and <= 1', 'one of offline, openai, transformers'; `depth` > 0:
    what an item of it takes (a value of a mapping, an element of a list)."""
    field = model.model_fields[key]
    annotation, metadata = field.annotation, field.metadata
    for _ in range(depth):
        annotation, metadata = get_args(annotation)[-1], ()
    return _words(annotation, metadata)


def _words(annotation, metadata=()) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _words(args[0], [*args[1:], *metadata])
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if type(None) in args:  # Optional[X]
        inner = [a for a in args if a is not type(None)][0]
        return f"{_words(inner, metadata)}, or null"
    bounds, described = [], [m.description for m in metadata if getattr(m, "description", None)]
    if described:
        return described[0]
    for m in metadata:
        for c in getattr(m, "metadata", [m]):  # a Field(...) nested in a list or dict keeps its bounds inside
            for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
                if getattr(c, attr, None) is not None:
                    bounds.append(f"{sign} {getattr(c, attr)}")
            if getattr(c, "min_length", None):
                bounds.append("not empty" if c.min_length == 1 else f"at least {c.min_length} long")
    base = {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(annotation)
    if base is None and origin is list:
        base = f"a list of {_words(args[0])}"
    if base is None and origin is dict:
        base = f"a mapping of text to {_words(args[1])}"
    return " ".join([base or str(annotation), " and ".join(bounds)]).strip()


def _key_lines(text: str) -> dict[tuple, int]:
    """{(section,): line, (section, key): line} of params.yaml, 1-based, for messages that point at the line."""
    lines = {}
    root = yaml.compose(text)
    if not isinstance(root, yaml.MappingNode):
        return lines
    for sk, sv in root.value:
        lines[(sk.value,)] = sk.start_mark.line + 1
        if isinstance(sv, yaml.MappingNode):
            for k, _ in sv.value:
                lines[(sk.value, k.value)] = k.start_mark.line + 1
    return lines


if __name__ == "__main__":  # python -m vital.params [FILE]: silent when params.yaml is right, else its problems
    import sys

    try:
        check(sys.argv[1] if len(sys.argv) > 1 else PARAMS)
    except ParamsError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
