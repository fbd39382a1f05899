"""Batch jobs: answer a prompt about every image of a folder, glob or table, resumably.

``run_batch`` is the whole job (``fastvlm batch`` calls it). Importing this package
imports neither Ray nor pyarrow; each is imported when a job needs it.
"""

from .job import BatchSummary, run_batch
from .options import BatchOptions

__all__ = ["run_batch", "BatchOptions", "BatchSummary"]
