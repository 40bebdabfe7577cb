"""What a job request becomes before it is a job: its spec (the config it would train), its quote
(dpo_lora.model.quote: memory, tokens, time), and whether it is admitted. A job whose quote does
not fit the server's devices is refused at create with a 400 naming the plan's recommendation,
unless `dpo_lora.force` is true. POST /v1/fine_tuning/quotes answers the quote itself."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from fastapi import APIRouter
from sqlalchemy import select

from dpo_lora.core import rundir
from dpo_lora.core.config import load_config
from dpo_lora.core.errors import UserError
from dpo_lora.serve import models, runfiles, wire
from dpo_lora.serve.jobspec import JobSpec, SpecError, build_spec
from dpo_lora.serve.state import Project, ServerState, State
from dpo_lora.serve.status import JobStatus
from dpo_lora.serve.store import File as StoredFile
from dpo_lora.serve.store import Job
from dpo_lora.serve.wire import ApiError
from dpo_lora.train import wandb_log

router = APIRouter()
INIT_ADAPTER = "init_adapter"  # in a job's folder: the adapter of the fine-tuned model it continues from
EARLIER_JOBS = 5  # the newest succeeded jobs on a base whose measured speed corrects its quotes


@router.post("/fine_tuning/quotes")
def create_quote(state: State, project: Project, body: wire.JobCreate) -> dict:
    """The quote of the job this body would create (extension): nothing is stored or queued."""
    with tempfile.TemporaryDirectory() as scratch:
        spec = request_spec(state, project, body, Path(scratch), quoting=True)
        return quote_of(state, body.model, spec, with_data=True)


def request_spec(
    state: ServerState, project: str, body: wire.JobCreate, directory: Path, quoting: bool = False
) -> JobSpec:
    """The request's spec for a job folder `directory`, or a 400 naming the field; its files and the
    fine-tuned model it may continue from must be `project`'s. `quoting`: the
    data is read where the uploads are stored (a job reads its own copy) and the DeepSpeed
    JSON is written into `directory` (a job writes it when its folder is made)."""
    if body.method is not None and body.method.type != "dpo":
        raise ApiError(400, f"method '{body.method.type}' is not supported; this server trains DPO", param="method")
    stored = {}
    with state.store.session() as s:
        try:  # a base, or a fine-tuned model or checkpoint to continue from (its adapter)
            source = models.resolve(state.models, s, body.model, project)
        except models.UnknownModel as err:
            raise ApiError(400, str(err), param="model") from None
        for param, file_id in (("training_file", body.training_file), ("validation_file", body.validation_file)):
            file = s.get(StoredFile, file_id) if file_id is not None else None
            file = file if file is not None and file.project == project else None  # another's: as if absent
            if file_id is not None and file is None:
                raise ApiError(400, f"invalid {param}: no file '{file_id}'", param=param)
            if file is not None and file.purpose != "fine-tune":
                raise ApiError(
                    400, f"invalid {param}: file '{file_id}' has purpose '{file.purpose}', not fine-tune", param=param
                )
            if file is not None and quoting and file.status != "processed":
                raise ApiError(400, f"invalid {param}: {file_id}: {file.status_details}", param=param)
            stored[param] = file and file.path
    hyperparameters = body.method.dpo.hyperparameters if body.method and body.method.dpo else body.hyperparameters
    try:
        spec = build_spec(
            state.base_config,
            source.base_path,
            stored["training_file"] if quoting else str(directory / "train.jsonl"),
            (stored["validation_file"] if quoting else str(directory / "eval.jsonl")) if body.validation_file else None,
            str(directory / "run"),
            str(directory / "deepspeed.json"),
            hyperparameters.model_dump(exclude_none=True) if hyperparameters else {},
            body.knobs(),
            body.seed,
            state.devices,
            # A job's folder holds what its run reads: the parent's adapter is copied in at create.
            init_adapter=source.adapter and str(source.adapter if quoting else directory / INIT_ADAPTER),
        )
    except SpecError as err:
        raise ApiError(400, str(err), param=err.param, code="invalid_config") from None
    if state.project_devices and spec.devices > state.project_devices:
        raise ApiError(400, f"dpo_lora.gpus: {spec.devices} is more than one project may hold at once on this server ({state.project_devices})", param="gpus")  # fmt: skip
    if spec.config.wandb.project and (problem := wandb_log.can_start(spec.config.wandb)):
        raise ApiError(400, f"integrations: {problem} (in the server's environment)", param="integrations")
    if quoting:
        (directory / "deepspeed.json").write_text(json.dumps(spec.deepspeed))
    return replace(spec, parent_adapter=source.adapter and str(source.adapter))


def admit(state: ServerState, model: str, spec: JobSpec) -> None:
    """A 400 naming the plan's recommendation when the job does not fit the server's devices,
    unless the request forced it. Reads the model's config.json only (no data, no weights)."""
    if spec.force or state.device_memory is None:
        return
    quoted = quote_of(state, model, spec, with_data=False)
    if not quoted["fits"]:
        raise ApiError(
            400,
            f"the job needs {quoted['per_rank_bytes'] / 2**30:.2f} GiB per device and this server's devices have "
            f"{state.device_memory / 2**30:.2f} GiB: {quoted['recommendation']} "
            "(POST /v1/fine_tuning/quotes shows the plan; dpo_lora.force: true queues it anyway)",
            param="dpo_lora",
            code="does_not_fit",
        )


