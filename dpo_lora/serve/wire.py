"""The wire format: request bodies (pydantic), response objects and errors in OpenAI's shapes.

Every object carries each field the `openai` client's types declare, so `client.fine_tuning.jobs`
and `client.files` parse them unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dpo_lora.serve import runfiles
from dpo_lora.serve.store import Checkpoint, Event, Export, File, Job

ORGANIZATION = "dpo-lora"
MAX_EXTRA_DEPTH = 4  # dpo_lora {section: {key: [values]}} and a little room for a clear error


class ApiError(Exception):
    """An error response: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def not_found(kind: str, object_id: str) -> ApiError:
    return ApiError(404, f"No {kind} found with id '{object_id}'", param="id", code="not_found")


class DpoHyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float | Literal["auto"] | None = None
    batch_size: int | Literal["auto"] | None = None
    learning_rate_multiplier: float | Literal["auto"] | None = None
    n_epochs: float | Literal["auto"] | None = None


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class Method(BaseModel):
    type: Literal["supervised", "dpo", "reinforcement"]
    dpo: DpoMethod | None = None


class WandbSettings(BaseModel):
    """OpenAI's W&B integration: the run's project, display name, entity and tags (dpo-lora's wandb.*)."""

    model_config = ConfigDict(extra="forbid")
    project: str
    name: str | None = None
    entity: str | None = None
    tags: list[str] | None = None


class Integration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["wandb"]
    wandb: WandbSettings


WANDB_FIELDS = ("project", "name", "entity", "tags")


class JobCreate(BaseModel):
    """POST /v1/fine_tuning/jobs; `dpo_lora` holds this server's own knobs (the client's extra_body)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: DpoHyperparameters | None = None  # deprecated by OpenAI in favour of method
    method: Method | None = None
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)  # OpenAI's range
    suffix: str | None = Field(default=None, max_length=64)
    metadata: dict[str, str] | None = None
    integrations: list[Integration] | None = Field(default=None, max_length=1)  # one W&B run per job
    dpo_lora: dict[str, Any] = Field(default_factory=dict)

    def knobs(self) -> dict[str, Any]:
        """The job's dpo-lora knobs: `dpo_lora` as given, and a W&B integration as wandb.* keys."""
        if not self.integrations:
            return self.dpo_lora
        settings = self.integrations[0].wandb
        given = {f"wandb.{name}": getattr(settings, name) for name in WANDB_FIELDS if getattr(settings, name) is not None}  # fmt: skip
        if set(_wandb_knobs(self.dpo_lora)) & set(WANDB_FIELDS):  # wandb.mode may come with an integration
            raise ApiError(400, "integrations and dpo_lora's wandb keys both name the W&B run; give one", param="integrations")  # fmt: skip
        return {**self.dpo_lora, **given}

    @field_validator("dpo_lora")
    @classmethod
    def _shallow(cls, value: dict) -> dict:
        """The config tree is section.key deep: a deeper object is refused before anything reads it."""
        level, depth = [value], 0
        while level:
            depth += 1
            if depth > MAX_EXTRA_DEPTH:
                raise ValueError(f"nests deeper than {MAX_EXTRA_DEPTH} levels")
            level = [
                v
                for node in level
                for v in (node.values() if isinstance(node, dict) else node)
                if isinstance(v, (dict, list))
            ]
        return value


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    anchor: Literal["created_at"]
    seconds: int


class UploadCreate(BaseModel):
    """POST /v1/uploads (OpenAI's Uploads): a file of `bytes` bytes, sent in parts."""

    model_config = ConfigDict(extra="forbid")
    bytes: int
    filename: str = Field(max_length=512)
    mime_type: str = Field(max_length=128)
    purpose: str
    expires_after: ExpiresAfter | None = None  # the File's, once completed


class UploadComplete(BaseModel):
    model_config = ConfigDict(extra="forbid")
    part_ids: list[str] = Field(max_length=10_000)
    md5: str | None = None


class ExportCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_into: Literal["original", "dequantized"] = "original"
    dtype: Literal["bfloat16", "float16", "float32"] | None = None
    checkpoint: str | None = None  # an ftckpt- id; the final adapter when unset
    format: Literal["safetensors", "gguf"] = "safetensors"  # gguf: one file for llama.cpp/Ollama
    gguf_type: Literal["f16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_0"] = "f16"


def file_object(file: File) -> dict:
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": file.created_at,
        "filename": file.filename,
        "purpose": file.purpose,
        "status": file.status,
        "status_details": file.status_details,
        "expires_at": file.expires_at,
    }


