"""Photos in, vectors out: list and hash the files, embed those the catalogue lacks, rebuild.

The model is pinned: a catalogue stores its model's fingerprint (ModelSpec with preprocessing +
weights digest) at ``init``, and every command that embeds checks the model it opens against it.
``rebuild`` re-embeds every stored photo (``photos/``, with the crop box each was added with) with
another model and swaps all vectors in one transaction.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from whalesub.catalogue.add import NewPhoto, add_vectors
from whalesub.catalogue.decisions import record
from whalesub.catalogue.store import PHOTOS, Catalogue, CatalogueError, file_sha256
from whalesub.core.errors import DataError, first_few
from whalesub.data.contract import list_image_folder, read_train_csv
from whalesub.ranking.vectors import unit_rows

log = logging.getLogger(__name__)


def list_photos(inputs: list[Path]) -> list[Path]:
    """Files given and the images (sorted) of folders given, in that order; every missing one reported."""
    out, missing = [], []
    for p in inputs:
        p = Path(p)
        if p.is_dir():
            found = list_image_folder(p)
            if not found:
                raise DataError(f"folder {p} holds no images (jpg, jpeg, png, ...)")
            out += [p / n for n in found]
        elif p.is_file():
            out.append(p)
        else:
            missing.append(str(p))
    if missing:
        raise DataError(f"{len(missing)} photo path(s) do not exist: {first_few(missing)}; fix the paths")
    if not out:
        raise DataError("no photos given: pass image files or folders")
    return out


class Embedder:
    """The catalogue's model, opened once and checked against the catalogue's fingerprint."""

    def __init__(
        self,
        cat: Catalogue | None,
        model: Path | None,
        backend: str = "onnx",
        device: str = "auto",
        batch_size: int = 32,
        workers: int | None = 0,
        tta: str | None = None,
    ):
        from whalesub.embedding.embed import EmbedOptions
        from whalesub.models.backends import open_model

        if model is None:
            if cat is None or not cat.model.get("path"):
                raise CatalogueError("pass --model (an export folder)")
            model = Path(cat.model["path"])
            backend = cat.model.get("backend", backend)
        self.model = open_model(model, backend, device)
        if cat is not None and self.model.fingerprint != cat.fingerprint:
            raise CatalogueError(
                f"model {model} has fingerprint {self.model.fingerprint}, but catalogue {cat.folder} "
                f"holds vectors of model {cat.fingerprint}: use that model, or re-embed the catalogue with "
                f"`whalesub catalogue rebuild --model {model}`"
            )
        tta = tta or (cat.model.get("tta", "flip") if cat is not None else "flip")
        self.options = EmbedOptions(
            tta=tta, backend=backend, device=device, batch_size=batch_size, workers=workers
        )
        self.options.check()

    def describe(self, path: Path) -> dict:
        return {
            "path": str(Path(path).resolve()),
            "backend": self.options.backend,
            "tta": self.options.tta,
            "fingerprint": self.model.fingerprint,
            "spec": self.model.spec.to_dict(),
        }

    def __call__(self, paths: list[Path], boxes: list | None = None, desc: str = "embed") -> np.ndarray:
        """[len(paths), D] float32 unit rows; ``boxes``: (x1, y1, x2, y2[, conf]) or None per photo."""
        from tqdm import tqdm

        from whalesub.embedding.embed import embed_batch, resolve_box_conf
        from whalesub.embedding.loader import apply_box_conf, make_loader

        boxes = list(boxes) if boxes is not None else [None] * len(paths)
        if any(b is not None and len(b) == 5 for b in boxes):
            boxes = apply_box_conf(boxes, resolve_box_conf([self.model], self.options))
        bs = self.options.batch_size
        batches = [list(range(a, min(len(paths), a + bs))) for a in range(0, len(paths), bs)]
        out = np.zeros((len(paths), 0 if not paths else 1), np.float32)
        loader = make_loader(
            [str(p) for p in paths], boxes, [self.model.spec], batches, bs, self.options.workers or 0
        )
        rows = []
        with tqdm(total=len(paths), unit="img", desc=desc, disable=not paths) as bar:
            try:
                for positions, inputs in loader:
                    rows.append(embed_batch([self.model], inputs, [0], self.options)[: len(positions)])
                    bar.update(len(positions))
            except DataError as exc:  # the loader names every photo of the batch it could not decode
                why = str(exc).replace(" (chunks done so far are kept for resuming)", "")
                raise DataError(f"{desc}: nothing was changed in the catalogue; {why}") from None
        return unit_rows(np.concatenate(rows)) if rows else out


def init_catalogue(folder: Path, model: Path, backend: str = "onnx", tta: str = "flip") -> dict:
    emb = Embedder(None, model, backend, "cpu", tta=tta)
    with Catalogue.create(folder, emb.model.fingerprint, int(emb.model.spec.embed_dim), emb.describe(model)):
        pass
    return {"folder": str(folder), "fingerprint": emb.model.fingerprint, "dim": int(emb.model.spec.embed_dim)}


def read_labels(path: Path) -> dict[str, tuple[str, str | None]]:
    frame = read_train_csv(path)
    return {r.image: (r.individual_id, r.species or None) for r in frame.itertuples(index=False)}


def add_photos(
    cat: Catalogue,
    inputs: list[Path],
    embedder_args: dict,
    *,
    labels: Path | None = None,
    boxes: Path | None = None,
    box_type: str | None = None,
    species: str | None = None,
    who: str,
) -> dict:
    """``catalogue add``: hash every photo, embed only those the catalogue lacks, add them."""
    from tqdm import tqdm

    paths = list_photos(inputs)
    names = [p.name for p in paths]
    shas = [file_sha256(p) for p in tqdm(paths, desc="hash", unit="img", disable=len(paths) < 200)]
    table = read_labels(labels) if labels is not None else {}
    picked = [None] * len(paths)
    if boxes is not None:
        from whalesub.embedding.loader import select_boxes

        picked = select_boxes(boxes, box_type, names)
    elif box_type is not None:
        raise CatalogueError("--box-type needs --boxes CSV")
    unused = sorted(set(table) - set(names))
    if unused:
        log.warning(
            "%d row(s) of %s name no photo of this add and are ignored: %s",
            len(unused),
            labels,
            first_few(unused),
        )
    held = cat.photo_rows(shas)
    first = {}
    for i, s in enumerate(shas):
        first.setdefault(s, i)
    todo = [i for s, i in first.items() if s not in held]
    vectors = np.zeros((len(paths), cat.dim), np.float32)
    if todo:
        emb = Embedder(cat, **embedder_args)
        vectors[todo] = emb([paths[i] for i in todo], [picked[i] for i in todo], desc="catalogue add")
    for i, s in enumerate(shas):
        if s in held:
            vectors[i] = cat.vector_of(held[s][0])
        elif first[s] != i:
            vectors[i] = vectors[first[s]]
    photos = [
        NewPhoto(n, s, p, None if b is None else tuple(b), *table.get(n, (None, species)))
        for n, s, p, b in zip(names, shas, paths, picked, strict=True)
    ]
    for ph in photos:
        if ph.species is None:
            ph.species = species
    out = add_vectors(cat, photos, vectors, who, note={"labels": str(labels)} if labels else None)
    out["ignored_labels"] = len(unused)
    return out


def rebuild(cat: Catalogue, model: Path, embedder_args: dict, who: str) -> dict:
    """Re-embed every photo of the catalogue with ``model`` and pin the catalogue to it."""
    args = {k: v for k, v in embedder_args.items() if k != "model"}
    emb = Embedder(None, model, tta=cat.model.get("tta", "flip"), **args)
    rows = cat.db.execute("SELECT row, name, box FROM photos ORDER BY row").fetchall()
    paths = [cat.folder / PHOTOS / n for _, n, _ in rows]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CatalogueError(
            f"{len(missing)} photo(s) are missing from {cat.folder / PHOTOS}: "
            f"{first_few(missing)}; restore the folder from a copy before rebuilding"
        )
    boxes = [None if b is None else tuple(json.loads(b)) for _, _, b in rows]
    vectors = emb(paths, boxes, desc="catalogue rebuild") if rows else np.zeros((0, 0), np.float32)
    dim = int(emb.model.spec.embed_dim)
    with cat.transaction():
        cat.db.executemany(
            "UPDATE vectors SET vector = ? WHERE row = ?",
            [(v.tobytes(), r) for (r, _, _), v in zip(rows, vectors, strict=True)],
        )
        old = cat.fingerprint
        cat.set_meta("fingerprint", emb.model.fingerprint)
        cat.set_meta("dim", str(dim))
        cat.set_meta("model", json.dumps(emb.describe(model)))
        cat.bump_labels()
        record(cat, "rebuild", {"from": old, "to": emb.model.fingerprint, "photos": len(rows)}, [], who)
    cat.fingerprint, cat.dim = emb.model.fingerprint, dim
    cat.sync_index()
    return {"photos": len(rows), "from": old, "to": emb.model.fingerprint}
