"""Shared pieces of the Sudoku evaluations: held-out puzzle sets and the result table."""

from __future__ import annotations

from dataclasses import dataclass, field

from tools.sudoku import generator

# Held-out seed: training draws its pool from --seed (1234 by default) and never uses this one.
EVAL_SEED = 777_000_123

# (name, lowest givens, highest givens); puzzles have a unique solution.
BUCKETS = [
    (">=45", 45, 50),
    ("36-44", 36, 44),
    ("30-35", 30, 35),
    ("<30", 25, 29),
]


def eval_set(per_bucket: int, seed: int = EVAL_SEED, buckets=BUCKETS, blank: str = "0"):
    """{bucket name: [(puzzle, solution), ...]}, deterministic for ``seed``."""
    out = {}
    for k, (name, lo, hi) in enumerate(buckets):
        pairs = generator.generate(seed * 100 + k, per_bucket, (lo, hi), unique=True)
        if blank != "0":
            pairs = [(p.replace("0", blank), s) for p, s in pairs]
        out[name] = pairs
    return out


BUCKET_NAMES = [name for name, _, _ in BUCKETS]


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


@dataclass
class BucketStats:
    n: int = 0
    solved: int = 0
    cells_right: int = 0
    cells_total: int = 0
    steps: list = field(default_factory=list)  # denoising steps per canvas, per puzzle
    canvases: list = field(default_factory=list)
    errors: int = 0

    def add(self, puzzle: str, solution: str, answer: str, steps: float | None, canvases: int | None):
        self.n += 1
        grid = answer[:81]
        if generator.is_solved(grid, puzzle):
            self.solved += 1
        blanks = [i for i, ch in enumerate(puzzle) if ch in "0."]
        self.cells_total += len(blanks)
        self.cells_right += sum(1 for i in blanks if i < len(grid) and grid[i] == solution[i])
        if steps is not None:
            self.steps.append(float(steps))
        if canvases is not None:
            self.canvases.append(int(canvases))


def format_table(stats: dict[str, BucketStats]) -> str:
    lines = [f"{'givens':>8} {'n':>5} {'solved':>8} {'cell acc':>9} {'steps/canvas':>13} {'canvases':>9}"]
    tot = BucketStats()
    for name, s in stats.items():
        lines.append(_row(name, s))
        tot.n += s.n
        tot.solved += s.solved
        tot.cells_right += s.cells_right
        tot.cells_total += s.cells_total
        tot.steps += s.steps
        tot.canvases += s.canvases
        tot.errors += s.errors
    lines.append(_row("all", tot))
    if tot.errors:
        lines.append(f"request errors: {tot.errors}")
    return "\n".join(lines)


def _row(name: str, s: BucketStats) -> str:
    solve = f"{100 * s.solved / s.n:.1f}%" if s.n else "-"
    acc = f"{100 * s.cells_right / s.cells_total:.1f}%" if s.cells_total else "-"
    steps = f"{sum(s.steps) / len(s.steps):.2f}" if s.steps else "-"
    canv = f"{sum(s.canvases) / len(s.canvases):.2f}" if s.canvases else "-"
    return f"{name:>8} {s.n:>5} {solve:>8} {acc:>9} {steps:>13} {canv:>9}"
