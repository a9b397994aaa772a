"""Console + train.log lines (the same text in both) and TensorBoard."""
import logging
import sys

from tqdm import tqdm

FORMAT = "[%(asctime)s] %(levelname)s %(message)s"


class TqdmHandler(logging.StreamHandler):
    """Writes through tqdm so that log lines do not break the progress bar."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class NullWriter:
    """Stands in for TensorBoard's SummaryWriter on the ranks that do not write (all but 0)."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def add_image(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def setup_logging(log_file: str = None, level=logging.INFO, rank: int = 0) -> None:
    """Console (and train.log) lines. Ranks other than 0 print only warnings and errors,
    tagged with their rank, and never write train.log."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console = TqdmHandler()
    console.setFormatter(logging.Formatter(FORMAT if rank == 0 else f"[rank {rank}] {FORMAT}", "%H:%M:%S"))
    root.addHandler(console)
    if rank > 0:
        root.setLevel(logging.WARNING)
        return
    if log_file:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter(FORMAT, "%Y-%m-%d %H:%M:%S"))
        root.addHandler(file_handler)
    root.setLevel(level)
