"""``whalesub kaggle upload`` / ``submit``: check, then upload the datasets, push and follow the kernel.

Nothing is uploaded before the whole build passes :func:`whalesub.kaggle.metadata.check_build`
and credentials are found; ``dry_run`` stops after those checks and returns the plan.
"""

from __future__ import annotations

import logging
from pathlib import Path

from whalesub.core.errors import ConfigError
from whalesub.kaggle import KERNEL_DIR
from whalesub.kaggle.client import (
    download_output,
    find_credentials,
    kaggle_command,
    push_kernel,
    submit_csv,
    upload_dataset,
    wait_kernel,
)
from whalesub.kaggle.metadata import check_build
from whalesub.ranking.submission import check_submission_file

log = logging.getLogger(__name__)


def upload_build(
    build: Path,
    message: str,
    *,
    dry_run: bool = False,
    wait: bool = True,
    output: Path | None = None,
    interval_s: float = 10,
    dataset_timeout_s: float = 1800,
    kernel_timeout_s: float = 9 * 3600,
) -> dict:
    """Upload every dataset of ``build`` (create or new version), push its kernel, wait, download output.

    Returns ``{"datasets": {sub: ref}, "kernel": ref, "actions": {...}, "pushed": text,
    "status": ..., "output": [files]}`` (``dry_run``: the checked plan and where credentials are).
    """
    if not build.is_dir():
        raise ConfigError(f"{build} is not a build folder: make one with `whalesub kaggle build`")
    checked = check_build(build)
    result: dict = {"datasets": checked["datasets"], "kernel": checked["kernel"]}
    if dry_run:
        try:
            result["credentials"] = find_credentials()
        except ConfigError as exc:
            result["credentials"] = f"none ({exc})"
        result["dry_run"] = True
        return result
    result["credentials"] = find_credentials()
    kaggle_command()  # the client is installed
    result["actions"] = {
        sub: upload_dataset(build / sub, ref, message, dataset_timeout_s, interval_s)
        for sub, ref in checked["datasets"].items()
    }
    result["pushed"] = push_kernel(build / KERNEL_DIR)
    if wait or output is not None:
        result["status"] = wait_kernel(checked["kernel"], kernel_timeout_s, interval_s)
    if output is not None:
        result["output"] = [str(p) for p in download_output(checked["kernel"], output)]
    return result


def submit_file(
    csv: Path,
    competition: str,
    message: str,
    sample: Path,
    train_csv: Path | None = None,
    dry_run: bool = False,
) -> dict:
    """Validate ``csv`` against ``sample`` (and ``train_csv``), then submit it to ``competition``."""
    summary = check_submission_file(csv, sample, train_csv)
    if not dry_run:
        summary["submitted"] = submit_csv(csv, competition, message)
    return summary
