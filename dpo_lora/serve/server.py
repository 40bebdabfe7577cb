"""`dpo-lora serve`: the job store, the scheduler thread and the HTTP app under uvicorn; SIGHUP
re-reads --api-keys."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import threading
from pathlib import Path

from dpo_lora.core.errors import UserError
from dpo_lora.core.sizes import parse_size
from dpo_lora.serve.failover import MIN_ADOPT_AFTER_S
from dpo_lora.serve.local import LocalBackend
from dpo_lora.serve.projects import Projects, read_projects, reloader
from dpo_lora.serve.slurm import TEMPLATE, SlurmBackend, environment_problem

LOOPBACK_NAMES = ("localhost",)


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def find_models(folders: list[str]) -> dict[str, str]:
    """Model id -> folder: each folder is a model (holds config.json) or a folder of models."""
    models = {}
    for folder in map(Path, folders):
        candidates = [folder] if (folder / "config.json").is_file() else sorted(folder.glob("*/config.json"))
        for found in candidates:
            model_dir = found if found.is_dir() else found.parent
            models[model_dir.name] = str(model_dir.resolve())
    return models


def find_devices(gpus: str, cpu_slots: int) -> tuple[list[str], bool]:
    """(device names, on_gpu): CUDA indices from --gpus, or CPU slots where there is no GPU."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        if gpus != "all":
            raise UserError(f"--gpus {gpus}: this machine has no CUDA GPU (use --cpu-slots for CPU jobs)")
        return [f"cpu{i}" for i in range(cpu_slots)], False
    if gpus == "all":
        return [str(i) for i in range(count)], True
    chosen = [part.strip() for part in gpus.split(",") if part.strip()]
    if not chosen or any(not p.isdigit() or int(p) >= count for p in chosen):
        raise UserError(f"--gpus {gpus}: expected 'all' or indices below {count}, e.g. 0,1")
    return chosen, True


