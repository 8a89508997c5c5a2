"""How often the flaky rules report a test twice in 21 days, on the rules' own code alone.

``flaky_states`` (events.projections.detect, a pure function) over --tests generated
histories per failure probability, laid out as bench/findings.py's: 12 executions a day
(two batches of 6, 09:00 and 15:00 UTC, 2 s apart), each failing with that probability.
Prints, per probability and rule, the tests with a finding and the findings after a
test's first (repeats: every one a false positive, a test failing at a steady rate).

    python bench/rearm_sim.py [--tests 300] [--days 21] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import uuid
from datetime import UTC, datetime, timedelta

from events.projections.detect import Executed, flaky_states

T0 = datetime(2026, 1, 5, tzinfo=UTC)
RULES = ("failure_rate", "flip_rate")


def history(probability: float, days: int, rng: random.Random) -> list[Executed]:
    return [
        Executed(uuid.uuid4(), "failed" if rng.random() < probability else "passed",
                 T0 + timedelta(days=day, hours=hour, seconds=2 * n))
        for day in range(days) for hour in (9, 15) for n in range(6)
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=300)
    parser.add_argument("--days", type=int, default=21)
    parser.add_argument("--seed", type=int, default=1)
    options = parser.parse_args()
    rng = random.Random(options.seed)
    for probability in (0.05, 0.15, 0.30):
        found = dict.fromkeys(RULES, 0)
        repeats = dict.fromkeys(RULES, 0)
        for _ in range(options.tests):
            states = flaky_states(history(probability, options.days, rng))
            for rule in RULES:
                crossed = sum(getattr(state, f"{rule}_crossed") for state in states)
                found[rule] += crossed > 0
                repeats[rule] += max(0, crossed - 1)
        print(f"p={probability}: tests with a finding {found}, repeats {repeats}"
              f" (of {options.tests} tests)")  # fmt: skip


if __name__ == "__main__":
    main()
