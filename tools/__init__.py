"""Build-time generators (man pages, shell completion) run by ``make man`` / ``make completion``."""
