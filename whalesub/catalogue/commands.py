"""``whalesub catalogue ...``: the typer sub-app (parsing only; the logic lives in the modules)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import typer

CAT_HELP = "The catalogue folder (or set WHALESUB_CATALOGUE)."


def catalogue_app(guarded: Callable, log_to_stderr: Callable[[], None]) -> typer.Typer:
    """The ``catalogue`` sub-app; ``guarded`` turns WhalesubError into a message and exit status 2."""
    app = typer.Typer(
        help="A living catalogue: add photos once, identify new ones against it, record decisions.",
        no_args_is_help=True,
    )

    def cat_opt():
        return typer.Option(..., "--catalogue", "-c", envvar="WHALESUB_CATALOGUE", help=CAT_HELP)

    def who_opt():
        return typer.Option(None, "--who", help="Who decides (default: the user name).")

    def lock_opt():
        return typer.Option(600.0, "--lock-timeout", help="Seconds to wait for another process to finish.")

    def model_opt():
        return typer.Option(None, "--model", help="Export folder (default: the catalogue's own model).")

    def _open(folder: Path, write: bool, timeout: float = 600.0):
        from whalesub.catalogue.store import Catalogue

        log_to_stderr()
        return Catalogue.open(folder, write=write, timeout=timeout)

    def _who(who: str | None) -> str:
        from whalesub.catalogue.store import who_default

        return who or who_default()

    @app.command("init")
    @guarded
    def init_command(
        folder: Path = typer.Argument(..., help="New catalogue folder."),
        model: Path = typer.Option(..., "--model", help="Export folder (`whalesub export`)."),
        tta: str = typer.Option("flip", "--tta", help="flip or none: how photos are embedded."),
    ):
        """Create an empty catalogue pinned to MODEL's fingerprint."""
        from whalesub.catalogue.photos import init_catalogue

        log_to_stderr()
        r = init_catalogue(folder, model, tta=tta)
        typer.echo(f"created catalogue {r['folder']}: model {r['fingerprint']}, {r['dim']}-d vectors")

    @app.command("add")
    @guarded
    def add_command(
        images: list[Path] = typer.Argument(..., help="Image files and/or folders of images."),
        catalogue: Path = cat_opt(),
        labels: Path | None = typer.Option(None, "--labels", help="train.csv: image -> individual_id."),
        boxes: Path | None = typer.Option(None, "--boxes", help="Box CSV to crop the photos with."),
        box_type: str | None = typer.Option(None, "--box-type", help="Which box_type of --boxes."),
        species: str | None = typer.Option(None, "--species", help="Species of unlabelled photos."),
        model: Path | None = model_opt(),
        batch_size: int = typer.Option(32, "--batch-size", help="Images per model call."),
        workers: int = typer.Option(0, "--workers", help="Decoding processes (0: in-process)."),
        who: str | None = who_opt(),
        lock_timeout: float = lock_opt(),
    ):
        """Add photos: only those not held yet (by content) are embedded; --labels imports known ids."""
        from whalesub.catalogue.photos import add_photos

        with _open(catalogue, True, lock_timeout) as cat:
            r = add_photos(
                cat,
                images,
                {"model": model, "batch_size": batch_size, "workers": workers},
                labels=labels,
                boxes=boxes,
                box_type=box_type,
                species=species,
                who=_who(who),
            )
        extra = [f"{r['renamed']} renamed"] if r["renamed"] else []
        extra += [f"{r['ignored_labels']} label rows ignored"] if r["ignored_labels"] else []
        typer.echo(
            f"added {r['added']} photo(s), {r['skipped']} already held, {r['labelled']} labelled"
            f"{''.join(', ' + e for e in extra)}; {r['photos']} photos in the catalogue"
        )

    @app.command("identify")
    @guarded
    def identify_command(
        images: list[Path] = typer.Argument(..., help="Image files and/or folders."),
        catalogue: Path = cat_opt(),
        out: Path = typer.Option(..., "--out", help="Candidates CSV to write."),
        html: Path | None = typer.Option(None, "--html", help="Also write the review page."),
        top: int = typer.Option(12, "--top", help="Candidates per individual and per image."),
        boxes: Path | None = typer.Option(None, "--boxes", help="Box CSV of the photos."),
        box_type: str | None = typer.Option(None, "--box-type", help="Which box_type."),
        new_below: float | None = typer.Option(
            None, "--new-below", help="Instead of P(new) >= 0.5: new when the best cosine is below this."
        ),
        link_above: float | None = typer.Option(
            None,
            "--link-above",
            help="Instead of the calibrated rule: two new photos are one "
            "animal when their cosine reaches this.",
        ),
        refit: bool = typer.Option(False, "--refit", help="Refit the calibration now."),
        new_share: float = typer.Option(
            0.2, "--new-share", help="Share of new animals expected in a batch (the prior of P(new))."
        ),
        thumb_px: int = typer.Option(128, "--thumb-px", help="Thumbnail size on the page."),
        model: Path | None = model_opt(),
        batch_size: int = typer.Option(32, "--batch-size", help="Images per model call."),
        lock_timeout: float = lock_opt(),
    ):
        """Candidates for each photo (never an assignment) with calibrated probabilities; new animals
        of the batch grouped among themselves."""
        from whalesub.catalogue.identify import identify_photos

        with _open(catalogue, False, lock_timeout) as cat:
            r = identify_photos(
                cat,
                images,
                {"model": model, "batch_size": batch_size},
                top=top,
                out=out,
                html=html,
                boxes=boxes,
                box_type=box_type,
                new_below=new_below,
                link_above=link_above,
                thumb_px=thumb_px,
                refit=refit,
                new_share=new_share,
            )
        typer.echo(
            f"wrote {r['out']}: {r['queries']} photos ({r['embedded']} embedded), {r['rows']} candidate "
            f"rows; {r['new']} likely new in {r['groups']} group(s)"
            f"{'' if r['calibrated'] else ' (uncalibrated)'}{'; ' + r['html'] if r['html'] else ''}"
        )

    @app.command("confirm")
    @guarded
    def confirm_command(
        photo: str = typer.Argument(..., help="Photo: catalogue name, file, or hash prefix."),
        ind: str = typer.Argument(..., metavar="ID", help="An existing individual id."),
        catalogue: Path = cat_opt(),
        who: str | None = who_opt(),
        lock_timeout: float = lock_opt(),
    ):
        """PHOTO shows individual ID."""
        from whalesub.catalogue.decisions import confirm

        with _open(catalogue, True, lock_timeout) as cat:
            r = confirm(cat, photo, ind, _who(who))
        typer.echo(
            f"#{r['seq']} confirm: {r['photo']} -> {r['id']}" + (f" (was {r['was']})" if r["was"] else "")
        )

    @app.command("new")
    @guarded
    def new_command(
        photo: str = typer.Argument(..., help="Photo: catalogue name, file, or hash prefix."),
        ind: str | None = typer.Option(
            None, "--id", help="Name of the new individual (default: a fresh cat-NNNNN)."
        ),
        catalogue: Path = cat_opt(),
        who: str | None = who_opt(),
        lock_timeout: float = lock_opt(),
    ):
        """PHOTO shows an animal the catalogue does not know yet: a new individual."""
        from whalesub.catalogue.decisions import new

        with _open(catalogue, True, lock_timeout) as cat:
            r = new(cat, photo, ind, _who(who))
        typer.echo(f"#{r['seq']} new: {r['photo']} -> {r['id']}")

    @app.command("merge")
    @guarded
    def merge_command(
        id_a: str = typer.Argument(..., help="The id kept."),
        id_b: str = typer.Argument(..., help="The id whose photos move to ID_A."),
        catalogue: Path = cat_opt(),
        who: str | None = who_opt(),
        lock_timeout: float = lock_opt(),
    ):
        """ID_A and ID_B are one animal: ID_B's photos become ID_A's."""
        from whalesub.catalogue.decisions import merge

        with _open(catalogue, True, lock_timeout) as cat:
            r = merge(cat, id_a, id_b, _who(who))
        typer.echo(f"#{r['seq']} merge: {r['photos']} photo(s) of {r['gone']} -> {r['keep']}")

    @app.command("split")
    @guarded
    def split_command(
        ind: str = typer.Argument(..., metavar="ID", help="The individual to split."),
        photos: list[str] = typer.Argument(..., help="Its photos that show another animal."),
        new_id: str | None = typer.Option(None, "--id", help="Their new id (default: fresh)."),
        catalogue: Path = cat_opt(),
        who: str | None = who_opt(),
        lock_timeout: float = lock_opt(),
    ):
        """Some photos of ID show another animal: move them to a new individual."""
        from whalesub.catalogue.decisions import split

        with _open(catalogue, True, lock_timeout) as cat:
            r = split(cat, ind, photos, new_id, _who(who))
        typer.echo(f"#{r['seq']} split: {r['photos']} photo(s) of {r['id']} -> {r['new_id']}")

    @app.command("undo")
    @guarded
    def undo_command(
        catalogue: Path = cat_opt(), who: str | None = who_opt(), lock_timeout: float = lock_opt()
    ):
        """Undo the latest decision not undone yet (recorded as one more history row)."""
        from whalesub.catalogue.decisions import undo

        with _open(catalogue, True, lock_timeout) as cat:
            r = undo(cat, _who(who))
        typer.echo(
            f"#{r['seq']} undid #{r['undid']} {r['kind']} {json.dumps(r['args'])} ({r['photos']} photo(s))"
        )

    @app.command("history")
    @guarded
    def history_command(
        catalogue: Path = cat_opt(),
        as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    ):
        """Every decision, oldest first: seq, when, who, what (and which undo reversed it)."""
        from whalesub.catalogue.decisions import history

        with _open(catalogue, False) as cat:
            rows = history(cat)
        for h in rows:
            if as_json:
                typer.echo(json.dumps(h))
            else:
                undone = f"  [undone by #{h['undone_by']}]" if h["undone_by"] else ""
                typer.echo(
                    f"#{h['seq']:<5} {h['at']}  {h['who']:<12} {h['kind']:<8} {json.dumps(h['args'])}{undone}"
                )

    @app.command("export")
    @guarded
    def export_command(
        out: Path = typer.Argument(..., help="train.csv to write (image, species, individual_id)."),
        catalogue: Path = cat_opt(),
    ):
        """Write the labelled photos as a train.csv for the next training round (images: DIR/photos)."""
        from whalesub.catalogue.decisions import export

        with _open(catalogue, False) as cat:
            n = export(cat, out)
            photos = cat.folder / "photos"
        typer.echo(f"wrote {out}: {n} labelled photos (images in {photos})")

    @app.command("stats")
    @guarded
    def stats_command(
        catalogue: Path = cat_opt(),
        ids: bool = typer.Option(False, "--ids", help="Also list each individual's photo count."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ):
        """Photos, labelled, individuals, singletons, decisions, model."""
        from whalesub.catalogue.decisions import stats

        with _open(catalogue, False) as cat:
            s = stats(cat)
        if not ids:
            s.pop("ids")
        if as_json:
            typer.echo(json.dumps(s))
            return
        for k, v in s.items():
            typer.echo(f"{k}: {v}")

    @app.command("rebuild")
    @guarded
    def rebuild_command(
        model: Path = typer.Option(..., "--model", help="The new model's export folder."),
        catalogue: Path = cat_opt(),
        batch_size: int = typer.Option(32, "--batch-size", help="Images per model call."),
        who: str | None = who_opt(),
        lock_timeout: float = lock_opt(),
    ):
        """Re-embed every photo with another model and pin the catalogue to it (decisions are kept)."""
        from whalesub.catalogue.photos import rebuild

        with _open(catalogue, True, lock_timeout) as cat:
            r = rebuild(cat, model, {"batch_size": batch_size}, _who(who))
        typer.echo(f"rebuilt {r['photos']} photos: model {r['from']} -> {r['to']}")

    return app
