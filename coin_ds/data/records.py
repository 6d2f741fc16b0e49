"""Training records: load, validate, save.

A record is one (instruction, input, output) instance of a task, optionally with alternative wordings of its
instruction (`paraphrases`) that become COIN positives. Files are JSONL (also CSV, Parquet, or a `datasets` directory
saved with `save_to_disk`). Every problem names the file, the line (1-based, as an editor shows it) and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

REQUIRED = ("task", "instruction", "input", "output")
OPTIONAL = ("paraphrases",)


class RecordError(ValueError):
    """A bad record: names the file, the line and the field."""

    def __init__(self, path: str | Path, line: int | None, fieldname: str | None, message: str):
        self.path, self.line, self.field = str(path), line, fieldname
        where = f"{path}" + (f", line {line}" if line is not None else "") + (f", field '{fieldname}'" if fieldname else "")
        super().__init__(f"{where}: {message}")


@dataclass
class Record:
    task: str
    instruction: str
    input: str
    output: str
    paraphrases: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def record_from_dict(obj: object, path: str | Path = "<memory>", line: int | None = None,
                     allow_extra: bool = True) -> Record:
    """Validate one decoded object and turn it into a Record; raise RecordError naming what is wrong."""
    if not isinstance(obj, dict):
        raise RecordError(path, line, None, f"expected a JSON object, got {type(obj).__name__}")
    for name in REQUIRED:
        if name not in obj or obj[name] is None:
            raise RecordError(path, line, name, "missing required field")
        if not isinstance(obj[name], str):
            raise RecordError(path, line, name, f"expected a string, got {type(obj[name]).__name__}")
    for name in ("task", "instruction", "output"):
        if not obj[name].strip():
            raise RecordError(path, line, name, "empty string")
    paraphrases = obj.get("paraphrases") or []
    if isinstance(paraphrases, str):
        paraphrases = [paraphrases]
    if not isinstance(paraphrases, list) or not all(isinstance(p, str) for p in paraphrases):
        raise RecordError(path, line, "paraphrases", "expected a list of strings")
    if not allow_extra:
        extra = sorted(set(obj) - set(REQUIRED) - set(OPTIONAL))
        if extra:
            raise RecordError(path, line, extra[0], "unknown field")
    paraphrases = [p for p in paraphrases if p.strip() and p != obj["instruction"]]
    return Record(obj["task"], obj["instruction"], obj["input"], obj["output"], paraphrases)


def check_label(record: Record, label_words: dict[str, list[str] | tuple[str, ...]], path: str | Path = "<memory>",
                line: int | None = None) -> None:
    """A record of a task with known label words (an embedded task) must answer with one of them.

    Records of other tasks are the user's own and pass: training accepts any task name. A wrong label is an error,
    not a skip, because dropping such records would silently change the task's label balance."""
    words = label_words.get(record.task)
    if words is not None and record.output.strip() not in words:
        raise RecordError(path, line, "output", f"{record.output!r} is not a label word of task {record.task!r} "
                                                f"({', '.join(words)})")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, decoded object) for each non-blank line; bad JSON or bytes raise RecordError."""
    path = Path(path)
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError(path, lineno, None, f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                raise RecordError(path, lineno, None, f"malformed JSON: {e.msg} (column {e.colno})") from None


def _iter_table_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """CSV / Parquet / datasets-on-disk via `datasets`; line numbers count the header as line 1 for CSV."""
    import datasets

    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        first = 1
    elif path.suffix == ".csv":
        ds = datasets.load_dataset("csv", data_files=str(path), split="train", keep_default_na=False)
        first = 2
    elif path.suffix in (".parquet", ".pq"):
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        first = 1
    else:
        raise RecordError(path, None, None, "unknown format: use .jsonl, .json, .csv, .parquet or a datasets directory")
    for i, row in enumerate(ds):
        row = dict(row)
        if isinstance(row.get("paraphrases"), str):
            text = row["paraphrases"].strip()
            row["paraphrases"] = json.loads(text) if text.startswith("[") else ([text] if text else [])
        yield first + i, row


def load_records(path: str | Path, allow_extra: bool = True,
                 label_words: dict[str, list[str] | tuple[str, ...]] | None = None) -> list[Record]:
    """Load and validate every record of a file; the first bad one raises RecordError.

    `label_words` ({task: words}): records of those tasks must answer with one of their words (`check_label`)."""
    path = Path(path)
    if not path.exists():
        raise RecordError(path, None, None, "file not found")
    rows = iter_jsonl(path) if path.suffix in (".jsonl", ".json") and path.is_file() else _iter_table_rows(path)
    records = []
    for lineno, obj in rows:
        record = record_from_dict(obj, path, lineno, allow_extra)
        if label_words:
            check_label(record, label_words, path, lineno)
        records.append(record)
    if not records:
        raise RecordError(path, None, None, "no records in file")
    return records


def save_records(records: Iterable[Record], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    tmp.replace(path)
