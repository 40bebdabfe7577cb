"""What a run wrote, turned into the store's rows: its new metrics rows become events (its health
warnings `warn`-level ones), its checkpoints become checkpoint objects and its tokens the job's
count; at the end, its metrics become the job's result file. The scheduler calls it for the jobs
it runs."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from dpo_lora.core import rundir
from dpo_lora.core.rundir import RowKind, row_kind
from dpo_lora.serve import runfiles, wire
from dpo_lora.serve.store import Checkpoint, Event, File, Job, Store, new_id, now

BEST_CHECKPOINT_KEY = "dpo_lora_best_checkpoint"  # in the job's metadata: the best checkpoint's model id


def new_rows(store: Store, s, job: Job) -> None:
    """Turn the run's new metrics rows into events, checkpoints and the token count."""
    run_dir = Path(job.directory) / "run"
    rows, job.metrics_offset, job.metrics_last_line = runfiles.new_rows(
        run_dir / rundir.METRICS, job.metrics_offset, job.metrics_last_line
    )
    for row in rows:
        step = int(row.get("step", 0))
        kind = row_kind(row)
        if (
            kind == RowKind.CHECKPOINT
            and s.scalar(select(Checkpoint.id).where(Checkpoint.job_id == job.id, Checkpoint.step_number == step))
            is None
        ):
            _add_checkpoint(store, s, job, step)
        elif kind == RowKind.TRAIN and step > job.last_step:
            job.last_step, job.trained_tokens = step, (job.trained_tokens or 0) + int(row.get("tokens", 0))
            message = f"Step {step}: training loss={row['loss']:.4f}, reward accuracy={row['rewards/accuracies']:.2f}"
            store.add_event(s, job.id, message, data=row)
        elif kind == RowKind.EVAL and not _has_eval_event(s, job.id, step):
            store.add_event(s, job.id, f"Step {step}: validation loss={row['eval/loss']:.4f}", data=row)
        elif kind == RowKind.SKIPPED and step > job.last_step:
            job.last_step = step
            store.add_event(s, job.id, f"Step {step} skipped: {row['skipped']}", level="warn")
        elif kind == RowKind.HEALTH and not _has_message(s, job.id, row["message"]):  # again after a resume
            store.add_event(s, job.id, row["message"], level="warn")


def _add_checkpoint(store: Store, s, job: Job, step: int) -> None:
    metrics = {"step": float(step)}
    for event in s.scalars(_metrics_events(job.id)):
        if event.data.get("step") == step and "loss" in event.data:
            metrics.update(train_loss=event.data["loss"], train_mean_reward_accuracy=event.data["rewards/accuracies"])
        if event.data.get("step") == step and "eval/loss" in event.data:
            metrics.update(
                valid_loss=event.data["eval/loss"], valid_mean_reward_accuracy=event.data["eval/rewards/accuracies"]
            )
    run_dir = Path(job.directory) / "run"
    best = rundir.best_checkpoint(run_dir)
    if best is not None and best[0] == step:  # the run's best by train.best_metric: this one, no other
        metrics["best"] = True
        for other in s.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id)):
            other.metrics = {**other.metrics, "best": False}
        # fine_tuned_model stays the final adapter; the metadata names the best checkpoint's model
        model = f"{job.fine_tuned_model or wire.fine_tuned_name(job)}:ckpt-step-{step}"
        job.job_metadata = {**(job.job_metadata or {}), BEST_CHECKPOINT_KEY: model}
    folder = rundir.step_folder(run_dir, step)
    s.add(
        Checkpoint(
            id=new_id("ftckpt"), job_id=job.id, step_number=step, created_at=now(), metrics=metrics, path=str(folder)
        )
    )
    store.add_event(
        s, job.id, f"Checkpoint created at step {step}" + (" (the best so far)" if metrics.get("best") else "")
    )


def result_file(s, directory: Path, project: str) -> str:
    """The run's metrics as CSV, stored as a `fine-tune-results` file of the job's project; its id."""
    results = directory / "results.csv"
    results.write_bytes(runfiles.results_csv(directory / "run" / rundir.METRICS))
    file_id = new_id("file")
    s.add(
        File(
            id=file_id,
            filename="step_metrics.csv",
            bytes=results.stat().st_size,
            purpose="fine-tune-results",
            created_at=now(),
            status="processed",
            path=str(results),
            project=project,
        )
    )
    return file_id


def _metrics_events(job_id: str):
    """The job's newest metrics events (where a checkpoint's and an eval's rows are looked up)."""
    return select(Event).where(Event.job_id == job_id, Event.type == "metrics").order_by(Event.seq.desc()).limit(50)


def _has_message(s, job_id: str, message: str) -> bool:
    return s.scalar(select(Event.id).where(Event.job_id == job_id, Event.message == message).limit(1)) is not None


def _has_eval_event(s, job_id: str, step: int) -> bool:
    return any(
        event.data.get("step") == step and "eval/loss" in event.data for event in s.scalars(_metrics_events(job_id))
    )
