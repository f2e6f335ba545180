"""Input data: sources, batching and the Grain pipeline.

The trainer calls :func:`make_train_input` / :func:`make_eval_input` (or the in-memory
:func:`array_train_input` / :func:`array_eval_input`) and gets host-local numpy batches;
``parallel.host_batch_to_global`` turns each into a global sharded batch.

Importing this package starts nothing and writes nothing (Grain workers re-import it).
"""

from workshop_dist.data.config import DataConfiguration
from workshop_dist.data.images import label_map, write_label_map
from workshop_dist.data.inputs import EvalInput, TrainInput
from workshop_dist.data.pipeline import (
    array_eval_input,
    array_train_input,
    make_eval_input,
    make_train_input,
    process_rows,
)
from workshop_dist.data.records import write_array_record
from workshop_dist.data.sources import DatasetNotPreparedError, resolve_data_dir
from workshop_dist.data.transforms import BadExampleError

__all__ = [
    "BadExampleError",
    "DataConfiguration",
    "DatasetNotPreparedError",
    "EvalInput",
    "TrainInput",
    "array_eval_input",
    "array_train_input",
    "label_map",
    "make_eval_input",
    "make_train_input",
    "process_rows",
    "resolve_data_dir",
    "write_array_record",
    "write_label_map",
]
