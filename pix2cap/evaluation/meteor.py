"""Batched METEOR 1.5 scoring through the jar that ships with ``pycocoevalcap``.

The jar is driven in its ``-stdio`` mode, the same protocol ``pycocoevalcap.meteor.Meteor``
uses: for every (candidate, references) pair one line ``SCORE ||| ref_1 ||| ... ||| ref_n |||
candidate`` answers with a line of sufficient statistics; a line ``EVAL ||| stats_1 ||| ... |||
stats_m`` answers with the m per-pair scores followed by one corpus-level score (computed from
the summed statistics, not the mean of the per-pair scores).

Unlike ``pycocoevalcap``'s wrapper, which waits for the answer to each ``SCORE`` line before
writing the next, :class:`MeteorScorer` streams all lines from a writer thread while the main
thread reads the answers: one java process scores thousands of pairs per call without a
round trip per pair and without the pipe dead-lock that writing everything first would cause
(java blocks on a full stdout pipe while we block on a full stdin pipe).

Loading the jar's paraphrase table takes 5-20 s of CPU, so a scorer is meant to be created
once per evaluation and reused for every call; the process starts in ``__init__`` so that its
start-up overlaps with whatever the caller does next.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from typing import Iterable, Optional, Sequence

__all__ = ["MeteorScorer", "JavaNotFoundError", "meteor_jar_path", "normalize_meteor_text"]

logger = logging.getLogger(__name__)

_JAVA_HINT = (
    "METEOR (and the PTB tokenizer of pycocoevalcap) needs a Java runtime: install one with "
    "`apt-get install default-jre-headless` (or put `java` on PATH)"
)
# Scores per EVAL line: bounded so one line stays a few hundred KB however many pairs come in.
_EVAL_CHUNK = 2000
_WHITESPACE = re.compile(r"\s+")


class JavaNotFoundError(RuntimeError):
    """``java`` is not on PATH; the message says how to install it."""


def meteor_jar_path() -> str:
    """Absolute path of ``meteor-1.5.jar`` inside the installed ``pycocoevalcap``.

    Raises:
        FileNotFoundError: ``pycocoevalcap`` is not installed or lacks the jar.
    """
    try:
        import pycocoevalcap
    except ImportError as e:
        raise FileNotFoundError(
            "METEOR needs the `pycocoevalcap` package (it ships meteor-1.5.jar): "
            "pip install pycocoevalcap"
        ) from e
    for root in list(getattr(pycocoevalcap, "__path__", [])):
        candidate = os.path.join(root, "meteor", "meteor-1.5.jar")
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise FileNotFoundError(
        f"meteor-1.5.jar not found under pycocoevalcap ({list(pycocoevalcap.__path__)}); "
        "reinstall pycocoevalcap"
    )


def find_java() -> str:
    """Path of the ``java`` executable; raises :class:`JavaNotFoundError` if there is none."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(f"`java` was not found on PATH. {_JAVA_HINT}.")
    return java


def normalize_meteor_text(text: str) -> str:
    """Lower-case ``text``, remove the protocol separator ``|||`` and line breaks (either would
    corrupt the line protocol) and collapse runs of whitespace."""
    if not isinstance(text, str):
        raise TypeError(f"METEOR input must be a str, got {type(text).__name__}: {text!r}")
    text = text.replace("|||", " ")
    return _WHITESPACE.sub(" ", text.lower()).strip()


