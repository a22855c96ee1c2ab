"""The course homework format: a CSV file with columns ``id, instruction, output[, fail_mode]``,
read as pairs (:func:`read_csv`) and written, e.g. as ``generate.py --predict``'s answers
(:func:`write_csv_atomic`).

``id`` is kept as given (it is the homework's own key, so it must be non-empty and
unique). The optional ``fail_mode`` column labels pairs written to be bad in a known
way (e.g. "off-topic", "promotional"); it is kept in ``Pair.meta["fail_mode"]`` so a
curation run can be checked against it. Nothing is filtered: a deliberately bad row
is data, not an error. Extra columns are ignored.

(Named ``csvfile`` rather than ``csv`` so it can never shadow Python's ``csv`` module.)
"""
from __future__ import annotations

import csv
from pathlib import Path

from data.hub import resolve
from data.pairs import DataError, Pair, atomic_writer

REQUIRED_COLUMNS = ("id", "instruction", "output")


def read_csv(source: str | Path) -> tuple[list[Pair], dict[str, int]]:
    """Pairs from a homework CSV (header row required).

    Returns:
        (pairs, stats) with stats keys ``rows``, ``kept`` and ``with_fail_mode`` (rows
        whose ``fail_mode`` is non-empty).
    """
    path = resolve(source, None)
    try:
        # newline="" lets the csv module handle line breaks inside quoted fields.
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's BOM
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            if not columns:
                raise DataError(f"{path}: file is empty; expected a header row {list(REQUIRED_COLUMNS)}")
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise DataError(
                    f"{path}: missing column(s) {missing}; expected columns "
                    f"'id, instruction, output[, fail_mode]', found {columns}"
                )
            reader.fieldnames = columns  # tolerate " output" style headers
            pairs: list[Pair] = []
            seen: set[str] = set()
            with_fail_mode = 0
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row or any(row[c] is None for c in REQUIRED_COLUMNS):
                    raise DataError(f"{where}: expected {len(columns)} fields, as in the header")
                pair_id = row["id"].strip()
                if not pair_id:
                    raise DataError(f"{where}: empty 'id'")
                if pair_id in seen:
                    raise DataError(f"{where}: duplicate id {pair_id!r}; ids must be unique")
                seen.add(pair_id)
                fail_mode = (row.get("fail_mode") or "").strip()
                with_fail_mode += bool(fail_mode)
                pairs.append(Pair(
                    id=pair_id,
                    instruction=row["instruction"].strip(),
                    output=row["output"].strip(),
                    source="csv",
                    meta={"fail_mode": fail_mode} if fail_mode else {},
                ))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e})") from None
    if not pairs:
        raise DataError(f"{path}: no rows after the header")
    return pairs, dict(rows=len(pairs), kept=len(pairs), with_fail_mode=with_fail_mode)


def write_csv_atomic(path: str | Path, rows: list[dict[str, str]], columns: list[str]) -> None:
    """Write rows (dicts with the keys ``columns``) as a CSV with a header, in one step
    (:func:`data.pairs.atomic_writer`: a temporary file, then a rename)."""
    with atomic_writer(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
