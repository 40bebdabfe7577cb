"""Which engine answers a model, and on which device it runs.

A fine-tuned model runs on its base loaded as its job trained it (the job's `model.*` settings);
a base alone runs as the server's config would train it. Runs whose bases load alike share one
engine, so their requests batch together.

Placement (`dpo-lora serve --inference-devices`):
- `cpu`, or GPU indices such as `2,3`: engines go there, the least used first; the listed GPUs are
  taken out of the jobs' pool at start, so no job ever shares them.
- `auto` (the default): the CPU on a CPU server. On a GPU server, a GPU that no job holds,
  borrowed from the scheduler when the engine loads (no job starts on it meanwhile) and handed back
  when the engine goes idle. With every GPU held by jobs, a request is a 503 to retry.
"""

from __future__ import annotations

import threading
from pathlib import Path

from dpo_lora.core.config import load_config
from dpo_lora.serve.engine import Engine, EngineError, model_key
from dpo_lora.serve.models import Source

AUTO = "auto"


def parse_devices(text: str, gpus: list[str] | None) -> list[str] | None:
    """--inference-devices: ['cpu'], GPU indices out of `gpus` (the server's GPUs, None without),
    or None for auto."""
    from dpo_lora.core.errors import UserError

    if text == AUTO:
        return None
    if text == "cpu":
        return ["cpu"]
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    if not chosen or gpus is None or any(c not in gpus for c in chosen):
        where = f"GPU indices among {','.join(gpus)}" if gpus else "no GPU here"
        raise UserError(f"--inference-devices {text}: expected auto, cpu or {where}")
    return chosen


class Inference:
    def __init__(self, devices: list[str] | None, scheduler=None, *, max_adapters: int = 8, max_bases: int = 2,
                 idle_s: float = 600.0) -> None:  # fmt: skip
        self.devices, self.scheduler = devices, scheduler  # scheduler: lends GPUs under auto
        self.max_adapters, self.max_bases, self.idle_s = max_adapters, max_bases, idle_s
        self.engines: dict[str, Engine] = {}  # model_key -> engine, least recently used first
        self.lock = threading.Lock()

    def engine(self, model_config) -> Engine:
        key = model_key(model_config)
        with self.lock:
            engine = self.engines.pop(key, None)
            if engine is None or engine.closed:
                while len(self.engines) >= self.max_bases:
                    self.engines.pop(next(iter(self.engines))).close()
                engine = self._make(model_config)
            self.engines[key] = engine  # now the most recently used
            return engine

    def _make(self, model_config) -> Engine:
        engine = None

        def release() -> None:  # a borrowed GPU goes back to the jobs
            if self.devices is None and engine.device_name not in (None, "cpu"):
                self.scheduler.give_back(engine.device_name)

        engine = Engine(model_config, self._place, max_adapters=self.max_adapters, idle_s=self.idle_s, on_unload=release)  # fmt: skip
        return engine

    def _place(self) -> str:
        if self.devices is not None:
            in_use = [e.device_name for e in list(self.engines.values())]
            return min(self.devices, key=in_use.count)
        if self.scheduler is None or not getattr(self.scheduler.backend, "on_gpu", False):
            return "cpu"
        lent = self.scheduler.lend()
        if lent is None:
            raise EngineError("every GPU is held by a training job; retry later, or start the server with --inference-devices", 503)  # fmt: skip
        return lent

    def close(self) -> None:
        with self.lock:
            for engine in self.engines.values():
                engine.close()
            self.engines.clear()


def model_settings(source: Source, job_directory: str | None, base_config: str | None):
    """The `model.*` settings to load `source` with: its job's (as trained), else the server's."""
    if source.adapter is not None and job_directory and (Path(job_directory) / "config.yaml").is_file():
        return load_config(Path(job_directory) / "config.yaml").model
    return load_config(base_config, {"model.path": source.base_path}).model
