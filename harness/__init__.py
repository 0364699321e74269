"""Real-QEMU harness shared by tests/ and bench/ (not part of the installed package)."""
