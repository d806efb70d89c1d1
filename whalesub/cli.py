"""The ``whalesub`` command line.

Each command parses its arguments, checks them, and calls one library function; no logic lives
here. Heavy libraries (torch, timm, onnx, faiss) are imported inside the functions that need
them so that ``whalesub --help`` is instant. A :class:`~whalesub.core.errors.WhalesubError` becomes
one readable message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path  # noqa: F401  (used by the command signatures below)

import typer

from whalesub.core.errors import ConfigError, WhalesubError

app = typer.Typer(
    name="whalesub",
    help="Identify individual animals from photographs: embed, rank, threshold, submit, score.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        import whalesub

        typer.echo(f"whalesub {whalesub.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print whalesub's version (from git in a checkout, else the "
                                 "installed wheel's) and exit."),
) -> None:
    pass


def guarded(fn):
    """Turn WhalesubError into one message on stderr and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except WhalesubError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # disk full, permission denied, ...: the OS message names the path
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


RAY_HELP = ("Spread the chunks over Ray: local:N (a Ray on this machine with N workers), auto (the "
            "cluster joined with `ray start`) or HOST:PORT; needs the 'cluster' extra.")


RAY_CPUS_HELP = ("CPUs per Ray worker (default: the machine's CPUs / N with local:N, a node's CPUs on a "
                 "cluster without GPUs, a GPU's share of its node's CPUs with GPUs).")


def _ray_runner(address: str | None, cpus: int | None = None):
    """A context holding the Ray runner of ``--ray ADDRESS`` (None without --ray)."""
    import contextlib

    if address is None:
        if cpus is not None:
            raise ConfigError("--ray-cpus sets the CPUs of each Ray worker: it needs --ray")
        return contextlib.nullcontext(None)
    from whalesub.embedding.distributed import RayRunner

    return RayRunner(address, cpus_per_worker=cpus)


def one_writer(what: str):
    """Hold the lock of the command's ``--out`` while it runs (``whalesub.core.locks``): a second
    process writing the same output stops at once with one line naming this one."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            from whalesub.core.locks import output_lock

            with output_lock(kwargs["out"], f"{what} {kwargs['out']}"):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


def _log_info_to_stderr() -> None:
    """INFO logs on stderr (a no-op when logging is already configured)."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


# Commands are added below, one section per command; keep each body short and call the library.
# --- submit / tune (whalesub.ranking.rank, whalesub.ranking.threshold) --------------------------------------
@app.command("submit")
@guarded
@one_writer("submission")
def submit_command(
    gallery: Path = typer.Option(..., "--gallery", help="Gallery embeddings .npz (train images; an image "
                                 "may repeat: several views)."),
    queries: Path = typer.Option(..., "--queries", help="Query embeddings .npz (test images)."),
    train_csv: Path = typer.Option(..., "--train-csv", help="train.csv: gallery image -> individual_id."),
    threshold: float | None = typer.Option(None, "--threshold", help="Cosine score of new_individual, in "
                                           "[-1, 1] (pick it with `whalesub tune`)."),
    new_share: float | None = typer.Option(None, "--new-share", help="Instead of --threshold: choose it on "
                                           "these queries so this share of rows get new_individual first "
                                           "(e.g. 0.165)."),
    out: Path = typer.Option(..., "--out", help="Submission CSV to write (atomically)."),
    k: int = typer.Option(100, "--k", help="Neighbours searched per query."),
    sample: Path | None = typer.Option(None, "--sample", help="sample_submission.csv (or test image folder): "
                                       "rows follow its order and every test image must be embedded once."),
    thresholds: Path | None = typer.Option(None, "--thresholds", help="Instead of --threshold: per-species "
                                           "file of `whalesub tune --per-species`."),
    centres: list[Path] | None = typer.Option(None, "--centres", help="class_centres.npz of export; repeat "
                                              "in the order of embed's --model."),
    knn_ratio: float = typer.Option(1.0, "--knn-ratio", help="r: score = r x kNN + (1 - r) x centre cosine "
                                    "(1: kNN only, needs no --centres)."),
    centres_from: str = typer.Option("gallery", "--centres-from", help="Blend centres (--knn-ratio < 1): "
                                     "gallery = every individual's mean gallery vector (default, one scale); "
                                     "head = the heads' class centres (--centres), "
                                     "refused if one lacks an individual."),
    centre_k: int | None = typer.Option(None, "--centre-k", help="Centres searched per query (default --k)."),
    candidates_out: Path | None = typer.Option(None, "--candidates-out", help="Also write each query's "
                                               "top candidates: image,rank,individual_id,score (CSV)."),
    candidates_n: int = typer.Option(5, "--candidates-n", help="Candidates per query in --candidates-out."),
    threshold_knn_ratio: float | None = typer.Option(
        None, "--threshold-knn-ratio", help="The --knn-ratio the --threshold was tuned at (default 1, kNN); "
        "required, equal, with --threshold and --knn-ratio < 1."),
) -> None:
    """Rank every query against the gallery and write a validated submission.

    Exact cosine top-k (FAISS, GPU when present) -> best cosine per individual -> new_individual
    inserted with score THRESHOLD (an individual scoring exactly THRESHOLD stays ahead of it) -> five
    distinct labels per row. Gallery and queries must share dimension and model fingerprint.
    Give --threshold, or --new-share to set it from the queries' own scores. A threshold must come
    from the same scoring: a --thresholds file tuned at another --knn-ratio is refused, and a bare
    --threshold with --knn-ratio < 1 needs --threshold-knn-ratio (tune with the same --knn-ratio).
    """
    from whalesub.workflows.submit import submit_files

    _log_info_to_stderr()
    s = submit_files(gallery, queries, train_csv, threshold, out, k=k, sample=sample, new_share=new_share,
                     thresholds=thresholds, centres=centres, knn_ratio=knn_ratio, centre_k=centre_k,
                     candidates_out=candidates_out, candidates_n=candidates_n,
                     threshold_knn_ratio=threshold_knn_ratio, centres_from=centres_from)
    typer.echo(f"wrote {s['out']}: {s['rows']} rows; new_individual first in {s['new_first']} "
               f"({100 * s['new_first'] / max(s['rows'], 1):.1f}%), present in {s['new_any']}; "
               f"gallery {s['gallery_vectors']} vectors of {s['individuals']} individuals, k={s['k']}, "
               f"threshold={s['threshold']:g}")


