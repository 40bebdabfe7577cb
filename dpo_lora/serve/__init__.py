"""`dpo-lora serve`: an OpenAI-compatible fine-tuning jobs service.

The service talks to runs only through the config it writes, the process it starts and the files
a run writes (metrics.jsonl, checkpoints, adapter); it never imports the trainer. Inference loads
what runs wrote with the model package's loaders (dpo_lora.model.load, .decode).

    status.py     JobStatus and StopRequest (the store's enum columns)
    store.py      the durable job store (SQLAlchemy; SQLite in WAL mode by default)
    lifecycle.py  the named transitions of a job's status, each with its event
    wire.py       request bodies, response objects and errors in OpenAI's shapes
    jobspec.py    a create request -> the run's config (validated by the config tree)
    admission.py  a job request's spec, quote and refusal before it is a job
    projects.py   the --api-keys file: each project's key and weight, re-read on SIGHUP
    runfiles.py   what a run wrote: metrics rows, checkpoints, adapter, its last error
    ingest.py     a run's new metrics rows and checkpoints -> events and checkpoint objects
    processes.py  starting, identifying, signalling a run's process group
    supervise.py  the process that waits for a run and records its exit status
    local.py      the local backend: runs as process groups on this machine's GPUs or CPU slots
    slurm.py      the SLURM backend: runs as SLURM jobs (sbatch, squeue, scancel)
    scheduler.py  validate, queue, dispatch onto free devices, watch, stop, recover
    preemption.py which running job a starved project's queued job takes devices back from
    failover.py   heartbeats, and adopting the runs of a server gone silent
    guard.py      auth, body caps, Host/Origin checks: before any route reads a body
    state.py      the server's state as a route dependency, and the lookups routes share
    models.py     model ids (bases, ft: models, checkpoints) -> the base folder and adapter
    text_stream.py  an answer's tokens as settled text, cut at its first stop string
    engine.py     one loaded base with its adapters by name: batches requests, decodes, streams
    answers.py    the rows an engine decodes together and what each request hears of them
    logprobs_wire.py  log-probs in OpenAI's shapes, from the engine's scored tokens
    inference.py  which engine answers a model, and on which device (GPUs lent by the scheduler)
    files_api.py, uploads_api.py, jobs_api.py, extensions_api.py, completions_api.py   the /v1 routes
    dashboard.py  GET / (dashboard.html) and the progress and chart routes it reads
    app.py        the FastAPI app: the guard, the routers, the error shapes
    server.py     `dpo-lora serve`: wires them together under uvicorn
"""
