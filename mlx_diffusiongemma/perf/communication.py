"""What a pass exchanges between ranks when the model is split (`parallel/`), and the time it takes
on a link: plain arithmetic on the model's shape."""

from __future__ import annotations

from typing import Sequence

from ..parallel.plan import TENSOR_PARTS


def collectives_per_layer(tensor_parallel: Sequence[str] = ()) -> int:
    """all_sums of a `[rows, hidden]` activation per layer: the experts' one, plus one for each
    tensor-parallel part (attention's o_proj, the dense MLP's down_proj)."""
    return 1 + sum(part in tensor_parallel for part in TENSOR_PARTS)


def pass_communication(text, rows: int, ranks: int, tensor_parallel: Sequence[str] = (), *,
                       encoder: bool = False, activation_bytes: int = 2) -> dict[str, float]:
    """Bytes one pass over `rows` tokens exchanges (a decoder step: rows = canvas length).

    A ring all-reduce of S bytes over N ranks sends (and receives) 2 (N - 1) / N x S bytes per
    rank, in 2 (N - 1) hops (reduce-scatter, then all-gather). An encoder pass skips the last
    layer's feed-forward and attention output (it only writes that layer's K/V).
    """
    layers = text.num_hidden_layers - (1 if encoder else 0)
    collectives = collectives_per_layer(tensor_parallel) * layers
    payload = rows * text.hidden_size * activation_bytes
    sent = collectives * payload * 2 * (ranks - 1) / ranks
    return {"collectives": collectives, "payload_bytes": payload, "sent_per_rank": sent,
            "hops_per_collective": 2 * (ranks - 1), "on_links": sent * ranks}


def link_time(comm: dict[str, float], gbit_per_s: float, hop_latency_s: float) -> float:
    """Seconds a pass spends communicating on a full-duplex link of `gbit_per_s` with a per-message
    latency: bandwidth term plus one latency per hop of every collective (nothing overlapped)."""
    return comm["sent_per_rank"] * 8 / (gbit_per_s * 1e9) + comm["collectives"] * comm["hops_per_collective"] * hop_latency_s
