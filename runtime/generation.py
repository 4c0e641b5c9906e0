"""Text generation over any session that implements the generation protocol below.

A session that can generate provides `generation` (the manifest's entry: cache
layers, vocab, uncached layers), `new_cache(batch, max_length)` and
`run_program("prefill" | "decode", feeds, cache) -> logits [batch, vocab]`.
`Generator` (a mixin) builds `start` and `generate` on top of that, the same
for every target. Where the derived programs are missing (a layer that cannot
be cached, or a target without decode) generation recomputes the whole
sequence through `run` each step, and says so on stderr (once per session).

Programs with a symbolic batch (the manifest's `batch` None: also those derived
from a batch-1 export, passes/generation_batch.py) run a batch together
(right-padded prompts, each sequence's own `past_len`); programs of batch 1
(`generation.per_sequence` says why) run each sequence on its own cache.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .. import errors
from ..ir import dtypes

DEFAULT_MAX_LENGTH = 4096          # the cache reservation when the model states no max positions


class GenerationError(errors.InputError):
    """Bad input to start/append/generate."""


class Generator:
    """Mixin: `start` and `generate` over `generation`, `new_cache` and `run_program` (or `run` alone)."""

    max_cache_length: int = DEFAULT_MAX_LENGTH

    def start(self, input_ids, *, lengths=None, attention_mask=None, max_length: Optional[int] = None) -> "GenerationState":
        """Run the prompt(s) and return the state: `logits` (last position), `append`, `length`."""
        return GenerationState(self, input_ids, lengths=lengths, attention_mask=attention_mask, max_length=max_length)

    def generate(self, input_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: Optional[int] = None, stop_tokens: Sequence[int] = (),
                 on_token: Optional[Callable[[np.ndarray], Any]] = None, lengths=None, attention_mask=None,
                 max_length: Optional[int] = None) -> np.ndarray:
        """Generate up to `max_new_tokens` per sequence: int64 [batch, n] (greedy when temperature is 0).

        A sequence that produced one of `stop_tokens` repeats it until every sequence has stopped."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        _check_sampling(temperature, top_k, top_p)
        ids, lens = prompts(input_ids, lengths, attention_mask)
        need = int(lens.max()) + int(max_new_tokens)
        if max_length is None:            # reserve what this call needs, within the model's limit
            limit = _max_length(self, getattr(self, "generation", None) or {}, None)
            if need > limit:
                raise GenerationError(f"{int(lens.max())} prompt + {max_new_tokens} new tokens is past "
                                      f"max_length {limit}")
            max_length = need
        state = self.start(ids, lengths=lens, max_length=max_length)
        _check_room(state, int(max_new_tokens))
        rng = np.random.default_rng(seed)
        stops = np.asarray(list(stop_tokens), np.int64)
        out = np.zeros((len(lens), int(max_new_tokens)), np.int64)
        done = np.zeros(len(lens), bool)
        logits = state.logits
        for t in range(int(max_new_tokens)):
            token = sample(logits, temperature, top_k, top_p, rng)
            token = np.where(done, out[:, t - 1] if t else token, token)
            out[:, t] = token
            if on_token is not None:
                on_token(token.copy())
            done |= np.isin(token, stops)
            if done.all():
                return out[:, :t + 1]
            if t + 1 < max_new_tokens:
                logits = state.append(token)
        return out


