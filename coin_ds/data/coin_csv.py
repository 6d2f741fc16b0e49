"""Import the official CoIN training CSV (luka-group/CoIN, `dataset/contrastive_flan_data.csv`).

Each row holds `original_instruction` and `paraphrased_instruction` (both the instruction *already rendered with its
input*), `targets` (the output) and the task name; the row at each odd index (0-based) is the hard negative of the row
above it. We turn each row into a Record whose instruction is the rendered original, whose input is empty (the
official file does not keep them apart) and whose only paraphrase is the rendered positive, plus a map from record
index to the index of its hard negative.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from coin_ds.data.records import Record, RecordError

REQUIRED_COLUMNS = ("original_instruction", "paraphrased_instruction", "targets")
# The README of the official repository says "task name" without naming the column; these are the spellings seen.
TASK_COLUMNS = ("task_name", "task", "_task_name", "name", "dataset")


def import_coin_csv(path: str | Path) -> tuple[list[Record], dict[int, int]]:
    """Records plus {record index: index of its hard-negative record}.

    The map holds both directions of each adjacent pair (0<->1, 2<->3, ...): in the official trainer a micro-batch is
    exactly such a pair and the symmetric loss uses each row as the other's negative. A final unpaired row (odd row
    count) gets no entry. Bad rows raise RecordError with the file, the line where the row starts, and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise RecordError(path, None, None, "file not found")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # rendered inputs can be long passages
    records: list[Record] = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        for name in REQUIRED_COLUMNS:
            if name not in header:
                raise RecordError(path, 1, name, f"missing column (columns: {', '.join(header) or 'none'})")
        task_col = next((c for c in TASK_COLUMNS if c in header), None)
        if task_col is None:
            raise RecordError(path, 1, "task_name", f"no task-name column; expected one of {', '.join(TASK_COLUMNS)}")
        # quoted fields may span lines, so the line a row starts on is one past where the previous row ended
        start = reader.line_num + 1
        for row in reader:
            if None in row:
                raise RecordError(path, start, None, f"{len(header) + len(row[None])} fields, header has {len(header)}")
            for name in (*REQUIRED_COLUMNS, task_col):
                if row.get(name) is None or not row[name].strip():
                    raise RecordError(path, start, name, "empty value")
            para = row["paraphrased_instruction"]
            records.append(Record(row[task_col].strip(), row["original_instruction"], "", row["targets"],
                                  [para] if para != row["original_instruction"] else []))
            start = reader.line_num + 1
    if not records:
        raise RecordError(path, None, None, "no rows in file")
    negatives: dict[int, int] = {}
    for i in range(0, len(records) - 1, 2):
        negatives[i], negatives[i + 1] = i + 1, i
    return records, negatives
