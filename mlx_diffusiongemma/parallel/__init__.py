"""The model split across processes (and machines) with `mx.distributed`.

- Expert parallelism: rank r holds a contiguous slice of every layer's routed experts (the slices
  differ by at most one expert when the count does not divide). Routing stays global (every rank
  has the router); each rank evaluates the (token, slot) pairs with its local expert weights,
  zero-weights the pairs routed elsewhere, and one `all_sum` per layer adds the partial outputs.
- Tensor parallelism (optional, `tensor_parallel=("attention", "mlp")`): attention heads and the
  dense MLP's intermediate width split evenly, with mlx.nn's sharded layers
  (`AllToShardedLinear` in, `ShardedToAllLinear` out, which does the `all_sum`), as mlx-lm shards
  its models. Each adds one `[tokens, hidden]` all_sum per layer; docs/distributed.md weighs
  what that costs against what it saves.
- Everything else (embedding/logits, norms, router, self-conditioning) is replicated, so every
  rank ends a pass with the same logits: the ring all-reduce hands every rank the same bits, the
  sampler then takes the same decisions on every rank from the same seed, and the engine runs
  unchanged on each rank with its one host synchronisation per step.

Loading (`load.load_sharded`) reads only the rank's slice of each tensor straight from the
safetensors files through a read-only memory map: no rank ever holds the whole model, not even
one whole expert tensor at a time. Any layout `checkpoint.loading.load` accepts works (ours,
mlx-vlm's, Hugging Face's).

Launch with MLX's own launcher, e.g. `mlx.launch --backend ring -n 2 -- dgemma generate ...`.

The wing: `plan.py` (how the model splits: the plan and which slice of each tensor a rank holds),
`shard.py` (the sharded modules), `load.py` (reading a rank's slices), `group.py` (forming the
group, sharing a request, and a bound on waiting for the other ranks). What a split costs in
communication is accounted in `perf/communication.py`.
"""
