"""Names of the metric and record keys that nodes, server, report and tools all read: declared once.

Why: a key spelled differently in two places is a metric that silently reads as missing; every side
imports the name from here instead of repeating the string.
"""

from __future__ import annotations

__all__ = ["ACCURACY_KEYS", "NUM_EXAMPLES", "NUM_VAL", "PARTITION_ID", "TEST_ACC", "TEST_ACC_CLIP", "TEST_ACC_T5",
           "VAL_ACC"]

NUM_EXAMPLES = "num-examples"  # the clips a reply speaks for: Flower's weighting key (FedAvg's default)
NUM_VAL = "num_val"  # held-out validation clips of an evaluate reply
PARTITION_ID = "partition_id"  # which partition of the data a reply is for
TEST_ACC = "test_retrieval_acc"  # both branches: is a clip's output nearest its own class's text target?
TEST_ACC_CLIP = "test_retrieval_acc_clip"
TEST_ACC_T5 = "test_retrieval_acc_t5"
VAL_ACC = "val_retrieval_acc"
ACCURACY_KEYS = (TEST_ACC, TEST_ACC_CLIP, TEST_ACC_T5, VAL_ACC)
