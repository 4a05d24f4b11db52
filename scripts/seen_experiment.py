"""`recsys replay` with the recommender's opt-in "seen" options switched on (issue 14 experiment).

Neither option is a setting yet (both are off by default, and turning one on moves every
full-system figure in the README): ``SEEN_CANDIDATES=N`` brings each user's N most recent
distinct items in as candidates (``RecommenderConfig.seen_candidates``), ``SEEN_POWER=P``
grades "seen" as ``1 / (1 + r) ** P`` for the r-th most recent item
(``RecommenderConfig.seen_grade_power``, default 1). The rest of the command line is
``recsys replay``'s:

    SEEN_CANDIDATES=10 .venv/bin/python scripts/seen_experiment.py replay --format rees46 \\
        --events ../shared/data/rees46/2019-Oct_head17k.csv --protocol prequential \\
        --models recently_seen,full-system --out runs/seen10-rees46-prequential
"""

import functools
import os
import sys

import recsys.shard.step as step
from recsys.ranking.recommender import RecommenderConfig

step.RecommenderConfig = functools.partial(
    RecommenderConfig,
    seen_candidates=int(os.environ.get("SEEN_CANDIDATES", "0")),
    seen_grade_power=float(os.environ.get("SEEN_POWER", "1")),
)

from recsys_cli.main import main  # noqa: E402  (after the patch: main imports the engine lazily)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
