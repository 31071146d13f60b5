"""The terminal progress line (tqdm on stderr): calls done/total where known, rate, elapsed."""

import os
import sys


class Progress:
    def __init__(self, total):
        from tqdm import tqdm

        try:
            width = os.get_terminal_size(sys.stderr.fileno()).columns
        except (OSError, ValueError, AttributeError):
            width = 0
        # A terminal that reports no width (some CI and pty setups) would get no bar at all: assume 80x24.
        size = {"dynamic_ncols": True} if width else {"ncols": 80, "nrows": 24}
        self.bar = tqdm(total=total, unit="call", desc="burla", file=sys.stderr, leave=False, mininterval=0.1,
                        **size)

    @classmethod
    def create(cls, enabled, total):
        """A progress line if asked for and stderr is a terminal, else None."""
        if not enabled or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
            return None
        return cls(total)

    def advance(self, n):
        self.bar.update(n)

    def total_known(self, total):
        if self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()

    def clear(self):
        self.bar.clear()

    def refresh(self):
        self.bar.refresh()

    def close(self):
        self.bar.close()
