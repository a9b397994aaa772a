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


def setup_logging(log_file: str = None, level=logging.INFO) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console = TqdmHandler()
    console.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
    root.addHandler(console)
    if log_file:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter(FORMAT, "%Y-%m-%d %H:%M:%S"))
        root.addHandler(file_handler)
    root.setLevel(level)
