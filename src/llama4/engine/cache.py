"""The engine's KV cache: per-slot state, chunk-sized buffers for local layers.

Shape legend: N slots (rows of the cache), B rows in this forward, T tokens per row in this
forward, K key/value heads, Dh head dim, L global capacity (max_len), C local capacity
(min(attention_chunk_size, max_len)), S key positions attended to.

Layout. Global (NoPE, full attention) layers keep the whole history: one (N, K, L, Dh) buffer
per layer. Local (RoPE, chunked) layers only ever attend inside the current chunk of
``attention_chunk_size`` positions, so they keep one (N, K, C, Dh) buffer per layer in which
position p lives at index p % C. At the first token of a chunk, index 0 is overwritten: the
buffer "resets" by itself, and entries at indices above p % C (left from the previous chunk)
are masked. Everything is allocated once, zero-filled (masked garbage must be finite: SDPA
multiplies it by zero weights), and written in place; no step allocates cache memory.

Slots. Each cache row is a slot with its own length (the number of tokens stored). A forward
covers some slots (in any order, one batch row each) and appends ``n_new[b]`` tokens to row b;
rows are right-padded to the longest, pad tokens sit after the row's real tokens (so no real
token attends to them) and are never stored. That is all a continuous-batching scheduler
needs: prefill one slot while others decode in another forward, free a slot, reuse it.

Masks are computed once per forward in ``begin`` (one for all global layers, one for all local
layers); ``update`` only writes the new keys/values and hands back a view of the buffer.

A forward that spans several chunks (a long prefill) attends, on local layers, over the
stored part of the first chunk plus all new keys, with a mask that keeps each query inside its
own chunk; afterwards only the new tokens of the last (partial) chunk are stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llama4.config import TextConfig


@dataclass
class _Step:
    """What ``begin`` computed for the forward in flight."""

    rows: slice | torch.Tensor  # which cache rows, as a slice when they are consecutive
    T: int
    # Global layers: where the valid new tokens go, what to attend to, the mask.
    g_write: tuple | None  # (slot, position, sel): see _write
    g_len: int  # S for global layers
    g_mask: torch.Tensor | None
    # Local layers.
    l_write: tuple | None
    l_prior: int  # stored local entries to prepend (T > 1) ...
    l_len: int  # ... or, for a decode step (T == 1), S for local layers
    l_mask: torch.Tensor | None


class KVCache:
    """Pre-allocated KV cache for `slots` sequences of up to `max_len` tokens each.

    Implements the model's ``AttentionCache`` protocol (``update``); the engine calls
    ``begin(slots, n_new, T)`` before each forward to get the positions to pass to the model.
    """

    def __init__(
        self,
        cfg: TextConfig,
        *,
        slots: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        assert slots >= 1 and max_len >= 1, f"slots={slots} and max_len={max_len} must be >= 1"
        self.n_slots, self.max_len = slots, max_len
        self.chunk = cfg.attention_chunk_size
        self.local_len = min(self.chunk, max_len)
        n_global = sum(cfg.is_global)
        n_local = cfg.n_layers - n_global
        # layer id -> index in its stack
        self.index: list[int] = []
        counts = [0, 0]  # local, global
        for g in cfg.is_global:
            self.index.append(counts[g])
            counts[g] += 1
        self.is_global = cfg.is_global
        kw = dict(dtype=dtype, device=device)
        K, Dh = cfg.n_kv_heads, cfg.head_dim
        self.gk = torch.zeros(n_global, slots, K, max_len, Dh, **kw)
        self.gv = torch.zeros(n_global, slots, K, max_len, Dh, **kw)
        self.lk = torch.zeros(n_local, slots, K, self.local_len, Dh, **kw)
        self.lv = torch.zeros(n_local, slots, K, self.local_len, Dh, **kw)
        self.device = torch.device(device)
        self.lengths: list[int] = [0] * slots  # tokens stored per slot
        self._step: _Step | None = None

    # ----- slot-level state ---------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gk, self.gv, self.lk, self.lv))

    def free(self, slot: int) -> None:
        """Forget a slot's tokens (its buffers are overwritten by the next user)."""
        self.lengths[slot] = 0

    def can_truncate(self, slot: int, length: int) -> bool:
        """Whether the slot can be cut back to its first `length` tokens and continued.

        Global layers can always; local layers only keep the current chunk, so the cut must
        fall in the chunk of the last stored token, or exactly on a chunk start.
        """
        n = self.lengths[slot]
        if not 0 <= length <= n:
            return False
        return length == n or length % self.chunk == 0 or length // self.chunk == (n - 1) // self.chunk

    def truncate(self, slot: int, length: int) -> None:
        """Keep the slot's first `length` tokens (see ``can_truncate``)."""
        if not self.can_truncate(slot, length):
            raise ValueError(
                f"slot {slot} holds {self.lengths[slot]} tokens; cannot truncate to {length} "
                f"(local layers only keep the chunk of {self.chunk} positions in progress)"
            )
        self.lengths[slot] = length

    # ----- one forward --------------------------------------------------------------------------

    def begin(self, slots: Sequence[int], n_new: Sequence[int], T: int) -> torch.Tensor:
        """Prepare a forward appending ``n_new[b] <= T`` tokens to ``slots[b]``.

        Returns the absolute positions (B, T) to pass to the model: row b holds
        ``lengths[slot] + t``, its pad tokens (t >= n_new[b]) continue the count and are not stored.
        The slots' lengths are advanced now.
        """
        B = len(slots)
        starts, ends = self._room(slots, n_new, T)
        dev = self.device
        first = slots[0]
        rows: slice | torch.Tensor = (
            slice(first, first + B)
            if list(slots) == list(range(first, first + B))
            else torch.tensor(slots, device=dev)
        )
        if T == 1:
            pos = self._begin_decode(slots, starts, rows)
        else:
            pos = self._begin_general(slots, n_new, T, starts, ends, rows)
        for s, e in zip(slots, ends):
            self.lengths[s] = e
        return pos

    def advance(self, slots: Sequence[int]) -> list[int]:
        """Append one token to each slot without preparing a forward: for a decode step that writes
        the cache itself (llama4.engine.step). Returns the new tokens' positions."""
        starts, ends = self._room(slots, [1] * len(slots), 1)
        for s, e in zip(slots, ends):
            self.lengths[s] = e
        self._step = None
        return starts

    def _room(self, slots: Sequence[int], n_new: Sequence[int], T: int) -> tuple[list[int], list[int]]:
        """Where each slot's new tokens start and end; checks they fit."""
        B = len(slots)
        assert B == len(n_new) and B >= 1, f"{B} slots but {len(n_new)} token counts"
        assert len(set(slots)) == B, f"slots {list(slots)} repeat"
        if not all(0 <= s < self.n_slots for s in slots):  # a negative one would index from the end
            raise ValueError(f"slots {list(slots)}: the cache has slots 0..{self.n_slots - 1}")
        starts = [self.lengths[s] for s in slots]
        ends = [a + n for a, n in zip(starts, n_new)]
        for s, n, e in zip(slots, n_new, ends):
            assert 1 <= n <= T, f"slot {s}: {n} new tokens in a forward of {T}"
            if e > self.max_len:
                raise ValueError(f"slot {s} would hold {e} tokens, more than max_len={self.max_len}")
        return starts, ends

    def _begin_decode(self, slots: Sequence[int], starts: list[int], rows) -> torch.Tensor:
        """One new token per row: few small tensors, masks only when rows differ in length."""
        dev, C = self.device, self.chunk
        pos = torch.tensor(starts, device=dev)  # (B,)
        slot_t = torch.tensor(list(slots), device=dev)
        g_len = max(starts) + 1
        g_mask = None  # every row attends to all its positions 0..pos
        if len(set(starts)) > 1:
            g_mask = (torch.arange(g_len, device=dev) <= pos[:, None])[:, None, None]  # (B,1,1,S)
        offs = [a % C for a in starts]  # index of the new token in the local buffers
        l_len = max(offs) + 1
        l_mask = None
        if len(set(offs)) > 1:
            l_mask = (torch.arange(l_len, device=dev) <= (pos % C)[:, None])[:, None, None]  # (B,1,1,S)
        self._step = _Step(
            rows, 1, (slot_t, pos, None), g_len, g_mask, (slot_t, pos % C, None), 0, l_len, l_mask
        )
        return pos[:, None]

    def _begin_general(self, slots, n_new, T, starts, ends, rows) -> torch.Tensor:
        """Several tokens per row (prefill), rows right-padded to T."""
        dev, C = self.device, self.chunk
        start_t = torch.tensor(starts, device=dev)
        pos = start_t[:, None] + torch.arange(T, device=dev)  # (B, T)
        slot_t = torch.tensor(list(slots), device=dev)

        # Valid (stored) tokens: row b, time t < n_new[b].
        n_t = torch.tensor(list(n_new), device=dev)
        valid = torch.arange(T, device=dev)[None] < n_t[:, None]  # (B, T)
        all_valid = all(n == T for n in n_new)
        if all_valid:
            g_write = (slot_t.repeat_interleave(T), pos.flatten(), None)
        else:
            b_idx, t_idx = valid.nonzero(as_tuple=True)
            g_write = (slot_t[b_idx], pos[b_idx, t_idx], (b_idx, t_idx))

        # Global layers: write first, then attend over [0, max end) of the rows.
        g_len = max(ends)
        same = len(set(starts)) == 1
        if same and starts[0] == 0 and all_valid:
            g_mask = None  # plain causal with S == T
        else:
            g_mask = (torch.arange(g_len, device=dev)[None, None] <= pos[:, :, None])[:, None]  # (B,1,T,S)

        # Local layers: attend over the stored part of each row's current chunk plus the new
        # tokens, each query inside its own chunk; store only new tokens of the last chunk.
        priors = [a % C for a in starts]  # stored entries of the chunk each row is in
        l_prior = max(priors)
        qchunk = pos // C  # (B, T)
        new_mask = (pos[:, None, :] <= pos[:, :, None]) & (qchunk[:, None, :] == qchunk[:, :, None])
        if l_prior:
            prior_t = torch.tensor(priors, device=dev)
            j = torch.arange(l_prior, device=dev)
            in_first_chunk = (qchunk == (start_t // C)[:, None])[:, :, None]  # (B, T, 1)
            old_mask = (j[None, None] < prior_t[:, None, None]) & in_first_chunk  # (B, T, prior)
            l_mask = torch.cat([old_mask, new_mask], dim=-1)[:, None]
        elif same and starts[0] == 0 and all_valid and T <= C:
            l_mask = None  # one chunk from position 0: plain causal
        else:
            l_mask = new_mask[:, None]
        last = torch.tensor([e - 1 for e in ends], device=dev)
        keep = valid & (qchunk == (last // C)[:, None])
        kb, kt = keep.nonzero(as_tuple=True)
        l_write = (slot_t[kb], pos[kb, kt] % C, (kb, kt)) if kb.numel() else None

        self._step = _Step(rows, T, g_write, g_len, g_mask, l_write, l_prior, l_prior + T, l_mask)
        return pos

    def update(
        self, layer_id: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store k, v (B, K, T, Dh) of this forward; return what to attend to (see module doc)."""
        st = self._step
        assert st is not None, "KVCache.update before begin()"
        i = self.index[layer_id]
        if self.is_global[layer_id]:
            kb, vb = self.gk[i], self.gv[i]
            _write(kb, vb, k, v, st.g_write)
            return _rows(kb, st.rows, st.g_len), _rows(vb, st.rows, st.g_len), st.g_mask
        kb, vb = self.lk[i], self.lv[i]
        if st.T == 1:
            _write(kb, vb, k, v, st.l_write)
            return _rows(kb, st.rows, st.l_len), _rows(vb, st.rows, st.l_len), st.l_mask
        if st.l_prior:
            k_all = torch.cat([_rows(kb, st.rows, st.l_prior), k], dim=2)
            v_all = torch.cat([_rows(vb, st.rows, st.l_prior), v], dim=2)
        else:
            k_all, v_all = k, v
        _write(kb, vb, k, v, st.l_write)  # after the copy above: may overwrite the prior entries
        return k_all, v_all, st.l_mask


def _rows(buf: torch.Tensor, rows: slice | torch.Tensor, length: int) -> torch.Tensor:
    """buf (N, K, L, Dh) -> the batch's rows, first `length` positions: a view when rows is a slice."""
    if isinstance(rows, slice):
        return buf[rows, :, :length]
    return buf[:, :, :length].index_select(0, rows)


def _write(kbuf, vbuf, k, v, where) -> None:
    """Scatter new k, v (B, K, T, Dh) into the (N, K, L, Dh) buffers at (slot, index).

    where = (slot, index, sel): destination of each stored token, and which (b, t) of the
    forward they are (None: all B*T tokens in order)."""
    if where is None:
        return
    slot, idx, sel = where
    for buf, new in ((kbuf, k), (vbuf, v)):
        new = new.transpose(1, 2)  # (B, T, K, Dh)
        new = new.flatten(0, 1) if sel is None else new[sel]
        # (N, L, K, Dh) view: index_put_ writes through to the buffer.
        buf.transpose(1, 2).index_put_((slot, idx), new)


# --------------------------------------------------------------------------------------------
# Memory accounting
# --------------------------------------------------------------------------------------------


def kv_bytes_per_token(cfg: TextConfig, dtype_bytes: int = 2) -> int:
    """KV bytes one token adds to ONE layer: 2 (k, v) x K x Dh x bytes."""
    return 2 * cfg.n_kv_heads * cfg.head_dim * dtype_bytes


def kv_cache_bytes(cfg: TextConfig, n_tokens: int, dtype_bytes: int = 2) -> int:
    """Bytes of this engine's cache for one sequence of `n_tokens` (global layers grow, local
    layers hold at most one chunk)."""
    n_global = sum(cfg.is_global)
    n_local = cfg.n_layers - n_global
    per = kv_bytes_per_token(cfg, dtype_bytes)
    return per * (n_global * n_tokens + n_local * min(n_tokens, cfg.attention_chunk_size))


def naive_kv_cache_bytes(cfg: TextConfig, n_tokens: int, dtype_bytes: int = 2) -> int:
    """Bytes of a cache that keeps every layer's whole history."""
    return kv_bytes_per_token(cfg, dtype_bytes) * cfg.n_layers * n_tokens


@dataclass
class MemoryRow:
    n_tokens: int
    engine_bytes: int
    naive_bytes: int

    @property
    def ratio(self) -> float:
        return self.engine_bytes / self.naive_bytes


def memory_report(
    cfg: TextConfig, lengths: Sequence[int] = (131072, 1048576, 10485760), dtype_bytes: int = 2
) -> list[MemoryRow]:
    """Engine vs naive KV bytes for one sequence at each length."""
    return [
        MemoryRow(n, kv_cache_bytes(cfg, n, dtype_bytes), naive_kv_cache_bytes(cfg, n, dtype_bytes))
        for n in lengths
    ]
