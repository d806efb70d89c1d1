"""``dataset-metadata.json`` and ``kernel-metadata.json``: write them and check Kaggle's rules.

Rules (kaggle client 2.2.5; ``../shared/KAGGLE.md``), all checked before anything is uploaded:

- dataset: ``title`` 6-50 characters; ``id`` = ``owner/slug`` with a slug of 6-50 characters
  (lowercase letters, digits, dashes) equal to the title lowercased with dashes (Kaggle derives the
  slug from the title on create); ``licenses`` a list of exactly one ``{"name": ...}``.
- kernel: required ``id``, ``title`` (>= 5 characters, slug = title lowercased with dashes),
  ``code_file`` (present beside the metadata), ``language`` ``python``, ``kernel_type``
  ``script``/``notebook``; ``enable_internet`` written explicitly as false (the client defaults it
  to true, and a kernel with internet on cannot be submitted to a code competition);
  ``enable_gpu`` true; ``machine_shape`` set; ``dataset_sources`` as ``owner/slug``;
  ``competition_sources`` as bare slugs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from whalesub.core.errors import ConfigError
from whalesub.kaggle import DATASET_METADATA, DATASETS, KERNEL_DIR, KERNEL_METADATA, MANIFEST
from whalesub.kaggle.kernel_script import verify_files

LICENSES = (
    "CC0-1.0",
    "CC-BY-SA-4.0",
    "CC-BY-4.0",
    "CC-BY-NC-SA-4.0",
    "GPL-2.0",
    "ODbL-1.0",
    "DbCL-1.0",
    "Apache-2.0",
    "MIT",
    "other",
    "unknown",
)
# GPU shapes the client's documentation names (P100 is retired to T4); extend when Kaggle adds one.
MACHINE_SHAPES = (
    "NvidiaTeslaT4",
    "NvidiaTeslaT4Highmem",
    "NvidiaL4",
    "NvidiaL4X1",
    "NvidiaTeslaA100",
    "NvidiaH100",
)
_SLUG = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def slugify(title: str) -> str:
    """The slug Kaggle derives from a title: lowercase, every run of other characters one dash."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def dataset_metadata(owner: str, title: str, license_name: str = "CC0-1.0") -> dict:
    """The ``dataset-metadata.json`` of a dataset whose slug is ``slugify(title)``."""
    return {"title": title, "id": f"{owner}/{slugify(title)}", "licenses": [{"name": license_name}]}


def kernel_metadata(
    owner: str,
    title: str,
    code_file: str,
    datasets: list[str],
    competition: str | None,
    machine_shape: str = "NvidiaTeslaT4",
    private: bool = True,
) -> dict:
    """The ``kernel-metadata.json`` of the offline GPU kernel (internet off, written explicitly)."""
    return {
        "id": f"{owner}/{slugify(title)}",
        "title": title,
        "code_file": code_file,
        "language": "python",
        "kernel_type": "script",
        "is_private": private,
        "enable_gpu": True,
        "enable_tpu": False,
        "enable_internet": False,
        "machine_shape": machine_shape,
        "dataset_sources": list(datasets),
        "competition_sources": [competition] if competition else [],
        "kernel_sources": [],
        "model_sources": [],
    }


def _as_bool(value) -> bool | None:
    """JSON booleans or the strings "true"/"false" (what the client accepts); None otherwise."""
    if isinstance(value, bool):
        return value
    return {"true": True, "false": False}.get(value) if isinstance(value, str) else None


def _check_ref(ref, where: str, key: str) -> list[str]:
    """``owner/slug`` with a 6-50 character slug."""
    if not isinstance(ref, str) or ref.count("/") != 1:
        return [f"{where}: {key} {ref!r} must be 'owner/slug'"]
    owner, slug = ref.split("/")
    problems = []
    if not _OWNER.match(owner):
        problems.append(f"{where}: {key} {ref!r}: owner {owner!r} is not a Kaggle user name")
    if not (6 <= len(slug) <= 50 and _SLUG.match(slug)):
        problems.append(
            f"{where}: {key} {ref!r}: slug {slug!r} must be 6-50 characters of a-z, 0-9 and single dashes"
        )
    return problems


def check_dataset_metadata(meta: dict, where: str) -> list[str]:
    """Every broken rule of one dataset's metadata, as messages naming ``where`` and the key."""
    problems = [f"{where}: missing key {k!r}" for k in ("title", "id", "licenses") if k not in meta]
    title = meta.get("title")
    if "title" in meta and not (isinstance(title, str) and 6 <= len(title) <= 50):
        problems.append(f"{where}: title {title!r} must be 6-50 characters")
    if "id" in meta:
        problems += _check_ref(meta["id"], where, "id")
        if (
            isinstance(title, str)
            and isinstance(meta["id"], str)
            and "/" in meta["id"]
            and meta["id"].split("/")[1] != slugify(title)
        ):
            problems.append(
                f"{where}: id slug {meta['id'].split('/')[1]!r} differs from the slug of the "
                f"title {slugify(title)!r}; Kaggle makes the slug from the title: keep them equal"
            )
    lic = meta.get("licenses")
    if "licenses" in meta:
        if not (isinstance(lic, list) and len(lic) == 1 and isinstance(lic[0], dict) and "name" in lic[0]):
            problems.append(f'{where}: licenses must be a list of exactly one {{"name": ...}}, got {lic!r}')
        elif lic[0]["name"] not in LICENSES:
            problems.append(f"{where}: licence {lic[0]['name']!r} is not one of {', '.join(LICENSES)}")
    return problems


