"""``python -m mtht``: a short demo that builds a table, trains a few steps and says what it did."""

from __future__ import annotations

import time

import numpy as np

import mtht


def main() -> None:
    info = mtht.build_info()
    print(f"mtht {info['version']}  kernel={info['active_kernel']}  cpu={','.join(info['cpu_isas'])}  "
          f"threads={info['num_threads']}")
    config = mtht.HashTableConfigInstance(
        mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[
            mtht.CombineAsSegment(16, mtht.RandomUniformInitializer(-0.05, 0.05),
                                  mtht.AdagradOptimizer(initial_accumulator_value=0.1), mtht.Fp32Compressor()),
        ]), random_seed=7),
        learning_rate_fns=[0.05],
    )
    table = mtht.hash_table_from_config(config, name_suffix="demo")
    rng = np.random.default_rng(0)
    target = rng.standard_normal(16).astype(np.float32)  # every embedding should move toward this
    batch, steps, vocab = 65536, 20, 1_000_000
    print(f"table: dim {table.dim_size}, Adagrad lr 0.05; training {steps} steps of {batch} Zipf ids "
          f"from a vocabulary of {vocab:,}")
    start = time.perf_counter()
    for step in range(steps):
        ids = (rng.zipf(1.2, batch) % vocab).astype(np.int64)
        emb = table.lookup(ids)
        grads = emb - target  # gradient of 0.5 * ||emb - target||^2
        table.apply_gradients(ids, grads, global_step=step, enable_dedup=True, req_time=1_700_000_000 + step)
        if step in (0, steps - 1):
            loss = 0.5 * float(np.mean(np.sum(grads * grads, axis=1)))
            print(f"  step {step:2d}: loss {loss:.4f}, table size {len(table):,}")
    elapsed = time.perf_counter() - start
    print(f"{steps * batch:,} lookups + updates in {elapsed:.2f} s "
          f"({2 * steps * batch / elapsed / 1e6:.1f} M ids/s)")
    st = table.stats()
    print(f"memory: {st['bytes'] / st['size']:.0f} bytes/entry ({st['size']:,} entries, load {st['load_factor']:.2f})")
    entry = table.lookup_entry([int(ids[0])])[0]
    assert entry is not None  # just written
    print(f"entry of id {entry.id}: first values {np.round(entry.values[:4], 4)}, "
          f"adagrad norm {np.round(entry.optimizer_state[0]['norm'][:2], 3)}, ts {entry.last_update_ts}")


if __name__ == "__main__":
    main()
