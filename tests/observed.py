"""What a test can observe of a table's entries, in a form that compares bit for bit."""

import numpy as np


def entry_rows(table, ids):
    """Per id: None when absent, else (id, value bytes, optimizer state by segment as sorted
    (name, dtype, bytes), last update time)."""
    rows = []
    for dump in table.lookup_entry(np.asarray(ids, dtype=np.int64)):
        if dump is None:
            rows.append(None)
        else:
            state = [sorted((name, v.dtype.str, v.tobytes()) for name, v in seg.items())
                     for seg in dump.optimizer_state]
            rows.append((dump.id, dump.values.tobytes(), state, dump.last_update_ts))
    return rows
