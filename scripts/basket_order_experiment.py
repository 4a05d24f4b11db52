"""`recsys replay` with simultaneous events in a seeded random order (issue 14 experiment).

A log orders the events that share a timestamp (a grocery basket's items) as its file does:
Complete Journey's transactions list each basket's items by ascending product id, so a
user's held-out "last" item in leave-last-out is the highest product id of their last basket,
and directed signals (transitions) learn "a higher id of the same basket comes next". Here
events with equal ``ts`` are put in an order drawn from a hash of their ``event_id``
(deterministic, unrelated to the item); nothing else changes. The rest of the command line is
``recsys replay``'s:

    .venv/bin/python scripts/basket_order_experiment.py replay --format completejourney --limit 300000 \\
        --protocol leave-last-out --models transitions,covisitation,full-system --out runs/cj-shuffled
"""

import dataclasses
import hashlib
import sys

import recsys.datasets as datasets


def _order(event) -> tuple[int, bytes]:
    return event.ts, hashlib.blake2b(event.event_id.encode(), digest_size=8).digest()


def _load_shuffled(*args, _load=datasets.load_dataset, **kwargs):
    ds = _load(*args, **kwargs)
    return dataclasses.replace(ds, events=sorted(ds.events, key=_order))


datasets.load_dataset = _load_shuffled  # recsys replay imports it from the package when it runs

from recsys_cli.main import main  # noqa: E402  (after the patch)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
