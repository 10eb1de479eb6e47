"""External servers the engine reaches: endpoint discovery (``endpoints``), and the servers we
start and supervise (``specs`` per runtime, ``supervisor`` per instance, ``state`` the files
processes share, ``managed`` the engine's hook and backend)."""
