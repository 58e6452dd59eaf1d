"""Local data files: finding them from a `--data` spec and checking them before `datasets` reads them.

Supported formats (the text field is always "text"):

* `.txt`: UTF-8 text; every blank-line-separated paragraph is one document (`datasets`' "text" builder
  with `sample_by="paragraph"`). A file with no blank lines is therefore one document.
* `.jsonl`, `.jsonl.gz`, `.jsonl.zst`: JSON Lines, one object per line with a string field "text"; other
  fields are ignored. Every line is checked with `json.loads` first, so a bad record is reported by file
  and line number instead of deep inside the Arrow reader.
* `.parquet`: a string column "text".

A spec is a file, a directory (every supported file below it, recursively, in sorted order; hidden
files and folders are skipped), a glob (`data/*.jsonl`, `**` allowed), or a comma-separated list of these.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

# Longest suffixes first, so "x.jsonl.zst" is not mistaken for something ending in ".zst" alone.
FORMATS: dict[str, str] = {
    ".jsonl.zst": "json",
    ".jsonl.gz": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
}
SUPPORTED = ", ".join(FORMATS)
_GLOB_CHARACTERS = set("*?[")
_CHUNK_BYTES = 1 << 20


@dataclass
class DataFiles:
    """Checked local files, grouped by the `datasets` builder that reads them (in file order)."""

    paths: list[Path]
    groups: list[tuple[str, list[Path]]]  # (builder, files) for consecutive runs of one builder
    extra_json_fields: set[str] = field(default_factory=set)  # non-"text" fields seen in JSON records
    documents: int = 0  # non-empty documents counted during the check (rows, for Parquet)


def file_format(path: Path) -> str | None:
    """The `datasets` builder for a file name, or None if the extension is not supported."""
    name = path.name.lower()
    return next((builder for suffix, builder in FORMATS.items() if name.endswith(suffix)), None)


def _supported_files_under(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and file_format(path)
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def resolve_data_files(spec: str) -> list[Path]:
    """The files a local `--data` spec names, in order, without duplicates. ValueError if any part is wrong."""
    entries = [spec] if Path(spec).expanduser().exists() else [part.strip() for part in spec.split(",") if part.strip()]
    if not entries:
        raise ValueError("--data is empty: give 'builtin', 'hf:<dataset>', or a file, directory or glob")
    paths: list[Path] = []
    for entry in entries:
        expanded = str(Path(entry).expanduser())
        if _GLOB_CHARACTERS & set(entry):
            matches = [Path(match) for match in sorted(glob.glob(expanded, recursive=True))]
            if not matches:
                raise ValueError(f"{entry}: the pattern matched no files")
            found = [f for m in matches for f in (_supported_files_under(m) if m.is_dir() else [m]) if file_format(f)]
            if not found:
                raise ValueError(f"{entry}: the pattern matched {len(matches)} paths but no {SUPPORTED} files")
            paths.extend(found)
            continue
        path = Path(expanded)
        if path.is_dir():
            found = _supported_files_under(path)
            if not found:
                raise ValueError(f"{entry}: the directory holds no data files (supported: {SUPPORTED})")
            paths.extend(found)
        elif path.is_file():
            if not file_format(path):
                raise ValueError(f"{entry}: unsupported data file extension (supported: {SUPPORTED})")
            paths.append(path)
        else:
            raise ValueError(f"{entry}: no such file or directory")
    return list(dict.fromkeys(paths))


def _open_binary(path: Path) -> io.BufferedIOBase:
    name = path.name.lower()
    if name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(
            zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True, closefd=True)
        )
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _check_text_file(path: Path) -> int:
    """Decode the whole file as UTF-8; return 1 if it holds any non-blank text, else 0."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, has_text = 0, False
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            try:
                has_text = bool(decoder.decode(chunk).strip()) or has_text
            except UnicodeDecodeError as error:
                raise ValueError(f"cannot read {path}: not UTF-8 text (byte {offset + error.start})") from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(f"cannot read {path}: not UTF-8 text (it ends inside a character)") from None
    return int(has_text)


def _check_jsonl_file(path: Path, extra_fields: set[str]) -> int:
    """Check every line; return the number of records with non-blank text."""
    documents = 0
    with _open_binary(path) as lines:
        for line_number, raw_line in enumerate(lines, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"cannot read {path}: line {line_number} is not UTF-8 text") from None
            if not line.strip():
                raise ValueError(
                    f"{path} line {line_number}: blank line; JSON Lines needs one JSON object on every line"
                )
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path} line {line_number}: malformed JSON ({error.msg} at column {error.colno})"
                ) from None
            text = record.get("text") if isinstance(record, dict) else None
            if isinstance(text, str):
                extra_fields.update(key for key in record if key != "text")
                documents += bool(text.strip())
                continue
            if not isinstance(record, dict):
                problem = f'a JSON {type(record).__name__}, not an object with a "text" string'
            elif text is None:
                problem = 'the record has no "text" field; it needs a "text" string'
            else:
                problem = f'the record has "text" of type {type(text).__name__}; it needs a "text" string'
            raise ValueError(f"{path} line {line_number}: {problem}")
    return documents


def _check_parquet_file(path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"cannot read {path}: not a readable Parquet file ({_first_line(error)})") from None
    schema = parquet.schema_arrow
    index = schema.get_field_index("text")
    if index < 0 or not (
        pa.types.is_string(schema.field(index).type) or pa.types.is_large_string(schema.field(index).type)
    ):
        raise ValueError(f'{path}: no "text" string column (columns: {", ".join(schema.names) or "none"})')
    return parquet.metadata.num_rows


def check_data_files(paths: list[Path]) -> DataFiles:
    """Read every file once and raise a one-line ValueError naming the file (and line) on the first problem."""
    files = DataFiles(paths=paths, groups=[])
    for path in paths:
        builder = file_format(path)
        try:
            if builder == "text":
                files.documents += _check_text_file(path)
            elif builder == "json":
                files.documents += _check_jsonl_file(path, files.extra_json_fields)
            else:
                files.documents += _check_parquet_file(path)
        except ValueError:
            raise
        except Exception as error:  # noqa: BLE001  (PermissionError, a corrupt .gz/.zst stream: all unreadable)
            raise ValueError(f"cannot read {path}: {_first_line(error)}") from None
        if files.groups and files.groups[-1][0] == builder:
            files.groups[-1][1].append(path)
        else:
            files.groups.append((builder, [path]))
    if files.documents == 0:
        where = str(paths[0]) if len(paths) == 1 else f"{len(paths)} files ({paths[0]}, ...)"
        raise ValueError(f"no documents in {where}: the data holds no non-blank text")
    return files


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
