"""The audit's outputs: a CSV per finding, the suggested exclusions, the pictures and audit.md,
which puts the findings first (leaks across splits first of all) and ends with what each part
took."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferkit.audit.duplicates import Pair, is_leak
from transferkit.audit.items import Item, label_text, shown_path
from transferkit.audit.label_issues import LabelIssue
from transferkit.audit.outliers import Outlier
from transferkit.audit.pictures import draw_grid, short

FILES = {
    "report": "audit.md",
    "duplicates": "duplicates.csv",
    "label_issues": "label_issues.csv",
    "outliers": "outliers.csv",
    "classes": "classes.csv",
    "unreadable": "unreadable.csv",
    "exclude": "exclude_suggested.txt",
}


@dataclass
class Findings:
    root: Path
    class_names: list[str]
    items: list[Item]
    pairs: list[Pair]
    label_issues: list[LabelIssue]
    outliers: list[Outlier]
    counts: dict[str, dict[str, int]]
    imbalance: float | None
    images: dict[str, Any]
    unreadable: dict[Path, str]
    exclude: list[Path]
    train_command: str
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the audit adapted to this data

    def path(self, index: int) -> str:
        return shown_path(self.items[index].path, self.root)

    def label(self, index: int) -> str:
        return label_text(self.items[index].label, self.class_names)

    @property
    def leaks(self) -> list[Pair]:
        return [p for p in self.pairs if is_leak(p, self.items)]


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_csvs(found: Findings, out: Path) -> None:
    _write_csv(
        out / FILES["duplicates"],
        ["path_a", "path_b", "split_a", "split_b", "similarity", "kind", "feature_similarity",
         "pixel_similarity", "label_a", "label_b"],
        [
            [found.path(p.a), found.path(p.b), found.items[p.a].split, found.items[p.b].split,
             round(p.similarity, 4), p.kind, p.feature_similarity, p.pixel_similarity,
             found.label(p.a), found.label(p.b)]
            for p in found.pairs
        ],
    )  # fmt: skip
    _write_csv(
        out / FILES["label_issues"],
        ["path", "given", "suggested", "score", "split"],
        [
            [found.path(i.index), found.label(i.index), label_text(i.suggested, found.class_names),
             i.score, found.items[i.index].split]
            for i in found.label_issues
        ],
    )  # fmt: skip
    _write_csv(
        out / FILES["outliers"],
        ["path", "split", "label", "distance", "z"],
        [[found.path(o.index), found.items[o.index].split, found.label(o.index), o.distance, o.z]
         for o in found.outliers],
    )  # fmt: skip
    splits = list(next(iter(found.counts.values()), {}))
    _write_csv(
        out / FILES["classes"],
        ["class", *splits],
        [[name, *per_split.values()] for name, per_split in found.counts.items()],
    )
    _write_csv(
        out / FILES["unreadable"],
        ["path", "error"],
        [[shown_path(p, found.root), e] for p, e in found.unreadable.items()],
    )
    (out / FILES["exclude"]).write_text("".join(f"{shown_path(p, found.root)}\n" for p in found.exclude))


def draw_pictures(found: Findings, out: Path, show: int) -> dict[str, str]:
    """duplicates.png (pairs side by side), label_issues.png and outliers.png, each of the first
    `show` findings; returns the names of those drawn."""
    drawn = {}
    if found.pairs and show > 0:
        cells = []
        for n, p in enumerate(found.pairs[:show], 1):
            a, b = found.items[p.a], found.items[p.b]
            cells.append((a.path, f"#{n} {a.split}: {short(found.label(p.a), 20)}\n{short(found.path(p.a))}"))
            cells.append((b.path, f"{b.split}, {p.kind} {p.similarity:.3f}\n{short(found.path(p.b))}"))
        draw_grid(cells, out / "duplicates.png")
        drawn["duplicates"] = "duplicates.png"
    if found.label_issues and show > 0:
        cells = [
            (found.items[i.index].path,
             f"given: {short(found.label(i.index), 20)}\n"
             f"suggested: {short(label_text(i.suggested, found.class_names), 20)} ({i.score:.2f})\n"
             f"{short(found.path(i.index))}")
            for i in found.label_issues[:show]
        ]  # fmt: skip
        draw_grid(cells, out / "label_issues.png")
        drawn["label_issues"] = "label_issues.png"
    if found.outliers and show > 0:
        cells = [
            (found.items[o.index].path,
             f"{short(found.label(o.index), 20)} (z {o.z:.1f})\n{short(found.path(o.index))}")
            for o in found.outliers[:show]
        ]  # fmt: skip
        draw_grid(cells, out / "outliers.png")
        drawn["outliers"] = "outliers.png"
    return drawn


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines + [""]


def _pair_rows(found: Findings, pairs: Sequence[Pair]) -> list[list[Any]]:
    return [
        [f"`{found.path(p.a)}`", f"`{found.path(p.b)}`",
         f"{found.items[p.a].split} / {found.items[p.b].split}", p.kind, f"{p.similarity:.3f}"]
        for p in pairs
    ]  # fmt: skip


def markdown(found: Findings, pictures: dict[str, str], show: int) -> str:
    items, leaks = found.items, found.leaks
    within = [p for p in found.pairs if not is_leak(p, items)]
    issues = found.label_issues
    lines = [f"# Data audit of `{found.root}`", ""]
    lines += [f"{len(items)} images, {len(found.class_names)} classes.", ""]
    lines += [*(f"> {note}" for note in found.notes), ""] if found.notes else []
    lines += _table(
        ["finding", "count", "file"],
        [
            ["leaks: duplicates across splits", len(leaks), FILES["duplicates"]],
            ["duplicates within a split", len(within), FILES["duplicates"]],
            ["likely wrong labels", len(issues), FILES["label_issues"]],
            ["outliers", len(found.outliers), FILES["outliers"]],
            ["unreadable files", len(found.unreadable), FILES["unreadable"]],
            ["suggested exclusions", len(found.exclude), FILES["exclude"]],
        ],
    )
    header = ["path_a", "path_b", "splits", "kind", "similarity"]
    lines += [f"## Leaks across splits ({len(leaks)})", ""]
    lines += _table(header, _pair_rows(found, leaks[:show])) if leaks else ["None found.", ""]
    lines += [f"## Duplicates within a split ({len(within)})", ""]
    lines += _table(header, _pair_rows(found, within[:show])) if within else ["None found.", ""]
    if "duplicates" in pictures:
        lines += [f"The first {min(show, len(found.pairs))} pairs, side by side:", "",
                  f"![duplicates]({pictures['duplicates']})", ""]  # fmt: skip
    lines += [f"## Likely wrong labels ({len(issues)})", ""]
    if issues:
        lines += ["Most suspect first; score: cleanlab's label quality (0 to 1, lower: more suspect).", ""]
        lines += _table(
            ["path", "given", "suggested", "score"],
            [[f"`{found.path(i.index)}`", found.label(i.index), label_text(i.suggested, found.class_names),
              f"{i.score:.3f}"] for i in issues[:show]],
        )  # fmt: skip
        if "label_issues" in pictures:
            lines += [f"![label issues]({pictures['label_issues']})", ""]
    else:
        lines += ["None found.", ""]
    lines += [f"## Outliers ({len(found.outliers)})", ""]
    if found.outliers:
        lines += _table(
            ["path", "split", "label", "distance", "z"],
            [[f"`{found.path(o.index)}`", items[o.index].split, found.label(o.index), o.distance, o.z]
             for o in found.outliers[:show]],
        )  # fmt: skip
        if "outliers" in pictures:
            lines += [f"![outliers]({pictures['outliers']})", ""]
    else:
        lines += ["None found.", ""]
    lines += ["## Classes", ""]
    splits = list(next(iter(found.counts.values()), {}))
    lines += _table(["class", *splits], [[n, *c.values()] for n, c in found.counts.items()])
    ratio = "a class has no training images" if found.imbalance is None else f"{found.imbalance:g}"
    lines += [f"Imbalance (largest over smallest training class): {ratio}.", ""]
    lines += ["## Images", ""]
    summary = found.images
    if summary.get("images"):
        w, h = summary["width"], summary["height"]
        lines += [
            f"- width {w['min']} to {w['max']} px (median {w['median']}), height {h['min']} to {h['max']} px "
            f"(median {h['median']}); {summary['sizes']} distinct size(s)",
            "- modes: " + ", ".join(f"{k} {v}" for k, v in summary["modes"].items()),
            "- formats: " + ", ".join(f"{k} {v}" for k, v in summary["formats"].items()),
            "",
        ]
    lines += [f"## Unreadable files ({len(found.unreadable)})", ""]
    unreadable = [[f"`{shown_path(p, found.root)}`", e] for p, e in found.unreadable.items()]
    lines += _table(["path", "error"], unreadable) if unreadable else ["None.", ""]
    lines += ["## Act on it", ""]
    lines += [
        f"`{FILES['exclude']}` lists {len(found.exclude)} image(s): the train-side copy of each leak (for "
        "a val/test pair, the val copy), one image of each duplicate pair within a split, every likely "
        "wrong label and every unreadable file. Look through it, delete the lines you disagree with, "
        "then train without the rest:",
        "",
        "```bash",
        found.train_command,
        "```",
        "",
    ]
    lines += ["## Time taken", ""]
    lines += _table(["part", "seconds"], [[k, f"{v:.2f}"] for k, v in found.timings.items()])
    return "\n".join(lines)


def write_report(found: Findings, out: Path, show: int) -> dict[str, str]:
    """Every output file in `out`; returns {what: file name}."""
    out.mkdir(parents=True, exist_ok=True)
    write_csvs(found, out)
    pictures = draw_pictures(found, out, show)
    (out / FILES["report"]).write_text(markdown(found, pictures, show))
    return {**FILES, **pictures}
