"""Pure unit tests: no QEMU, no qemu-img; `make unit` runs them in seconds."""
