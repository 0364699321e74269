"""Tests against real QEMU (no mocks); the pure unit tests are in tests/unit."""
