"""The spec: one validated description of a specialist, loaded from YAML.

Every stage reads it. Unknown keys are errors, and every error is reported at once as
``path.to.field: what is wrong``. Relative paths inside the spec (data, eval sets, schema files,
a local base model) are relative to the file that names them; ``registry`` is relative to the
working dir, so every command run from one project shares one local registry.

Two loading directives are resolved before validation and leave no trace in the resolved spec:
``extends: base.yaml`` (this file deep-merged over its base: mappings merge, anything else is
replaced) and ``profiles: {NAME: {...}}`` with ``profile: NAME`` (or ``--profile NAME``, which
is ``--set profile=NAME``) selecting one, merged over the file before the ``--set`` overrides.
"""

from __future__ import annotations

import copy
import difflib
import glob
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from infra.registry import DEFAULT_REGISTRY, parse_id

CHAT_ROLES = ("system", "user", "assistant", "tool")
CSV_ROLES = ("system", "user", "assistant", "id", "label", "meta")


class SpecError(ValueError):
    """A spec that does not validate; ``errors`` holds one ``path: message`` line per problem."""

    def __init__(self, errors: list[str], source: str = "spec"):
        self.errors = errors
        self.source = source
        super().__init__(f"{source}: {len(errors)} error(s)\n" + "\n".join(f"  {e}" for e in errors))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


# -- contract ----------------------------------------------------------------------------------
class Tool(Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"},
                                       description="JSON Schema of the call's arguments")

    @field_validator("parameters")
    @classmethod
    def _schema_ok(cls, v: dict) -> dict:
        _check_json_schema(v)
        return v


class Contract(Strict):
    """What a valid output is. One definition serves the factory, eval and the live canary."""

    type: Literal["text", "label", "json", "tool_call"] = "text"
    labels: list[str] | None = None
    schema_: dict[str, Any] | str | None = Field(None, alias="schema",
                                                 description="JSON Schema, inline or a path to a .json file")
    tools: list[Tool] = Field(default_factory=list)
    constrained_decoding: bool = Field(False, description="decode under the contract (json schema or labels): "
                                       "eval, predict and serving only produce outputs the schema allows")

    @model_validator(mode="after")
    def _by_type(self) -> "Contract":
        if self.constrained_decoding and self.type not in ("json", "label"):
            raise ValueError(f"contract.constrained_decoding: works for json and label contracts, "
                             f"not {self.type!r}")
        if self.type == "label":
            if not self.labels:
                raise ValueError("contract.type 'label' needs contract.labels (a non-empty list)")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("contract.labels: has duplicates")
        if self.type == "json" and self.schema_ is None:
            raise ValueError("contract.type 'json' needs contract.schema (inline or a path to a .json file)")
        if isinstance(self.schema_, dict):
            _check_json_schema(self.schema_)
        if self.type == "tool_call" and not self.tools:
            raise ValueError("contract.type 'tool_call' needs contract.tools (name + parameters schema)")
        return self


def _check_json_schema(schema: dict) -> None:
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ValueError(f"not a valid JSON Schema: {e.message}") from None


# -- data ----------------------------------------------------------------------------------------
class Split(Strict):
    train: float = Field(0.8, ge=0, le=1)
    dev: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _sums_to_one(self) -> "Split":
        if abs(self.train + self.dev + self.test - 1.0) > 1e-6:
            raise ValueError(f"train + dev + test must sum to 1 (got {self.train + self.dev + self.test:g})")
        return self


class Dedupe(Strict):
    exact: bool = True
    near: bool = True
    threshold: float = Field(0.8, gt=0, le=1, description="estimated Jaccard similarity for near-duplicates")
    num_perm: int = Field(128, ge=16, le=1024)
    shingle: int = Field(3, ge=1, le=16, description="word n-gram size for MinHash shingles")


