"""Cross-check our ItemKNN (and SASRec) baselines against RecBole on the same leave-last-out split.

RecBole is not a dependency of the project: it runs in a scratch environment made for the check
(see docs/recbole_crosscheck.md for the commands and the figures). Two steps, two interpreters:

1. ``export`` (the project's Python) reads a log with the project's own reader and writes it as
   a RecBole atomic file: one line per event with an item, ``user_id``, ``item_id`` and, as the
   timestamp, the event's position in the replay's order. Using the position makes RecBole's
   time order (``order: TO``) the replay's order exactly, ties included, so its leave-one-out
   holds out the very event ``recsys replay --protocol leave-last-out`` holds out.
2. ``run`` (the scratch environment's Python, with RecBole) trains and evaluates one RecBole
   model with ``split: {LS: test_only}`` (each user's last interaction is the test item, users
   with one interaction stay in training: the replay's rule), full ranking, items of the user's
   training history masked (the replay's ``exclude_history``), Recall@10/50 and NDCG@10/50.

    python scripts/recbole_crosscheck.py export --format rees46 --events ../shared/data/rees46/2019-Oct_head17k.csv --out var/recbole
    /tmp/recbole/bin/python scripts/recbole_crosscheck.py run --data var/recbole --dataset rees46 --model ItemKNN
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def export(args: argparse.Namespace) -> None:
    from recsys.datasets import load_dataset

    ds = load_dataset(args.format, args.events, limit=args.limit)
    name = args.name or args.format
    folder = Path(args.out) / name
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(folder / f"{name}.inter", "w", encoding="utf-8") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for i, ev in enumerate(ds.events):
            if ev.item_id is None:
                continue
            # RecBole's atomic files are tab-separated; ids here come from the shared logs and
            # contain no tabs, but refuse rather than write a broken file.
            if "\t" in ev.user_id or "\t" in ev.item_id:
                raise ValueError(f"event {i}: a tab in user or item id cannot be written to a RecBole file")
            f.write(f"{ev.user_id}\t{ev.item_id}\t{i}\n")
            n += 1
    print(f"wrote {n} interactions to {folder / (name + '.inter')}")


def run(args: argparse.Namespace) -> None:
    import numpy as np
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_seed

    config_dict = {
        "data_path": str(Path(args.data).resolve()),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "eval_args": {"split": {"LS": "valid_and_test" if args.valid else "test_only"}, "order": "TO",
                      "group_by": "user", "mode": "full"},
        "metrics": ["Recall", "NDCG"],
        "topk": [10, 50],
        "valid_metric": "NDCG@10",
        "seed": args.seed,
        "show_progress": False,
        "epochs": args.epochs,
        "checkpoint_dir": str(Path(args.data).resolve() / "saved"),
        "user_inter_num_interval": "[0,inf)",
        "item_inter_num_interval": "[0,inf)",
    }
    if args.model == "ItemKNN":
        config_dict.update({"k": args.k, "shrink": 0.0, "epochs": 1})
    if args.model == "SASRec":
        config_dict.update({"train_neg_sample_args": None, "loss_type": "CE", "MAX_ITEM_LIST_LENGTH": 50})
    config = Config(model=args.model, dataset=args.dataset, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    sequential = args.model == "SASRec"
    # every user with two or more events is held out and scored, by the replay and here
    uids = dataset.inter_feat[dataset.uid_field]
    expected_users = int((np.bincount(np.asarray(uids.numpy() if hasattr(uids, "numpy") else uids)) >= 2).sum())
    if sequential:
        # A sequential dataset holds one row per event after a user's first (the items before it
        # as the input, the event as the target), so a user with two events has one row, which
        # RecBole's leave-one-out keeps in training (it never holds out a group's only row): such
        # users were trained on their held-out item and never scored (2,048 of REES46's 2,850
        # users scored). Hold out every user's last row, as the replay does.
        dataset._split_index_by_leave_one_out = leave_last_out_index
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    t0 = time.perf_counter()
    if args.valid:
        trainer.fit(train_data, valid_data, saved=False, show_progress=False)
    else:
        trainer.fit(train_data, None, saved=False, show_progress=False)
    result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    ours = _evaluate_our_rule(trainer, train_data, test_data, ks=(10, 50), sequential=sequential)
    if ours["users"] != expected_users:
        raise SystemExit(f"scored {ours['users']} users, expected every user with two or more events: {expected_users}")
    out = {"model": args.model, "dataset": args.dataset, "seconds": round(time.perf_counter() - t0, 1),
           "recbole_rule": {k: round(float(v), 4) for k, v in result.items()}, "our_rule": ours}
    print(json.dumps(out))


def leave_last_out_index(grouped_index, leave_one_num: int) -> list[list[int]]:
    """Split each user's rows (in time order) into train, [valid,] test: the last row is always
    the test row, even when it is the user's only one; with ``leave_one_num == 2`` the row before
    it, where there is one, is the validation row. Drop-in for RecBole's
    ``Dataset._split_index_by_leave_one_out``, which keeps a group's only row in training."""
    parts: list[list[int]] = [[] for _ in range(leave_one_num + 1)]
    for index in grouped_index:
        rows = list(index)
        held = min(leave_one_num, len(rows))
        parts[0].extend(rows[: len(rows) - held])
        for j, row in enumerate(rows[len(rows) - held:]):
            parts[leave_one_num + 1 - held + j].append(row)
    return parts