class GenerationState:
    """One generation in flight: it owns its caches (many may be in flight on one session)."""

    def __init__(self, session, input_ids, *, lengths=None, attention_mask=None, max_length: Optional[int] = None):
        self.session = session
        info = getattr(session, "generation", None) or {}
        self.vocab = int(info.get("vocab") or 0)
        ids, lens = prompts(input_ids, lengths, attention_mask, self.vocab)
        cap = _max_length(session, info, max_length)
        if int(lens.max()) > cap:
            raise GenerationError(f"a prompt of {int(lens.max())} tokens is past max_length {cap}")
        self.max_length = cap
        self.cached = bool(info.get("layers")) and not info.get("uncached") and hasattr(session, "run_program")
        self.tokens = [list(ids[b, :n]) for b, n in enumerate(lens)]
        self._lengths = lens.copy()
        if not self.cached:
            why = (f"layers {', '.join(info['uncached'])} cannot be cached" if info.get("uncached")
                   else info.get("recompute") or info.get("compressed_decode") or "this target has no decode programs")
            if not getattr(session, "_warned_recompute", False):     # once per session, not per start
                print(f"polyport: warning: {why}; generation recomputes the whole sequence each step",
                      file=sys.stderr)
                session._warned_recompute = True
            self.reserved_bytes = 0
            self.logits = self._recompute()
            return
        # programs of batch 1: one cache per sequence; else one batched cache
        self._groups = [[b] for b in range(len(lens))] if info.get("batch") == 1 else [list(range(len(lens)))]
        self._caches = [session.new_cache(len(g), cap) for g in self._groups]
        self.reserved_bytes = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
                                  for shape, dtype in cache_shapes(info, len(lens), cap).values())
        self._step = int(info.get("decode_step") or 0)
        rows = []
        for group, cache in zip(self._groups, self._caches):
            n = lens[group]
            feeds = {"input_ids": np.ascontiguousarray(ids[group, :int(n.max())]), "lengths": n.astype(np.int64)}
            rows.append(session.run_program("prefill", feeds, cache))
        self.logits = self._gather(rows)

    @property
    def length(self) -> np.ndarray:
        """Each sequence's length so far (int64 [batch])."""
        return self._lengths.copy()

    def append(self, token_ids) -> np.ndarray:
        """Feed the next token(s) of every sequence ([batch] or [batch, k]); returns the last-position logits."""
        ids = np.asarray(token_ids)
        if ids.ndim == 1:
            ids = ids[:, None]
        batch = len(self._lengths)
        if ids.ndim != 2 or ids.shape[0] != batch or ids.shape[1] < 1 or ids.dtype.kind not in "iu":
            raise GenerationError(f"append takes int64 token ids [{batch}] or [{batch}, k], got "
                                  f"{ids.dtype}{list(ids.shape)}")
        ids = ids.astype(np.int64)
        _check_ids(ids, self.vocab)
        if int(self._lengths.max()) + ids.shape[1] > self.max_length:
            raise GenerationError(f"{int(self._lengths.max())} + {ids.shape[1]} tokens is past max_length "
                                  f"{self.max_length}")
        for b in range(batch):
            self.tokens[b].extend(int(t) for t in ids[b])
        if self.cached and self._step and ids.shape[1] > self._step:     # programs of one token per decode call
            for i in range(0, ids.shape[1], self._step):
                self._decode(ids[:, i:i + self._step])
            return self.logits
        if not self.cached:
            self._lengths += ids.shape[1]
            self.logits = self._recompute()
            return self.logits
        return self._decode(ids)

    def _decode(self, ids: np.ndarray) -> np.ndarray:
        rows = []
        for group, cache in zip(self._groups, self._caches):
            feeds = {"input_ids": np.ascontiguousarray(ids[group]), "past_len": self._lengths[group].copy()}
            rows.append(self.session.run_program("decode", feeds, cache))
        self._lengths += ids.shape[1]
        self.logits = self._gather(rows)
        return self.logits

    def _gather(self, rows: list[np.ndarray]) -> np.ndarray:
        out = np.empty((len(self._lengths), rows[0].shape[-1]), np.float32)
        for group, r in zip(self._groups, rows):
            out[group] = r
        return out

    def _recompute(self) -> np.ndarray:
        name = self.session.input_names[0]
        rows = [self.session.run({name: np.asarray([seq], np.int64)})[self.session.output_names[0]][0, -1]
                for seq in self.tokens]
        return np.stack(rows).astype(np.float32)


def generator_for(session, generation: Optional[dict] = None) -> Generator:
    """`session` itself when it can generate, else a recomputing wrapper around its `run`
    (`generation`: the artifact's manifest entry, for the vocab and the uncached layers)."""
    return session if isinstance(session, Generator) else _Recompute(session, generation or {})


class _Recompute(Generator):
    def __init__(self, session, generation: dict):
        self.input_names, self.output_names, self.run = session.input_names, session.output_names, session.run
        self.generation = generation


# ---- inputs ------------------------------------------------------------------------------------