def check_kernel_metadata(meta: dict, where: str, folder: Path | None = None) -> list[str]:
    """Every broken rule of a ``kernel-metadata.json`` (``folder``: where ``code_file`` must be)."""
    required = ("id", "title", "code_file", "language", "kernel_type")
    problems = [f"{where}: missing key {k!r}" for k in required if k not in meta]
    title = meta.get("title")
    if "title" in meta and not (isinstance(title, str) and 5 <= len(title) <= 50):
        problems.append(f"{where}: title {title!r} must be 5-50 characters")
    if "id" in meta:
        problems += _check_ref(meta["id"], where, "id")
        slug = str(meta["id"]).split("/")[-1]
        if isinstance(title, str) and slug != slugify(title):
            problems.append(
                f"{where}: id slug {slug!r} differs from the slug of the title {slugify(title)!r}: "
                "Kaggle renames the kernel after its title; keep them equal"
            )
    if "language" in meta and meta["language"] != "python":
        problems.append(f"{where}: language {meta['language']!r} must be 'python'")
    if "kernel_type" in meta and meta["kernel_type"] not in ("script", "notebook"):
        problems.append(f"{where}: kernel_type {meta['kernel_type']!r} must be 'script' or 'notebook'")
    if folder is not None and "code_file" in meta and not (folder / str(meta["code_file"])).is_file():
        problems.append(f"{where}: code_file {meta['code_file']!r} is not in {folder}")
    if "enable_internet" not in meta:
        problems.append(
            f"{where}: enable_internet must be written explicitly as false (the client's "
            "default is true, and a code competition refuses kernels with internet on)"
        )
    elif _as_bool(meta["enable_internet"]) is not False:
        problems.append(f"{where}: enable_internet is {meta['enable_internet']!r}; it must be false")
    if _as_bool(meta.get("enable_gpu")) is not True:
        problems.append(
            f"{where}: enable_gpu is {meta.get('enable_gpu')!r}; the kernel embeds on a GPU: true"
        )
    for key in ("is_private", "enable_tpu"):
        if key in meta and _as_bool(meta[key]) is None:
            problems.append(f"{where}: {key} {meta[key]!r} must be a boolean")
    if not (isinstance(meta.get("machine_shape"), str) and meta["machine_shape"] in MACHINE_SHAPES):
        problems.append(
            f"{where}: machine_shape {meta.get('machine_shape')!r} must be one of {', '.join(MACHINE_SHAPES)}"
        )
    for ref in meta.get("dataset_sources", []):
        problems += _check_ref(ref, where, "dataset_sources entry")
    for slug in meta.get("competition_sources", []):
        if not (isinstance(slug, str) and _SLUG.match(slug)):
            problems.append(
                f"{where}: competition_sources entry {slug!r} must be a bare slug such as "
                "'happy-whale-and-dolphin' (no owner, no URL)"
            )
    return problems


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or ConfigError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing; rebuild with `whalesub kaggle build`") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def check_build(folder: Path) -> dict:
    """Check a build folder before anything is uploaded; ConfigError lists every problem.

    Each dataset sub-folder: its metadata rules, a ``manifest.json`` of the right kind whose sha256
    values match the files. The kernel: its metadata rules, and ``dataset_sources`` equal to the ids
    of the datasets built beside it. Returns ``{"datasets": {sub: id}, "kernel": id}``.
    """
    problems, ids = [], {}
    for sub, kind in DATASETS.items():
        d = folder / sub
        if not d.is_dir():
            if sub != "boxes":
                problems.append(f"{d} is missing")
            continue
        meta = read_json(d / DATASET_METADATA)
        problems += check_dataset_metadata(meta, str(d / DATASET_METADATA))
        ids[sub] = meta.get("id")
        manifest = read_json(d / MANIFEST)
        if manifest.get("kind") != kind:
            problems.append(f"{d / MANIFEST}: kind {manifest.get('kind')!r} must be {kind!r}")
        problems += verify_files(d, manifest.get("files", {}))
    kernel = folder / KERNEL_DIR
    meta = read_json(kernel / KERNEL_METADATA)
    problems += check_kernel_metadata(meta, str(kernel / KERNEL_METADATA), kernel)
    if sorted(meta.get("dataset_sources", [])) != sorted(ids.values()):
        problems.append(
            f"{kernel / KERNEL_METADATA}: dataset_sources {meta.get('dataset_sources')} must be the "
            f"datasets of this build {sorted(ids.values())}"
        )
    if len(set(ids.values())) != len(ids):
        problems.append(f"two datasets of {folder} share an id: {ids}")
    if problems:
        raise ConfigError(f"the build {folder} breaks {len(problems)} Kaggle rule(s):", problems)
    return {"datasets": ids, "kernel": meta["id"]}
