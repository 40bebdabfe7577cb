"""The models a server knows, by the ids clients use: a base (a folder under `--models`), a
fine-tuned model (`ft:BASE:dpo-lora[:SUFFIX]:ID`, a job's final adapter) and a checkpoint of one
(`...:ckpt-step-N`, as OpenAI names checkpoint models). Each resolves to the base's folder and the
PEFT adapter on top of it; a job may start from any of them (`lora.init_adapter`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from dpo_lora.core import rundir
from dpo_lora.serve import wire
from dpo_lora.serve.status import JobStatus
from dpo_lora.serve.store import Checkpoint, Job
from dpo_lora.serve.wire import base_name

CHECKPOINT_MARK = ":ckpt-step-"


@dataclass(frozen=True)
class Source:
    base: str  # the base's name under --models
    base_path: str
    adapter: Path | None  # None: the base itself
    job_id: str | None = None  # the job that trained the adapter


class UnknownModel(Exception):
    """A model id this server does not know, or whose adapter is gone; the message says which."""


def resolve(models: dict[str, str], session, model_id: str, project: str) -> Source:
    """The base and adapter behind `model_id` (a base, or a fine-tuned model of `project`'s);
    UnknownModel when there is none."""
    if model_id in models:
        return Source(model_id, models[model_id], None)
    job_name, _, step = model_id.partition(CHECKPOINT_MARK)
    job = _job_named(session, job_name) if model_id.startswith("ft:") else None
    job = job if job is not None and job.project == project else None  # another project's: unknown here
    if job is None or base_name(job_name) not in models:
        known = ", ".join(sorted(models)) or "none (start the server with --models DIR)"
        raise UnknownModel(f"model '{model_id}' is not one this server knows (bases: {known}; or a job's ft: model)")
    base = base_name(job_name)
    if not step:
        if job.status != JobStatus.SUCCEEDED:
            raise UnknownModel(f"model '{model_id}': its job {job.id} is {job.status}; name one of its checkpoints")
        adapter = Path(job.directory) / "run" / rundir.ADAPTER
    else:
        found = session.scalar(
            select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step_number == _step(step, model_id))
        )
        if found is None:
            raise UnknownModel(f"model '{model_id}': job {job.id} has no checkpoint at step {step}")
        adapter = Path(found.path) / rundir.ADAPTER
    if not (adapter / rundir.ADAPTER_CONFIG).is_file():
        raise UnknownModel(f"model '{model_id}': its adapter is gone from the server (pruned or deleted)")
    return Source(base, models[base], adapter, job.id)


def _job_named(session, name: str) -> Job | None:
    """The job whose fine-tuned model is (or, while it runs, will be) `name`."""
    found = session.scalar(select(Job).where(Job.fine_tuned_model == name))
    if found is not None:
        return found
    short = name.rsplit(":", 1)[-1]
    if not short.isalnum():
        return None
    for job in session.scalars(select(Job).where(Job.id.startswith(f"ftjob-{short}"))):
        if wire.fine_tuned_name(job) == name:
            return job
    return None


def _step(text: str, model_id: str) -> int:
    if not text.isdigit():
        raise UnknownModel(f"model '{model_id}': '{text}' is not a step number")
    return int(text)
