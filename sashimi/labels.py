"""Labels read from file paths, and their vocabularies: what a clip is (a digit, a voice, a class).

    spec = LabelSpec.parse("folder")                              # drums/kick/a.wav -> class=drums
    spec = LabelSpec.parse(r"(?P<digit>\\d)_(?P<speaker>[a-z]+)_")  # 7_nicolas_3.wav -> digit, speaker
    spec.read("7_nicolas_3.wav")            # {"digit": "7", "speaker": "nicolas"}, None: no match
    vocabulary = build_vocabulary(fields, [labels of each training file])  # field -> {value: count}
    label_indices(vocabulary, {"digit": "7"})                     # [8, 0]: speaker unknown

Every field has its own embedding with one extra entry, UNKNOWN, for "not given": files that match
nothing, values never seen in training, label dropout, and sampling with some fields left open.
Value v of a field has index 1 + its position in the sorted values, so indices depend only on the
vocabulary stored in config.json.
"""

import logging
import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)

UNKNOWN = 0  # index of "not given" in every field
FOLDER = "folder"  # the spec that labels a file by its first folder under the data root
FOLDER_FIELD = "class"

Vocabulary = dict[str, dict[str, int]]  # field -> {value: number of training files}, values sorted
Labels = dict[str, str]  # field -> value, for one clip; a missing field is unknown


@dataclass(frozen=True)
class LabelSpec:
    """Where labels come from: `folder`, or a regular expression whose named groups are fields,
    searched in each file's path relative to the data folder (with "/" separators)."""

    text: str
    pattern: re.Pattern | None  # None: the folder spec

    @classmethod
    def parse(cls, text: str) -> "LabelSpec":
        if text == FOLDER:
            return cls(text, None)
        try:
            pattern = re.compile(text)
        except re.error as error:
            raise ValueError(f"--labels {text!r} is not a regular expression: {error}") from None
        if not pattern.groupindex:
            raise ValueError(
                f"--labels {text!r} has no named group; name each field, e.g. "
                r"'(?P<digit>\d)_(?P<speaker>[a-z]+)_', or use 'folder'"
            )
        return cls(text, pattern)

    @property
    def fields(self) -> tuple[str, ...]:
        if self.pattern is None:
            return (FOLDER_FIELD,)
        return tuple(sorted(self.pattern.groupindex, key=self.pattern.groupindex.get))

    def read(self, path: str) -> Labels | None:
        """The labels of the file at `path` (relative to the data folder), or None if it has none.
        A group that did not take part in the match leaves its field unknown."""
        if self.pattern is None:
            folder, sep, _ = path.partition("/")
            return {FOLDER_FIELD: folder} if sep else None
        match = self.pattern.search(path)
        if match is None:
            return None
        return {k: v for k, v in match.groupdict().items() if v is not None}


def read_labels(
    spec: LabelSpec, paths: list[str], what: str, vocabulary: Vocabulary | None = None
) -> list[Labels | None]:
    """spec.read of each path. Files that match nothing, and (given the training `vocabulary`)
    values it does not hold, are reported in one warning each: they count as unknown, never
    dropped."""
    labels = [spec.read(path) for path in paths]
    unmatched = [path for path, clip in zip(paths, labels, strict=True) if clip is None]
    if unmatched:
        log.warning(
            f"{len(unmatched):,} of {len(paths):,} {what} files match no label of --labels "
            f"{spec.text!r} and count as unlabelled, e.g. {', '.join(unmatched[:3])}"
        )
    if vocabulary is not None:
        unseen = Counter(
            f"{field}={value}"
            for clip in labels
            for field, value in (clip or {}).items()
            if value not in vocabulary.get(field, {})
        )
        if unseen:
            shown = ", ".join(f"{v} ({n:,} files)" for v, n in unseen.most_common(5))
            log.warning(f"{what} label values never seen in training count as unknown: {shown}")
    return labels


def build_vocabulary(fields: tuple[str, ...], labels: list[Labels | None]) -> Vocabulary:
    """Every value of each field seen in `labels`, sorted, with the number of files holding it."""
    counts = {field: Counter() for field in fields}
    for clip in labels:
        for field, value in (clip or {}).items():
            counts[field][value] += 1
    return {field: {v: counts[field][v] for v in sorted(counts[field])} for field in fields}


def describe(vocabulary: Vocabulary) -> str:
    """One line per field, e.g. "digit (10 values): 0 (180), 1 (180), ..."."""
    lines = []
    for field, values in vocabulary.items():
        shown = ", ".join(f"{v} ({n:,})" for v, n in values.items())
        lines.append(f"{field} ({len(values)} values): {shown}")
    return "\n".join(lines)


def check_labels(vocabulary: Vocabulary, labels: Labels) -> None:
    """ValueError for a field or value the checkpoint does not know, naming the known ones."""
    if labels and not vocabulary:
        raise ValueError(
            f"labels {labels} asked for, but this checkpoint was trained without labels"
        )
    for field, value in labels.items():
        if field not in vocabulary:
            raise ValueError(
                f"unknown label field {field!r}; this checkpoint has {list(vocabulary)}"
            )
        if value not in vocabulary[field]:
            known = ", ".join(vocabulary[field])
            raise ValueError(f"unknown {field} {value!r}; known values: {known}")


def label_indices(vocabulary: Vocabulary, labels: Labels | None) -> list[int]:
    """The index of each field's value (UNKNOWN where not given or not in the vocabulary)."""
    labels = labels or {}
    indices = []
    for field, values in vocabulary.items():
        order = list(values)
        value = labels.get(field)
        indices.append(order.index(value) + 1 if value in values else UNKNOWN)
    return indices


def label_tensor(vocabulary: Vocabulary, labels: list[Labels | None]) -> Tensor:
    """(len(labels), n_fields) long: label_indices of each clip."""
    return torch.tensor(
        [label_indices(vocabulary, clip) for clip in labels], dtype=torch.long
    ).reshape(len(labels), len(vocabulary))


def drop_labels(labels: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Label dropout: each entry of labels (batch, n_fields) becomes UNKNOWN with probability p,
    so one model learns every subset of fields, and guidance has an unconditional stream."""
    drop = torch.rand(labels.shape, generator=generator) < p
    return labels.masked_fill(drop, UNKNOWN)


def parse_assignments(assignments: list[str]) -> Labels:
    """["digit=7", "speaker=nicolas"] (command-line --label flags) -> {"digit": "7", ...}."""
    labels = {}
    for text in assignments:
        field, sep, value = text.partition("=")
        if not sep or not field or not value:
            raise ValueError(f"--label takes FIELD=VALUE, e.g. digit=7; got {text!r}")
        labels[field] = value
    return labels


def labels_slug(labels: Labels) -> str:
    """A file-name part for some labels: "digit-7_speaker-nicolas" ("" for none)."""

    def safe(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9.-]+", "-", text)

    return "_".join(f"{safe(field)}-{safe(value)}" for field, value in labels.items())
