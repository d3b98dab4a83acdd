"""Where a dataset's files are, local or remote: list them through pyarrow filesystems (a local path or any
URI pyarrow understands: s3://, gs://, file://), size them, and choose the reader for them.

`raysparse.data.io` reads local files into the driver; this module only names files, so the Ray Data reader
(`raysparse.ray_data`) can read them in parallel, wherever they are. Imports neither ray nor deepspeed.

Which reader runs (`choose_reader`):
  * pandas (`raysparse.build.prepare_data`, the core's reader): a local dataset whose files total less than
    `RAY_DATA_MIN_BYTES` (256 MiB). The whole log is read in the driver; line numbers in error messages are
    exact and `on_bad_rows=quarantine` writes quarantine.csv. Every test dataset and the demo take this path.
  * Ray Data (`raysparse.ray_data.prepare_data_ray`): any URI and local logs of `RAY_DATA_MIN_BYTES` or more.
    Force either with `RAYSPARSE_READER=pandas|ray`.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import pyarrow.fs as pafs

from raysparse.data.io import FORMATS
from raysparse.errors import ConfigError, DataError

RAY_DATA_MIN_BYTES = 256 * 2**20
READER_ENV = "RAYSPARSE_READER"


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def is_uri(path: str) -> bool:
    """A remote URI (file:// names a local path)."""
    return "://" in path and not path.startswith("file://")


def list_data_files(path: str) -> list[str]:
    """Files a path names (itself, or the visible files of a folder), all one format; as URIs for URIs."""
    fs, inner = filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{path!r} does not exist; pass a .parquet, .csv or .jsonl file or a folder of them.")
    if info.type == pafs.FileType.File:
        files = [inner]
    else:
        entries = fs.get_file_info(pafs.FileSelector(inner, recursive=False))
        files = sorted(e.path for e in entries if e.type == pafs.FileType.File
                       and not e.base_name.startswith((".", "_")))
        if not files:
            raise DataError(f"{path}: folder has no data files; put .parquet, .csv or .jsonl files in it.")
    kinds = {FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if Path(f).suffix.lower() not in FORMATS)
        raise DataError(f"{bad}: unknown file format {Path(bad).suffix!r}; use one of {', '.join(FORMATS)}.")
    if len(kinds) > 1:
        raise DataError(f"{path}: folder mixes formats ({', '.join(sorted(kinds))}); keep one format per folder.")
    scheme = path.split("://", 1)[0] + "://" if is_uri(path) else ""
    return [scheme + f if scheme and not f.startswith(scheme) else f for f in files]


def find_dataset_inputs(path: str, items_path: str = "") -> tuple[str, str]:
    """(interactions path, catalogue path) for a dataset folder or an interactions path + `items_path`,
    local or URI (the URI version of `raysparse.data.io.find_dataset_files`)."""
    fs, inner = filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"dataset path {path!r} does not exist; pass a dataset folder (interactions.* + items.*), "
                        f"an interactions file (.parquet, .csv, .jsonl) or a folder of such files.")
    interactions, items = path, ""
    if info.type == pafs.FileType.Directory:
        names = {e.base_name: e for e in fs.get_file_info(pafs.FileSelector(inner, recursive=False))}
        for stem in ("interactions", "items"):
            found = [n for n in names if n == stem or (Path(n).stem == stem and Path(n).suffix in FORMATS)]
            if len(found) > 1:
                raise DataError(f"{path}: found several {stem} inputs ({', '.join(found)}); keep exactly one.")
            if found:
                joined = path.rstrip("/") + "/" + found[0]
                if stem == "interactions":
                    interactions = joined
                else:
                    items = joined
    items = items_path or items
    if not items:
        raise DataError(f"{path}: no item catalogue found; set data.items_path or put items.parquet, items.csv "
                        f"or items.jsonl beside the interactions.")
    return interactions, items


def input_bytes(path: str) -> int:
    """Total size of the interaction files of a dataset (0 when it cannot be listed)."""
    try:
        interactions, _ = find_dataset_inputs(path, "-")
        fs, _ = filesystem(interactions)
        return sum(fs.get_file_info(filesystem(f)[1]).size or 0 for f in list_data_files(interactions))
    except (DataError, OSError):
        return 0


def choose_reader(data_path: str) -> str:
    """'pandas' or 'ray' for the dataset at `data_path` (data.path; see the module docstring).
    RAYSPARSE_READER=pandas|ray forces one."""
    forced = os.environ.get(READER_ENV, "auto")
    if forced not in ("auto", "pandas", "ray"):
        raise ConfigError(f"{READER_ENV}={forced!r} is not allowed; use 'pandas', 'ray' or unset it (auto).")
    if forced != "auto":
        return forced
    if not data_path:              # the embedded synthetic dataset: generated locally, small
        return "pandas"
    if is_uri(data_path):
        return "ray"
    return "ray" if input_bytes(data_path) >= RAY_DATA_MIN_BYTES else "pandas"


def local_copy(path: str, folder: str) -> str:
    """A URI file or folder copied into `folder` (catalogues are small); local paths as they are."""
    if path.startswith("file://"):
        return path[len("file://"):]
    if not is_uri(path):
        return path
    files = list_data_files(path)
    target = Path(folder) / "catalogue"
    target.mkdir(parents=True, exist_ok=True)
    for f in files:
        pafs.copy_files(f, str(target / Path(f).name))
    return str(target if len(files) > 1 else target / Path(files[0]).name)


def csv_columns(file: str) -> list[str]:
    """The header of a CSV file, local or URI (read from its first 64 KiB)."""
    fs, inner = filesystem(file)
    with fs.open_input_stream(inner) as stream:
        head = stream.read(1 << 16).decode("utf-8", errors="replace")
    return next(csv.reader(io.StringIO(head)), [])
