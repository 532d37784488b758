"""The validation split BY SUBJECT for ``medldm plan`` (scans of one subject, one pixel hash or one listed folder
stay on one side; extra copies are left out)."""

from __future__ import annotations

import hashlib
from typing import Any


def split_by_subject(scans: list[dict], val_fraction: float = 0.2, seed: int = 0) -> dict[str, Any]:
    """Group scans that must stay on one side (same subject, same pixel hash, or listed through one folder),
    hold out ~``val_fraction`` of the groups (seeded hash order) and return the ``data.train`` / ``data.val``
    entries: NIfTI files, and for DICOM series the folder holding their files."""
    parent = list(range(len(scans)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        parent[find(i)] = find(j)

    unit = [s["paths"][0] if s["kind"] == "nifti" else s["folder"] for s in scans]
    first: dict[tuple[str, str], int] = {}
    for i, s in enumerate(scans):
        for key in (("subject", s["subject"]), ("hash", s["pixel_hash"]), ("unit", unit[i])):
            if key in first:
                union(i, first[key])
            else:
                first[key] = i
    folders = sorted({u for i, u in enumerate(unit) if scans[i]["kind"] != "nifti"})
    for i, u in enumerate(unit):  # a listed folder pulls in everything below it
        for f in folders:
            if u != f and (u + "/").startswith(f.rstrip("/") + "/"):
                union(i, first[("unit", f)])
    groups: dict[int, list[int]] = {}
    for i in range(len(scans)):
        groups.setdefault(find(i), []).append(i)
    # copies: keep the first of each pixel hash; a NIfTI file that only duplicates another scan is left out
    seen: dict[str, str] = {}
    dropped = []
    for s in sorted(scans, key=lambda s: s["id"]):
        if s["pixel_hash"] in seen and s["kind"] == "nifti":
            dropped.append(f"{s['id']} (same pixels as {seen[s['pixel_hash']]})")
        seen.setdefault(s["pixel_hash"], s["id"])
    drop_ids = {d.split(" ")[0] for d in dropped}
    drop_ids |= {s["id"] for s in scans if s["constant"] and s["kind"] == "nifti"}
    keys = sorted(groups, key=lambda g: hashlib.sha256(f"{seed}:{min(scans[i]['id'] for i in groups[g])}"
                                                       .encode()).hexdigest())
    n_val = 0 if len(keys) < 2 or val_fraction <= 0 else min(len(keys) - 1, max(1, round(val_fraction * len(keys))))
    val_groups = set(keys[:n_val])

    def entries(gs: set[int]) -> list[str]:
        units = sorted({unit[i] for g in gs for i in groups[g] if scans[i]["id"] not in drop_ids})
        fold = [u for u in units if u in folders]
        return [u for u in units if not any(u != f and (u + "/").startswith(f.rstrip("/") + "/") for f in fold)]

    train_g, val_g = set(keys) - val_groups, val_groups
    subj = {g: sorted({scans[i]["subject"] for i in groups[g]}) for g in keys}
    return {"train": entries(train_g), "val": entries(val_g), "n_groups": len(keys),
            "train_subjects": sorted(x for g in train_g for x in subj[g]),
            "val_subjects": sorted(x for g in val_g for x in subj[g]),
            "val_scans": sorted(scans[i]["id"] for g in val_g for i in groups[g]), "dropped": dropped}