def upload_object(upload, file: File | None = None) -> dict:
    return {
        "id": upload.id,
        "object": "upload",
        "bytes": upload.bytes,
        "created_at": upload.created_at,
        "expires_at": upload.expires_at,
        "filename": upload.filename,
        "purpose": upload.purpose,
        "status": upload.status,
        "file": None if file is None else file_object(file),
    }


def job_object(job: Job) -> dict:
    hyper = job.hyperparameters
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": job.created_at,
        "model": job.model,
        "organization_id": ORGANIZATION,
        "status": job.status,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "fine_tuned_model": job.fine_tuned_model,
        "finished_at": job.finished_at,
        "error": job.error,
        "result_files": job.result_files or [],
        "trained_tokens": job.trained_tokens,
        "seed": job.seed,
        "estimated_finish": _estimated_finish(job),
        "integrations": _integrations(job.extra),
        "metadata": job.job_metadata,
        "suffix": job.suffix,
        "hyperparameters": {k: hyper[k] for k in ("batch_size", "learning_rate_multiplier", "n_epochs")},
        "method": {"type": "dpo", "dpo": {"hyperparameters": hyper}},
        "dpo_lora": {**job.extra, "devices": job.devices_wanted},
    }


def _wandb_knobs(knobs: dict) -> dict:
    """The wandb section of dpo-lora knobs given nested ({"wandb": {...}}) or dotted ("wandb.project")."""
    nested = knobs.get("wandb") if isinstance(knobs.get("wandb"), dict) else {}
    return {**nested, **{k.split(".", 1)[1]: v for k, v in knobs.items() if k.startswith("wandb.")}}


def _integrations(knobs: dict) -> list[dict]:
    """The job's W&B integration as OpenAI shows it, from its wandb knobs."""
    wandb = _wandb_knobs(knobs)
    if not wandb.get("project"):
        return []
    return [{"type": "wandb", "wandb": {name: wandb.get(name) for name in WANDB_FIELDS}}]


def _estimated_finish(job: Job) -> int | None:
    """While the job runs: when its run will end at the pairs/s of its newest metrics row."""
    if job.status != "running":
        return None
    progress = runfiles.progress(Path(job.directory) / "run", running=True)
    return progress and progress["estimated_finish"]


def event_object(event: Event) -> dict:
    return {
        "id": event.id,
        "object": "fine_tuning.job.event",
        "created_at": event.created_at,
        "level": event.level,
        "message": event.message,
        "type": event.type,
        "data": event.data or {},
    }


def base_name(model_id: str) -> str:
    """The base a model id is built on: itself for a base, the second field of an `ft:` id."""
    return model_id.split(":")[1] if model_id.startswith("ft:") and model_id.count(":") >= 2 else model_id


def fine_tuned_name(job: Job) -> str:
    """`ft:BASE:dpo-lora[:SUFFIX]:ID`, the shape of OpenAI's fine-tuned model names (BASE is the
    root base when the job started from a fine-tuned model, as OpenAI names those)."""
    suffix = f":{job.suffix}" if job.suffix else ""
    return f"ft:{base_name(job.model)}:dpo-lora{suffix}:{job.id.removeprefix('ftjob-')[:8]}"


def checkpoint_object(checkpoint: Checkpoint, job: Job) -> dict:
    model = job.fine_tuned_model or fine_tuned_name(job)
    return {
        "id": checkpoint.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": checkpoint.created_at,
        "fine_tuning_job_id": job.id,
        "step_number": checkpoint.step_number,
        "metrics": checkpoint.metrics,
        "fine_tuned_model_checkpoint": f"{model}:ckpt-step-{checkpoint.step_number}",
    }


def export_object(export: Export) -> dict:
    return {
        "id": export.id,
        "object": "fine_tuning.job.export",
        "created_at": export.created_at,
        "fine_tuning_job_id": export.job_id,
        "status": export.status,
        "error": export.error,
        "finished_at": export.finished_at,
        "merge_into": export.options["merge_into"],
        "format": export.options.get("format", "safetensors"),
        # Where to download it once it has succeeded (a tar of the model folder); the folder's
        # place on the server is not the client's business.
        "content_url": f"/v1/fine_tuning/jobs/{export.job_id}/exports/{export.id}/content",
    }


def page(items: list[dict], has_more: bool) -> dict:
    return {
        "object": "list",
        "data": items,
        "has_more": has_more,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
    }
