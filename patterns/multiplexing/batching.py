"""Continuous batching for the chat: the requests on one replica decode together, one token per
row per step, whatever adapter each row uses (a plain class, tested without Serve).

``DecodeBatcher`` owns the model's forward passes. ``generate`` queues a row and yields its
token ids; one driver task runs steps while any row is queued or running:

1. admit: the waiting rows (up to ``max_batch`` in all) get their adapter installed, are
   prefilled together (left-padded), and their KV cache is joined to the running one;
2. decode: one forward pass for every running row, each with its own adapter through peft's
   per-row selection (``adapter_names``, ``"__base__"`` for none), its own repetition penalty,
   temperature, top_p and seed;
3. leave: a row that hit EOS or its token limit, or whose consumer went away (``cancel``),
   is dropped from the batch and the cache before the next step; the others continue.

Left padding is masked and every row's positions count only its own tokens, so a row's greedy
answer is the same text alone or in a batch. An adapter in use by a running row is never
removed: ``release`` is told which adapters are in use before each admission.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in adapter_names


@dataclass(eq=False)
class Row:
    """One request in the batch: its prompt, limits and sampling, and what it has produced."""

    prompt: list[int]
    adapter: str  # a tenant installed in the model, or BASE_ADAPTER
    max_new: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    install: Callable[[], None] | None = None  # run on the model's thread before the prefill
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    seen: Any = None  # prompt + generated ids (a tensor), for the repetition penalty
    length: int = 0  # tokens in the cache for this row (its next position)
    generated: int = 0
    cancelled: bool = False
    generator: Any = None
    admitted: float = 0.0  # time.perf_counter() when it joined the batch


class BatchFailed(RuntimeError):
    """A forward pass or an adapter install failed; the rows it concerned are ended."""


class DecodeBatcher:
    """Runs the model for every concurrent request of a replica, ``max_batch`` rows at most."""

    def __init__(
        self,
        model: Any,
        *,
        eos_ids: set[int],
        pad_id: int,
        max_batch: int = 8,
        repetition_penalty: float = 1.0,
        device: str = "cpu",
        release: Callable[[set[str]], None] | None = None,
    ) -> None:
        self.model = model
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.penalty = repetition_penalty
        self.device = device
        self.release = release  # removes evicted adapters, except those in the set given
        self.waiting: list[Row] = []
        self.running: list[Row] = []
        self.cache: Any = None
        self.mask: Any = None  # [rows, cache length]: 0 where a row is left-padded
        self._driver: asyncio.Task | None = None
        self.counts = {"steps": 0, "row_steps": 0, "largest_batch": 0, "admissions": 0}

    # ---------------------------------------------------------------- the request side
    async def generate(self, row: Row) -> AsyncIterator[int]:
        """The row's token ids as they are decoded (EOS included); raises ``BatchFailed``.

        Leaving the iteration early (a stop sequence, a cancelled consumer) cancels the row:
        it leaves the batch at the next step.
        """
        self.waiting.append(row)
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        try:
            while True:
                item = await row.out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise BatchFailed(str(item)) from item
                yield item
        finally:
            row.cancelled = True

    async def _drive(self) -> None:
        while self.waiting or self.running:
            self.waiting = [r for r in self.waiting if not r.cancelled]
            self._leave([r for r in self.running if r.cancelled])
            room = self.max_batch - len(self.running)
            joining, self.waiting = self.waiting[:room], self.waiting[room:]
            if joining:
                for r in joining:
                    r.admitted = time.perf_counter()
                failed = await asyncio.to_thread(self._install, joining)
                for r, exc in failed.items():  # that request's error; the others go on
                    r.out.put_nowait(exc)
                joining = [r for r in joining if r not in failed]
            if not joining and not self.running:
                continue
            try:
                tokens = await asyncio.to_thread(self._step, joining)
            except BaseException as exc:  # the model failed: end every row it concerned
                for r in [*self.running, *joining]:
                    r.out.put_nowait(exc)
                self.running, self.cache, self.mask = [], None, None
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            done = []
            for r, token in zip(self.running, tokens, strict=True):
                r.generated += 1
                r.out.put_nowait(token)
                if token in self.eos_ids or r.generated >= r.max_new:
                    r.out.put_nowait(None)
                    done.append(r)
            self._leave(done)

    # ---------------------------------------------------------------- the model side
    def _step(self, joining: list[Row]) -> list[int]:
        """Admit ``joining`` (one prefill), then one decode step for the rows already running;
        the next token of every row in ``self.running`` order. On the model's thread."""
        import torch

        with torch.inference_mode():
            return self._admit(joining) if joining else self._decode()

    def _install(self, joining: list[Row]) -> dict[Row, BaseException]:
        """Evicted adapters out (except those in use), the joining rows' adapters in."""
        if self.release is not None:
            self.release({r.adapter for r in [*self.running, *joining]})
        failed: dict[Row, BaseException] = {}
        for r in joining:
            try:
                if r.install is not None:
                    r.install()
            except Exception as exc:
                failed[r] = exc
        return failed

    def _admit(self, joining: list[Row]) -> list[int]:
        import torch
        from transformers import DynamicCache

        width = max(len(r.prompt) for r in joining)
        ids = torch.full((len(joining), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(joining), width), dtype=torch.long)
        for i, r in enumerate(joining):
            ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt) :] = 1
            r.length = len(r.prompt)
            r.seen = torch.tensor(r.prompt, device=self.device)
            seed = r.seed if r.seed is not None else secrets.randbits(63)
            r.generator = torch.Generator(device=self.device).manual_seed(seed)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        ids, mask, positions = (t.to(self.device) for t in (ids, mask, positions))
        logits = self._forward(joining, ids, mask, positions, cache)
        new = self._pick(joining, logits)
        # decode the running rows too, so every row moves one token this step
        old = self._decode() if self.running else []
        self._join(joining, cache, mask)
        self.counts["admissions"] += 1
        return old + new

    def _decode(self) -> list[int]:
        import torch

        rows = self.running
        last = torch.stack([r.seen[-1] for r in rows]).unsqueeze(-1)
        ones = torch.ones((len(rows), 1), dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=-1)
        positions = torch.tensor([[r.length] for r in rows], device=self.device)
        logits = self._forward(rows, last, self.mask, positions, self.cache)
        for r in rows:
            r.length += 1
        self.counts["steps"] += 1
        self.counts["row_steps"] += len(rows)
        self.counts["largest_batch"] = max(self.counts["largest_batch"], len(rows))
        return self._pick(rows, logits)

    def _forward(self, rows: list[Row], ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        with self._adapters([r.adapter for r in rows]):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1, :].float()

    @contextmanager
    def _adapters(self, names: list[str]) -> Any:
        """Each row through its own adapter: peft's mixed-batch forward reads ``adapter_names``
        from the LoRA layers' kwargs (what PeftModel's ``_enable_peft_forward_hooks`` does)."""
        from peft.tuners.lora import LoraLayer

        def inject(_module: Any, args: Any, kwargs: Any) -> Any:
            return args, {**kwargs, "adapter_names": names}

        handles = [
            m.register_forward_pre_hook(inject, with_kwargs=True)
            for m in self.model.modules()
            if isinstance(m, LoraLayer)
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _pick(self, rows: list[Row], logits: Any) -> list[int]:
        """Each row's next token: repetition penalty over what it has seen (as transformers'
        processor does), then greedy or temperature + top_p sampling with the row's seed."""
        import torch

        tokens = []
        for r, row_logits in zip(rows, logits, strict=True):
            if self.penalty != 1.0:
                seen = row_logits.gather(0, r.seen)
                seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
                row_logits = row_logits.scatter(0, r.seen, seen)
            if r.temperature:
                probs = torch.softmax(row_logits / r.temperature, dim=-1)
                if r.top_p < 1.0:
                    sorted_p, order = probs.sort(descending=True)
                    drop = sorted_p.cumsum(0) - sorted_p > r.top_p  # keep the first over top_p
                    probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
                token = torch.multinomial(probs, 1, generator=r.generator)[0]
            else:
                token = row_logits.argmax()
            r.seen = torch.cat([r.seen, token.view(1)])
            tokens.append(int(token))
        return tokens

    def _join(self, joining: list[Row], cache: Any, mask: Any) -> None:
        """The new rows' cache and mask appended to the running ones, the shorter side
        left-padded with masked zeros."""
        import torch

        if not self.running:
            self.running, self.cache, self.mask = list(joining), cache, mask
            return
        gap = self.mask.shape[1] - mask.shape[1]

        def pad(t: Any, n: int) -> Any:  # n columns of zeros on the left of the seq dim
            if n <= 0:
                return t
            shape = list(t.shape)
            shape[-2 if t.dim() == 4 else -1] = n
            return torch.cat([t.new_zeros(shape), t], dim=-2 if t.dim() == 4 else -1)

        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([pad(mine.keys, -gap), pad(theirs.keys, gap)])
            mine.values = torch.cat([pad(mine.values, -gap), pad(theirs.values, gap)])
        self.mask = torch.cat([pad(self.mask, -gap), pad(mask, gap)])
        self.running += joining

    def _leave(self, rows: list[Row]) -> None:
        """Drop ``rows`` from the batch and the cache; trim columns no remaining row uses."""
        import torch

        if not rows:
            return
        with torch.inference_mode():
            self._drop(rows)

    def _drop(self, rows: list[Row]) -> None:
        import torch

        keep = [i for i, r in enumerate(self.running) if r not in rows]
        self.running = [self.running[i] for i in keep]
        if not self.running:
            self.cache = self.mask = None
            return
        index = torch.tensor(keep, device=self.device)
        self.mask = self.mask[index]
        start = int((self.mask.sum(0) > 0).nonzero()[0])  # the first column some row uses
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def stats(self) -> dict[str, Any]:
        steps = self.counts["steps"]
        return {
            "max_batch": self.max_batch,
            "running": len(self.running),
            "waiting": len(self.waiting),
            **self.counts,
            "mean_batch": round(self.counts["row_steps"] / steps, 2) if steps else 0.0,
        }
