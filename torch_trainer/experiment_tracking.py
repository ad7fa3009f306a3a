"""Weights & Biases logging that can never block or fail a training run.

``--wandb auto`` logs online when this machine has W&B credentials (WANDB_API_KEY or ~/.netrc), otherwise offline into
the run folder (``<run>/wandb/offline-run-*``; upload later with ``wandb sync``). Any W&B error turns logging off with
one warning; training goes on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

W_AND_B_HOST = "https://api.wandb.ai"


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        from wandb.sdk.lib import wbauth

        return bool(wbauth.read_netrc_auth(host=os.environ.get("WANDB_BASE_URL", W_AND_B_HOST)))
    except Exception:  # noqa: BLE001 - a private helper that may move between wandb versions
        return False


def resolve_mode(requested: str) -> str:
    if os.environ.get("WANDB_MODE") in ("disabled", "offline") and requested in ("auto", "online"):
        return os.environ["WANDB_MODE"]  # the user's environment says so explicitly
    if requested == "auto":
        return "online" if has_credentials() else "offline"
    return requested


class ExperimentTracker:
    def __init__(self, requested_mode: str, records_dir: Path, config: dict[str, Any], project: str,
                 run_name: str):
        """``records_dir``: where W&B keeps its files; it must be named ``wandb`` (W&B appends that name to the
        ``dir`` it is given, so it is given the parent)."""
        self.run = None
        self.mode = resolve_mode(requested_mode)
        if self.mode == "disabled":
            return
        try:
            import wandb

            # A short init timeout: an unreachable server must not hold training up.
            settings = wandb.Settings(init_timeout=30, silent=True, x_disable_stats=True)
            try:
                self.run = wandb.init(project=project, name=run_name, dir=str(records_dir.parent), config=config,
                                      mode=self.mode, settings=settings, reinit="create_new")
            except Exception as err:  # noqa: BLE001 - e.g. credentials but no network: keep the record locally
                if self.mode != "online":
                    raise
                logger.warning("W&B online failed (%s); logging offline into %s instead", type(err).__name__,
                               records_dir)
                self.mode = "offline"
                self.run = wandb.init(project=project, name=run_name, dir=str(records_dir.parent), config=config,
                                      mode="offline", settings=settings, reinit="create_new")
            logger.info("W&B logging %s%s", self.mode, f" into {records_dir}" if self.mode == "offline" else "")
        except Exception as err:  # noqa: BLE001 - W&B problems are never fatal to training
            self._give_up(err)

    def _give_up(self, err: BaseException) -> None:
        logger.warning("W&B logging turned off: %s: %s", type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        self.run = None

    def log(self, values: dict[str, Any], step: Optional[int] = None) -> None:
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in values.items() if v is not None}, step=step)
        except Exception as err:  # noqa: BLE001
            self._give_up(err)

    def log_images(self, key: str, paths: list[Path], step: Optional[int] = None) -> None:
        if self.run is None or not paths:
            return
        try:
            import wandb

            self.run.log({key: [wandb.Image(str(p), caption=p.name) for p in paths]}, step=step)
        except Exception as err:  # noqa: BLE001
            self._give_up(err)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            for key, value in values.items():
                if isinstance(value, (int, float, str)):
                    self.run.summary[key] = value
        except Exception as err:  # noqa: BLE001
            self._give_up(err)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as err:  # noqa: BLE001
            self._give_up(err)
        self.run = None