class MeteorScorer:
    """One METEOR 1.5 java process scoring many (candidate, references) pairs per call.

    Use as a context manager (or call :meth:`close`) so the process ends::

        with MeteorScorer() as meteor:
            scores = meteor([("a red circle", ["a red circle"]), ("a cat", ["a blue square"])])

    Not thread-safe: one call at a time.

    Args:
        jar_path: the jar; default: the one shipped in ``pycocoevalcap``.
        max_memory: the JVM heap limit (``-Xmx``), as ``pycocoevalcap`` sets it.
        language: METEOR's language option.
    """

    def __init__(
        self,
        jar_path: Optional[str] = None,
        max_memory: str = "2G",
        language: str = "en",
    ):
        self._java = find_java()
        self._jar = os.path.abspath(jar_path) if jar_path else meteor_jar_path()
        if not os.path.isfile(self._jar):
            raise FileNotFoundError(f"METEOR jar {self._jar} does not exist")
        # Same options as pycocoevalcap: read stdin, write stdout, normalise (tokenise and
        # lower-case) both sides, so scores agree with the COCO caption toolkit.
        self._cmd = [
            self._java, "-jar", f"-Xmx{max_memory}", self._jar,
            "-", "-", "-stdio", "-l", language, "-norm",
        ]  # fmt: skip
        self._proc: Optional[subprocess.Popen] = None
        self._stderr_file = None
        self._start()

    # ----------------------------------------------------------------------------- process
    def _start(self) -> None:
        # stderr goes to a file: a pipe nobody reads could fill up and stall the JVM.
        self._stderr_file = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            self._cmd,
            cwd=os.path.dirname(self._jar),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr_file,
        )

    def _stderr_text(self) -> str:
        if self._stderr_file is None:
            return ""
        try:
            self._stderr_file.seek(0)
            return self._stderr_file.read().decode("utf-8", "replace")[-2000:]
        except (OSError, ValueError):
            return ""

    def close(self) -> None:
        """End the java process (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if self._stderr_file is not None:
            self._stderr_file.close()
            self._stderr_file = None

    def __enter__(self) -> "MeteorScorer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass

    # ----------------------------------------------------------------------------- protocol
    def _exchange(self, lines: Sequence[str], num_answers: int) -> list[str]:
        """Write ``lines`` from a thread while reading ``num_answers`` answer lines."""
        if self._proc is None:
            self._start()
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        write_error: list[BaseException] = []

        def _write() -> None:
            try:
                for line in lines:
                    proc.stdin.write(line.encode("utf-8") + b"\n")
                proc.stdin.flush()
            except BaseException as e:  # reported by the reader below
                write_error.append(e)

        writer = threading.Thread(target=_write, name="meteor-writer", daemon=True)
        writer.start()
        answers = []
        for _ in range(num_answers):
            raw = proc.stdout.readline()
            if not raw:
                writer.join(timeout=1)
                self.close()
                raise RuntimeError(
                    "the METEOR java process ended unexpectedly"
                    + (f" ({write_error[0]!r})" if write_error else "")
                    + f"; its stderr: {self._stderr_text() or '<empty>'}"
                )
            answers.append(raw.decode("utf-8").strip())
        writer.join()
        if write_error:
            raise RuntimeError(f"writing to the METEOR process failed: {write_error[0]!r}")
        return answers

    def _stats(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
        lines = []
        for index, pair in enumerate(pairs):
            try:
                candidate, references = pair
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"METEOR pair {index} must be (candidate, [references]), got {pair!r}"
                ) from e
            if isinstance(references, str):
                raise TypeError(
                    f"METEOR pair {index}: references must be a list of strings, got the "
                    f"string {references!r}"
                )
            refs = [normalize_meteor_text(r) for r in references]
            if not refs:
                raise ValueError(f"METEOR pair {index} has no reference caption")
            lines.append(" ||| ".join(["SCORE", *refs, normalize_meteor_text(candidate)]))
        return self._exchange(lines, len(lines))

    def score_corpus(
        self, pairs: Sequence[tuple[str, Sequence[str]]]
    ) -> tuple[float, list[float]]:
        """Score all pairs in one ``EVAL`` line.

        Args:
            pairs: ``(candidate, [reference, ...])``; texts are lower-cased and stripped of
                ``|||`` and line breaks.
        Returns:
            ``(corpus_score, per_pair_scores)``; the corpus score is METEOR on the summed
            statistics (what ``pycocoevalcap``'s ``Meteor.compute_score`` reports), 0.0 for no
            pairs.
        """
        pairs = list(pairs)
        if not pairs:
            return 0.0, []
        stats = self._stats(pairs)
        answers = self._exchange([" ||| ".join(["EVAL", *stats])], len(stats) + 1)
        return float(answers[-1]), [float(a) for a in answers[:-1]]

    def score(self, pairs: Iterable[tuple[str, Sequence[str]]]) -> list[float]:
        """Per-pair METEOR scores in [0, 1], in the order of ``pairs``.

        Args:
            pairs: ``(candidate, [reference, ...])``.
        """
        pairs = list(pairs)
        if not pairs:
            return []
        stats = self._stats(pairs)
        eval_lines = []
        num_answers = 0
        for start in range(0, len(stats), _EVAL_CHUNK):
            chunk = stats[start : start + _EVAL_CHUNK]
            eval_lines.append(" ||| ".join(["EVAL", *chunk]))
            num_answers += len(chunk) + 1  # per-pair scores, then the chunk's corpus score
        answers = self._exchange(eval_lines, num_answers)
        scores: list[float] = []
        position = 0
        for start in range(0, len(stats), _EVAL_CHUNK):
            size = min(_EVAL_CHUNK, len(stats) - start)
            scores.extend(float(a) for a in answers[position : position + size])
            position += size + 1
        return scores

    __call__ = score