class Teacher(Strict):
    engine: Literal["hf", "vllm", "http"] = "http"
    model: str | None = None
    url: str | None = None
    api_key_env: str | None = Field(None, description="name of the env var holding the API key")
    per_seed: int = Field(2, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.8, ge=0)
    seeds: int | None = Field(None, ge=1, description="use at most this many seed rows (default: all)")
    difficulties: list[str] = Field(default_factory=lambda: ["easy", "medium", "hard"])
    edge_cases: list[str] = Field(default_factory=lambda: ["typos", "ambiguous request", "very short message",
                                                           "several requests in one message"])
    judge_url: str | None = Field(None, description="rubric judge endpoint (default: the teacher's)")
    judge_model: str | None = None
    min_total: int = Field(26, ge=7, le=35, description="accept a candidate at rubric total >= this (7 criteria, 1-5)")
    min_correctness: int = Field(4, ge=1, le=5)
    min_format: int = Field(5, ge=1, le=5)
    min_safety: int = Field(4, ge=1, le=5)


class RequestLogs(Strict):
    """Served traffic as a factory source (the flywheel): the request logs serving wrote to the registry."""
    task: str | None = Field(None, description="whose logs (default: this spec's task)")
    since: float | str | None = Field(None, description="only rows logged at or after this (epoch seconds or ISO time)")
    label: Literal["none", "teacher", "judge"] = Field(
        "none", description="none: the served answer is the row's answer; teacher: data.teacher answers the logged "
        "prompt instead; judge: eval.judge scores the served answer and rows under min_score are rejected "
        "(judge:below_min) — each through every gate (contract, PII, dedupe against training, leakage against eval)")
    min_score: float = Field(70, ge=0, le=100, description="label: judge — the lowest judge score (0-100) kept")

    @field_validator("since")
    @classmethod
    def _when(cls, v: Any) -> Any:
        if isinstance(v, str):
            from datetime import datetime

            try:
                datetime.fromisoformat(v)
            except ValueError:
                raise ValueError(f"{v!r} is not epoch seconds or an ISO time (2026-01-31T12:00:00+00:00)") from None
        return v


class Data(Strict):
    train: list[str] = Field(default_factory=list, description="paths or globs (JSONL, JSONL.gz, CSV)")
    format: Literal["auto", "messages", "chat", "instruction", "csv", "preference"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict, description="CSV column -> role")
    eval: dict[str, str] = Field(default_factory=dict, description="eval set name -> path; never trained on")
    split: Split = Field(default_factory=Split)
    dedupe: Dedupe = Field(default_factory=Dedupe)
    pii: Literal["scrub", "reject", "keep"] = "scrub"
    min_chars: int = Field(2, ge=0, description="shorter user/assistant turns are rejected")
    balance_field: str | None = Field(None, description="metadata field to count and cap by (e.g. intent)")
    cap_per_class: int | None = Field(None, ge=1)
    leak_phrases: list[str] = Field(default_factory=list, description="extra phrases that reject an answer as "
                                    "leaked generation instructions (case-insensitive; built-ins always apply)")
    teacher: Teacher | None = None
    request_logs: RequestLogs | None = None

    @field_validator("train", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("columns")
    @classmethod
    def _roles(cls, v: dict[str, str]) -> dict[str, str]:
        bad = {col: role for col, role in v.items() if role not in CSV_ROLES}
        if bad:
            col, role = next(iter(bad.items()))
            raise ValueError(f"column {col!r} maps to {role!r}; roles are {', '.join(CSV_ROLES)}")
        return v

    @field_validator("eval")
    @classmethod
    def _eval_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not re.match(r"^[A-Za-z0-9_-]+$", name):
                raise ValueError(f"eval set name {name!r}: use letters, digits, '-' or '_'")
        return v


# -- model and training --------------------------------------------------------------------------
class ModelSpec(Strict):
    base: str = Field(description="a local folder, a hub name, or a registry ref (id or TASK@ALIAS)")
    template: Literal["auto", "chatml", "alpaca", "simple"] = "auto"
    system_prompt: str | None = None
    max_seq_len: int = Field(1024, ge=16)
    gguf_file: str | None = Field(None, description="load base weights from this GGUF file in the folder")
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    license: str | None = Field(None, description="the base model's licence (SPDX id), for the model card")


class LoRA(Strict):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    # 0 by default (as LLaMA-Factory and torchtune): PEFT's dropout draws a fresh mask for every
    # adapted module's input, which cost a fifth of a CPU step (165 -> 209 tokens/s, SmolLM2-135M r16)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    last_layers: int | None = Field(None, ge=1, description="adapt only the last N decoder layers: backward "
                                    "stops below them (the lower layers stay the base's), a faster step")