def serve(args) -> int:
    try:
        import uvicorn

        from dpo_lora.serve.app import create_app
        from dpo_lora.serve.inference import Inference, parse_devices
        from dpo_lora.serve.scheduler import Scheduler
        from dpo_lora.serve.state import ServerState
        from dpo_lora.serve.store import Store
    except ImportError as err:
        raise UserError(f"the service needs its extra: pip install 'dpo-lora[serve]' ({err.name} is missing)") from None

    api_key = os.environ.get("DPO_LORA_API_KEY") or None
    projects = read_projects(args.api_keys, api_key) if args.api_keys else Projects()
    if api_key is None and not projects.keys and not _is_loopback(args.host):
        raise UserError(f"--host {args.host}: set DPO_LORA_API_KEY or --api-keys to serve beyond loopback (no key: 127.0.0.1 only)")  # fmt: skip
    if args.config is not None and not Path(args.config).is_file():
        raise UserError(f"--config {args.config}: file not found")
    state_dir = Path(args.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock_state_dir(state_dir)
    _check_port_free(args.host, args.port)
    try:
        store = Store(args.db or f"sqlite:///{state_dir / 'jobs.db'}")
    except ModuleNotFoundError as err:
        raise UserError(
            f"--db: its driver is not installed ({err.name}); for PostgreSQL: pip install 'dpo-lora[postgres]'"
        ) from None
    except Exception as err:  # SQLAlchemy: a bad URL, a missing driver, a database that refuses us
        raise UserError(f"--db: cannot open the job store: {str(err).splitlines()[0]}") from None
    if args.project_devices < 0:
        raise UserError(f"--project-devices {args.project_devices}: must be 0 (no cap) or more")
    if args.project_jobs < 0:
        raise UserError(f"--project-jobs {args.project_jobs}: must be 0 (no cap) or more")
    project_storage = parse_size(args.project_storage, flag="--project-storage")
    if args.adopt_after != 0 and args.adopt_after < MIN_ADOPT_AFTER_S:
        raise UserError(
            f"--adopt-after {args.adopt_after}: must be 0 (never) or at least {MIN_ADOPT_AFTER_S:.0f} seconds"
        )
    if args.preempt_after < 0:
        raise UserError(f"--preempt-after {args.preempt_after}: must be 0 (never) or more seconds")
    if args.rate_limit < 0:
        raise UserError(f"--rate-limit {args.rate_limit}: must be 0 (no limit) or more requests a minute")
    if args.max_streams < 1:
        raise UserError(f"--max-streams {args.max_streams}: must be at least 1")
    max_upload = parse_size(args.max_upload_size, flag="--max-upload-size")
    devices, backend = _backend(args)
    slurm = args.backend == "slurm"
    device_type = "cuda" if (args.slurm_gpus_per_rank > 0 if slurm else backend.on_gpu) else "cpu"
    inference_devices = parse_devices(args.inference_devices, devices if device_type == "cuda" and not slurm else None)
    if inference_devices and inference_devices != ["cpu"]:
        devices = [d for d in devices if d not in inference_devices]  # jobs never get them
        if not devices:
            raise UserError(f"--inference-devices {args.inference_devices}: that leaves no GPU for jobs")
    if args.device_memory:
        device_memory = parse_size(args.device_memory, flag="--device-memory")
    else:  # a SLURM node's GPUs are not visible from here
        device_memory = _free_gpu_memory(devices) if device_type == "cuda" and not slurm else None
    models = find_models(args.models)
    # Stable across this server's restarts (it recovers its own runs); unique among servers sharing
    # a database (one server per state dir, and the host tells state dirs on different machines apart).
    runner = f"{socket.gethostname()}:{state_dir}"
    state = ServerState(
        store=store,
        state_dir=state_dir,
        models=models,
        devices=len(devices),
        project_devices=args.project_devices,
        project_jobs=args.project_jobs,
        project_storage=project_storage,
        device_memory=device_memory,
        device_type=device_type,
        base_config=str(Path(args.config).resolve()) if args.config else None,
        api_key=api_key,
        projects=projects,
        host=args.host,
        port=args.port,
        max_upload=max_upload,
        max_streams=args.max_streams,
        rate_per_minute=args.rate_limit,
        backend=backend,
        runner=runner,
    )
    scheduler = Scheduler(store, devices, backend, runner, grace_s=args.grace_seconds,
                          project_devices=args.project_devices, weights=lambda: state.projects.weights,
                          adopt_after_s=args.adopt_after, preempt_after_s=args.preempt_after)  # fmt: skip
    if args.inference_adapters < 1:
        raise UserError(f"--inference-adapters {args.inference_adapters}: must be at least 1")
    state.inference = Inference(
        inference_devices,
        scheduler if not slurm else None,
        max_adapters=args.inference_adapters,
        idle_s=args.inference_idle_seconds,
    )
    signal.signal(signal.SIGHUP, reloader(state, args.api_keys))
    stopping = threading.Event()
    thread = threading.Thread(target=scheduler.run_forever, args=(stopping,), name="scheduler", daemon=True)
    thread.start()
    where = f"SLURM, up to {len(devices)} ranks at once" if args.backend == "slurm" else ", ".join(devices)
    print(f"dpo-lora serve: http://{args.host}:{args.port}/v1  state {state_dir}  devices {where}  "
          f"models {', '.join(sorted(models)) or 'none'}  auth {projects.describe(api_key)}", flush=True)  # fmt: skip
    try:
        uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="warning")
    finally:
        stopping.set()  # running jobs keep running: their process groups outlive the server
        thread.join(timeout=5)
        state.inference.close()
        store.dispose()
        lock.close()
    return 0


def _free_gpu_memory(devices: list[str]) -> int:
    """The least free memory of the GPUs jobs may use, now (what a job's plan must fit)."""
    import torch

    return min(torch.cuda.mem_get_info(int(index))[0] for index in devices)


def _backend(args) -> tuple[list[str], object]:
    """(device slots, backend): this machine's GPUs or CPU slots, or rank slots on SLURM."""
    if args.backend == "slurm":
        if problem := environment_problem():
            raise UserError(problem)
        if args.slurm_max_ranks < 1:
            raise UserError(f"--slurm-max-ranks {args.slurm_max_ranks}: must be at least 1")
        backend = SlurmBackend(
            args.slurm_gpus_per_rank,
            args.slurm_cpus_per_rank,
            args.slurm_option or [],
            Path(args.slurm_script) if args.slurm_script else TEMPLATE,
        )
        return [f"slurm{i}" for i in range(args.slurm_max_ranks)], backend
    devices, on_gpu = find_devices(args.gpus, args.cpu_slots)
    return devices, LocalBackend(on_gpu)


def _lock_state_dir(state_dir: Path):
    """One server per state dir: a second scheduler would watch (and restart) the same jobs."""
    import fcntl

    handle = open(state_dir / "serve.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        raise UserError(
            f"--state-dir {state_dir}: another dpo-lora serve uses it (pid {handle.read().strip()})"
        ) from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _check_port_free(host: str, port: int) -> None:

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UserError(f"--host {host} --port {port}: cannot bind ({err.strerror})") from None