def prompts(input_ids, lengths=None, attention_mask=None, vocab: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(right-padded ids int64 [batch, max_len], lengths int64 [batch]) from what the user gave."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise GenerationError(f"input_ids must be integer token ids [batch, seq], got {ids.dtype}{list(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise GenerationError(f"empty prompt: input_ids has shape {list(ids.shape)}")
    ids = ids.astype(np.int64)
    if lengths is not None and attention_mask is not None:
        raise GenerationError("give lengths= or attention_mask=, not both")
    if attention_mask is not None:
        mask = np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise GenerationError(f"attention_mask has shape {list(mask.shape)}, input_ids {list(ids.shape)}")
        keep = mask.astype(bool)
        lens = keep.sum(axis=1).astype(np.int64)
        packed = np.zeros_like(ids)
        for b in range(len(ids)):              # left or right padding: the kept tokens, right-padded
            packed[b, :lens[b]] = ids[b][keep[b]]
        ids = packed
    elif lengths is not None:
        lens = np.asarray(lengths)
        if lens.shape != (ids.shape[0],) or lens.dtype.kind not in "iu":
            raise GenerationError(f"lengths must be {ids.shape[0]} integers (one per sequence), got "
                                  f"{lens.dtype}{list(lens.shape)}")
        lens = lens.astype(np.int64)
    else:
        lens = np.full(ids.shape[0], ids.shape[1], np.int64)
    if (lens < 1).any() or (lens > ids.shape[1]).any():
        raise GenerationError(f"lengths {lens.tolist()} disagree with input_ids of {ids.shape[1]} tokens per row "
                              f"(each must be in [1, {ids.shape[1]}])")
    _check_ids(np.concatenate([ids[b, :n] for b, n in enumerate(lens)]), vocab)
    return ids, lens


def _check_ids(ids: np.ndarray, vocab: int) -> None:
    bad = (ids < 0) | ((ids >= vocab) if vocab else False)
    if np.any(bad):
        raise GenerationError(f"token id {int(ids[bad].flat[0])} is outside [0, {vocab or 'vocab'})")


def _check_sampling(temperature, top_k, top_p) -> None:
    if not temperature >= 0:
        raise GenerationError(f"temperature must be >= 0, got {temperature}")
    if int(top_k) != top_k or top_k < 0:
        raise GenerationError(f"top_k must be an integer >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")


def _max_length(session, info: dict, requested: Optional[int]) -> int:
    limit = min(int(info.get("max_positions") or session_cap(session)), session_cap(session))
    if requested is None:
        return limit
    if isinstance(requested, bool) or int(requested) != requested or requested < 1:
        raise GenerationError(f"max_length must be a positive integer, got {requested!r}")
    if info.get("max_positions") and requested > int(info["max_positions"]):
        raise GenerationError(f"max_length {requested} is past the model's {info['max_positions']} positions")
    return int(requested)


def cache_shapes(generation: dict, batch: int, max_length: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each cache tensor's (shape [batch, heads, slots, dim], dtype), in the programs' input order: a ring's
    slots are fixed, a linear cache's are max_length (or, "max_length/RATE", one per RATE tokens, rounded up)."""
    out = {}
    for layer in generation["layers"]:
        dtype = dtypes.from_name(layer["dtype"]).numpy
        shapes = layer.get("shapes") or {t: [layer["kv_heads"], layer["capacity"] or "max_length", dim]
                                         for t, dim in zip(layer["tensors"], (layer["head_dim"], layer["v_head_dim"]))}
        for tensor in layer["tensors"]:
            heads, slots, dim = shapes[tensor]
            if isinstance(slots, str):
                rate = int(slots.partition("/")[2] or 1)
                slots = -(-max_length // rate)
            out[tensor] = ((batch, heads, slots, dim), dtype)
    return out


def session_cap(session) -> int:
    return int(getattr(session, "max_cache_length", DEFAULT_MAX_LENGTH))


def _check_room(state: GenerationState, new: int) -> None:
    total = int(state.length.max()) + new
    if total > state.max_length:
        raise GenerationError(f"{int(state.length.max())} prompt + {new} new tokens is past max_length "
                              f"{state.max_length}")


# ---- sampling ------------------------------------------------------------------------------------

def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> np.ndarray:
    """One token per row: argmax at temperature 0, else from softmax(logits / T) cut to top_k / top_p."""
    if temperature == 0:
        return np.argmax(logits, axis=-1).astype(np.int64)
    out = np.empty(len(logits), np.int64)
    for b, row in enumerate(logits.astype(np.float64) / temperature):
        order = np.argsort(-row, kind="stable")
        if top_k:
            order = order[:top_k]
        p = np.exp(row[order] - row[order[0]])
        p /= p.sum()
        if top_p < 1:
            keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
            p = p[:keep] / p[:keep].sum()
            order = order[:keep]
        out[b] = order[rng.choice(len(order), p=p)]
    return out