class DeepSpeed(Strict):
    stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"

    @model_validator(mode="after")
    def _offload(self) -> "DeepSpeed":
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage 3")
        if self.offload_optimizer and self.stage < 2:
            raise ValueError("offload_optimizer needs stage 2 or 3")
        return self


class DPO(Strict):
    """Direct preference optimisation (train.method: dpo) on the dataset's chosen/rejected pairs."""
    beta: float = Field(0.1, gt=0, description="how far the policy may move from the reference model")
    loss: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid", description="sigmoid (DPO), ipo (squared, "
                                                      "length-normalised log-probs) or hinge (SLiC)")
    weights: Literal["lora", "full"] = Field("lora", description="train LoRA adapters (the reference is the "
                                             "base with them disabled) or every weight (a frozen copy is the "
                                             "reference)")


class Train(Strict):
    method: Literal["lora", "qlora", "full", "dpo"] = "lora"
    workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0, description="fractional on small machines (see STACK-NOTES)")
    threads_per_worker: int | None = Field(None, ge=1, description="torch CPU threads per worker (default: the "
                                           "node's cores divided by the workers on it)")
    max_steps: int | None = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0)
    packing: bool | None = Field(None, description="pack several examples per row; null: on where the model "
                                  "honours position-id boundaries (llama family and most decoders)")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="compute precision: bf16 autocast "
                                                      "over fp32 weights, fp32, or auto (a cached matmul "
                                                      "probe picks bf16 where it is clearly faster)")
    progress: Literal["auto", "bar", "lines"] = Field("auto", description="rank 0 progress: a rich bar on a "
                                                      "terminal, plain lines when piped (stderr)")
    lr: float = Field(2e-4, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    micro_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    eval_every: int | None = Field(None, ge=1)
    early_stopping_patience: int | None = Field(None, ge=1)
    save_every: int | None = Field(None, ge=1)
    gradient_checkpointing: bool = False
    keep_checkpoints: int = Field(2, ge=1, description="Ray Train checkpoints kept in storage")
    max_failures: int = Field(0, ge=0, description="worker-group restarts from the latest checkpoint")
    repair_share: float | None = Field(None, gt=0, lt=1, description="share of the training examples that are a "
                                       "repair round's rows (meta.repair), reached by repeating them; "
                                       "null: as many as the dataset holds")
    lora: LoRA = Field(default_factory=LoRA)
    deepspeed: DeepSpeed | None = None
    dpo: DPO = Field(default_factory=DPO)

    @model_validator(mode="after")
    def _qlora_needs_gpu(self) -> "Train":
        if self.method == "qlora" and not self.use_gpu:
            raise ValueError("method 'qlora' quantises the base to 4 bits with bitsandbytes, which needs a GPU: "
                             "set train.use_gpu: true, or use method 'lora' on CPU")
        if self.method == "dpo" and self.repair_share is not None:
            raise ValueError("train.repair_share mixes a repair round's SFT rows; method 'dpo' trains on "
                             "preference pairs, which have none")
        return self


# -- eval, gates, deployment ---------------------------------------------------------------------
class Judge(Strict):
    engine: Literal["hf", "vllm", "http"] = "http"
    model: str | None = None
    url: str | None = None
    api_key_env: str | None = None
    rubric: str | None = None


class FanOut(Strict):
    """When eval/predict/judge generation fans out over Ray actors (see pipelines.fanout)."""
    mode: Literal["auto", "always", "never"] = Field("auto", description="auto: at min_rows rows, or on "
                                                     "an attached cluster (RAY_ADDRESS)")
    min_rows: int = Field(2000, ge=1)
    actors: int | None = Field(None, ge=1, description="default: the cluster's CPUs / cpus_per_actor")
    cpus_per_actor: float = Field(0.5, gt=0, description="fractional: whole CPUs per actor starve Ray Data's "
                                  "reads on small nodes (STACK-NOTES hang #1)")
    shard_rows: int = Field(64, ge=1, description="rows per actor call; keep it a multiple of batch_size")


class Eval(Strict):
    engine: Literal["auto", "hf", "vllm", "http"] = "auto"
    url: str | None = None
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1)
    seed: int = 0
    baselines: list[str] = Field(default_factory=list, description="'base', 'prompted-base' or model refs")
    judge: Judge | None = None
    bootstrap: int = Field(1000, ge=0, description="resamples for confidence intervals")
    fewshot: int = Field(3, ge=0, description="train examples shown to the 'prompted-base' baseline")
    limit: int | None = Field(None, ge=1, description="evaluate only the first N rows of each set")
    min_valid_rate: float | None = Field(0.99, ge=0, le=1, description="implicit gate on valid_rate for "
                                         "json/tool_call contracts unless a gate names it; null: off")
    fan_out: FanOut = Field(default_factory=FanOut)