def quote_of(state: ServerState, model: str, spec: JobSpec, with_data: bool) -> dict:
    """The quote of `spec` on this server's devices; `with_data`: with tokens and time, the time at
    the speed the newest succeeded jobs on this base reached where there are any."""
    try:
        return _quote(state, model, spec, with_data)
    except UserError as err:  # the base's files, the training data: what the request pointed at
        raise ApiError(400, f"cannot quote this job: {err}", code="invalid_config") from None


def _quote(state: ServerState, model: str, spec: JobSpec, with_data: bool) -> dict:
    from dpo_lora.model import quote

    device_bytes = state.device_memory if state.device_memory is not None else 1 << 62
    device = _torch_device(state.device_type)
    if not with_data:
        result = quote.quote(spec.config, device_bytes, spec.devices, device, with_data=False)
    else:
        rate = state.matmul_rates.get(spec.config.model.dtype) or _measured_rate(state, spec.config.model.dtype)
        efficiency, jobs = earlier_efficiency(state, model, rate)
        result = quote.quote(spec.config, device_bytes, spec.devices, device, efficiency, matmul_rate=rate)
        result["efficiency_from"] = f"{jobs} earlier job(s) on {model}" if jobs else "this device type's default"
    if state.device_memory is None:  # nothing to fit against: say so rather than guess
        result |= {"fits": None, "device_bytes": None, "recommendation": None}
    return result


def earlier_efficiency(state: ServerState, model: str, rate: float) -> tuple[float | None, int]:
    """(the median share of the matmul rate the newest succeeded jobs on `model` reached, their
    count); (None, 0) without any. Each job's share is its pairs/s times its pairs' FLOPs over
    the rate of its ranks."""
    from dpo_lora.model.quote import achieved_efficiency

    with state.store.session() as s:
        done = s.scalars(
            select(Job)
            .where(Job.model == model, Job.status == JobStatus.SUCCEEDED)
            .order_by(Job.finished_at.desc())
            .limit(EARLIER_JOBS)
        ).all()
    shares = []
    for job in done:
        run_dir = Path(job.directory) / "run"
        rows = [r for r in runfiles.new_rows(run_dir / rundir.METRICS, 0)[0] if r.get("kind") == "train"]
        try:
            config = load_config(str(run_dir / rundir.CONFIG))
        except Exception:  # a job folder from an older version, or cleaned up: skip it
            continue
        share = achieved_efficiency(config, rows, rate)
        if share is not None:
            shares.append(share)
    return (statistics.median(shares), len(shares)) if shares else (None, 0)


def _torch_device(device_type: str):
    import torch

    return torch.device(device_type)


def _measured_rate(state: ServerState, dtype: str) -> float:
    """The devices' dense matmul rate in `dtype`, measured once in a child process (a GPU server
    keeps no CUDA context of its own), then kept for the server's life."""
    out = subprocess.run(
        [sys.executable, "-m", "dpo_lora.model.quote", state.device_type, dtype],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    state.matmul_rates[dtype] = float(out.stdout.split()[-1])
    return state.matmul_rates[dtype]
