"""From signals to a ranked, explained list: the feature table, candidates and scores
(recommender), the online re-ranker, the learned head. See docs/MAP.md."""
