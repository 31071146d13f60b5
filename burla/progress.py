"""The terminal progress line (tqdm on stderr): calls done/total where known, rate, elapsed."""

import sys


class Progress:
    def __init__(self, total):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="call", desc="burla", file=sys.stderr, leave=False, dynamic_ncols=True,
                        mininterval=0.1)

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
