"""The soak: days of a busy host with faults, compressed, against the real supervisor
(`python -m tests.soak`, docs/soak.md)."""
