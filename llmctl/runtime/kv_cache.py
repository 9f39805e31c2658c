"""The KV cache: preallocated per layer, passed into the model, reporting ``nbytes``.

Full-attention layers hold ``max_len`` positions. Sliding-window layers hold only their window (plus an
optional ``rollback`` reserve) as a ring buffer: position ``p`` lives in slot ``p % slots``. The cache keeps
the position held by each ring slot, so attention masks, rollback (``truncate``) and writes all follow from
one small table. Nothing is allocated per decode step besides the new keys and values themselves.

The model drives a step as ``cache.begin(start, T)`` once, then ``cache.update(layer, k, v)`` per layer;
``update`` returns the keys, values and what to mask: a boolean mask (``True`` = attend), ``None`` (every
key is visible) or ``CAUSAL`` — the keys are exactly this chunk's positions in order and the plain causal
mask is the whole story (a chunk starting at position 0 whose window, if any, does not bite), so attention
can run SDPA's ``is_causal`` kernels (flash attention on CUDA) instead of a mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmctl.config import SLIDING, ModelConfig
from llmctl.errors import ConfigError, UsageError

if TYPE_CHECKING:
    import torch

CAUSAL = "causal"  # the mask of a chunk attending to itself only: SDPA's is_causal=True


def layer_windows(config: ModelConfig) -> list[int | None]:
    """Per layer: the sliding window (keys a query sees, itself included) or None for full attention."""
    kinds = config.layer_kinds()
    if SLIDING in kinds and config.sliding_window is None:
        raise ConfigError(
            f"{config._where()}layer_types has sliding layers but sliding_window is not set; fix config.json"
        )
    return [config.sliding_window if kind == SLIDING else None for kind in kinds]


def self_mask(start: int, T: int, window: int | None, device: Any = None) -> Any:
    """What a chunk of ``T`` queries at ``start ..`` attending to its own keys (no cache) masks: ``None`` for
    one query, ``CAUSAL`` when the window (if any) does not bite, else the boolean (T, T) mask."""
    import torch

    if T == 1:
        return None
    if window is None or T <= window:
        return CAUSAL
    pos = torch.arange(start, start + T, device=device)
    return attention_mask(pos, pos, window)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """(T, L) boolean mask, True where the query at ``q_pos`` may attend the key at ``k_pos``.

    Causal, and with a window W a query sees the W most recent positions, itself included (as in
    transformers: ``k > q - W``). Negative key positions mark empty slots.
    """
    q = q_pos[:, None]  # (T, 1)
    k = k_pos[None, :]  # (1, L)
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= k > q - window
    return mask


class KVCache:
    """Keys and values of every layer, each (batch, n_kv_heads, slots, head_dim) in the compute dtype.

    ``rollback`` extra ring slots let ``truncate`` go back up to ``rollback + 1`` tokens on sliding-window
    layers (chat rollback); with 0 they hold exactly their window.
    """

    def __init__(
        self,
        config: ModelConfig,
        max_len: int,
        batch_size: int = 1,
        *,
        dtype: Any = None,
        device: Any = None,
        rollback: int = 0,
    ) -> None:
        import torch

        for name, value in (("max_len", max_len), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UsageError(f"KV cache {name} must be a positive integer, got {value!r}")
        if isinstance(rollback, bool) or not isinstance(rollback, int) or rollback < 0:
            raise UsageError(f"KV cache rollback must be a non-negative integer, got {rollback!r}")
        self.max_len = max_len
        self.batch_size = batch_size
        self.windows = layer_windows(config)
        dtype = dtype or torch.float32
        shape = (batch_size, config.num_key_value_heads, 0, config.head_dim)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for w in self.windows:
            slots = max_len if w is None else min(max_len, w + rollback)
            size = (*shape[:2], slots, shape[3])  # (B, n_kv_heads, slots, head_dim)
            self.keys.append(torch.zeros(size, dtype=dtype, device=device))
            self.values.append(torch.zeros(size, dtype=dtype, device=device))
        ring = [w for w in self.windows if w is not None]
        self.window = ring[0] if ring else None
        self.ring_slots = min(max_len, self.window + rollback) if self.window is not None else 0
        # Position held by each ring slot (-1: empty). Sliding layers share one geometry.
        self.slot_pos = torch.full((self.ring_slots,), -1, dtype=torch.long, device=device)
        self.length = 0
        self._step: dict[str, Any] = {}

    # ---- bookkeeping ---------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys) + sum(t.nbytes for t in self.values)

    def reset(self) -> None:
        """Forget every position (the memory is kept)."""
        self.length = 0
        self.slot_pos.fill_(-1)

    def truncate(self, n: int) -> None:
        """Roll back to the first ``n`` positions; the next token is written at position ``n``."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.length:
            raise UsageError(f"cannot truncate the KV cache to {n!r}: it holds {self.length} positions")
        if self.window is not None and n < self.length:
            self.slot_pos.masked_fill_(self.slot_pos >= n, -1)
            lo = max(0, n - self.window + 1)
            kept = int(((self.slot_pos >= lo) & (self.slot_pos < n)).sum())
            if kept != n - lo:
                length = self.length
                self.reset()
                raise UsageError(
                    f"cannot roll the KV cache back from {length} to {n} positions: sliding-window "
                    f"layers keep only the last {self.ring_slots} (window {self.window}); the cache was "
                    "reset, prefill again (or allocate it with a larger rollback)"
                )
        self.length = n

    # ---- one forward step ----------------------------------------------------------------------
    def begin(self, start: int, T: int, *, masks: bool = True) -> None:
        """Prepare writing positions ``start .. start+T-1`` (rolling back first if ``start`` < length).

        ``masks=False`` for one token whose attention reads the ring's positions itself (llmctl.runtime.fused):
        only the slot it is written to is recorded, and ``update`` must not follow."""
        import torch

        if start != self.length:
            if start > self.length:
                raise UsageError(
                    f"start_pos {start} is past the cache's {self.length} positions; positions must be contiguous"
                )
            self.truncate(start)
        if start + T > self.max_len:
            raise UsageError(
                f"context is full: {start + T} positions exceed the KV cache's max_len {self.max_len}; "
                "allocate a larger cache or start a new conversation"
            )
        step: dict[str, Any] = {"start": start, "T": T, "full_mask": None}
        self._step = step
        self.length = start + T
        if T == 1 and self.window is None:
            return  # decoding with full attention only: nothing to mask or place
        if T == 1 and not masks:
            self.slot_pos[start % self.ring_slots] = start  # as the ring's index_copy_ below places one position
            return
        device = self.slot_pos.device
        new_pos = torch.arange(start, start + T, device=device)
        if T > 1 and start == 0:  # full layers attend to the chunk itself, causally
            step["full_mask"] = CAUSAL
        elif T > 1:  # full layers attend to positions 0..start+T-1, causally
            step["full_mask"] = attention_mask(new_pos, torch.arange(start + T, device=device), None)
        if self.window is not None:
            S, W = self.ring_slots, self.window
            if start + T <= S or T <= S - W + 1:
                # The new keys overwrite no position a query of this step can see: write them, then
                # attend over the ring (its first start+T slots while it has not wrapped).
                slots = new_pos % S
                self.slot_pos.index_copy_(0, slots, new_pos)
                n = min(start + T, S)
                step["ring_first"], step["ring_slots"], step["ring_len"] = True, slots, n
                if T == 1 and (start < W or S == W):
                    step["ring_mask"] = None  # every held position is inside the window
                elif start == 0 and T <= W:
                    step["ring_mask"] = CAUSAL  # slots 0..T-1 hold positions 0..T-1, all in the window
                else:
                    step["ring_mask"] = attention_mask(new_pos, self.slot_pos[:n], W)
            else:
                # A long chunk: attend over [ring, new keys], then keep the last S new keys.
                keep = min(T, S)
                step["ring_first"] = False
                step["ring_mask"] = attention_mask(new_pos, torch.cat((self.slot_pos, new_pos)), W)
                step["ring_src"] = T - keep
                step["ring_slots"] = new_pos[T - keep :] % S
                self.slot_pos.index_copy_(0, step["ring_slots"], new_pos[T - keep :])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Store this step's keys/values (B, n_kv_heads, T, head_dim) of ``layer``; return what to attend
        (keys, values, and a mask, ``None`` or ``CAUSAL``)."""
        import torch

        step = self._step
        ck, cv = self.keys[layer], self.values[layer]
        start, T = step["start"], step["T"]
        if self.windows[layer] is None:
            ck.narrow(2, start, T).copy_(k)
            cv.narrow(2, start, T).copy_(v)
            n = start + T
            return ck.narrow(2, 0, n), cv.narrow(2, 0, n), step["full_mask"]
        slots = step["ring_slots"]
        if step["ring_first"]:
            if T == 1:
                s = start % ck.shape[2]
                ck.narrow(2, s, 1).copy_(k)
                cv.narrow(2, s, 1).copy_(v)
            else:
                ck.index_copy_(2, slots, k)
                cv.index_copy_(2, slots, v)
            n = step["ring_len"]
            return ck.narrow(2, 0, n), cv.narrow(2, 0, n), step["ring_mask"]
        keys = torch.cat((ck, k), dim=2)  # (B, n_kv_heads, S + T, head_dim)
        values = torch.cat((cv, v), dim=2)
        src = step["ring_src"]
        ck.index_copy_(2, slots, k[:, :, src:])
        cv.index_copy_(2, slots, v[:, :, src:])
        return keys, values, step["ring_mask"]