class Gate(Strict):
    metric: str
    eval_set: str | None = Field(None, description="default: every eval set")
    min: float | None = None
    max: float | None = None
    beats: str | None = Field(None, description="a baseline the model must beat by `margin`")
    margin: float = 0.0
    against: str | None = Field(None, description="the baseline a per-example metric such as "
                                "`regressions` compares with (e.g. production)")
    on: Literal["value", "lower_bound", "upper_bound"] = Field(
        "value", description="what min/max compare: the point value or an end of its 95% interval "
        "(lower_bound: the rate must be above min with confidence); with beats, lower_bound asks the "
        "paired delta's interval to clear the margin")

    @model_validator(mode="before")
    @classmethod
    def _yaml_on_key(cls, data: Any) -> Any:
        # YAML 1.1 reads a bare `on:` key as the boolean true
        if isinstance(data, dict) and True in data and "on" not in data:
            data = {("on" if k is True else k): v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _has_bound(self) -> "Gate":
        if self.min is None and self.max is None and self.beats is None:
            raise ValueError("a gate needs at least one of min, max, beats")
        return self


class Deploy(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, gt=0)
    canary_weight: float = Field(0.1, ge=0, le=1)
    min_requests: int = Field(100, ge=1, description="live requests before a canary can be promoted")
    max_error_rate: float = Field(0.02, ge=0, le=1)
    max_validity_drop: float = Field(0.02, ge=0, le=1, description="contract validity vs production")
    max_p95_ratio: float = Field(1.5, gt=0, description="canary p95 latency / production p95")
    auto_promote: bool = False
    auto_rollback: bool = True
    max_concurrency: int = Field(32, ge=1, description="in-flight requests before 503")
    max_body_bytes: int = Field(1_000_000, ge=1024)
    engine: Literal["auto", "hf", "vllm"] = Field("auto", description="engine inside each model replica")
    share_base: bool = Field(True, description="a canary or shadow that is a LoRA adapter of production's base "
                             "is served by production's vLLM replica (multi-LoRA: one copy of the base weights); "
                             "on vLLM's CPU build LoRA decodes ~4x slower than an adapter served alone (merged)")
    threads_per_replica: int | None = Field(None, ge=1, description="torch threads of a CPU model replica "
                                            "(default: Ray's, one per whole CPU requested, at least 1); keep "
                                            "the sum over a node's replicas at or under its cores")
    max_new_tokens: int = Field(512, ge=1, description="largest max_tokens a request may ask for (else 400)")
    max_prompt_tokens: int = Field(4096, ge=1, description="longer prompts get 400 (counted in the model's "
                                   "tokens, its saved system prompt included)")
    rollback_min_requests: int = Field(20, ge=1, description="live canary requests before a breach can "
                                                               "roll it back")
    request_timeout_s: float = Field(60.0, gt=0, description="a replica slower than this answers 504")
    shadow_timeout_s: float = Field(30.0, gt=0, description="a shadow answer later than this is logged as a timeout")
    log_requests: bool = True
    log_flush_rows: int = Field(200, ge=1, description="request-log rows per registry manifest")
    node_hour_usd: float | None = Field(None, ge=0, description="price of one serving node for an hour; the "
                                        "model card turns measured throughput into cost per 1k requests")


class Repair(Strict):
    """One repair round of `crucible run`: eval -> repair rows for the top failure clusters -> retrain -> eval."""
    rounds: int = Field(0, ge=0, le=3, description="repair rounds after the first eval (0: off)")
    per_cluster: int = Field(40, ge=1, description="repair rows made per repaired cluster")
    clusters: int = Field(3, ge=1, description="repair the clusters with the most failures, this many")
    seed: int = 0
    teacher: bool = Field(True, description="also teacher rewrites where data.teacher is set")
    retrain: Literal["fresh", "continue"] = Field("fresh", description="fresh: the spec's base, trained on the "
                                                  "repaired dataset; continue: the repaired model's LoRA merged "
                                                  "into its base, then a new LoRA on the repaired dataset")
    max_steps: int | None = Field(None, ge=1, description="training steps of the retrain (default: train.max_steps)")


class Loop(Strict):
    repair: Repair = Field(default_factory=Repair)


class Spec(Strict):
    task: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$",
                      description="lowercase name; artifacts and aliases are grouped by it")
    description: str = ""
    contract: Contract = Field(default_factory=Contract)
    data: Data = Field(default_factory=Data)
    model: ModelSpec
    train: Train = Field(default_factory=Train)
    eval: Eval = Field(default_factory=Eval)
    gates: list[Gate] = Field(default_factory=list)
    deploy: Deploy = Field(default_factory=Deploy)
    loop: Loop = Field(default_factory=Loop)
    registry: str = DEFAULT_REGISTRY
    # How it was loaded (not part of the spec or its hash): the selected profile, the files merged.
    _profile: str | None = PrivateAttr(None)
    _sources: list[str] = PrivateAttr(default_factory=list)

    @property
    def profile(self) -> str | None:
        return self._profile

    @property
    def sources(self) -> list[str]:
        """The spec file and every file it extends, the file itself first."""
        return list(self._sources)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def json_schema_doc(self) -> dict | None:
        """The contract's JSON Schema as a dict (loaded from its file if it was a path)."""
        s = self.contract.schema_
        return json.loads(Path(s).read_text()) if isinstance(s, str) else s


