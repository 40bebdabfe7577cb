"""The run's metrics rows to Weights & Biases, where `wandb.project` is set (rank 0 only).

One W&B run per output folder: its id is kept in OUTPUT_DIR/wandb_run_id, so a resumed run logs to
the same W&B run. The rows a resume rewinds (written after its checkpoint) were already logged;
W&B drops rows whose step is not past its last one, so those steps keep their first values. The
resolved config goes in as the run's config; a row's numbers go in as they go to TensorBoard, and a
health warning (dpo_lora/train/monitors.py) also as a W&B alert.
"""

from __future__ import annotations

import netrc
import os
import secrets
from pathlib import Path

from dpo_lora.core.errors import UserError
from dpo_lora.core.rundir import WANDB_RUN_ID


class WandbLog:
    def __init__(self, output_dir: Path, settings, config: dict) -> None:
        """`settings`: the config's `wandb` section; `config`: the resolved config tree."""
        try:
            import wandb
        except ImportError:
            raise UserError("wandb.project is set, but wandb is not installed: pip install wandb") from None
        id_file = output_dir / WANDB_RUN_ID
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)  # W&B's id alphabet
        id_file.write_text(run_id + "\n")
        try:
            self.run = wandb.init(
                project=settings.project,
                entity=settings.entity,
                name=settings.name or output_dir.resolve().name,
                tags=settings.tags,
                mode=None if settings.mode == "auto" else settings.mode,  # None: W&B reads WANDB_MODE
                dir=str(output_dir),
                id=run_id,
                resume="allow",
                config=config,
            )
        except Exception as err:  # no key, no network, a project the key can't write to
            first = (str(err) or type(err).__name__).splitlines()[0]
            raise UserError(f"wandb.project: W&B did not start ({first}); wandb.mode=offline logs without it") from None

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def alert(self, monitor: str, message: str) -> None:
        """A health warning as a W&B alert (W&B's UI, and its Slack or email where the user set them up)."""
        import wandb

        self.run.alert(title=f"dpo-lora: {monitor}", text=message, level=wandb.AlertLevel.WARN)

    def close(self) -> None:
        self.run.finish()


def can_start(settings) -> str | None:
    """Why a run with these `wandb` settings could not log here (no key for online mode), or None:
    what the service checks before it queues a job with a W&B integration."""
    mode = settings.mode if settings.mode != "auto" else os.environ.get("WANDB_MODE", "online")
    if mode in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return None
    try:  # `wandb login` stores the key in ~/.netrc (or $NETRC)
        if netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai"):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return "no W&B key here: set WANDB_API_KEY (or run `wandb login`), or log offline with wandb.mode=offline"
