"""Seeded Sudoku puzzle generator and checkers.

Grids are strings or sequences of 81 cells, row by row. Solutions use digits 1-9; in puzzles a
blank is ``0`` (``.`` is accepted wherever a puzzle is read).

Full solution grids are drawn by randomised backtracking over *all* Sudoku grids (cells are
filled in most-constrained-first order, candidates tried in random order), not by relabelling a
base pattern. Givens are then removed at random until the requested number is left; with
``unique=True`` a cell is only removed if the puzzle keeps exactly one solution.

    python -m tools.sudoku.generator --seed 1 --count 5 --givens 32 --unique
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterable, Sequence

import numpy as np

ALL = 0x1FF  # bits 0..8 stand for digits 1..9
_ROW = [i // 9 for i in range(81)]
_COL = [i % 9 for i in range(81)]
_BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]
_POPCOUNT = [bin(m).count("1") for m in range(512)]
_BITS = [[d for d in range(9) if m >> d & 1] for m in range(512)]


def _cells(grid: str | Sequence[int]) -> list[int]:
    if isinstance(grid, str):
        grid = grid.strip()
        if len(grid) != 81:
            raise ValueError(f"a grid has 81 cells, got {len(grid)}")
        out = []
        for ch in grid:
            if ch in ".0":
                out.append(0)
            elif "1" <= ch <= "9":
                out.append(ord(ch) - 48)
            else:
                raise ValueError(f"bad cell {ch!r}")
        return out
    out = [int(v) for v in grid]
    if len(out) != 81 or any(v < 0 or v > 9 for v in out):
        raise ValueError("a grid has 81 cells with values 0..9")
    return out


def to_string(grid: Sequence[int], blank: str = "0") -> str:
    return "".join(str(int(v)) if v else blank for v in grid)


def _search(cells: list[int], rng: random.Random | None, limit: int) -> tuple[int, list[int] | None]:
    """Depth-first search with the most-constrained cell first.

    Returns (number of solutions found, capped at ``limit``; the first solution). With ``rng`` the
    candidates are tried in random order, so the first solution is a random completion.
    """
    rows = [0] * 9
    cols = [0] * 9
    boxes = [0] * 9
    empty = []
    for i, v in enumerate(cells):
        if v:
            bit = 1 << (v - 1)
            r, c, b = _ROW[i], _COL[i], _BOX[i]
            if (rows[r] | cols[c] | boxes[b]) & bit:
                return 0, None  # the givens contradict each other
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
        else:
            empty.append(i)
    grid = list(cells)
    found = 0
    first: list[int] | None = None

    def rec() -> bool:
        nonlocal found, first
        if not empty:
            found += 1
            if first is None:
                first = list(grid)
            return found >= limit
        best_k, best_n, best_m = -1, 10, 0
        for k, i in enumerate(empty):
            m = ALL & ~(rows[_ROW[i]] | cols[_COL[i]] | boxes[_BOX[i]])
            n = _POPCOUNT[m]
            if n < best_n:
                best_k, best_n, best_m = k, n, m
                if n <= 1:
                    break
        if best_n == 0:
            return False
        i = empty[best_k]
        empty[best_k] = empty[-1]
        empty.pop()
        r, c, b = _ROW[i], _COL[i], _BOX[i]
        digits = _BITS[best_m]
        if rng is not None and len(digits) > 1:
            digits = list(digits)
            rng.shuffle(digits)
        for d in digits:
            bit = 1 << d
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            grid[i] = d + 1
            stop = rec()
            rows[r] &= ~bit
            cols[c] &= ~bit
            boxes[b] &= ~bit
            if stop:
                grid[i] = 0
                empty.append(i)
                empty[best_k], empty[-1] = empty[-1], empty[best_k]
                return True
        grid[i] = 0
        empty.append(i)
        empty[best_k], empty[-1] = empty[-1], empty[best_k]
        return False

    rec()
    return found, first


def random_solution(rng: random.Random) -> list[int]:
    """A random complete Sudoku grid (randomised backtracking from an empty grid)."""
    n, sol = _search([0] * 81, rng, 1)
    assert n == 1 and sol is not None
    return sol


def solve(puzzle: str | Sequence[int]) -> list[int] | None:
    """One solution of ``puzzle`` or None."""
    return _search(_cells(puzzle), None, 1)[1]


def count_solutions(puzzle: str | Sequence[int], limit: int = 2) -> int:
    return _search(_cells(puzzle), None, limit)[0]


def is_valid_solution(grid: str | Sequence[int]) -> bool:
    """Every row, column and box holds the digits 1..9 exactly once."""
    try:
        cells = _cells(grid)
    except ValueError:
        return False
    if any(v == 0 for v in cells):
        return False
    a = np.asarray(cells).reshape(9, 9)
    target = set(range(1, 10))
    for k in range(9):
        if set(a[k].tolist()) != target or set(a[:, k].tolist()) != target:
            return False
        br, bc = divmod(k, 3)
        if set(a[3 * br : 3 * br + 3, 3 * bc : 3 * bc + 3].ravel().tolist()) != target:
            return False
    return True


def is_consistent(grid: str | Sequence[int], puzzle: str | Sequence[int]) -> bool:
    """Every given of ``puzzle`` appears unchanged in ``grid``."""
    try:
        g, p = _cells(grid), _cells(puzzle)
    except ValueError:
        return False
    return all(pv == 0 or pv == gv for gv, pv in zip(g, p))


def is_solved(grid: str | Sequence[int], puzzle: str | Sequence[int]) -> bool:
    """``grid`` is a valid complete grid that keeps the givens (any solution counts)."""
    return is_valid_solution(grid) and is_consistent(grid, puzzle)


MAX_GRIDS = 1000  # grids ``make_puzzle(unique=True)`` draws before it gives up
MIN_UNIQUE_GIVENS = 17  # no Sudoku with fewer givens has exactly one solution


def make_puzzle(rng: random.Random, givens: int, unique: bool = False) -> tuple[str, str]:
    """(puzzle, solution) with exactly ``givens`` givens (blanks are ``0``).

    ``unique=True`` removes cells only while the solution stays unique; if a grid cannot get down
    to ``givens`` that way, a new grid is drawn, at most ``MAX_GRIDS`` times (keep ``givens`` >= ~22
    with ``unique``; no Sudoku with fewer than 17 givens has one solution).
    """
    if not 0 <= givens <= 81:
        raise ValueError("givens must be in 0..81")
    if unique and givens < MIN_UNIQUE_GIVENS:
        raise ValueError(f"no Sudoku with {givens} givens has exactly one solution ({MIN_UNIQUE_GIVENS} at least)")
    for _ in range(MAX_GRIDS if unique else 1):
        sol = random_solution(rng)
        order = list(range(81))
        rng.shuffle(order)
        puzzle = list(sol)
        if not unique:
            for i in order[givens:]:
                puzzle[i] = 0
            return to_string(puzzle), to_string(sol)
        left = 81
        for i in order:
            if left == givens:
                break
            v = puzzle[i]
            puzzle[i] = 0
            if left <= 60 and count_solutions(puzzle, 2) != 1:  # above 60 the whole puzzle is checked below
                puzzle[i] = v
            else:
                left -= 1
        if left == givens and count_solutions(puzzle, 2) == 1:
            return to_string(puzzle), to_string(sol)
    raise ValueError(f"no puzzle with {givens} givens and exactly one solution in {MAX_GRIDS} grids")


def generate(seed: int, count: int, givens: int | Sequence[int] | tuple[int, int], unique: bool = False):
    """``count`` (puzzle, solution) pairs, deterministic for ``seed``.

    ``givens``: an int, or (lo, hi) inclusive range sampled per puzzle.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = givens if isinstance(givens, int) else rng.randint(int(givens[0]), int(givens[1]))
        out.append(make_puzzle(rng, n, unique=unique))
    return out


def _main(argv: Iterable[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=5)
    ap.add_argument("--givens", type=int, default=36)
    ap.add_argument("--unique", action="store_true")
    args = ap.parse_args(argv)
    try:
        pairs = generate(args.seed, args.count, args.givens, unique=args.unique)
    except ValueError as exc:
        ap.error(str(exc))
    for puzzle, solution in pairs:
        print(puzzle, solution)


if __name__ == "__main__":
    _main()
