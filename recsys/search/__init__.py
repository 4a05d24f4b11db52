"""Personalised search (issue 13): lexical BM25, semantic vectors and learned query -> item
associations, re-ranked for the shopper. No Kafka or Bytewax here, like the rest of ``recsys``.

- :mod:`recsys.search.text`: normalisation, tokens, typo repair, order-free query keys
- :mod:`recsys.search.lexical`: BM25 over the catalog text, updated in place by every upsert
- :mod:`recsys.search.learned`: what shoppers choose after a query (the attribution rule)
- :mod:`recsys.search.semantic`: query vectors (the frozen model, an LRU cache)
- :mod:`recsys.search.rerank`: the online pairwise re-ranker of search
- :mod:`recsys.search.service`: :class:`Search`, the engine's search surface
- :mod:`recsys.search.querylog`: a shop's own search log for the backtest
- :mod:`recsys.search.replay`: the derived-query backtest (``recsys replay --task search``)
"""

from recsys.search.learned import QueryAssociations, SearchWindows
from recsys.search.lexical import LexicalIndex
from recsys.search.service import (
    FEATURES,
    MODES,
    SEARCH_VERSION,
    Ranked,
    Search,
    SearchConfig,
)
from recsys.search.text import Vocabulary, query_key, tokenize

__all__ = [
    "FEATURES", "MODES", "SEARCH_VERSION", "LexicalIndex", "QueryAssociations", "Ranked", "Search",
    "SearchConfig", "SearchWindows", "Vocabulary", "query_key", "tokenize",
]