@app.command("tune")
@guarded
def tune_command(
    gallery: Path | None = typer.Option(None, "--gallery", help="Gallery embeddings .npz."),
    queries: Path | None = typer.Option(None, "--queries", help="Labelled query embeddings .npz."),
    train_csv: Path = typer.Option(..., "--train-csv", help="train.csv: gallery image -> individual_id."),
    truth: Path | None = typer.Option(None, "--truth", help="Truth CSV of the queries: image,individual_id "
                                      "(new_individual for animals absent from the gallery)."),
    run: list[Path] | None = typer.Option(None, "--run", help="Instead of --gallery/--queries/--truth: a "
                                          "training run folder; pools every fold's out-of-fold queries, each "
                                          "ranked against its own fold's gallery (repeatable)."),
    grid: str = typer.Option("0.0:1.0:0.02", "--grid", help="Thresholds: start:stop:step (stop included) "
                             "or a comma list."),
    target_new_share: float | None = typer.Option(None, "--target-new-share", help="Also report the "
                                                  "threshold that puts new_individual first in this share "
                                                  "of rows (e.g. 0.165)."),
    k: int = typer.Option(100, "--k", help="Neighbours searched per query."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    per_species: Path | None = typer.Option(None, "--per-species", help="Also tune a threshold per species "
                                            "(of the top candidate); write this JSON for submit."),
    k0: float = typer.Option(20.0, "--k0", help="Shrinkage: a species with n queries gets n/(n+k0) x its own "
                             "best + k0/(n+k0) x the global threshold."),
    centres: list[Path] | None = typer.Option(None, "--centres", help="class_centres.npz of export; repeat "
                                              "in the order of embed's --model (not with --run: each fold "
                                              "uses its own head)."),
    knn_ratio: float = typer.Option(1.0, "--knn-ratio", help="r: tune on r x kNN + (1 - r) x centre cosine, "
                                    "as submit --knn-ratio scores (1: kNN only)."),
    centres_from: str = typer.Option("gallery", "--centres-from", help="Blend centres (--knn-ratio < 1): "
                                     "gallery = every individual's mean gallery vector (default, one scale); "
                                     "head = the heads' class centres (--centres; --run: each fold's), "
                                     "refused if one lacks an individual."),
    centre_k: int | None = typer.Option(None, "--centre-k", help="Centres searched per query (default --k)."),
) -> None:
    """Choose the new_individual threshold: MAP@5 at every threshold of a grid, and the best.

    One ranking serves the whole grid (only new_individual's rank depends on the threshold).
    "new@1" is the share of rows with new_individual first: `whalesub predict` applies the best
    row's share (not its raw cosine) to an ensemble's test scores. Tune with the scoring options
    submit will use (--knn-ratio, --centres-from, --centres, --centre-k, --k): the result and the
    --per-species file record it under "scoring", and submit refuses a file tuned on another scoring.
    --json prints null where a value is undefined (e.g. MAP@5new without new queries).
    """
    from whalesub.workflows.oof import tune_runs_or_files
    from whalesub.workflows.scorefiles import describe_scoring, dumps_json

    _log_info_to_stderr()
    r = tune_runs_or_files(run, gallery, queries, truth, train_csv, grid=grid,
                           target_new_share=target_new_share, k=k, per_species_out=per_species, k0=k0,
                           centres=centres, knn_ratio=knn_ratio, centre_k=centre_k, centres_from=centres_from)
    if as_json:
        typer.echo(dumps_json(r))
        return
    typer.echo(f"scoring: {describe_scoring(r['scoring'])}")
    fmt = "{:>9} {:>7} {:>10} {:>8} {:>9}"
    typer.echo(fmt.format("threshold", "MAP@5", "MAP@5known", "MAP@5new", "new@1"))
    for row in r["table"]:
        typer.echo(fmt.format(*(f"{row[c]:.4f}" for c in ("threshold", "map5", "map5_known", "map5_new",
                                                         "new_share"))))
    b = r["best"]
    typer.echo(f"best: threshold {b['threshold']:.4f} MAP@5 {b['map5']:.4f} (new_individual first in "
               f"{100 * b['new_share']:.1f}% of {r['n']} queries; truly new: {r['n_new']})")
    if "target" in r:
        t = r["target"]
        typer.echo(f"target new share {100 * t['new_share']:.1f}%: threshold {t['threshold']:.4f} "
                   f"MAP@5 {t['map5']:.4f}")
    if "per_species" in r:
        p = r["per_species"]
        typer.echo(f"per species ({len(p['species'])} species, k0={p['k0']:g}): MAP@5 "
                   f"{p['map5_per_species']:.4f} (in-sample) vs {p['map5_global']:.4f} global; "
                   f"wrote {per_species}")


# --- score / validate (whalesub.ranking.metric, whalesub.ranking.submission) --------------------------------
@app.command("score")
@guarded
def score_command(
    submission: Path = typer.Argument(..., help="Submission CSV: image,predictions (5 labels, best first)."),
    truth: Path = typer.Option(..., "--truth", help="Truth CSV: image,individual_id (new: new_individual)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Score a submission with MAP@5 (Happywhale semantics), overall and for known and new animals.

    Both files must list the same images. --json prints one object with the keys
    map5, map5_known, map5_new, n, n_known, n_new, new_precision_at1, new_recall_at1, ...
    (null where a share has no rows).
    """
    import json

    from whalesub.ranking.metric import format_breakdown
    from whalesub.ranking.submission import score_submission

    result = score_submission(submission, truth)
    typer.echo(json.dumps(result) if as_json else format_breakdown(result))


@app.command("validate")
@guarded
def validate_command(
    submission: Path = typer.Argument(..., help="Submission CSV to check: image,predictions."),
    sample: Path = typer.Option(..., "--sample", help="sample_submission.csv (or the test image folder)."),
    train_csv: Path | None = typer.Option(None, "--train-csv", help="train.csv: every label must be one of "
                                          "its individual_ids or new_individual."),
) -> None:
    """Check a submission before uploading it; print OK and counts, or every problem and exit 2.

    Checks:
    - the header is image,predictions
    - every test image has exactly one row
    - each row has 1-5 distinct space-separated labels
    - with --train-csv, every label is a train individual_id or new_individual
    """
    from whalesub.ranking.submission import check_submission_file

    s = check_submission_file(submission, sample, train_csv)
    typer.echo(f"OK: {submission}: {s['n_rows']} rows, {s['n_labels']} distinct labels, "
               f"{s['n_full']} rows with 5 labels, new_individual first in {s['n_new_at1']} rows "
               f"({100 * s['new_share_at1']:.1f}%)")


# --- synth (whalesub.synth) ------------------------------------------------------------------------
@app.command("synth")
@guarded
def synth_command(
    out: Path = typer.Option(..., "--out", help="Folder to create (must be empty unless --overwrite)."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives byte-identical files."),
    individuals: int = typer.Option(120, "--individuals", help="Animals in the train catalogue."),
    species: int = typer.Option(4, "--species", help="Number of species (1-8)."),
    image_size: str = typer.Option(
        "small", "--image-size", help="Frame W,H in px or preset: small (256x170), medium, large (3200x2133)."
    ),
    large: bool = typer.Option(False, "--large", help="Render every frame at --large-size (a small animal)."),
    n_large: int = typer.Option(0, "--n-large", help="Render this many random frames at --large-size."),
    large_size: str = typer.Option("large", "--large-size", help="Size of the large frames (W,H or preset)."),
    test_images: int | None = typer.Option(None, "--test-images", help="Test images (default 35% of train)."),
    new_share: float = typer.Option(0.2, "--new-share", help="Share of test images showing unseen animals."),
    singleton_share: float = typer.Option(0.55, "--singleton-share", help="Share of animals with one photo."),
    max_images: int = typer.Option(20, "--max-images", help="Photos of the most photographed animal."),
    nuisance: float = typer.Option(1.0, "--nuisance", help="Scale of pose/light/background variation (0-3)."),
    marks: str = typer.Option("colour", "--marks", help="Mark colours: colour (5 hues) or scar."),
    mirror_share: float = typer.Option(0.0, "--mirror-share", help="Share of mirrored sightings."),
    typo_share: float = typer.Option(
        0.0, "--typo-share", help="Share of train rows with a competition species typo (e.g. kiler_whale)."
    ),
    workers: int = typer.Option(1, "--workers", help="Parallel rendering processes (same output)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous synthetic set in --out."),
) -> None:
    """Write a synthetic Happywhale-format data set of marked animals (images, train.csv, truth, boxes)."""
    import json

    from whalesub.synth import make_dataset, parse_image_size

    size = parse_image_size(large_size, "--large-size") if large else parse_image_size(image_size)
    stats = make_dataset(
        out, seed=seed, n_individuals=individuals, n_species=species, image_size=size, n_test=test_images,
        new_share=new_share, singleton_share=singleton_share, max_images=max_images, n_large=n_large,
        large_size=large_size, nuisance=nuisance, marks=marks, mirror_share=mirror_share,
        typo_share=typo_share, workers=workers, overwrite=overwrite,
    )
    keys = ("train_images", "train_individuals", "singleton_share", "test_images", "test_new_frac")
    typer.echo(f"wrote {out}: " + json.dumps({k: stats[k] for k in keys}))


# --- export / embed (whalesub.models.export, whalesub.embedding.embed) --------------------------------------
@app.command("export")
@guarded
def export_command(
    source: Path = typer.Argument(..., help="Training run folder or checkpoint file."),
    out: Path = typer.Option(..., "--out", help="Output folder (model.onnx, model_spec.json, ...)."),
    fp16: bool = typer.Option(False, "--fp16", help="Also write model_fp16.onnx (FP16 backbone, "
                              "FP32 GeM and tail)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset (>= 17)."),
    parity_images: Path | None = typer.Option(None, "--parity-images", help="Folder of real images added "
                                              "to the random parity inputs (the first 8 are used)."),
) -> None:
    """Export the embedding network to ONNX; fail (nothing written) unless it matches PyTorch.

    Input 'image' float32 (batch, 3, S, S) from whalesub.data.image.to_model_input; output 'embedding'
    float32 (batch, D), L2-normalised. Also writes class_centres.npz when the checkpoint has a head.
    """
    from whalesub.models.export import export_model, pick_parity_images

    _log_info_to_stderr()
    m = export_model(source, out, fp16=fp16, opset=opset, parity_images=pick_parity_images(parity_images))
    for key, entry in m["files"].items():
        parity = entry["parity"]
        checked = parity if isinstance(parity, str) else f"worst per-row cosine {parity['min_cosine']:.6f}"
        typer.echo(f"{out / entry['file']} ({key}): parity {checked}")
    typer.echo(f"fingerprint {m['fingerprint']}")


@app.command("embed")
@guarded
def embed_command(
    model: list[Path] = typer.Option(..., "--model", help="Export folder (onnx) or run/checkpoint (torch); "
                                     "repeat for folds: vectors are concatenated and renormalised."),
    out: Path = typer.Option(..., "--out", help="Output embedding file (.npz)."),
    images: Path | None = typer.Option(None, "--images", help="Image folder (all its images, "
                                       "or those of --list)."),
    listing: Path | None = typer.Option(None, "--list", help="CSV with an 'image' column (train.csv, "
                                        "sample_submission.csv); images in --images or the CSV's folder."),
    tta: str | None = typer.Option(None, "--tta", help="flip (default): mean of the original and mirrored "
                                   "views, renormalised; none: original only."),
    flip_views: bool = typer.Option(False, "--flip-views", help="Store original and mirrored views as two "
                                    "rows per image (flipped gallery) instead of averaging them."),
    backend: str = typer.Option("onnx", "--backend", help="onnx (ONNX Runtime) or torch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    boxes: Path | None = typer.Option(None, "--boxes", help="Box CSV image,x1,y1,x2,y2[,conf][,box_type]."),
    box_type: str | None = typer.Option(None, "--box-type", help="Which box_type of --boxes to crop."),
    box_conf: float | None = typer.Option(None, "--box-conf", help="Ignore boxes whose conf is below this "
                                          "(whole frame instead); default: the models' training box_conf."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per model call (fixed; last padded)."),
    workers: int | None = typer.Option(None, "--workers", help="Decoding worker processes (0: decode in "
                                       "the main process); default: CPU cores - 1, at most 8."),
    fp16: bool = typer.Option(False, "--fp16", help="onnx: model_fp16.onnx; torch: CUDA autocast."),
    shard: str | None = typer.Option(None, "--shard", help="i/n: embed the i-th of n blocks (0-based); "
                                     "merge with `whalesub merge-embeddings`."),
    chunk: int = typer.Option(1024, "--chunk", help="Images per resumable chunk in <out>.parts/."),
    ray: str | None = typer.Option(None, "--ray", help=RAY_HELP),
    ray_cpus: int | None = typer.Option(None, "--ray-cpus", help=RAY_CPUS_HELP),
) -> None:
    """Embed images into an .npz of L2-normalised vectors (resumable: re-run the same command)."""
    from whalesub.embedding.embed import EmbedOptions, run_embed

    _log_info_to_stderr()
    tta = tta if tta is not None else ("none" if flip_views else "flip")
    options = EmbedOptions(tta=tta, flip_views=flip_views, backend=backend, device=device, fp16=fp16,
                           batch_size=batch_size, workers=workers, chunk=chunk, box_type=box_type,
                           box_conf=box_conf, shard=shard)
    with _ray_runner(ray, ray_cpus) as runner:
        typer.echo(str(run_embed(model, out, options, images=images, listing=listing, boxes=boxes,
                                 runner=runner)))


@app.command("merge-embeddings")
@guarded
@one_writer("embedding file")
def merge_embeddings_command(
    files: list[Path] = typer.Argument(..., help="Shard files from `whalesub embed --shard i/n`."),
    out: Path = typer.Option(..., "--out", help="Merged embedding file (.npz), in listing order."),
) -> None:
    """Merge the shard files of one embedding run (checks fingerprints and coverage)."""
    from whalesub.embedding.shards import merge_embeddings

    _log_info_to_stderr()
    typer.echo(str(merge_embeddings(files, out)))


boxes_app = typer.Typer(help="Box tables: convert the public Happywhale box files into boxes.csv.",
                        no_args_is_help=True)
app.add_typer(boxes_app, name="boxes")


@boxes_app.command("convert")
@guarded
@one_writer("box table")
def boxes_convert_command(
    source: Path = typer.Argument(..., help="A public box file: YOLOv5 (bbox numpy text + conf), Detic "
                                  "(box 'x1 y1 x2 y2') or the cropped set's literal lists."),
    out: Path = typer.Option(..., "--out", help="boxes.csv to write (image,x1,y1,x2,y2,conf,box_type)."),
    box_type: str = typer.Option(..., "--box-type", help="Kind of box, e.g. body or fin (embed --box-type)."),
    images: Path | None = typer.Option(None, "--images", help="Image folder: check the boxes against the "
                                       "upright image sizes when the file has no width/height columns."),
    image_col: str | None = typer.Option(None, "--image-col", help="Column of image names (default: "
                                         "image, else the base name of image_path, else image_id)."),
    box_col: str | None = typer.Option(None, "--box-col", help="Column of boxes (default: bbox or box)."),
    conf_col: str | None = typer.Option(None, "--conf-col", help="Column of confidences (default: conf; "
                                        "none = 1.0)."),
    inclusive: bool = typer.Option(False, "--inclusive", help="The source's x2/y2 are the last pixel "
                                   "inside the box: add 1."),
    append: bool = typer.Option(False, "--append", help="Add to an existing --out (another box type)."),
    strict: bool = typer.Option(False, "--strict", help="Refuse the file when a box is degenerate (empty or "
                                "under 1 px on a side after clipping); by default it is reported and that "
                                "image embedded whole."),
) -> None:
    """Convert a public box file into whalesub's boxes.csv, joined on the image name.

    Empty cells mean "no box" (the image is embedded whole); so do degenerate boxes (reported with
    their lines; --strict refuses them); with several boxes the most confident is kept; boxes past the
    image are clipped; every problem is reported with its line.
    """
    from whalesub.data.boxes import convert_boxes

    _log_info_to_stderr()
    s = convert_boxes(source, out, box_type, images=images, image_col=image_col, box_col=box_col,
                      conf_col=conf_col, inclusive=inclusive, append=append, strict=strict)
    lines = ", ".join(map(str, s["degenerate_lines"])) + (" ..." if s["degenerate"] > 20 else "")
    plural = "s" * (s["degenerate"] > 1)
    degenerate = (f"{s['degenerate']} degenerate (left out, embedded whole; line{plural} {lines}), "
                  if s["degenerate"] else "")
    typer.echo(f"wrote {s['out']}: {s['boxes']} {s['box_type']} boxes from {s['rows']} rows; "
               f"{s['empty']} without a box, {degenerate}{s['several']} with several (most confident kept), "
               f"{s['clipped']} clipped to the image"
               + ("" if s["sizes_checked"] else " (sizes not checked: give --images)"))


@app.command("pseudo-label")
@guarded
def pseudo_label_command(
    gallery: Path = typer.Option(..., "--gallery", help="Gallery embeddings .npz (train images)."),
    queries: Path = typer.Option(..., "--queries", help="Test embeddings .npz."),
    train_csv: Path = typer.Option(..., "--train-csv", help="train.csv: gallery image -> individual_id."),
    out: Path = typer.Option(..., "--out", help="CSV to write: image,species,individual_id,score,margin."),
    min_score: float = typer.Option(0.8, "--min-score", help="Best individual's cosine must reach this."),
    min_margin: float = typer.Option(0.05, "--min-margin", help="...and beat the second best by this."),
    truth: Path | None = typer.Option(None, "--truth", help="Truth CSV (synthetic data): report precision."),
    k: int = typer.Option(100, "--k", help="Neighbours searched per query."),
    folds: Path | None = typer.Option(None, "--folds", help="The run's folds.csv: rank once per fold "
                                      "without its validation images; OUT gets a fold column."),
) -> None:
    """Confident test predictions as extra training rows (python -m train --pseudo_csv=OUT)."""
    from whalesub.workflows.pseudo import pseudo_label_files

    _log_info_to_stderr()
    s = pseudo_label_files(gallery, queries, train_csv, out, min_score=min_score, min_margin=min_margin,
                           truth=truth, k=k, folds=folds)
    typer.echo(f"wrote {s['out']}: {s['selected']} of {s['queries']} test images "
               f"({100 * s['share']:.1f}%)" + (f"; precision {s['precision']:.3f}"
                                               if s.get("precision") is not None else ""))
    for part in s.get("per_fold", []):
        if part["fold"] >= 0:
            precision = part.get("precision")
            typer.echo(f"fold {part['fold']}: {part['selected']} rows (gallery without its validation images)"
                       + (f"; precision {precision:.3f}" if precision is not None else ""))


# --- report (whalesub.report.build) ----------------------------------------------------------------------
@app.command("report")
@guarded
@one_writer("report")
def report_command(
    gallery: Path | None = typer.Option(None, "--gallery", help="Gallery embeddings .npz (train images; "
                                        "default with --decision: the decision's)."),
    queries: Path = typer.Option(..., "--queries", help="Query embeddings .npz."),
    train_csv: Path | None = typer.Option(None, "--train-csv", help="train.csv: gallery image -> "
                                          "individual_id, species (default with --decision: its labels)."),
    out: Path = typer.Option(..., "--out", help="HTML file to write (self-contained, atomically)."),
    submission: Path | None = typer.Option(None, "--submission", help="Submission CSV to analyse (default: "
                                           "the ranking of these embeddings at the threshold)."),
    truth: Path | None = typer.Option(None, "--truth", help="Truth CSV image,individual_id[,species]; "
                                      "without it: candidates and scores only."),
    images_dir: Path | None = typer.Option(None, "--images-dir", help="Folder of the query images."),
    gallery_images_dir: Path | None = typer.Option(None, "--gallery-images-dir", help="Folder of the "
                                                   "gallery images (default: --images-dir)."),
    threshold: float | None = typer.Option(None, "--threshold", help="Threshold to mark (default: inferred "
                                           "from the submission, else the grid's best)."),
    grid: str = typer.Option("0.0:1.0:0.02", "--grid", help="Thresholds of the curve, as for tune."),
    k: int = typer.Option(100, "--k", help="Neighbours searched per query."),
    max_queries: int = typer.Option(50, "--max-queries", help="Worst queries shown (caps the page size)."),
    thumb_px: int = typer.Option(96, "--thumb-px", help="Longest thumbnail side in pixels."),
    decision: Path | None = typer.Option(None, "--decision", help="decision.json of `whalesub predict`: rank "
                                         "with its scoring (kNN / centre blend) and place new_individual by "
                                         "its rule, i.e. analyse exactly what was submitted."),
) -> None:
    """Write an HTML error report: MAP@5 tables, threshold curve, top-1 cosine histograms, worst queries."""
    from whalesub.report.build import write_report

    _log_info_to_stderr()
    r = write_report(out, gallery, queries, train_csv, submission=submission, truth=truth,
                     images_dir=images_dir, gallery_images_dir=gallery_images_dir, threshold=threshold,
                     grid=grid, k=k, max_queries=max_queries, thumb_px=thumb_px, decision=decision)
    typer.echo(f"wrote {r['out']}: {r['n']} queries, {r['shown']} shown, {r['bytes'] / 1024:.0f} KB")


# --- kaggle build / upload / submit (whalesub.kaggle) ------------------------------------------------
from whalesub.kaggle.commands import kaggle_app  # noqa: E402  (after guarded, which it wraps commands with)

app.add_typer(kaggle_app(guarded, _log_info_to_stderr), name="kaggle")

from whalesub.catalogue.commands import catalogue_app  # noqa: E402  (after guarded, which it wraps commands with)

app.add_typer(catalogue_app(guarded, _log_info_to_stderr), name="catalogue")

# --- blend (whalesub.workflows.blend) -----------------------------------------------------------------------
@app.command("blend")
@guarded
@one_writer("submission")
def blend_command(
    table: list[Path] = typer.Option(..., "--table", help="Candidate table of `submit --candidates-out`; "
                                     "repeat, each followed by its --weight."),
    weight: list[float] = typer.Option(..., "--weight", help="Weight of the matching --table (> 0; "
                                       "normalised to sum 1)."),
    out: Path = typer.Option(..., "--out", help="Submission CSV to write (atomically)."),
    threshold: float | None = typer.Option(None, "--threshold", help="Blended score of new_individual."),
    new_share: float | None = typer.Option(None, "--new-share", help="Instead: share of rows to get "
                                           "new_individual first (e.g. 0.165)."),
    sample: Path | None = typer.Option(None, "--sample", help="sample_submission.csv: rows in its order."),
    train_csv: Path | None = typer.Option(None, "--train-csv", help="train.csv: every label must be one of "
                                          "its individual_ids."),
    candidates_out: Path | None = typer.Option(None, "--candidates-out", help="Also write the blended "
                                               "table."),
) -> None:
    """Blend candidate tables of several models/runs (weighted scores) into a validated submission.

    A candidate missing from a table takes that table's lowest kept score for the image.
    """
    from whalesub.workflows.blend import blend_files

    _log_info_to_stderr()
    s = blend_files(table, weight, out, threshold=threshold, new_share=new_share, sample=sample,
                    train_csv=train_csv, candidates_out=candidates_out)
    typer.echo(f"wrote {s['out']}: {s['rows']} rows from {s['tables']} tables; new_individual first in "
               f"{s['new_first']}, present in {s['new_any']}; threshold={s['threshold']:g}")


# --- predict (whalesub.workflows.predict) -------------------------------------------------------------------
@app.command("predict")
@guarded
@one_writer("predict folder")
def predict_command(
    model: list[Path] = typer.Option(..., "--model", help="Run folder (all its fold*/), fold "
                                     "folder, checkpoint or export folder; repeatable."),
    train_csv: Path = typer.Option(..., "--train-csv", help="train.csv (the gallery's labels)."),
    train_images: Path = typer.Option(..., "--train-images", help="Folder of the train images."),
    test_images: Path = typer.Option(..., "--test-images", help="Folder of the test images."),
    out: Path = typer.Option(..., "--out", help="Output folder: models/, embeddings/, submission.csv, ..."),
    sample: Path | None = typer.Option(None, "--sample", help="sample_submission.csv: test rows and order "
                                       "(default: every image of --test-images)."),
    truth: Path | None = typer.Option(None, "--truth", help="Test truth CSV: also score the submission."),
    threshold: float | None = typer.Option(None, "--threshold", help="Fixed new_individual cosine."),
    new_share: float | None = typer.Option(None, "--new-share", help="Share of test rows to get "
                                           "new_individual first (default: the pooled out-of-fold share)."),
    boxes: Path | None = typer.Option(None, "--boxes", help="Box CSV image,x1,y1,x2,y2[,conf][,box_type]."),
    box_type: str | None = typer.Option(None, "--box-type", help="Which box_type of --boxes to crop."),
    box_conf: float | None = typer.Option(None, "--box-conf", help="Box confidence cut (default: "
                                          "training's)."),
    grid: str = typer.Option("0.0:1.0:0.02", "--grid", help="Out-of-fold threshold grid start:stop:step."),
    k: int = typer.Option(100, "--k", help="Neighbours searched per query."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    fp16: bool = typer.Option(False, "--fp16", help="Export and embed with model_fp16.onnx."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per model call."),
    workers: int | None = typer.Option(None, "--workers", help="Decoding worker processes."),
    thresholds: Path | None = typer.Option(None, "--thresholds", help="Per-species threshold file (`whalesub "
                                           "tune --per-species`) instead of the pooled share."),
    knn_ratio: float = typer.Option(1.0, "--knn-ratio", help="r x kNN + (1 - r) x class-centre cosine; "
                                    "< 1 blends with --centres-from (and tunes on the same)."),
    centres_from: str = typer.Option("gallery", "--centres-from", help="Blend centres (--knn-ratio < 1): "
                                     "gallery = every individual's mean gallery vector (default, one scale); "
                                     "head = the heads' class centres (the exports' class_centres.npz), "
                                     "refused if one lacks an individual."),
    threshold_knn_ratio: float | None = typer.Option(
        None, "--threshold-knn-ratio", help="The --knn-ratio the --threshold was tuned at (default 1, kNN); "
        "required, equal, with --threshold and --knn-ratio < 1."),
    candidates_out: Path | None = typer.Option(None, "--candidates-out", help="Also write the candidate "
                                               "table (for `whalesub blend`)."),
    report: bool = typer.Option(False, "--report", help="Also write OUT/report.html (candidates and "
                                "scores; with --truth the full error report)."),
    ray: str | None = typer.Option(None, "--ray", help=RAY_HELP),
    ray_cpus: int | None = typer.Option(None, "--ray-cpus", help=RAY_CPUS_HELP),
) -> None:
    """From trained runs to a validated submission: export, embed (flipped gallery, flip-TTA test set,
    every model combined), pooled out-of-fold threshold share, submit, validate, score.

    Intermediate files stay in --out; a rerun reuses those whose fingerprints still match.
    """
    from whalesub.embedding.embed import EmbedOptions
    from whalesub.workflows.predict import predict

    _log_info_to_stderr()
    options = EmbedOptions(device=device, fp16=fp16, batch_size=batch_size, workers=workers,
                           box_type=box_type, box_conf=box_conf)
    with _ray_runner(ray, ray_cpus) as runner:
        r = predict(model, train_csv, train_images, test_images, out, sample=sample, truth=truth,
                    boxes=boxes, threshold=threshold, new_share=new_share, grid=grid, k=k, options=options,
                    runner=runner, thresholds=thresholds, knn_ratio=knn_ratio, candidates_out=candidates_out,
                    threshold_knn_ratio=threshold_knn_ratio, centres_from=centres_from)
    if report:
        from whalesub.core.atomic import atomic_write_text
        from whalesub.report.build import write_report

        rep = write_report(out / "report.html", Path(r["gallery"]), Path(r["queries"]), train_csv,
                           submission=Path(r["submission"]), truth=truth, images_dir=test_images,
                           gallery_images_dir=train_images, decision=Path(r["decision"]))
        r["report"] = rep["out"]
        atomic_write_text(out / "predict.json", json.dumps(r, indent=1, default=str) + "\n")
    s = r["submit"]
    typer.echo(f"wrote {s['out']}: {s['rows']} rows, {len(r['models'])} models, threshold "
               f"{s['threshold']:.4f} ({r['threshold_source']}); new_individual first in "
               f"{100 * s['new_first'] / max(s['rows'], 1):.1f}%")
    oof = ("no out-of-fold files" if r.get("oof_new_share") is None else
           f"{100 * r['oof_new_share']:.1f}% of {r['oof_queries']} out-of-fold queries")
    typer.echo(f"new animals: {oof}; new_individual first applied to "
               f"{100 * s['new_first'] / max(s['rows'], 1):.1f}% of test rows")
    for line in r.get("warnings", []):
        typer.echo(f"warning: {line}")
    typer.echo(f"decision: {r['decision']} (`whalesub kaggle build --predict {out}` packages it)")
    if "score" in r:
        typer.echo(f"MAP@5 {r['score']['map5']:.4f} (known {r['score']['map5_known']}, "
                   f"new {r['score']['map5_new']})")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