def history_items(train_targets: dict[int, list[int]], uid: int, prefix) -> list[int]:
    """The user's training items: the targets of their training rows and, for a sequential model,
    the items of the test row's input sequence (the user's first item is never a target, and a
    user with two events has no training row at all)."""
    items = set(train_targets.get(uid, ()))
    if prefix is not None:
        items.update(int(i) for i in prefix if int(i) != 0)  # 0: RecBole's padding item
    return sorted(items)


def _evaluate_our_rule(trainer, train_data, test_data, ks, sequential: bool = False) -> dict:
    """Score the trained RecBole model under the replay's rule: every item of the user's training
    history is masked, the held-out item too when it repeats one (so such a user counts as a
    miss, as in ``recsys replay``). RecBole's own full ranking unmasks the held-out item for
    general models and masks nothing for sequential ones (both printed as ``recbole_rule``)."""
    import numpy as np
    import torch

    ds = train_data._dataset
    uid_field, iid_field = ds.uid_field, ds.iid_field
    train_items: dict[int, list[int]] = {}
    for u, i in zip(ds.inter_feat[uid_field].numpy().tolist(), ds.inter_feat[iid_field].numpy().tolist()):
        train_items.setdefault(u, []).append(i)
    model = trainer.model
    model.eval()
    n_items = ds.item_num
    # The replay fills a list the model cannot fill with popular items; here ties (ItemKNN's
    # zeros) are broken by training popularity, far below any real score difference.
    counts = torch.bincount(ds.inter_feat[iid_field], minlength=n_items).double()
    tie_break = 1e-9 * counts / counts.max()
    hits = {k: 0.0 for k in ks}
    ndcg = {k: 0.0 for k in ks}
    users = repeats = 0
    with torch.no_grad():
        for batched in test_data:
            interaction, _history, positive_u, positive_i = batched
            scores = model.full_sort_predict(interaction).view(-1, n_items).double() + tie_break
            scores[:, 0] = -np.inf
            uids = interaction[uid_field].numpy().tolist()
            prefixes = interaction[model.ITEM_SEQ].numpy() if sequential else [None] * len(uids)
            for row, u in enumerate(uids):
                hist = history_items(train_items, u, prefixes[row])
                if hist:
                    scores[row, torch.tensor(hist, dtype=torch.int64)] = -np.inf
            pos = torch.full((len(uids),), -1, dtype=torch.int64)
            pos[positive_u] = positive_i
            target = scores.gather(1, pos.view(-1, 1))
            # 0-based rank of the held-out item, ties counted against it: an item that shares
            # its score with many others (ItemKNN's zeros) is not a hit by the luck of its index.
            rank = (scores >= target).sum(dim=1) - 1
            masked = torch.isinf(target.view(-1))
            users += len(uids)
            repeats += int(masked.sum())
            for k in ks:
                hit = (rank < k) & ~masked
                hits[k] += float(hit.sum())
                ndcg[k] += float((hit.float() / torch.log2(rank.float() + 2.0)).sum())
    out = {"users": users, "held_out_repeats": repeats}
    for k in ks:
        out[f"recall@{k}"] = round(hits[k] / users, 4)
        out[f"ndcg@{k}"] = round(ndcg[k] / users, 4)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write a log as a RecBole atomic file (the project's Python)")
    e.add_argument("--format", required=True)
    e.add_argument("--events", default=None)
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--name", default=None, help="dataset name (default: the format)")
    e.add_argument("--out", required=True)
    r = sub.add_parser("run", help="train and evaluate one RecBole model (the scratch Python with RecBole)")
    r.add_argument("--data", required=True)
    r.add_argument("--dataset", required=True)
    r.add_argument("--model", default="ItemKNN", choices=("ItemKNN", "SASRec"))
    r.add_argument("--k", type=int, default=100, help="ItemKNN: neighbours per item")
    r.add_argument("--epochs", type=int, default=20)
    r.add_argument("--valid", action="store_true", help="hold out the second-to-last item for early stopping (SASRec)")
    r.add_argument("--seed", type=int, default=2020)
    args = p.parse_args(argv)
    (export if args.cmd == "export" else run)(args)


if __name__ == "__main__":
    sys.exit(main())
