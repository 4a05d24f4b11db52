"""The RecBole cross-check script holds out, and scores, the replay's users (RecBole itself is not
installed here: these are the script's own split and masking rules, which it hands to RecBole)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "recbole_crosscheck.py"


def load_script():
    spec = importlib.util.spec_from_file_location("recbole_crosscheck", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_user_keeps_a_test_row_even_when_it_is_their_only_row():
    # A sequential dataset has one row per event after a user's first: a user with two events has
    # one row. RecBole's leave-one-out left such a row in training, so those users were trained on
    # their held-out item and never scored (2,048 of REES46's 2,850).
    split = load_script().leave_last_out_index
    groups = [[0], [1, 2], [3, 4, 5]]
    train, test = split(groups, 1)
    assert sorted(test) == [0, 2, 5]
    assert sorted(train) == [1, 3, 4]
    train, valid, test = split(groups, 2)
    assert sorted(test) == [0, 2, 5]
    assert sorted(valid) == [1, 4]
    assert train == [3]


def test_history_masks_the_first_item_and_a_training_less_user():
    history = load_script().history_items
    targets = {7: [12, 13]}  # the targets of user 7's training rows: events 2 and 3
    # the test row's input sequence (padded with 0) also holds the first event, 11
    assert history(targets, 7, [11, 12, 13, 0, 0]) == [11, 12, 13]
    # a user with two events has no training row: the input sequence is the whole history
    assert history(targets, 8, [21, 0, 0]) == [21]
    # a general model has no input sequence: the training rows are the history
    assert history(targets, 7, None) == [12, 13]
