"""One scalar tag over the steps, kept in bounded memory: :class:`Series` and its builder.

A series of up to ``limit`` points (:data:`CURVE_POINTS`) is kept whole. A longer one is
kept as an *envelope*: the steps are cut into at most ``limit // 4`` buckets of equal width
(a power of two, doubled as the run grows) and each bucket keeps its first, last, lowest and
highest point and its first non-finite one (the M4 reduction: a line through these points
draws, at the figure's width, the same picture as every point). Exact in every bucket:
the number of points, of non-finite ones, and the extremes with their steps, so the final
value, the best value, the range and every NaN survive. Points added by :meth:`Series.pin`
(a warning's step) are kept as they are.

Memory: a builder buffers at most :data:`FLUSH_POINTS` points, then folds them into the
buckets with numpy; a series never holds more than about ``limit`` points.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["CURVE_POINTS", "FLUSH_POINTS", "Series", "SeriesBuilder"]

#: Points a series keeps whole; a longer one keeps ``CURVE_POINTS // 4`` buckets.
CURVE_POINTS = 4096
#: Points a builder buffers before folding them in.
FLUSH_POINTS = 8192
_FIELDS = ("k", "fs", "fv", "ls", "lv", "los", "lov", "his", "hiv", "nfs", "nfv", "n", "nfn",
           "seq")


class _Buckets:
    """Bucket columns (numpy arrays, one entry per bucket, sorted by bucket index ``k``).

    ``fs/fv``: first step and value; ``ls/lv``: last; ``los/lov``: lowest finite value
    (``+inf`` when none); ``his/hiv``: highest (``-inf``); ``nfs/nfv``: first non-finite
    point (``nfn == 0``: none); ``n``: points; ``seq``: arrival order (the later wins on a
    repeated step).
    """

    def __init__(self, columns: dict[str, np.ndarray], shift: int) -> None:
        self.c = columns
        self.shift = shift  # bucket width 2**shift steps

    def __len__(self) -> int:
        return len(self.c["k"])

    @classmethod
    def of_points(cls, steps: np.ndarray, values: np.ndarray, shift: int,
                  seq: np.ndarray) -> _Buckets:
        finite = np.isfinite(values)
        inf = np.full(len(values), np.inf)
        return cls({
            "k": steps >> shift, "fs": steps, "fv": values, "ls": steps, "lv": values,
            "los": steps, "lov": np.where(finite, values, inf),
            "his": steps, "hiv": np.where(finite, values, -inf),
            "nfs": steps, "nfv": values, "n": np.ones(len(steps), dtype=np.int64),
            "nfn": (~finite).astype(np.int64), "seq": seq,
        }, shift)

    def coarser(self, shift: int) -> _Buckets:
        out = dict(self.c)
        out["k"] = self.c["fs"] >> shift
        return _Buckets(out, shift)

    @staticmethod
    def merge(parts: Sequence[_Buckets]) -> _Buckets:
        """One bucket per ``k`` from several tables of the same width."""
        c = {f: np.concatenate([p.c[f] for p in parts]) for f in _FIELDS}
        k, seq = c["k"], c["seq"]

        def pick(*keys: np.ndarray, last: bool = False) -> np.ndarray:
            """Per bucket, the row that sorts first (``last``: last) by ``keys`` (last key
            most significant, as np.lexsort)."""
            order = np.lexsort((*keys, k))
            ks = k[order]
            if last:
                ends = np.flatnonzero(np.r_[ks[1:] != ks[:-1], True])
                return order[ends]
            starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
            return order[starts]

        first = pick(-seq, c["fs"])  # lowest step; on a repeated step the later arrival
        last = pick(seq, c["ls"], last=True)
        low = pick(c["los"], c["lov"])  # lowest value; on a tie the earliest step
        high = pick(c["his"], -c["hiv"])
        has_nf = c["nfn"] > 0
        nonfinite = pick(c["nfs"], ~has_nf)  # a row with a non-finite point first
        group = np.lexsort((k,))
        ks = k[group]
        starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
        out = {
            "k": ks[starts],
            "fs": c["fs"][first], "fv": c["fv"][first],
            "ls": c["ls"][last], "lv": c["lv"][last], "seq": seq[last],
            "los": c["los"][low], "lov": c["lov"][low],
            "his": c["his"][high], "hiv": c["hiv"][high],
            "nfs": c["nfs"][nonfinite], "nfv": c["nfv"][nonfinite],
            "n": np.add.reduceat(c["n"][group], starts),
            "nfn": np.add.reduceat(c["nfn"][group], starts),
        }
        return _Buckets(out, parts[0].shift)


def _dedupe(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Steps ascending, one value per step: on a repeated step the later value wins."""
    if len(steps) < 2 or bool(np.all(steps[1:] > steps[:-1])):
        return steps, values
    order = np.argsort(steps, kind="stable")
    s, v = steps[order], values[order]
    keep = np.r_[s[1:] != s[:-1], True]
    return s[keep], v[keep]


