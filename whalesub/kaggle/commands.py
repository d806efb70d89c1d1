"""``whalesub kaggle build | upload | submit``: the typer sub-app (parsing only; logic in the modules)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer


def kaggle_app(guarded: Callable, log_to_stderr: Callable[[], None]) -> typer.Typer:
    """The ``kaggle`` sub-app; ``guarded`` turns WhalesubError into a message and exit status 2."""
    app = typer.Typer(
        help="Kaggle: package models and wheels as datasets, build the offline kernel, upload, push, submit.",
        no_args_is_help=True,
    )

    @app.command("build")
    @guarded
    def build_command(
        models: list[Path] | None = typer.Argument(
            None,
            help="Export folders (`whalesub export`) or training runs, "
            "one per fold; their vectors are combined like `embed --model`. None with --predict.",
        ),
        owner: str = typer.Option(
            ..., "--owner", help="Your Kaggle user name (owner of the datasets/kernel)."
        ),
        out: Path = typer.Option(Path("kernels/build"), "--out", help="Build folder."),
        threshold: float | None = typer.Option(
            None, "--threshold", help="new_individual threshold to submit with."
        ),
        threshold_json: Path | None = typer.Option(
            None, "--threshold-json", help="Or: `whalesub tune --json` output; its best threshold."
        ),
        predict: Path | None = typer.Option(
            None,
            "--predict",
            help="Or: a `whalesub predict` output folder: package its decision.json (models, TTA, "
            "gallery, scoring, centres, new_individual rule) as it was submitted.",
        ),
        competition: str = typer.Option("happy-whale-and-dolphin", "--competition", help="Competition slug."),
        prefix: str = typer.Option(
            "whalesub", "--prefix", help="Titles: '<prefix> models|wheels|boxes|inference'."
        ),
        k: int = typer.Option(100, "--k", help="Neighbours searched per query."),
        flip_gallery: bool = typer.Option(
            True,
            "--flip-gallery/--no-flip-gallery",
            help="Gallery with both views per image (embed --flip-views) or one (--tta none).",
        ),
        query_tta: str = typer.Option("flip", "--query-tta", help="Test images: flip or none."),
        fp16: bool = typer.Option(False, "--fp16", help="Run model_fp16.onnx in the kernel."),
        batch_size: int = typer.Option(32, "--batch-size", help="Images per model call in the kernel."),
        boxes: Path | None = typer.Option(
            None, "--boxes", help="Box CSV (train and test images): the boxes dataset."
        ),
        box_type: str | None = typer.Option(None, "--box-type", help="Which box_type of --boxes to crop."),
        box_conf: float | None = typer.Option(
            None, "--box-conf", help="Box confidence cut (default: training's)."
        ),
        gallery: Path | None = typer.Option(
            None,
            "--gallery",
            help="Precomputed gallery .npz (same models): the kernel then embeds only the test images.",
        ),
        package: list[str] | None = typer.Option(
            None,
            "--package",
            help="Wheel to ship (repeat; replaces the defaults faiss-gpu-cu12, 'onnxruntime-gpu<1.27').",
        ),
        no_extra_wheels: bool = typer.Option(
            False,
            "--no-extra-wheels",
            help="Ship only whalesub's wheel (an image that already has FAISS and ONNX Runtime).",
        ),
        python_version: str = typer.Option("3.12", "--python-version", help="Kaggle's Python."),
        platform: list[str] | None = typer.Option(
            None,
            "--platform",
            help="Wheel platform tags (repeat; default manylinux 2014/2_17/2_27/2_28 x86_64).",
        ),
        wheels_from: Path | None = typer.Option(
            None, "--wheels-from", help="Take the wheels from this folder instead of downloading them."
        ),
        whalesub_wheel: Path | None = typer.Option(None, "--whalesub-wheel", help="A built whalesub wheel."),
        source: Path | None = typer.Option(
            None, "--source", help="whalesub checkout to build the wheel from (default: the one running)."
        ),
        machine_shape: str = typer.Option("NvidiaTeslaT4", "--machine-shape", help="Kernel GPU."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous build in --out."),
    ) -> None:
        """Build the models, wheels (and boxes) datasets and the offline kernel; check every Kaggle rule."""
        from whalesub.kaggle.package import BuildOptions, build_package
        from whalesub.kaggle.wheels import DEFAULT_PACKAGES, DEFAULT_PLATFORMS

        log_to_stderr()
        opts = BuildOptions(
            owner=owner,
            competition=competition,
            prefix=prefix,
            threshold=threshold,
            threshold_json=threshold_json,
            k=k,
            gallery_tta="none",
            flip_gallery=flip_gallery,
            query_tta=query_tta,
            fp16=fp16,
            batch_size=batch_size,
            box_type=box_type,
            box_conf=box_conf,
            boxes=boxes,
            gallery=gallery,
            predict=predict,
            packages=[] if no_extra_wheels else list(package or DEFAULT_PACKAGES),
            python_version=python_version,
            platforms=tuple(platform) if platform else DEFAULT_PLATFORMS,
            whalesub_wheel=whalesub_wheel,
            source=source,
            wheels_from=wheels_from,
            machine_shape=machine_shape,
        )
        s = build_package(list(models or []), out, opts, overwrite=overwrite)
        typer.echo(
            f"built {s['out']}: datasets {', '.join(s['datasets'])}; wheels {' '.join(s['install'])}; "
            + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in s["bytes"].items())
        )

    @app.command("upload")
    @guarded
    def upload_command(
        build: Path = typer.Argument(
            Path("kernels/build"), help="Build folder from `whalesub kaggle build`."
        ),
        message: str = typer.Option("whalesub build", "-m", "--message", help="Version notes."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Check everything, upload nothing."),
        wait: bool = typer.Option(True, "--wait/--no-wait", help="Poll the kernel until its run completes."),
        output: Path | None = typer.Option(None, "--output", help="Download the kernel's output here."),
        interval: float = typer.Option(10.0, "--interval", help="Seconds between status polls."),
    ) -> None:
        """Create or version each dataset (subfolders zipped), wait until ready, push the kernel, follow it.

        Nothing is uploaded unless the whole build passes its checks and credentials are found.
        """
        import json

        from whalesub.kaggle.upload import upload_build

        log_to_stderr()
        r = upload_build(build, message, dry_run=dry_run, wait=wait, output=output, interval_s=interval)
        typer.echo(json.dumps(r, indent=1))

    @app.command("submit")
    @guarded
    def submit_command(
        csv: Path = typer.Argument(..., help="submission.csv to submit."),
        competition: str = typer.Option("happy-whale-and-dolphin", "--competition", help="Competition slug."),
        message: str = typer.Option(..., "-m", "--message", help="Submission description."),
        sample: Path = typer.Option(..., "--sample", help="sample_submission.csv (every test image once)."),
        train_csv: Path | None = typer.Option(None, "--train-csv", help="train.csv: labels must be its ids."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Validate only."),
    ) -> None:
        """Validate a submission CSV, then submit it (competitions that take a CSV, as Happywhale did)."""
        from whalesub.kaggle.upload import submit_file

        log_to_stderr()
        s = submit_file(csv, competition, message, sample, train_csv, dry_run=dry_run)
        typer.echo(
            f"OK: {csv}: {s['n_rows']} rows"
            + (f"; {s['submitted']}" if "submitted" in s else " (dry run: not submitted)")
        )

    return app
