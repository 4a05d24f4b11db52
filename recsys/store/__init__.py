"""Where state lives: the key-value contract and its backends (kv), and the per-user records
kept in it (users). See docs/MAP.md."""