class Series:
    """One scalar tag over the steps: ``steps`` ascending, one value per step.

    Whole (``exact``) up to its ``limit`` of points, else an envelope (see the module
    docstring); ``len()`` is always the number of points logged, ``steps``/``values`` the
    points kept (every point of a whole series; an envelope's first, last, lowest, highest
    and first non-finite point of each bucket, and the pinned points).

    ``Series(steps, values)`` makes a whole series from lists (a repeated step: the later
    value wins).
    """

    def __init__(self, steps: Iterable[int] = (), values: Iterable[float] = (),
                 limit: int = CURVE_POINTS) -> None:
        s = np.asarray(list(steps) if not isinstance(steps, np.ndarray) else steps,
                       dtype=np.int64)
        v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values,
                       dtype=np.float64)
        if s.shape != v.shape:
            raise ValueError(f"steps and values differ in length: {len(s)} and {len(v)}")
        self.limit = limit
        self._steps, self._values = _dedupe(s, v)
        self._buckets: _Buckets | None = None
        self._count = len(self._steps)
        self._pins: dict[int, float] = {}
        self._cache: tuple[list[int], list[float]] | None = None
        #: False when points came out of step order after it became an envelope (a repeated
        #: step's earlier value may then still count in its bucket).
        self.ordered = True

    # -- what is kept --------------------------------------------------------------------
    @property
    def exact(self) -> bool:
        """Whether every point is kept."""
        return self._buckets is None

    def __len__(self) -> int:
        return self._count

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of the points kept, as numpy arrays (steps ascending)."""
        if self._buckets is None:
            return self._steps, self._values
        c = self._buckets.c
        has_nf = c["nfn"] > 0
        steps = np.concatenate([c["fs"], c["ls"], c["los"][np.isfinite(c["lov"])],
                                c["his"][np.isfinite(c["hiv"])], c["nfs"][has_nf]])
        values = np.concatenate([c["fv"], c["lv"], c["lov"][np.isfinite(c["lov"])],
                                 c["hiv"][np.isfinite(c["hiv"])], c["nfv"][has_nf]])
        if self._pins:
            steps = np.concatenate([steps, np.fromiter(self._pins, np.int64)])
            values = np.concatenate([values, np.fromiter(self._pins.values(), np.float64)])
        return _dedupe(steps, values)  # a pin (last) wins over its bucket's copy

    def _lists(self) -> tuple[list[int], list[float]]:
        if self._cache is None:
            s, v = self.arrays()
            self._cache = (s.tolist(), v.tolist())
        return self._cache

    @property
    def steps(self) -> list[int]:
        return self._lists()[0]

    @property
    def values(self) -> list[float]:
        return self._lists()[1]

    @property
    def last(self) -> float:
        """The value at the last step."""
        if self._buckets is None:
            return float(self._values[-1])
        return float(self._buckets.c["lv"][-1])

    @property
    def first_step(self) -> int:
        return int(self._steps[0]) if self._buckets is None else int(self._buckets.c["fs"][0])

    @property
    def last_step(self) -> int:
        return int(self._steps[-1]) if self._buckets is None else int(self._buckets.c["ls"][-1])

    def extreme(self, mode: str) -> tuple[float, int] | None:
        """``(value, step)`` of the highest (``"max"``) or lowest (``"min"``) finite value,
        the earliest step on a tie; ``None`` when no value is finite."""
        if self._buckets is None:
            finite = np.flatnonzero(np.isfinite(self._values))
            if not len(finite):
                return None
            values = self._values[finite]
            i = finite[int(np.argmax(values) if mode == "max" else np.argmin(values))]
            return float(self._values[i]), int(self._steps[i])
        c = self._buckets.c
        vals, steps = (c["hiv"], c["his"]) if mode == "max" else (c["lov"], c["los"])
        if not np.isfinite(vals).any():
            return None
        best = vals.max() if mode == "max" else vals.min()
        at = np.flatnonzero(vals == best)
        i = at[int(np.argmin(steps[at]))]
        return float(vals[i]), int(steps[i])

    def nonfinite(self) -> tuple[list[int], int]:
        """Steps of non-finite values (an envelope: the first of each bucket) and how many
        values were non-finite in all."""
        if self._buckets is None:
            bad = ~np.isfinite(self._values)
            return self._steps[bad].tolist(), int(bad.sum())
        c = self._buckets.c
        has = c["nfn"] > 0
        return c["nfs"][has].tolist(), int(c["nfn"].sum())

    def envelope(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """``(start, end, low, high)`` per bucket of an envelope (first and last step, lowest
        and highest finite value: ``+inf``/``-inf`` where none); ``None`` for a whole
        series."""
        if self._buckets is None:
            return None
        c = self._buckets.c
        return c["fs"], c["ls"], c["lov"], c["hiv"]

    # -- changing it -----------------------------------------------------------------------
    def pin(self, step: int, value: float) -> None:
        """Keep the point ``(step, value)`` as it is (a warning's step) should the series be
        an envelope (a whole one has it already); at most ``limit`` pins."""
        if len(self._pins) < self.limit or int(step) in self._pins:
            self._pins[int(step)] = float(value)
            self._cache = None

    def joined(self, later: Series) -> Series:
        """This series and a ``later`` one (a resumed run's), in step order; on a step both
        hold, ``later``'s value. Exact for two whole series; for an envelope, the buckets
        of both (a value ``later`` replaced may still count: the verdicts' replay rebuilds
        such a series, see :mod:`.verdicts`)."""
        out = Series(limit=self.limit)
        if self.exact and later.exact:
            out._extend(np.concatenate([self._steps, later._steps]),
                        np.concatenate([self._values, later._values]))
            return out
        low = min(self.first_step, later.first_step) if len(later) else self.first_step
        high = max(self.last_step, later.last_step) if len(later) else self.last_step
        out._buckets, out._count = None, 0
        shift = max([out._fit(low, high)] + [p._buckets.shift for p in (self, later)
                                              if p._buckets is not None])
        parts, seq = [], 0
        for part in (self, later):
            if not len(part):
                continue
            if part.exact:
                table = _Buckets.of_points(part._steps, part._values, shift,
                                           np.arange(len(part._steps)))
            else:
                table = part._buckets.coarser(shift)
            table.c["seq"] = table.c["seq"] + seq  # later wins ties
            seq = int(table.c["seq"].max()) + 1
            parts.append(table)
        out._buckets = _Buckets.merge(parts)
        out._count = len(self) + len(later)
        out._pins = {**self._pins, **later._pins}
        out.ordered = False
        return out

    def assign(self, other: Series) -> None:
        """Become ``other`` (in place: every holder of this series sees the new points)."""
        self.__dict__.update(other.__dict__)

    def _extend(self, steps: np.ndarray, values: np.ndarray) -> None:
        """Fold in points that arrived after the ones already held (in arrival order)."""
        if not len(steps):
            return
        self._cache = None
        if self._buckets is None:
            self._steps, self._values = _dedupe(np.concatenate([self._steps, steps]),
                                                np.concatenate([self._values, values]))
            self._count = len(self._steps)
            if self._count > self.limit:
                self._to_buckets()
            return
        c = self._buckets.c
        if steps[0] <= c["ls"][-1] or (len(steps) > 1 and not bool(np.all(steps[1:] > steps[:-1]))):
            self.ordered = False
        seq0 = int(c["seq"].max()) + 1
        shift = self._fit(steps.min(), steps.max())
        new = _Buckets.of_points(steps, values, shift, np.arange(seq0, seq0 + len(steps)))
        old = self._buckets if self._buckets.shift == shift else self._buckets.coarser(shift)
        self._buckets = _Buckets.merge([old, new])
        self._count += len(steps)

    def _fit(self, low: int, high: int) -> int:
        """The bucket width (a power of two) that keeps every step in at most
        ``limit // 4`` buckets."""
        shift = 0 if self._buckets is None else self._buckets.shift
        if self._buckets is not None:
            low = min(int(low), int(self._buckets.c["fs"][0]))
            high = max(int(high), int(self._buckets.c["ls"][-1]))
        buckets = max(self.limit // 4, 1)
        while (int(high) >> shift) - (int(low) >> shift) >= buckets:
            shift += 1
        return shift

    def _to_buckets(self) -> None:
        steps, values = self._steps, self._values
        shift = self._fit(steps[0], steps[-1])
        self._buckets = _Buckets.merge(
            [_Buckets.of_points(steps, values, shift, np.arange(len(steps)))])
        self._steps = self._values = np.zeros(0)


class SeriesBuilder:
    """Collects one tag's points as they are read (``append``, C-speed array appends) and
    folds them into a :class:`Series` every :data:`FLUSH_POINTS` points."""

    __slots__ = ("series", "steps", "values")

    def __init__(self, limit: int = CURVE_POINTS) -> None:
        self.series = Series(limit=limit)
        self.steps = array("q")
        self.values = array("d")

    def flush(self) -> None:
        if self.steps:
            self.series._extend(np.frombuffer(self.steps, dtype=np.int64).copy(),
                                np.frombuffer(self.values, dtype=np.float64).copy())
            self.steps = array("q")
            self.values = array("d")

    def finish(self) -> Series:
        self.flush()
        return self.series
