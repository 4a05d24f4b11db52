"""Offline evaluation: protocols, metrics, reports, bootstrap intervals, the baselines, and
the full system as a backtest model. See docs/MAP.md."""