# -- loading ---------------------------------------------------------------------------------------
def apply_overrides(raw: dict, overrides: list[str]) -> tuple[dict, list[str]]:
    """Apply ``dotted.key=VALUE`` strings (VALUE parsed as YAML); returns (raw, errors)."""
    errors = []
    for item in overrides or []:
        if "=" not in item:
            errors.append(f"--set {item!r}: expected dotted.key=VALUE")
            continue
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as e:
            errors.append(f"--set {key}: VALUE is not valid YAML ({e.problem})")
            continue
        parts = key.strip().split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    errors.append(f"--set {key}: {'.'.join(parts[:i]) or 'spec'} is a list; "
                                  f"{part!r} is not an index below {len(node)}")
                    break
                part = int(part)
            elif not isinstance(node, dict):
                errors.append(f"--set {key}: {'.'.join(parts[:i])} is a value, not a section")
                break
            if last:
                node[part] = parsed
            elif isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
                node = node[part]
            else:
                node = node[part]
    return raw, errors


def _format_errors(exc: ValidationError, raw: dict) -> list[str]:
    out = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if p not in ("function-after", "function-before")]
        path = ""
        for p in loc:
            path += f"[{p}]" if isinstance(p, int) else (f".{p}" if path else str(p))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            known = _known_keys(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            msg = "unknown key" + (f" (did you mean '{close[0]}'?)" if close else "") + \
                  (f"; known keys: {', '.join(known)}" if known else "")
        elif err["type"] == "missing":
            msg = "required"
        out.append(f"{path or 'spec'}: {msg}")
    return out


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as ``X``, ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if found := _submodel(arg):
            return found
    return None


def _known_keys(loc: list) -> list[str]:
    model: type[BaseModel] | None = Spec
    for p in (p for p in loc if not isinstance(p, int)):
        fields = {f.alias or name: f for name, f in model.model_fields.items()}
        model = _submodel(fields[p].annotation) if p in fields else None
        if model is None:
            return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _resolve_paths(spec: Spec, base: Path) -> Spec:
    def rel(p: str) -> str:
        if "://" in p:
            return p
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    spec.data.train = [rel(p) for p in spec.data.train]
    spec.data.eval = {k: rel(v) for k, v in spec.data.eval.items()}
    if isinstance(spec.contract.schema_, str):
        spec.contract.schema_ = rel(spec.contract.schema_)
    b = spec.model.base
    if not (parse_id(b) or "@" in b) and (b.startswith((".", "/", "~")) or (base / b).exists()):
        spec.model.base = rel(b)
    return spec


def check_files(spec: Spec) -> list[str]:
    """Problems with the files a spec names (missing data, unreadable schema); empty when fine."""
    errors = []
    for i, pattern in enumerate(spec.data.train):
        if "://" not in pattern and not glob.glob(pattern, recursive=True):
            errors.append(f"data.train[{i}]: no file matches {pattern}")
    for name, path in spec.data.eval.items():
        if "://" not in path and not Path(path).is_file():
            errors.append(f"data.eval.{name}: no such file {path}")
    if isinstance(spec.contract.schema_, str):
        try:
            _check_json_schema(json.loads(Path(spec.contract.schema_).read_text()))
        except (OSError, json.JSONDecodeError, ValueError) as e:
            errors.append(f"contract.schema: {spec.contract.schema_}: {e}")
    b = spec.model.base
    if b.startswith("/") and not Path(b).is_dir():
        errors.append(f"model.base: no such folder {b}")
    for i, gate in enumerate(spec.gates):
        if gate.eval_set and spec.data.eval and gate.eval_set not in spec.data.eval:
            errors.append(f"gates[{i}].eval_set: {gate.eval_set!r} is not one of data.eval ({', '.join(spec.data.eval)})")
    return errors


PROFILE_KEYS = ("extends", "profile", "profiles")  # loading directives, never in the resolved spec


def read_spec_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> tuple[dict, list[Path]]:
    """A spec file as a raw mapping with its ``extends`` chain merged in (paths in a base made
    absolute from the base's own folder); returns (raw, files read, the file itself first)."""
    path = Path(path)
    where = " (extended by " + " <- ".join(str(p) for p in reversed(_chain)) + ")" if _chain else ""
    if path.resolve() in _chain:
        raise SpecError([f"extends: cycle {' -> '.join(str(p) for p in (*_chain, path.resolve()))}"], str(_chain[0]))
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SpecError([f"cannot read spec{where}: {e.strerror}"], str(path)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SpecError([f"not valid YAML{at}{where}: {getattr(e, 'problem', e)}"], str(path)) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError([f"spec: the top level must be a mapping of sections{where}"], str(path))
    if _chain:  # a base: its relative paths are relative to its own folder, not the extending file's
        _rebase(raw, path.resolve().parent)
    files = [path.resolve()]
    parent = raw.pop("extends", None)
    if parent is None:
        return raw, files
    if not isinstance(parent, str) or not parent:
        raise SpecError([f"extends: expected the path of a base spec file, got {parent!r}"], str(path))
    base_path = Path(parent).expanduser()
    base_path = base_path if base_path.is_absolute() else path.resolve().parent / base_path
    base, base_files = read_spec_file(base_path, (*_chain, path.resolve()))
    return deep_merge(base, raw), files + base_files


def deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``: mappings merge key by key, anything else (lists too) is replaced."""
    merged = dict(base)
    for k, v in top.items():
        merged[k] = deep_merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def _rebase(raw: dict, folder: Path) -> None:
    """Make a base file's relative paths absolute (data, eval sets, schema, a local model folder),
    in the file and in its profiles, so they keep meaning what they meant in that file."""
    profiles = raw.get("profiles")
    sections = [raw] + ([p for p in profiles.values() if isinstance(p, dict)] if isinstance(profiles, dict) else [])

    def rel(p: Any) -> Any:
        if not isinstance(p, str) or "://" in p or Path(p).expanduser().is_absolute():
            return p
        return str((folder / p).resolve())

    for sec in sections:
        data, contract, model = (sec.get(k) if isinstance(sec.get(k), dict) else {} for k in ("data", "contract", "model"))
        if isinstance(data.get("train"), list):
            data["train"] = [rel(p) for p in data["train"]]
        elif isinstance(data.get("train"), str):
            data["train"] = rel(data["train"])
        if isinstance(data.get("eval"), dict):
            data["eval"] = {k: rel(v) for k, v in data["eval"].items()}
        if isinstance(contract.get("schema"), str):
            contract["schema"] = rel(contract["schema"])
        b = model.get("base")
        if isinstance(b, str) and not (parse_id(b) or "@" in b) and (b.startswith((".", "~")) or (folder / b).exists()):
            model["base"] = rel(b)


def select_profile(raw: dict, overrides: list[str]) -> tuple[dict, list[str], str | None, list[str]]:
    """Merge the selected profile into ``raw``. The selection is the file's ``profile`` key, or the
    last ``profile=NAME`` override (``--profile NAME``). Every profile is validated over the file,
    so a typo in one not selected today is still caught. Returns (raw, the other overrides,
    the profile name, errors)."""
    rest, inside, errors = [], [], []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key == "profile":
            value = item.split("=", 1)[1].strip() if "=" in item else ""
            raw["profile"] = yaml.safe_load(value) if value else None
        else:  # `--set profiles.cpu.x=…` edits a profile before it is merged; the rest apply after
            (inside if key.startswith("profiles.") else rest).append(item)
    raw, errors = apply_overrides(raw, inside)
    chosen = raw.pop("profile", None)
    profiles = raw.pop("profiles", None) or {}
    if not isinstance(profiles, dict):
        return raw, rest, None, [f"profiles: expected a mapping of profile name -> spec keys, got {type(profiles).__name__}"]
    for name, body in profiles.items():
        if not isinstance(body, dict):
            errors.append(f"profiles.{name}: expected a mapping of spec keys, got {type(body).__name__}")
        elif bad := [k for k in PROFILE_KEYS if k in body]:
            errors.append(f"profiles.{name}.{bad[0]}: not allowed inside a profile")
        else:
            errors += [f"profiles.{name}.{e}" for e in _profile_errors(raw, body)]
    if chosen is None:
        return raw, rest, None, errors
    if not isinstance(chosen, str) or chosen not in profiles:
        known = ", ".join(map(str, profiles)) or "none defined"
        return raw, rest, None, errors + [f"profile: {chosen!r} is not one of the spec's profiles ({known})"]
    if isinstance(profiles[chosen], dict):
        raw = deep_merge(raw, profiles[chosen])
    return raw, rest, chosen, errors


def _profile_errors(raw: dict, body: dict) -> list[str]:
    """Errors of ``body`` merged over ``raw`` that come from keys the profile sets."""
    try:
        Spec.model_validate(deep_merge(raw, body))
        return []
    except ValidationError as e:
        merged = deep_merge(raw, body)
        return [msg for err, msg in zip(e.errors(), _format_errors(e, merged)) if _sets(body, err["loc"])]


def _sets(body: Any, loc: tuple) -> bool:
    """Whether a profile sets the field at ``loc`` (or a section above it)."""
    for p in loc:
        if isinstance(body, dict) and p in body:
            body = body[p]
        elif isinstance(body, list) and isinstance(p, int) and p < len(body):
            body = body[p]
        else:
            return False
        if not isinstance(body, (dict, list)):
            return True
    return True


def load_spec(path: str | Path, overrides: list[str] | None = None, *, check_paths: bool = False) -> Spec:
    """Read (with its ``extends`` chain), select a profile, override, validate and resolve a spec;
    raises ``SpecError`` listing every problem."""
    path = Path(path)
    raw, files = read_spec_file(path)
    spec = spec_from_dict(raw, overrides, base_dir=path.resolve().parent, source=str(path), check_paths=check_paths)
    spec._sources = [str(f) for f in files]
    return spec


def spec_from_dict(raw: dict, overrides: list[str] | None = None, *, base_dir: Path | None = None,
                   source: str = "spec", check_paths: bool = False) -> Spec:
    if "extends" in raw:
        raise SpecError(["extends: only a spec file can extend another (use load_spec)"], source)
    raw, overrides, profile, errors = select_profile(copy.deepcopy(raw), list(overrides or []))
    raw, override_errors = apply_overrides(raw, overrides)
    errors += override_errors
    spec = None
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as e:
        # a selected profile's own mistakes are already listed under profiles.NAME
        errors += [m for m in _format_errors(e, raw) if f"profiles.{profile}.{m}" not in errors]
    if spec is not None:
        spec = _resolve_paths(spec, base_dir or Path.cwd())
        spec._profile = profile
        if check_paths:
            errors += check_files(spec)
    if errors:
        raise SpecError(list(dict.fromkeys(errors)), source)
    return spec
